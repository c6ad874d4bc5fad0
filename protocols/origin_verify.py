# Origin proof, the backend's side (SPEC.md, "Origin proof"): what a
# backend received (frames' raw COSE, the decoded samples a document claims,
# origin checkpoints) checked with the origin keys alone. Apart from
# protocols/origin.py so that a board never loads it.

import hashlib

from protocols import cbor, cipher, cose, fields, messages
from protocols._compat import equal_ct
from protocols.errors import AuthenticationError, ProtocolError, RemoteProtocolError
from protocols.origin import AAD_ORIGIN, DIGEST_SIZE, FORMAT, KEY_SIZE, MAX_ENTRIES, key_pad, xor32


def frame_digest(payload: "bytes | bytearray | memoryview") -> bytes:
    # The digest a checkpoint lists for a sample frame: its COSE payload's
    # SHA-256, first DIGEST_SIZE bytes.
    return hashlib.sha256(bytes(payload)).digest()[:DIGEST_SIZE]



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
    if not (isinstance(epoch, int) and 0 <= epoch <= fields.MAX_EPOCH and isinstance(index, int)
            and 0 <= index <= fields.MAX_UPLINK_INT):
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
        if not isinstance(s, int) or not last < s <= fields.MAX_SEQ:
            raise RemoteProtocolError("checkpoint seqs must rise strictly", "schema")
        last = s
        entries[s] = digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
    device_id = str(kid, "ascii", "replace")
    return Checkpoint(device_id, epoch, index, salt, xor32(wrapped, key_pad(origin_key, salt)), entries)


def boot_cipher(boot_key: bytes, boot_salt: bytes) -> "cipher.SampleCipher":
    # A cipher that opens one boot's frames with its sample key alone.
    return cipher.SampleCipher.for_boot_key(boot_key, boot_salt)


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
                 claimed: "list[list[int]] | None", where: str, t0_ms: int = 0, end_ms: int = 0) -> None:
        self.t0_ms = t0_ms  # board clock (ms since boot): its first sample
        self.end_ms = end_ms  # and the end of its window
        self.device_id = device_id
        self.epoch = epoch
        self.seq = seq
        self.salt = salt
        self.digest = digest
        self.payload = payload
        self.claimed = claimed
        self.where = where


MAX_PROBLEMS = 1000  # problems listed in a report; more are counted (problems_not_listed)

# What a report says as a whole (Report.status).
VERIFIED = "verified"  # every frame given proven (or pending), nothing missing, no input cut short
NOT_PROVEN = "not proven"  # a frame altered or unproven, a frame or checkpoint missing, an input unreadable
TRUNCATED = "truncated"  # all that was complete holds, but an input ends inside a record: its tail unchecked


