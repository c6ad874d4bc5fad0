# Origin proof (SPEC.md, "Origin proof"): what a backend needs to check,
# without trusting the hub, that each sample frame came from the board
# unaltered, and to see exactly which frames are missing.
#
# The board holds a second key, the origin key, written at provisioning and
# handed to the backend only (never to the hub). It keeps the 16-byte
# digest (SHA-256, truncated) of each sample frame's COSE payload as sent,
# and every few seconds sends an origin checkpoint: the list of (seq,
# digest) since the last one, its boot salt and its boot's sample key
# wrapped under the origin key, all in a COSE_Mac0 under the origin key.
# The hub stores and forwards it untouched (message type 10). The verifier
# here needs only the origin key: a frame whose digest a checkpoint lists
# is the board's; one altered, inserted or missing shows.
#
#   checkpoint = COSE_Mac0 under the origin key, external_aad AAD_ORIGIN,
#                kid the device id, payload:
#   {0: 1 (this format), 1: epoch, 2: index (0, 1, ... within one boot),
#    3: boot_salt (16 B), 4: wrapped boot key (32 B), 5: [seq, ...] (1..32,
#    ascending), 6: digests (16 B per seq, in order)}
#   digest(frame) = SHA-256(COSE payload of the frame)[:16]
#   wrapped = boot sample key XOR HMAC-SHA256(origin key, WRAP_INFO | boot_salt)
#
# The boot sample key lets the backend decrypt the frames' samples itself
# and compare them with the decoded values a hub's document claims (the hub
# holds that key anyway; the device key stays with the hub alone).

import hashlib

from protocols import cbor, cipher, cose, messages
from protocols._compat import const, equal_ct
from protocols.errors import AuthenticationError, LocalProtocolError, ProtocolError, RemoteProtocolError

AAD_ORIGIN = b"pulsebridge/1 origin"
WRAP_INFO = b"pulsebridge/1 origin key-wrap"
FORMAT = const(1)
DIGEST_SIZE = const(16)  # 128 bits: finding a second frame with the same digest costs 2^128 hashes
# Frames one checkpoint lists: 16 s of one ECG and one PPG stream at 1 s
# windows; it keeps a checkpoint under 1 kB (messages.MAX_ORIGIN_CHECKPOINT).
MAX_ENTRIES = const(32)
KEY_SIZE = const(32)


def frame_digest(payload: "bytes | bytearray | memoryview") -> bytes:
    # The digest a checkpoint lists for a sample frame: its COSE payload's
    # SHA-256, first DIGEST_SIZE bytes.
    return hashlib.sha256(bytes(payload)).digest()[:DIGEST_SIZE]


def key_pad(origin_key: bytes, boot_salt: bytes) -> bytes:
    # The 32 bytes XORed with a boot's sample key in its checkpoints.
    if len(origin_key) != KEY_SIZE:
        raise LocalProtocolError("an origin key is %d bytes, got %d" % (KEY_SIZE, len(origin_key)), "key_size")
    return cipher._hmac_sha256(bytes(origin_key), WRAP_INFO + bytes(boot_salt))


def xor32(a: "bytes | bytearray", b: "bytes | bytearray") -> bytes:
    out = bytearray(KEY_SIZE)
    for i in range(KEY_SIZE):
        out[i] = a[i] ^ b[i]
    return bytes(out)


def encode_checkpoint(w: "cbor.Writer", epoch: int, index: int, boot_salt: bytes, wrapped_key: bytes,
                      seqs: "list[int] | object", digests: "bytes | bytearray", n: int) -> None:
    # The checkpoint's payload at w: seqs[:n] and digests[:n * DIGEST_SIZE]
    # (the board passes its preallocated array and bytearray: nothing allocated).
    if not 0 < n <= MAX_ENTRIES:
        raise LocalProtocolError("a checkpoint lists 1 to %d frames, not %d" % (MAX_ENTRIES, n), "range")
    w.map(7)
    w.uint(0)
    w.uint(FORMAT)
    w.uint(1)
    w.uint(epoch)
    w.uint(2)
    w.uint(index)
    w.uint(3)
    w.bstr(boot_salt)
    w.uint(4)
    w.bstr(wrapped_key)
    w.uint(5)
    w.array(n)
    for i in range(n):
        w.uint(seqs[i])  # type: ignore[index]
    w.uint(6)
    w.head(2, n * DIGEST_SIZE)
    p = w.pos
    end = p + n * DIGEST_SIZE
    if end > w.end:
        raise LocalProtocolError("CBOR output buffer full (%d bytes)" % len(w.buf), "buffer_full")
    buf = w.buf
    for i in range(n * DIGEST_SIZE):
        buf[p + i] = digests[i]
    w.pos = end


