# The record's stored form: what the store keeps reads back as the same record,
# whether the samples' steps fit 8 bits, 16 bits (kept as steps) or neither
# (int32 values); records stored by agents of schema 3 (a JSON header) still read.
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import fastdecode
from agent.record import FrameRecord, pack_steps, stored_fifo_lost
from protocols import samples

INT32 = st.integers(-(2**31), 2**31 - 1)
# The packed header: format, channels, step width, drive follows, rate, scale, 4 status fields (SPEC: u64).
HEADER_BYTES = 4 + 3 * 4 + 4 * 8
DRIVE_BYTES = 4 * 8


def _record(channels: list[list[int]]) -> FrameRecord:
    arrays = tuple(np.array(ch, dtype=np.int32) for ch in channels)
    return FrameRecord("pb-r", 3, 7, 3 if len(channels) == 2 else 1, 100, 5000, 700, len(channels[0]), 1, 20,
                       (1, 2, 3, 2**53 - 1) if len(channels) == 2 else None, 4, 2, 1, 30, arrays, 1_800_000_000_000,
                       1_800_000_000.5, b"cose")


def _round_trip(f: FrameRecord) -> tuple[FrameRecord, bytes]:
    blob = f.stored()
    back = FrameRecord.from_stored(f.device_id, f.epoch, f.seq, f.stream, f.t0_ms, f.t0_utc_ms, f.first_index,
                                   f.count, f.received_at, f.raw, None, blob)
    return back, blob


def _same_record(back: FrameRecord, f: FrameRecord) -> None:
    assert [ch.tolist() for ch in back.channels] == [ch.tolist() for ch in f.channels]
    assert all(ch.dtype == np.int32 for ch in back.channels)
    for name in ("device_id", "epoch", "seq", "stream", "rate_hz", "t0_ms", "first_index", "count", "scale_num",
                 "scale_den", "ppg_drive", "flags", "fifo_lost_samples", "frames_dropped_by_board", "jitter_us",
                 "t0_utc_ms", "received_at", "raw"):
        assert getattr(back, name) == getattr(f, name), name


@given(st.integers(1, 2), st.integers(1, 600), INT32, st.sampled_from([100, 300, 40000, 2**32]), st.data())
def test_any_samples_read_back_as_stored(n_channels: int, count: int, first: int, step: int,
                                         data: st.DataObject) -> None:
    channels = []
    for _ in range(n_channels):
        steps = data.draw(st.lists(st.integers(-step, step), min_size=count - 1, max_size=count - 1))
        values = np.clip(np.cumsum([first, *steps]), -(2**31), 2**31 - 1)
        channels.append([int(v) for v in values])
    f = _record(channels)
    back, _ = _round_trip(f)
    _same_record(back, f)


def test_steps_take_one_byte_a_sample_when_they_fit_it_else_two_else_values_four() -> None:
    ecg = np.cumsum(np.r_[131000, np.arange(511) % 61 - 30]).tolist()  # an 18-bit ECG's baseline, small steps
    back, blob = _round_trip(_record([ecg]))
    assert len(blob) == HEADER_BYTES + 4 + 511 and back.channels[0].tolist() == ecg
    wider = np.cumsum(np.r_[-5, np.arange(99) * 3 - 150]).tolist()  # steps -150..144
    red, ir = wider, wider[::-1]
    back, blob = _round_trip(_record([red, ir]))
    assert len(blob) == HEADER_BYTES + DRIVE_BYTES + 2 * (4 + 2 * 99)
    assert [back.channels[0].tolist(), back.channels[1].tolist()] == [red, ir]
    jumpy = [0, 40000, -40000, 7]  # a step beyond 16 bits: int32 values
    back, blob = _round_trip(_record([jumpy]))
    assert len(blob) == HEADER_BYTES + 4 * 4 and back.channels[0].tolist() == jumpy
    extreme = [-(2**31), 2**31 - 1, -(2**31)]  # steps of 2^32 - 1: no width but int32 values holds them
    back, _ = _round_trip(_record([extreme]))
    assert back.channels[0].tolist() == extreme


def test_a_record_stored_by_schema_3_reads_back() -> None:
    # As agents of schema 3 stored it: a JSON header (here parsed) and int16 steps, or int32 values.
    header = {"rate_hz": 100, "scale": [16384, 262144], "ppg_drive": [7000, 7000, 16384, 411], "flags": 1,
              "fifo_lost_samples": 3, "frames_dropped_by_board": 0, "jitter_us": 12, "channels": 2,
              "samples": "steps16", "first": [90000, 140000]}
    steps = struct.pack("<3h", 5, -7, 300) + struct.pack("<3h", -1, 0, 1)
    f = FrameRecord.from_stored("pb-old", 1, 2, 3, 500, None, 50, 4, 1.5, b"cose", header, steps)
    assert [ch.tolist() for ch in f.channels] == [[90000, 90005, 89998, 90298], [140000, 139999, 139999, 140000]]
    assert (f.rate_hz, f.scale_num, f.ppg_drive, f.flags, f.fifo_lost_samples, f.jitter_us) == (
        100, 16384, (7000, 7000, 16384, 411), 1, 3, 12)
    values = {k: v for k, v in header.items() if k not in ("samples", "first")}
    f = FrameRecord.from_stored("pb-old", 1, 2, 3, 500, None, 50, 2, 1.5, b"cose", values,
                                struct.pack("<4i", 1, -2, 3, 2**31 - 1))
    assert [ch.tolist() for ch in f.channels] == [[1, -2], [3, 2**31 - 1]]
    assert stored_fifo_lost(header, steps) == 3


