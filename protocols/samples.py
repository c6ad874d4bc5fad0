# Sample encoding inside a frame: encoding 1, "delta-zigzag-varint".
#
# Each channel is coded on its own: every sample is replaced by its
# difference from the previous one (the first by its difference from 0),
# mapped to an unsigned integer by zigzag (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...)
# and written as an unsigned LEB128 varint (7 bits a byte, high bit set on
# all but the last byte). SPEC.md gives the measurements behind this choice.
#
# The encoder writes into a caller-owned buffer and allocates nothing per
# sample; the decoder checks every bound and raises only RemoteProtocolError.

from protocols._compat import const
from protocols.errors import LocalProtocolError, RemoteProtocolError

try:
    from protocols import _viper  # MicroPython: the loop as native code
except ImportError:  # CPython, or a port without the viper emitter
    _viper = None  # type: ignore[assignment]
# The viper loop itself, called with no module attribute between (a word
# less of encode_into's frame, which keeps within the VM's 11).
_varint_into = None if _viper is None else _viper.varint_into

ENCODING_DELTA_ZIGZAG_VARINT = const(1)
# Samples are signed 32-bit at most (the sensors give 18 bits): a varint of
# more than 5 bytes cannot be one of ours.
_MAX_VARINT_BYTES = const(5)
_INT32_MIN = const(-0x80000000)
_INT32_MAX = const(0x7FFFFFFF)
# Room one sample can take in the worst case, checked before each write.
WORST_BYTES_PER_SAMPLE = const(5)


def encode_into(src: "list[int]", count: int, out: "bytearray | memoryview", pos: int, limit: int = -1) -> int:
    # Writes src[0:count] at out[pos:limit] (limit < 0: to its end); returns
    # the position after it. (A board encodes three channels a second: this
    # frame keeps within the VM's 11 words, so it is not taken from the
    # heap, README "call frames"; the result reuses count.)
    if _varint_into is not None and not isinstance(src, list):  # an array("i"), as the board holds samples
        count = _varint_into(src, count, out, pos, limit)
        if count < 0:
            _buffer_full(-1 - count)
        return count
    return _encode_plain(src, count, out, pos, limit)


def _buffer_full(i: int) -> None:
    raise LocalProtocolError("sample buffer full after %d samples" % i, "buffer_full")


def _encode_plain(src: "list[int]", count: int, out: "bytearray | memoryview", pos: int, limit: int) -> int:
    end = (len(out) if limit < 0 else limit) - _MAX_VARINT_BYTES
    prev = 0
    for i in range(count):
        v = src[i]
        d = v - prev
        prev = v
        z = (d << 1) if d >= 0 else ((-d << 1) - 1)
        if pos > end:
            _buffer_full(i)
        while z >= 0x80:
            out[pos] = (z & 0x7F) | 0x80
            z >>= 7
            pos += 1
        out[pos] = z
        pos += 1
    return pos


def decode(data: "bytes | bytearray | memoryview", count: int) -> "list[int]":
    # Decodes exactly count samples spanning all of data.
    n = len(data)
    if count > n:
        raise RemoteProtocolError("%d samples cannot fit in %d bytes" % (count, n), "sample_count")
    out = [0] * count
    pos = 0
    prev = 0
    for i in range(count):
        z = 0
        shift = 0
        while True:
            if pos >= n:
                raise RemoteProtocolError("sample data ends inside sample %d" % i, "truncated")
            b = data[pos]
            pos += 1
            z |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift >= 7 * _MAX_VARINT_BYTES:
                raise RemoteProtocolError("varint longer than %d bytes in sample %d" % (_MAX_VARINT_BYTES, i),
                                          "varint")
        if b == 0 and shift:
            raise RemoteProtocolError("varint of sample %d not in shortest form" % i, "non_canonical")
        prev += (z >> 1) if not (z & 1) else -((z + 1) >> 1)
        if prev < _INT32_MIN or prev > _INT32_MAX:
            raise RemoteProtocolError("sample %d outside the signed 32-bit range" % i, "range")
        out[i] = prev
    if pos != n:
        raise RemoteProtocolError("%d bytes left after %d samples" % (n - pos, count), "trailing")
    return out
