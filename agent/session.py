"""One link's conversation with its board: process each message, ack, count.

The session reads whole messages from a transport and hands each to a
Processor (agent.ingest): it verifies them (key, MAC, payload, replay
window) and, for the agent, stores them. The session sends the acks the
processor returns, only once it returns them, and keeps per-board
statistics: what arrived, what was refused and why, and whether each
stream's samples are complete. Any failure inside (the link, a write, the
store, a bug, a watchdog) ends the session with its transport closed, and
says why (SessionEnd): reopening it is the link manager's (agent/links.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import ota
from agent.ingest import Outcome, Processor
from agent.timemap import BoardClocks, TimeMap
from agent.transports.base import Transport, TransportError
from protocols import hub, messages

log = logging.getLogger(__name__)

# Messages of one board judged but not yet acked: bounds memory when the
# store is slow; the board's outbox holds what waits behind.
PIPELINE_DEPTH = 64
# On a closed link, how long the acks still due may take to go out.
ACK_DRAIN_S = 2.0
# An unanswered time request goes again after this, doubling up to the sync
# period: a board busy sending when it comes drops it (it answers only when
# its line is free), and a lost one must not leave a session unsynced for a
# whole period.
TIME_RETRY_S = 2.0


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
    # Authentic frames read while a store fault filled the pipeline: not taken, nothing acknowledged;
    # the board keeps them and sends them again.
    held_back: int = 0
    firmware: str = ""
    clock_drift_ppm: float | None = None
    clock_drift_uncertainty_ppm: float | None = None
    clock_jumps: int = 0
    rtt_ms: float | None = None
    rejected_ids: set[str] = field(default_factory=set)  # devices heard but not served (a few, for the status)
    board_errors: Counter[str] = field(default_factory=Counter)  # error reports (type 7) by code name
    last_board_error: str = ""
    # The board's last firmware update state (agent/ota.py): {"state", "offset" (bytes it holds),
    # "total" (the bundle's bytes, if this hub sent it), "version" (the bundle's name)}; None if none.
    update: dict[str, Any] | None = None
    unique_id: str = ""  # the chip's id its status gave (hex), "" if none yet
    identity_fault: str = ""  # the status's chip id is not the one provisioned: what the hub's status says

    def samples_received(self) -> dict[str, int]:
        return {name: s.covered for name, s in self.samples.items()}

    def samples_missing(self) -> dict[str, int]:
        return {name: s.missing for name, s in self.samples.items()}


# Why a session ended: counted per link and per reason, shown in the status.
END_OPEN_FAILED = "open_failed"  # the port or the connection could not be opened
END_CLOSED = "link_closed"  # unplugged, board reset, connection lost
END_WRITE_FAILED = "write_failed"  # an ack or request did not go out in time: the board is not reading
END_STORE_ERROR = "store_error"  # a frame could not be stored: nothing of it was acked
END_STALLED = "stalled"  # open, but nothing delivered for stall_s
END_SILENT = "silent"  # nothing authentic within identify_s of opening: no board of ours answering
END_NOT_REGISTERED = "not_registered"  # only messages from a board that is not active in the registry
END_CRASHED = "crashed"  # an unexpected exception (a bug), logged with its traceback
END_REASONS = (END_OPEN_FAILED, END_CLOSED, END_WRITE_FAILED, END_STORE_ERROR, END_STALLED, END_SILENT,
               END_NOT_REGISTERED, END_CRASHED)
# Rejections that say "a board, but not one we serve" (as opposed to noise).
_NOT_OURS = ("unknown_device", "revoked")
# Closing a transport is bounded: a stuck driver must not hold the link manager.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SessionEnd:
    """Why a session ended (one of END_REASONS) and what was seen."""

    reason: str
    detail: str


class _Ended(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.end = SessionEnd(reason, detail)


def coalesced_acks(out: Outcome, pending: asyncio.Queue[Outcome | None], carried: list[Outcome | None],
                   hub_: hub.Hub) -> list[bytes]:
    """What to send for out, once stored: its replies and one sealed ack for its
    frame and every outcome queued right behind it that is a frame of the same
    boot already stored (taken from pending; the first that is not goes to
    carried, to be handled next). A device no longer served (revoked, erased
    meanwhile) gets no ack: its frames are refused from now on."""
    acks = list(out.replies)
    if out.ack_for is None:
        return acks
    dev, epoch, seq = out.ack_for
    seqs = [seq]
    while not pending.empty():
        nxt = pending.get_nowait()
        if not _joins(nxt, dev, epoch):
            carried.append(nxt)
            break
        assert nxt is not None and nxt.ack_for is not None
        seqs.append(nxt.ack_for[2])
    if hub_.has_device(dev):
        acks += hub_.ack(dev, epoch, seqs)
    return acks


def _joins(out: Outcome | None, device_id: str, epoch: int) -> bool:
    # Can out's ack join one being sent now: a frame of that boot, stored, nothing else to send?
    return (out is not None and out.ack_for is not None and out.ack_for[:2] == (device_id, epoch)
            and not out.replies and out.stored is not None and out.stored.done() and not out.stored.cancelled()
            and out.stored.exception() is None)


class BoardSession:
    """One link's session, from open to close.

    run() returns a SessionEnd whatever happens inside (the transport
    closing, an ack that cannot be written, a store error, a watchdog, a
    bug); the transport is closed by then. Only cancellation propagates.

    Watchdogs (None: off): identify_s, the longest wait after opening for a
    first authentic message; stall_s, the longest the session may deliver
    nothing: no authentic message heard, or the oldest frame waiting for its
    ack (in the store, or on the wire) for that long; not while the store is
    at fault (Processor.store_fault): the frames then wait on the store, and
    the session reads on (_read).

    on_open and on_progress (called at each delivery: an ack written, or an
    authentic message other than a frame) let a link manager show the truth.
    """

    def __init__(self, transport: Transport, processor: Processor, stats: BoardStats,
                 recorder: Callable[[bytes], None] | None = None, time_sync_s: float | None = None,
                 stall_s: float | None = None, identify_s: float | None = None,
                 on_open: Callable[[], None] | None = None, on_progress: Callable[[], None] | None = None,
                 clocks: BoardClocks | None = None, ota_run_dir: Path | None = None) -> None:
        self.transport = transport
        self.processor = processor
        self.stats = stats
        self.recorder = recorder
        self.time_sync_s = time_sync_s
        self.stall_s = stall_s
        self.identify_s = identify_s
        self.on_open = on_open
        self.on_progress = on_progress
        self.clocks = clocks if clocks is not None else BoardClocks()  # a link manager's outlive the session
        self.timemap = TimeMap()  # until the board says who it is and which boot
        self._time_requests: dict[int, float] = {}  # nonce -> UTC ms sent
        self._time_answered = asyncio.Event()
        self._epoch: int | None = None
        self.opened_at = 0.0
        self.heard_at: float | None = None  # monotonic: the last authentic message
        self._acks_waiting_since: float | None = None  # monotonic: the oldest outcome not yet acked
        self._pending: asyncio.Queue[Outcome | None] = asyncio.Queue(PIPELINE_DEPTH)
        # Firmware updates spooled for this board (agent/ota.py), if the agent has a run directory.
        self.pusher = None if ota_run_dir is None else ota.Pusher(
            ota_run_dir, self._send, lambda: (self.stats.device_id, self._epoch), processor.hub,
            transport.downlink_buffer_bytes)

    async def run(self) -> SessionEnd:
        # Tasks: one reads and judges messages in arrival order and queues
        # them; one waits for each to be stored, in the same order, and sends
        # its acks (many frames from one board so share a commit, and a board
        # is never acked for what is not yet stored); the time sync; the
        # watchdog. The first of them to end, ends the session.
        try:
            await self.transport.open()
        except TransportError as e:
            return SessionEnd(END_OPEN_FAILED, str(e))
        except Exception as e:  # a driver's surprise: this link's failure, not the manager's
            log.error("%s: open failed", self.transport.name, exc_info=e)
            return SessionEnd(END_OPEN_FAILED, "%s: %s" % (type(e).__name__, e))
        self.opened_at = time.monotonic()
        self.stats.connected = True
        if self.on_open is not None:
            self.on_open()
        name = self.transport.name
        reader = asyncio.create_task(self._read(), name="read:" + name)
        acker = asyncio.create_task(self._ack_in_order(), name="acks:" + name)
        tasks = [reader, acker]
        if self.time_sync_s:
            tasks.append(asyncio.create_task(self._time_sync(), name="time:" + name))
        if self.stall_s or self.identify_s:
            tasks.append(asyncio.create_task(self._watch(), name="watch:" + name))
        if self.pusher is not None:
            tasks.append(asyncio.create_task(self.pusher.run(), name="ota:" + name))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            end = self._end_of(next(t for t in tasks if t in done))
            if end.reason == END_CLOSED and not acker.done():
                # The acks still due may go out if the link still takes writes.
                try:
                    self._pending.put_nowait(None)
                    async with asyncio.timeout(ACK_DRAIN_S):
                        await asyncio.wait([acker])
                except (asyncio.QueueFull, TimeoutError):
                    pass
        finally:
            self.stats.connected = False
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.transport.close()
            except Exception as e:  # closing what failed may fail too: the link is gone either way
                log.warning("%s: close failed: %s", name, e)
        return end

    def _end_of(self, task: asyncio.Task[None]) -> SessionEnd:
        exc = task.exception() if not task.cancelled() else None
        if isinstance(exc, _Ended):
            return exc.end
        if exc is None:
            return SessionEnd(END_CLOSED, "link closed")
        log.error("%s: session failed", self.transport.name, exc_info=exc)
        return SessionEnd(END_CRASHED, "%s: %s" % (type(exc).__name__, exc))

    async def _read(self) -> None:
        try:
            while True:
                raw = await self.transport.receive()
                # A store fault filled the pipeline: messages are still read and verified (the link
                # stays alive, the board is never left writing to a hub that does not read), but
                # frames are not taken and nothing new is queued; the board keeps its frames,
                # unacknowledged, in its bounded outbox and sends them again once acks flow.
                hold = self._pending.full() and self.processor.store_fault()
                out = await self._judge(raw, hold)
                if out is not None and not hold:
                    if self._acks_waiting_since is None:
                        self._acks_waiting_since = time.monotonic()
                    await self._pending.put(out)
        except TransportError as e:
            log.info("%s: %s", self.transport.name, e)
            raise _Ended(END_CLOSED, str(e)) from e

    async def _send(self, raw: bytes) -> None:
        try:
            await self.transport.send(raw)
        except TransportError as e:
            raise _Ended(END_WRITE_FAILED, str(e)) from e

    async def _watch(self) -> None:
        bounds = [b for b in (self.stall_s, self.identify_s) if b]
        step = min(bounds) / 4
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if self.heard_at is None:
                if self.identify_s and now - self.opened_at > self.identify_s:
                    st = self.stats
                    not_ours = sum(st.rejects[r] for r in _NOT_OURS)
                    if not_ours:
                        raise _Ended(END_NOT_REGISTERED, "%d messages from a board that is not registered and "
                                     "active (%s)" % (not_ours, ", ".join(sorted(st.rejected_ids)) or "?"))
                    other_version = st.rejects["malformed:version"]
                    if other_version:  # authentic (the MAC verified), in a wire format this hub does not speak
                        raise _Ended(END_SILENT, "%d authentic messages in a wire format version other than this "
                                     "hub's (%d): update the board's firmware (pulsebridge provision)"
                                     % (other_version, messages.VERSION))
                    raise _Ended(END_SILENT, "no message from a registered board within %.0f s (%d refused, "
                                 "%d other pieces of data)" % (self.identify_s, sum(st.rejects.values()),
                                                                sum(self.transport.discarded.values())))
                if self.stall_s and not self.identify_s and now - self.opened_at > self.stall_s:
                    raise _Ended(END_STALLED, "nothing received for %.0f s" % self.stall_s)
                continue
            if not self.stall_s:
                continue
            if now - self.heard_at > self.stall_s:
                raise _Ended(END_STALLED, "nothing received for %.0f s" % (now - self.heard_at))
            waiting = self._acks_waiting_since
            if waiting is not None and self.processor.store_fault():
                # The frames wait on the store, not on the link (heard_at says whether the board
                # is heard): their wait counts from when the store can write again.
                self._acks_waiting_since = waiting = now
            if waiting is not None and now - waiting > self.stall_s:
                raise _Ended(END_STALLED, "a frame waited %.0f s to be stored and acknowledged" % (now - waiting))

    async def _time_sync(self) -> None:
        # A time request as soon as the board is known, then every time_sync_s;
        # one unanswered goes again after TIME_RETRY_S, doubling (at most time_sync_s).
        assert self.time_sync_s
        retry_s = TIME_RETRY_S
        while True:
            dev = self.stats.device_id
            if not dev or not self.processor.hub.has_device(dev):
                await asyncio.sleep(0.5)
                continue
            nonce, raw = self.processor.hub.time_request(dev, int(time.time() * 1000))
            self._time_requests[nonce] = time.time() * 1000
            while len(self._time_requests) > 8:  # unanswered ones are forgotten
                self._time_requests.pop(next(iter(self._time_requests)))
            self._time_answered.clear()
            asked_at = time.monotonic()
            await self._send(raw)
            try:
                async with asyncio.timeout(min(retry_s, self.time_sync_s)):
                    await self._time_answered.wait()
            except TimeoutError:
                retry_s = min(2 * retry_s, self.time_sync_s)
                continue
            retry_s = TIME_RETRY_S
            await asyncio.sleep(max(0.0, self.time_sync_s - (time.monotonic() - asked_at)))

    def _on_time(self, m: messages.TimeResponse) -> None:
        sent = self._time_requests.pop(m.nonce, None)
        if sent is None:
            return
        self._time_answered.set()
        self.timemap.add(m.tick_ms, sent, time.time() * 1000)
        st = self.stats
        st.clock_drift_ppm = self.timemap.drift_ppm
        st.clock_drift_uncertainty_ppm = self.timemap.drift_uncertainty_ppm
        st.clock_jumps = self.timemap.jumps
        st.rtt_ms = self.timemap.last_rtt_ms

    async def _ack_in_order(self) -> None:
        # One sealed ack covers a run of frames of one boot already stored
        # (a commit stores many): the next outcomes queued join it while they
        # are stored frames of the same device and epoch.
        pending = self._pending
        carried: list[Outcome | None] = []
        while True:
            out = carried.pop() if carried else await pending.get()
            if out is None:
                return
            if out.stored is not None:
                try:
                    await out.stored
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # nothing of this frame is acked; the board keeps it and resends
                    raise _Ended(END_STORE_ERROR, str(e)) from e
            linger_s = self.transport.ack_linger_s
            if linger_s > 0 and out.ack_for is not None and not out.replies:
                await asyncio.sleep(linger_s)  # the frames stored meanwhile join this ack (Transport.ack_linger_s)
            for ack in coalesced_acks(out, pending, carried, self.processor.hub):
                await self._send(ack)
                self.stats.acks_sent += 1
            self._acks_waiting_since = time.monotonic() if carried or not pending.empty() else None
            self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress()

    def _check_identity(self, st: BoardStats, unique_id: bytes) -> None:
        # The key was made for the chip provisioning read: a status from another chip means the
        # key (and the flash it sits on) was copied or moved. Its frames are authentic and kept;
        # the board is shown as faulty until a status comes from the right chip.
        st.unique_id = unique_id.hex()
        registered = self.processor.registered_unique_id(st.device_id)
        fault = ""
        if registered and unique_id != registered:
            fault = ("its key is on chip %s, not on chip %s it was provisioned on: copied or moved to another "
                     "board? Provision this board again (pulsebridge provision) if it is meant to be %s"
                     % (unique_id.hex(), registered.hex(), st.device_id))
            if fault != st.identity_fault:
                log.warning("%s: %s", st.device_id, fault)
        st.identity_fault = fault

    async def _judge(self, raw: bytes, hold: bool = False) -> Outcome | None:
        st = self.stats
        st.messages += 1
        if self.recorder is not None:
            self.recorder(raw)
        out = self.processor.submit(raw, self.transport.name, self.timemap.to_utc_ms, hold_frames=hold)
        if out.judging is not None:  # the store is read first (a frame below the window), off the loop
            out = await out.judging
        r = out.received
        if out.held:  # authentic, heard; not taken (a store fault): the board sends it again
            st.held_back += 1
            if isinstance(r.message, messages.SampleFrame):  # what its outbox dropped meanwhile, shown now
                st.board_dropped = max(st.board_dropped, r.message.status[2])
            self.heard_at = time.monotonic()
            self._progress()
            return None
        if r.verdict == hub.REJECTED:
            st.rejects[r.reason] += 1
            if r.reason in _NOT_OURS and r.device_id and len(st.rejected_ids) < 8:
                st.rejected_ids.add(r.device_id)
            return out if out.acks else None  # an epoch resync to send back (ingest.py)
        self.heard_at = time.monotonic()
        if self.processor.store_fault():  # nothing can be acknowledged: being heard is the link's progress
            self._progress()
        m = r.message
        if r.device_id and st.device_id != r.device_id:
            st.device_id = r.device_id
        epoch = getattr(m, "epoch", None)
        if epoch is not None and epoch != self._epoch and r.device_id:
            self.timemap = self.clocks.for_boot(r.device_id, epoch)  # another boot: its ticks start again
            self._epoch = epoch
        if isinstance(m, messages.Hello):
            st.firmware = m.firmware
            if self.pusher is not None and r.device_id and r.verdict == hub.ACCEPTED:
                concluded = self.pusher.on_hello(r.device_id, m.firmware)
                if concluded is not None:
                    log.info("%s firmware update: %s (its hello: %s)", st.device_id, concluded, m.firmware)
                    st.update = self.pusher.shown(0) | {"state": concluded}
        elif isinstance(m, messages.Status) and m.unique_id:
            self._check_identity(st, m.unique_id)
        elif isinstance(m, messages.TimeResponse):
            self._on_time(m)
        elif isinstance(m, messages.ErrorReport) and r.verdict == hub.ACCEPTED:
            name = messages.ERROR_CODES.get(m.code, "code_%d" % m.code)
            st.board_errors[name] += 1
            st.last_board_error = "%s: %s" % (name, m.text)
            log.warning("%s reports %s", st.device_id, st.last_board_error)
        elif isinstance(m, messages.UpdateState) and r.verdict == hub.ACCEPTED:
            update: dict[str, Any] = {"state": m.state, "offset": m.offset, "total": None, "version": ""}
            if self.pusher is not None and r.device_id:
                if not self.pusher.on_state(r.device_id, m):
                    log.info("%s firmware update: the board says again %s, of an earlier update", st.device_id,
                             m.state)
                    return out  # (acknowledged as any message; not this update's state)
                update = self.pusher.shown(m.offset)
            if st.update is None or st.update["state"] != update["state"]:
                log.info("%s firmware update: %s (byte %d)", st.device_id, update["state"], m.offset)
            st.update = update
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


# verify_for: a pause before a session that ended is opened again.
REOPEN_S = 0.2


def verify_for(port: str, device_id: str, key: bytes, seconds: float, time_sync_s: float | None = None,
               during: Callable[[BoardStats], Awaitable[None]] | None = None) -> BoardStats:
    """Listens to one board for a while as the hub does (verify, ack, count),
    storing nothing: for self-tests and the bench. `during` runs alongside."""
    from agent.ingest import Volatile
    from agent.transports.serial import SerialTransport

    h = hub.Hub()
    h.add_device(device_id, key)
    processor = Volatile(h)
    stats = BoardStats(device_id, "serial:" + port)

    async def listen() -> None:
        # As a link manager would: a session that ends (a port not there yet
        # after a reboot, a cut) is opened again until the time is up.
        while True:
            await BoardSession(SerialTransport(port), processor, stats, time_sync_s=time_sync_s).run()
            await asyncio.sleep(REOPEN_S)

    async def go() -> None:
        task = asyncio.create_task(listen())
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
