# The update benchmark's reading of the hub's store (agent/dev/bench_ota.py,
# stream_report): the samples each boot's sensors reported lost, and the
# longest pause in streaming, inside a boot (the sensor's clock) and across
# the update's reboot (UTC once both boots' clocks are mapped, else the
# frames' arrival). Frames written as the store keeps them, with made-up
# times whose answers are worked out by hand below.
import sqlite3
from pathlib import Path

import numpy as np

from agent.dev.bench_ota import stream_report
from agent.record import FrameRecord
from agent.store import KIND_FRAME, Store

DEV = "pb-pause"
ECG = 1


def _frame(epoch: int, seq: int, first: int, count: int, t0_ms: int, received_at: float,
           t0_utc_ms: int | None = None, fifo_lost: int = 0) -> FrameRecord:
    return FrameRecord(DEV, epoch, seq, ECG, 500, t0_ms, first, count, 1, 1, None, 0, fifo_lost, 0, 0,
                       (np.arange(count, dtype=np.int32),), t0_utc_ms, received_at, b"cose")


def _store(tmp_path: Path, frames: list[FrameRecord]) -> Path:
    path = tmp_path / "store.db"
    s = Store(path, [])
    s.open()
    s.close()
    db = sqlite3.connect(path)
    with db:
        for f in frames:
            db.execute("INSERT INTO frames(device_id, epoch, seq, kind, stream, priority, received_at, t0_ms, "
                       "t0_utc_ms, first_index, count, raw, samples) VALUES(?,?,?,?,?,0,?,?,?,?,?,?,?)",
                       (f.device_id, f.epoch, f.seq, KIND_FRAME, f.stream, f.received_at, f.t0_ms, f.t0_utc_ms,
                        f.first_index, f.count, f.raw, f.stored()))
    db.close()
    return path


def test_a_fifo_overflow_inside_a_boot_is_its_pause_and_its_loss(tmp_path: Path) -> None:
    # 500 Hz, 500-sample frames: 0-1 s, then 150 samples lost (0.3 s), the next frame from 1.3 s.
    path = _store(tmp_path, [_frame(1, 0, 0, 500, 0, 101.0), _frame(1, 1, 650, 500, 1300, 102.4, fifo_lost=150),
                             _frame(1, 2, 1150, 500, 2300, 103.4)])
    r = stream_report(path, DEV)
    assert r["epochs"][1]["fifo_lost"] == 150 and r["epochs"][1]["missing"] == 0
    assert r["epochs"][1]["samples"] == 1500
    assert r["pause_ms"] == 300 and "boot 1" in r["pause_where"]


def test_the_reboot_is_timed_in_utc_when_both_clocks_are_mapped_else_by_arrival(tmp_path: Path) -> None:
    # Boot 1's last sample ends at UTC 10,000 + 1,000 ms; boot 2's first is at UTC 13,500: 2.5 s.
    old = _frame(1, 0, 0, 500, 60000, 11.2, t0_utc_ms=10000)
    r = stream_report(_store(tmp_path, [old, _frame(2, 0, 0, 500, 0, 14.7, t0_utc_ms=13500)]), DEV)
    assert r["pause_ms"] == 2500 and "in UTC" in r["pause_where"]
    # Unmapped new boot: its first frame arrived at 14.7 s, a 1 s window: its first sample at ~13.7 s;
    # the old boot's last frame arrived at 11.2 s: 2.5 s.
    (tmp_path / "store.db").unlink()
    r = stream_report(_store(tmp_path, [old, _frame(2, 0, 0, 500, 0, 14.7)]), DEV)
    assert r["pause_ms"] == 2500 and "arrival" in r["pause_where"]


def test_a_reboot_whose_two_utc_mappings_disagree_is_timed_by_arrival(tmp_path: Path) -> None:
    # The new boot's first sample mapped to UTC 10,500, before the old boot's last one ended (11,000):
    # impossible, each mapping being as good as its time answer's round trip (over BLE, hundreds of
    # ms). The pause was taken as that negative gap, ignored, and the demo printed "0.00 s (none)"
    # for a BLE board that had rebooted; it is timed from the frames' arrival instead (2.5 s).
    old = _frame(1, 0, 0, 500, 60000, 11.2, t0_utc_ms=10000)
    r = stream_report(_store(tmp_path, [old, _frame(2, 0, 0, 500, 0, 14.7, t0_utc_ms=10500)]), DEV)
    assert r["pause_ms"] == 2500 and "arrival" in r["pause_where"], r
