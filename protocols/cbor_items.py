# CBOR items to and from Python objects (protocols/cbor.py says what subset
# is accepted): the encoder of any tree of ints, bytes, text, lists, maps,
# booleans, None and tags, and the strict decoder. Imported by cbor.py's
# encoded(), decode(), decode_prefix() and read_head() at first use.

from protocols._compat import const
from protocols.cbor import MAX_DEPTH, MAX_ITEMS, Tag, Writer
from protocols.errors import LocalProtocolError, RemoteProtocolError

_MAJOR_UINT = const(0)
_MAJOR_NINT = const(1)
_MAJOR_BYTES = const(2)
_MAJOR_TEXT = const(3)
_MAJOR_ARRAY = const(4)
_MAJOR_MAP = const(5)
_MAJOR_TAG = const(6)
_MAJOR_SIMPLE = const(7)


def encoded(obj: object, size: int = 4096) -> bytes:
    # Encodes a tree of int/bytes/str/list/dict/bool/None/Tag: for tests,
    # tools and rarely used hub paths (the board encodes field by field).
    w = Writer(bytearray(size))
    _encode_obj(w, obj, 0)
    return bytes(w.buf[:w.pos])


def _encode_obj(w: Writer, obj: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LocalProtocolError("structure nested too deep to encode", "depth")
    if obj is True or obj is False:
        w.boolean(obj)
    elif obj is None:
        w.null()
    elif isinstance(obj, int):
        w.sint(obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        w.bstr(obj)
    elif isinstance(obj, str):
        w.text(obj)
    elif isinstance(obj, (list, tuple)):
        w.array(len(obj))
        for item in obj:
            _encode_obj(w, item, depth + 1)
    elif isinstance(obj, dict):
        w.map(len(obj))
        for k in sorted(obj, key=_key_order):
            _encode_obj(w, k, depth + 1)
            _encode_obj(w, obj[k], depth + 1)
    elif isinstance(obj, Tag):
        w.tag(obj.tag)
        _encode_obj(w, obj.value, depth + 1)
    else:
        raise LocalProtocolError("cannot encode %s as CBOR" % type(obj).__name__, "type")


def _key_order(k: object) -> bytes:
    # Deterministic key order (RFC 8949 4.2.1): bytewise order of the encoded keys.
    return encoded(k, 64)


def decode(data: "bytes | bytearray | memoryview", tags: "tuple[int, ...]" = ()) -> object:
    # Decodes exactly one item that must span all of data.
    obj, pos = decode_prefix(data, 0, tags)
    if pos != len(data):
        raise RemoteProtocolError("%d trailing bytes after the CBOR item" % (len(data) - pos), "trailing")
    return obj


def decode_prefix(data: "bytes | bytearray | memoryview", pos: int = 0,
                  tags: "tuple[int, ...]" = ()) -> "tuple[object, int]":
    # Decodes one item starting at pos; returns (item, position after it).
    return _item(data, pos, len(data), tags, 0)


def read_head(data: "bytes | bytearray | memoryview", pos: int, end: int) -> "tuple[int, int, int]":
    # Returns (major, value, position after the head). Refuses indefinite
    # lengths, reserved encodings and heads not in their shortest form.
    if pos >= end:
        raise RemoteProtocolError("CBOR item truncated at byte %d" % pos, "truncated")
    ib = data[pos]
    major = ib >> 5
    ai = ib & 0x1F
    pos += 1
    if ai < 24:
        return major, ai, pos
    if ai > 27:
        if ai == 31:
            raise RemoteProtocolError("indefinite-length CBOR item at byte %d" % (pos - 1), "indefinite")
        raise RemoteProtocolError("reserved CBOR head 0x%02x at byte %d" % (ib, pos - 1), "reserved")
    n = 1 << (ai - 24)
    if pos + n > end:
        raise RemoteProtocolError("CBOR head truncated at byte %d" % pos, "truncated")
    value = 0
    for i in range(n):
        value = (value << 8) | data[pos + i]
    if major != _MAJOR_SIMPLE and value < (24 if n == 1 else 1 << (4 * n)):
        raise RemoteProtocolError("CBOR head at byte %d not in shortest form" % (pos - 1), "non_canonical")
    return major, value, pos + n


def _item(data: "bytes | bytearray | memoryview", pos: int, end: int, tags: "tuple[int, ...]",
          depth: int) -> "tuple[object, int]":
    if pos < end:
        ib = data[pos]
        if ib < 24:  # the commonest item in our messages: a small unsigned integer
            return ib, pos + 1
    if depth > MAX_DEPTH:
        raise RemoteProtocolError("CBOR nested deeper than %d" % MAX_DEPTH, "depth")
    start = pos
    major, value, pos = read_head(data, pos, end)
    if major == _MAJOR_UINT:
        return value, pos
    if major == _MAJOR_NINT:
        return -1 - value, pos
    if major == _MAJOR_BYTES or major == _MAJOR_TEXT:
        if value > end - pos:
            raise RemoteProtocolError("CBOR string of %d bytes at byte %d overruns the input" % (value, start),
                                      "truncated")
        raw = bytes(data[pos:pos + value])
        pos += value
        if major == _MAJOR_BYTES:
            return raw, pos
        try:
            return str(raw, "utf-8"), pos
        except Exception:
            raise RemoteProtocolError("CBOR text at byte %d is not UTF-8" % start, "utf8") from None
    if major == _MAJOR_ARRAY:
        if value > MAX_ITEMS or value > end - pos:
            # (more items than bytes left: the input ends inside the array)
            raise RemoteProtocolError("CBOR array of %d items at byte %d is too long" % (value, start),
                                      "too_long" if value > MAX_ITEMS else "truncated")
        items: "list[object]" = []
        for _ in range(value):
            item, pos = _item(data, pos, end, tags, depth + 1)
            items.append(item)
        return items, pos
    if major == _MAJOR_MAP:
        if value > MAX_ITEMS or 2 * value > end - pos:
            raise RemoteProtocolError("CBOR map of %d entries at byte %d is too long" % (value, start),
                                      "too_long" if value > MAX_ITEMS else "truncated")
        out: "dict[object, object]" = {}
        for _ in range(value):
            key, pos = _item(data, pos, end, tags, depth + 1)
            if not isinstance(key, (int, str)) or key is True or key is False:
                raise RemoteProtocolError("CBOR map key at byte %d is not an integer or text" % start, "map_key")
            if key in out:
                raise RemoteProtocolError("duplicate CBOR map key %r" % (key,), "duplicate_key")
            out[key], pos = _item(data, pos, end, tags, depth + 1)
        return out, pos
    if major == _MAJOR_TAG:
        if value not in tags:
            raise RemoteProtocolError("CBOR tag %d not allowed here" % value, "tag")
        inner, pos = _item(data, pos, end, tags, depth + 1)
        return Tag(value, inner), pos
    # major 7
    if pos - start == 1:
        if value == 20:
            return False, pos
        if value == 21:
            return True, pos
        if value == 22:
            return None, pos
    raise RemoteProtocolError("unsupported CBOR simple value or float at byte %d" % start, "simple")
