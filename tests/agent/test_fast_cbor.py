# The hub's fast decoders (agent/fastdecode.py: cbor, cbor2's C decoder under
# checks; payload, a board's sample frame in one pass) against the strict
# codec of protocols/ (the board's, and the reference): on any input, both
# refuse (with the reference's error) or both decode to the same value,
# types included. Inputs: random bytes,
# mutations of a real frame's payload, and trees encoded with every choice
# the strict codec refuses (longer heads, indefinite lengths, duplicate keys,
# floats, tags, simple values, bad UTF-8, trailing or missing bytes, too deep,
# too many items) as well as the forms it takes.
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import fastdecode
from protocols import cbor, cipher, cose, messages
from protocols.errors import RemoteProtocolError
from tests.protocols.strategies import frames
from tests.protocols.test_fuzz import mutated
from tests.shared.test_vectors import ACK, FRAME, FRAME_PAYLOAD


def _same(a: Any, b: Any) -> bool:
    # Equal values of the same types all the way down (True == 1 in Python; not here).
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) \
            and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _check(data: bytes) -> str:
    """Both decoders give the same answer for data; returns which ("fast", "strict", "refused")."""
    try:
        expected = cbor.decode(data)
    except RemoteProtocolError as e:
        assert fastdecode.fast_cbor(data) is fastdecode.MISS, data.hex()
        with pytest.raises(RemoteProtocolError) as got:
            fastdecode.cbor(data)
        assert got.value.reason == e.reason
        return "refused"
    fast = fastdecode.fast_cbor(data)
    assert fast is fastdecode.MISS or _same(fast, expected), data.hex()
    assert _same(fastdecode.cbor(data), expected), data.hex()
    return "strict" if fast is fastdecode.MISS else "fast"


def _head(major: int, value: int, width: int) -> bytes:
    # width 0: the value in the initial byte (value < 24); else 1, 2, 4 or 8 bytes after it.
    if width == 0:
        return bytes([(major << 5) | value])
    ai = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([(major << 5) | ai]) + value.to_bytes(width, "big")


def _widths(value: int) -> list[int]:
    return [w for w in (0, 1, 2, 4, 8) if (w == 0 and value < 24) or (w and value < 1 << (8 * w))]


_INTS = st.one_of(st.integers(0, 30), st.integers(-30, -1), st.integers(-(2**64), 2**64 - 1),
                  st.sampled_from([23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -(2**64), -24, -25]))


def _int(v: int, width: int | None = None) -> bytes:
    major, arg = (0, v) if v >= 0 else (1, -1 - v)
    return _head(major, arg, _widths(arg)[0] if width is None else width)


def _text(t: bytes) -> bytes:
    return _head(3, len(t), _widths(len(t))[0]) + t


