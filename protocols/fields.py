# What a board writes and reads in its steady state, apart from the rest of
# the message layer (protocols/messages.py, which re-exports all of it):
# the protocol's numbers (version, message types, streams, status flags,
# bounds) and the field-wise encoders a board uses, which write a message
# field by field into a caller-owned buffer, the same bytes as
# messages.encode's generic walk without building a message object (their
# forms with every field as an argument, and the hub's ack, are in
# messages.py). A board imports this
# alone; the message classes, the generic encoder and the decoder (about
# 14 kB of its heap as .mpy code) load only for a rarer message and leave
# again (app/main.py).

from protocols import cbor, cipher, samples
from protocols._compat import const
from protocols.errors import LocalProtocolError

TYPE_CHECKING = False  # type checkers take this as true; MicroPython has no typing module
if TYPE_CHECKING:
    from collections.abc import Callable

VERSION = const(2)  # 2: sample frames carry the boot salt of their key (key 15)

T_SAMPLES = const(1)
T_ACK = const(2)
T_TIME_REQUEST = const(3)
T_TIME_RESPONSE = const(4)
T_HELLO = const(5)
T_STATUS = const(6)
T_ERROR = const(7)
T_COMMAND = const(8)
T_EPOCH_RESYNC = const(9)
T_ORIGIN = const(10)
T_UPDATE_CHUNK = const(11)
T_UPDATE_STATE = const(12)

STREAM_ECG_MAX30003 = const(1)
STREAM_ECG_AD8232 = const(2)
STREAM_PPG_MAX30102 = const(3)
STREAM_CHANNELS = {STREAM_ECG_MAX30003: 1, STREAM_ECG_AD8232: 1, STREAM_PPG_MAX30102: 2}

# Sensor status flags (bit numbers in status[0]).
FLAG_LEAD_OFF = const(1)
FLAG_SATURATED = const(2)
FLAG_FIFO_OVERFLOW = const(4)
FLAG_SENSOR_FAULT = const(8)

# One frame holds at most this many samples per channel: a 1 s window of the
# fastest stream (512 Hz) with room for 4 s windows at 100 Hz or 2 s at 512 Hz.
MAX_SAMPLES = const(1024)
MAX_ACK_RANGES = const(16)
# Bytes of a bundle in one update chunk: with its envelope it stays under
# the 256-byte downlink bound (SPEC.md, Firmware updates).
MAX_UPDATE_CHUNK = const(160)
MAX_BUNDLE = const(2097152)  # 2 MB: a MicroPython image, or a slot of .mpy files with room to spare
MAX_TEXT = const(96)
# Every integer a board sends is bounded as the hub stores and forwards it:
# at most 2^53 - 1, exact in the IEEE doubles that JSON consumers read
# numbers as, and well inside SQLite's signed 64-bit integers. Epoch and seq
# go into the sample cipher's counter block: 32 bits (and so every uplink
# message's, since one seq counts them all).
MAX_UPLINK_INT = const(0x1FFFFFFFFFFFFF)
MAX_EPOCH = const(0xFFFFFFFF)
MAX_SEQ = const(0xFFFFFFFF)
# An origin checkpoint (type 10) lists at most 32 frames: 16-byte digests and
# their seqs, with its header and MAC, stay well under this.
MAX_ORIGIN_CHECKPOINT = const(1024)


def _start(w: "cbor.Writer", kind: int, nfields: int) -> None:
    w.map(nfields)
    w.uint(0)
    w.uint(kind)
    w.uint(1)
    w.uint(VERSION)


