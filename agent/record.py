"""A sample frame as the hub keeps it: decoded once, at ingest.

Ingest verifies a board's COSE message, decrypts and decodes its samples and
makes one FrameRecord of it; the store keeps that record (its header fields
and its samples as little-endian int32, beside the COSE bytes exactly as the
board sent them, for a later proof of origin), and the vitals engine and
every forwarder read the record, never the wire format (which lives in
protocols/ and agent/ingest.py only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols import messages  # stream numbers and names, flags: constants, not the codec

# The names of each stream's channels, and their unit, as every consumer gives them.
CHANNEL_NAMES = {messages.STREAM_ECG_MAX30003: ("ecg",), messages.STREAM_ECG_AD8232: ("ecg",),
                 messages.STREAM_PPG_MAX30102: ("red", "ir")}
UNITS = {messages.STREAM_ECG_MAX30003: "uV", messages.STREAM_ECG_AD8232: "uV", messages.STREAM_PPG_MAX30102: "nA"}
# Samples as stored: little-endian signed 32-bit (SPEC.md bounds every sample to that range).
SAMPLE_DTYPE = np.dtype("<i4")

Samples = npt.NDArray[np.int32]
# Stored steps between samples, when every one fits: little-endian int16.
_STEP_DTYPE = np.dtype("<i2")
_STEP_MIN, _STEP_MAX = -(2**15), 2**15 - 1


@dataclass(frozen=True, slots=True, eq=False)  # arrays in it: == would be ambiguous
class FrameRecord:
    """One verified sample frame. channels: one int32 array of `count` samples
    per channel (ECG: ecg; PPG: red, ir), in units of scale_num/scale_den
    `unit` per count. t0_ms is the board's clock (ms) at the first sample,
    t0_utc_ms that instant in UTC ms when the board's clock was mapped (None
    before the first time sync); received_at is the hub's UTC time (s) when
    the frame arrived. raw: the COSE message as the board sealed it."""

    device_id: str
    epoch: int
    seq: int
    stream: int
    rate_hz: int
    t0_ms: int
    first_index: int
    count: int
    scale_num: int
    scale_den: int
    ppg_drive: tuple[int, int, int, int] | None
    flags: int
    fifo_lost_samples: int
    frames_dropped_by_board: int
    jitter_us: int
    channels: tuple[Samples, ...]
    t0_utc_ms: int | None
    received_at: float
    raw: bytes

    @property
    def key(self) -> str:
        """The idempotency key every backend deduplicates on: device:epoch:seq."""
        return "%s:%d:%d" % (self.device_id, self.epoch, self.seq)

    @property
    def stream_name(self) -> str:
        return messages.STREAM_NAMES.get(self.stream, str(self.stream))

    @property
    def channel_names(self) -> tuple[str, ...]:
        return CHANNEL_NAMES.get(self.stream, tuple("ch%d" % i for i in range(len(self.channels))))

    @property
    def unit(self) -> str:
        return UNITS.get(self.stream, "")

    @property
    def duration_s(self) -> float:
        return self.count / self.rate_hz

    def start_utc_s(self) -> tuple[float, str]:
        """The first sample's UTC time (s) and its source: "board-clock" (the
        board's clock mapped to UTC) or "arrival" (no time sync yet: the
        window is taken to have ended when the frame came)."""
        if self.t0_utc_ms is not None:
            return self.t0_utc_ms / 1000.0, "board-clock"
        return self.received_at - self.duration_s, "arrival"

    # ---- the stored form (agent/store.py keeps these two columns) --------------------

    def stored(self) -> tuple[str, bytes]:
        """The header fields the store has no column for (JSON) and the samples
        (bytes). Samples whose steps all fit 16 bits (most ECG and pleth) are
        kept as each channel's first sample (in the header) and its steps,
        int16 little-endian: half the bytes of int32 values, which the card
        would otherwise take at every frame; others as int32 values."""
        header: dict[str, Any] = {
            "rate_hz": self.rate_hz, "scale": [self.scale_num, self.scale_den], "ppg_drive": self.ppg_drive,
            "flags": self.flags, "fifo_lost_samples": self.fifo_lost_samples,
            "frames_dropped_by_board": self.frames_dropped_by_board, "jitter_us": self.jitter_us,
            "channels": len(self.channels)}
        values = np.stack(self.channels) if self.channels else np.zeros((0, self.count), dtype=np.int32)
        steps = np.diff(values.astype(np.int64), axis=1)
        if self.count and (not steps.size or (steps.min() >= _STEP_MIN and steps.max() <= _STEP_MAX)):
            header["samples"] = "steps16"
            header["first"] = values[:, 0].tolist()
            blob = steps.astype(_STEP_DTYPE).tobytes()
        else:
            blob = values.astype(SAMPLE_DTYPE, copy=False).tobytes()
        return json.dumps(header, separators=(",", ":")), blob

    @classmethod
    def from_stored(cls, device_id: str, epoch: int, seq: int, stream: int, t0_ms: int, t0_utc_ms: int | None,
                    first_index: int, count: int, received_at: float, raw: bytes, header: dict[str, Any],
                    samples: bytes) -> FrameRecord:
        """The record a store row holds (header and samples: stored(), the header parsed).
        Raises ValueError when the samples do not fill the header's channels of count samples."""
        if header.get("samples") == "steps16":
            first = [int(v) for v in header["first"]]
            steps = np.frombuffer(samples, dtype=_STEP_DTYPE)
            if count < 1 or len(steps) != len(first) * (count - 1):
                raise ValueError("%d stored steps are not %d channels of %d samples" % (len(steps), len(first), count))
            values = np.empty((len(first), count), dtype=np.int64)
            values[:, 0] = first
            values[:, 1:] = steps.reshape(len(first), count - 1)
            channels = tuple(np.cumsum(values, axis=1).astype(np.int32))
        else:
            flat = np.frombuffer(samples, dtype=SAMPLE_DTYPE)
            n = int(header.get("channels", len(flat) // count if count > 0 else 0))
            if len(flat) != n * count:
                raise ValueError("%d stored samples are not %d channels of %d" % (len(flat), n, count))
            channels = tuple(flat.reshape(n, count))
        drive = header.get("ppg_drive")
        return cls(device_id, epoch, seq, stream, int(header["rate_hz"]), t0_ms, first_index, count,
                   int(header["scale"][0]), int(header["scale"][1]),
                   None if drive is None else (int(drive[0]), int(drive[1]), int(drive[2]), int(drive[3])),
                   int(header["flags"]), int(header["fifo_lost_samples"]), int(header["frames_dropped_by_board"]),
                   int(header["jitter_us"]), channels, t0_utc_ms, received_at, raw)


def iso_ms(t: float) -> str:
    """UTC seconds as ISO 8601 with milliseconds: 2026-01-02T03:04:05.678Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int(t * 1000 % 1000)
