"""A sample frame as the hub keeps it: decoded once, at ingest.

Ingest verifies a board's COSE message, decrypts and decodes its samples and
makes one FrameRecord of it; the store keeps that record (its header fields
and its samples packed: FrameRecord.stored(), beside the COSE bytes exactly as
the board sent them, for a later proof of origin), and the vitals engine and
every forwarder read the record, never the wire format (which lives in
protocols/ and agent/ingest.py only).
"""

from __future__ import annotations

import functools
import math
import struct
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

# The stored form (stored(); from_stored() reads it, and the JSON header of
# records stored before it). Little-endian throughout:
#   format (1), channels, step width (1 or 2: each channel's first sample as
#   int32, then its count - 1 steps as int8 or int16; 4: each channel's count
#   samples as int32), 1 if ppg_drive follows, rate_hz, scale_num, scale_den,
#   flags, fifo_lost_samples, frames_dropped_by_board, jitter_us (u64: the
#   decoder bounds them to 2^53), [ppg_drive, 4 x u64], then the samples.
_PACKED = struct.Struct("<BBBBIIIQQQQ")
_DRIVE = struct.Struct("<QQQQ")
_PACKED_FORMAT = 1
# Step widths, narrowest first: most ECG and pleth steps fit a byte.
_STEP_DTYPES: tuple[tuple[int, np.dtype[Any]], ...] = ((1, np.dtype("<i1")), (2, np.dtype("<i2")))
_WIDTH_DTYPES: dict[int, np.dtype[Any]] = dict(_STEP_DTYPES)
# Records of the JSON header's time: steps as int16 ("samples": "steps16"), or int32 values.
_STEP16_DTYPE = np.dtype("<i2")