class Checkpoint:
    # An origin checkpoint whose MAC verified under the origin key.
    def __init__(self, device_id: str, epoch: int, index: int, boot_salt: bytes, boot_key: bytes,
                 entries: "dict[int, bytes]") -> None:
        self.device_id = device_id
        self.epoch = epoch
        self.index = index
        self.boot_salt = boot_salt
        self.boot_key = boot_key  # the boot's sample key, unwrapped
        self.entries = entries  # seq -> digest


def open_checkpoint(data: "bytes | bytearray | memoryview", origin_key: bytes) -> Checkpoint:
    # data: the checkpoint COSE_Mac0 (OriginCheckpoint.checkpoint). Raises
    # AuthenticationError if its MAC does not verify under origin_key,
    # RemoteProtocolError if it is malformed, nothing else.
    msg = cose.parse(data)
    kid = msg.kid
    cose.MacKey(origin_key, kid, AAD_ORIGIN).verify(msg)
    try:
        d = cbor.decode(msg.payload)
    except RemoteProtocolError:
        raise
    except Exception as e:  # the decoder's contract is RemoteProtocolError; belt and braces
        raise RemoteProtocolError("checkpoint payload: %s" % e, "malformed") from None
    if not isinstance(d, dict) or sorted(k for k in d if isinstance(k, int)) != list(range(7)) or len(d) != 7:
        raise RemoteProtocolError("checkpoint payload must be a map of keys 0..6", "schema")
    if d[0] != FORMAT:
        raise RemoteProtocolError("checkpoint format %r is not %d" % (d[0], FORMAT), "version")
    epoch, index, salt, wrapped, seqs, digests = d[1], d[2], d[3], d[4], d[5], d[6]
    if not (isinstance(epoch, int) and 0 <= epoch <= messages.MAX_EPOCH and isinstance(index, int)
            and 0 <= index <= messages.MAX_UPLINK_INT):
        raise RemoteProtocolError("checkpoint epoch or index out of range", "range")
    if not (isinstance(salt, bytes) and len(salt) == cipher.BOOT_SALT_SIZE and isinstance(wrapped, bytes)
            and len(wrapped) == KEY_SIZE):
        raise RemoteProtocolError("checkpoint boot salt or wrapped key of the wrong size", "schema")
    if not (isinstance(seqs, list) and 0 < len(seqs) <= MAX_ENTRIES and isinstance(digests, bytes)
            and len(digests) == DIGEST_SIZE * len(seqs)):
        raise RemoteProtocolError("checkpoint lists must be 1..%d seqs and as many digests" % MAX_ENTRIES, "schema")
    entries: "dict[int, bytes]" = {}
    last = -1
    for i, s in enumerate(seqs):
        if not isinstance(s, int) or not last < s <= messages.MAX_SEQ:
            raise RemoteProtocolError("checkpoint seqs must rise strictly", "schema")
        last = s
        entries[s] = digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
    device_id = str(kid, "ascii", "replace")
    return Checkpoint(device_id, epoch, index, salt, xor32(wrapped, key_pad(origin_key, salt)), entries)


def boot_cipher(boot_key: bytes, boot_salt: bytes) -> "cipher.SampleCipher":
    # A cipher that opens one boot's frames with its sample key alone.
    return cipher.SampleCipher.for_boot_key(boot_key, boot_salt)


# ---- the verifier (a backend's side) -------------------------------------

# What the verifier says about each sample frame it was given.
PROVEN = "proven"  # a checkpoint lists it with this very digest (and its samples match, if given)
ALTERED = "altered"  # a checkpoint lists its (boot, seq) with another digest, or the samples differ
UNPROVEN = "unproven"  # no checkpoint lists it, though later frames of its boot are: inserted (or its checkpoint lost)
PENDING = "pending"  # after the last checkpoint received for its boot: not provable yet
MALFORMED = "malformed"  # not a sample frame or checkpoint we can read


