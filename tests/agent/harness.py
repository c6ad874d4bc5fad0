"""Pieces the agent's integration tests assemble: real components only.

Simulated boards (firmware under micropython on ptys), the embedded HTTPS
backend in its own thread, the agent in-process or as a subprocess that can
be killed, and helpers that read what crossed the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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


async def _async(fn: Any) -> Any:
    return fn()


def start_boards(tmp: Path, n: int, micropython: str, **spec_kw: Any) -> list[SimulatedBoard]:
    sims = []
    for i in range(n):
        spec = boards.BoardSpec("pb-t%02d" % (i + 1), seed=i + 1, **spec_kw)
        sim = SimulatedBoard(spec, tmp / "boards" / spec.device_id, tmp / "cache", micropython)
        sim.record = True
        sim.start()
        sims.append(sim)
    return sims


def register(data_dir: Path, log_dir: Path, sims: list[SimulatedBoard], patient_ref: str = "") -> None:
    reg = Registry(data_dir / "registry.db", AuditLog(log_dir / "audit.log"))
    for sim in sims:
        reg.add(sim.device_id, label="test board", patient_ref=patient_ref, key=sim.spec.key, actor="test")
    reg.close()


def write_config(tmp: Path, sims: list[SimulatedBoard], backends: str, extra: str = "") -> Path:
    serial = "".join('[[serial]]\nport = "%s"\n\n' % sim.link_path for sim in sims)
    text = ('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n%s\n%s%s' % (
        tmp / "data", tmp / "log", tmp / "run", extra, serial, backends))
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def webhook(pki: Pki, port: int, name: str = "local") -> str:
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
