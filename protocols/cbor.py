# A small, strict CBOR (RFC 8949) codec for the wire format, shared by the
# board (MicroPython) and the hub (CPython).
#
# Encoding writes into a caller-owned bytearray (no allocation beyond what the
# caller gives), always in the preferred, shortest form: the deterministic
# encoding of RFC 8949 section 4.2.1 as long as the caller writes map keys in
# ascending order, which every encoder in this package does.
#
# Decoding accepts only that same subset: definite lengths, shortest heads,
# integer or text map keys without duplicates, no floats, and only the tags
# the caller allows. Every length is checked against the bytes actually left
# before anything is allocated, nesting and item counts are bounded, and any
# input whatsoever either decodes or raises RemoteProtocolError.

from protocols._compat import const
from protocols.errors import LocalProtocolError

try:
    from protocols import _viper  # MicroPython: bytes moved without a copy to allocate
except ImportError:  # CPython, or a port without the viper emitter
    _viper = None  # type: ignore[assignment]

_MAJOR_UINT = const(0)
_MAJOR_NINT = const(1)
_MAJOR_BYTES = const(2)
_MAJOR_TEXT = const(3)
_MAJOR_ARRAY = const(4)
_MAJOR_MAP = const(5)
_MAJOR_TAG = const(6)
_MAJOR_SIMPLE = const(7)

# Nesting deeper than any message of ours needs is refused: bounds recursion.
MAX_DEPTH = const(8)
# No array or map of ours has more entries than this: bounds the work a
# peer can ask for with a tiny header claiming a huge container.
MAX_ITEMS = const(256)
# The longest head of a byte string below 64 KiB (Writer.bstr_written).
BSTR_HEAD_MAX = const(3)


class Tag:
    # A tagged item (major type 6), e.g. Tag(17, [...]) for COSE_Mac0.
    def __init__(self, tag: int, value: object) -> None:
        self.tag = tag
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and other.tag == self.tag and other.value == self.value

    def __repr__(self) -> str:
        return "Tag(%d, %r)" % (self.tag, self.value)