class SampleFrameFields:
    # A sample frame's fields, written by encode() field by field into a
    # caller-owned writer (messages.encode_sample_frame's arguments, as attributes).
    # A board keeps one and sets its fields for each frame: a call with
    # the 19 values as arguments needs a frame of over 20 words, past the
    # VM's 11, so the frame would be taken from the heap at every call (and
    # the caller's with it; README, "call frames"). Each method here keeps
    # within 11 words.
    # channels: one sample sequence per channel (array('i') on the board),
    # or each channel's samples already encoded (bytes, as decode_payload
    # gives them with decode_samples=False: re-sealing a frame). Each
    # channel's samples are encoded and encrypted in place in w's buffer
    # (no scratch buffer: on the board that would be 1.5 kB of heap).
    # sealer: the device's sample cipher for this boot (samples are always
    # encrypted); its boot salt goes in the frame (key 15).
    # between: called after the header and after each channel (a board
    # reads its sensors' FIFOs there: a frame takes tens of ms on a chip);
    # it must leave w alone.
    # t0_ms_hi, first_index_hi: a board's high halves (the values are then
    # t0_ms_hi * 2**30 + t0_ms, and likewise first_index; each low half under
    # 2**30): on a 32-bit port larger ints are heap ints (cbor.uint_halves).
    def __init__(self, sealer: "cipher.SampleCipher") -> None:
        self.sealer = sealer
        self.epoch = 0
        self.seq = 0
        self.stream = 0
        self.t0_ms = 0
        self.t0_ms_hi = 0
        self.first_index = 0
        self.first_index_hi = 0
        self.rate_hz = 0
        self.count = 0
        self.scale_num = 1
        self.scale_den = 1
        self.ppg_drive: "tuple[int, int, int, int] | None" = None
        self.flags = 0
        self.fifo_overflows = 0
        self.frames_dropped = 0
        self.jitter_us = 0
        self.channels: "tuple[list[int] | bytes, ...]" = ()
        self.between: "Callable[[], object] | None" = None
        self._offset = 0  # (encode: the keystream's offset at the channel being written)

    def encode(self, w: "cbor.Writer") -> None:
        self._check()
        _start(w, T_SAMPLES, 16 if self.ppg_drive is not None else 15)
        self._header(w)
        self._status(w)
        self.sealer.begin(self.epoch, self.seq)
        self._offset = 0
        for k in range(len(self.channels)):
            if self.between is not None:
                self.between()
            self._channel(w, k)
        if self.between is not None:
            self.between()
        w.uint(14)
        w.sint(cipher.ALG_A256CTR)
        w.uint(15)
        w.bstr(self.sealer.boot_salt)  # type: ignore[arg-type]  # (_check: not None)

    def _check(self) -> None:
        if not 0 < self.count <= MAX_SAMPLES:
            raise LocalProtocolError("a frame holds 1 to %d samples, not %d" % (MAX_SAMPLES, self.count),
                                     "sample_count")
        if len(self.channels) != STREAM_CHANNELS.get(self.stream, 0):
            raise LocalProtocolError("stream %d takes %d channels" % (self.stream,
                                                                      STREAM_CHANNELS.get(self.stream, 0)), "channels")
        if self.sealer.boot_salt is None:
            raise LocalProtocolError("sealing sample frames needs a cipher with this boot's salt", "salt")

    def _header(self, w: "cbor.Writer") -> None:
        w.uint(2)
        w.uint(self.epoch)
        w.uint(3)
        w.uint(self.seq)
        w.uint(4)
        w.uint(self.stream)
        w.uint(5)
        w.uint_halves(self.t0_ms_hi, self.t0_ms)
        w.uint(6)
        w.uint_halves(self.first_index_hi, self.first_index)
        w.uint(7)
        w.uint(self.rate_hz)
        w.uint(8)
        w.uint(self.count)
        w.uint(9)
        w.array(2)
        w.uint(self.scale_num)
        w.uint(self.scale_den)

    def _status(self, w: "cbor.Writer") -> None:
        drive = self.ppg_drive
        if drive is not None:
            w.uint(10)
            w.array(4)
            for i in range(4):
                w.uint(drive[i])
        w.uint(11)
        w.array(4)
        w.uint(self.flags)
        w.uint(self.fifo_overflows)
        w.uint(self.frames_dropped)
        w.uint(self.jitter_us)
        w.uint(12)
        w.uint(samples.ENCODING_DELTA_ZIGZAG_VARINT)
        w.uint(13)
        w.array(len(self.channels))

    def _channel(self, w: "cbor.Writer", k: int) -> None:
        # Channel k's samples encoded (or copied) and encrypted where its
        # byte string goes, then its head before them.
        start = w.pos + cbor.BSTR_HEAD_MAX  # room for the head, written once the length is known
        n = self._samples_into(w, k, start) - start
        self.sealer.xor(w.buf, start, start + n, self._offset)
        self._offset += n
        w.bstr_written(start, n)

    def _samples_into(self, w: "cbor.Writer", k: int, start: int) -> int:
        # (One type: no tuple built per frame, the board's path allocates nothing.)
        if isinstance(self.channels[k], bytes):
            return _copy_encoded(w, self.channels[k], start)  # type: ignore[arg-type]
        return samples.encode_into(self.channels[k], self.count, w.buf, start, w.end)  # type: ignore[arg-type]


