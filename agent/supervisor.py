"""The agent: named tasks under a supervisor that restarts them.

Tasks: serial discovery (USB ports found by identity, agent/links.py), the
BLE manager (agent/ble_links.py), both handing the boards they find to one
link manager (sessions, watchdog, reconnect policy, agent/links.py); one
forwarder per backend; vitals; housekeeping (retention purge); the registry
watch; the status socket and page; and the systemd notifier.

A task that raises is logged with its traceback, counted and restarted
after a capped, jittered backoff: one bug never takes the boards down. The
agent tells systemd it is alive (sd_notify WATCHDOG=1) only while its loops
turn and the store answers; otherwise systemd restarts it (WatchdogSec=).
Every wait on the outside world is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from agent import forwarders
from agent.audit import AuditLog
from agent.ble_links import OUT_OF_RANGE_S, BleManager
from agent.config import AgentConfig
from agent.forwarders.base import Backoff, Forwarder, Subjects
from agent.ingest import Ingestor
from agent.links import LinkManager, SerialDiscovery, SerialWant
from agent.record import FrameRecord
from agent.registry import Registry
from agent.sdnotify import Notifier
from agent.status_page import StatusPage
from agent.store import KIND_ALERT, KIND_VITAL, PRIORITY_ALERT, PRIORITY_VITALS, Ingest, Store, StoreError
from agent.vitals.alerts import DEFAULT_RULES, AlertEngine, Rule
from agent.vitals.engine import VitalsEngine
from protocols import messages

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_S = 60.0
# Stored frames waiting for the vitals engine: about 30 s of 20 boards. When
# full, frames skip the vitals (counted), never the store or the forwarders.
VITALS_QUEUE = 1280
SILENCE_CHECK_S = 10.0
# Alert documents read back from the store at start (raised and cleared, latest last): enough to
# know which alerts are still raised, with many cleared ones between.
RECALLED_ALERTS = 2000
# The registry is re-read this often when its file changed: a revocation
# takes effect within this delay.
REGISTRY_POLL_S = 1.0
# A status page password file missing or unsafe is looked at again this often:
# made or fixed, the page starts with no restart.
PASSWORD_RECHECK_S = 10.0
# A crashed task is restarted after a capped, jittered backoff; one that ran
# this long before crashing starts again from the shortest delay.
RESTART_BASE_S = 1.0
RESTART_CAP_S = 60.0
STABLE_TASK_S = 60.0
# The agent's loops (serial discovery, BLE scanner, registry watch, vitals)
# each turn at least every 10 s: one that has not turned for this long is
# stuck, and systemd is no longer told the agent is alive.
LOOP_STUCK_S = 30.0
# Without WatchdogSec=, how often the liveness is still checked (and logged).
LIVENESS_EVERY_S = 10.0


def version() -> str:
    try:
        return metadata.version("pulsebridge")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class TaskHealth:
    """A supervised task: how often it crashed, and why last."""

    restarts: int = 0
    last_error: str = ""
    restarting: bool = False


def instance_lock(data_dir: Path) -> int:
    """Holds data_dir/agent.lock (flock) for this process: one agent per data
    directory. A second one (started by hand beside the service) took over the
    status socket (pulsebridge status then described it, not the agent serving
    the boards), fought the first for the ports and for its MQTT client id,
    and ran the store's policies twice. Returns the lock's fd; StoreError
    names the agent that holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise StoreError("another pulsebridge agent (pid %s) is running on %s: stop it first (systemctl stop "
                         "pulsebridge-agent)" % (holder, data_dir)) from None
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.audit = AuditLog(cfg.audit_path)
        self._lock_fd = instance_lock(cfg.data_dir)  # before the store is opened (and maybe recovered)
        try:
            self.registry = Registry(cfg.registry_path, self.audit)
            self.store = Store(cfg.store_path, [b.name for b in cfg.backends], int(cfg.disk_quota_mb * 1024 * 1024))
            self.store.open()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.ingestor = Ingestor(self.store, self.registry)
        self.wake = asyncio.Event()
        subjects = Subjects(self.registry)
        self.forwarders: list[Forwarder] = [forwarders.make(b, self.store, cfg.hub_id, self.wake, subjects)
                                            for b in cfg.backends]
        self.links = LinkManager(self.ingestor, time_sync_s=cfg.time_sync_every_s)
        self.serial = SerialDiscovery(self.links, [SerialWant(sc.port, sc.usb_vid, sc.usb_pid, sc.baudrate)
                                                   for sc in cfg.serial])
        self.ble: BleManager | None = None
        if cfg.ble is not None:
            self.ble = BleManager(cfg.ble, self.ingestor, self.ingestor.hub.has_device, manager=self.links)
        self.tasks: dict[str, TaskHealth] = {}
        self.notifier = Notifier.from_env()
        self.alive = True  # what systemd was last told
        self.not_alive_reason = ""
        self._turns = {"registry": 0, "vitals": 0}
        rules = tuple(Rule(**r) for r in cfg.alert_rules) or DEFAULT_RULES
        self.vitals = VitalsEngine(AlertEngine(rules))
        self.vitals_queue: asyncio.Queue[FrameRecord] = asyncio.Queue(VITALS_QUEUE)
        self.vitals_skipped = 0
        self.vitals_made = 0
        self._derived_seq = int(time.time() * 1000) * 16
        self.ingestor.on_stored = self._to_vitals
        self.last_vitals: dict[str, dict[str, dict[str, Any]]] = {}
        # The last 4 s of each device's ECG and pleth (IR), for the status page.
        self.waves: dict[tuple[str, str], deque[int]] = {}
        self.started_at = time.time()
        self.status_page_port = 0
        self.password_recheck_s = PASSWORD_RECHECK_S
        self.status_page_state = "on" if cfg.status_page_password_file else "off: no status_page_password_file"
        self.page: StatusPage | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_commit(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake.set)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        log.info("pulsebridge agent %s starting (config %s, hub %s)", version(), self.cfg.source or "-",
                 self.cfg.hub_id)
        self.store.on_commit = self._on_commit
        self.store.start()
        self._recall()
        self.audit.record("agent.start", self.cfg.hub_id, config=str(self.cfg.source or ""),
                          backends=[b.name for b in self.cfg.backends], version=version())
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._supervised(name, factory), name=name)
                         for name, factory in self._loops()]
                tasks.append(tg.create_task(self._systemd(), name="systemd"))
                if stop is not None:
                    await stop.wait()
                    log.info("pulsebridge agent stopping")
                    self.notifier.notify(STOPPING=1)
                    for t in tasks:
                        t.cancel()
        finally:
            self.notifier.close()
            self.store.close()
            self.registry.close()
            os.close(self._lock_fd)
            log.info("pulsebridge agent %s stopped (config %s)", version(), self.cfg.source or "-")

    def _recall(self) -> None:
        # After a restart: each registered sensor's last frame and the alerts still raised, read back
        # from the store: a sensor silent across the restart is still told (and named), an alert still
        # raised is not raised twice.
        reader = self.store.reader()
        try:
            for d in self.registry.all():
                if d.state != "revoked":
                    at = Store.last_received(reader, d.device_id)
                    if at is not None:
                        self.vitals.last_seen.setdefault(d.device_id, at)
            for doc in Store.recent_alerts(reader, RECALLED_ALERTS):
                if isinstance(doc.get("device_id"), str) and isinstance(doc.get("alert"), str):
                    self.vitals.alerts.restore(doc["device_id"], doc["alert"], doc.get("state") == "raised")
        finally:
            reader.close()

    def _loops(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [("serial", self.serial.run)]
        if self.ble is not None:
            loops.append(("ble", self.ble.run))
        loops += [("forward:" + fw.name, fw.run) for fw in self.forwarders]
        loops += [("housekeeping", self._housekeeping), ("vitals", self._vitals)]
        if self.cfg.status_page_password_file:
            loops.append(("status-page", self._status_page))
        loops += [("registry", self._watch_registry), ("status", self._status_server)]
        return loops

    async def _supervised(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        health = self.tasks.setdefault(name, TaskHealth())
        backoff = Backoff(RESTART_BASE_S, RESTART_CAP_S)
        while True:
            started = time.monotonic()
            health.restarting = False
            try:
                await factory()
                return  # done by its own choice (the status page without its password file)
            except Exception as e:  # any bug in one task: logged, counted, restarted; the others go on
                health.restarts += 1
                health.last_error = "%s: %s" % (type(e).__name__, e)
                log.error("task %s crashed (restart %d): %s", name, health.restarts, health.last_error,
                          exc_info=e)
            if time.monotonic() - started > STABLE_TASK_S:
                backoff.reset()
            health.restarting = True
            await asyncio.sleep(backoff.next_delay())

    def _heartbeats(self) -> dict[str, int]:
        beats = {"serial": self.serial.polls, **self._turns}
        if self.ble is not None:
            beats["ble"] = self.ble.scans
        return beats

    async def _systemd(self) -> None:
        # READY once the tasks run; then WATCHDOG=1 at half WatchdogSec=, only
        # while every loop turns and the store's writer answers.
        n = self.notifier
        n.notify(READY=1, STATUS="serving boards", MAINPID=os.getpid())
        every_s = n.watchdog_s / 2 if n.watchdog_s else LIVENESS_EVERY_S
        last = self._heartbeats()
        moved = dict.fromkeys(last, time.monotonic())
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            beats = self._heartbeats()
            for k, v in beats.items():
                if last.get(k) != v:
                    moved[k] = now
            last = beats
            stuck = sorted(k for k, at in moved.items() if now - at > LOOP_STUCK_S)
            why = ("loop %s not turning" % ", ".join(stuck)) if stuck else ""
            if not why and self.store.fault is None:  # a store retrying a failed commit is busy, not hung
                try:
                    async with asyncio.timeout(min(every_s, LOOP_STUCK_S)):
                        await self.store.run(lambda db: None)
                except StoreError:
                    pass  # the store answers, with an error: its own retry and status say the rest
                except TimeoutError:
                    why = "the store is not answering"
            if why:
                if self.alive or why != self.not_alive_reason:
                    log.error("not telling systemd the agent is alive: %s", why)
                self.alive, self.not_alive_reason = False, why
                n.notify(STATUS="stuck: " + why)
                continue
            if not self.alive:
                log.warning("the agent's loops turn again")
            self.alive, self.not_alive_reason = True, ""
            if n.watchdog_s:
                n.notify(WATCHDOG=1)

    def _to_vitals(self, frame: FrameRecord) -> None:
        self.vitals.last_seen[frame.device_id] = time.time()  # heard, even when the vitals queue is full
        try:
            self.vitals_queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.vitals_skipped += 1

    async def _vitals(self) -> None:
        next_silence = time.monotonic() + SILENCE_CHECK_S
        while True:
            self._turns["vitals"] += 1
            f: FrameRecord | None
            try:
                async with asyncio.timeout(SILENCE_CHECK_S):
                    f = await self.vitals_queue.get()
            except TimeoutError:
                f = None
            docs: list[dict[str, Any]] = []
            if f is not None:  # its samples decoded once, at ingest
                docs = self.vitals.frame(f, f.device_id, f.start_utc_s()[0], f.key)
                name = "ppg" if f.stream == messages.STREAM_PPG_MAX30102 else "ecg"
                wave = self.waves.setdefault((f.device_id, name), deque(maxlen=4 * f.rate_hz))
                wave.extend(f.channels[-1].tolist())  # ECG, or the IR pleth
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
        from agent.status_page import PasswordFileError, read_password

        assert self.cfg.status_page_password_file is not None
        said = ""
        while True:
            try:
                password = read_password(self.cfg.status_page_password_file)
                break
            except PasswordFileError as e:  # no page, the boards are served all the same
                self.status_page_state = "off: %s" % e
                if str(e) != said:  # said once, and again when it changes
                    said = str(e)
                    if e.missing:
                        log.warning("status page off: %s (create it, mode 0600, to have the page)", e)
                    else:
                        log.error("status page off: %s", e)
            # Looked at again: a file made or fixed (as the message says) brings the page up, no restart.
            await asyncio.sleep(self.password_recheck_s)
        if said:
            log.info("status page password file %s is fine now: the page starts", self.cfg.status_page_password_file)
        host, _, port = self.cfg.status_page_listen.rpartition(":")
        page = self.page = StatusPage(self.snapshot, self.waveform, password)
        try:
            self.status_page_port = await page.start(host or "0.0.0.0", int(port))
            self.status_page_state = "on"
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
            self._turns["registry"] += 1
            now = _mtime(path)
            if now != seen:
                seen = now
                for dev in self.ingestor.reload_devices():  # erased: nothing of it stays in memory either
                    self.vitals.forget(dev)
                    self.last_vitals.pop(dev, None)
                    for key in [k for k in self.waves if k[0] == dev]:
                        del self.waves[key]
                    # What was verified before it was refused is committed first (the writer's queue
                    # is in order), then erased with it.
                    late = await self.store.run(functools.partial(self.store.erase_device, device_id=dev))
                    log.info("device %s erased: its frames are refused from now on (%d stored meanwhile, erased)",
                             dev, late)
                self.links.registry_changed()
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
            oldest = Store.oldest_waiting(reader, [f.name for f in self.forwarders])
            counters = Store.counters(reader)
        finally:
            reader.close()
        boards = self.links.snapshot(OUT_OF_RANGE_S)
        now = time.time()
        return {
            "now": now, "hub_id": self.cfg.hub_id, "uptime_s": round(now - self.started_at, 1), "boards": boards,
            "ble_adapter": ({"state": self.ble.adapter, "error": self.ble.adapter_error,
                             "losses": self.ble.adapter_losses} if self.ble is not None else None),
            "backends": [{"name": f.name, "type": f.cfg.type, "state": f.state.value, "backlog": backlog.get(f.name, 0),
                          "forwarded": f.forwarded, "failures": f.failures, "refused": f.refused,
                          "last_error": f.last_error, "last_delivered_at": f.last_delivered_at,
                          "failing_since": f.failing_since, "oldest_waiting_at": oldest.get(f.name)}
                         for f in self.forwarders],
            "rejects": dict(self.ingestor.rejects), "store": self.store.status(),
            "sensors": [{"device_id": d.device_id, "label": d.label, "heard_at": self.vitals.last_seen.get(d.device_id)}
                        for d in self.registry.all() if d.state == "active"],
            "alert_rules": [{"name": r.name, "signal": r.signal, "low": r.low, "high": r.high}
                            for r in self.vitals.alerts.rules],
            "last_vitals": self.last_vitals, "status_page": self.status_page_state,
            "status_page_clients": self.page.stats() if self.page is not None else None,
            "vitals": {"made": self.vitals_made, "skipped_frames": self.vitals_skipped,
                       "active_alerts": [list(a) for a in self.vitals.alerts.active()]},
            "counters": counters,
            "link_ends": dict(self.links.ends),
            "tasks": {name: {"restarts": h.restarts, "last_error": h.last_error, "restarting": h.restarting}
                      for name, h in self.tasks.items()},
            "systemd": {"notify": self.notifier.enabled, "watchdog_s": self.notifier.watchdog_s,
                        "alive": self.alive, "reason": self.not_alive_reason},
            "version": version(),
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
