# End to end: a simulated board (the firmware under micropython on a pty)
# whose epoch file is deleted between two boots, the real agent, the HTTPS
# backend. The hub refuses the stale epoch and sends an epoch resync; the
# board moves past the hub's newest epoch and streams again; nothing
# acknowledged is lost, and the status says what happened.
import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent.supervisor import Agent
from tests.agent import harness
from tests.waiting import async_wait_for


def _board(agent: Agent, device_id: str) -> dict[str, Any]:
    for b in agent.snapshot()["boards"]:
        if b["device_id"] == device_id:
            return b
    return {}


@pytest.mark.micropython
@pytest.mark.slow
def test_epoch_file_deleted_between_two_boots_frames_flow_again(micropython: str, tmp_path: Path) -> None:
    sims = harness.start_boards(tmp_path, 1, micropython)
    board = sims[0]
    dev = board.device_id
    epoch_file = board.directory / "pulsebridge" / "epoch"
    pki = harness.pki_for(tmp_path)
    backend = harness.ThreadedBackend(tmp_path, {s.device_id: s.spec.key for s in sims}, pki)

    def acked_in(epoch: int) -> int:
        return sum(1 for _, e, _ in harness.acked(board) if e == epoch)

    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        cfg = agent_config.load(harness.write_config(tmp_path, sims, harness.webhook(pki, backend.port)))

        async def scenario() -> Agent:
            agent = Agent(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await async_wait_for(lambda: acked_in(1) >= 3, 60, "3 frames of epoch 1 acknowledged",
                                 lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(board.stop)
            await asyncio.to_thread(board.start)  # a reboot: epoch 2
            await async_wait_for(lambda: acked_in(2) >= 3, 60, "3 frames of epoch 2 acknowledged",
                                 lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(board.stop)
            epoch_file.unlink()  # lost (flash restored, file gone): the next boot is epoch 1 again
            await asyncio.to_thread(board.start)
            await async_wait_for(lambda: acked_in(3) >= 3 and _board(agent, dev).get("board_errors"), 60,
                                 "the board resynced to epoch 3 and said so",
                                 lambda: (agent.snapshot()["boards"], board.console_tail()[-500:]))
            await asyncio.to_thread(board.stop)
            await async_wait_for(lambda: all(b["backlog"] == 0 for b in agent.snapshot()["backends"]), 60,
                                 "the backlog drained", lambda: agent.snapshot()["backends"])
            stop.set()
            await task
            return agent

        agent = asyncio.run(scenario())
        b = _board(agent, dev)
        assert b["board_errors"] == {"epoch_resync": 1}, b
        assert "epoch 1 refused (hub has 2" in b["last_board_error"], b
        assert agent.snapshot()["rejects"].get("replay:old_epoch", 0) >= 1
        assert int(epoch_file.read_text()) == 3
        assert "boot epoch 1 refused by the hub (newest 2): now 3" in board.console_tail()
        # Nothing acknowledged lost: every frame acked reached the backend.
        acked = harness.acked(board)
        keys = backend.keys()
        lost = {a for a in acked if "%s:%d:%d" % a not in keys}
        assert not lost and {e for _, e, _ in acked} == {1, 2, 3}
    finally:
        backend.close()
        for s in sims:
            s.stop()
