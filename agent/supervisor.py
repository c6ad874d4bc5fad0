"""The agent: named tasks under a supervisor that restarts them.

The supervisor builds the agent's parts and runs each as a named task:
serial discovery (USB ports found by identity, agent/links.py) and the BLE
manager (agent/ble_links.py), both handing the boards they find to one link
manager (sessions, watchdog, reconnect policy, agent/links.py); one
forwarder per backend (agent/forwarders/); the vitals runner
(agent/vitals/runner.py); store maintenance (agent/maintenance.py); the
registry watcher (agent/registry_watch.py); the status socket and page
(agent/status_server.py); and the systemd notifier, here.

A task that raises is logged with its traceback, counted and restarted
after a capped, jittered backoff: one bug never takes the boards down. The
agent tells systemd it is alive (sd_notify WATCHDOG=1) only while its loops
turn and the store answers; otherwise systemd restarts it (WatchdogSec=).
Every wait on the outside world is bounded by a timeout. SQLite work runs
on the store's writer thread, or (the status's figures) on a thread of its
own: nothing synchronous and slow runs on the event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from agent import forwarders, gc_tuning
from agent.audit import AuditError, AuditLog
from agent.ble_links import OUT_OF_RANGE_S, BleManager
from agent.config import AgentConfig, listen_address
from agent.forwarders.base import Backoff, Forwarder, Subjects
from agent.ingest import Ingestor
from agent.links import LinkManager, SerialDiscovery, SerialWant
from agent.maintenance import StoreMaintenance
from agent.record import FrameRecord
from agent.registry import Registry
from agent.registry_watch import RegistryWatcher
from agent.sdnotify import Notifier
from agent.status_server import StatusServer
from agent.store import Store, StoreError
from agent.vitals.alerts import DEFAULT_RULES, AlertEngine, Rule
from agent.vitals.engine import VitalsEngine
from agent.vitals.runner import VitalsRunner

log = logging.getLogger(__name__)

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
    try:
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
    except OSError:  # a full card: the lock holds all the same (a second agent names no pid); the store says why
        pass
    return fd


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.audit = AuditLog(cfg.audit_path)
        self._lock_fd = instance_lock(cfg.data_dir)  # before the store is opened (and maybe recovered)
        try:
            # A card too full to write at start (a power cut on a full card): the registry and the store
            # are opened for reading only, the status says so, and the store's writer opens it for
            # writing once it can; the boards' frames wait on them meanwhile, none acknowledged.
            self.registry = Registry(cfg.registry_path, self.audit, read_only_if_unwritable=True)
            if self.registry.read_only:
                log.error("%s: registry changes are seen once they can be written", self.registry.read_only)
            self.store = Store(cfg.store_path, [b.name for b in cfg.backends], int(cfg.disk_quota_mb * 1024 * 1024),
                               commit_interval_s=cfg.commit_interval_ms / 1000)
            self.store.open(read_only_if_unwritable=True)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.ingestor = Ingestor(self.store, self.registry)
        # One wake-up event a forwarder (each clears its own before it reads the outbox), set at
        # each commit.
        self.wakes: list[asyncio.Event] = []
        subjects = Subjects(self.registry)
        self.forwarders: list[Forwarder] = []
        for b in cfg.backends:
            self.wakes.append(asyncio.Event())
            self.forwarders.append(forwarders.make(b, self.store, cfg.hub_id, self.wakes[-1], subjects))
        self.links = LinkManager(self.ingestor, time_sync_s=cfg.time_sync_every_s)
        self.links.ota_run_dir = cfg.run_dir
        self.serial = SerialDiscovery(self.links, [SerialWant(sc.port, sc.usb_vid, sc.usb_pid, sc.baudrate)
                                                   for sc in cfg.serial])
        self.ble: BleManager | None = None
        if cfg.ble is not None:
            self.ble = BleManager(cfg.ble, self.ingestor, self.ingestor.hub.has_device, manager=self.links)
        self.tasks: dict[str, TaskHealth] = {}
        self.notifier = Notifier.from_env()
        self.alive = True  # what systemd was last told
        self.not_alive_reason = ""
        rules = tuple(Rule(**r) for r in cfg.alert_rules) or DEFAULT_RULES
        self.vitals = VitalsEngine(AlertEngine(rules))
        self.vitals_runner = VitalsRunner(self.store, self.vitals, self.ingestor.hub.has_device)
        self.ingestor.on_stored = self._stored
        self.frames_stored: Counter[str] = Counter()  # since start, per registered board (metrics)
        self.frames_stored_by_epoch: Counter[tuple[str, int]] = Counter()  # ... per (board, boot epoch)
        self.metrics_port = 0
        self.maintenance = StoreMaintenance(self.store, cfg.retention_days)
        self.registry_watch = RegistryWatcher(self.registry, self.ingestor, self.store, self.links,
                                              on_erased=self.vitals_runner.forget)
        self.status = StatusServer(cfg, self.status_snapshot, self.vitals_runner.waveform)
        self.started_at = time.time()

    def _wake_forwarders(self) -> None:
        for wake in self.wakes:
            wake.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        log.info("pulsebridge agent %s starting (config %s, hub %s): %s", version(), self.cfg.source or "-",
                 self.cfg.hub_id, self.found())
        self.store.on_commit = self._wake_forwarders  # on this loop, after each commit
        self.store.start()
        self.vitals_runner.recall(self.registry)
        try:
            self.audit.record("agent.start", self.cfg.hub_id, config=str(self.cfg.source or ""),
                              backends=[b.name for b in self.cfg.backends], version=version())
        except AuditError as e:  # a full card: the boards come before the record of this start
            log.error("%s: this start is not recorded in it", e)
        restore_gc = gc_tuning.tune()  # start-up done: its objects frozen, a larger young generation
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
            restore_gc()
            self.notifier.close()
            self.store.close()
            self.registry.close()
            os.close(self._lock_fd)
            log.info("pulsebridge agent %s stopped (config %s)", version(), self.cfg.source or "-")

    def found(self) -> str:
        """What the agent found at start, in one line for its log."""
        devices = self.registry.all()
        active = sum(1 for d in devices if d.state == "active")
        serial = ", ".join(sc.port or "USB %04x:%04x" % (sc.usb_vid or 0, sc.usb_pid or 0) for sc in self.cfg.serial)
        reader = self.store.reader()
        try:
            backlog = Store.backlog(reader)
        finally:
            reader.close()
        return "%d boards registered (%d active); backends: %s; serial: %s; BLE: %s; store %s (backlog %s); " \
               "status page %s; metrics %s" % (
                   len(devices), active,
                   ", ".join("%s (%s)" % (b.name, b.type) for b in self.cfg.backends) or "none",
                   serial or "any pulsebridge board", self.cfg.ble.adapter if self.cfg.ble else "off",
                   self.cfg.store_path, backlog or "none", self.status.page_state,
                   ("on " + self.cfg.metrics_listen) if self.cfg.metrics_listen else "off")

    def _stored(self, frame: FrameRecord) -> None:
        self.frames_stored[frame.device_id] += 1
        self.frames_stored_by_epoch[(frame.device_id, frame.epoch)] += 1
        self.vitals_runner.offer(frame)

    async def _metrics(self) -> None:
        from agent.metrics import MetricsServer

        assert self.cfg.metrics_listen is not None
        host, port = listen_address(self.cfg.metrics_listen)  # checked when the configuration was read

        async def snapshot() -> dict[str, Any]:
            return dict(await self.status_snapshot(), frames_stored=dict(self.frames_stored))

        server = MetricsServer(snapshot)
        try:
            self.metrics_port = await server.start(host, port)
            log.info("metrics for Prometheus on http://%s:%d/metrics", host, self.metrics_port)
            await asyncio.Event().wait()  # serves until cancelled
        finally:
            await server.stop()

    def _loops(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [("serial", self.serial.run)]
        if self.ble is not None:
            loops.append(("ble", self.ble.run))
        loops += [("forward:" + fw.name, fw.run) for fw in self.forwarders]
        loops += [("housekeeping", self.maintenance.run), ("vitals", self.vitals_runner.run)]
        if self.cfg.status_page_password_file:
            loops.append(("status-page", self.status.serve_page))
        if self.cfg.metrics_listen:
            loops.append(("metrics", self._metrics))
        loops += [("registry", self.registry_watch.run), ("status", self.status.serve_socket)]
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
        beats = {"serial": self.serial.polls, "registry": self.registry_watch.turns, "vitals": self.vitals_runner.turns}
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

    # ---- status ---------------------------------------------------------------

    def store_figures(self) -> dict[str, Any]:
        """What the status reads from the store: per backend its backlog and when its oldest waiting
        frame was received, and the store's counters. A read connection of its own, so callable from
        any thread (the status servers call it on one, off the event loop); one read transaction, so
        the figures agree with each other (a row that left a backlog for the quarantine is counted
        refused in the same figures, never in neither nor in both)."""
        reader = self.store.reader()
        try:
            reader.execute("BEGIN")
            return {"backlog": Store.backlog(reader),
                    "oldest": Store.oldest_waiting(reader, [f.name for f in self.forwarders]),
                    "counters": Store.counters(reader)}
        finally:
            reader.close()

    async def status_snapshot(self) -> dict[str, Any]:
        """snapshot(), its store figures read on a thread: what the status socket and page serve."""
        return self.snapshot(await asyncio.to_thread(self.store_figures))

    def snapshot(self, figures: dict[str, Any] | None = None) -> dict[str, Any]:
        """The agent's state for `pulsebridge status` and the status page (JSON-ready). Without
        figures (store_figures()), they are read here, on the caller's thread."""
        figures = figures if figures is not None else self.store_figures()
        backlog, oldest, counters = figures["backlog"], figures["oldest"], figures["counters"]
        boards = self.links.snapshot(OUT_OF_RANGE_S)
        last_seen = self.vitals.last_seen
        now = time.time()
        return {
            "now": now, "hub_id": self.cfg.hub_id, "uptime_s": round(now - self.started_at, 1), "boards": boards,
            "ble_adapter": ({"state": self.ble.adapter, "error": self.ble.adapter_error,
                             "losses": self.ble.adapter_losses} if self.ble is not None else None),
            "backends": [{"name": f.name, "type": f.cfg.type, "state": f.state.value, "backlog": backlog.get(f.name, 0),
                          "forwarded": f.forwarded, "failures": f.failures,
                          "refused": counters.get("refused:" + f.name, 0),
                          "last_error": f.last_error, "last_delivered_at": f.last_delivered_at,
                          "failing_since": f.failing_since, "refused_since": f.refused_since,
                          "oldest_waiting_at": oldest.get(f.name)}
                         for f in self.forwarders],
            "rejects": dict(self.ingestor.rejects), "store": self.store.status(),
            "sensors": [{"device_id": d.device_id, "label": d.label, "heard_at": last_seen.get(d.device_id)}
                        for d in self.registry_watch.active],
            "registry_damaged": self.registry_watch.damaged,
            "alert_rules": [{"name": r.name, "signal": r.signal, "low": r.low, "high": r.high}
                            for r in self.vitals.alerts.rules],
            "last_vitals": self.vitals_runner.last_vitals, "status_page": self.status.page_state,
            "status_page_clients": self.status.page.stats() if self.status.page is not None else None,
            "vitals": {"made": self.vitals_runner.made, "skipped_frames": self.vitals_runner.skipped,
                       "active_alerts": [list(a) for a in self.vitals.alerts.active()]},
            "counters": counters,
            "link_ends": dict(self.links.ends),
            "tasks": {name: {"restarts": h.restarts, "last_error": h.last_error, "restarting": h.restarting}
                      for name, h in self.tasks.items()},
            "systemd": {"notify": self.notifier.enabled, "watchdog_s": self.notifier.watchdog_s,
                        "alive": self.alive, "reason": self.not_alive_reason},
            "version": version(),
        }
