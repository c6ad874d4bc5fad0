# Properties checked exhaustively on both interpreters: every single-bit
# flip and every truncation of an authenticated message is refused with a
# protocol error, never accepted and never another exception; the link
# layers deliver the same messages fed a byte at a time or all at once.
from protocols import cbor, cipher, cose, hub_link, link, messages, replay
from protocols.errors import LocalProtocolError, RemoteProtocolError
from tests.shared.check import Rng, raises
from tests.shared.test_vectors import ACK, FRAME, KEY, KID

SEED = 20261122


def _accepts(data: bytes, key: "cose.MacKey", kinds: tuple) -> bool:
    try:
        msg = cose.parse(data)
        key.verify(msg)
        messages.decode_payload(msg.payload, kinds, opener=cipher.SampleCipher(KEY))
    except RemoteProtocolError:
        return False
    return True


def test_every_bit_flip_is_refused() -> None:
    up = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    down = cose.MacKey(KEY, KID, cose.AAD_DOWNLINK)
    for data, key, kinds in ((FRAME, up, messages.UPLINK_TYPES), (ACK, down, messages.DOWNLINK_TYPES)):
        assert _accepts(data, key, kinds)
        buf = bytearray(data)
        for i in range(len(buf)):
            for bit in range(8):
                buf[i] ^= 1 << bit
                assert not _accepts(bytes(buf), key, kinds), (i, bit)
                buf[i] ^= 1 << bit


def test_every_truncation_is_refused() -> None:
    up = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    for n in range(len(FRAME)):
        assert not _accepts(FRAME[:n], up, messages.UPLINK_TYPES), n


def test_serial_link_byte_at_a_time_equals_all_at_once() -> None:
    print("seed", SEED)
    rng = Rng(SEED)
    framer = link.StreamFramer()
    msgs = [rng.bytes(rng.below(600) + 1) for _ in range(12)] + [bytes(300), FRAME]
    noise = b"MicroPython v1.29 on unix\r\n>>> "
    wire = noise + b"".join(framer.frame(m) + (noise if i % 3 == 0 else b"") for i, m in enumerate(msgs))
    for chunking in (1, 7, len(wire)):
        d = hub_link.StreamDeframer()
        got = []
        for i in range(0, len(wire), chunking):
            d.feed(wire[i:i + chunking])
            while True:
                ev = d.next_event()
                if ev is None:
                    break
                if isinstance(ev, link.Frame):
                    got.append(ev.data)
                else:
                    assert ev.reason == "noise", ev
        assert got == msgs, chunking


