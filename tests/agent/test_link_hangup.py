# A board that dies (kill -9 of its process: a power cut) leaves "connected"
# as soon as its link goes, with the reason, not after the stall rule's 20 s:
# a USB board's port disappears with its power (the pty's hangup, here), a
# BLE board's connection drops (the software radio's supervision timeout).
# The stall bound is raised far above the wait here, so a pass can only
# come from the link's own hangup.
from __future__ import annotations

import asyncio
import os
import pty
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.audit import AuditLog
from agent.config import AgentConfig, BleConfig
from agent.dev.sim import boards
from agent.dev.sim.air import Air
from agent.dev.sim.runner import SimulatedBoard
from agent.registry import Registry
from agent.supervisor import Agent
from agent.transports.base import TransportClosed
from agent.transports.serial import SerialTransport
from tests.agent import harness
from tests.waiting import async_wait_for

# Far above every wait below: a link that leaves "connected" within them did not stall.
STALL_S = 600.0
# A hangup is seen at once; this only bounds a loaded machine's lag.
HANGUP_SEEN_S = 15.0


async def _killed_board_leaves_connected(agent: Agent, sim: SimulatedBoard) -> dict[str, object]:
    dev = sim.device_id
    b = lambda: harness.board_state(agent, dev)  # noqa: E731
    await async_wait_for(lambda: b().get("state") == "connected" and b().get("frames", 0) >= 1, 60,
                         "the board streaming", b)
    killed = time.monotonic()
    await asyncio.to_thread(sim.kill)  # kill -9: a power cut
    await async_wait_for(lambda: b().get("state") != "connected", HANGUP_SEEN_S,
                         "the dead board's link to leave 'connected'", b)
    print("%s: left 'connected' %.2f s after the kill (stall bound %.0f s)" % (sim.spec.link, time.monotonic() - killed,
                                                                             STALL_S))
    return b()


def test_a_port_hung_up_ends_the_serial_transport_at_once() -> None:
    # The boundary the tests below rely on: the other end of a port going away (a USB board
    # unplugged or without power; here the pty's master closed) ends a waiting receive() with
    # TransportClosed at once, with nothing sent before it.
    async def go() -> float:
        master, slave = pty.openpty()
        name = os.ttyname(slave)
        os.close(slave)
        t = SerialTransport(name)
        await t.open()
        try:
            waiting = asyncio.create_task(t.receive())
            await asyncio.sleep(0)  # it waits on the port
            hung_up = time.monotonic()
            os.close(master)
            with pytest.raises(TransportClosed, match="closed: hung up .*: unplugged, or the board lost power"):
                async with asyncio.timeout(HANGUP_SEEN_S):
                    await waiting
            return time.monotonic() - hung_up
        finally:
            await t.close()

    print("hangup seen after %.3f s" % asyncio.run(go()))


@pytest.mark.micropython
def test_a_serial_board_killed_leaves_streaming_at_once(make_hub: Callable[..., harness.Hub]) -> None:
    hub = make_hub(1)
    sim = hub.board

    async def scenario() -> tuple[dict[str, object], dict[str, object]]:
        agent = Agent(hub.cfg)
        agent.links.stall_s = STALL_S
        async with harness.running(agent):
            left = await _killed_board_leaves_connected(agent, sim)
            # Its port is gone, as a USB board's is without power: "not plugged in", not "reconnecting" forever.
            await async_wait_for(lambda: harness.board_state(agent, sim.device_id).get("state") == "searching",
                                 HANGUP_SEEN_S, "the port seen gone",
                                 lambda: harness.board_state(agent, sim.device_id))
            return left, harness.board_state(agent, sim.device_id)

    left, later = asyncio.run(scenario())
    assert left["ends"] == {"link_closed": 1}, left
    assert "hung up" in str(left["last_error"]) and "lost power" in str(left["last_error"]), left
    assert not os.path.lexists(sim.link_path), "the port's stable name outlived the board"
    assert later["ends"] == {"link_closed": 1}, later  # never stalled, never reopened on a dead port


@pytest.mark.micropython
def test_a_ble_board_killed_leaves_streaming_at_once(micropython: str, sim_cache: Path, tmp_path: Path) -> None:
    air = Air(tmp_path / "air")
    air.start()
    spec = boards.BoardSpec("pb-ble01", link="ble", air=str(air.board_path))
    sim = SimulatedBoard(spec, tmp_path / "boards" / spec.device_id, sim_cache, micropython)
    cfg = AgentConfig(hub_id="test-hub", data_dir=tmp_path / "data", log_dir=tmp_path / "log",
                      run_dir=tmp_path / "run", ble=BleConfig(air=str(air.central_path), connect_timeout_s=5.0))
    reg = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
    reg.add(spec.device_id, label="test board", key=spec.key, actor="test")
    reg.close()
    try:
        sim.start()

        async def scenario() -> dict[str, object]:
            agent = Agent(cfg)
            agent.links.stall_s = STALL_S
            async with harness.running(agent):
                return await _killed_board_leaves_connected(agent, sim)

        left = asyncio.run(scenario())
    finally:
        sim.stop()
        air.stop()
    assert left["ends"] == {"link_closed": 1}, left
    assert "link lost" in str(left["last_error"]), left
