# The vitals runner, the agent's task between the store and the vitals engine.
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.record import FrameRecord
from agent.store import Store
from agent.vitals.engine import VitalsEngine
from agent.vitals.runner import VitalsRunner
from protocols import messages
from tests.waiting import async_wait_for


def _ecg(device_id: str, seq: int, rate_hz: int = 512) -> FrameRecord:
    samples = np.zeros(rate_hz, dtype=np.int32)
    return FrameRecord(device_id, 1, seq, messages.STREAM_ECG_MAX30003, rate_hz, seq * 1000, seq * rate_hz, rate_hz,
                       1000000, 2621440, None, 0, 0, 0, 0, (samples,), None, 0.0, b"")


def test_frames_of_a_device_erased_while_they_waited_leave_nothing(tmp_path: Path) -> None:
    # pulsebridge erase beside the running agent: frames of the board stored just before the erase
    # still wait in the vitals queue; once it is forgotten, they must not bring its vitals, its
    # waveform or its 'last heard' back (the status page would show an erased patient).
    async def scenario() -> VitalsRunner:
        store = Store(tmp_path / "store.db", ["b"])
        store.open()
        store.start()
        known = {"pb-gone", "pb-stays"}
        runner = VitalsRunner(store, VitalsEngine(), known.__contains__)
        for seq in range(3):
            runner.offer(_ecg("pb-gone", seq))
        known.discard("pb-gone")  # erased: the registry reloaded, then forget
        runner.forget("pb-gone")
        runner.offer(_ecg("pb-stays", 0))  # behind them in the queue
        task = asyncio.create_task(runner.run())
        try:
            await async_wait_for(lambda: ("pb-stays", "ecg") in runner.waves, 30, "the other board's frame",
                                 lambda: list(runner.waves))
        finally:
            task.cancel()
            store.close()
        return runner

    runner = asyncio.run(scenario())
    assert [k for k in runner.waves if k[0] == "pb-gone"] == []
    assert "pb-gone" not in runner.engine.last_seen and "pb-stays" in runner.engine.last_seen
    assert runner.waveform("pb-stays", "ecg")["values"]
