"""The hub's fast decoders: each refuses exactly what its reference in
protocols/ refuses, and decodes the rest to the same values, faster.

cbor(): the strict CBOR codec's decode (protocols/cbor.py, which the board
runs too) through cbor2's C decoder, under a check that the input was in the
strict codec's form (below). decode(): the samples, vectorised with numpy.

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
from protocols import cose
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
# The delta each one-byte varint (0..127) stands for, zigzag undone.
_UNZIGZAG_1BYTE = np.array([(z >> 1) ^ -(z & 1) for z in range(128)], dtype=np.int32)


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
    a = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if len(a):
            raise RemoteProtocolError("%d bytes left after 0 samples" % len(a), "trailing")
        return np.zeros(0, dtype=np.int32)
    fast = _one_byte_deltas(a, count)
    if fast is not None:
        return fast
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
    return values.astype(np.int32)


def _one_byte_deltas(a: npt.NDArray[np.uint8], count: int) -> npt.NDArray[np.int32] | None:
    # The common case, in a few numpy calls: the first sample (a delta from 0,
    # so as large as the signal's baseline) in up to 5 bytes, every other delta
    # within +-64 in one byte. None: not that case (the general path decides).
    k = len(a) - count + 1  # the bytes the first varint takes if each other takes one
    if not 1 <= k <= _MAX_VARINT_BYTES:
        return None
    head = a[:k].tolist()
    if head[-1] >= 0x80 or (k > 1 and (head[-1] == 0 or min(head[:-1]) < 0x80)):
        return None  # the first varint is not exactly k bytes in shortest form
    rest = a[k:]
    if len(rest) and rest.max() >= 0x80:
        return None
    z = 0
    for i, byte in enumerate(head):
        z |= (byte & 0x7F) << (7 * i)
    first = (z >> 1) ^ -(z & 1)
    if abs(first) + 64 * count > _INT32_MAX:
        return None  # near the int32 bounds: the general path checks each sample
    out = np.empty(count, dtype=np.int32)
    out[0] = first
    out[1:] = _UNZIGZAG_1BYTE[rest]
    return np.cumsum(out, out=out)
