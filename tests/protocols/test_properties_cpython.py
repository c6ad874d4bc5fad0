# Hypothesis property tests of the codec (CPython). On failure Hypothesis
# prints the example and a @reproduce_failure blob (print_blob, conftest).
import cbor2
from hypothesis import given
from hypothesis import strategies as st

from protocols import cipher, cose, hub_link, link, messages, replay
from protocols.errors import RemoteProtocolError
from tests.protocols.strategies import frames, keys, kids

SALT = bytes(range(16))


def open_uplink(data: bytes, key: cose.MacKey, raw_key: bytes) -> messages.Message:
    msg = cose.parse(data)
    key.verify(msg)
    return messages.decode_payload(msg.payload, messages.UPLINK_TYPES, opener=cipher.SampleCipher(raw_key))


@given(frames(), keys(), kids())
def test_round_trip(frame: messages.SampleFrame, key: bytes, kid: bytes) -> None:
    k = cose.MacKey(key, kid, cose.AAD_UPLINK)
    assert open_uplink(k.seal(messages.encoded(frame, sealer=cipher.SampleCipher(key, SALT))), k, key) == frame


@given(frames(), keys(), kids(), st.data())
def test_single_bit_flip_anywhere_is_rejected(frame: messages.SampleFrame, key: bytes, kid: bytes,
                                              data: st.DataObject) -> None:
    k = cose.MacKey(key, kid, cose.AAD_UPLINK)
    wire = bytearray(k.seal(messages.encoded(frame, sealer=cipher.SampleCipher(key, SALT))))
    bit = data.draw(st.integers(0, 8 * len(wire) - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    try:
        open_uplink(bytes(wire), k, key)
    except RemoteProtocolError:
        return
    raise AssertionError("flipped bit %d accepted" % bit)


@given(frames(), keys(), kids(), st.data())
def test_truncation_is_rejected_cleanly(frame: messages.SampleFrame, key: bytes, kid: bytes,
                                        data: st.DataObject) -> None:
    k = cose.MacKey(key, kid, cose.AAD_UPLINK)
    wire = k.seal(messages.encoded(frame, sealer=cipher.SampleCipher(key, SALT)))
    cut = data.draw(st.integers(0, len(wire) - 1))
    try:
        open_uplink(wire[:cut], k, key)
    except RemoteProtocolError:
        return
    raise AssertionError("truncated at %d accepted" % cut)


@given(frames(), keys(), kids())
def test_replayed_frame_with_good_mac_is_flagged(frame: messages.SampleFrame, key: bytes, kid: bytes) -> None:
    k = cose.MacKey(key, kid, cose.AAD_UPLINK)
    wire = k.seal(messages.encoded(frame, sealer=cipher.SampleCipher(key, SALT)))
    window = replay.ReplayWindow()
    f = open_uplink(wire, k, key)
    assert isinstance(f, messages.SampleFrame)
    assert window.check(f.epoch, f.seq) == replay.FRESH
    window.commit(f.epoch, f.seq)
    again = open_uplink(wire, k, key)  # the MAC is still good: only the window can tell
    assert isinstance(again, messages.SampleFrame)
    assert window.check(again.epoch, again.seq) == replay.DUPLICATE
    if f.epoch:
        assert window.check(f.epoch - 1, f.seq) == replay.OLD_EPOCH


@given(st.lists(st.binary(min_size=1, max_size=700), min_size=1, max_size=8), st.integers(1, 64))
def test_stream_link_any_chunking(msgs: list[bytes], chunk: int) -> None:
    framer = link.StreamFramer()
    wire = b"".join(framer.frame(m) for m in msgs)
    d = hub_link.StreamDeframer()
    got = []
    for i in range(0, len(wire), chunk):
        d.feed(wire[i:i + chunk])
        while (ev := d.next_event()) is not None:
            assert isinstance(ev, link.Frame)
            got.append(ev.data)
    assert got == msgs


@given(st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=5), st.integers(23, 517))
def test_ble_fragments_any_mtu(msgs: list[bytes], mtu: int) -> None:
    frag = link.Fragmenter(mtu)
    r = hub_link.Reassembler()
    for m in msgs:
        for f in frag.fragments(m):
            assert len(f) <= mtu - 3
            r.feed(f)
    got = []
    while (ev := r.next_event()) is not None:
        assert isinstance(ev, link.Frame)
        got.append(ev.data)
    assert got == msgs


def _frame(**kw: object) -> messages.SampleFrame:
    f = messages.SampleFrame(1, 2, messages.STREAM_ECG_MAX30003, 1000, 0, 512, 2, (1, 1), None, (0, 0, 0, 0),
                             [[1, -1]])
    for name, value in kw.items():
        setattr(f, name, value)
    return f


def test_uplink_integers_are_bounded_as_the_hub_stores_them() -> None:
    # SPEC.md "Bounds": 2^53 - 1 (JSON doubles, SQLite int64); epoch and seq 2^32 - 1.
    key = bytes(32)
    sealer = cipher.SampleCipher(key, bytes(16))
    edge = messages.MAX_UPLINK_INT
    for field in ("t0_ms", "first_index"):
        ok = messages.decode_payload(messages.encoded(_frame(**{field: edge}), sealer=sealer), opener=sealer)
        assert getattr(ok, field) == edge
        for bad in (edge + 1, 2**63, 2**64 - 1):
            try:
                messages.decode_payload(messages.encoded(_frame(**{field: bad}), sealer=sealer), opener=sealer)
            except RemoteProtocolError as e:
                assert e.reason == "range", e
            else:
                raise AssertionError("%s = %d accepted" % (field, bad))
    for msg in (messages.Hello(2**32, 0, "fw", 1, [(1, 512)]), messages.Status(1, 2**32, 0, 0, 0, 0),
                messages.Status(1, 2, 2**64 - 1, 0, 0, 0), messages.TimeResponse(1, 2, 3, 2**53)):
        try:
            messages.decode_payload(messages.encoded(msg), messages.UPLINK_TYPES)
        except RemoteProtocolError as e:
            assert e.reason == "range", e
        else:
            raise AssertionError("%r accepted" % (msg,))


def test_a_status_carries_the_chips_unique_id_or_leaves_it_out() -> None:
    # SPEC.md, Hello, status: key 8, 1 to 16 bytes, absent where the board has no id; the
    # board's allocation-free encoder writes the generic encoder's bytes.
    from protocols import cbor
    from tests.protocols import cddl

    key = cose.MacKey(bytes(32), b"pb-h01", cose.AAD_UPLINK)
    chip = bytes.fromhex("a4cf12e0b3c8")
    with_id = messages.Status(3, 1, 5, 0, 0, 70000, chip)
    without = messages.Status(3, 1, 5, 0, 0, 70000)
    for msg in (with_id, without):
        payload = messages.encoded(msg)
        assert messages.decode_payload(payload, messages.UPLINK_TYPES) == msg
        cddl.validate_message(key.seal(payload), "up")
        w = cbor.Writer(bytearray(128))
        messages.encode_status(w, 3, 1, 5, 0, 0, 70000, unique_id=msg.unique_id)
        assert bytes(w.buf[:w.pos]) == payload
    assert 8 not in cbor2.loads(messages.encoded(without))  # left out, not empty
    assert cbor2.loads(messages.encoded(with_id))[8] == chip
    base = cbor2.loads(messages.encoded(without))
    for bad in (b"", bytes(messages.MAX_UNIQUE_ID + 1), "a4cf12e0b3c8", 7):
        try:
            messages.decode_payload(cbor2.dumps({**base, 8: bad}, canonical=True), messages.UPLINK_TYPES)
        except RemoteProtocolError as e:
            assert e.reason == "schema", e
        else:
            raise AssertionError("unique id %r accepted" % (bad,))
