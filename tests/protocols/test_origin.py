# Origin proof (protocols/origin.py, SPEC.md "Origin proof") against an
# implementation that is not ours (cbor2, hmac, hashlib, cryptography), and
# the attacks a hub holding the device key could make: each one is caught.
import hashlib
import hmac
import random

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols import cbor, cipher, cose, messages, origin, origin_verify, samples
from protocols.errors import AuthenticationError, ProtocolError, RemoteProtocolError

KID = b"pb-0a1b2c3d"
DEVICE_KEY = bytes(range(32))
ORIGIN_KEY = bytes(range(100, 132))
SALT = bytes(range(200, 216))
EPOCH = 3

# A checkpoint listing seqs 1 and 2 with digests 0x11.. and 0x22.., index 0,
# epoch 3, under the keys above: the COSE_Mac0 as a board sends it inside
# message type 10 (pinned literal bytes; SPEC.md quotes them).
GOLDEN_CHECKPOINT = bytes.fromhex(
    "d18450a20105044b70622d3061316232633364a05863a70001010302000350c8c9cacbcccdcecfd0d1d2d3d4d5d6d704"
    "5820518184d463fe59e3b35300d24187ea3c9b08dbafaed05c16c7d633c3994ac3090582010206582011111111111111"
    "11111111111111111122222222222222222222222222222222582001fa8dd279d2370d775948cd6f189ba9503ccc5820"
    "3eda1662cd61bcaf649965")


# ---- the independent implementation ---------------------------------------

def ind_mac0(key: bytes, aad: bytes, payload: bytes) -> bytes:
    protected = cbor2.dumps({1: 5, 4: KID})
    tag = hmac.new(key, cbor2.dumps(["MAC0", protected, aad, payload]), hashlib.sha256).digest()
    return cbor2.dumps(cbor2.CBORTag(17, [protected, {}, payload, tag]))


def ind_open_mac0(data: bytes, key: bytes, aad: bytes) -> bytes:
    t = cbor2.loads(data)
    protected, _unprotected, payload, tag = t.value
    want = hmac.new(key, cbor2.dumps(["MAC0", protected, aad, payload]), hashlib.sha256).digest()
    assert hmac.compare_digest(want, tag)
    return bytes(payload)


def ind_boot_key(device_key: bytes, salt: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, b"pulsebridge/1 A256CTR samples").derive(device_key)


def ind_wrapped(origin_key: bytes, device_key: bytes, salt: bytes) -> bytes:
    pad = hmac.new(origin_key, b"pulsebridge/1 origin key-wrap" + salt, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(ind_boot_key(device_key, salt), pad))


def ind_checkpoint(index: int, entries: "list[tuple[int, bytes]]", epoch: int = EPOCH,
                   key: bytes = ORIGIN_KEY) -> bytes:
    payload = cbor2.dumps({0: 1, 1: epoch, 2: index, 3: SALT, 4: ind_wrapped(key, DEVICE_KEY, SALT),
                           5: [s for s, _ in entries], 6: b"".join(d for _, d in entries)})
    return ind_mac0(key, b"pulsebridge/1 origin", payload)


def ind_message(seq: int, checkpoint: bytes, epoch: int = EPOCH) -> bytes:
    return ind_mac0(DEVICE_KEY, b"pulsebridge/1 board-to-hub",
                    cbor2.dumps({0: 10, 1: 2, 2: epoch, 3: seq, 4: checkpoint}))


def ind_digest(frame: bytes) -> bytes:
    return hashlib.sha256(cbor2.loads(frame).value[2]).digest()[:16]


def ind_samples(frame: bytes, boot_key: bytes) -> "list[bytes]":
    # The channels' sample bytes, decrypted (AES-256-CTR, SPEC.md's counter block).
    p = cbor2.loads(cbor2.loads(frame).value[2])
    stream = b"".join(p[13])
    block = p[2].to_bytes(4, "big") + p[3].to_bytes(4, "big") + bytes(4) + bytes(4)
    clear = Cipher(algorithms.AES(boot_key), modes.CTR(block)).decryptor().update(stream)
    out, at = [], 0
    for ch in p[13]:
        out.append(clear[at:at + len(ch)])
        at += len(ch)
    return out


