# The messages carried as COSE_Mac0 payloads, and their CBOR maps.
# SPEC.md describes each one; frame.cddl is their schema. Every payload is a
# map with small integer keys written in ascending order (deterministic
# CBOR), key 0 the message type and key 1 the protocol version.
#
# The protocol's numbers and the field-wise encoders (each writes one
# message field by field into a caller-owned buffer: the board's steady
# state) live in protocols/fields.py, re-exported here; a board imports that
# module alone. Here: the typed messages, encode() for any of them, and
# decode_payload(), which turns any bytes into one typed message or raises
# RemoteProtocolError naming the field that was wrong (protocols/decode.py).

from protocols import cbor, cipher
from protocols._compat import const
from protocols.errors import LocalProtocolError
from protocols.fields import (  # noqa: F401  (re-exported: pyproject.toml, implicit_reexport)
    FLAG_FIFO_OVERFLOW,
    FLAG_LEAD_OFF,
    FLAG_SATURATED,
    FLAG_SENSOR_FAULT,
    MAX_ACK_RANGES,
    MAX_BUNDLE,
    MAX_EPOCH,
    MAX_ORIGIN_CHECKPOINT,
    MAX_SAMPLES,
    MAX_SEQ,
    MAX_TEXT,
    MAX_UPDATE_CHUNK,
    MAX_UPLINK_INT,
    STREAM_CHANNELS,
    STREAM_ECG_AD8232,
    STREAM_ECG_MAX30003,
    STREAM_PPG_MAX30102,
    T_ACK,
    T_COMMAND,
    T_EPOCH_RESYNC,
    T_ERROR,
    T_HELLO,
    T_ORIGIN,
    T_SAMPLES,
    T_STATUS,
    T_TIME_REQUEST,
    T_TIME_RESPONSE,
    T_UPDATE_CHUNK,
    T_UPDATE_STATE,
    VERSION,
    SampleFrameFields,
    _start,
    encode_error_report,
    encode_hello,
    encode_status_end,
    encode_status_start,
    encode_time_response,
)

TYPE_CHECKING = False  # type checkers take this as true; MicroPython has no typing module
if TYPE_CHECKING:
    from collections.abc import Callable


def encode_sample_frame(w: "cbor.Writer", epoch: int, seq: int, stream: int, t0_ms: int,
                        first_index: int, rate_hz: int, count: int, scale_num: int, scale_den: int,
                        ppg_drive: "tuple[int, int, int, int] | None", flags: int, fifo_overflows: int,
                        frames_dropped: int, jitter_us: int, channels: "tuple[list[int] | bytes, ...]",
                        sealer: "cipher.SampleCipher", between: "Callable[[], object] | None" = None,
                        t0_ms_hi: int = 0, first_index_hi: int = 0) -> None:
    # A sample frame's payload at w, from these fields (fields.SampleFrameFields
    # says what each is; a board keeps one of those instead).
    f = SampleFrameFields(sealer)
    f.epoch = epoch
    f.seq = seq
    f.stream = stream
    f.t0_ms = t0_ms
    f.t0_ms_hi = t0_ms_hi
    f.first_index = first_index
    f.first_index_hi = first_index_hi
    f.rate_hz = rate_hz
    f.count = count
    f.scale_num = scale_num
    f.scale_den = scale_den
    f.ppg_drive = ppg_drive
    f.flags = flags
    f.fifo_overflows = fifo_overflows
    f.frames_dropped = frames_dropped
    f.jitter_us = jitter_us
    f.channels = channels
    f.between = between
    f.encode(w)


def encode_ack(w: "cbor.Writer", epoch: int, ranges: "list[tuple[int, int]]") -> None:
    # The same bytes as encode(w, Ack(epoch, ranges)), without the generic walk.
    _start(w, T_ACK, 4)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.array(len(ranges))
    for a, b in ranges:
        w.array(2)
        w.uint(a)
        w.uint(b)


def encode_status(w: "cbor.Writer", epoch: int, seq: int, tick_ms: int, outbox_depth: int, frames_dropped: int,
                  free_heap: int, tick_ms_hi: int = 0, unique_id: bytes = b"") -> None:
    # The same bytes as encode(w, Status(...)), without the generic walk: a
    # board sends one every status period and allocates nothing for it.
    # tick_ms_hi: the time in two halves, tick_ms_hi * 2**30 + tick_ms
    # (tick_ms < 2**30 then: small ints on a 32-bit port for any uptime).
    # unique_id: the chip's, read once at start; b"": left out. A board
    # writes it in its two pieces (fields.encode_status_start and _end),
    # each call within the VM's 11 words of frame (README, "call frames").
    encode_status_start(w, epoch, seq, tick_ms, tick_ms_hi, unique_id)
    encode_status_end(w, outbox_depth, frames_dropped, free_heap, unique_id)


# What a hub re-reads from its store: frames stored before an upgrade keep
# their version. Version 1: sample frames without key 15 (one sample key per
# device). Boards must speak VERSION (SPEC.md, "Evolving the format").
STORED_VERSIONS = (1, 2)

