"""The hub's fast decoders: each refuses exactly what its reference in
protocols/ refuses, and decodes the rest to the same values, faster.

mac0(): protocols.cose.parse for the COSE_Mac0 envelope every board writes,
read by its byte layout. payload(): protocols.messages.decode_payload for the hub (a board's sample
frame read by its byte layout when it has the form boards write, anything else by
the reference, with cbor() for its CBOR). cbor(): the strict CBOR codec's
decode (protocols/cbor.py, which the board runs too) through cbor2's C
decoder, under a check that the input was in the strict codec's form
(below). decode(): the samples, vectorised with numpy.

Samples: the same encoding as protocols/samples.py (delta, zigzag, LEB128 varint),
whose pure-Python decoder is the reference (the board's, and the golden
vectors'). This one refuses exactly what the reference refuses (a wrong
count, a varint longer than 5 bytes or not in shortest form, a sample
outside the signed 32-bit range) and decodes the rest to the same values,
faster (36 us against 93 us for 512 ECG samples here; 5 us when every delta
fits one byte): ingest decodes every frame with it before it is acknowledged,
so what the store holds is what every consumer reads.
"""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
import numpy.typing as npt

from protocols import cbor as strict_cbor
from protocols import cipher, cose, messages, samples
from protocols.errors import RemoteProtocolError

# Inputs longer than this go to the strict decoder alone: the fast path is for
# payloads (a COSE payload is at most cose.MAX_PAYLOAD bytes), and this bounds
# what cbor2 may be asked to allocate whatever a head claims.
FAST_CBOR_MAX_BYTES = cose.MAX_PAYLOAD
# The integers the strict codec decodes: a head's 64-bit argument, unsigned or negative.
_CBOR_INT_MIN = -(2**64)
_CBOR_INT_MAX = 2**64 - 1
_MAX_DEPTH = strict_cbor.MAX_DEPTH
_MAX_ITEMS = strict_cbor.MAX_ITEMS
_SMALL_UINT = 24  # 0..23: one byte, which the strict codec takes at any depth

_MAX_VARINT_BYTES = 5
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
# The delta each one-byte varint (0..127) stands for, zigzag undone (-64..63), as an int8
# byte: a bytes.translate table (bytes 0x80 and above never reach it).
_UNZIGZAG_1BYTE_I8 = bytes(((z >> 1) ^ -(z & 1)) & 0xFF for z in range(128)) + bytes(128)
_INT8, _INT16_LE, _INT32 = np.dtype(np.int8), np.dtype("<i2"), np.dtype(np.int32)


# A COSE_Mac0 as boards write it: tag 17, an array of 4, the protected header
# {1: 5, 4: kid} (kid 1 to 16 bytes: its head one byte), an empty unprotected
# map, the payload (a head of 1, 2 or 3 bytes), the 32-byte tag.
_MAC0_START = b"\xd1\x84"
_PROTECTED_START = b"\xa2\x01\x05\x04"
_TAG_HEAD = b"\x58\x20"


def mac0(data: bytes) -> cose.Mac0:
    """cose.parse(data): the same Mac0 (kid, payload, tag) or the same RemoteProtocolError
    for any input; the envelope boards write is read by its layout, anything else by cose.parse."""
    m = _mac0(data)
    return m if m is not None else cose.parse(data)


def _mac0(data: bytes) -> cose.Mac0 | None:
    n = len(data)
    if n < 45 or data[:2] != _MAC0_START:  # 2 + 7 + 1 + 1 + 34: the shortest there is
        return None
    kid_len = data[2] - 0x40 - 5  # the protected header's bstr head: 0x40 + its length
    p_end = 3 + 5 + kid_len
    if not 1 <= kid_len <= cose.MAX_KID or data[3:7] != _PROTECTED_START or data[7] != 0x40 + kid_len \
            or data[p_end] != 0xA0:
        return None
    q = p_end + 1
    head = data[q]
    if 0x40 <= head < 0x58:
        size, q = head - 0x40, q + 1
    elif head == 0x58:
        size, q = data[q + 1], q + 2
        if size < 24:
            return None
    elif head == 0x59:
        size, q = (data[q + 1] << 8) | data[q + 2], q + 3
        if not 256 <= size <= cose.MAX_PAYLOAD:
            return None
    else:
        return None
    t = q + size
    if n != t + 2 + cose.TAG_SIZE or data[t:t + 2] != _TAG_HEAD:
        return None
    return cose.Mac0(bytes(data[8:p_end]), bytes(data[q:t]), bytes(data[t + 2:]))


