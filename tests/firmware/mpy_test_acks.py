# The board's in-place ack reader (app/acks.py) against the shared decoder,
# under MicroPython: it reads the hub's acks as that decoder does, never
# accepts what that decoder refuses (fuzzed, seeded), and allocates nothing
# but what hashlib needs for the MAC.
import micropython

from app import acks, main
from protocols import cbor, cose, hub, messages
from protocols.errors import ProtocolError
from tests.shared.check import Rng

SEED = 4711
_KID = b"pb-test01"
_KEY = bytes(range(32))


def _hub():
    h = hub.Hub()
    h.add_device(_KID.decode(), _KEY)
    return h


def _reader():
    return acks.AckReader(cose.MacKey(_KEY, _KID, cose.AAD_DOWNLINK))


def _shared(data):
    # What the shared decoder makes of data: an Ack, another message, or the error.
    try:
        msg = cose.parse(data)
        cose.MacKey(_KEY, _KID, cose.AAD_DOWNLINK).verify(msg)
        return messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)
    except ProtocolError as e:
        return e


def _ranges(r):
    return [(r.first[i], r.last[i]) for i in range(r.count)]


def _check_against_shared(r, data):
    got = r.read(data)
    want = _shared(data)
    if got == acks.ACKED:
        assert isinstance(want, messages.Ack), (data, want)
        assert want.epoch == r.epoch and want.ranges == _ranges(r), (data, want, _ranges(r))
    elif got == acks.TIME_REQUEST:
        assert isinstance(want, messages.TimeRequest), (data, want)
        assert want.nonce == r.nonce, (data, want, r.nonce)
    elif got == acks.UPDATE_CHUNK:
        assert isinstance(want, messages.UpdateChunk), (data, want)
        assert (want.epoch, want.offset, want.total, want.data) == (
            r.epoch, r.offset, r.total, bytes(data[r.data_at:r.data_at + r.data_len])), (data, want)
    elif got == acks.FORGED:
        assert isinstance(want, ProtocolError), (data, want)
    else:
        assert got == acks.DECLINED, got
    return got


def test_hub_acks_are_read_as_the_shared_decoder_reads_them():
    h = _hub()
    r = _reader()
    rng = Rng(SEED)
    print("seed", SEED)
    cases = [(1, [0]), (7, [5, 6, 7, 9]), (0, list(range(0, 64, 2))), (0x3FFFFFFF, [0x3FFFFFFE, 0x3FFFFFFF]),
             (300, [23, 24, 255, 256, 65535, 65536])]
    for _ in range(40):
        cases.append((rng.below(1 << 20), [rng.below(1 << (1 + rng.below(29))) for _ in range(1 + rng.below(20))]))
    for epoch, seqs in cases:
        for data in h.ack(_KID.decode(), epoch, seqs):
            assert _check_against_shared(r, data) == acks.ACKED, (epoch, seqs)
            ranges = _ranges(r)
            # a message in the first n bytes of a longer buffer (a link's)
            assert r.read(data + b"\x00\xff", len(data)) == acks.ACKED and _ranges(r) == ranges
            assert r.read(data + b"\x00", len(data) + 1) == acks.DECLINED


def test_other_messages_and_other_forms_are_declined():
    h = _hub()
    r = _reader()
    key = cose.MacKey(_KEY, _KID, cose.AAD_DOWNLINK)
    declined = [
        h.command(_KID.decode(), 3, 1, "status"),
        # a time request with a nonce past 2^30, a utc_ms not in shortest form, an extension key
        key.seal(cbor.encoded({0: 3, 1: messages.VERSION, 2: 1 << 30, 3: 1000})),
        key.seal(bytes([0xA4, 0, 3, 1, messages.VERSION, 2, 1, 3, 0x1B, 0, 0, 0, 0, 0, 0, 0x10, 0])),
        key.seal(cbor.encoded({0: 3, 1: messages.VERSION, 2: 1, 3: 1000, 64: 0})),
        # an ack with an extension key, keys out of order, an epoch beyond 2^30
        key.seal(cbor.encoded({0: 2, 1: messages.VERSION, 2: 3, 3: [[1, 2]], 64: 0})),
        key.seal(bytes([0xA4, 0, 2, 1, messages.VERSION, 3, 0x81, 0x82, 1, 2, 2, 3])),
        key.seal(cbor.encoded({0: 2, 1: messages.VERSION, 2: 1 << 30, 3: [[1, 2]]})),
        # another device's ack
        cose.MacKey(_KEY, b"pb-other", cose.AAD_DOWNLINK).seal(cbor.encoded({0: 2, 1: messages.VERSION, 2: 3,
                                                                               3: [[1, 2]]})),
    ]
    for data in declined:
        assert _check_against_shared(r, data) == acks.DECLINED, data
    forged = cose.MacKey(bytes(32), _KID, cose.AAD_DOWNLINK).seal(
        cbor.encoded({0: 2, 1: messages.VERSION, 2: 3, 3: [[1, 2]]}))
    assert _check_against_shared(r, forged) == acks.FORGED
    uplink = cose.MacKey(_KEY, _KID, cose.AAD_UPLINK).seal(cbor.encoded({0: 2, 1: messages.VERSION, 2: 3,
                                                                          3: [[1, 2]]}))
    assert _check_against_shared(r, uplink) == acks.FORGED