@st.composite
def _item(draw: st.DrawFn, depth: int = 0, plan: list[int] | None = None) -> bytes:
    # A tree of items in the form the strict codec takes, but for one node (the
    # plan[0]-th made, if the tree has that many) with one thing it refuses (one
    # of the defects below): alone in the input, so the check behind each is
    # what decides.
    if plan is None:
        plan = [-1]
    plan[0] -= 1
    if plan[0] == -1:
        return draw(_defect(depth))
    leaf = depth >= 10 or draw(st.integers(0, 3)) == 3  # (hypothesis draws 0 more often than the rest)
    kind = draw(st.sampled_from(([] if leaf else ["map", "array"] * 2) + ["int", "bytes", "text", "simple"]))
    if kind == "int":
        return _int(draw(_INTS))
    if kind == "bytes":
        b = draw(st.binary(max_size=40))
        return _head(2, len(b), _widths(len(b))[0]) + b
    if kind == "text":
        return _text(draw(st.text(max_size=20)).encode("utf-8", "surrogatepass"))  # a surrogate: not UTF-8
    if kind == "simple":  # false, true, null, and empty containers
        return draw(st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\x80", b"\xa0"]))
    if kind == "array":
        n = draw(st.integers(1, 5))
        return _head(4, n, _widths(n)[0]) + b"".join(draw(_item(depth + 1, plan)) for _ in range(n))
    keys = draw(st.lists(st.one_of(st.integers(-(2**64), 2**64 - 1), st.text(max_size=4)), min_size=1, max_size=5,
                         unique_by=lambda k: (type(k), k)))
    entries = [(_int(k) if isinstance(k, int) else _text(k.encode())) + draw(_item(depth + 1, plan)) for k in keys]
    return _head(5, len(entries), _widths(len(entries))[0]) + b"".join(entries)


@st.composite
def _defect(draw: st.DrawFn, depth: int) -> bytes:
    kind = draw(st.sampled_from(["long_head", "simple", "float", "bad", "key", "duplicate", "tag", "bignum",
                                 "indefinite", "deep", "items"]))
    if kind == "long_head":  # an integer, or a string's length, in more bytes than it needs
        v = draw(st.integers(0, 2**32 - 1))
        width = draw(st.sampled_from([w for w in (1, 2, 4, 8) if w > _widths(v)[0]]))
        return _int(v, width) if draw(st.booleans()) else _head(2, 1, width) + b"x"
    if kind == "simple":
        return draw(st.sampled_from([b"\xf7", b"\xf8\x14", b"\xf8\x20", b"\xe0", b"\xf3"]))
    if kind == "float":
        n = draw(st.sampled_from([2, 4, 8]))
        return {2: b"\xf9", 4: b"\xfa", 8: b"\xfb"}[n] + draw(st.binary(min_size=n, max_size=n))
    if kind == "bad":  # reserved heads, a lone break, a head cut short
        return draw(st.sampled_from([b"\x1c", b"\x5d", b"\xff", b"\x19\x01", b"\x9b\x00"]))
    if kind == "key":  # a map key neither an integer nor text
        key = draw(st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\x40", b"\x80", b"\xa0"]))
        return b"\xa2" + key + draw(_item(depth + 1)) + b"\x18\x63\x00"  # and key 99
    if kind == "duplicate":
        k = draw(st.sampled_from([b"\x01", b"\x61a", b"\x38\x63"]))
        return b"\xa2" + k + draw(_item(depth + 1)) + k + draw(_item(depth + 1))
    if kind == "tag":
        tag = draw(st.sampled_from([0, 1, 2, 3, 17, 24, 25, 28, 29, 256, 258, 55799]))
        return _head(6, tag, _widths(tag)[0]) + draw(_item(depth + 1))
    if kind == "bignum":  # tag 2 or 3 around the 64-bit bound
        n = draw(st.sampled_from([8, 9]))
        return draw(st.sampled_from([b"\xc2", b"\xc3"])) + bytes([0x40 + n]) + draw(st.binary(min_size=n, max_size=n))
    if kind == "indefinite":
        which = draw(st.integers(0, 3))
        if which == 0:
            return b"\x5f" + b"".join(b"\x41x" for _ in range(draw(st.integers(0, 2)))) + b"\xff"
        if which == 1:
            return b"\x7f\x61y\xff"
        if which == 2:
            return b"\x9f" + b"".join(draw(_item(depth + 1)) for _ in range(draw(st.integers(0, 3)))) + b"\xff"
        return b"\xbf\x01" + draw(_item(depth + 1)) + b"\xff"
    if kind == "deep":  # arrays nested to the depth bound or past it, ending in a small int or something else
        n = max(0, cbor.MAX_DEPTH - depth + draw(st.integers(0, 2)))
        return b"\x81" * n + draw(st.sampled_from([b"\xa1\x61k\x00", b"\x80", b"\x17", b"\xa1\x00\x18\x18",
                                                   b"\x18\x18", b"\xa1\x18\x18\x00", b"\x40", b"\x20"]))
    n = draw(st.sampled_from([255, 256, 257]))  # an array or a map at the item bound or past it
    if draw(st.booleans()):
        return _head(4, n, 2) + b"\x00" * n
    return _head(5, n, 2) + b"".join(_int(i) + b"\x00" for i in range(n))


@st.composite
def _encodings(draw: st.DrawFn) -> bytes:
    data = draw(_item(0, [draw(st.integers(0, 8))]))
    edit = draw(st.integers(0, 9))
    if edit == 9 and data:
        return data[:draw(st.integers(0, len(data) - 1))]  # cut short
    if edit == 8:
        return data + draw(st.binary(min_size=1, max_size=3))  # trailing bytes
    return data


@pytest.mark.slow
@settings(max_examples=1500)
@given(st.one_of(_encodings(), st.binary(max_size=64), mutated(FRAME_PAYLOAD)))
def test_the_fast_decoder_answers_as_the_strict_codec(data: bytes) -> None:
    _check(data)


# Values the strict codec takes, as a board or the hub encodes them (deterministic form).
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _INTS, st.binary(max_size=30), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.integers(-(2**64), 2**64 - 1), st.text(max_size=5)), inner,
                                            max_size=5)),
    max_leaves=30)