def _copy_encoded(w: "cbor.Writer", ch: bytes, start: int) -> int:
    n = len(ch)
    if start + n > w.end:
        raise LocalProtocolError("CBOR output buffer full (%d bytes)" % w.end, "buffer_full")
    w.buf[start:start + n] = ch
    return start + n


def encode_status_start(w: "cbor.Writer", epoch: int, seq: int, tick_ms: int, tick_ms_hi: int,
                        unique_id: bytes) -> None:
    # A status up to its time (keys 0 to 4).
    _start(w, T_STATUS, 9 if unique_id else 8)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.uint(seq)
    w.uint(4)
    w.uint_halves(tick_ms_hi, tick_ms)  # (hi 0: uint(tick_ms))


def encode_status_end(w: "cbor.Writer", outbox_depth: int, frames_dropped: int, free_heap: int,
                      unique_id: bytes) -> None:
    # The rest, after encode_status_start (keys 5 to 8).
    w.uint(5)
    w.uint(outbox_depth)
    w.uint(6)
    w.uint(frames_dropped)
    w.uint(7)
    w.uint(free_heap)
    if unique_id:
        w.uint(8)
        w.bstr(unique_id)


def encode_hello(w: "cbor.Writer", epoch: int, seq: int, firmware: str, tick_ms: int,
                 streams: "list[tuple[int, int]] | tuple[tuple[int, int], ...]", tick_ms_hi: int = 0) -> None:
    # The same bytes as encode(w, Hello(...)), the board's uptime in two
    # halves as encode_status's (tick_ms_hi * 2**30 + tick_ms): after 12.4
    # days up one int would be a heap int on a 32-bit port.
    if len(firmware) > MAX_TEXT:
        raise LocalProtocolError("text field longer than %d" % MAX_TEXT, "too_long")
    _start(w, T_HELLO, 7)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.uint(seq)
    w.uint(4)
    w.text(firmware)
    w.uint(5)
    w.uint_halves(tick_ms_hi, tick_ms)
    w.uint(6)
    w.array(len(streams))
    for stream, rate_hz in streams:
        w.array(2)
        w.uint(stream)
        w.uint(rate_hz)


def encode_time_response(w: "cbor.Writer", epoch: int, seq: int, nonce: int, tick_ms: int,
                         tick_ms_hi: int = 0) -> None:
    # The same bytes as encode(w, TimeResponse(...)), without the generic
    # walk: a board answers the hub's time request (one a minute) with
    # nothing allocated. tick_ms_hi: as encode_status's.
    _start(w, T_TIME_RESPONSE, 6)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.uint(seq)
    w.uint(4)
    w.uint(nonce)
    w.uint(5)
    w.uint_halves(tick_ms_hi, tick_ms)  # (hi 0: uint(tick_ms))


def encode_error_report(w: "cbor.Writer", epoch: int, seq: int, code: int, text: str) -> None:
    # The same bytes as encode(w, ErrorReport(...)): text at most MAX_TEXT characters.
    if len(text) > MAX_TEXT:
        raise LocalProtocolError("text field longer than %d" % MAX_TEXT, "too_long")
    _start(w, T_ERROR, 6)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.uint(seq)
    w.uint(4)
    w.uint(code)
    w.uint(5)
    w.text(text)