def test_hub_time_requests_are_read_as_the_shared_decoder_reads_them():
    # Time requests (one a minute) are read in place too, whatever the hub's
    # clock: utc_ms is checked, not kept (64 bits: a heap int on the chip).
    h = _hub()
    r = _reader()
    for utc_ms in (0, 23, 24, 255, 65536, (1 << 32) - 1, 1 << 32, 1764547200000, (1 << 64) - 1):
        nonce, data = h.time_request(_KID.decode(), utc_ms)
        assert _check_against_shared(r, data) == acks.TIME_REQUEST, utc_ms
        assert r.nonce == nonce
    key = cose.MacKey(_KEY, _KID, cose.AAD_DOWNLINK)
    for nonce in (0, 24, 0x3FFFFFFF):
        data = key.seal(cbor.encoded({0: 3, 1: messages.VERSION, 2: nonce, 3: 1764547200000}))
        assert _check_against_shared(r, data) == acks.TIME_REQUEST and r.nonce == nonce, nonce
    forged = cose.MacKey(bytes(32), _KID, cose.AAD_DOWNLINK).seal(
        cbor.encoded({0: 3, 1: messages.VERSION, 2: 1, 3: 1764547200000}))
    assert _check_against_shared(r, forged) == acks.FORGED


def test_fuzzed_acks_never_accepted_where_the_shared_decoder_refuses():
    h = _hub()
    r = _reader()
    rng = Rng(SEED + 1)
    print("seed", SEED + 1)
    base = h.ack(_KID.decode(), 5, [1, 2, 3, 7, 300, 70000])[0]
    _fuzz(r, rng, base)


def test_fuzzed_time_requests_never_accepted_where_the_shared_decoder_refuses():
    h = _hub()
    r = _reader()
    rng = Rng(SEED + 2)
    print("seed", SEED + 2)
    _fuzz(r, rng, h.time_request(_KID.decode(), 1764547200000)[1])


def test_hub_update_chunks_are_read_in_place_as_the_shared_decoder_reads_them():
    # A firmware update's chunks come several a second: read in place, the
    # shared decoder's objects (a GC of tens of ms on a chip, with a sensor
    # FIFO filling) are not made for each. Their data is left where it lies.
    h = _hub()
    r = _reader()
    bundle = bytes(i * 7 & 0xFF for i in range(1000))
    for epoch, offset, size in ((1, 0, 160), (0x3FFFFFFF, 840, 160), (300, 999, 1), (23, 24, 23), (24, 500, 24)):
        data = h.update_chunk(_KID.decode(), epoch, offset, bundle, size)
        assert _check_against_shared(r, data) == acks.UPDATE_CHUNK, (epoch, offset, size)
        assert bytes(data[r.data_at:r.data_at + r.data_len]) == bundle[offset:offset + size]
        assert r.read(data + b"\x00\xff", len(data)) == acks.UPDATE_CHUNK  # in the first n bytes of a link's buffer
    key = cose.MacKey(_KEY, _KID, cose.AAD_DOWNLINK)
    declined = [
        # past the bundle's end, empty, too long, an extension key, a total above MAX_BUNDLE
        key.seal(cbor.encoded({0: 11, 1: messages.VERSION, 2: 1, 3: 990, 4: 1000, 5: bytes(20)})),
        key.seal(cbor.encoded({0: 11, 1: messages.VERSION, 2: 1, 3: 0, 4: 1000, 5: b""})),
        key.seal(cbor.encoded({0: 11, 1: messages.VERSION, 2: 1, 3: 0, 4: 1000, 5: bytes(161)})),
        key.seal(cbor.encoded({0: 11, 1: messages.VERSION, 2: 1, 3: 0, 4: 1000, 5: bytes(10), 64: 0})),
        key.seal(cbor.encoded({0: 11, 1: messages.VERSION, 2: 1, 3: 0, 4: messages.MAX_BUNDLE + 1, 5: bytes(10)})),
    ]
    for data in declined:
        assert _check_against_shared(r, data) == acks.DECLINED, data
    forged = cose.MacKey(bytes(32), _KID, cose.AAD_DOWNLINK).seal(
        cbor.encoded({0: 11, 1: messages.VERSION, 2: 1, 3: 0, 4: 1000, 5: bytes(10)}))
    assert _check_against_shared(r, forged) == acks.FORGED


def test_fuzzed_update_chunks_never_accepted_where_the_shared_decoder_refuses():
    h = _hub()
    r = _reader()
    rng = Rng(SEED + 3)
    print("seed", SEED + 3)
    _fuzz(r, rng, h.update_chunk(_KID.decode(), 5, 320, bytes(range(256)) * 4, 100))