@settings(max_examples=500)
@given(_values)
def test_what_the_strict_codec_encodes_is_taken_by_the_fast_path(value: Any) -> None:
    data = cbor.encoded(value, 65536)
    if len(data) <= fastdecode.FAST_CBOR_MAX_BYTES:
        assert _check(data) == "fast"


@pytest.mark.parametrize("data, answer", [
    (FRAME_PAYLOAD, "fast"),
    (bytes.fromhex("a2020101f5"), "fast"),  # keys in any order, as the strict codec takes them
    (bytes.fromhex("a201f50201"), "fast"),
    (bytes.fromhex("a201010101"), "refused"),  # a duplicate key
    (bytes.fromhex("1817"), "refused"),  # 23 in two bytes
    (bytes.fromhex("1b0000000100000000"), "fast"),  # 2**32 needs 8 bytes
    (bytes.fromhex("1a00010000"), "fast"),  # 65536 needs 4 bytes
    (bytes.fromhex("1a0000ffff"), "refused"),  # 65535 does not
    (bytes.fromhex("c249010000000000000000"), "refused"),  # a bignum (tag 2): 2**64
    (bytes.fromhex("3bffffffffffffffff"), "fast"),  # -2**64, the lowest integer
    (bytes.fromhex("f90000"), "refused"),  # a half float
    (bytes.fromhex("f7"), "refused"),  # undefined
    (bytes.fromhex("d9d9f701"), "refused"),  # the self-described CBOR tag, which cbor2 drops
    (bytes.fromhex("a1f501"), "refused"),  # a boolean key
    (bytes.fromhex("a2f50101f5"), "refused"),  # keys true and 1: one in a Python dict
    (bytes.fromhex("62c328"), "refused"),  # not UTF-8
    (bytes(b"\x81" * 8 + b"\x17"), "fast"),  # a small int as deep as it can go
    (bytes(b"\x81" * 9 + b"\x17"), "fast"),  # a small int past the bound: taken as the strict codec takes it
    (bytes(b"\x81" * 9 + b"\x18\x18"), "refused"),  # any other item past it: refused
    (bytes(b"\x81" * 9 + b"\x80"), "refused"),
    (bytes(b"\x81" * 8 + b"\xa1\x00\x17"), "fast"),  # a map as deep as it can go, small ints in it
    (bytes(b"\x81" * 8 + b"\xa1\x61k\x00"), "refused"),  # a text key in it: past the bound
    (b"\x99\x01\x00" + b"\x00" * 256, "fast"),  # 256 items
    (b"\x99\x01\x01" + b"\x00" * 257, "refused"),  # 257
    (b"", "refused"),
])
def test_edges(data: bytes, answer: str) -> None:
    assert _check(data) == answer


@pytest.mark.parametrize("nest", [b"\x81", b"\xa1\x00", b"\xa1\x61k"])
@pytest.mark.parametrize("n", range(6, 11))
@pytest.mark.parametrize("end", [b"\x17", b"\x18\x18", b"\x20", b"\x40", b"\x80", b"\xf5", b"\xa1\x00\x17",
                                 b"\xa1\x61k\x00", b"\xa1\x00\x18\x18", b"\xa1\x18\x18\x00"])
def test_items_at_the_depth_bound(nest: bytes, n: int, end: bytes) -> None:
    # Arrays or maps nested n deep around each kind of item: taken or refused as the strict codec does.
    _check(nest * n + end)


