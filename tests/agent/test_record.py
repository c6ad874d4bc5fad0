# The record's stored form: what the store keeps reads back as the same record,
# whether the samples' steps fit 16 bits (kept as steps) or not (int32 values).
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.record import FrameRecord

INT32 = st.integers(-(2**31), 2**31 - 1)


def _record(channels: list[list[int]]) -> FrameRecord:
    arrays = tuple(np.array(ch, dtype=np.int32) for ch in channels)
    return FrameRecord("pb-r", 3, 7, 3 if len(channels) == 2 else 1, 100, 5000, 700, len(channels[0]), 1, 20,
                       (1, 2, 3, 4) if len(channels) == 2 else None, 4, 2, 1, 30, arrays, 1_800_000_000_000,
                       1_800_000_000.5, b"cose")


def _round_trip(f: FrameRecord) -> tuple[FrameRecord, dict[str, object], bytes]:
    header, blob = f.stored()
    parsed = json.loads(header)
    back = FrameRecord.from_stored(f.device_id, f.epoch, f.seq, f.stream, f.t0_ms, f.t0_utc_ms, f.first_index,
                                   f.count, f.received_at, f.raw, parsed, blob)
    return back, parsed, blob


@given(st.integers(1, 2), st.integers(1, 600), INT32, st.data())
def test_any_samples_read_back_as_stored(n_channels: int, count: int, first: int, data: st.DataObject) -> None:
    small = data.draw(st.booleans())
    channels = []
    for _ in range(n_channels):
        steps = data.draw(st.lists(st.integers(-40000, 40000) if not small else st.integers(-300, 300),
                                   min_size=count - 1, max_size=count - 1))
        values = np.clip(np.cumsum([first, *steps]), -(2**31), 2**31 - 1)
        channels.append([int(v) for v in values])
    f = _record(channels)
    back, _, _ = _round_trip(f)
    assert [ch.tolist() for ch in back.channels] == channels
    assert all(ch.dtype == np.int32 for ch in back.channels)
    for name in ("device_id", "epoch", "seq", "stream", "rate_hz", "t0_ms", "first_index", "count", "scale_num",
                 "scale_den", "ppg_drive", "flags", "fifo_lost_samples", "frames_dropped_by_board", "jitter_us",
                 "t0_utc_ms", "received_at", "raw"):
        assert getattr(back, name) == getattr(f, name), name


def test_small_steps_take_two_bytes_a_sample() -> None:
    ecg = np.cumsum(np.r_[131000, np.arange(511) % 61 - 30]).tolist()  # an 18-bit ECG's baseline, small steps
    back, header, blob = _round_trip(_record([ecg]))
    assert header["samples"] == "steps16" and len(blob) == 2 * 511
    assert back.channels[0].tolist() == ecg
    jumpy = [0, 40000, -40000, 7]  # a step beyond 16 bits: int32 values
    back, header, blob = _round_trip(_record([jumpy]))
    assert "samples" not in header and len(blob) == 4 * 4 and back.channels[0].tolist() == jumpy


def test_samples_that_do_not_fill_the_channels_are_refused() -> None:
    f = _record([[1, 2, 3, 4], [5, 6, 7, 8]])
    header, blob = f.stored()
    with pytest.raises(ValueError):
        FrameRecord.from_stored("d", 1, 1, 3, 0, None, 0, 4, 0.0, b"", json.loads(header), blob[:-2])