# eq=False: arrays in it, == would be ambiguous. Read-only by convention, not frozen: a frozen
# dataclass's __init__ sets each of its 20 fields through object.__setattr__, 2.6 us of ingest's
# CPU a frame here against 0.2 us (its arrays were writable all the same); nothing assigns to one.
@dataclass(slots=True, eq=False)
class FrameRecord:
    """One verified sample frame. channels: one int32 array of `count` samples
    per channel (ECG: ecg; PPG: red, ir), in units of scale_num/scale_den
    `unit` per count (made with them, or summed once from packed_steps at the
    first read: ingest stores a frame without reading its samples as arrays,
    and the vitals engine and forwarders read them). t0_ms is the board's clock (ms) at the first sample,
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
    _channels: tuple[Samples, ...] | None  # None: summed from packed_steps at the first read of channels
    t0_utc_ms: int | None
    received_at: float
    raw: bytes
    # (step width, the samples part of stored()) when ingest had the steps
    # from the wire (agent/fastdecode.py; pack_steps()): stored() then packs
    # them as they are, and channels are summed from them; None: stored() works
    # them out from channels. Made only from the same samples as channels.
    packed_steps: tuple[int, bytes] | None = None

    @property
    def channels(self) -> tuple[Samples, ...]:
        channels = self._channels
        if channels is None:
            if self.packed_steps is None:
                raise ValueError("a record made with neither channels nor packed steps")
            width, body = self.packed_steps
            channels = self._channels = unpacked_steps(width, body, _packed_count(width, body, self.count),
                                                       self.count)
        return channels

    @property
    def key(self) -> str:
        """The idempotency key every backend deduplicates on: device:epoch:seq."""
        return "%s:%d:%d" % (self.device_id, self.epoch, self.seq)

    @property
    def stream_name(self) -> str:
        return messages.STREAM_NAMES.get(self.stream, str(self.stream))

    @property
    def channel_names(self) -> tuple[str, ...]:
        names = CHANNEL_NAMES.get(self.stream)
        return names if names is not None else tuple("ch%d" % i for i in range(len(self.channels)))

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

    def stored(self) -> bytes:
        """The record's samples and the header fields the store has no column for,
        packed (the format above). Samples whose steps all fit 8 or 16 bits (most
        ECG and pleth: a byte each) are kept as each channel's first sample and
        its steps; others as int32 values."""
        count = self.count
        if self.packed_steps is not None and count:
            width, body = self.packed_steps
            return self._head(_packed_count(width, body, count), width) + body
        n = len(self.channels)
        if not n or not count:
            return self._head(n, 4)
        values = np.stack(self.channels).astype(np.int64) if n > 1 else self.channels[0].astype(np.int64)[None]
        steps = np.diff(values, axis=1)
        lo, hi = (int(steps.min()), int(steps.max())) if steps.size else (0, 0)
        for width, dtype in _STEP_DTYPES:
            bound = 1 << (8 * width - 1)
            if -bound <= lo and hi < bound:
                return (self._head(n, width) + values[:, 0].astype(SAMPLE_DTYPE).tobytes()
                        + steps.astype(dtype).tobytes())
        return self._head(n, 4) + values.astype(SAMPLE_DTYPE).tobytes()

    def _head(self, n: int, width: int) -> bytes:
        drive = self.ppg_drive
        head = _PACKED.pack(_PACKED_FORMAT, n, width, drive is not None, self.rate_hz, self.scale_num,
                            self.scale_den, self.flags, self.fifo_lost_samples, self.frames_dropped_by_board,
                            self.jitter_us)
        return head if drive is None else head + _DRIVE.pack(*drive)

    @classmethod
    def from_stored(cls, device_id: str, epoch: int, seq: int, stream: int, t0_ms: int, t0_utc_ms: int | None,
                    first_index: int, count: int, received_at: float, raw: bytes, header: dict[str, Any] | None,
                    samples: bytes) -> FrameRecord:
        """The record a store row holds: samples is stored() (header None), or, for a
        record stored before it, the samples with their JSON header parsed. Raises
        ValueError when they do not read as channels of count samples."""
        if header is not None:
            return cls._from_json_header(device_id, epoch, seq, stream, t0_ms, t0_utc_ms, first_index, count,
                                         received_at, raw, header, samples)
        if len(samples) < _PACKED.size:
            raise ValueError("a stored record of %d bytes has no header" % len(samples))
        (fmt, n, width, has_drive, rate_hz, scale_num, scale_den, flags, fifo_lost, dropped,
         jitter_us) = _PACKED.unpack_from(samples)
        if fmt != _PACKED_FORMAT:
            raise ValueError("stored record format %d is not %d" % (fmt, _PACKED_FORMAT))
        at = _PACKED.size
        drive: tuple[int, int, int, int] | None = None
        if has_drive:
            d = _DRIVE.unpack_from(samples, at)
            drive = (d[0], d[1], d[2], d[3])
            at += _DRIVE.size
        body = bytes(samples[at:])
        if width == 4:
            flat = np.frombuffer(body, dtype=SAMPLE_DTYPE)
            if len(flat) != n * count:
                raise ValueError("%d stored samples are not %d channels of %d" % (len(flat), n, count))
            channels = tuple(flat.reshape(n, count)) if n else ()
        elif width in _WIDTH_DTYPES:
            if count < 1 or len(body) != n * (4 + width * (count - 1)):
                raise ValueError("%d stored bytes are not %d channels of %d samples" % (len(body), n, count))
            channels = unpacked_steps(width, body, n, count) if n else ()
        else:
            raise ValueError("stored step width %d is not 1, 2 or 4" % width)
        return cls(device_id, epoch, seq, stream, rate_hz, t0_ms, first_index, count, scale_num, scale_den,
                   drive, flags, fifo_lost, dropped, jitter_us, channels, t0_utc_ms, received_at, raw)

    @classmethod
    def _from_json_header(cls, device_id: str, epoch: int, seq: int, stream: int, t0_ms: int, t0_utc_ms: int | None,
                          first_index: int, count: int, received_at: float, raw: bytes, header: dict[str, Any],
                          samples: bytes) -> FrameRecord:
        # A record stored by agents of schema 3 (JSON header, int16 steps or int32 values).
        if header.get("samples") == "steps16":
            first = np.array([int(v) for v in header["first"]], dtype=np.int64)
            steps = np.frombuffer(samples, dtype=_STEP16_DTYPE)
            if count < 1 or len(steps) != len(first) * (count - 1):
                raise ValueError("%d stored steps are not %d channels of %d samples" % (len(steps), len(first), count))
            channels = _cumulated(first, steps.reshape(len(first), count - 1), count)
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


def pack_steps(channels: list[tuple[int, int, bytes]]) -> tuple[int, bytes]:
    """FrameRecord.packed_steps of channels given as (first sample, width, count - 1 steps
    as signed little-endian integers of width bytes, 1 or 2): each channel's steps in the
    widest width among them, as stored() would choose from the samples."""
    if len(channels) == 1:  # an ECG frame
        first, width, steps = channels[0]
        return width, _FIRST.pack(first) + steps
    width = max(w for _, w, _ in channels)
    bodies = [steps if w == width else np.frombuffer(steps, dtype=_WIDTH_DTYPES[w]).astype(_WIDTH_DTYPES[width])
              .tobytes() for _, w, steps in channels]
    return width, struct.pack("<%di" % len(channels), *[first for first, _, _ in channels]) + b"".join(bodies)


_FIRST = struct.Struct("<i")


def _packed_count(width: int, body: bytes, count: int) -> int:
    # The channels in pack_steps()'s body: each its first sample (4 bytes) and count - 1 steps.
    return len(body) // (4 + width * (count - 1))


def unpacked_steps(width: int, body: bytes, n: int, count: int) -> tuple[Samples, ...]:
    """The n channels of count samples (count >= 1) whose steps pack_steps() packed in width
    bytes (body: as it returned it, n * (4 + width * (count - 1)) bytes)."""
    dtype = _WIDTH_DTYPES[width]
    if n == 1:  # an ECG frame: its samples in four numpy calls
        values = np.empty(count, dtype=SAMPLE_DTYPE)
        values[0] = _FIRST.unpack_from(body)[0]
        values[1:] = np.frombuffer(body, dtype=dtype, offset=4)
        return (np.cumsum(values, out=values),)
    first = np.frombuffer(body, dtype=SAMPLE_DTYPE, count=n)
    return _cumulated(first, np.frombuffer(body, dtype=dtype, offset=4 * n).reshape(n, count - 1), count)


def stored_fifo_lost(header: dict[str, Any] | None, samples: bytes | None) -> int:
    """The samples a stored frame says its sensor's FIFO lost (0 if it cannot be read)."""
    try:
        if header is not None:
            return int(header["fifo_lost_samples"])
        if samples is not None and len(samples) >= _PACKED.size and samples[0] == _PACKED_FORMAT:
            return int(_PACKED.unpack_from(samples)[8])
    except (KeyError, TypeError, ValueError):
        pass
    return 0


def _cumulated(first: npt.NDArray[Any], steps: npt.NDArray[Any], count: int) -> tuple[Samples, ...]:
    # Each channel's samples from its first sample and its steps, summed in place in int32:
    # wrapping sums are exact modulo 2^32, so every sample that fits int32 (SPEC.md bounds
    # them all to it) comes out right without an int64 pass and its copy.
    values = np.empty((len(first), count), dtype=np.int32)
    values[:, 0] = first
    values[:, 1:] = steps
    np.cumsum(values, axis=1, out=values)
    return tuple(values)


def iso_ms(t: float) -> str:
    """UTC seconds as ISO 8601 with milliseconds: 2026-01-02T03:04:05.678Z."""
    return _utc_second(math.floor(t)) + ".%03dZ" % int(t * 1000 % 1000)


def iso_s(t: float) -> str:
    """UTC seconds as ISO 8601 to the second: 2026-01-02T03:04:05Z."""
    return _utc_second(math.floor(t)) + "Z"


@functools.lru_cache(maxsize=1024)
def _utc_second(s: int) -> str:
    # Formatted once a second of time, not once a document (a backlog's frames share their seconds).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