UPLINK_TYPES = (T_SAMPLES, T_TIME_RESPONSE, T_HELLO, T_STATUS, T_ERROR, T_ORIGIN, T_UPDATE_STATE)
DOWNLINK_TYPES = (T_ACK, T_TIME_REQUEST, T_COMMAND, T_EPOCH_RESYNC, T_UPDATE_CHUNK)

STREAM_NAMES = {STREAM_ECG_MAX30003: "ecg", STREAM_ECG_AD8232: "ecg-ad8232", STREAM_PPG_MAX30102: "ppg"}

# Error report codes (type 7; SPEC.md says what the board then does).
ERROR_CODES = {1: "sensor_setup", 2: "sensor_fault", 3: "link_fault", 4: "loop_restarted", 5: "watchdog_reset",
               6: "epoch_resync", 7: "no_memory"}

# Keys at or above this are extensions: a decoder ignores those it does not
# know. Any other unknown key is an error (see "Evolving the format" in SPEC.md).
EXTENSION_KEYS = const(64)
MAX_STREAMS = const(4)
# A board's unique chip id (machine.unique_id()): 6 bytes on an ESP32 (its base MAC), 8 on an
# RP2040, 12 on an STM32; 16 holds any port's.
MAX_UNIQUE_ID = const(16)


class Message:
    kind = 0
    _fields: "tuple[str, ...]" = ()
    # Trailing fields that may be absent on the wire: left out when empty.
    _optional: "tuple[str, ...]" = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, f) == getattr(other, f) for f in self._fields)

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % (f, getattr(self, f)) for f in self._fields))


class SampleFrame(Message):
    kind = T_SAMPLES
    # The boot salt the frame came with (key 15; None in a version 1 frame
    # or one not decoded from the wire). Not a field: encoding takes it from
    # the sealing cipher.
    boot_salt: "bytes | None" = None
    _fields = ("epoch", "seq", "stream", "t0_ms", "first_index", "rate_hz", "count", "scale", "ppg_drive",
               "status", "channels")

    def __init__(self, epoch: int, seq: int, stream: int, t0_ms: int, first_index: int, rate_hz: int, count: int,
                 scale: "tuple[int, int]", ppg_drive: "tuple[int, int, int, int] | None",
                 status: "tuple[int, int, int, int]", channels: "list[list[int]]") -> None:
        self.epoch = epoch
        self.seq = seq
        self.stream = stream
        self.t0_ms = t0_ms
        self.first_index = first_index
        self.rate_hz = rate_hz
        self.count = count
        self.scale = scale
        self.ppg_drive = ppg_drive
        self.status = status
        self.channels = channels


class Ack(Message):
    kind = T_ACK
    _fields = ("epoch", "ranges")

    def __init__(self, epoch: int, ranges: "list[tuple[int, int]]") -> None:
        self.epoch = epoch
        self.ranges = ranges

    def covers(self, epoch: int, seq: int) -> bool:
        if epoch != self.epoch:
            return False
        for first, last in self.ranges:
            if first <= seq <= last:
                return True
        return False


class TimeRequest(Message):
    kind = T_TIME_REQUEST
    _fields = ("nonce", "utc_ms")

    def __init__(self, nonce: int, utc_ms: int) -> None:
        self.nonce = nonce
        self.utc_ms = utc_ms