def test_serial_link_resynchronises_after_corruption() -> None:
    rng = Rng(SEED + 1)
    framer = link.StreamFramer()
    msgs = [rng.bytes(rng.below(300) + 5) for _ in range(20)]
    wires = [bytearray(framer.frame(m)) for m in msgs]
    damaged = set()
    for i in range(0, 20, 4):  # damage every fourth frame: a flip, a cut, an insertion
        w = wires[i]
        kind = (i // 4) % 3
        if kind == 0:
            w[1 + rng.below(len(w) - 2)] ^= 0x10
        elif kind == 1:
            wires[i] = w[:len(w) // 2] + w[len(w) - 1:]
        else:
            wires[i] = w[:3] + rng.bytes(40) + w[3:]
        damaged.add(i)
    d = hub_link.StreamDeframer()
    d.feed(b"".join(bytes(w) for w in wires))
    got = []
    while True:
        ev = d.next_event()
        if ev is None:
            break
        if isinstance(ev, link.Frame):
            got.append(ev.data)
    assert got == [m for i, m in enumerate(msgs) if i not in damaged]


def test_ble_fragments_round_trip_for_every_mtu_class() -> None:
    rng = Rng(SEED + 2)
    msgs = [FRAME, ACK] + [rng.bytes(rng.below(2000) + 1) for _ in range(4)]
    for mtu in (23, 24, 27, 64, 185, 247, 251, 512, 517):
        frag = link.Fragmenter(mtu)
        r = hub_link.Reassembler()
        for m in msgs:
            for f in frag.fragments(m):
                assert len(f) <= mtu - 3
                r.feed(f)
        got = []
        while True:
            ev = r.next_event()
            if ev is None:
                break
            assert isinstance(ev, link.Frame), (mtu, ev)
            got.append(ev.data)
        assert got == msgs, mtu


def test_ble_lost_fragment_drops_only_that_message() -> None:
    frag = link.Fragmenter(23)
    r = hub_link.Reassembler()
    msgs = [bytes([i]) * 100 for i in range(1, 6)]
    for i, m in enumerate(msgs):
        fr = frag.fragments(m)
        if i == 2:
            del fr[2]  # lost in the air
        for f in fr:
            r.feed(f)
    events = []
    while True:
        ev = r.next_event()
        if ev is None:
            break
        events.append(ev)
    assert [e.data for e in events if isinstance(e, link.Frame)] == [msgs[0], msgs[1], msgs[3], msgs[4]]
    assert [e.reason for e in events if isinstance(e, link.Discarded)] == ["gap"]


def test_replay_window_flags_every_replay() -> None:
    rng = Rng(SEED + 3)
    w = replay.ReplayWindow()
    seen = set()
    top = 0
    for epoch in (1, 2):
        for _ in range(400):
            seq = max(0, top + rng.below(40) - 30)
            verdict = w.check(epoch, seq)
            if (epoch, seq) in seen:
                assert verdict in (replay.DUPLICATE, replay.TOO_OLD), (epoch, seq, verdict)
            elif verdict == replay.FRESH:
                w.commit(epoch, seq)
                seen.add((epoch, seq))
                top = max(top, seq)
            else:
                assert verdict == replay.TOO_OLD and seq <= top - replay.WINDOW
        top = 0
    assert w.check(1, 5) == replay.OLD_EPOCH


def test_replay_window_tells_two_boots_of_one_epoch_apart_by_their_salt() -> None:
    # A sample frame of the window's epoch with another boot salt is from a
    # boot that reused the epoch: refused whatever its seq, never a duplicate.
    salt_a, salt_b = bytes(16), bytes(range(16))
    w = replay.ReplayWindow()
    w.commit(4, 0)  # a hello opens the epoch: no salt yet
    assert w.salt is None
    for seq in range(1, 100):
        assert w.check(4, seq, salt_a) == replay.FRESH
        w.commit(4, seq, salt_a)
    assert w.salt == salt_a  # learned from the first sample frame
    for seq in (0, 50, 98, 99, 100, 1000):  # seen, within, at the top, above, far above
        assert w.check(4, seq, salt_b) == replay.EPOCH_ROLLBACK, seq
    assert w.check(4, 99, salt_a) == replay.DUPLICATE
    assert w.check(4, 100, salt_a) == replay.FRESH
    assert w.check(4, 100) == replay.FRESH  # a message without a salt (hello, status) goes by seq
    assert w.check(3, 100, salt_a) == replay.OLD_EPOCH
    w.commit(5, 0, salt_b)  # the next boot: its own salt
    assert w.state() == (5, 0, 1, salt_b)
    assert w.check(5, 0, salt_a) == replay.EPOCH_ROLLBACK and w.check(5, 0, salt_b) == replay.DUPLICATE


def _hmac_sha256_reference(key: bytes, data: bytes) -> bytes:
    # HMAC (RFC 2104) over hashlib, written out: the board's MacKey hashes
    # with its own SHA-256 (protocols/_sha256.py) on MicroPython.
    import hashlib

    k = key + bytes(64 - len(key))
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k) + data).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in k) + inner).digest()


def test_mac_tags_equal_hmac_sha256_for_every_block_boundary() -> None:
    rng = Rng(77)
    print("seed", 77)
    key = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    for n in list(range(0, 200)) + [255, 256, 1000, 1023, 1024, 4096]:
        payload = rng.bytes(n)
        head = bytes([0x40 + n]) if n < 24 else (bytes([0x58, n]) if n < 256 else bytes([0x59, n >> 8, n & 0xFF]))
        want = _hmac_sha256_reference(KEY, key._prefix + head + payload)
        assert key.tag(payload) == want, n
        assert key.tag(memoryview(bytearray(payload))) == want, n


