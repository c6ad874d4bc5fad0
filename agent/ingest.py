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
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import fastdecode
from agent.registry import Registry
from agent.store import QUARANTINED, Ingest, Store, StoreError
from protocols import cbor, hub, messages, replay
from protocols.errors import RemoteProtocolError

log = logging.getLogger(__name__)

ToUtc = Callable[[int], "float | None"]

# A frame's decrypted samples as stored (a CBOR array of byte strings): the
# payload bound of SPEC.md plus a few bytes of array and string heads.
PLAIN_BYTES = 4224
# Rejects logged per minute at most (all are counted): a flood of forged
# frames must not flood the log, nor the disk.
REJECT_LOG_PER_MIN = 10


@dataclass
class Outcome:
    """A message judged; its acks may go out once `stored` is done (None: at once)."""

    received: hub.Received
    acks: list[bytes]
    stored: asyncio.Future[Any] | None = None


class Processor(abc.ABC):
    hub: hub.Hub

    @abc.abstractmethod
    def submit(self, raw: bytes, link: str, to_utc: ToUtc | None = None) -> Outcome:
        """Judges a message now, in arrival order (the replay window needs it);
        storing it may finish later. to_utc maps the board's ticks to UTC ms."""


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

    def submit(self, raw: bytes, link: str, to_utc: ToUtc | None = None) -> Outcome:
        r = self.hub.receive(raw)
        acks: list[bytes] = []
        if r.verdict != hub.REJECTED and isinstance(r.message, messages.SampleFrame):
            acks = self.hub.ack(r.device_id or "", r.message.epoch, [r.message.seq])
        elif r.reply is not None:  # a stale boot epoch: the epoch resync (SPEC.md)
            acks = [r.reply]
        return Outcome(r, acks)


class Ingestor(Processor):
    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        # One decoder: the strict one of protocols/ (SPEC.md's deterministic
        # encoding, bounded fields). Samples are decrypted there and checked
        # here by the numpy decoder, which refuses exactly what the reference
        # refuses: what is acknowledged, every forwarder can forward.
        self.hub = hub.Hub(decode_samples=False)
        self.revoked: set[str] = set()
        self.rejects: Counter[str] = Counter()
        self._log = _RateLimitedLog(REJECT_LOG_PER_MIN)
        self._reader = store.reader()
        # Called with (device id, frame with its samples decoded, raw, t0 UTC ms or None) once a new frame is stored.
        self.on_stored: Callable[[str, messages.SampleFrame, bytes, int | None], None] | None = None
        self.reload_devices()

    def reload_devices(self) -> list[str]:
        """Registry changes (a new board, a revocation, an erasure) take effect at once.
        Returns the devices no longer in the registry at all (erased), now refused."""
        windows = self.store.load_windows()
        seen = set()
        for dev in self.registry.all():
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

    def _restore_windows(self) -> None:
        # A commit failed: the in-memory windows ran ahead of the store.
        for dev, state in self.store.load_windows().items():
            if self.hub.has_device(dev):
                self.hub.set_window(dev, *state)

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

    def submit(self, raw: bytes, link: str, to_utc: ToUtc | None = None) -> Outcome:
        r = self.hub.receive(raw, commit=False)  # the window moves once the samples are checked too
        if r.verdict == hub.REJECTED and r.reason == "replay:" + replay.TOO_OLD and r.device_id:
            # Below the window: a retransmission of a frame we hold is a duplicate.
            if self._stored(raw, r.device_id):
                r = hub.Received(hub.DUPLICATE, r.device_id, self._decode(raw), raw)
        if r.verdict == hub.REJECTED:
            return self._reject(r, link)
        m = r.message
        dev = r.device_id or ""
        clear: list[bytes] = []
        if isinstance(m, messages.SampleFrame):
            clear = [bytes(ch) for ch in m.channels]  # decrypted, not decoded
            if r.verdict == hub.ACCEPTED:
                try:  # decoded once, here: the vitals read these values, never the bytes again
                    m.channels = [fastdecode.decode(ch, m.count) for ch in clear]
                except RemoteProtocolError as e:
                    return self._reject(hub.Received(hub.REJECTED, dev, None, raw, "malformed:" + e.reason), link)
        if r.verdict == hub.ACCEPTED and m is not None:
            salt = m.boot_salt if isinstance(m, messages.SampleFrame) else None
            self.hub.commit(dev, m.epoch, m.seq, salt)  # type: ignore[attr-defined]
        if not isinstance(m, messages.SampleFrame):
            return Outcome(r, [])  # hello, status, time: session state, not stored
        w = self.hub.window(dev)
        t0_utc = to_utc(m.t0_ms) if to_utc is not None else None
        if t0_utc is not None and not 0 <= t0_utc <= messages.MAX_UPLINK_INT:
            t0_utc = None  # a clock map gone wild is not a time: placed by arrival instead
        item = Ingest(dev, m.epoch, m.seq, messages.T_SAMPLES, raw, w.state(), m.stream, m.t0_ms, m.first_index,
                      m.count, duplicate=r.verdict == hub.DUPLICATE,
                      t0_utc_ms=None if t0_utc is None else int(t0_utc),
                      plain=cbor.encoded(clear, PLAIN_BYTES))
        stored = self.store.submit_ingest(item)
        stored.add_done_callback(lambda fut: self._on_stored(fut, item, m))
        return Outcome(r, self.hub.ack(dev, m.epoch, [m.seq]), stored)

    def _on_stored(self, fut: asyncio.Future[Any], item: Ingest, m: messages.SampleFrame) -> None:
        if fut.cancelled():
            return
        if isinstance(fut.exception(), StoreError):
            self._restore_windows()
        elif fut.result() == QUARANTINED:
            self.rejects["store_refused"] += 1
        elif not item.duplicate and self.on_stored is not None:
            self.on_stored(item.device_id, m, item.raw, item.t0_utc_ms)

    def _decode(self, raw: bytes) -> messages.Message | None:
        from protocols import cose

        try:
            return messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES, decode_samples=False)
        except Exception:
            return None

    def _stored(self, raw: bytes, device_id: str) -> bool:
        m = self._decode(raw)
        if not isinstance(m, messages.SampleFrame):
            return False
        # The very frame: a resend is the same bytes; other bytes under that
        # (epoch, seq) come from another boot (SPEC.md, Replay protection).
        row = self._reader.execute("SELECT raw FROM frames WHERE device_id=? AND epoch=? AND seq=?",
                                   (device_id, m.epoch, m.seq)).fetchone()
        return row is not None and (row[0] is None or bytes(row[0]) == raw)