class TimeResponse(Message):
    kind = T_TIME_RESPONSE
    _fields = ("epoch", "seq", "nonce", "tick_ms")

    def __init__(self, epoch: int, seq: int, nonce: int, tick_ms: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self.nonce = nonce
        self.tick_ms = tick_ms


class Hello(Message):
    kind = T_HELLO
    _fields = ("epoch", "seq", "firmware", "tick_ms", "streams")

    def __init__(self, epoch: int, seq: int, firmware: str, tick_ms: int, streams: "list[tuple[int, int]]") -> None:
        self.epoch = epoch
        self.seq = seq
        self.firmware = firmware
        self.tick_ms = tick_ms
        self.streams = streams


class Status(Message):
    kind = T_STATUS
    _fields = ("epoch", "seq", "tick_ms", "outbox_depth", "frames_dropped", "free_heap", "unique_id")
    _optional = ("unique_id",)

    def __init__(self, epoch: int, seq: int, tick_ms: int, outbox_depth: int, frames_dropped: int,
                 free_heap: int, unique_id: bytes = b"") -> None:
        self.epoch = epoch
        self.seq = seq
        self.tick_ms = tick_ms
        self.outbox_depth = outbox_depth
        self.frames_dropped = frames_dropped
        self.free_heap = free_heap
        self.unique_id = unique_id  # the chip's (machine.unique_id()); b"" where the board has none


class ErrorReport(Message):
    kind = T_ERROR
    _fields = ("epoch", "seq", "code", "text")

    def __init__(self, epoch: int, seq: int, code: int, text: str) -> None:
        self.epoch = epoch
        self.seq = seq
        self.code = code
        self.text = text


class Command(Message):
    kind = T_COMMAND
    _fields = ("epoch", "nonce", "name")

    def __init__(self, epoch: int, nonce: int, name: str) -> None:
        self.epoch = epoch
        self.nonce = nonce
        self.name = name


class EpochResync(Message):
    # Hub to board: "your frames of refused_epoch were refused: I have seen
    # newest_epoch from you". A board whose epoch is refused_epoch moves it
    # past newest_epoch (SPEC.md, "Epoch resync").
    kind = T_EPOCH_RESYNC
    _fields = ("refused_epoch", "newest_epoch")

    def __init__(self, refused_epoch: int, newest_epoch: int) -> None:
        self.refused_epoch = refused_epoch
        self.newest_epoch = newest_epoch


class OriginCheckpoint(Message):
    # An origin checkpoint (SPEC.md, Origin proof): `checkpoint` is a COSE_Mac0
    # under the board's origin key, which the hub does not hold; the hub
    # stores and forwards it untouched (protocols/origin.py reads it).
    kind = T_ORIGIN
    _fields = ("epoch", "seq", "checkpoint")

    def __init__(self, epoch: int, seq: int, checkpoint: bytes) -> None:
        self.epoch = epoch
        self.seq = seq
        self.checkpoint = checkpoint


class UpdateChunk(Message):
    # Hub to board: bytes [offset, offset + len(data)) of a signed bundle of
    # `total` bytes (SPEC.md, Firmware updates: install).
    kind = T_UPDATE_CHUNK
    _fields = ("epoch", "offset", "total", "data")

    def __init__(self, epoch: int, offset: int, total: int, data: bytes) -> None:
        self.epoch = epoch
        self.offset = offset
        self.total = total
        self.data = data


class UpdateState(Message):
    # Board to hub: where its update stands. offset: the first bundle byte
    # it still needs (a resumed push starts there); state: "receiving",
    # "verifying", "installed" (reboots into it on trial), "confirmed",
    # "rolled_back", or "refused:<reason>" (protocols/bundle.py's reasons).
    kind = T_UPDATE_STATE
    _fields = ("epoch", "seq", "offset", "state")

    def __init__(self, epoch: int, seq: int, offset: int, state: str) -> None:
        self.epoch = epoch
        self.seq = seq
        self.offset = offset
        self.state = state


# ---- encoding ---------------------------------------------------------------

def encode(w: "cbor.Writer", msg: Message, sealer: "cipher.SampleCipher | None" = None) -> None:
    # Encodes any message object (the board uses the field-wise encoder for
    # sample frames; this is for the rarer messages and for the hub). A
    # sample frame needs the device's sample cipher.
    k = msg.kind
    if isinstance(msg, SampleFrame):
        if sealer is None:
            raise LocalProtocolError("a sample frame is encrypted: its device's SampleCipher is needed", "cipher")
        encode_sample_frame(w, msg.epoch, msg.seq, msg.stream, msg.t0_ms, msg.first_index,
                            msg.rate_hz, msg.count, msg.scale[0], msg.scale[1], msg.ppg_drive,
                            msg.status[0], msg.status[1], msg.status[2], msg.status[3], tuple(msg.channels),
                            sealer)
        return
    values = [getattr(msg, f) for f in msg._fields]
    n = len(values)
    while n and msg._fields[n - 1] in msg._optional and not values[n - 1]:
        n -= 1  # an empty optional field is left out
    values = values[:n]
    _start(w, k, 2 + n)
    key = 2
    for v in values:
        w.uint(key)
        key += 1
        if isinstance(v, str):
            if len(v) > MAX_TEXT:
                raise LocalProtocolError("text field longer than %d" % MAX_TEXT, "too_long")
            w.text(v)
        elif isinstance(v, (bytes, bytearray)):
            w.bstr(v)
        elif isinstance(v, int):
            w.uint(v)
        else:  # list of pairs: ack ranges, hello streams
            w.array(len(v))
            for a, b in v:
                w.array(2)
                w.uint(a)
                w.uint(b)


def encoded(msg: Message, size: int = 4096, sealer: "cipher.SampleCipher | None" = None) -> bytes:
    w = cbor.Writer(bytearray(size))
    encode(w, msg, sealer)
    return bytes(w.buf[:w.pos])


def decode_payload(payload: "bytes | bytearray | memoryview", allowed_kinds: "tuple[int, ...]" = (),
                   decode_samples: bool = True, opener: "cipher.SampleCipher | None" = None,
                   versions: "tuple[int, ...]" = (VERSION,),
                   cbor_decode: "Callable[[bytes | bytearray | memoryview], object] | None" = None) -> Message:
    # Any payload to one typed message, or RemoteProtocolError naming the
    # field that was wrong (protocols/decode.py, which says what the options
    # do). The decoder is imported at its first use: a board needs it only
    # for its rarer downlink messages, and drops it after each (app/main.py).
    from protocols import decode

    return decode.decode_payload(payload, allowed_kinds, decode_samples, opener, versions, cbor_decode)
