"""Pieces the agent's integration tests assemble: real components only.

Simulated boards (firmware under micropython on ptys), the embedded HTTPS
backend in its own thread, the agent in-process or as a subprocess that can
be killed, and helpers that read what crossed the wire.

Most tests start from a `Hub` (the `make_hub` fixture in conftest.py):
boards streaming, registered, a configuration naming them, perhaps the
backend; they run the agent with `running(Agent(hub.cfg))`, say what their
scenario is about, and end with `finish` (boards stopped, backlog drained).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from agent import config as agent_config
from agent.audit import AuditLog
from agent.dev.local_backend import LocalBackend
from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard
from agent.dev.tlsgen import Pki, make_pki
from agent.registry import Registry
from agent.supervisor import Agent
from protocols import cose, hub_link, messages
from tests.conftest import ROOT
from tests.waiting import async_wait_for

# How long an agent may take to start serving (store opened, perhaps recovered) on a loaded machine.
AGENT_START_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedBackend:
    """The local HTTPS backend, served from a thread with its own event loop."""

    def __init__(self, directory: Path, keys: dict[str, bytes], pki: Pki) -> None:
        self.backend = LocalBackend(directory / "backend.db", keys)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.pki = pki
        self.up()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def up(self) -> None:
        self.call(self.backend.start("127.0.0.1", self.port, self.pki.server_cert, self.pki.server_key))

    def down(self) -> None:
        self.call(self.backend.stop())

    def summary(self) -> dict[str, Any]:
        return self.call(_async(self.backend.summary))  # type: ignore[no-any-return]

    def keys(self) -> set[str]:
        return self.call(_async(self.backend.keys_received))  # type: ignore[no-any-return]

    def close(self) -> None:
        self.down()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.backend.db.close()


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    """Runs the agent as the service runs it (on this loop), from when its status socket is there
    until the block ends; then stops it and waits for it to end. Set the agent up before."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await async_wait_for(lambda: agent.cfg.status_socket.exists() or task.done(), AGENT_START_S,
                             "the agent serving its status socket")
        if task.done():
            await task  # it ended on its own: its error, here
        yield agent
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def refused_by_a_webhook(tmp_path: Path, reason: str, frames: int,
                               backend_toml: str = "") -> AsyncIterator[tuple[Path, Agent]]:
    """A running agent whose one backend (webhook "hopital", on a local aiohttp server) answers
    every batch 400 with `reason` as its body, once `frames` frames of pb-t01 were stored for it;
    yields (the configuration's path, the agent). backend_toml adds settings to its table."""
    from aiohttp import web

    from agent.store import Store
    from tests.agent.test_mqtt import _store_frames

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=400, text=reason)

    app = web.Application()
    app.router.add_post("/ingest", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        path = tmp_path / "agent.toml"
        path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n'
                        '[[backend]]\nname = "hopital"\ntype = "webhook"\nurl = "http://127.0.0.1:%d/ingest"\n'
                        'insecure = true\nlinger_s = 0\n%s' % (tmp_path / "data", tmp_path / "log",
                                                               tmp_path / "run", port, backend_toml))
        cfg = agent_config.load(path)
        store = Store(cfg.store_path, ["hopital"])
        store.start()
        try:
            await asyncio.to_thread(_store_frames, store, "pb-t01", range(frames))
        finally:
            store.close()
        async with running(Agent(cfg)) as agent:
            yield path, agent
    finally:
        await runner.cleanup()


async def _async(fn: Any) -> Any:
    return fn()


def board_state(agent: Agent, device_id: str) -> dict[str, Any]:
    """The agent's snapshot of one board's link ({} while it has none)."""
    return board_state_in(agent.snapshot(), device_id)


def board_state_in(snapshot: dict[str, Any], device_id: str) -> dict[str, Any]:
    """One board's link in an agent's snapshot ({} if it has none)."""
    for b in snapshot["boards"]:
        if b["device_id"] == device_id:
            return b  # type: ignore[no-any-return]
    return {}


async def drained(agent: Agent, timeout_s: float) -> None:
    """Waits until every backend's backlog is empty."""
    await async_wait_for(lambda: all(b["backlog"] == 0 for b in agent.snapshot()["backends"]), timeout_s,
                         "every backend's backlog drained", lambda: agent.snapshot()["backends"])


async def stop_boards(sims: Sequence[SimulatedBoard]) -> None:
    """Stops the boards (off the loop: the agent serving them keeps running)."""
    await asyncio.to_thread(lambda: [s.stop() for s in sims])


async def finish(agent: Agent, sims: Sequence[SimulatedBoard], drain_s: float = 30) -> None:
    """A scenario's usual end: the boards stop (nothing more can come), then every backlog drains."""
    await stop_boards(sims)
    await drained(agent, drain_s)