_MAX_SAMPLE_BYTES = samples.WORST_BYTES_PER_SAMPLE
_U32_MAX = 0xFFFFFFFF


def payload(data: bytes | bytearray | memoryview, allowed_kinds: tuple[int, ...] = (),
            decode_samples: bool = True, opener: cipher.SampleCipher | None = None,
            versions: tuple[int, ...] = (messages.VERSION,)) -> messages.Message:
    """messages.decode_payload(data, ...) (protocols/decode.py), the same message
    or the same RemoteProtocolError for any input: a version 2 sample frame that
    a hub decrypts and leaves encoded (decode_samples=False, an opener) is read in
    one pass by its byte layout when it has exactly the fields boards write, in
    their order and in the strict codec's shortest form, each of the right type
    within its bounds; anything else (an error, an extension key, keys in another
    order, another message) is the reference's to answer, its CBOR through cbor().
    tests/agent/test_fast_cbor.py holds them to it."""
    if opener is not None and not decode_samples and versions == (messages.VERSION,) \
            and (not allowed_kinds or messages.T_SAMPLES in allowed_kinds) and len(data) <= FAST_CBOR_MAX_BYTES:
        frame = _sample_frame(data, opener)
        if frame is not None:
            return frame
    return messages.decode_payload(data, allowed_kinds, decode_samples, opener, versions, cbor_decode=cbor)


def _sample_frame(data: bytes | bytearray | memoryview, opener: cipher.SampleCipher) -> messages.SampleFrame | None:
    # The frame, or None: not in the form boards write (the reference decides). Read by its
    # byte layout (protocols/fields.py SampleFrameFields): the map of 15 fields (16 for PPG,
    # key 10 its LED drive) in ascending key order, each integer's head in shortest form, as
    # the strict codec wants it, each field within its bounds.
    if type(data) is not bytes:
        data = bytes(data)
    try:
        return _frame_at(data, opener)
    except IndexError:  # cut short: the reference says where
        return None


def _uint_at(data: bytes, i: int) -> tuple[int, int]:
    # The unsigned integer whose head is at data[i], in shortest form, and where the next item
    # starts; -1 for anything else (another major type, a longer head than needed). IndexError
    # past the end (a slice past it is caught by the next read: a frame ends with its salt).
    b = data[i]
    if b < 24:
        return b, i + 1
    if b == 24:
        v = data[i + 1]
        return (v if v >= 24 else -1), i + 2
    if b == 25:
        v = (data[i + 1] << 8) | data[i + 2]
        return (v if v >= 0x100 else -1), i + 3
    if b == 26:
        v = int.from_bytes(data[i + 1:i + 5], "big")
        return (v if v >= 0x10000 else -1), i + 5
    if b == 27:
        v = int.from_bytes(data[i + 1:i + 9], "big")
        return (v if v >= 0x100000000 else -1), i + 9
    return -1, i


# The fixed bytes of a frame as boards write it: its start (map head, then keys 0 and 1 with
# T_SAMPLES and VERSION, then key 2), and its end (key 14: A256CTR, -65532, a negative
# integer's two-byte head; key 15: the 16-byte boot salt's head).
_FRAME_START = b"\x00\x01\x01\x02\x02"
_FRAME_END = b"\x0e\x39\xff\xfb\x0f\x50"
_MAP_ECG, _MAP_PPG = 0xA0 + 15, 0xA0 + 16
_ARRAY_2, _ARRAY_4 = 0x82, 0x84
_ENCODING_SAMPLES = bytes((12, samples.ENCODING_DELTA_ZIGZAG_VARINT, 13))  # key 12, its value, key 13