# ---- frames as a board makes them -----------------------------------------

def frame(seq: int, base: int = 0, salt: bytes = SALT, key: bytes = DEVICE_KEY, epoch: int = EPOCH) -> bytes:
    chans = [[base + (seq * 7 + i * 3) % 50 - 25 for i in range(64)]]
    f = messages.SampleFrame(epoch, seq, messages.STREAM_ECG_MAX30003, seq * 125, seq * 64, 512, 64, (381, 1000),
                             None, (0, 0, 0, 0), chans)
    return cose.MacKey(key, KID, cose.AAD_UPLINK).seal(messages.encoded(f, sealer=cipher.SampleCipher(key, salt)))


def channels(raw: bytes) -> "list[list[int]]":
    m = messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES,
                                opener=cipher.SampleCipher(DEVICE_KEY))
    assert isinstance(m, messages.SampleFrame)
    return m.channels


def stream(n_frames: int = 12, every: int = 4) -> "tuple[list[bytes], list[bytes]]":
    # Frames at seqs 1.. with a checkpoint after each `every` of them (the
    # checkpoint takes the next seq), as the board interleaves them.
    frames, ckpts, pending = [], [], []
    seq = 1
    for _ in range(n_frames):
        f = frame(seq)
        frames.append(f)
        pending.append((seq, ind_digest(f)))
        seq += 1
        if len(pending) == every:
            ckpts.append(ind_message(seq, ind_checkpoint(len(ckpts), pending)))
            pending = []
            seq += 1
    return frames, ckpts


def verify(frames: "list[bytes]", ckpts: "list[bytes]", claims: "dict[int, list[list[int]]] | None" = None,
           keys: "dict[str, bytes] | None" = None) -> origin_verify.Report:
    v = origin_verify.Verifier(keys if keys is not None else {KID.decode(): ORIGIN_KEY})
    for c in ckpts:
        v.add(c)
    for i, f in enumerate(frames):
        v.add(f, (claims or {}).get(i))
    return v.report()


# ---- the format ----------------------------------------------------------

def test_golden_checkpoint_is_what_both_implementations_make() -> None:
    entries = [(1, b"\x11" * 16), (2, b"\x22" * 16)]
    independent = ind_checkpoint(0, entries)
    w = cbor.Writer(bytearray(1024))
    origin.encode_checkpoint(w, EPOCH, 0, SALT, ind_wrapped(ORIGIN_KEY, DEVICE_KEY, SALT), [1, 2],
                             b"\x11" * 16 + b"\x22" * 16, 2)
    ours = cose.MacKey(ORIGIN_KEY, KID, origin.AAD_ORIGIN).seal(bytes(w.buf[:w.pos]))
    assert ours == independent
    assert ours == GOLDEN_CHECKPOINT, ours.hex()
    c = origin_verify.open_checkpoint(GOLDEN_CHECKPOINT, ORIGIN_KEY)
    assert (c.device_id, c.epoch, c.index, c.boot_salt) == (KID.decode(), EPOCH, 0, SALT)
    assert c.entries == dict(entries)
    assert c.boot_key == ind_boot_key(DEVICE_KEY, SALT)


def test_library_wrap_and_digest_match_the_independent_ones() -> None:
    f = frame(5)
    assert origin_verify.frame_digest(cose.parse(f).payload) == ind_digest(f)
    pad = origin.key_pad(ORIGIN_KEY, SALT)
    assert origin.xor32(cipher.derive_key(DEVICE_KEY, SALT), pad) == ind_wrapped(ORIGIN_KEY, DEVICE_KEY, SALT)
    # the boot key a checkpoint carries opens the board's samples, with no device key
    opener = origin_verify.boot_cipher(ind_boot_key(DEVICE_KEY, SALT), SALT)
    m = messages.decode_payload(cose.parse(f).payload, messages.UPLINK_TYPES, opener=opener)
    assert isinstance(m, messages.SampleFrame) and m.channels == channels(f)
    clear = ind_samples(f, ind_boot_key(DEVICE_KEY, SALT))
    assert [samples.decode(c, 64) for c in clear] == channels(f)


