# The agent and systemd: READY, then WATCHDOG only while the agent's loops
# and its store make progress, STOPPING at the end; over a real Unix
# datagram socket, as systemd's $NOTIFY_SOCKET is.
import asyncio
import gc
import logging
import socket
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent import gc_tuning
from agent.sdnotify import Notifier
from agent.supervisor import Agent
from tests.agent import harness
from tests.waiting import async_wait_for


class SystemdSocket:
    """The listening end of $NOTIFY_SOCKET, as systemd holds it."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.received
            self.received.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()


def test_watchdog_only_while_the_loops_make_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture,
                                                     hub_config: agent_config.AgentConfig) -> None:
    systemd = SystemdSocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4: a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = hub_config
    try:
        async def scenario() -> dict[str, Any]:
            agent = Agent(cfg)
            hang = threading.Event()
            go_on = threading.Event()
            apply = agent.store._apply

            def stuck(db: sqlite3.Connection, batch: Any) -> Any:  # fault injection: the store's writer hangs
                if hang.is_set():
                    go_on.wait(30)
                return apply(db, batch)

            agent.store._apply = stuck  # type: ignore[method-assign]
            async with harness.running(agent):
                msgs = systemd.poll
                await async_wait_for(lambda: sum("WATCHDOG" in m for m in msgs()) >= 3, 20, "three watchdog pings",
                                     msgs)
                assert msgs()[0]["READY"] == "1" and msgs()[0]["MAINPID"]
                hang.set()
                agent.store.submit_reject("test", "test", None, b"x")  # a write: the writer takes it, and hangs
                await async_wait_for(lambda: any(m.get("STATUS", "").startswith("stuck") for m in msgs()), 20,
                                     "a 'stuck' status", msgs)
                stuck_at = next(i for i, m in enumerate(msgs()) if m.get("STATUS", "").startswith("stuck"))
                await async_wait_for(lambda: len(msgs()) >= stuck_at + 4, 20, "three more checks, still stuck", msgs)
                assert not any("WATCHDOG" in m for m in msgs()[stuck_at:]), msgs()[stuck_at:]
                snap = agent.snapshot()
                assert snap["systemd"]["alive"] is False and "store" in snap["systemd"]["reason"]
                go_on.set()
                hang.clear()
                n = len(msgs())
                await async_wait_for(lambda: any("WATCHDOG" in m for m in msgs()[n:]), 20, "a watchdog ping again",
                                     msgs)
                assert agent.snapshot()["systemd"]["alive"] is True
            assert msgs()[-1] == {"STOPPING": "1"}
            return snap

        with caplog.at_level(logging.INFO, logger="agent.supervisor"):
            asyncio.run(scenario())
        text = caplog.text
        assert "starting (config %s" % cfg.source in text and "stopped (config %s)" % cfg.source in text
        assert "not telling systemd the agent is alive: the store is not answering" in text
    finally:
        systemd.close()


def test_notifier_speaks_to_an_abstract_socket_and_is_silent_outside_systemd(tmp_path: Path) -> None:
    name = "pulsebridge-test-%d" % id(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert n.watchdog_s == 30.0
        assert n.notify(READY=1, STATUS="serving boards")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving boards"
        n.close()
    finally:
        sock.close()
    quiet = Notifier.from_env({})
    assert not quiet.enabled and not quiet.notify(READY=1) and quiet.watchdog_s is None
    other = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None  # the watchdog was meant for another process
    assert not other.notify(READY=1)  # no systemd there: said once in the log, never raised
    other.close()


def _held_until_released(fn: Callable[..., Any], entered: threading.Event, release: threading.Event,
                         on_loop: list[bool]) -> Callable[..., Any]:
    """fn on a slow disk (fault injected): each call notes whether it runs on an event loop's
    thread, says it has begun, and blocks until released (at most 10 s)."""
    def held(*args: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        entered.set()
        release.wait(10)
        return fn(*args)
    return held


def test_the_status_socket_reads_the_store_off_the_event_loop(monkeypatch: pytest.MonkeyPatch,
                                                              hub_config: agent_config.AgentConfig) -> None:
    # A slow disk (fault injected: the backlog's COUNT blocks until released) must not stop the loop
    # that serves the boards: `pulsebridge status` is answered with the store read on another thread.
    from agent.status_server import read_status
    from agent.store import Store

    entered, release = threading.Event(), threading.Event()
    on_loop: list[bool] = []
    slow_backlog = _held_until_released(Store.backlog, entered, release, on_loop)

    cfg = hub_config

    async def scenario() -> dict[str, Any]:
        async with harness.running(Agent(cfg)) as agent:
            monkeypatch.setattr(Store, "backlog", staticmethod(slow_backlog))
            asked = asyncio.create_task(read_status(cfg.status_socket, timeout_s=60))
            await async_wait_for(entered.is_set, 30, "the status request reading the store")
            beats = agent.vitals_runner.turns + agent.registry_watch.turns
            await async_wait_for(lambda: agent.registry_watch.turns + agent.vitals_runner.turns > beats, 30,
                                 "the agent's loops turning while the store is slow")
            release.set()
            return await asyncio.wait_for(asked, 60)

    snap = asyncio.run(scenario())
    assert snap["hub_id"] == "test-hub"
    assert on_loop == [False]


def test_a_registry_change_is_read_off_the_event_loop(monkeypatch: pytest.MonkeyPatch,
                                                     hub_config: agent_config.AgentConfig) -> None:
    # `pulsebridge devices add` beside the running agent, on a slow disk (fault injected: reading the
    # store's replay windows blocks until released): the registry watcher reads the registry and the
    # windows on another thread (never the store writer's connection), so the loop that serves the
    # boards keeps turning; the new board is known once the read is done. (Before: read on the loop.)
    from agent.audit import AuditLog
    from agent.registry import Registry
    from agent.store import Store

    entered, release = threading.Event(), threading.Event()
    on_loop: list[bool] = []
    slow_load_windows = _held_until_released(Store.load_windows, entered, release, on_loop)

    cfg = hub_config

    async def scenario() -> None:
        async with harness.running(Agent(cfg)) as agent:
            monkeypatch.setattr(Store, "load_windows", slow_load_windows)
            reg = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
            try:
                reg.add("pb-slow01", label="chambre 4")
            finally:
                reg.close()
            await async_wait_for(entered.is_set, 30, "the registry watcher reading the store")
            beats = agent.vitals_runner.turns
            await async_wait_for(lambda: agent.vitals_runner.turns > beats, 30,
                                 "the agent's loops turning while the store is slow")
            assert not agent.ingestor.hub.has_device("pb-slow01")  # not before its read is done
            release.set()
            await async_wait_for(lambda: agent.ingestor.hub.has_device("pb-slow01"), 30, "the new board known")

    asyncio.run(scenario())
    assert on_loop and not any(on_loop)


def test_the_status_names_a_device_added_beside_the_running_agent_and_outlives_it(
        hub_config: agent_config.AgentConfig) -> None:
    # `pulsebridge devices add` while the agent runs: the status names the new sensor within the
    # registry's poll, and the agent's last snapshot can still be read once it stopped (the registry
    # closed with it: reading it there raised "Cannot operate on a closed database").
    from agent.audit import AuditLog
    from agent.registry import Registry

    cfg = hub_config

    async def scenario() -> Agent:
        async with harness.running(Agent(cfg)) as agent:
            assert agent.snapshot()["sensors"] == []
            reg = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
            try:
                reg.add("pb-new01", label="chambre 3")
            finally:
                reg.close()
            await async_wait_for(lambda: agent.snapshot()["sensors"], 30, "the new sensor named",
                                 lambda: agent.snapshot()["sensors"])
        return agent

    agent = asyncio.run(scenario())
    sensors = agent.snapshot()["sensors"]
    assert [(s["device_id"], s["label"]) for s in sensors] == [("pb-new01", "chambre 3")]


class _QueuedLink:
    """A fake link at the boundary: plays what the test puts in `uplink`, records what the hub sends."""

    name = "fake:queued"
    ack_linger_s = 0.0  # Transport's: acks at once, as a serial link's

    def __init__(self) -> None:
        self.uplink: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.discarded: dict[str, int] = {}

    async def open(self) -> None:
        pass

    async def receive(self) -> bytes:
        return await self.uplink.get()

    async def send(self, message: bytes) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        pass


def test_a_resent_frame_below_the_window_is_looked_up_off_the_event_loop(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    # A board resends a frame the hub committed long ago (below its 64-frame replay window): the
    # store says whether it holds those very bytes (a duplicate, acknowledged again). On a slow
    # disk (fault injected: the lookup blocks until released) the loop that serves every board
    # keeps turning; the resend is acknowledged once the lookup is done. (Before: read on the loop.)
    from agent.audit import AuditLog
    from agent.ingest import Ingestor
    from agent.registry import Registry
    from agent.session import BoardSession, BoardStats
    from agent.store import Store
    from protocols import cipher, cose, messages

    dev, key = "pb-old01", bytes(range(32))
    sealer = cipher.SampleCipher(key, bytes(16))
    up, down = (cose.MacKey(key, dev.encode(), aad) for aad in (cose.AAD_UPLINK, cose.AAD_DOWNLINK))

    def frame(seq: int) -> bytes:
        f = messages.SampleFrame(1, seq, 1, seq * 10, seq * 4, 512, 4, (1, 1), None, (0, 0, 0, 0), [[1, 2, 3, 4]])
        return up.seal(messages.encoded(f, sealer=sealer))

    def acked(sent: list[bytes]) -> list[int]:
        out = []
        for a in sent:
            msg = cose.parse(a)
            down.verify(msg)
            ack = messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)
            assert isinstance(ack, messages.Ack)
            out += [s for first, last in ack.ranges for s in range(first, last + 1)]
        return out

    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(dev, key=key, actor="test")
    store = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    store.start()
    entered, release = threading.Event(), threading.Event()
    on_loop: list[bool] = []
    slow_held_raw = _held_until_released(Store.held_raw, entered, release, on_loop)

    async def scenario() -> BoardStats:
        link = _QueuedLink()
        session = BoardSession(link, Ingestor(store, reg), BoardStats("", link.name))  # type: ignore[arg-type]
        task = asyncio.create_task(session.run())
        try:
            for seq in range(70):
                link.uplink.put_nowait(frame(seq))
            await async_wait_for(lambda: sorted(acked(link.sent)) == list(range(70)), 30, "70 frames acknowledged",
                                 lambda: len(acked(link.sent)))
            monkeypatch.setattr(Store, "held_raw", slow_held_raw)
            link.uplink.put_nowait(frame(0))  # its ack was lost: the board sends it again
            await async_wait_for(entered.is_set, 30, "the store looked up for the resent frame")
            turns = [0]

            async def beat() -> None:
                while True:
                    turns[0] += 1
                    await asyncio.sleep(0.01)

            beating = asyncio.create_task(beat())
            await async_wait_for(lambda: turns[0] >= 3, 30, "the loop turning while the store is slow")
            beating.cancel()
            assert acked(link.sent).count(0) == 1  # not before the store has answered
            release.set()
            await async_wait_for(lambda: acked(link.sent).count(0) == 2, 30, "the resend acknowledged again")
            return session.stats
        finally:
            release.set()
            task.cancel()

    try:
        stats = asyncio.run(scenario())
    finally:
        store.close()
        reg.close()
    assert on_loop == [False]
    assert stats.duplicates == 1 and not stats.rejects


def test_the_running_agent_freezes_its_start_up_and_widens_the_young_generation(
        hub_config: agent_config.AgentConfig) -> None:
    # agent/gc_tuning.py's settings hold while the agent runs: what start-up built (the agent itself)
    # frozen out of the collector's generations, the young generation YOUNG_THRESHOLD; an agent run
    # inside a longer process (this one) leaves the collector as it found it.
    before = gc.get_threshold(), gc.get_freeze_count()
    assert before[0][0] != gc_tuning.YOUNG_THRESHOLD

    async def scenario() -> dict[str, Any]:
        async with harness.running(Agent(hub_config)) as agent:
            return {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                    "agent_collectable": any(o is agent for o in gc.get_objects())}

    seen = asyncio.run(scenario())
    assert seen["threshold"] == (gc_tuning.YOUNG_THRESHOLD, *before[0][1:])
    assert seen["frozen"] > before[1]
    assert seen["agent_collectable"] is False  # frozen: no collection walks it again
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