class Writer:
    # Appends CBOR items to buf from pos; raises LocalProtocolError if the
    # buffer is too small (the caller sized it wrong: our bug, not the peer's).
    # end: where the writer must stop (a region of a larger buffer: a
    # board's outbox ring, written in place with no view of it made).
    def __init__(self, buf: "bytearray | memoryview", pos: int = 0, end: int = -1) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end < 0 else end

    def _room(self, n: int) -> int:
        p = self.pos
        if p + n > self.end:
            raise LocalProtocolError("CBOR output buffer full (%d bytes)" % self.end, "buffer_full")
        self.pos = p + n
        return p

    def head(self, major: int, value: int) -> None:
        buf = self.buf
        mt = major << 5
        if value < 24:
            buf[self._room(1)] = mt | value
        elif value < 0x100:
            p = self._room(2)
            buf[p] = mt | 24
            buf[p + 1] = value
        elif value < 0x10000:
            p = self._room(3)
            buf[p] = mt | 25
            buf[p + 1] = value >> 8
            buf[p + 2] = value & 0xFF
        elif value < 0x100000000:
            p = self._room(5)
            buf[p] = mt | 26
            buf[p + 1] = (value >> 24) & 0xFF
            buf[p + 2] = (value >> 16) & 0xFF
            buf[p + 3] = (value >> 8) & 0xFF
            buf[p + 4] = value & 0xFF
        else:
            self._head64(mt, value)

    def _head64(self, mt: int, value: int) -> None:
        # (Apart from head: its loop would make head's call frame too big for
        # MicroPython's C stack, a heap allocation at every call.)
        if value >= 0x10000000000000000:
            raise LocalProtocolError("integer does not fit in 64 bits", "range")
        buf = self.buf
        p = self._room(9)
        buf[p] = mt | 27
        for i in range(8):
            buf[p + 1 + i] = (value >> (56 - 8 * i)) & 0xFF

    def uint(self, value: int) -> None:
        if value < 0:
            raise LocalProtocolError("uint field given a negative value", "range")
        self.head(_MAJOR_UINT, value)

    def uint_halves(self, hi: int, lo: int) -> None:
        # The unsigned integer hi * 2**30 + lo (0 <= lo < 2**30, 0 <= hi <
        # 2**34), encoded exactly as uint() encodes it, from its two halves:
        # a board's counters past 2**30 (a heap int on a 32-bit port, whose
        # small ints hold 31 bits) written with no int above 2**30 made.
        if hi == 0:
            self.head(_MAJOR_UINT, lo)
            return
        if hi < 0 or lo < 0 or lo >> 30 or hi >> 34:
            raise LocalProtocolError("uint_halves given halves out of range", "range")
        buf = self.buf
        if hi < 4:  # under 2**32: a 4-byte head
            p = self._room(5)
            buf[p] = 26
        else:
            p = self._room(9)
            buf[p] = 27
            buf[p + 1] = hi >> 26
            buf[p + 2] = (hi >> 18) & 0xFF
            buf[p + 3] = (hi >> 10) & 0xFF
            buf[p + 4] = (hi >> 2) & 0xFF
            p += 4
        buf[p + 1] = ((hi & 3) << 6) | (lo >> 24)
        buf[p + 2] = (lo >> 16) & 0xFF
        buf[p + 3] = (lo >> 8) & 0xFF
        buf[p + 4] = lo & 0xFF

    def sint(self, value: int) -> None:
        if value < 0:
            self.head(_MAJOR_NINT, -1 - value)
        else:
            self.head(_MAJOR_UINT, value)

    def bstr(self, data: "bytes | bytearray | memoryview") -> None:
        n = len(data)
        self.head(_MAJOR_BYTES, n)
        p = self._room(n)
        self.buf[p:p + n] = data

    def bstr_written(self, start: int, n: int) -> None:
        # The n bytes the caller wrote at buf[start:], start being pos +
        # BSTR_HEAD_MAX (room for the head, unknown until n was), become a
        # byte string item at pos: moved down if their head is shorter. For
        # data made in place (a frame's samples), with no buffer between.
        if start != self.pos + BSTR_HEAD_MAX or not 0 <= n < 0x10000:
            raise LocalProtocolError("bstr_written: data must start %d bytes after pos and be under 64 KiB"
                                     % BSTR_HEAD_MAX, "misuse")
        self.head(_MAJOR_BYTES, n)
        p = self._room(n)
        if p != start:
            if _viper is not None:
                _viper.move_down(self.buf, p, start, n)
            else:
                self.buf[p:p + n] = self.buf[start:start + n]

    def text(self, s: str) -> None:
        data = s.encode()
        n = len(data)
        self.head(_MAJOR_TEXT, n)
        p = self._room(n)
        self.buf[p:p + n] = data

    def array(self, n: int) -> None:
        self.head(_MAJOR_ARRAY, n)

    def map(self, n: int) -> None:
        self.head(_MAJOR_MAP, n)

    def tag(self, t: int) -> None:
        self.head(_MAJOR_TAG, t)

    def boolean(self, v: bool) -> None:
        self.buf[self._room(1)] = 0xF5 if v else 0xF4

    def null(self) -> None:
        self.buf[self._room(1)] = 0xF6


# Any item to and from Python objects (protocols/cbor_items.py), imported at
# first use: a board needs them only for its rarer downlink messages (it
# writes field by field with Writer and reads acks in place), so their code
# stays out of its RAM until one comes.

def encoded(obj: object, size: int = 4096) -> bytes:
    # Encodes a tree of int/bytes/str/list/dict/bool/None/Tag: for tests,
    # tools and rarely used hub paths (the board encodes field by field).
    from protocols import cbor_items

    return cbor_items.encoded(obj, size)


def decode(data: "bytes | bytearray | memoryview", tags: "tuple[int, ...]" = ()) -> object:
    # Decodes exactly one item that must span all of data.
    from protocols import cbor_items

    return cbor_items.decode(data, tags)


def decode_prefix(data: "bytes | bytearray | memoryview", pos: int = 0,
                  tags: "tuple[int, ...]" = ()) -> "tuple[object, int]":
    # Decodes one item starting at pos; returns (item, position after it).
    from protocols import cbor_items

    return cbor_items.decode_prefix(data, pos, tags)


def read_head(data: "bytes | bytearray | memoryview", pos: int, end: int) -> "tuple[int, int, int]":
    # Returns (major, value, position after the head). Refuses indefinite
    # lengths, reserved encodings and heads not in their shortest form.
    from protocols import cbor_items

    return cbor_items.read_head(data, pos, end)