def test_downlink_lines_decoded_in_place_as_queued_and_strictly() -> None:
    # The board's take_byte() path and the queueing path give the same
    # messages; malformed base64 (bad padding, characters outside the
    # alphabet, a length not a multiple of 4) is refused, not guessed at.
    rng = Rng(91)
    print("seed", 91)
    d = link.LineDeframer()
    q = hub_link.LineQueue()
    for n in list(range(1, 40)) + [200, 255, 256]:
        msg = rng.bytes(n)
        line = hub_link.downlink_line(msg)
        got = [d.take_byte(b) for b in line]
        assert got[:-1] == [0] * (len(line) - 1) and bytes(d.message[:got[-1]]) == msg, n
        q.feed(line)
        assert q.next_message() == msg
    good = hub_link.downlink_line(b"ack!")
    body = good[1:-1]
    for bad, reason in ((b"~" + body[:-1] + b"\n", "base64"), (b"~" + body[:-2] + b"=A\n", "base64"),
                        (b"~" + body[:2] + b"!" + body[3:] + b"\n", "base64"), (b"~AAAAAAAA\n", "crc"),
                        (b"~AAAA\n", "length"), (b"console text\n", "noise")):
        before = d.discarded
        assert [d.take_byte(b) for b in bad][-1] == 0
        assert d.discarded == before + 1 and d.last_discarded == reason, (bad, d.last_discarded)


def test_sealing_in_place_equals_sealing_a_copy() -> None:
    # The board writes each frame's payload where its outbox keeps it and
    # seals around it (seal_written); the bytes are those of seal_into.
    rng = Rng(5)
    key = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    for n in (0, 1, 23, 24, 255, 256, 1000):
        payload = rng.bytes(n)
        want = cbor.Writer(bytearray(1200))
        key.seal_into(want, payload)
        region = memoryview(bytearray(1300))[50:1250]  # a region of a larger ring
        w = cbor.Writer(region)  # type: ignore[arg-type]
        w.pos = key.payload_offset
        region[w.pos:w.pos + n] = payload
        w.pos += n
        key.seal_written(w, key.payload_offset)
        assert bytes(region[:w.pos]) == bytes(want.buf[:want.pos]), n


def test_uint_from_halves_encodes_as_the_whole_value() -> None:
    # A board carries counters past 2**30 as hi * 2**30 + lo (on a 32-bit
    # port a larger int is a heap int): the bytes are those of uint(value),
    # at every head size's edges and at random, and decode to the value.
    rng = Rng(11)
    edges = [0, 1, 23, 24, 255, 256, 0xFFFF, 0x10000, (1 << 30) - 1, 1 << 30, (1 << 32) - 1, 1 << 32,
             (1 << 33) + 5, (1 << 40) - 1, (1 << 64) - 1]
    randoms = [(rng.next() << 32 | rng.next()) >> rng.below(64) for _ in range(200)]
    for value in edges + randoms:
        hi, lo = value >> 30, value & ((1 << 30) - 1)
        want = cbor.Writer(bytearray(16))
        want.uint(value)
        got = cbor.Writer(bytearray(16))
        got.uint_halves(hi, lo)
        assert bytes(got.buf[:got.pos]) == bytes(want.buf[:want.pos]), (value, hi, lo)
        assert cbor.decode(got.buf[:got.pos]) == value, value
    raises(LocalProtocolError, cbor.Writer(bytearray(16)).uint_halves, 1, 1 << 30)
    raises(LocalProtocolError, cbor.Writer(bytearray(16)).uint_halves, 1 << 34, 0)


def test_ble_fragments_read_in_place_equal_those_of_a_copy() -> None:
    # A board fragments a long message where its outbox ring keeps it
    # (start with base): the fragments are those of the message alone, and
    # holds() says which bytes are still being read.
    rng = Rng(SEED + 9)
    ring = rng.bytes(3000)
    for mtu in (23, 185, 517):
        for base, n in ((0, 1), (0, 3000), (17, 1200), (2999, 1), (1500, 1500)):
            want = link.Fragmenter(mtu).fragments(ring[base:base + n])
            frag = link.Fragmenter(mtu)
            frag.start(ring, n, base)
            assert frag.holds(ring, base, base + 1) and frag.holds(ring, base + n - 1, base + n)
            assert not frag.holds(ring, base + n, 3000) and not frag.holds(ring, 0, base)
            assert not frag.holds(bytearray(ring), base, base + n)  # another buffer
            out = bytearray(mtu)
            got = []
            while True:
                k = frag.next_into(out)
                if not k:
                    break
                got.append(bytes(out[:k]))
            assert got == want, (mtu, base, n)
            assert not frag.holds(ring, 0, 3000)  # sent: nothing held
    raises(LocalProtocolError, link.Fragmenter(23).start, ring, 10, 2995)
