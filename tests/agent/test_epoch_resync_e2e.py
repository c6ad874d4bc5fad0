# End to end: a simulated board (the firmware under micropython on a pty)
# whose epoch file is deleted between two boots, the real agent, the HTTPS
# backend. The hub refuses the stale epoch and sends an epoch resync; the
# board moves past the hub's newest epoch and streams again; nothing
# acknowledged is lost, and the status says what happened.
import asyncio
from collections.abc import Callable

import pytest

from agent.supervisor import Agent
from tests.agent import harness
from tests.waiting import async_wait_for


@pytest.mark.micropython
@pytest.mark.slow
def test_epoch_file_deleted_between_two_boots_frames_flow_again(make_hub: Callable[..., harness.Hub]) -> None:
    hub = make_hub(1, webhook=True)
    board = hub.board
    dev = board.device_id
    epoch_file = board.directory / "pulsebridge" / "epoch"

    def acked_in(epoch: int) -> int:
        return sum(1 for _, e, _ in harness.acked(board) if e == epoch)

    async def scenario() -> Agent:
        async with harness.running(Agent(hub.cfg)) as agent:
            await async_wait_for(lambda: acked_in(1) >= 3, 60, "3 frames of epoch 1 acknowledged",
                                 lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(board.stop)
            await asyncio.to_thread(board.start)  # a reboot: epoch 2
            await async_wait_for(lambda: acked_in(2) >= 3, 60, "3 frames of epoch 2 acknowledged",
                                 lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(board.stop)
            epoch_file.unlink()  # lost (flash restored, file gone): the next boot is epoch 1 again
            await asyncio.to_thread(board.start)
            await async_wait_for(lambda: acked_in(3) >= 3 and harness.board_state(agent, dev).get("board_errors"),
                                 60, "the board resynced to epoch 3 and said so",
                                 lambda: (agent.snapshot()["boards"], board.console_tail()[-500:]))
            await harness.finish(agent, [board], 60)
        return agent

    agent = asyncio.run(scenario())
    b = harness.board_state(agent, dev)
    assert b["board_errors"] == {"epoch_resync": 1}, b
    assert "epoch 1 refused (hub has 2" in b["last_board_error"], b
    assert agent.snapshot()["rejects"].get("replay:old_epoch", 0) >= 1
    assert int(epoch_file.read_text()) == 3
    assert "boot epoch 1 refused by the hub (newest 2): now 3" in board.console_tail()
    # Nothing acknowledged lost: every frame acked reached the backend.
    lost = hub.undelivered()
    assert not lost and {e for _, e, _ in harness.acked(board)} == {1, 2, 3}
