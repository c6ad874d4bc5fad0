"""The agent: one TaskGroup of named tasks under a supervisor.

Tasks: one per serial link (found by path or USB VID/PID, reconnecting with
capped, jittered backoff), the BLE manager (agent/ble_links.py: a scanner
and one task per connected board), one per backend forwarder, housekeeping
(retention purge), and the status socket. Every wait on the outside world
is bounded by a timeout. Link state is an explicit enum.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serial.tools.list_ports

from agent import forwarders
from agent.audit import AuditLog
from agent.ble_links import BleManager
from agent.config import AgentConfig, SerialConfig
from agent.forwarders.base import Backoff, Forwarder, Subjects
from agent.ingest import Ingestor
from agent.registry import Registry
from agent.session import BoardSession, BoardStats
from agent.store import KIND_ALERT, KIND_VITAL, PRIORITY_ALERT, PRIORITY_VITALS, Ingest, Store
from agent.transports.base import TransportError
from agent.transports.serial import SerialTransport
from agent.vitals.alerts import DEFAULT_RULES, AlertEngine, Rule
from agent.vitals.engine import VitalsEngine
from protocols import messages
from protocols.errors import ProtocolError

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_S = 60.0
# Stored frames waiting for the vitals engine: about 30 s of 20 boards. When
# full, frames skip the vitals (counted), never the store or the forwarders.
VITALS_QUEUE = 1280
SILENCE_CHECK_S = 10.0
# The registry is re-read this often when its file changed: a revocation
# takes effect within this delay.
REGISTRY_POLL_S = 1.0
# A link that stayed up this long has its backoff reset.
STABLE_LINK_S = 10.0
# Looking for a port that is not there (unplugged, rebooting) costs a stat
# or a USB listing: done often, so a replugged board is back within a second.
SEARCH_EVERY_S = 0.5


class LinkState(enum.Enum):
    SEARCHING = "searching"
    CONNECTED = "connected"
    BACKOFF = "backoff"


@dataclass
class SerialLink:
    config: SerialConfig
    state: LinkState = LinkState.SEARCHING
    port: str = ""
    stats: BoardStats | None = None
    connects: int = 0
    last_error: str = ""
    history: list[BoardStats] = field(default_factory=list)

    def resolve(self) -> str | None:
        c = self.config
        if c.port:
            return c.port if os.path.exists(c.port) else None
        for p in serial.tools.list_ports.comports():
            if p.vid == c.usb_vid and (c.usb_pid is None or p.pid == c.usb_pid):
                return str(p.device)
        return None

    def describe(self) -> str:
        c = self.config
        return c.port or "usb %04x:%04x" % (c.usb_vid or 0, c.usb_pid or 0)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.audit = AuditLog(cfg.audit_path)
        self.registry = Registry(cfg.registry_path, self.audit)
        self.store = Store(cfg.store_path, [b.name for b in cfg.backends], int(cfg.disk_quota_mb * 1024 * 1024))
        self.store.open()
        self.ingestor = Ingestor(self.store, self.registry)
        self.wake = asyncio.Event()
        subjects = Subjects(self.registry)
        self.forwarders: list[Forwarder] = [forwarders.make(b, self.store, cfg.hub_id, self.wake, subjects)
                                            for b in cfg.backends]
        self.links = [SerialLink(sc) for sc in cfg.serial]
        self.ble: BleManager | None = None
        if cfg.ble is not None:
            self.ble = BleManager(cfg.ble, self.ingestor, self.ingestor.hub.has_device,
                                  time_sync_s=cfg.time_sync_every_s)
        rules = tuple(Rule(**r) for r in cfg.alert_rules) or DEFAULT_RULES
        self.vitals = VitalsEngine(AlertEngine(rules))
        self.vitals_queue: asyncio.Queue[tuple[str, Any, bytes, int | None, float]] = asyncio.Queue(VITALS_QUEUE)
        self.vitals_skipped = 0
        self.vitals_made = 0
        self._derived_seq = int(time.time() * 1000) * 16
        self.ingestor.on_stored = self._to_vitals
        self.last_vitals: dict[str, dict[str, dict[str, Any]]] = {}
        # The last 4 s of each device's ECG and pleth (IR), for the status page.
        self.waves: dict[tuple[str, str], deque[int]] = {}
        self.started_at = time.time()
        self.status_page_port = 0
        self.status_page_state = "on" if cfg.status_page_password_file else "off: no status_page_password_file"
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_commit(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake.set)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.on_commit = self._on_commit
        self.store.start()
        self.audit.record("agent.start", self.cfg.hub_id, config=str(self.cfg.source or ""),
                          backends=[b.name for b in self.cfg.backends])
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = []
                for link in self.links:
                    tasks.append(tg.create_task(self._serial(link), name="serial:" + link.describe()))
                if self.ble is not None:
                    tasks.append(tg.create_task(self.ble.run(), name="ble"))
                for fw in self.forwarders:
                    tasks.append(tg.create_task(fw.run(), name="forward:" + fw.name))
                tasks.append(tg.create_task(self._housekeeping(), name="housekeeping"))
                tasks.append(tg.create_task(self._vitals(), name="vitals"))
                if self.cfg.status_page_password_file:
                    tasks.append(tg.create_task(self._status_page(), name="status-page"))
                tasks.append(tg.create_task(self._watch_registry(), name="registry"))
                tasks.append(tg.create_task(self._status_server(), name="status"))
                if stop is not None:
                    await stop.wait()
                    for t in tasks:
                        t.cancel()
        finally:
            self.store.close()
            self.registry.close()

    async def _serial(self, link: SerialLink) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            port = link.resolve()
            if port is None:
                link.state = LinkState.SEARCHING
                await asyncio.sleep(SEARCH_EVERY_S * random.uniform(0.8, 1.2))
                continue
            link.port = port
            stats = BoardStats("", "serial:" + port)
            link.stats = stats
            session = BoardSession(SerialTransport(port, link.config.baudrate), self.ingestor, stats,
                                   time_sync_s=self.cfg.time_sync_every_s)
            started = time.monotonic()
            link.state = LinkState.CONNECTED
            link.connects += 1
            try:
                await session.run()
                link.last_error = "link closed"
            except TransportError as e:
                link.last_error = str(e)
                log.info("%s: %s", link.describe(), e)
            link.history.append(stats)
            del link.history[:-5]
            if time.monotonic() - started > STABLE_LINK_S:
                backoff.reset()
            link.state = LinkState.BACKOFF
            await asyncio.sleep(backoff.next_delay())

    def _to_vitals(self, device_id: str, frame: Any, raw: bytes, t0_utc_ms: int | None) -> None:
        try:
            self.vitals_queue.put_nowait((device_id, frame, raw, t0_utc_ms, time.time()))
        except asyncio.QueueFull:
            self.vitals_skipped += 1

    async def _vitals(self) -> None:
        from agent import fastdecode

        next_silence = time.monotonic() + SILENCE_CHECK_S
        while True:
            try:
                async with asyncio.timeout(SILENCE_CHECK_S):
                    dev, f, raw, t0_utc_ms, received = await self.vitals_queue.get()
            except TimeoutError:
                dev = ""
            docs: list[dict[str, Any]] = []
            if dev:
                try:
                    channels = [fastdecode.decode(bytes(ch), f.count) for ch in f.channels]
                except ProtocolError as e:  # authentic but unreadable: no vitals from it, nothing else stops
                    self.vitals_skipped += 1
                    log.error("vitals: frame %s:%d:%d cannot be decoded: %s", dev, f.epoch, f.seq, e)
                    continue
                frame = messages.SampleFrame(f.epoch, f.seq, f.stream, f.t0_ms, f.first_index, f.rate_hz, f.count,
                                             f.scale, f.ppg_drive, f.status, channels)
                t0 = t0_utc_ms / 1000 if t0_utc_ms is not None else received - f.count / f.rate_hz
                docs = self.vitals.frame(frame, dev, t0, "%s:%d:%d" % (dev, f.epoch, f.seq))
                name = "ppg" if f.stream == messages.STREAM_PPG_MAX30102 else "ecg"
                wave = self.waves.setdefault((dev, name), deque(maxlen=4 * f.rate_hz))
                wave.extend(channels[-1])  # ECG, or the IR pleth
            if time.monotonic() >= next_silence:
                next_silence = time.monotonic() + SILENCE_CHECK_S
                docs += self.vitals.silence(time.time())
            for doc in docs:
                await self._store_derived(doc)

    async def _store_derived(self, doc: dict[str, Any]) -> None:
        alert = doc["type"] == "alert"
        if not alert:
            self.last_vitals.setdefault(doc["device_id"], {})[doc["kind"]] = {
                "value": doc["value"], "quality": doc["quality"], "at": doc["at"]}
        self._derived_seq += 1
        self.vitals_made += 1
        await self.store.ingest(Ingest(doc["device_id"], -3 if alert else -2, self._derived_seq,
                                       KIND_ALERT if alert else KIND_VITAL, b"", None,
                                       priority=PRIORITY_ALERT if alert else PRIORITY_VITALS, info=doc))
        if alert:
            log.warning("alert %s %s for %s", doc["alert"], doc["state"], doc["device_id"])

    def waveform(self, device_id: str, stream: str) -> dict[str, Any]:
        values = list(self.waves.get((device_id, stream), ()))
        step = max(1, len(values) // 600)  # at most 600 points: enough for a phone's width
        return {"device_id": device_id, "stream": stream, "values": values[::step]}

    async def _status_page(self) -> None:
        from agent.status_page import PasswordFileError, StatusPage, read_password

        assert self.cfg.status_page_password_file is not None
        try:
            password = read_password(self.cfg.status_page_password_file)
        except PasswordFileError as e:  # no page, the boards are served all the same
            self.status_page_state = "off: %s" % e
            if e.missing:
                log.warning("status page off: %s (create it, mode 0600, to have the page)", e)
            else:
                log.error("status page off: %s", e)
            return
        host, _, port = self.cfg.status_page_listen.rpartition(":")
        page = StatusPage(self.snapshot, self.waveform, password)
        try:
            self.status_page_port = await page.start(host or "0.0.0.0", int(port))
        except OSError as e:  # the address is taken or not ours: no page, boards served all the same
            self.status_page_state = "off: cannot listen on %s: %s" % (self.cfg.status_page_listen, e)
            log.error("status page %s", self.status_page_state)
            await page.stop()
            return
        try:
            await asyncio.Event().wait()
        finally:
            await page.stop()

    async def _watch_registry(self) -> None:
        path = self.cfg.registry_path
        seen = _mtime(path)
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            now = _mtime(path)
            if now != seen:
                seen = now
                self.ingestor.reload_devices()
                log.info("registry changed: devices reloaded")

    async def _housekeeping(self) -> None:
        retention_s = self.cfg.retention_days * 86400
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY_S)
            n = await self.store.run(lambda db: self.store.purge(db, retention_s))
            if n:
                log.info("retention: purged %d frames delivered to every backend", n)

    # ---- status ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        reader = self.store.reader()
        try:
            backlog = Store.backlog(reader)
            counters = Store.counters(reader)
        finally:
            reader.close()
        boards = []
        for link in self.links:
            st = link.stats
            boards.append({
                "link": link.describe(), "port": link.port, "state": link.state.value, "connects": link.connects,
                "device_id": st.device_id if st else "", "frames": st.frames if st else 0,
                "last_frame_at": st.last_frame_at if st else None, "last_error": link.last_error,
                "rejects": dict(st.rejects) if st else {},
                "clock_drift_ppm": st.clock_drift_ppm if st else None, "clock_jumps": st.clock_jumps if st else 0,
            })
        if self.ble is not None:
            boards += self.ble.snapshot()
        return {
            "hub_id": self.cfg.hub_id, "uptime_s": round(time.time() - self.started_at, 1), "boards": boards,
            "ble_adapter": ({"state": self.ble.adapter, "error": self.ble.adapter_error,
                             "losses": self.ble.adapter_losses} if self.ble is not None else None),
            "backends": [{"name": f.name, "type": f.cfg.type, "state": f.state.value, "backlog": backlog.get(f.name, 0),
                          "forwarded": f.forwarded, "failures": f.failures, "refused": f.refused,
                          "last_error": f.last_error}
                         for f in self.forwarders],
            "rejects": dict(self.ingestor.rejects), "store": {"commits": self.store.stats.commits,
                                                              "ingested": self.store.stats.ingested},
            "last_vitals": self.last_vitals, "status_page": self.status_page_state,
            "vitals": {"made": self.vitals_made, "skipped_frames": self.vitals_skipped,
                       "active_alerts": [list(a) for a in self.vitals.alerts.active()]},
            "counters": counters,
        }

    async def _status_server(self) -> None:
        path = self.cfg.status_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(json.dumps(self.snapshot()).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

        old = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(serve, path=str(path))
        finally:
            os.umask(old)
        async with server:
            await server.serve_forever()


def _mtime(path: Path) -> tuple[float, float]:
    # The WAL file changes when the registry is written, the main file when checkpointed.
    def one(p: Path) -> float:
        try:
            return p.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return 0.0
    return one(path), one(Path(str(path) + "-wal"))


async def read_status(socket_path: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        data = await reader.read()
        writer.close()
    result: dict[str, Any] = json.loads(data)
    return result