def test_a_boards_frame_payload_takes_the_fast_path() -> None:
    # The fast path must be what runs for a board's real payload.
    assert fastdecode.fast_cbor(FRAME_PAYLOAD) is not fastdecode.MISS
    assert cbor2.dumps(cbor.decode(FRAME_PAYLOAD)) == FRAME_PAYLOAD
    assert isinstance(messages.decode_payload(FRAME_PAYLOAD, decode_samples=False, cbor_decode=fastdecode.cbor),
                      messages.SampleFrame)


# ---- payload(): a board's sample frame in one pass --------------------------------

_KEY = bytes(range(32))
_OPENER = cipher.SampleCipher(_KEY)
# What a field mutation puts in: values on each field's bounds or of another type.
_U53 = 2**53 - 1
_FIELD_VALUES: dict[int, list[Any]] = {
    0: [2, 1, True, -1], 1: [1, 3, 2, True], 2: [2**32, 2**32 - 1, -1, 0], 3: [2**32, 2**32 - 1, -1, 0],
    4: [4, 0, 2, 3, 1, _U53 + 1, True], 5: [_U53 + 1, _U53, -1], 6: [_U53 + 1, _U53, -1],
    7: [100001, 0, 100000, 1, -1], 8: [0, 1025, 1024, 1, True],
    9: [[1, 0], [2**32, 1], [2**32 - 1, 2**32 - 1], [1], [1, 1, 1], [True, 1], [0, 1], 7],
    10: [[_U53 + 1, 0, 0, 0], [_U53] * 4, [1, 2, 3], [0, 0, 0, 0, 0], [-1, 0, 0, 0], None],
    11: [[_U53 + 1, 0, 0, 0], [_U53] * 4, [1, 2, 3], [0, 0, 0, 0, 0], [0, 0, False, 0]],
    12: [2, 0, 1, True], 13: [[], [b""], [b"\x01"], [b"\x01" * 5121], [b"\x00" * 4, b"\x00" * 4], [7]],
    14: [-65533, 65532, -65532, 1.5], 15: [b"\x00" * 17, b"\x00" * 15, b"\x00" * 16, "x" * 16, None],
    16: [0], 63: [0], 64: [1.5, 0, b"", [1]], 99: [None, "x"]}


@st.composite
def _frame_payloads(draw: st.DrawFn) -> bytes:
    f = draw(frames())
    p = messages.encoded(f, sealer=cipher.SampleCipher(_KEY, draw(st.binary(min_size=16, max_size=16))))
    edits = draw(st.sampled_from([1, 2, 0]))  # (hypothesis favours the first)
    if not edits:
        return p
    d: dict[Any, Any] = cbor.decode(p)  # type: ignore[assignment]
    for _ in range(edits):
        op = draw(st.sampled_from(["set", "drop", "resize", "true_key"]))
        key = draw(st.sampled_from(list(_FIELD_VALUES)))
        if op == "set":
            d[key] = draw(st.sampled_from(_FIELD_VALUES[key]))
        elif op == "drop":
            d.pop(key, None)
        elif op == "resize" and key in d and isinstance(d[key], list) and d[key]:
            d[key] = d[key][:-1] if draw(st.booleans()) else d[key] + d[key][-1:]
        elif op == "true_key":
            d = {**{k: v for k, v in d.items() if k != 1}, True: 2}  # key true for key 1 (equal in Python)
    return bytes(cbor2.dumps(d))


def _same_message(data: bytes) -> str:
    """payload() and the reference give the same answer for data; returns which ("fast", "reference", "refused")."""
    args = (messages.UPLINK_TYPES, False, _OPENER)
    try:
        expected = messages.decode_payload(data, *args)
    except RemoteProtocolError as e:
        with pytest.raises(RemoteProtocolError) as got:
            fastdecode.payload(data, *args)
        assert got.value.reason == e.reason, data.hex()
        assert fastdecode._sample_frame(data, _OPENER) is None
        return "refused"
    m = fastdecode.payload(data, *args)
    assert type(m) is type(expected) and m == expected, data.hex()
    assert getattr(m, "boot_salt", None) == getattr(expected, "boot_salt", None)
    return "fast" if fastdecode._sample_frame(data, _OPENER) is not None else "reference"


