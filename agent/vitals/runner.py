"""The vitals runner: stored frames in, vital signs and alerts out, as a task of the agent.

Ingest hands each stored sample frame (its record, decoded once) to
`offer`; the runner's task feeds it to the vitals engine (the frames that
came within GATHER_S of each other in one turn), stores what the
engine derives (vital signs, alerts) as records every backend gets, and
keeps what the status shows: each device's last vitals and the last 4 s of
its ECG and pleth. Every SILENCE_CHECK_S it asks the engine for silence
alerts, frames or not. A full queue skips the vitals for a frame (counted),
never the store or the forwarders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.record import FrameRecord
from agent.registry import Registry
from agent.store import KIND_ALERT, KIND_VITAL, MAX_BATCH, PRIORITY_ALERT, PRIORITY_VITALS, Ingest, Store
from agent.vitals.engine import VitalsEngine
from protocols import messages

log = logging.getLogger(__name__)

# Stored frames waiting for the vitals engine: about 30 s of 20 boards. When
# full, frames skip the vitals (counted), never the store or the forwarders.
VITALS_QUEUE = 1280
SILENCE_CHECK_S = 10.0
# After a frame the runner waits this long for others, then feeds them to the engine in one
# turn: its work is cheaper in bursts (its code and data stay in the CPU's caches; at 20
# boards a frame taken alone cost ~1.7x one taken among others, bench agent), and what they
# make is one store job. Vitals go out every 5 s and alerts hold for 30 s or more: half a
# second later changes neither.
GATHER_S = 0.5
# Alert documents read back from the store at start (raised and cleared, latest last): enough to
# know which alerts are still raised, with many cleared ones between.
RECALLED_ALERTS = 2000
# What the status page draws of each device's ECG and pleth.
WAVE_S = 4
# Points of a waveform sent to the page: enough for a phone's width.
WAVE_POINTS = 600
# Derived records (vitals, alerts) have no board sequence: theirs counts up from
# the start time, so a restarted agent never reuses one (16 per millisecond).
_SEQ_PER_MS = 16
_EPOCH_VITAL, _EPOCH_ALERT = -2, -3


class Trace:
    """The last `size` samples of one stream (the status page's waveform), in a ring of
    int32: a board's 4 s of ECG take 8 kB, where a deque of Python ints took ~74 kB, and a
    frame is two slice copies, not a list of its samples."""

    def __init__(self, size: int) -> None:
        self._ring = np.zeros(max(1, size), dtype=np.int32)
        self._written = 0  # samples written since the start

    def extend(self, samples: np.ndarray) -> None:
        size = len(self._ring)
        x = samples[-size:]
        at = self._written % size
        first = min(len(x), size - at)
        self._ring[at:at + first] = x[:first]
        self._ring[:len(x) - first] = x[first:]
        self._written += len(x)

    def values(self) -> list[int]:
        """The samples held, oldest first."""
        size = len(self._ring)
        if self._written <= size:
            held: list[int] = self._ring[:self._written].tolist()
            return held
        at = self._written % size
        ordered: list[int] = np.concatenate([self._ring[at:], self._ring[:at]]).tolist()
        return ordered


class VitalsRunner:
    def __init__(self, store: Store, engine: VitalsEngine, known: Callable[[str], bool],
                 gather_s: float = GATHER_S) -> None:
        """known(device_id): whether the device is still registered (a frame of one erased while
        it waited in the queue is dropped, so nothing of it comes back after forget).
        gather_s: how long frames are gathered before a turn (GATHER_S)."""
        self.gather_s = gather_s
        self.store = store
        self.engine = engine
        self.known = known
        self.queue: asyncio.Queue[FrameRecord] = asyncio.Queue(VITALS_QUEUE)
        self.skipped = 0  # frames that found the queue full
        self.made = 0  # vital signs and alerts stored
        self.turns = 0  # the loop's heartbeat, for the liveness check
        self.last_vitals: dict[str, dict[str, dict[str, Any]]] = {}
        self.waves: dict[tuple[str, str], Trace] = {}
        self._derived_seq = int(time.time() * 1000) * _SEQ_PER_MS

    def offer(self, frame: FrameRecord) -> None:
        """A stored frame for the vitals (called on the loop, by ingest); never blocks."""
        self.engine.last_seen[frame.device_id] = time.time()  # heard, even when the queue is full
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.skipped += 1

    def recall(self, registry: Registry) -> None:
        """After a restart, from the store: each registered sensor's last frame and the alerts still
        raised, so a sensor silent across the restart is still told (and named), and an alert still
        raised is not raised twice. Once, at start, before the tasks run."""
        reader = self.store.reader()
        try:
            for d in registry.all():
                if d.state != "revoked":
                    at = Store.last_received(reader, d.device_id)
                    if at is not None:
                        self.engine.last_seen.setdefault(d.device_id, at)
            for doc in Store.recent_alerts(reader, RECALLED_ALERTS):
                if isinstance(doc.get("device_id"), str) and isinstance(doc.get("alert"), str):
                    self.engine.alerts.restore(doc["device_id"], doc["alert"], doc.get("state") == "raised")
        finally:
            reader.close()

    def forget(self, device_id: str) -> None:
        """An erased device: nothing of it stays in memory (vitals, alert state, waveforms)."""
        self.engine.forget(device_id)
        self.last_vitals.pop(device_id, None)
        for key in [k for k in self.waves if k[0] == device_id]:
            del self.waves[key]

    def waveform(self, device_id: str, stream: str) -> dict[str, Any]:
        """The last WAVE_S of a device's "ecg" or "ppg" (IR), at most WAVE_POINTS values."""
        trace = self.waves.get((device_id, stream))
        values = trace.values() if trace is not None else []
        step = max(1, len(values) // WAVE_POINTS)
        return {"device_id": device_id, "stream": stream, "values": values[::step]}

    async def run(self) -> None:
        next_silence = time.monotonic() + SILENCE_CHECK_S
        while True:
            self.turns += 1
            frames = self._waiting(MAX_BATCH)
            if not frames:
                try:
                    async with asyncio.timeout(SILENCE_CHECK_S):
                        frames = [await self.queue.get()]
                except TimeoutError:
                    pass
            if frames and len(frames) < MAX_BATCH:
                await asyncio.sleep(self.gather_s)  # the frames that come meanwhile join this turn
                frames += self._waiting(MAX_BATCH - len(frames))
            docs: list[dict[str, Any]] = []
            for i, f in enumerate(frames):
                if i:
                    await asyncio.sleep(0)  # what else is ready (acks) runs between frames
                if self.known(f.device_id):  # its samples decoded once, at ingest
                    docs += self.engine.frame(f, f.device_id, f.start_utc_s()[0], f.key)
                    name = "ppg" if f.stream == messages.STREAM_PPG_MAX30102 else "ecg"
                    trace = self.waves.get((f.device_id, name))
                    if trace is None:
                        trace = self.waves[(f.device_id, name)] = Trace(WAVE_S * f.rate_hz)
                    trace.extend(f.channels[-1])  # ECG, or the IR pleth
            # A device erased while this turn's frames were fed (between them): none of what
            # its frames made is kept.
            docs = [d for d in docs if self.known(d["device_id"])]
            if time.monotonic() >= next_silence:
                next_silence = time.monotonic() + SILENCE_CHECK_S
                docs += self.engine.silence(time.time())
            if docs:
                await self._store(docs)

    def _waiting(self, limit: int) -> list[FrameRecord]:
        # The frames already queued (at most limit), taken in one turn: their vitals and
        # alerts go to the store as one job (one commit, one wake-up of the forwarders).
        frames: list[FrameRecord] = []
        while len(frames) < limit and not self.queue.empty():
            frames.append(self.queue.get_nowait())
        return frames

    async def _store(self, docs: list[dict[str, Any]]) -> None:
        items: list[Ingest] = []
        for doc in docs:
            alert = doc["type"] == "alert"
            if not alert:
                check = doc.get("cross_check")
                self.last_vitals.setdefault(doc["device_id"], {})[doc["kind"]] = {
                    "value": doc["value"], "quality": doc["quality"], "at": doc["at"],
                    "disagrees": bool(check and not check.get("agrees", True))}
            self._derived_seq += 1
            items.append(Ingest(doc["device_id"], _EPOCH_ALERT if alert else _EPOCH_VITAL, self._derived_seq,
                                KIND_ALERT if alert else KIND_VITAL, b"", None,
                                priority=PRIORITY_ALERT if alert else PRIORITY_VITALS, info=doc))
        for at in range(0, len(items), MAX_BATCH):  # each job within the store's bound
            await self.store.submit_ingests(items[at:at + MAX_BATCH])
        self.made += len(items)
        for doc in docs:
            if doc["type"] == "alert":
                log.warning("alert %s %s for %s", doc["alert"], doc["state"], doc["device_id"])
