# The update benchmark's reading of the hub's store (agent/dev/bench_ota.py,
# stream_report): the samples each boot's sensors reported lost, and the
# longest pause in streaming, inside a boot (the sensor's clock) and across
# the update's reboot (UTC once both boots' clocks are mapped, else the
# frames' arrival). Frames written as the store keeps them, with made-up
# times whose answers are worked out by hand below.
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.dev.bench_ota import stream_report
from agent.dev.sim import boards
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


_FAKE_METER_SCRIPT = """
from sim import bench_ota


class FakeMeter:  # a fake of sim.cpu.ThreadCpu: each reading costs 7 us of the count, as the real one's cost some
    def __init__(self):
        self.t = 0

    def now_us(self):
        self.t += 7
        return self.t


def steps(meter, n):  # a check of n slices of 100 us each
    for _ in range(n):
        meter.t += 100
        yield


m = FakeMeter()
tare = bench_ota.tare_milli(m)
total, times = bench_ota.sliced(m, steps(m, 50), tare)


def digest():  # an operation of 40 us
    m.t += 40


from sim import bench_origin
print(tare, total, len(times), min(times), max(times), bench_origin.best(m, digest, tare))
"""


@pytest.mark.micropython
def test_the_benches_time_short_spans_without_the_meters_own_readings(micropython: str) -> None:
    # bench ota timed each of the check's 467 slices between two readings of the CPU meter and summed
    # them: the meter's own cost inside each span (~6 us here, a quarter of a slice) was counted 467
    # times, the whole check's once: the demo said "signature check 2.0 s; the whole bundle's check
    # 1.7 s" (signature and files' hashes), the signature's true time ~1.5 s. A fake meter whose
    # reading costs 7 us of its count, and a check of 50 slices of 100 us each.
    p = subprocess.run([micropython, "-c", _FAKE_METER_SCRIPT], env=boards.micropython_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    tare, total, n, shortest, longest, digest = (int(x) for x in p.stdout.split())
    assert (tare, total, n, shortest, longest) == (7000, 5000, 50, 100, 100)
    assert digest == 40  # bench origin's operations likewise (a frame's digest: tens of us)