@pytest.mark.slow
@settings(max_examples=600)
@given(st.one_of(_frame_payloads(), mutated(FRAME_PAYLOAD)))
def test_the_fast_frame_decoder_answers_as_the_reference(data: bytes) -> None:
    _same_message(data)


_ECG = messages.SampleFrame(1, 2, messages.STREAM_ECG_MAX30003, 10, 4, 512, 4, (1, 1), None, (0, 0, 0, 0),
                            [[1, 2, 3, 4]])
_PPG = messages.SampleFrame(1, 3, messages.STREAM_PPG_MAX30102, 10, 4, 100, 2, (1, 1), (1, 2, 3, 4), (0, 0, 0, 0),
                            [[1, 2], [3, 4]])


@pytest.mark.parametrize("frame", [_ECG, _PPG], ids=["ecg", "ppg"])
@pytest.mark.parametrize("key, value", [(k, v) for k, vs in _FIELD_VALUES.items() for v in vs])
def test_each_field_on_its_bounds(frame: messages.SampleFrame, key: int, value: Any) -> None:
    # Every field set to each value on its bounds or of another type (None: the field left out).
    d: dict[Any, Any] = cbor.decode(messages.encoded(frame, sealer=cipher.SampleCipher(_KEY, bytes(16))))  # type: ignore[assignment]
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value
    _same_message(bytes(cbor2.dumps(d)))


@pytest.mark.parametrize("count, answer", [(1024, "fast"), (1025, "refused")])
def test_the_count_bound_with_bytes_enough(count: int, answer: str) -> None:
    d: dict[Any, Any] = cbor.decode(messages.encoded(_ECG, sealer=cipher.SampleCipher(_KEY, bytes(16))))  # type: ignore[assignment]
    d[8], d[13] = count, [b"\x00" * count]
    assert _same_message(bytes(cbor2.dumps(d))) == answer


@settings(max_examples=100)
@given(frames(), st.binary(min_size=16, max_size=16))
def test_a_boards_frames_take_the_fast_path(f: messages.SampleFrame, salt: bytes) -> None:
    assert _same_message(messages.encoded(f, sealer=cipher.SampleCipher(_KEY, salt))) == "fast"


def _heads(data: bytes) -> list[tuple[int, int, int, int]]:
    """Every CBOR head in data (a payload in the strict codec's form): (where it starts, where
    it ends, major type, argument), a byte string's content skipped."""
    out, pos = [], 0
    while pos < len(data):
        major, value, end = cbor.read_head(data, pos, len(data))
        out.append((pos, end, major, value))
        pos = end + value if major in (2, 3) else end
    return out


# Frames whose integers take every head width: 1 byte (below 24), 2, 3, 5 and 9 bytes.
_WIDE_ECG = messages.SampleFrame(2**32 - 1, 70000, messages.STREAM_ECG_MAX30003, 2**53 - 1, 300, 512, 30,
                                 (2**32 - 1, 24), None, (0, 255, 65536, 2**40), [list(range(0, 3000, 100))])
_WIDE_PPG = messages.SampleFrame(24, 255, messages.STREAM_PPG_MAX30102, 2**33, 2**16, 100000, 60, (1, 1),
                                 (23, 24, 2**32, 2**53 - 1), (8, 0, 0, 1), [list(range(60)), [9] * 60])


@pytest.mark.parametrize("frame", [_ECG, _PPG, _WIDE_ECG, _WIDE_PPG], ids=["ecg", "ppg", "wide-ecg", "wide-ppg"])
def test_every_head_widened_or_cut_is_answered_as_the_reference(frame: messages.SampleFrame) -> None:
    # The layout reader takes each head in its shortest form only, as the strict codec does:
    # each head of a board's frame written one width longer or more is refused as the reference
    # refuses it; so is the frame cut at every byte.
    data = messages.encoded(frame, sealer=cipher.SampleCipher(_KEY, bytes(range(16))))
    assert _same_message(data) == "fast"
    widened = 0
    for start, end, major, value in _heads(data):
        if major in (0, 1, 2, 4, 5):
            for width in _widths(value)[1:]:
                assert _same_message(data[:start] + _head(major, value, width) + data[end:]) == "refused"
                widened += 1
    assert widened > 40
    for cut in range(len(data)):
        assert _same_message(data[:cut]) == "refused"