class Hub:
    """What an integration test of the agent starts from, under one test directory: simulated boards
    streaming on their ptys (ids pb-t01, pb-t02...), registered in the hub's registry, the agent's
    configuration (hub id "test-hub") naming their ports, and, when asked, the local HTTPS backend
    ("local", a webhook) that checks every frame it gets. `close` stops everything it started, and
    whatever the test handed to `defer`. Made through the `make_hub` fixture, which closes it."""

    def __init__(self, tmp: Path, micropython: str, pki: Pki, cache: Path | None = None) -> None:
        self.tmp = tmp
        self.cache = cache or tmp / "cache"  # the boards' compiled firmware and waveforms
        self.micropython = micropython
        self.pki = pki  # the test's CA, server and client certificates
        self.sims: list[SimulatedBoard] = []
        self._backend: ThreadedBackend | None = None
        self.config_path = tmp / "agent.toml"
        self._cfg: agent_config.AgentConfig | None = None
        self._closers: list[Callable[[], Any]] = []

    def start(self, boards: int, *, webhook: bool = False, backends: str = "", settings: str = "", listed: bool = True,
              label: str = "test board", patients: Sequence[str] = (), data_dir: Path | None = None,
              **spec_kw: Any) -> Hub:
        """Starts `boards` boards (spec_kw: BoardSpec fields), the backend if `webhook`, registers the
        boards as provisioning does (with `label` and their chips' ids; board i with patients[i] where
        given) and writes the configuration: the boards' ports as [[serial]] sections unless not
        `listed`, the webhook then `backends` (TOML text), `settings` (TOML text) in [agent];
        `data_dir` replaces tmp/data."""
        self.sims = start_boards(self.tmp, boards, self.micropython, cache=self.cache, **spec_kw)
        self.defer(lambda: [s.stop() for s in self.sims])
        if webhook:
            self._backend = ThreadedBackend(self.tmp, {s.device_id: s.spec.key for s in self.sims}, self.pki)
            self.defer(self._backend.close)
        reg = Registry((data_dir or self.tmp / "data") / "registry.db", AuditLog(self.tmp / "log" / "audit.log"))
        try:
            for i, sim in enumerate(self.sims):
                reg.add(sim.device_id, label=label, patient_ref=patients[i] if i < len(patients) else "",
                        key=sim.spec.key, actor="test", unique_id=sim.spec.unique_id)
        finally:
            reg.close()
        self.configure((webhook_section(self.pki, self._backend.port) if self._backend else "") + backends,
                       settings=settings, listed=listed, data_dir=data_dir)
        return self

    def configure(self, backends: str = "", settings: str = "", listed: bool = True,
                  data_dir: Path | None = None) -> agent_config.AgentConfig:
        """(Re)writes the agent's configuration file (as `start` says) and loads it as `cfg`."""
        write_config(self.tmp, self.sims if listed else [], backends, settings, data_dir)
        self._cfg = agent_config.load(self.config_path)
        return self._cfg

    @property
    def cfg(self) -> agent_config.AgentConfig:
        assert self._cfg is not None, "configure() first"
        return self._cfg

    @property
    def backend(self) -> ThreadedBackend:
        """The local HTTPS backend (started with webhook=True)."""
        assert self._backend is not None, "start(webhook=True) first"
        return self._backend

    @property
    def board(self) -> SimulatedBoard:
        """The first (often the only) board."""
        return self.sims[0]

    def defer(self, close: Callable[[], Any]) -> None:
        """Has `close` called when the hub closes (last deferred, first called)."""
        self._closers.append(close)

    def acked(self) -> set[tuple[str, int, int]]:
        """Every (device, epoch, seq) an authentic ack to any board covered."""
        out: set[tuple[str, int, int]] = set()
        for sim in self.sims:
            out |= acked(sim)
        return out

    def undelivered(self) -> set[tuple[str, int, int]]:
        """The acknowledged frames the backend does not hold."""
        keys = self.backend.keys()
        return {a for a in self.acked() if "%s:%d:%d" % a not in keys}

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


def start_boards(tmp: Path, n: int, micropython: str, cache: Path | None = None,
                 **spec_kw: Any) -> list[SimulatedBoard]:
    sims = []
    for i in range(n):
        spec = boards.BoardSpec("pb-t%02d" % (i + 1), seed=i + 1, **spec_kw)
        sim = SimulatedBoard(spec, tmp / "boards" / spec.device_id, cache or tmp / "cache", micropython)
        sim.record = True
        sim.start()
        sims.append(sim)
    return sims


def write_config(tmp: Path, sims: Sequence[SimulatedBoard], backends: str, extra: str = "",
                 data_dir: Path | None = None) -> Path:
    """Writes tmp/agent.toml: hub "test-hub", data, logs and run files under tmp (data in `data_dir` if given),
    `extra` in [agent], a [[serial]] section per board, then `backends` (TOML text)."""
    serial = "".join('[[serial]]\nport = "%s"\n\n' % sim.link_path for sim in sims)
    text = ('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n%s\n%s%s' % (
        data_dir or tmp / "data", tmp / "log", tmp / "run", extra, serial, backends))
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def webhook_section(pki: Pki, port: int, name: str = "local") -> str:
    return '[[backend]]\nname = "%s"\ntype = "webhook"\nurl = "https://127.0.0.1:%d/ingest"\nca_file = "%s"\n' % (
        name, port, pki.ca_cert)


def agent_process(config: Path) -> subprocess.Popen[bytes]:
    log = open(config.parent / "agent.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
    finally:
        log.close()


def acked(sim: SimulatedBoard) -> set[tuple[str, int, int]]:
    """Every (device, epoch, seq) an authentic ack on the wire covered."""
    _, down = sim.taps()
    key = cose.MacKey(sim.spec.key, sim.device_id.encode(), cose.AAD_DOWNLINK)
    d = hub_link.LineQueue()
    out = set()
    raws = []
    for i in range(0, len(down), 64):  # as a board reads: a little at a time
        d.feed(down[i:i + 64])
        while (raw := d.next_message()) is not None:
            raws.append(raw)
    assert d.flooded == 0
    for raw in raws:
        msg = cose.parse(raw)
        key.verify(msg)
        m = messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)
        if isinstance(m, messages.Ack):
            for a, b in m.ranges:
                out.update((sim.device_id, m.epoch, s) for s in range(a, b + 1))
    return out


def uplink_messages(sim: SimulatedBoard) -> list[bytes]:
    return sim.uplink_messages()


def pki_for(tmp: Path) -> Pki:
    return make_pki(tmp / "pki")


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, 9)
    proc.wait()
