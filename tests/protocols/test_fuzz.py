# The decoders' invariant (STYLE section 3): whatever bytes arrive, they
# decode or raise RemoteProtocolError; no other exception, no unbounded
# memory. Random bytes, and mutations of valid messages (which reach deeper).
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import cbor, cipher, cose, hub_link, link, messages
from protocols.errors import RemoteProtocolError
from tests.shared.test_vectors import ACK, FRAME, FRAME_PAYLOAD, KEY


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    def apply(edits: list[tuple[int, int, int]]) -> bytes:
        b = bytearray(seed)
        for kind, pos, val in edits:
            if not b:
                break
            pos %= len(b)
            if kind == 0:
                b[pos] = val
            elif kind == 1:
                del b[pos]
            else:
                b.insert(pos, val)
        return bytes(b)
    return st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)),
                    min_size=1, max_size=6).map(apply)


inputs = st.one_of(st.binary(max_size=600), mutated(FRAME), mutated(ACK), mutated(FRAME_PAYLOAD))


@settings(max_examples=800)
@given(inputs)
def test_payload_and_cose_decoders_raise_only_protocol_errors(data: bytes) -> None:
    opener = cipher.SampleCipher(KEY)
    for fn in (cose.parse, lambda d: messages.decode_payload(d, opener=opener),
               lambda d: messages.decode_payload(d, decode_samples=False), cbor.decode):
        try:
            fn(data)
        except RemoteProtocolError:
            pass


@settings(max_examples=300)
@given(st.lists(inputs, max_size=6))
def test_link_receivers_raise_nothing_and_stay_bounded(chunks: list[bytes]) -> None:
    s, line, ble = hub_link.StreamDeframer(), hub_link.LineQueue(), hub_link.Reassembler()
    for c in chunks:
        for rx in (s, line):
            rx.feed(c)
            while rx.next_event() is not None:
                pass
        ble.feed(c[:514])
        while ble.next_event() is not None:
            pass
    assert s.buffered <= link.MAX_COBS_BODY


def test_huge_claimed_lengths_are_refused_before_allocation() -> None:
    # A 9-byte head claiming a 2**63-byte string, and a map of 2**32 entries.
    for data in (b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff", b"\xba\xff\xff\xff\xff", b"\x9b" + b"\xff" * 8):
        try:
            cbor.decode(data)
        except RemoteProtocolError as e:
            assert e.reason in ("truncated", "too_long")
        else:
            raise AssertionError("accepted")


def test_deep_nesting_is_refused() -> None:
    try:
        cbor.decode(b"\x81" * 100 + b"\x00")
    except RemoteProtocolError as e:
        assert e.reason == "depth"
    else:
        raise AssertionError("accepted")