def test_samples_that_do_not_fill_the_channels_are_refused() -> None:
    for channels in ([[1, 2, 3, 4], [5, 6, 7, 8]], [[0, 40000, -40000, 7]]):
        blob = _record(channels).stored()
        for cut in (blob[:-1], blob[:-4], blob + b"\x00", blob[:10], b"\x02" + blob[1:]):
            with pytest.raises(ValueError):
                FrameRecord.from_stored("d", 1, 1, 3, 0, None, 0, 4, 0.0, b"", None, cut)


def test_the_fifo_loss_is_read_from_a_packed_record() -> None:
    assert stored_fifo_lost(None, _record([[1, 2, 3]]).stored()) == 2
    assert stored_fifo_lost(None, b"\x01junk") == 0 and stored_fifo_lost(None, None) == 0


def _on_the_wire(data: st.DataObject, count: int, first: int, step: int) -> bytes | None:
    """A channel of `count` samples from `first`, each step drawn from [-step, step), as a board
    encodes it (protocols/samples.py); None if a sample leaves int32 (the wire cannot carry it)."""
    steps = data.draw(st.lists(st.integers(-step, step - 1), min_size=count - 1, max_size=count - 1))
    values = [int(v) for v in np.cumsum([first, *steps])]
    if not all(-(2**31) <= v < 2**31 for v in values):
        return None
    buf = bytearray(5 * count + 8)
    return bytes(buf[:samples.encode_into(values, count, buf, 0)])


@given(st.integers(1, 2), st.integers(1, 600), INT32, st.sampled_from([64, 128, 8192]), st.data())
def test_steps_read_from_the_wire_store_as_the_samples_would(n_channels: int, count: int, first: int, step: int,
                                                             data: st.DataObject) -> None:
    # Ingest stores a board's deltas of one or two bytes as it read them (packed_steps): the
    # same bytes as stored() makes from the decoded samples, which read back as those samples.
    wire = []
    for _ in range(n_channels):
        channel = _on_the_wire(data, count, first, step)
        if channel is None:
            return  # a sample the wire cannot carry
        wire.append(channel)
    decoded = [fastdecode.decode_with_steps(w, count) for w in wire]
    f = _record([values.tolist() for values, _ in decoded])
    if any(steps is None for _, steps in decoded):  # near the int32 bounds: the general decoder's
        assert abs(first) + 8192 * count > 2**31 - 1
        return
    fast = dataclasses.replace(f, packed_steps=pack_steps([s for _, s in decoded if s is not None]))
    assert fast.stored() == f.stored()
    back, _ = _round_trip(fast)
    _same_record(back, f)


@given(st.integers(1, 3), st.integers(1, 300), INT32, st.lists(st.sampled_from([1, 64, 128, 8192, 2**20]),
                                                             min_size=3, max_size=3), st.data())
def test_a_records_samples_are_the_reference_decoders(n_channels: int, count: int, first: int, steps_within: list[int],
                                                     data: st.DataObject) -> None:
    # record_of reads each channel's steps (fastdecode.short_steps), packs them and sums the
    # samples from the packed steps once for all channels (unpacked_steps), or decodes every
    # channel in full when one is not of one- or two-byte steps: the samples are the reference
    # decoder's (protocols/samples.py) either way, channels of different step widths too.
    from agent.ingest import record_of
    from protocols import messages

    wire, expected = [], []
    for step in steps_within[:n_channels]:
        channel = _on_the_wire(data, count, first, step)
        if channel is None:
            return  # a sample the wire cannot carry
        wire.append(channel)
        expected.append(samples.decode(wire[-1], count))
    m = messages.SampleFrame(1, 2, 3, 4, 5, 100, count, (1, 1), None, (0, 0, 0, 0), wire)  # type: ignore[arg-type]
    f = record_of("pb-r", m, wire, b"cose", None)
    stored = f.stored()  # before its channels are read: from the steps as read (most frames)
    assert [ch.tolist() for ch in f.channels] == expected
    assert all(ch.dtype == np.int32 and ch.shape == (count,) for ch in f.channels)
    assert f.channels is f.channels  # summed once, whoever reads them
    assert f.stored() == stored
    back, _ = _round_trip(f)
    _same_record(back, f)