class FrameResult:
    def __init__(self, device_id: str, epoch: int, seq: int, verdict: str, why: str = "") -> None:
        self.device_id = device_id
        self.epoch = epoch
        self.seq = seq
        self.verdict = verdict
        self.why = why

    def as_dict(self) -> "dict[str, object]":
        return {"device_id": self.device_id, "epoch": self.epoch, "seq": self.seq, "verdict": self.verdict,
                "why": self.why}


class _Frame:
    def __init__(self, device_id: str, epoch: int, seq: int, salt: bytes, digest: bytes, payload: bytes,
                 claimed: "list[list[int]] | None", where: str) -> None:
        self.device_id = device_id
        self.epoch = epoch
        self.seq = seq
        self.salt = salt
        self.digest = digest
        self.payload = payload
        self.claimed = claimed
        self.where = where


class Verifier:
    # Feed it what a backend received, in any order (add): the raw COSE of
    # sample frames (with, optionally, the decoded samples a document gave
    # for them) and of origin checkpoints; then report(). keys: device id ->
    # origin key. Frames of a device with no key are reported unproven.
    def __init__(self, keys: "dict[str, bytes]") -> None:
        self.keys = dict(keys)
        self._frames: "dict[tuple[str, bytes, int], _Frame]" = {}
        self._ckpts: "dict[tuple[str, bytes], dict[int, Checkpoint]]" = {}
        self.problems: "list[str]" = []  # inputs that could not be read or did not verify

    def add(self, raw: "bytes | bytearray", claimed: "list[list[int]] | None" = None, where: str = "") -> None:
        # raw: one uplink COSE_Mac0 as the board sent it. claimed: the
        # decoded samples per channel that a document says the frame holds.
        try:
            msg = cose.parse(raw)
            m = messages.decode_payload(msg.payload, messages.UPLINK_TYPES, decode_samples=False)
        except ProtocolError as e:
            self.problems.append("%s: not a pulsebridge message (%s)" % (where or "input", e))
            return
        device_id = str(msg.kid, "ascii", "replace")
        if isinstance(m, messages.OriginCheckpoint):
            key = self.keys.get(device_id)
            if key is None:
                self.problems.append("%s: checkpoint of %s, whose origin key was not given" % (where, device_id))
                return
            try:
                c = open_checkpoint(m.checkpoint, key)
            except AuthenticationError:
                self.problems.append("%s: checkpoint seq %d of %s does not verify under its origin key (forged)"
                                     % (where, m.seq, device_id))
                return
            except ProtocolError as e:
                self.problems.append("%s: checkpoint seq %d of %s malformed (%s)" % (where, m.seq, device_id, e))
                return
            if c.device_id != device_id:
                self.problems.append("%s: checkpoint of %s inside a message of %s" % (where, c.device_id, device_id))
                return
            self._ckpts.setdefault((device_id, c.boot_salt), {})[c.index] = c
            return
        if not isinstance(m, messages.SampleFrame) or m.boot_salt is None:
            return  # hello, status...: not covered by the proof
        self._frames[(device_id, m.boot_salt, m.seq)] = _Frame(
            device_id, m.epoch, m.seq, m.boot_salt, frame_digest(msg.payload), bytes(msg.payload), claimed, where)

    def report(self) -> "Report":
        rep = Report()
        rep.problems = list(self.problems)
        covered: "dict[tuple[str, bytes], tuple[dict[int, tuple[bytes, Checkpoint]], int]]" = {}
        for (dev, salt), by_index in self._ckpts.items():
            entries: "dict[int, tuple[bytes, Checkpoint]]" = {}
            for c in by_index.values():
                for s, dg in c.entries.items():
                    entries[s] = (dg, c)
            top = max(by_index)
            for i in range(top):
                if i not in by_index:
                    any_c = by_index[top]
                    rep.missing_checkpoints.append((dev, any_c.epoch, i))
            covered[(dev, salt)] = (entries, max(entries))
        for f in sorted(self._frames.values(), key=lambda f: (f.device_id, f.epoch, f.seq)):
            got = covered.get((f.device_id, f.salt))
            if f.device_id not in self.keys:
                rep.frames.append(FrameResult(f.device_id, f.epoch, f.seq, UNPROVEN, "no origin key for this device"))
                continue
            if got is None or f.seq > got[1]:
                rep.frames.append(FrameResult(f.device_id, f.epoch, f.seq, PENDING,
                                              "after the last checkpoint received for its boot"))
                continue
            entry = got[0].get(f.seq)
            if entry is None:
                why = "listed by no checkpoint of its boot: inserted"
                if any(d == f.device_id for d, _e, _i in rep.missing_checkpoints):
                    why += ", or listed by a checkpoint that is missing"
                rep.frames.append(FrameResult(f.device_id, f.epoch, f.seq, UNPROVEN, why))
                continue
            digest, c = entry
            if not equal_ct(digest, f.digest) or c.epoch != f.epoch:
                rep.frames.append(FrameResult(f.device_id, f.epoch, f.seq, ALTERED,
                                              "its bytes are not those the board's checkpoint lists"))
                continue
            if f.claimed is not None:
                why = _samples_differ(f, c)
                if why:
                    rep.frames.append(FrameResult(f.device_id, f.epoch, f.seq, ALTERED, why))
                    continue
            rep.frames.append(FrameResult(f.device_id, f.epoch, f.seq, PROVEN))
        for (dev, salt), (entries, _top) in covered.items():
            for s, (_dg, c) in sorted(entries.items()):
                if (dev, salt, s) not in self._frames:
                    rep.missing.append((dev, c.epoch, s))
        return rep