def _frame_at(data: bytes, opener: cipher.SampleCipher) -> messages.SampleFrame | None:
    uint = _uint_at
    head = data[0]
    if (head != _MAP_ECG and head != _MAP_PPG) or data[1:6] != _FRAME_START:
        return None
    epoch, i = uint(data, 6)
    if data[i] != 3:
        return None
    seq, i = uint(data, i + 1)
    if data[i] != 4:
        return None
    stream, i = uint(data, i + 1)
    if data[i] != 5:
        return None
    t0_ms, i = uint(data, i + 1)
    if data[i] != 6:
        return None
    first_index, i = uint(data, i + 1)
    if data[i] != 7:
        return None
    rate, i = uint(data, i + 1)
    if data[i] != 8:
        return None
    count, i = uint(data, i + 1)
    if data[i] != 9 or data[i + 1] != _ARRAY_2:
        return None
    scale_num, i = uint(data, i + 2)
    scale_den, i = uint(data, i)
    nch = messages.STREAM_CHANNELS.get(stream, 0)
    if not (0 <= epoch <= messages.MAX_EPOCH and 0 <= seq <= messages.MAX_SEQ and nch
            and 0 <= t0_ms <= messages.MAX_UPLINK_INT and 0 <= first_index <= messages.MAX_UPLINK_INT
            and 1 <= rate <= 100000 and 1 <= count <= messages.MAX_SAMPLES
            and 0 <= scale_num <= _U32_MAX and 1 <= scale_den <= _U32_MAX):
        return None
    drive: tuple[int, int, int, int] | None = None
    if stream == messages.STREAM_PPG_MAX30102:
        if head != _MAP_PPG or data[i] != 10 or data[i + 1] != _ARRAY_4:
            return None
        d0, i = uint(data, i + 2)
        d1, i = uint(data, i)
        d2, i = uint(data, i)
        d3, i = uint(data, i)
        if not (0 <= d0 <= messages.MAX_UPLINK_INT and 0 <= d1 <= messages.MAX_UPLINK_INT
                and 0 <= d2 <= messages.MAX_UPLINK_INT and 0 <= d3 <= messages.MAX_UPLINK_INT):
            return None
        drive = (d0, d1, d2, d3)
    elif head != _MAP_ECG:
        return None
    if data[i] != 11 or data[i + 1] != _ARRAY_4:
        return None
    flags, i = uint(data, i + 2)
    fifo_lost, i = uint(data, i)
    dropped, i = uint(data, i)
    jitter_us, i = uint(data, i)
    if not (0 <= flags <= messages.MAX_UPLINK_INT and 0 <= fifo_lost <= messages.MAX_UPLINK_INT
            and 0 <= dropped <= messages.MAX_UPLINK_INT and 0 <= jitter_us <= messages.MAX_UPLINK_INT):
        return None
    if data[i:i + 3] != _ENCODING_SAMPLES or data[i + 3] != 0x80 + nch:
        return None
    i += 4
    # Each channel's bytes (a head of 1, 2 or 3 bytes: at most count * _MAX_SAMPLE_BYTES, 5120).
    bounds = []
    most = count * _MAX_SAMPLE_BYTES
    for _ in range(nch):
        b = data[i]
        if 0x40 <= b < 0x58:
            size, i = b - 0x40, i + 1
        elif b == 0x58:
            size, i = data[i + 1], i + 2
            if size < 24:
                return None
        elif b == 0x59:
            size, i = (data[i + 1] << 8) | data[i + 2], i + 3
            if size < 0x100:
                return None
        else:
            return None
        if not count <= size <= most:
            return None
        bounds.append((i, i + size))
        i += size
    if data[i:i + 6] != _FRAME_END or len(data) != i + 6 + cipher.BOOT_SALT_SIZE:
        return None
    salt = data[i + 6:]
    # The channels are one keystream, in order: decrypted in one call.
    if nch == 1:
        a, z = bounds[0]
        clear_channels = [opener.opened(data[a:z], epoch, seq, salt)]
    else:
        clear = opener.opened(b"".join([data[a:z] for a, z in bounds]), epoch, seq, salt)
        clear_channels, offset = [], 0
        for a, z in bounds:
            clear_channels.append(clear[offset:offset + z - a])
            offset += z - a
    frame = messages.SampleFrame(epoch, seq, stream, t0_ms, first_index, rate, count, (scale_num, scale_den), drive,
                                 (flags, fifo_lost, dropped, jitter_us),
                                 clear_channels)  # type: ignore[arg-type]  # encoded: decode_samples=False
    frame.boot_salt = salt
    return frame


def cbor(data: bytes | bytearray | memoryview) -> object:
    """protocols.cbor.decode(data), with no tag allowed: the one CBOR item spanning
    data (int, bytes, str, list, dict, bool, None), or RemoteProtocolError.

    cbor2 decodes; the item is taken only if it holds nothing but those types
    within the strict codec's bounds (depth, items, integer range, map keys int
    or text) and cbor2 encodes it back to exactly the input's bytes. cbor2
    writes shortest heads, definite lengths and a map's keys in the order given
    (the input's), and never a tag for these types: so the input had none of
    what the strict codec refuses (longer heads, indefinite lengths, floats,
    tags, other simple values, duplicate keys: a dict keeps one). Anything else
    (or anything cbor2 itself refuses) is decided by the strict codec, whose
    answer, value or error, is then the answer. tests/agent/test_fast_cbor.py
    holds both to the same answers on random, mutated and valid inputs."""
    if len(data) <= FAST_CBOR_MAX_BYTES:
        item = fast_cbor(data)
        if item is not MISS:
            return item
    return strict_cbor.decode(data)


