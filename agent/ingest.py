"""From a board's bytes to a stored frame and an ack.

Processor is what a board session hands each uplink message to. Two exist:
Ingestor (the agent's: nothing is acknowledged before it is committed to the
store, replay window included) and Volatile (for the bare simulator: verify
and acknowledge, store nothing).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

from agent import fastdecode
from agent.record import FrameRecord, Samples, pack_steps
from agent.registry import Device, Registry
from agent.store import (
    KIND_FRAME,
    KIND_ORIGIN,
    MAX_BATCH,
    PRIORITY_GAP,
    QUARANTINED,
    Ingest,
    Store,
    Window,
)
from protocols import hub, messages, replay
from protocols.errors import RemoteProtocolError

log = logging.getLogger(__name__)

ToUtc = Callable[[int], "float | None"]

# Rejects logged per minute at most (all are counted): a flood of forged
# frames must not flood the log, nor the disk.
REJECT_LOG_PER_MIN = 10


@dataclass
class Outcome:
    """A message judged. replies go back at once (an epoch resync); once `stored` is
    done (None: at once), the frame ack_for names (device, epoch, seq) is acknowledged:
    a session seals one ack for a run of such frames (Hub.ack), `acks` one for this one.
    `stored` is shared by the messages staged in one turn of the event loop (one store
    job): done once all are committed and their replay windows moved."""

    received: hub.Received
    replies: list[bytes]
    stored: asyncio.Future[Any] | None = None
    ack_for: tuple[str, int, int] | None = None
    acker: hub.Hub | None = None
    # Not judged yet: the store must be read first (off the event loop). The
    # session awaits it before its next message and takes its outcome instead.
    judging: asyncio.Future[Outcome] | None = None
    # An authentic frame not taken (submit's hold_frames): nothing staged, nothing to send; the
    # board keeps it, unacknowledged, and sends it again.
    held: bool = False

    @property
    def acks(self) -> list[bytes]:
        """What this outcome alone sends back: its replies, and the sealed ack of its frame."""
        if self.ack_for is None or self.acker is None:
            return self.replies
        dev, epoch, seq = self.ack_for
        return self.replies + self.acker.ack(dev, epoch, [seq])


# Called once a staged message's batch is settled: (the error that failed it, or
# None; its result: None, or QUARANTINED).
_OnStored = Callable[["BaseException | None", Any], None]
# What _settle does for a staged message: nothing (None), call back, or, for a new sample
# frame, move its window and hand its record on (_on_stored): a tuple, not a closure, 4 fewer
# objects a frame for the garbage collector.
_Settle: TypeAlias = "_OnStored | tuple[FrameRecord, bytes | None] | None"


class _Group:
    """The messages staged in one turn of the event loop: one store job, one future
    (done once all are committed and their replay windows moved)."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future
        self.items: list[Ingest] = []
        self.on_stored: list[_Settle] = []


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a session gone meanwhile awaits it no more: no "never retrieved" noise


@dataclass(frozen=True)
class DevicesRead:
    """The registry's devices and the store's committed replay windows (by device), as read."""

    devices: list[Device]
    windows: dict[str, Window]


class Processor(abc.ABC):
    hub: hub.Hub

    @abc.abstractmethod
    def submit(self, raw: bytes, link: str, to_utc: ToUtc | None = None, hold_frames: bool = False) -> Outcome:
        """Judges a message now, in arrival order (the replay window needs it);
        storing it may finish later. to_utc maps the board's ticks to UTC ms.
        hold_frames: the session can take no more frames now (a store fault
        filled its pipeline): an authentic frame or checkpoint is verified,
        and neither staged nor acknowledged (Outcome.held)."""

    def registered_unique_id(self, device_id: str) -> bytes:
        """The chip id recorded for the device at provisioning; b"" if none is known."""
        return b""

    def store_fault(self) -> bool:
        """True while what is submitted cannot be stored (a full card): nothing is acknowledged, and
        a link that delivers authentic messages is all the progress there can be."""
        return False


class _RateLimitedLog:
    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self.window_start = 0.0
        self.count = 0
        self.suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.window_start >= 60:
            if self.suppressed:
                log.warning("%d more rejected messages not logged", self.suppressed)
            self.window_start, self.count, self.suppressed = now, 0, 0
        if self.count < self.per_min:
            self.count += 1
            log.warning(msg, *args)
        else:
            self.suppressed += 1


class Volatile(Processor):
    def __init__(self, hub_: hub.Hub) -> None:
        self.hub = hub_

    def submit(self, raw: bytes, link: str, to_utc: ToUtc | None = None, hold_frames: bool = False) -> Outcome:
        r = self.hub.receive(raw)
        if r.verdict != hub.REJECTED and isinstance(r.message, (messages.SampleFrame, messages.OriginCheckpoint)):
            return Outcome(r, [], None, (r.device_id or "", r.message.epoch, r.message.seq), self.hub)
        # A stale boot epoch: the epoch resync (SPEC.md).
        return Outcome(r, [r.reply] if r.reply is not None else [])