def _fuzz(r, rng, base):
    counts = {acks.ACKED: 0, acks.FORGED: 0, acks.DECLINED: 0, acks.TIME_REQUEST: 0, acks.UPDATE_CHUNK: 0}
    for _ in range(3000):
        data = bytes(base)
        for _ in range(1 + rng.below(3)):
            op = rng.below(4)
            i = rng.below(len(data) + 1)
            if op == 0 and i < len(data):  # a byte replaced
                data = data[:i] + bytes([rng.below(256)]) + data[i + 1:]
            elif op == 1:  # cut short
                data = data[:i]
            elif op == 2:  # a byte inserted
                data = data[:i] + bytes([rng.below(256)]) + data[i:]
            elif op == 3 and i < len(data):  # a bit flipped
                data = data[:i] + bytes([data[i] ^ (1 << rng.below(8))]) + data[i + 1:]
        counts[_check_against_shared(r, data)] += 1
    print("fuzzed:", counts)
    assert counts[acks.FORGED] > 100 and counts[acks.DECLINED] > 100, counts


def test_an_ack_costs_the_board_only_the_macs_objects():
    # Before the in-place reader, an ack left ~2.7 kB of garbage (the shared
    # decoder's dicts, lists, tuples and copies); now only hashlib's objects.
    h = _hub()
    r = _reader()
    key = cose.MacKey(_KEY, _KID, cose.AAD_DOWNLINK)
    data = h.ack(_KID.decode(), 5, [1, 2, 3, 7, 300])[0]
    payload = cose.parse(data).payload
    key.tag(payload)
    r.read(data)
    m0 = micropython.mem_current()  # type: ignore[attr-defined]
    key.tag(memoryview(payload)[:])
    mac_bytes = micropython.mem_current() - m0  # type: ignore[attr-defined]
    m0 = micropython.mem_current()  # type: ignore[attr-defined]
    assert r.read(data) == acks.ACKED
    read_bytes = micropython.mem_current() - m0  # type: ignore[attr-defined]
    assert read_bytes <= mac_bytes, (read_bytes, mac_bytes)


def test_app_frees_the_outbox_from_an_ack_read_in_place():
    from tests.firmware.mpy_test_app import _board

    board, link = _board()
    link.ack_enabled = False
    app = main.run(board, until_ms=3000)
    seqs = [app.outbox.seqs[i] for i in range(len(app.outbox.state)) if app.outbox.state[i]]
    assert len(seqs) >= 4
    data = link.hub.ack(link.device_id, app.epoch, seqs[:2])[0]
    assert app.acks.read(data) == acks.ACKED
    depth = app.outbox.depth()
    app.on_downlink(data)
    assert app.outbox.depth() == depth - 2
    app.on_downlink(link.hub.ack(link.device_id, app.epoch + 1, seqs)[0])  # another boot's: frees nothing
    assert app.outbox.depth() == depth - 2 and app.downlink_rejected == 0


def test_sealing_a_frame_and_reading_an_ack_allocate_nothing():
    # hashlib on MicroPython allocated ~450 bytes per HMAC (two hash objects,
    # two digests): the board's MacKey now hashes into preallocated state.
    h = _hub()
    r = _reader()
    up = cose.MacKey(_KEY, _KID, cose.AAD_UPLINK)
    out = cbor.Writer(bytearray(1024))
    payload = bytearray(700)
    ack = h.ack(_KID.decode(), 5, [1, 2, 3, 7, 300])[0]
    micropython.heap_lock()
    try:
        up.seal_into(out, payload)
        got = r.read(ack)
    finally:
        micropython.heap_unlock()
    assert got == acks.ACKED and _ranges(r) == [(1, 3), (7, 7), (300, 300)]
    sealed = bytes(out.buf[:out.pos])
    up.verify(cose.parse(sealed))  # the tag is the one the shared (hashlib) path checks


def test_serial_downlink_line_to_freed_outbox_allocates_nothing():
    # From the console's bytes to the outbox freed: the line is decoded in
    # place (before: a2b_base64, byte copies, a Frame; ~600 bytes per ack).
    from app.link_serial import SerialLink
    from protocols import hub_link
    from tests.firmware.mpy_test_app import _board

    class Console:  # a fake console: what the hub wrote, as machine.UART gives it
        def __init__(self, data):
            self.data = data
            self.pos = 0

        def any(self):
            return len(self.data) - self.pos

        def readinto(self, buf):
            buf[0] = self.data[self.pos]
            self.pos += 1
            return 1

    board, link = _board()
    link.ack_enabled = False
    app = main.run(board, until_ms=3000)
    seqs = [app.outbox.seqs[i] for i in range(len(app.outbox.state)) if app.outbox.state[i]]
    depth = app.outbox.depth()
    lines = b"".join(hub_link.downlink_line(m) for m in link.hub.ack(link.device_id, app.epoch, seqs[:3]))
    console = Console(b"noise\r\n" + lines)
    serial = SerialLink(console, None, 64)
    micropython.heap_lock()
    try:
        while True:
            n = serial.receive()
            if n:
                app.on_downlink(serial.message, n)
            elif not serial.rx_more:  # (a chunk of the line read, more waiting: as the app, read on)
                break
    finally:
        micropython.heap_unlock()
    assert app.outbox.depth() == depth - 3 and serial._rx.discarded == 1