def test_checkpoint_message_is_type_10_and_decodes() -> None:
    raw = ind_message(9, GOLDEN_CHECKPOINT)
    m = messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES)
    assert isinstance(m, messages.OriginCheckpoint)
    assert (m.epoch, m.seq, m.checkpoint) == (EPOCH, 9, GOLDEN_CHECKPOINT)
    # our encoder makes the same bytes
    assert messages.encoded(m) == ind_open_mac0(raw, DEVICE_KEY, cose.AAD_UPLINK)


def test_wrong_origin_key_and_tampered_checkpoint_are_refused() -> None:
    with pytest.raises(AuthenticationError):
        origin_verify.open_checkpoint(GOLDEN_CHECKPOINT, bytes(32))
    t = cbor2.loads(GOLDEN_CHECKPOINT)
    p = cbor2.loads(t.value[2])
    p[5] = [1, 3]  # the hub renumbers a listed frame
    v = list(t.value)
    v[2] = cbor2.dumps(p)
    with pytest.raises(AuthenticationError):
        origin_verify.open_checkpoint(cbor2.dumps(cbor2.CBORTag(17, v)), ORIGIN_KEY)


def test_open_checkpoint_raises_only_protocol_errors_on_mutations() -> None:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(3000):
        data = bytearray(GOLDEN_CHECKPOINT)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        try:
            origin_verify.open_checkpoint(bytes(data), ORIGIN_KEY)
        except ProtocolError:
            pass
    # and a well-MACed checkpoint with a bad body is a RemoteProtocolError, not a crash
    for body in ({0: 1}, {0: 2, 1: 0, 2: 0, 3: SALT, 4: bytes(32), 5: [1], 6: bytes(16)},
                 {0: 1, 1: 0, 2: 0, 3: SALT, 4: bytes(32), 5: [2, 1], 6: bytes(32)},
                 {0: 1, 1: 0, 2: 0, 3: SALT, 4: bytes(32), 5: [1], 6: bytes(15)}, [1, 2]):
        with pytest.raises(RemoteProtocolError):
            origin_verify.open_checkpoint(ind_mac0(ORIGIN_KEY, b"pulsebridge/1 origin", cbor2.dumps(body)), ORIGIN_KEY)


# ---- the verifier and the attacks ----------------------------------------

def test_every_frame_proven_with_its_samples() -> None:
    frames, ckpts = stream(12, 4)
    rep = verify(frames, ckpts, {i: channels(f) for i, f in enumerate(frames)})
    assert rep.ok and rep.count(origin_verify.PROVEN) == 12, rep.as_dict()


def test_frames_after_the_last_checkpoint_wait_and_are_not_counted_proven() -> None:
    frames, ckpts = stream(10, 4)  # frames 9 and 10 (seqs 11, 12) after the second checkpoint
    rep = verify(frames, ckpts)
    assert rep.ok and rep.count(origin_verify.PROVEN) == 8 and rep.count(origin_verify.PENDING) == 2, rep.as_dict()


def test_hub_altering_a_sample_and_remacing_is_caught() -> None:
    frames, ckpts = stream(8, 4)
    # The hub holds the device key: it decrypts, changes one sample, encrypts and MACs again.
    m = messages.decode_payload(cose.parse(frames[2]).payload, messages.UPLINK_TYPES,
                                opener=cipher.SampleCipher(DEVICE_KEY))
    assert isinstance(m, messages.SampleFrame)
    m.channels[0][10] += 40
    forged = cose.MacKey(DEVICE_KEY, KID, cose.AAD_UPLINK).seal(
        messages.encoded(m, sealer=cipher.SampleCipher(DEVICE_KEY, SALT)))
    rep = verify(frames[:2] + [forged] + frames[3:], ckpts)
    assert not rep.ok
    assert [(f.seq, f.verdict) for f in rep.frames if f.verdict != origin_verify.PROVEN] == [(3, origin_verify.ALTERED)]