class _Miss:
    def __repr__(self) -> str:
        return "MISS"


MISS = _Miss()  # fast_cbor(): the strict codec must decide


def fast_cbor(data: bytes | bytearray | memoryview) -> object:
    """The fast path of cbor() alone: the item, or MISS when the strict codec must decide."""
    try:
        item = cbor2.loads(data)
    except Exception:  # anything cbor2 refuses, or fails on: the strict codec decides
        return MISS
    if _plain(item, 0) and cbor2.dumps(item) == data:
        return item
    return MISS


def _plain(item: Any, depth: int) -> bool:
    # Whether item is what the strict codec could have decoded at this depth
    # (protocols/cbor.py _item): its types and bounds, not its encoding. The
    # integers in a container are checked in line (most items are).
    t = type(item)
    if t is int:
        return _int_ok(item, depth)
    if depth > _MAX_DEPTH:
        return False
    if t is bytes or t is str or t is bool or item is None:
        return True
    inner = depth + 1
    if t is list:
        if len(item) > _MAX_ITEMS:
            return False
        for x in item:
            if type(x) is int:
                if not (0 <= x < _SMALL_UINT or _int_ok(x, inner)):
                    return False
            elif not _plain(x, inner):
                return False
        return True
    if t is dict:
        if len(item) > _MAX_ITEMS:
            return False
        for k, v in item.items():
            tk = type(k)
            if tk is int:
                if not (0 <= k < _SMALL_UINT or _int_ok(k, inner)):
                    return False
            elif tk is not str or inner > _MAX_DEPTH:
                return False
            if type(v) is int:
                if not (0 <= v < _SMALL_UINT or _int_ok(v, inner)):
                    return False
            elif not _plain(v, inner):
                return False
        return True
    return False


def _int_ok(v: int, depth: int) -> bool:
    # A small uint is taken before the depth check; any other integer after it, within 64 bits.
    return 0 <= v < _SMALL_UINT or (depth <= _MAX_DEPTH and _CBOR_INT_MIN <= v <= _CBOR_INT_MAX)


def decode(data: bytes | bytearray | memoryview, count: int) -> npt.NDArray[np.int32]:
    """Decodes exactly `count` samples spanning all of `data` into an int32 array of shape (count,);
    raises RemoteProtocolError otherwise."""
    return decode_with_steps(data, count)[0]


def decode_with_steps(data: bytes | bytearray | memoryview,
                      count: int) -> tuple[npt.NDArray[np.int32], tuple[int, int, bytes] | None]:
    """decode(data, count), and, when every delta after the first sample took one or two
    bytes on the wire (most frames: ECG's QRS steps take two), the steps as agent/record.py
    stores them: (first sample, width, the count - 1 steps as signed little-endian integers
    of width bytes: 1 when they all fit int8, else 2); else None."""
    if count == 0:
        if len(data):
            raise RemoteProtocolError("%d bytes left after 0 samples" % len(data), "trailing")
        return np.zeros(0, dtype=np.int32), None
    steps = short_steps(data, count)
    if steps is not None:
        first, width, body = steps
        out = np.empty(count, dtype=_INT32)
        out[0] = first
        out[1:] = np.frombuffer(body, dtype=_INT8 if width == 1 else _INT16_LE)
        return np.add.accumulate(out, out=out), steps  # no overflow: _short_steps bounds the sum
    a = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(a < 0x80)
    if len(ends) != count or ends[-1] != len(a) - 1:
        raise RemoteProtocolError("sample data does not hold exactly %d varints" % count, "sample_count")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if lens.max() > _MAX_VARINT_BYTES:
        raise RemoteProtocolError("varint longer than %d bytes" % _MAX_VARINT_BYTES, "varint")
    if np.any((a[ends] == 0) & (lens > 1)):
        raise RemoteProtocolError("varint not in shortest form", "non_canonical")
    # Each byte's 7 bits shifted to their place in its varint, summed per varint.
    place = np.arange(len(a)) - np.repeat(starts, lens)
    z = np.add.reduceat((a & 0x7F).astype(np.int64) << (7 * place), starts)
    d = (z >> 1) ^ -(z & 1)
    values = np.cumsum(d)  # at most 1024 terms below 2^35: no int64 overflow
    if values.min() < _INT32_MIN or values.max() > _INT32_MAX:
        raise RemoteProtocolError("a sample outside the signed 32-bit range", "range")
    return values.astype(np.int32), None


