# Golden vectors: literal bytes, computed once with cbor2, the standard
# library's hmac and `cryptography`'s HKDF-Expand and AES-CTR (not with this
# package), so the wire format is pinned independently of the code under test.
import array

from protocols import cbor, cipher, cose, fields, hub_link, link, messages, samples
from protocols.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from tests.shared.check import raises, unhex

KEY = bytes(range(32))
KID = b"pb-0a1b2c3d"

# Samples [100, 103, 98, -5, 131071] -> deltas [100, 3, -5, -103, 131076]
# -> zigzag [200, 6, 9, 205, 262152] -> LEB128 varints:
SAMPLES = [100, 103, 98, -5, 131071]
SAMPLES_WIRE = unhex("c801 06 09 cd01 888010")

# Samples at the int32 extremes, whose differences take 33 bits: past a
# 32-bit port's viper words, which a board's encoder (an array("i")) uses.
EXTREME_SAMPLES = [2147483647, -2147483648, 0, -1, 1073741824, -536870913, 5]
EXTREME_WIRE = unhex("feffffff0f fdffffff1f 8080808010 01 8280808008 818080800c 8c80808004")

# An ECG frame: epoch 7, seq 42, stream 1 (MAX30003), t0 123456 ms, first
# sample 61440, 512 Hz, 5 samples, 1e6/2621440 uV per LSB (gain 20), lead off,
# boot salt a0 a1 .. af. Its samples are encrypted: AES-256-CTR under
# HKDF-SHA256(salt=boot salt, IKM=KEY, info="pulsebridge/1 A256CTR samples"),
# counter block 00000007 0000002a 00000000 00000000.
BOOT_SALT = bytes(range(0xA0, 0xB0))
SAMPLE_KEY = unhex("9a05214a2daad771af302b4a698ebe62a665db64b6b05a24225efbed150c166c")
SAMPLES_SEALED = unhex("a62a2368c3491e1a5f")
FRAME_PAYLOAD = unhex(
    "af 0001 0102 0207 03182a 0401 051a0001e240 0619f000 07190200 0805"
    "09821a000f42401a00280000 0b8401000000 0c01 0d8149 a62a2368c3491e1a5f 0e39fffb"
    "0f50 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
FRAME = unhex(
    "d184 50a20105044b70622d3061316232633364 a0"
    "5852" + "af00010102020703182a0401051a0001e2400619f00007190200080509821a000f42401a00280000"
    "0b84010000000c010d8149a62a2368c3491e1a5f0e39fffb0f50a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"
    "5820c87faa98cd97c42962090569bb7dcaddedde6afd4f9f1d031a5494ac2a6fa5b8")

# An ack: epoch 7, ranges 40..42 and 44..44, hub to board.
ACK_PAYLOAD = unhex("a4 0002 0102 0207 0382 82 1828 182a 82 182c 182c")
ACK = unhex(
    "d18450a20105044b70622d3061316232633364a053a40002010202070382821828182a82182c182c"
    "58208988274a6b47d8bc464527fb4c68a9d0b36430707bb57cc9c34cbb8fe3a3d753")


def test_sample_encoding_matches_vector() -> None:
    out = bytearray(64)
    n = samples.encode_into(SAMPLES, len(SAMPLES), out, 0)
    assert bytes(out[:n]) == SAMPLES_WIRE
    assert samples.decode(SAMPLES_WIRE, 5) == SAMPLES


def test_sample_encoding_of_an_int32_array_matches_vectors() -> None:
    # As a board holds its samples (MicroPython: the viper loop), from an offset.
    for values, wire in ((SAMPLES, SAMPLES_WIRE), (EXTREME_SAMPLES, EXTREME_WIRE)):
        out = bytearray(64)
        n = samples.encode_into(array.array("i", values), len(values), out, 3)
        assert bytes(out[3:n]) == wire
        assert samples.decode(wire, len(values)) == values
    # Room for a sample's worst case checked before each: no byte written
    # past the sample that had none (the third: 5 bytes each, limit 12).
    out = bytearray(64)
    raises(LocalProtocolError, samples.encode_into, array.array("i", EXTREME_SAMPLES), 7, out, 0, 12)
    assert out[10:] == bytearray(54)


def test_frame_encoder_matches_vector() -> None:
    w = cbor.Writer(bytearray(512))
    messages.encode_sample_frame(w, 7, 42, messages.STREAM_ECG_MAX30003, 123456, 61440, 512, 5,
                                 1000000, 2621440, None, messages.FLAG_LEAD_OFF, 0, 0, 0, (SAMPLES,),
                                 cipher.SampleCipher(KEY, BOOT_SALT))
    assert bytes(w.buf[:w.pos]) == FRAME_PAYLOAD
    key = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    assert key.seal(FRAME_PAYLOAD) == FRAME


def test_frame_built_with_work_between_its_pieces_matches_vector() -> None:
    # A board reads its sensors' FIFOs between a frame's pieces (after the
    # header, after each channel): the frame is the same, byte for byte,
    # whatever the work between does to other buffers.
    w = cbor.Writer(bytearray(512))
    other = bytearray(64)
    calls = []

    def between() -> None:
        calls.append(w.pos)
        samples.encode_into([1, 2, 3], 3, other, 0)  # another stream's work, meanwhile

    messages.encode_sample_frame(w, 7, 42, messages.STREAM_ECG_MAX30003, 123456, 61440, 512, 5,
                                 1000000, 2621440, None, messages.FLAG_LEAD_OFF, 0, 0, 0, (SAMPLES,),
                                 cipher.SampleCipher(KEY, BOOT_SALT), between)
    assert bytes(w.buf[:w.pos]) == FRAME_PAYLOAD
    assert len(calls) == 2 and calls[0] < calls[1] < w.pos  # after the header, after the one channel


def test_frame_fields_kept_and_set_again_give_the_vector() -> None:
    # A board keeps one SampleFrameFields and sets it for each frame: the
    # frame after another stream's (two channels, LED drive, flags) is the
    # vector, byte for byte.
    f = fields.SampleFrameFields(cipher.SampleCipher(KEY, BOOT_SALT))
    w = cbor.Writer(bytearray(512))
    f.epoch, f.seq, f.stream, f.t0_ms, f.first_index, f.rate_hz = 7, 41, messages.STREAM_PPG_MAX30102, 5, 6, 100
    f.count, f.scale_num, f.scale_den, f.ppg_drive, f.flags = 3, 1, 1, (1, 2, 3, 4), messages.FLAG_SATURATED
    f.fifo_overflows, f.frames_dropped, f.jitter_us = 2, 1, 9
    f.channels = (array.array("i", [5, 6, 7]), array.array("i", [1, -1, 1]))
    f.encode(w)
    ppg = messages.decode_payload(bytes(w.buf[:w.pos]), messages.UPLINK_TYPES,
                                  opener=cipher.SampleCipher(KEY))
    assert isinstance(ppg, messages.SampleFrame) and ppg.channels == [[5, 6, 7], [1, -1, 1]]
    assert ppg.ppg_drive == (1, 2, 3, 4) and ppg.status == (messages.FLAG_SATURATED, 2, 1, 9)
    f.seq, f.stream, f.t0_ms, f.first_index = 42, messages.STREAM_ECG_MAX30003, 123456, 61440
    f.rate_hz, f.count = 512, 5
    f.scale_num, f.scale_den, f.ppg_drive, f.flags = 1000000, 2621440, None, messages.FLAG_LEAD_OFF
    f.fifo_overflows = f.frames_dropped = f.jitter_us = 0
    f.channels = (array.array("i", SAMPLES),)
    w.pos = 0
    f.encode(w)
    assert bytes(w.buf[:w.pos]) == FRAME_PAYLOAD


def test_frame_vector_verifies_and_decodes() -> None:
    key = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    msg = cose.parse(FRAME)
    assert msg.kid == KID
    key.verify(msg)
    f = messages.decode_payload(msg.payload, messages.UPLINK_TYPES, opener=cipher.SampleCipher(KEY))
    assert isinstance(f, messages.SampleFrame)
    assert (f.epoch, f.seq, f.stream, f.t0_ms, f.first_index, f.rate_hz, f.count) == (7, 42, 1, 123456, 61440, 512, 5)
    assert f.scale == (1000000, 2621440)
    assert f.status == (1, 0, 0, 0)
    assert f.channels == [SAMPLES]


def test_sample_key_and_keystream_match_vector() -> None:
    assert cipher.derive_key(KEY, BOOT_SALT) == SAMPLE_KEY
    buf = bytearray(b"xx" + SAMPLES_WIRE)
    cipher.SampleCipher(KEY, BOOT_SALT).apply(buf, 2, len(buf), 7, 42)
    assert bytes(buf[2:]) == SAMPLES_SEALED
    # The hub's cipher opens with the salt the frame carries.
    cipher.SampleCipher(KEY).apply(buf, 2, len(buf), 7, 42, 0, BOOT_SALT)
    assert bytes(buf[2:]) == SAMPLES_WIRE
    # A keystream offset picks up where the previous channel left it, across block boundaries.
    whole = bytearray(40)
    cipher.SampleCipher(KEY, BOOT_SALT).apply(whole, 0, 40, 7, 42)
    parts = bytearray(40)
    c = cipher.SampleCipher(KEY, BOOT_SALT)
    c.apply(parts, 0, 13, 7, 42)
    c.apply(parts, 13, 40, 7, 42, 13)
    assert parts == whole
    # Past a frame's 256 blocks too (the hub's CPython path builds those counters apart).
    short = whole
    whole = bytearray(4200)
    cipher.SampleCipher(KEY, BOOT_SALT).apply(whole, 0, 4200, 7, 42)
    parts = bytearray(4200)
    c.apply(parts, 0, 4090, 7, 42)
    c.apply(parts, 4090, 4200, 7, 42, 4090)
    assert parts == whole and whole[:40] == short
    # A board's way: the message begun once, each channel XORed from its offset.
    c.begin(7, 42)
    parts = bytearray(40)
    c.xor(parts, 0, 13, 0)
    c.xor(parts, 13, 40, 13)
    assert parts == short


def test_another_boot_salt_gives_another_keystream_for_the_same_epoch_and_seq() -> None:
    # The epoch file lost or restored: same (epoch, seq), other boot, other key.
    a = bytearray(32)
    b = bytearray(32)
    cipher.SampleCipher(KEY, BOOT_SALT).apply(a, 0, 32, 7, 42)
    cipher.SampleCipher(KEY, bytes(16)).apply(b, 0, 32, 7, 42)
    assert a != b
    assert cipher.derive_key(KEY, bytes(16)) != SAMPLE_KEY


def test_sealing_needs_a_salt_of_the_right_size() -> None:
    raises(LocalProtocolError, cipher.SampleCipher(KEY).apply, bytearray(4), 0, 4, 7, 42)
    raises(LocalProtocolError, cipher.SampleCipher, KEY, bytes(8))
    w = cbor.Writer(bytearray(512))
    raises(LocalProtocolError, messages.encode_sample_frame, w, 7, 42,
           messages.STREAM_ECG_MAX30003, 0, 0, 512, 5, 1, 1, None, 0, 0, 0, 0, (SAMPLES,), cipher.SampleCipher(KEY))


def test_frame_without_the_key_keeps_its_samples_sealed() -> None:
    f = messages.decode_payload(cose.parse(FRAME).payload, messages.UPLINK_TYPES, decode_samples=False)
    assert f.channels == [SAMPLES_SEALED]
    raises(LocalProtocolError, messages.decode_payload, cose.parse(FRAME).payload, messages.UPLINK_TYPES)


def test_ack_vector() -> None:
    ack = messages.Ack(7, [(40, 42), (44, 44)])
    assert messages.encoded(ack) == ACK_PAYLOAD
    down = cose.MacKey(KEY, KID, cose.AAD_DOWNLINK)
    assert down.seal(ACK_PAYLOAD) == ACK
    got = messages.decode_payload(cose.parse(ACK).payload, messages.DOWNLINK_TYPES)
    assert got == ack
    assert got.covers(7, 41) and got.covers(7, 44)  # type: ignore[attr-defined]
    assert not got.covers(7, 43) and not got.covers(8, 41)  # type: ignore[attr-defined]


def test_frame_never_passes_for_ack_nor_ack_for_frame() -> None:
    up = cose.MacKey(KEY, KID, cose.AAD_UPLINK)
    down = cose.MacKey(KEY, KID, cose.AAD_DOWNLINK)
    raises(AuthenticationError, down.verify, cose.parse(FRAME))
    raises(AuthenticationError, up.verify, cose.parse(ACK))
    # and the type check refuses a frame offered where only downlink types go
    e = raises(RemoteProtocolError, messages.decode_payload, FRAME_PAYLOAD, messages.DOWNLINK_TYPES)
    assert e.reason == "direction"


def test_wrong_key_is_refused() -> None:
    other = cose.MacKey(bytes(32), KID, cose.AAD_UPLINK)
    e = raises(AuthenticationError, other.verify, cose.parse(FRAME))
    assert e.reason == "bad_mac" and e.device_id == "pb-0a1b2c3d"


def test_serial_framing_vector() -> None:
    # COBS of "ab\x00c" + CRC-32 LE, between two delimiters.
    body = b"ab\x00c"
    assert link.crc32(body) == 0x3D3660D6
    wire = link.StreamFramer().frame(body)
    assert wire == unhex("00 03 6162 06 63 d660363d 00")


def test_serial_framing_from_an_offset_and_long_messages() -> None:
    # The board frames a message where the outbox holds it (start): the
    # bytes are those of the message alone; a CRC with its top bits set
    # (a heap int on a 32-bit port, not made there) comes out the same.
    body = bytes(range(256)) * 3
    f = link.StreamFramer()
    ring = bytearray(b"\xff" * 7) + body + b"\x01"
    out = bytearray(len(body) + 16)
    n = f.frame_into(ring, len(body), out, 0, 7)
    assert bytes(out[:n]) == f.frame(body)
    # Into the framer's own buffer (a board's transmit buffer), likewise; a
    # buffer too small is refused before anything is written.
    own = link.StreamFramer(bytearray(len(body) + 16))
    n = own.frame_from(ring, 7, len(body))
    assert own.out is not None and bytes(own.out[:n]) == f.frame(body)
    small = link.StreamFramer(bytearray(len(body)))
    raises(LocalProtocolError, small.frame_from, ring, 7, len(body))
    assert small.out == bytearray(len(body))
    msgs = (body, b"ab\x00c", b"\x00" * 300)
    assert any(link.crc32(m) >= 1 << 30 for m in msgs)
    for msg in msgs:
        wire = f.frame(msg)
        ev = hub_link.StreamDeframer()
        ev.feed(wire)
        got = ev.next_event()
        assert isinstance(got, link.Frame) and got.data == msg


def test_status_encoder_matches_the_generic_one() -> None:
    for args in ((1, 2, 3, 4, 5, 6), (7, 0xFFFFFFFF, 2**40, 0, 300, 70000)):
        w = cbor.Writer(bytearray(128))
        messages.encode_status(w, *args)
        assert bytes(w.buf[:w.pos]) == messages.encoded(messages.Status(*args))


def test_status_time_response_and_hello_encoders_take_the_time_in_halves() -> None:
    # A board past 2**30 ms up gives its time as hi * 2**30 + lo (small ints
    # on a 32-bit port): the same bytes as the one int.
    for tick_ms in (5, (1 << 30) - 1, 1 << 30, (3 << 30) + 12345, (5 << 30) + 7, (1 << 40) + 99):
        hi, lo = tick_ms >> 30, tick_ms & ((1 << 30) - 1)
        w = cbor.Writer(bytearray(128))
        messages.encode_status(w, 1, 2, lo, 4, 5, 6, hi)
        assert bytes(w.buf[:w.pos]) == messages.encoded(messages.Status(1, 2, tick_ms, 4, 5, 6))
        w = cbor.Writer(bytearray(128))
        messages.encode_time_response(w, 7, 8, 9, lo, hi)
        assert bytes(w.buf[:w.pos]) == messages.encoded(messages.TimeResponse(7, 8, 9, tick_ms))
        for streams in ([], [(1, 512), (3, 100)]):
            w = cbor.Writer(bytearray(128))
            messages.encode_hello(w, 7, 8, "pulsebridge-fw 1.2", lo, streams, hi)
            assert bytes(w.buf[:w.pos]) == messages.encoded(messages.Hello(7, 8, "pulsebridge-fw 1.2", tick_ms,
                                                                           streams))


def test_downlink_line_vector() -> None:
    line = hub_link.downlink_line(b"\x03\x00ack")
    assert line == b"~AwBhY2turCdc\n"
    for b in line:
        assert b == 10 or 32 <= b < 127  # never a control byte such as Ctrl-C