class Truncated:
    # An input whose last record is cut short (a recorder killed mid-write,
    # a copy cut off): every complete record before at_byte was checked; the
    # bytes_not_checked from at_byte on were not. records_checked: complete
    # records read before it; reason: why the tail is not a whole record.
    def __init__(self, where: str, at_byte: int, bytes_not_checked: int, records_checked: int, reason: str) -> None:
        self.where = where
        self.at_byte = at_byte
        self.bytes_not_checked = bytes_not_checked
        self.records_checked = records_checked
        self.reason = reason

    def as_dict(self) -> "dict[str, object]":
        return {"input": self.where, "at_byte": self.at_byte, "bytes_not_checked": self.bytes_not_checked,
                "records_checked": self.records_checked, "reason": self.reason}


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
        self.problems_not_listed = 0  # past MAX_PROBLEMS: counted, not kept (a file of junk stays bounded)
        self.truncated: "list[Truncated]" = []

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.problems_not_listed += 1

    def add_truncated(self, t: Truncated) -> None:
        # An input's incomplete last record (its complete ones were add()ed).
        self.truncated.append(t)

    def add(self, raw: "bytes | bytearray", claimed: "list[list[int]] | None" = None, where: str = "") -> None:
        # raw: one uplink COSE_Mac0 as the board sent it. claimed: the
        # decoded samples per channel that a document says the frame holds.
        try:
            msg = cose.parse(raw)
            m = messages.decode_payload(msg.payload, messages.UPLINK_TYPES, decode_samples=False)
        except ProtocolError as e:
            self._problem("%s: not a pulsebridge message (%s)" % (where or "input", e))
            return
        device_id = str(msg.kid, "ascii", "replace")
        if isinstance(m, messages.OriginCheckpoint):
            key = self.keys.get(device_id)
            if key is None:
                self._problem("%s: checkpoint of %s, whose origin key was not given" % (where, device_id))
                return
            try:
                c = open_checkpoint(m.checkpoint, key)
            except AuthenticationError:
                self._problem("%s: checkpoint seq %d of %s does not verify under the origin key given: forged, or "
                              "that key is not this board's origin key (the hub's keys are not)"
                              % (where, m.seq, device_id))
                return
            except ProtocolError as e:
                self._problem("%s: checkpoint seq %d of %s malformed (%s)" % (where, m.seq, device_id, e))
                return
            if c.device_id != device_id:
                self._problem("%s: checkpoint of %s inside a message of %s" % (where, c.device_id, device_id))
                return
            self._ckpts.setdefault((device_id, c.boot_salt), {})[c.index] = c
            return
        if not isinstance(m, messages.SampleFrame) or m.boot_salt is None:
            return  # hello, status...: not covered by the proof
        end_ms = m.t0_ms + (m.count * 1000 // m.rate_hz if m.rate_hz else 0)
        self._frames[(device_id, m.boot_salt, m.seq)] = _Frame(
            device_id, m.epoch, m.seq, m.boot_salt, frame_digest(msg.payload), bytes(msg.payload), claimed, where,
            m.t0_ms, end_ms)

    def report(self) -> "Report":
        rep = Report()
        rep.problems = list(self.problems)
        rep.problems_not_listed = self.problems_not_listed
        rep.truncated = list(self.truncated)
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
        for f in self._frames.values():
            rep.received_times.setdefault((f.device_id, f.epoch), {})[f.seq] = (f.t0_ms, f.end_ms)
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


def _bisect(xs: "list[int]", x: int) -> int:
    # The index of the first item of sorted xs above or at x (bisect_left; MicroPython has no bisect).
    lo, hi = 0, len(xs)
    while lo < hi:
        mid = (lo + hi) // 2
        if xs[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _near(seq: int, times: "dict[int, tuple[int, int]]") -> "dict[str, int]":
    t0, end = times[seq]
    return {"seq": seq, "board_t0_ms": t0, "board_end_ms": end}


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
        self.problems_not_listed = 0  # problems past the first MAX_PROBLEMS, counted only
        self.truncated: "list[Truncated]" = []  # inputs whose last record was cut short
        # (device, epoch) -> seq -> (board t0 ms, board end ms) of each sample frame given
        self.received_times: "dict[tuple[str, int], dict[int, tuple[int, int]]]" = {}

    def count(self, verdict: str) -> int:
        return sum(1 for f in self.frames if f.verdict == verdict)

    @property
    def complete_part_holds(self) -> bool:
        # Every frame given proven or pending, none missing, no checkpoint missing or forged.
        return (not self.missing and not self.missing_checkpoints and not self.problems
                and not self.problems_not_listed
                and all(f.verdict in (PROVEN, PENDING) for f in self.frames))

    @property
    def ok(self) -> bool:
        # All holds and no input was cut short.
        return self.complete_part_holds and not self.truncated

    @property
    def status(self) -> str:
        # VERIFIED, NOT_PROVEN (whatever was cut short too), or TRUNCATED.
        if not self.complete_part_holds:
            return NOT_PROVEN
        return TRUNCATED if self.truncated else VERIFIED

    def gaps(self) -> "list[dict[str, object]]":
        # The missing frames as ranges of seq per device and epoch, each with
        # the frames received around it (spans: seqs [first, last], after and
        # before: {"seq", "board_t0_ms", "board_end_ms"} of the nearest frame
        # received on either side, None if there is none; span_ms: board time
        # from the end of the one after which to the start of the one before
        # which it lies, None without both: for one stream, the missing frames'
        # own duration).
        by: "dict[tuple[str, int], list[int]]" = {}
        for dev, epoch, seq in self.missing:
            by.setdefault((dev, epoch), []).append(seq)
        out: "list[dict[str, object]]" = []
        for (dev, epoch), seqs in sorted(by.items()):
            times = self.received_times.get((dev, epoch), {})
            got = sorted(times)
            spans: "list[dict[str, object]]" = []
            for a, b in _ranges(seqs):
                i = _bisect(got, a)
                after = _near(got[i - 1], times) if i > 0 else None
                before = _near(got[i], times) if i < len(got) else None
                span = (before["board_t0_ms"] - after["board_end_ms"]
                        if after is not None and before is not None else None)
                spans.append({"seqs": [a, b], "after": after, "before": before, "span_ms": span})
            out.append({"device_id": dev, "epoch": epoch, "seq_ranges": [list(r) for r in _ranges(seqs)],
                        "spans": spans})
        return out

    def as_dict(self) -> "dict[str, object]":
        return {
            "ok": self.ok,
            "status": self.status,
            "frames": len(self.frames),
            "proven": self.count(PROVEN),
            "pending": self.count(PENDING),
            "altered": [f.as_dict() for f in self.frames if f.verdict == ALTERED],
            "unproven": [f.as_dict() for f in self.frames if f.verdict == UNPROVEN],
            "missing": self.gaps(),
            "missing_checkpoints": [{"device_id": d, "epoch": e, "index": i} for d, e, i in self.missing_checkpoints],
            "problems": self.problems,
            "problems_not_listed": self.problems_not_listed,
            "truncated": [t.as_dict() for t in self.truncated],
        }