def short_steps(data: bytes | bytearray | memoryview, count: int) -> tuple[int, int, bytes] | None:
    """decode_with_steps(data, count)'s steps (count >= 1) without the samples: (first sample,
    width, the steps), or None when they are not all of one or two bytes on the wire (or
    not valid: decode() then says what is wrong). Its answer stands for the check decode()
    makes: the samples summed from these steps are decode()'s."""
    return _short_steps(data if type(data) is bytes else bytes(data), count)


def _short_steps(data: bytes, count: int) -> tuple[int, int, bytes] | None:
    # The common cases, in a few calls: the first sample (a delta from 0, so as
    # large as the signal's baseline) in up to 5 bytes, every other delta in one
    # byte (-64..63: bytes.translate turns each into its int8 step), or in one or
    # two (-8192..8191: numpy). None: not those cases, or not in shortest form,
    # or near the int32 bounds (the general path decides, and raises what the
    # reference raises).
    k, n = 0, len(data)
    while k < _MAX_VARINT_BYTES and k < n and data[k] >= 0x80:
        k += 1
    if k == _MAX_VARINT_BYTES or k == n or (k and data[k] == 0):
        return None  # the first varint is longer than 5 bytes, cut, or not in shortest form
    z = 0
    for i in range(k + 1):
        z |= (data[i] & 0x7F) << (7 * i)
    first = (z >> 1) ^ -(z & 1)
    rest = data[k + 1:]
    if rest.isascii():  # every delta in one byte
        if len(rest) != count - 1 or abs(first) + 64 * count > _INT32_MAX:
            return None
        return first, 1, rest.translate(_UNZIGZAG_1BYTE_I8)
    # Deltas of one or two bytes: each byte paired with the one before it (a uint16 view of
    # the bytes shifted by one: before | byte << 8), and each varint's last byte (< 0x80) looked
    # up in _PAIRS, which gives its delta and whether a two-byte varint ended there.
    pairs = np.ndarray((len(rest),), _UINT16_LE, b"\x00" + rest, 0, (1,)).copy()  # aligned: faster to compare
    found = _PAIRS.take(pairs[pairs < 0x8000])  # one entry a varint
    if len(found) != count - 1 or rest[-1] >= 0x80 or abs(first) + 8192 * count > _INT32_MAX:
        return None
    total = int(found.sum())
    # Every continuation byte ends a two-byte varint in shortest form (none of three bytes or
    # more, none cut at the end, none with a zero second byte): else the general path decides.
    if (total >> _PAIR_TWO_BYTES_BIT) & _PAIR_COUNT_MASK != len(rest) - len(found):
        return None
    if total >> _PAIR_WIDE_BIT == 0:  # every step within int8
        return first, 1, found.astype(_INT8).tobytes()
    return first, 2, found.astype(_INT16_LE).tobytes()


def _pair_table() -> npt.NDArray[np.int64]:
    # _PAIRS[before | byte << 8] for a varint's last byte (byte < 0x80): its delta's low 16 bits,
    # bit _PAIR_TWO_BYTES_BIT when the varint is two bytes in shortest form (before >= 0x80,
    # byte != 0), bit _PAIR_WIDE_BIT when the delta does not fit int8. Their sum over a channel
    # (at most 4096 entries) keeps each in its field: the deltas' low bits below bit 28, the
    # counts in 13 bits each.
    before = np.arange(1 << 16) & 0xFF
    byte = np.arange(1 << 16) >> 8
    two = (before >= 0x80) & (byte != 0)
    z = np.where(before >= 0x80, (before & 0x7F) | (byte << 7), byte)
    delta = (z >> 1) ^ -(z & 1)
    wide = (delta < -128) | (delta > 127)
    table: npt.NDArray[np.int64] = ((delta & 0xFFFF) | (two.astype(np.int64) << _PAIR_TWO_BYTES_BIT)
                                    | (wide.astype(np.int64) << _PAIR_WIDE_BIT)).astype(np.int64)
    return table


_PAIR_TWO_BYTES_BIT = 28
_PAIR_WIDE_BIT = 41
_PAIR_COUNT_MASK = (1 << 13) - 1
_UINT16_LE = np.dtype("<u2")
_PAIRS = _pair_table()
