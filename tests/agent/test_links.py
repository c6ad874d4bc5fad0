# Board links that fail in the middle: the session ends, the link manager
# reopens it, the state the hub reports is the truth, and every frame a
# board was acknowledged for reaches the backend. Real simulated boards
# (firmware under micropython on ptys), the real agent, the HTTPS backend.
import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent.sim.runner import SimulatedBoard
from agent.supervisor import Agent
from tests.agent import harness


async def _until(pred: Callable[[], bool], timeout_s: float, what: Callable[[], Any]) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < end:
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out: %s" % (what(),))


def _board(agent: Agent, device_id: str) -> dict[str, Any]:
    for b in agent.snapshot()["boards"]:
        if b["device_id"] == device_id:
            return b
    return {}


def _figures(sims: list[SimulatedBoard], backend: harness.ThreadedBackend) -> tuple[int, int, int]:
    acked: set[tuple[str, int, int]] = set()
    for s in sims:
        acked |= harness.acked(s)
    keys = backend.keys()
    delivered = {a for a in acked if "%s:%d:%d" % a in keys}
    return len(acked), len(delivered), len(acked - delivered)


async def _drain(agent: Agent, timeout_s: float) -> None:
    await _until(lambda: all(b["backlog"] == 0 for b in agent.snapshot()["backends"]), timeout_s,
                 lambda: agent.snapshot()["backends"])


@pytest.mark.micropython
@pytest.mark.slow
def test_a_board_that_stops_reading_its_acks_is_reconnected(micropython: str, tmp_path: Path) -> None:
    # The board goes on sending (resending often) but stops reading what the
    # hub writes: the hub's ack writes fill the OS buffer (about 20 kB on a
    # pty) and then block. The hub must end that session (never "connected"
    # while nothing reaches the board), keep the port read, and reconnect.
    sims = harness.start_boards(tmp_path, 1, micropython, extra={"retransmit_ms": 250})
    board = sims[0]
    pki = harness.pki_for(tmp_path)
    backend = harness.ThreadedBackend(tmp_path, {s.device_id: s.spec.key for s in sims}, pki)
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        cfg = agent_config.load(harness.write_config(tmp_path, sims, harness.webhook(pki, backend.port)))

        async def scenario() -> Agent:
            agent = Agent(cfg)
            agent.links.time_sync_s = 0.05  # a busy downlink: the OS buffer fills within seconds
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            dev = board.device_id
            await _until(lambda: _board(agent, dev).get("state") == "connected"
                         and len(harness.acked(board)) >= 3, 30, lambda: agent.snapshot()["boards"])
            board.reading = False
            await _until(lambda: _board(agent, dev).get("ends", {}).get("write_failed", 0) >= 1, 30,
                         lambda: agent.snapshot()["boards"])
            assert _board(agent, dev)["state"] != "connected"
            stalled_for = asyncio.get_running_loop().time() + 3
            while asyncio.get_running_loop().time() < stalled_for:  # never "connected" meanwhile
                assert _board(agent, dev)["state"] != "connected", _board(agent, dev)
                await asyncio.sleep(0.05)
            before = len(harness.acked(board))
            board.reading = True
            await _until(lambda: _board(agent, dev).get("state") == "connected"
                         and len(harness.acked(board)) > before + 3, 30, lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(board.stop)
            await _drain(agent, 30)
            stop.set()
            await task
            return agent

        agent = asyncio.run(scenario())
        acked, delivered, lost = _figures(sims, backend)
        print("stopped reading: acknowledged %d, delivered %d, lost %d; board %s" % (
            acked, delivered, lost, _board(agent, board.device_id)))
        assert lost == 0 and acked > 0
    finally:
        backend.close()
        for s in sims:
            s.stop()


@pytest.mark.micropython
@pytest.mark.slow
def test_a_store_commit_that_raises_does_not_kill_the_session(micropython: str, tmp_path: Path) -> None:
    sims = harness.start_boards(tmp_path, 2, micropython)
    pki = harness.pki_for(tmp_path)
    backend = harness.ThreadedBackend(tmp_path, {s.device_id: s.spec.key for s in sims}, pki)
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        cfg = agent_config.load(harness.write_config(tmp_path, sims, harness.webhook(pki, backend.port)))

        async def scenario() -> Agent:
            agent = Agent(cfg)
            agent.links.stall_s = 3.0
            failing = {"on": False}
            apply = agent.store._apply

            def faulty(db: sqlite3.Connection, batch: Any) -> Any:  # fault injection: the disk is full
                if failing["on"]:
                    raise sqlite3.OperationalError("database or disk is full")
                return apply(db, batch)

            agent.store._apply = faulty  # type: ignore[method-assign]
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            devs = [s.device_id for s in sims]
            await _until(lambda: all(_board(agent, d).get("state") == "connected" for d in devs), 30,
                         lambda: agent.snapshot()["boards"])
            failing["on"] = True
            # Each board's session ends (a store error) or is found stalled: never "connected" meanwhile.
            await _until(lambda: all(_board(agent, d).get("state") != "connected"
                                     and (_board(agent, d)["ends"].get("store_error", 0)
                                          + _board(agent, d)["ends"].get("stalled", 0)) >= 1 for d in devs), 30,
                         lambda: agent.snapshot()["boards"])
            before = [len(harness.acked(s)) for s in sims]
            failing["on"] = False  # space is back
            await _until(lambda: all(_board(agent, d).get("state") == "connected" for d in devs)
                         and all(len(harness.acked(s)) > n + 3 for s, n in zip(sims, before)), 40,
                         lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(lambda: [s.stop() for s in sims])
            await _drain(agent, 30)
            stop.set()
            await task
            return agent

        asyncio.run(scenario())
        acked, delivered, lost = _figures(sims, backend)
        print("store commit raising: acknowledged %d, delivered %d, lost %d" % (acked, delivered, lost))
        assert lost == 0 and acked > 0
    finally:
        backend.close()
        for s in sims:
            s.stop()