def test_hub_altering_the_decoded_samples_of_a_document_is_caught() -> None:
    frames, ckpts = stream(8, 4)
    claims = {i: channels(f) for i, f in enumerate(frames)}
    claims[5][0][0] -= 1  # the COSE bytes forwarded intact, the decoded values in the document not
    rep = verify(frames, ckpts, claims)
    bad = [f for f in rep.frames if f.verdict != origin_verify.PROVEN]
    assert [(f.seq, f.verdict) for f in bad] == [(7, origin_verify.ALTERED)] and "sample 0" in bad[0].why


def test_hub_dropping_a_frame_is_listed_as_a_gap() -> None:
    frames, ckpts = stream(8, 4)
    rep = verify(frames[:1] + frames[3:], ckpts)  # seqs 2 and 3 never forwarded
    assert not rep.ok
    # frame(seq) starts at board time seq * 125 ms and holds 64 samples at 512 Hz (125 ms): the gap
    # lies between seq 1 (125-250 ms) and seq 4 (500-625 ms), 250 ms of board time (seqs 2 and 3)
    assert rep.gaps() == [{"device_id": KID.decode(), "epoch": EPOCH, "seq_ranges": [[2, 3]], "spans": [
        {"seqs": [2, 3], "after": {"seq": 1, "board_t0_ms": 125, "board_end_ms": 250},
         "before": {"seq": 4, "board_t0_ms": 500, "board_end_ms": 625}, "span_ms": 250}]}]
    assert rep.count(origin_verify.PROVEN) == 6


def test_gaps_at_both_ends_of_what_was_received_say_which_side_is_unknown() -> None:
    frames, ckpts = stream(8, 4)
    rep = verify(frames[2:6], ckpts)  # frames are seqs 1-4 and 6-9 (checkpoints 5, 10): 1, 2 and 8, 9 dropped
    spans = [s for g in rep.gaps() for s in g["spans"]]  # type: ignore[attr-defined]
    assert [s["seqs"] for s in spans] == [[1, 2], [8, 9]]
    assert spans[0]["after"] is None and spans[0]["before"]["seq"] == 3 and spans[0]["span_ms"] is None
    assert spans[1]["after"]["seq"] == 7 and spans[1]["before"] is None and spans[1]["span_ms"] is None


def test_hub_inserting_a_frame_is_caught() -> None:
    frames, ckpts = stream(8, 4)
    # A frame of its own making (device key) under a seq the board used for
    # a checkpoint, and one copied from the same seq of another frame's
    # content: neither is listed with its digest.
    inserted = frame(5, base=3)  # seq 5 is the first checkpoint's own seq
    rep = verify(frames + [inserted], ckpts)
    bad = [(f.seq, f.verdict) for f in rep.frames if f.verdict != origin_verify.PROVEN]
    assert bad == [(5, origin_verify.UNPROVEN)]
    swapped = frame(2, base=1)
    rep = verify([frames[0], swapped] + frames[2:], ckpts)
    assert [(f.seq, f.verdict) for f in rep.frames if f.verdict != origin_verify.PROVEN] == [(2, origin_verify.ALTERED)]


def test_hub_dropping_a_checkpoint_is_caught_and_its_frames_unproven() -> None:
    frames, ckpts = stream(12, 4)
    rep = verify(frames, [ckpts[0], ckpts[2]])
    assert not rep.ok
    assert rep.missing_checkpoints == [(KID.decode(), EPOCH, 1)]
    assert [f.seq for f in rep.frames if f.verdict == origin_verify.UNPROVEN] == [6, 7, 8, 9]


def test_checkpoint_forged_by_the_hub_is_refused() -> None:
    frames, ckpts = stream(4, 4)
    m = messages.decode_payload(cose.parse(ckpts[0]).payload, messages.UPLINK_TYPES)
    assert isinstance(m, messages.OriginCheckpoint)
    forged = ind_message(5, ind_checkpoint(0, [(1, ind_digest(frames[0]))], key=bytes(32)))
    rep = verify(frames, [forged])
    assert not rep.ok and "forged" in rep.problems[0]
    assert rep.count(origin_verify.PROVEN) == 0


def test_frame_of_a_device_without_origin_key_is_unproven() -> None:
    frames, ckpts = stream(4, 4)
    rep = verify(frames, [], keys={})
    assert not rep.ok and rep.count(origin_verify.UNPROVEN) == 4