def _samples_differ(f: _Frame, c: Checkpoint) -> str:
    # Decrypts the frame's samples with the boot key the checkpoint carries
    # and compares them with what the document claimed; "" if they agree.
    m = messages.decode_payload(f.payload, (messages.T_SAMPLES,), decode_samples=True,
                                opener=boot_cipher(c.boot_key, c.boot_salt))
    assert isinstance(m, messages.SampleFrame)
    claimed = f.claimed or []
    if len(claimed) != len(m.channels):
        return "the document has %d channels, the board's frame %d" % (len(claimed), len(m.channels))
    for k, (a, b) in enumerate(zip(claimed, m.channels)):
        if list(a) != list(b):
            first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            return "channel %d differs from the board's samples from sample %d on" % (k, first)
    return ""


def _ranges(seqs: "list[int]") -> "list[tuple[int, int]]":
    out: "list[tuple[int, int]]" = []
    for s in sorted(seqs):
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


class Report:
    # frames: one FrameResult per sample frame given; missing: (device,
    # epoch, seq) a checkpoint lists but no frame was given for; missing
    # checkpoints: (device, epoch, index) below the newest one received.
    def __init__(self) -> None:
        self.frames: "list[FrameResult]" = []
        self.missing: "list[tuple[str, int, int]]" = []
        self.missing_checkpoints: "list[tuple[str, int, int]]" = []
        self.problems: "list[str]" = []

    def count(self, verdict: str) -> int:
        return sum(1 for f in self.frames if f.verdict == verdict)

    @property
    def ok(self) -> bool:
        # Every frame proven or pending, none missing, no checkpoint missing or forged.
        return (not self.missing and not self.missing_checkpoints and not self.problems
                and all(f.verdict in (PROVEN, PENDING) for f in self.frames))

    def gaps(self) -> "list[dict[str, object]]":
        # The missing frames as ranges of seq per device and epoch.
        by: "dict[tuple[str, int], list[int]]" = {}
        for dev, epoch, seq in self.missing:
            by.setdefault((dev, epoch), []).append(seq)
        return [{"device_id": dev, "epoch": epoch, "seq_ranges": [list(r) for r in _ranges(seqs)]}
                for (dev, epoch), seqs in sorted(by.items())]

    def as_dict(self) -> "dict[str, object]":
        return {
            "ok": self.ok,
            "frames": len(self.frames),
            "proven": self.count(PROVEN),
            "pending": self.count(PENDING),
            "altered": [f.as_dict() for f in self.frames if f.verdict == ALTERED],
            "unproven": [f.as_dict() for f in self.frames if f.verdict == UNPROVEN],
            "missing": self.gaps(),
            "missing_checkpoints": [{"device_id": d, "epoch": e, "index": i} for d, e, i in self.missing_checkpoints],
            "problems": self.problems,
        }
