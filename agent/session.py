"""One link's conversation with its board: process each message, ack, count.

The session reads whole messages from a transport and hands each to a
Processor (agent.ingest): it verifies them (key, MAC, payload, replay
window) and, for the agent, stores them. The session sends the acks the
processor returns, only once it returns them, and keeps per-board
statistics: what arrived, what was refused and why, and whether each
stream's samples are complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.ingest import Outcome, Processor
from agent.timemap import TimeMap
from agent.transports.base import Transport, TransportClosed
from protocols import hub, messages

log = logging.getLogger(__name__)

# Messages of one board judged but not yet acked: bounds memory when the
# store is slow; the board's outbox holds what waits behind.
PIPELINE_DEPTH = 64
# On a closed link, how long the acks still due may take to go out.
ACK_DRAIN_S = 2.0


class IntervalSet:
    """Sample indices received, as merged [start, end) intervals."""

    def __init__(self) -> None:
        self.spans: list[list[int]] = []

    def add(self, start: int, end: int) -> None:
        spans = self.spans
        spans.append([start, end])
        spans.sort()
        merged: list[list[int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.spans = merged

    @property
    def covered(self) -> int:
        return sum(e - s for s, e in self.spans)

    @property
    def missing(self) -> int:
        """Samples absent between the first and the last received."""
        if not self.spans:
            return 0
        return self.spans[-1][1] - self.spans[0][0] - self.covered


@dataclass
class BoardStats:
    device_id: str
    link: str
    connected: bool = False
    messages: int = 0
    frames: int = 0
    duplicates: int = 0
    acks_sent: int = 0
    epoch: int | None = None
    last_frame_at: float | None = None
    rejects: Counter[str] = field(default_factory=Counter)
    samples: dict[str, IntervalSet] = field(default_factory=dict)
    fifo_lost: int = 0  # samples the board's sensors reported lost
    board_dropped: int = 0  # frames the board reported dropping unacknowledged
    firmware: str = ""
    clock_drift_ppm: float | None = None
    clock_drift_uncertainty_ppm: float | None = None
    clock_jumps: int = 0
    rtt_ms: float | None = None

    def samples_received(self) -> dict[str, int]:
        return {name: s.covered for name, s in self.samples.items()}

    def samples_missing(self) -> dict[str, int]:
        return {name: s.missing for name, s in self.samples.items()}


class BoardSession:
    def __init__(self, transport: Transport, processor: Processor, stats: BoardStats,
                 recorder: Callable[[bytes], None] | None = None, time_sync_s: float | None = None) -> None:
        self.transport = transport
        self.processor = processor
        self.stats = stats
        self.recorder = recorder
        self.time_sync_s = time_sync_s
        self.timemap = TimeMap()
        self._time_requests: dict[int, float] = {}  # nonce -> UTC ms sent
        self._epoch: int | None = None

    async def run(self) -> None:
        # Two tasks: one reads and judges messages in arrival order and
        # queues them; the other waits for each to be stored, in the same
        # order, and sends its acks. Many frames from one board can so share
        # a commit, and a board is never acked for what is not yet stored.
        await self.transport.open()
        self.stats.connected = True
        pending: asyncio.Queue[Outcome | None] = asyncio.Queue(PIPELINE_DEPTH)
        acker = asyncio.create_task(self._ack_in_order(pending), name="acks:" + self.transport.name)
        syncer = (asyncio.create_task(self._time_sync(), name="time:" + self.transport.name)
                  if self.time_sync_s else None)
        try:
            while True:
                raw = await self.transport.receive()
                out = self._judge(raw)
                if out is not None:
                    await pending.put(out)
        except TransportClosed:
            log.info("%s: link closed", self.transport.name)
        finally:
            self.stats.connected = False
            if syncer is not None:
                syncer.cancel()
            if not acker.done():
                try:
                    pending.put_nowait(None)
                    async with asyncio.timeout(ACK_DRAIN_S):
                        await acker
                except (asyncio.QueueFull, TimeoutError, TransportClosed):
                    acker.cancel()
            await self.transport.close()

    async def _time_sync(self) -> None:
        # A time request as soon as the board is known, then every time_sync_s.
        assert self.time_sync_s
        while True:
            dev = self.stats.device_id
            if not dev or not self.processor.hub.has_device(dev):
                await asyncio.sleep(0.5)
                continue
            nonce, raw = self.processor.hub.time_request(dev, int(time.time() * 1000))
            self._time_requests[nonce] = time.time() * 1000
            while len(self._time_requests) > 8:  # unanswered ones are forgotten
                self._time_requests.pop(next(iter(self._time_requests)))
            await self.transport.send(raw)
            await asyncio.sleep(self.time_sync_s)

    def _on_time(self, m: messages.TimeResponse) -> None:
        sent = self._time_requests.pop(m.nonce, None)
        if sent is None:
            return
        self.timemap.add(m.tick_ms, sent, time.time() * 1000)
        st = self.stats
        st.clock_drift_ppm = self.timemap.drift_ppm
        st.clock_drift_uncertainty_ppm = self.timemap.drift_uncertainty_ppm
        st.clock_jumps = self.timemap.jumps
        st.rtt_ms = self.timemap.last_rtt_ms

    async def _ack_in_order(self, pending: asyncio.Queue[Outcome | None]) -> None:
        while True:
            out = await pending.get()
            if out is None:
                return
            if out.stored is not None:
                await out.stored
            for ack in out.acks:
                await self.transport.send(ack)
                self.stats.acks_sent += 1

    def _judge(self, raw: bytes) -> Outcome | None:
        st = self.stats
        st.messages += 1
        if self.recorder is not None:
            self.recorder(raw)
        out = self.processor.submit(raw, self.transport.name, self.timemap.to_utc_ms)
        r = out.received
        if r.verdict == hub.REJECTED:
            st.rejects[r.reason] += 1
            return None
        m = r.message
        if r.device_id and st.device_id != r.device_id:
            st.device_id = r.device_id
        epoch = getattr(m, "epoch", None)
        if epoch is not None and epoch != self._epoch:
            if self._epoch is not None:
                self.timemap.reset()  # a reboot: the board's ticks start again
            self._epoch = epoch
        if isinstance(m, messages.Hello):
            st.firmware = m.firmware
        elif isinstance(m, messages.TimeResponse):
            self._on_time(m)
        if isinstance(m, messages.SampleFrame):
            if r.verdict == hub.DUPLICATE:
                st.duplicates += 1
            else:
                self._count(m)
        return out

    def _count(self, f: messages.SampleFrame) -> None:
        st = self.stats
        if st.epoch != f.epoch:
            if st.epoch is not None:
                log.info("%s rebooted: epoch %s -> %d", st.device_id, st.epoch, f.epoch)
            st.epoch = f.epoch
            st.samples = {}
        st.frames += 1
        st.last_frame_at = time.time()
        name = messages.STREAM_NAMES.get(f.stream, str(f.stream))
        st.samples.setdefault(name, IntervalSet()).add(f.first_index, f.first_index + f.count)
        st.fifo_lost += f.status[1]
        st.board_dropped = max(st.board_dropped, f.status[2])


def verify_for(port: str, device_id: str, key: bytes, seconds: float, time_sync_s: float | None = None,
               during: Callable[[BoardStats], Awaitable[None]] | None = None) -> BoardStats:
    """Listens to one board for a while as the hub does (verify, ack, count),
    storing nothing: for self-tests and the bench. `during` runs alongside."""
    from agent.ingest import Volatile
    from agent.transports.serial import SerialTransport

    h = hub.Hub()
    h.add_device(device_id, key)
    stats = BoardStats(device_id, "serial:" + port)
    session = BoardSession(SerialTransport(port), Volatile(h), stats, time_sync_s=time_sync_s)

    async def go() -> None:
        task = asyncio.create_task(session.run())
        t0 = time.monotonic()
        if during is not None:
            await during(stats)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(go())
    return stats
