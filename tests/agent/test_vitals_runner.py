# The vitals runner, the agent's task between the store and the vitals engine.
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.record import FrameRecord
from agent.store import Store
from agent.vitals.alerts import AlertEngine, Rule
from agent.vitals.engine import VitalsEngine
from agent.vitals.runner import Trace, VitalsRunner
from protocols import messages
from tests.waiting import async_wait_for


def _ecg(device_id: str, seq: int, rate_hz: int = 512, flags: int = 0) -> FrameRecord:
    samples = np.zeros(rate_hz, dtype=np.int32)
    return FrameRecord(device_id, 1, seq, messages.STREAM_ECG_MAX30003, rate_hz, seq * 1000, seq * rate_hz, rate_hz,
                       1000000, 2621440, None, flags, 0, 0, 0, (samples,), None, 0.0, b"")


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


def test_frames_waiting_together_have_their_alerts_stored_in_one_commit(tmp_path: Path) -> None:
    # Frames that queued up while the runner was busy are taken in one turn and what they
    # make goes to the store as one job: one commit and one wake-up of the forwarders, not
    # one commit (and one wait for it) per vital or alert.
    devices = ["pb-%d" % i for i in range(5)]

    async def scenario() -> tuple[list[dict[str, object]], int]:
        store = Store(tmp_path / "store.db", ["b"])
        store.open()
        store.start()
        # lead_off at once: each board's first frame with its lead off raises an alert.
        rules = (Rule("lead_off", "lead_off", high=0.5, min_duration_s=0.0),)
        runner = VitalsRunner(store, VitalsEngine(AlertEngine(rules)), lambda _: True)
        for dev in devices:
            runner.offer(_ecg(dev, 0, flags=messages.FLAG_LEAD_OFF))
        before = store.stats.commits
        task = asyncio.create_task(runner.run())
        try:
            await async_wait_for(lambda: runner.made == len(devices), 30, "an alert per board stored",
                                 lambda: runner.made)
            commits = store.stats.commits - before
            reader = store.reader()
            try:
                rows = Store.recent_alerts(reader, 100)
            finally:
                reader.close()
        finally:
            task.cancel()
            store.close()
        return rows, commits

    rows, commits = asyncio.run(scenario())
    assert commits == 1
    stored = sorted((d["device_id"], d["alert"], d["state"]) for d in rows)
    assert stored == [(d, "lead_off", "raised") for d in devices]


def test_frames_that_come_while_the_runner_gathers_join_its_turn(tmp_path: Path) -> None:
    # At 20 boards frames come 25 ms apart: the runner waits gather_s after a frame and feeds
    # the engine the frames that came meanwhile in one turn (its work is cheaper in bursts),
    # their alerts stored in one commit. Before, each frame was its own turn and commit.
    devices = ["pb-%d" % i for i in range(5)]

    async def scenario() -> tuple[list[dict[str, object]], int, int]:
        store = Store(tmp_path / "store.db", ["b"])
        store.open()
        store.start()
        rules = (Rule("lead_off", "lead_off", high=0.5, min_duration_s=0.0),)
        runner = VitalsRunner(store, VitalsEngine(AlertEngine(rules)), lambda _: True, gather_s=3.0)
        before = store.stats.commits
        task = asyncio.create_task(runner.run())
        try:
            runner.offer(_ecg(devices[0], 0, flags=messages.FLAG_LEAD_OFF))
            await async_wait_for(runner.queue.empty, 30, "the runner taking the first frame")
            turns = runner.turns
            for dev in devices[1:]:
                runner.offer(_ecg(dev, 0, flags=messages.FLAG_LEAD_OFF))
            await async_wait_for(lambda: runner.made == len(devices), 30, "an alert per board stored",
                                 lambda: runner.made)
            commits = store.stats.commits - before
            reader = store.reader()
            try:
                rows = Store.recent_alerts(reader, 100)
            finally:
                reader.close()
        finally:
            task.cancel()
            store.close()
        return rows, commits, runner.turns - turns

    rows, commits, turns = asyncio.run(scenario())
    assert commits == 1 and turns <= 1
    assert sorted(d["device_id"] for d in rows) == devices


def test_a_device_erased_between_two_frames_of_a_turn_leaves_nothing(tmp_path: Path) -> None:
    # The loop runs other work between the frames of a turn, `pulsebridge erase` too: what the
    # erased board's earlier frames of that turn made (an alert here) must not be stored after
    # forget. The erase is made to happen just as the runner comes to the second frame.
    async def scenario() -> tuple[list[dict[str, object]], VitalsRunner]:
        store = Store(tmp_path / "store.db", ["b"])
        store.open()
        store.start()
        rules = (Rule("lead_off", "lead_off", high=0.5, min_duration_s=0.0),)
        known = {"pb-gone", "pb-stays"}

        def registered(dev: str) -> bool:
            if dev == "pb-stays" and "pb-gone" in known:  # erased between the two frames
                known.discard("pb-gone")
                runner.forget("pb-gone")
            return dev in known

        runner = VitalsRunner(store, VitalsEngine(AlertEngine(rules)), registered, gather_s=0.0)
        runner.offer(_ecg("pb-gone", 0, flags=messages.FLAG_LEAD_OFF))
        runner.offer(_ecg("pb-stays", 0, flags=messages.FLAG_LEAD_OFF))
        task = asyncio.create_task(runner.run())
        try:
            await async_wait_for(lambda: runner.made >= 1, 30, "the remaining board's alert stored",
                                 lambda: runner.made)
            reader = store.reader()
            try:
                rows = Store.recent_alerts(reader, 100)
            finally:
                reader.close()
        finally:
            task.cancel()
            store.close()
        return rows, runner

    rows, runner = asyncio.run(scenario())
    assert [(d["device_id"], d["alert"]) for d in rows] == [("pb-stays", "lead_off")]
    assert runner.made == 1 and "pb-gone" not in runner.last_vitals
    assert not [k for k in runner.waves if k[0] == "pb-gone"] and "pb-gone" not in runner.engine.last_seen


def test_a_trace_holds_the_last_samples_oldest_first() -> None:
    # The status page's waveform: frames of any length, fewer or more than it holds, wrapping
    # its ring at every place; what it gives is always the stream's last samples, in order.
    rng = np.random.default_rng(13)
    trace, stream = Trace(100), np.zeros(0, dtype=np.int32)
    assert trace.values() == []
    for n in [30, 30, 1, 39, 0, 57, 100, 250, 7, 99, 3]:
        frame = rng.integers(-2 ** 31, 2 ** 31, n, dtype=np.int64).astype(np.int32)
        trace.extend(frame)
        stream = np.concatenate([stream, frame])
        assert trace.values() == stream[-100:].tolist(), n