# ---- mac0(): the COSE_Mac0 envelope by its layout -----------------------------------

def _same_mac0(data: bytes) -> str:
    """mac0() and cose.parse give the same answer for data; returns which ("fast", "reference", "refused")."""
    try:
        expected = cose.parse(data)
    except RemoteProtocolError as e:
        with pytest.raises(RemoteProtocolError) as got:
            fastdecode.mac0(data)
        assert got.value.reason == e.reason, data.hex()
        assert fastdecode._mac0(data) is None
        return "refused"
    m = fastdecode.mac0(data)
    assert (type(m.kid), type(m.payload), type(m.tag)) == (bytes, bytes, bytes)
    assert (m.kid, m.payload, m.tag) == (expected.kid, expected.payload, expected.tag), data.hex()
    return "fast" if fastdecode._mac0(data) is not None else "reference"


@st.composite
def _envelopes(draw: st.DrawFn) -> bytes:
    # COSE_Mac0 messages as boards write them, with at most one thing off at a bound of the
    # layout: the kid's length, the protected header's form, the unprotected map, the payload's
    # length and head, the tag's length, bytes cut or added.
    defect = draw(st.sampled_from(["none", "kid", "protected", "unprotected", "payload_head", "payload_size",
                                   "tag", "cut", "extra"]))
    kid = draw(st.binary(min_size=1, max_size=16))
    if defect == "kid":
        kid = draw(st.sampled_from([b"", b"k" * 17, b"k" * 23, b"k" * 24]))
    protected = b"\xa2\x01\x05\x04" + _head(2, len(kid), _widths(len(kid))[0]) + kid
    if defect == "protected":
        protected = draw(st.sampled_from([
            b"\xa2\x04" + _head(2, len(kid), 0) + kid + b"\x01\x05",  # keys the other way
            b"\xa2\x01\x05\x04" + _head(2, len(kid), 1) + kid,  # the kid's length in a longer head
            b"\xa2\x01\x06\x04" + _head(2, len(kid), 0) + kid,  # another algorithm
            b"\xa2\x01\x05\x05" + _head(2, len(kid), 0) + kid,  # another label
            b"\xa1\x01\x05", b"\xa3\x01\x05\x04\x41k\x05\x00"]))
    size = draw(st.sampled_from([0, 1, 23, 24, 255, 256, 300, 4096]))
    if defect == "payload_size":
        size = 4097
    payload = draw(st.binary(min_size=size, max_size=size))
    width = draw(st.sampled_from(_widths(size)[1:] or [8])) if defect == "payload_head" else _widths(size)[0]
    tag = draw(st.binary(min_size=32, max_size=32))
    if defect == "tag":
        tag = draw(st.sampled_from([b"", b"t" * 31, b"t" * 33]))
    data = (b"\xd1\x84" + _head(2, len(protected), _widths(len(protected))[0]) + protected
            + (draw(st.sampled_from([b"\xa1\x01\x05", b"\x80", b"\xb8\x00"])) if defect == "unprotected" else b"\xa0")
            + _head(2, size, width) + payload + _head(2, len(tag), _widths(len(tag))[0]) + tag)
    if defect == "cut":
        return data[:draw(st.integers(0, len(data) - 1))]
    if defect == "extra":
        return data + draw(st.binary(min_size=1, max_size=3))
    return data


@pytest.mark.slow
@settings(max_examples=1000)
@given(_envelopes())
def test_the_envelope_reader_answers_as_cose_parse(data: bytes) -> None:
    _same_mac0(data)


@settings(max_examples=300)
@given(st.one_of(mutated(FRAME), mutated(ACK), st.binary(max_size=80)))
def test_the_envelope_reader_answers_as_cose_parse_on_mutated_and_random_bytes(data: bytes) -> None:
    _same_mac0(data)


@pytest.mark.parametrize("kid_len", [1, 16])
@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 4096])
def test_a_boards_envelopes_take_the_fast_path(kid_len: int, size: int) -> None:
    key = cose.MacKey(_KEY, b"k" * kid_len, cose.AAD_UPLINK)
    assert _same_mac0(key.seal(bytes(size))) == "fast"
    assert _same_mac0(FRAME) == "fast"