class Ingestor(Processor):
    """The agent's processor: each verified sample frame is decoded once into a
    FrameRecord, stored, and only then committed to its device's replay window
    and acknowledged (protocols/hub.py); on_stored hands the record on."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        # One decoder: the strict one of protocols/ (SPEC.md's deterministic
        # encoding, bounded fields), a board's frame read in one pass with cbor2
        # when it is in the form boards write (fastdecode.mac0, payload). Samples are
        # decrypted there and decoded here by the numpy decoder. Both refuse
        # exactly what their reference refuses: what is acknowledged, every
        # forwarder can forward.
        self.hub = hub.Hub(decode_samples=False, decode_payload=fastdecode.payload, parse=fastdecode.mac0)
        self.revoked: set[str] = set()
        self.unique_ids: dict[str, bytes] = {}  # the registry's chip ids (provisioning read them)
        self.rejects: Counter[str] = Counter()
        self._log = _RateLimitedLog(REJECT_LOG_PER_MIN)
        # Called with each new frame's record once it is stored.
        self.on_stored: Callable[[FrameRecord], None] | None = None
        self._group: _Group | None = None
        self.reload_devices()
        self.upgraded = upgrade_legacy(store)

    def reload_devices(self) -> list[str]:
        """read_devices() then apply_devices(), blocking: for the start, before the event loop
        runs (on it, the registry watcher reads off the loop and applies on it)."""
        return self.apply_devices(self.read_devices())

    def read_devices(self) -> DevicesRead:
        """What apply_devices() needs, read from the registry and the store (SQLite, blocking;
        connections of their own: callable from any thread, e.g. via asyncio.to_thread)."""
        return DevicesRead(self.registry.read_all(), self.store.load_windows())

    def apply_devices(self, read: DevicesRead) -> list[str]:
        """Registry changes (a new board, a revocation, an erasure) take effect at once (no I/O:
        on the event loop). A window read is applied only to a board new to the hub, which has
        nothing in flight, so no commit made after the read is lost. Returns the devices no
        longer in the registry at all (erased), now refused."""
        windows = read.windows
        seen = set()
        self.unique_ids = {dev.device_id: dev.unique_id for dev in read.devices if dev.unique_id}
        for dev in read.devices:
            seen.add(dev.device_id)
            if dev.state == "active":
                if not self.hub.has_device(dev.device_id):
                    self.hub.add_device(dev.device_id, dev.key, dev.next_key)
                    if dev.device_id in windows:
                        self.hub.set_window(dev.device_id, *windows[dev.device_id])
                else:  # a key rotation began or ended
                    self.hub.set_keys(dev.device_id, dev.key, dev.next_key)
                self.revoked.discard(dev.device_id)
            else:
                self.hub.remove_device(dev.device_id)
                self.revoked.add(dev.device_id)
        for dev_id in list(self.revoked):
            if dev_id not in seen:
                self.revoked.discard(dev_id)
        # Erased (pulsebridge erase removes its entry): its frames were still
        # verified, stored and forwarded, the erasure undone within a second.
        erased = [d for d in self.hub.device_ids() if d not in seen]
        for dev_id in erased:
            self.hub.remove_device(dev_id)
        return erased

    def registered_unique_id(self, device_id: str) -> bytes:
        return self.unique_ids.get(device_id, b"")

    def store_fault(self) -> bool:
        return self.store.fault is not None

    def _reject(self, r: hub.Received, link: str) -> Outcome:
        reason = r.reason
        if r.device_id in self.revoked and reason == "unknown_device":
            reason = "revoked"
            r.reason = reason
        self.rejects[reason] += 1
        self._log("rejected message from %s on %s: %s", r.device_id or "?", link, reason)
        self.store.submit_reject(reason, link, r.device_id, r.raw)  # counted and quarantined; nobody waits
        # A stale boot epoch (old_epoch, epoch_rollback): the epoch resync
        # goes back at once, so the board moves its epoch on (SPEC.md).
        return Outcome(r, [r.reply] if r.reply is not None else [])

    def submit(self, raw: bytes, link: str, to_utc: ToUtc | None = None, hold_frames: bool = False) -> Outcome:
        r = self.hub.receive(raw, commit=False)  # the window moves once the frame is stored
        m = r.message
        if hold_frames and isinstance(m, (messages.SampleFrame, messages.OriginCheckpoint)) and (
                r.verdict != hub.REJECTED or r.reason == "replay:" + replay.TOO_OLD):
            # Authentic (new, in flight, or below the window): the board keeps it and sends it again.
            return Outcome(r, [], held=True)
        if r.verdict == hub.REJECTED and r.reason == "replay:" + replay.TOO_OLD and r.device_id \
                and isinstance(m, messages.SampleFrame):
            # Below the window: a retransmission of a frame we hold is a duplicate. Which
            # the store says, read on a thread: a slow card must not stall every board.
            return Outcome(r, [], judging=asyncio.ensure_future(self._below_window(r, m, raw, link)))
        return self._judged(r, m, raw, link, to_utc)

    async def _below_window(self, r: hub.Received, m: messages.SampleFrame, raw: bytes, link: str) -> Outcome:
        # The very frame: a resend is the same bytes; other bytes under that (epoch, seq)
        # come from another boot (SPEC.md, Replay protection).
        dev = r.device_id or ""
        try:
            held = await asyncio.to_thread(self.store.held_raw, dev, m.epoch, m.seq)
        except sqlite3.Error as e:  # unreadable now: refused as too old (the board resends it)
            log.warning("store: cannot look up %s:%d:%d below its window (%s)", dev, m.epoch, m.seq, e)
            held = None
        if held is not None and (held == b"" or held == raw):
            r = hub.Received(hub.DUPLICATE, dev, m, raw)
        return self._judged(r, m, raw, link, None)

    def _judged(self, r: hub.Received, m: messages.Message | None, raw: bytes, link: str,
                to_utc: ToUtc | None) -> Outcome:
        if r.verdict == hub.REJECTED:
            return self._reject(r, link)
        dev = r.device_id or ""
        if isinstance(m, messages.OriginCheckpoint):
            return self._checkpoint(r, m, dev, raw)
        if not isinstance(m, messages.SampleFrame):
            if r.verdict == hub.ACCEPTED and m is not None:  # hello, status, time: session state, not stored
                self.hub.accept(dev, m.epoch, m.seq)  # type: ignore[attr-defined]
                self.hub.commit(dev, m.epoch, m.seq)  # type: ignore[attr-defined]
            return Outcome(r, [])
        if r.verdict == hub.DUPLICATE:  # stored (or on its way): acknowledged again once its batch is
            item = Ingest(dev, m.epoch, m.seq, KIND_FRAME, raw, None, duplicate=True)
            return Outcome(r, [], self._stage(item), (dev, m.epoch, m.seq), self.hub)
        try:
            f = record_of(dev, m, cast("list[bytes]", m.channels), raw, to_utc)  # decrypted, not decoded
        except RemoteProtocolError as e:
            return self._reject(hub.Received(hub.REJECTED, dev, None, raw, "malformed:" + e.reason), link)
        item = Ingest.frame(f, self.hub.accept(dev, m.epoch, m.seq, m.boot_salt))
        salt = m.boot_salt
        stored = self._stage(item, (f, salt))
        return Outcome(r, [], stored, (dev, m.epoch, m.seq), self.hub)

    def _stage(self, item: Ingest, on_stored: _Settle = None) -> asyncio.Future[Any]:
        # The message joins this turn's group (flushed to the store at the end of
        # the turn, or once MAX_BATCH): one store job and one future for them all.
        g = self._group
        if g is None:
            loop = asyncio.get_running_loop()
            g = self._group = _Group(loop.create_future())
            g.future.add_done_callback(_retrieved)
            loop.call_soon(self._flush)
        g.items.append(item)
        g.on_stored.append(on_stored)
        if len(g.items) >= MAX_BATCH:
            self._flush()
        return g.future

    def _flush(self) -> None:
        g, self._group = self._group, None
        if g is not None:
            self.store.submit_ingests(g.items).add_done_callback(lambda fut: self._settle(g, fut))

    def _settle(self, g: _Group, fut: asyncio.Future[list[Any]]) -> None:
        # The group's batch is committed (or failed): each message's window moves
        # (or is abandoned), then the group's future is done: its acks may go.
        if fut.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = fut.exception()
        results = fut.result() if exc is None else [None] * len(g.items)
        for on_stored, result in zip(g.on_stored, results):
            if isinstance(on_stored, tuple):
                self._on_stored(exc, result, *on_stored)
            elif on_stored is not None:
                on_stored(exc, result)
        if g.future.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            g.future.cancel()
        elif exc is not None:
            g.future.set_exception(exc)
        else:
            g.future.set_result(results)

    def _checkpoint(self, r: hub.Received, m: messages.OriginCheckpoint, dev: str, raw: bytes) -> Outcome:
        # A board's origin checkpoint: stored as it came and forwarded
        # untouched (its content is MACed under a key the hub does not hold:
        # protocols/origin.py), acknowledged like a frame once stored; above
        # raw frames under the disk quota.
        ack_for = (dev, m.epoch, m.seq)
        if r.verdict == hub.DUPLICATE:
            item = Ingest(dev, m.epoch, m.seq, KIND_ORIGIN, raw, None, duplicate=True)
            return Outcome(r, [], self._stage(item), ack_for, self.hub)
        item = Ingest(dev, m.epoch, m.seq, KIND_ORIGIN, raw, self.hub.accept(dev, m.epoch, m.seq),
                      priority=PRIORITY_GAP)

        def done(exc: BaseException | None, result: Any) -> None:
            if exc is not None:
                self.hub.abandon(dev)
            elif self.hub.has_device(dev):
                self.hub.commit(dev, m.epoch, m.seq)

        return Outcome(r, [], self._stage(item, done), ack_for, self.hub)

    def _on_stored(self, exc: BaseException | None, result: Any, f: FrameRecord, salt: bytes | None) -> None:
        if exc is not None:
            self.hub.abandon(f.device_id)  # not stored: only what is committed counts
            return
        if not self.hub.has_device(f.device_id):
            return  # revoked or erased meanwhile
        self.hub.commit(f.device_id, f.epoch, f.seq, salt)  # stored (or quarantined whole): the window moves
        if result == QUARANTINED:
            self.rejects["store_refused"] += 1
        elif self.on_stored is not None:
            self.on_stored(f)


def record_of(device_id: str, m: messages.SampleFrame, sample_bytes: list[bytes], raw: bytes,
              to_utc: ToUtc | None) -> FrameRecord:
    """The record of a verified sample frame (its header read, its samples
    still encoded: sample_bytes, one string per channel, decrypted); raises
    RemoteProtocolError for samples that do not decode (as the reference
    decoder would)."""
    t0_utc = to_utc(m.t0_ms) if to_utc is not None else None
    if t0_utc is not None and not 0 <= t0_utc <= messages.MAX_UPLINK_INT:
        t0_utc = None  # a clock map gone wild is not a time: placed by arrival instead
    count = m.count
    # Every channel's steps of one or two bytes each on the wire (most frames): stored as read,
    # the samples summed from them when the record's channels are first read (the vitals
    # engine, a forwarder); else (or no samples) each channel decoded in full now.
    steps = [fastdecode.short_steps(ch, count) for ch in sample_bytes] if count else []
    packed: tuple[int, bytes] | None = None
    channels: tuple[Samples, ...] | None = None
    if steps and None not in steps:
        packed = pack_steps(cast("list[tuple[int, int, bytes]]", steps))
    else:
        channels = tuple(fastdecode.decode(ch, count) for ch in sample_bytes)
    flags, fifo_lost, dropped, jitter_us = m.status
    return FrameRecord(device_id, m.epoch, m.seq, m.stream, m.rate_hz, m.t0_ms, m.first_index, m.count,
                       m.scale[0], m.scale[1], m.ppg_drive, flags, fifo_lost, dropped, jitter_us, channels,
                       None if t0_utc is None else int(t0_utc), time.time(), raw, packed)


# Legacy frames decoded at a time when a store of schema 2 is upgraded.
_UPGRADE_CHUNK = 500


def upgrade_legacy(store: Store) -> int:
    """Decodes the sample frames a store of schema 2 kept undecoded (the COSE
    bytes and the decrypted, still encoded samples), once, at start, so that
    every consumer reads records. Returns how many; a frame that does not
    decode is left as it is (its forwarders count it undeliverable)."""
    from protocols import cbor, cose

    if store.read_only is not None:  # nothing can be written: a start that can is the one to decode them
        log.warning("store upgrade: frames stored before schema 3, if any are left, are decoded at a start "
                    "that can write the store (%s)", store.read_only)
        return 0
    done, after = 0, 0
    while True:
        legacy = store.legacy_frames(after, _UPGRADE_CHUNK)
        if not legacy:
            break
        decoded: list[tuple[int, FrameRecord]] = []
        for fid, raw, plain in legacy:
            after = fid
            try:
                msg = cose.parse(raw)
                m = messages.decode_payload(msg.payload, messages.UPLINK_TYPES, decode_samples=False,
                                            versions=messages.STORED_VERSIONS)
                chans = cbor.decode(plain) if plain is not None else None
                if not isinstance(m, messages.SampleFrame) or not isinstance(chans, list):
                    continue
                f = record_of(str(msg.kid, "ascii", "replace"), m, [bytes(ch) for ch in chans], raw, None)
            except Exception as e:  # anything at all: this frame stays as it was
                log.warning("store upgrade: frame %d cannot be decoded (%s); left as it was", fid, e)
                continue
            decoded.append((fid, f))
        store.set_decoded(decoded)
        done += len(decoded)
    if done:
        log.info("store upgrade: %d frames stored before schema 3 decoded once", done)
    return done
