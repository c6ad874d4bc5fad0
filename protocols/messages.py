# The messages carried as COSE_Mac0 payloads, and their CBOR maps.
# SPEC.md describes each one; frame.cddl is their schema. Every payload is a
# map with small integer keys written in ascending order (deterministic
# CBOR), key 0 the message type and key 1 the protocol version.
#
# Encoders write field by field into a caller-owned buffer (the board calls
# them once per frame). decode_payload() turns any bytes into one typed
# message or raises RemoteProtocolError naming the field that was wrong.

from protocols import cbor, cipher, samples
from protocols._compat import const
from protocols.errors import LocalProtocolError, RemoteProtocolError

TYPE_CHECKING = False  # type checkers take this as true; MicroPython has no typing module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

VERSION = const(2)  # 2: sample frames carry the boot salt of their key (key 15)
# What a hub re-reads from its store: frames stored before an upgrade keep
# their version. Version 1: sample frames without key 15 (one sample key per
# device). Boards must speak VERSION (SPEC.md, "Evolving the format").
STORED_VERSIONS = (1, 2)

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

UPLINK_TYPES = (T_SAMPLES, T_TIME_RESPONSE, T_HELLO, T_STATUS, T_ERROR, T_ORIGIN, T_UPDATE_STATE)
DOWNLINK_TYPES = (T_ACK, T_TIME_REQUEST, T_COMMAND, T_EPOCH_RESYNC, T_UPDATE_CHUNK)

STREAM_ECG_MAX30003 = const(1)
STREAM_ECG_AD8232 = const(2)
STREAM_PPG_MAX30102 = const(3)
STREAM_NAMES = {STREAM_ECG_MAX30003: "ecg", STREAM_ECG_AD8232: "ecg-ad8232", STREAM_PPG_MAX30102: "ppg"}
STREAM_CHANNELS = {STREAM_ECG_MAX30003: 1, STREAM_ECG_AD8232: 1, STREAM_PPG_MAX30102: 2}

# Error report codes (type 7; SPEC.md says what the board then does).
ERROR_CODES = {1: "sensor_setup", 2: "sensor_fault", 3: "link_fault", 4: "loop_restarted", 5: "watchdog_reset",
               6: "epoch_resync"}

# Sensor status flags (bit numbers in status[0]).
FLAG_LEAD_OFF = const(1)
FLAG_SATURATED = const(2)
FLAG_FIFO_OVERFLOW = const(4)
FLAG_SENSOR_FAULT = const(8)

# Keys at or above this are extensions: a decoder ignores those it does not
# know. Any other unknown key is an error (see "Evolving the format" in SPEC.md).
EXTENSION_KEYS = const(64)
# One frame holds at most this many samples per channel: a 1 s window of the
# fastest stream (512 Hz) with room for 4 s windows at 100 Hz or 2 s at 512 Hz.
MAX_SAMPLES = const(1024)
MAX_ACK_RANGES = const(16)
MAX_TEXT = const(96)
MAX_STREAMS = const(4)
_UINT64_MAX = const(0xFFFFFFFFFFFFFFFF)
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
# Bytes of a bundle in one update chunk: with its envelope it stays under
# the 256-byte downlink bound (SPEC.md, Firmware updates).
MAX_UPDATE_CHUNK = const(160)
MAX_BUNDLE = const(2097152)  # 2 MB: a MicroPython image, or a slot of .mpy files with room to spare


class Message:
    kind = 0
    _fields: "tuple[str, ...]" = ()

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
    _fields = ("epoch", "seq", "tick_ms", "outbox_depth", "frames_dropped", "free_heap")

    def __init__(self, epoch: int, seq: int, tick_ms: int, outbox_depth: int, frames_dropped: int,
                 free_heap: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self.tick_ms = tick_ms
        self.outbox_depth = outbox_depth
        self.frames_dropped = frames_dropped
        self.free_heap = free_heap


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

def _start(w: "cbor.Writer", kind: int, nfields: int) -> None:
    w.map(nfields)
    w.uint(0)
    w.uint(kind)
    w.uint(1)
    w.uint(VERSION)


def encode_sample_frame(w: "cbor.Writer", epoch: int, seq: int, stream: int, t0_ms: int,
                        first_index: int, rate_hz: int, count: int, scale_num: int, scale_den: int,
                        ppg_drive: "tuple[int, int, int, int] | None", flags: int, fifo_overflows: int,
                        frames_dropped: int, jitter_us: int, channels: "tuple[list[int] | bytes, ...]",
                        sealer: "cipher.SampleCipher", between: "Callable[[], object] | None" = None,
                        t0_ms_hi: int = 0, first_index_hi: int = 0) -> None:
    # channels: one sample sequence per channel (array('i') on the board),
    # or each channel's samples already encoded (bytes, as decode_payload
    # gives them with decode_samples=False: re-sealing a frame);
    # Each channel's samples are encoded and encrypted in place in w's
    # buffer (no scratch buffer: on the board that would be 1.5 kB of heap).
    # sealer: the device's sample cipher for this boot (samples are always
    # encrypted); its boot salt goes in the frame (key 15).
    # between: called after the header and after each channel (a board
    # reads its sensors' FIFOs there: a frame takes tens of ms on a chip);
    # it must leave w alone.
    # t0_ms_hi, first_index_hi: a board's high halves (the values are then
    # t0_ms_hi * 2**30 + t0_ms, and likewise first_index; each low half under
    # 2**30): on a 32-bit port larger ints are heap ints (cbor.uint_halves).
    if not 0 < count <= MAX_SAMPLES:
        raise LocalProtocolError("a frame holds 1 to %d samples, not %d" % (MAX_SAMPLES, count), "sample_count")
    if len(channels) != STREAM_CHANNELS.get(stream, 0):
        raise LocalProtocolError("stream %d takes %d channels" % (stream, STREAM_CHANNELS.get(stream, 0)), "channels")
    salt = sealer.boot_salt
    if salt is None:
        raise LocalProtocolError("sealing sample frames needs a cipher with this boot's salt", "salt")
    _start(w, T_SAMPLES, 16 if ppg_drive is not None else 15)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.uint(seq)
    w.uint(4)
    w.uint(stream)
    w.uint(5)
    w.uint_halves(t0_ms_hi, t0_ms)
    w.uint(6)
    w.uint_halves(first_index_hi, first_index)
    w.uint(7)
    w.uint(rate_hz)
    w.uint(8)
    w.uint(count)
    w.uint(9)
    w.array(2)
    w.uint(scale_num)
    w.uint(scale_den)
    if ppg_drive is not None:
        w.uint(10)
        w.array(4)
        for v in ppg_drive:
            w.uint(v)
    w.uint(11)
    w.array(4)
    w.uint(flags)
    w.uint(fifo_overflows)
    w.uint(frames_dropped)
    w.uint(jitter_us)
    w.uint(12)
    w.uint(samples.ENCODING_DELTA_ZIGZAG_VARINT)
    w.uint(13)
    w.array(len(channels))
    offset = 0
    buf = w.buf
    for ch in channels:
        if between is not None:
            between()
        start = w.pos + cbor.BSTR_HEAD_MAX  # room for the head, written once the length is known
        if isinstance(ch, bytes):  # one type, no tuple built per frame: the board's path allocates nothing
            n = len(ch)
            if start + n > w.end:
                raise LocalProtocolError("CBOR output buffer full (%d bytes)" % w.end, "buffer_full")
            buf[start:start + n] = ch
        else:
            n = samples.encode_into(ch, count, buf, start, w.end) - start
        sealer.apply(buf, start, start + n, epoch, seq, offset)
        offset += n
        w.bstr_written(start, n)
    if between is not None:
        between()
    w.uint(14)
    w.sint(cipher.ALG_A256CTR)
    w.uint(15)
    w.bstr(salt)


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
    _start(w, k, 2 + len(values))
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
                  free_heap: int) -> None:
    # The same bytes as encode(w, Status(...)), without the generic walk: a
    # board sends one every status period and allocates nothing for it.
    _start(w, T_STATUS, 8)
    w.uint(2)
    w.uint(epoch)
    w.uint(3)
    w.uint(seq)
    w.uint(4)
    w.uint(tick_ms)
    w.uint(5)
    w.uint(outbox_depth)
    w.uint(6)
    w.uint(frames_dropped)
    w.uint(7)
    w.uint(free_heap)


def encoded(msg: Message, size: int = 4096, sealer: "cipher.SampleCipher | None" = None) -> bytes:
    w = cbor.Writer(bytearray(size))
    encode(w, msg, sealer)
    return bytes(w.buf[:w.pos])


# ---- decoding ---------------------------------------------------------------

def _fail(what: str, reason: str = "schema") -> "NoReturn":
    raise RemoteProtocolError(what, reason)


def _uint(m: "dict[object, object]", key: int, name: str, limit: int = _UINT64_MAX) -> int:
    v = m.get(key)
    if not isinstance(v, int) or v is True or v is False or v < 0:
        _fail("field %s (key %d) must be an unsigned integer" % (name, key))
    if v > limit:
        _fail("field %s (key %d) is %d, above %d" % (name, key, v, limit), "range")
    return v


def _pairs(m: "dict[object, object]", key: int, name: str, limit: int,
           value_limit: int = _UINT64_MAX) -> "list[tuple[int, int]]":
    v = m.get(key)
    if not isinstance(v, list) or not 0 < len(v) <= limit:
        _fail("field %s (key %d) must be an array of 1 to %d pairs" % (name, key, limit))
    out = []
    for p in v:
        if (not isinstance(p, list) or len(p) != 2 or not isinstance(p[0], int) or not isinstance(p[1], int)
                or p[0] < 0 or p[1] < 0 or p[0] is True or p[1] is True or p[0] is False or p[1] is False):
            _fail("field %s (key %d) holds something other than a pair of unsigned integers" % (name, key))
        if p[0] > value_limit or p[1] > value_limit:
            _fail("field %s (key %d) holds an integer above %d" % (name, key, value_limit), "range")
        out.append((p[0], p[1]))
    return out


def _uints(m: "dict[object, object]", key: int, name: str, n: int,
           limit: int = MAX_UPLINK_INT) -> "tuple[int, ...]":
    v = m.get(key)
    if not isinstance(v, list) or len(v) != n:
        _fail("field %s (key %d) must be an array of %d unsigned integers" % (name, key, n))
    for x in v:
        if not isinstance(x, int) or x is True or x is False or x < 0:
            _fail("field %s (key %d) must hold unsigned integers" % (name, key))
        if x > limit:
            _fail("field %s (key %d) holds %d, above %d" % (name, key, x, limit), "range")
    return tuple(v)


def _text(m: "dict[object, object]", key: int, name: str) -> str:
    v = m.get(key)
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        _fail("field %s (key %d) must be text of at most %d characters" % (name, key, MAX_TEXT))
    return v


def _check_keys(m: "dict[object, object]", allowed: int, optional: "tuple[int, ...]" = ()) -> None:
    # Keys 0..allowed-1 are required, optional ones may be absent, keys at or
    # above EXTENSION_KEYS are ignored, anything else is an error.
    for k in m:
        if isinstance(k, int) and k >= EXTENSION_KEYS:
            continue
        if not isinstance(k, int) or not (0 <= k < allowed or k in optional):
            _fail("unknown field key %r" % (k,), "unknown_key")
    for k in range(allowed):
        if k not in m and k not in optional:
            _fail("missing field key %d" % k, "missing")


def decode_payload(payload: "bytes | bytearray | memoryview", allowed_kinds: "tuple[int, ...]" = (),
                   decode_samples: bool = True, opener: "cipher.SampleCipher | None" = None,
                   versions: "tuple[int, ...]" = (VERSION,)) -> Message:
    # decode_samples=False checks everything but leaves each channel's sample
    # bytes undecoded (SampleFrame.channels then holds bytes): for a hub that
    # stores frames fast and decodes them when it forwards them.
    # opener: the device's sample cipher, to decrypt sample bytes (call only
    # once the MAC has verified: encrypt-then-MAC). Without it, channels
    # stay encrypted bytes, and decode_samples must be False.
    # versions: the protocol versions accepted; a board's messages must be
    # VERSION; a hub re-reading its store takes STORED_VERSIONS (a version 1
    # sample frame has no key 15 and is never decrypted here: its samples
    # were stored decrypted, so opener must then be None).
    # One decoder for every path, board and hub alike: the strict one (SPEC.md's deterministic encoding).
    d = cbor.decode(payload)
    if not isinstance(d, dict):
        raise RemoteProtocolError("payload must be a CBOR map", "schema")
    kind = _uint(d, 0, "type", 255)
    version = _uint(d, 1, "version", 255)
    if version not in versions:
        _fail("protocol version %d is not supported (this side speaks %d)" % (version, VERSION), "version")
    if allowed_kinds and kind not in allowed_kinds:
        _fail("message type %d not allowed in this direction" % kind, "direction")
    if kind == T_SAMPLES:
        return _decode_samples(d, decode_samples, opener, version)
    if kind == T_ACK:
        _check_keys(d, 4)
        ranges = _pairs(d, 3, "ranges", MAX_ACK_RANGES)
        for a, b in ranges:
            if a > b:
                _fail("ack range %d..%d is reversed" % (a, b))
        return Ack(_uint(d, 2, "epoch"), ranges)
    if kind == T_TIME_REQUEST:
        _check_keys(d, 4)
        return TimeRequest(_uint(d, 2, "nonce"), _uint(d, 3, "utc_ms"))
    if kind == T_TIME_RESPONSE:
        _check_keys(d, 6)
        return TimeResponse(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ),
                            _uint(d, 4, "nonce", MAX_UPLINK_INT), _uint(d, 5, "tick_ms", MAX_UPLINK_INT))
    if kind == T_HELLO:
        _check_keys(d, 7)
        return Hello(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ), _text(d, 4, "firmware"),
                     _uint(d, 5, "tick_ms", MAX_UPLINK_INT), _pairs(d, 6, "streams", MAX_STREAMS, MAX_UPLINK_INT))
    if kind == T_STATUS:
        _check_keys(d, 8)
        return Status(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ),
                      _uint(d, 4, "tick_ms", MAX_UPLINK_INT), _uint(d, 5, "outbox_depth", MAX_UPLINK_INT),
                      _uint(d, 6, "frames_dropped", MAX_UPLINK_INT), _uint(d, 7, "free_heap", MAX_UPLINK_INT))
    if kind == T_ERROR:
        _check_keys(d, 6)
        return ErrorReport(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ),
                           _uint(d, 4, "code", MAX_UPLINK_INT), _text(d, 5, "text"))
    if kind == T_COMMAND:
        _check_keys(d, 5)
        return Command(_uint(d, 2, "epoch"), _uint(d, 3, "nonce"), _text(d, 4, "name"))
    if kind == T_EPOCH_RESYNC:
        _check_keys(d, 4)
        return EpochResync(_uint(d, 2, "refused_epoch", MAX_EPOCH), _uint(d, 3, "newest_epoch", MAX_EPOCH))
    if kind == T_ORIGIN:
        _check_keys(d, 5)
        ck = d.get(4)
        if not isinstance(ck, bytes) or len(ck) > MAX_ORIGIN_CHECKPOINT:
            _fail("origin checkpoint must be a byte string of at most %d bytes" % MAX_ORIGIN_CHECKPOINT)
        return OriginCheckpoint(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ), ck)
    if kind == T_UPDATE_CHUNK:
        _check_keys(d, 6)
        data = d.get(5)
        if not isinstance(data, bytes) or not 0 < len(data) <= MAX_UPDATE_CHUNK:
            _fail("update chunk data must be 1 to %d bytes" % MAX_UPDATE_CHUNK)
        total = _uint(d, 4, "total", MAX_BUNDLE)
        offset = _uint(d, 3, "offset", MAX_BUNDLE)
        if offset + len(data) > total:
            _fail("update chunk ends past the bundle's %d bytes" % total)
        return UpdateChunk(_uint(d, 2, "epoch", MAX_EPOCH), offset, total, data)
    if kind == T_UPDATE_STATE:
        _check_keys(d, 6)
        return UpdateState(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ),
                           _uint(d, 4, "offset", MAX_BUNDLE), _text(d, 5, "state"))
    _fail("unknown message type %d" % kind, "unknown_type")


def _decode_samples(d: "dict[object, object]", decode: bool = True,
                    opener: "cipher.SampleCipher | None" = None, version: int = VERSION) -> SampleFrame:
    salt: "bytes | None" = None
    if version == 1:  # stored before the upgrade: no boot salt, never decrypted here
        _check_keys(d, 15, (10,))
        if opener is not None:
            raise LocalProtocolError("version 1 frames are not decrypted: their samples were stored decrypted",
                                     "cipher")
    else:
        _check_keys(d, 16, (10,))
        v = d.get(15)
        if not isinstance(v, bytes) or len(v) != cipher.BOOT_SALT_SIZE:
            _fail("field boot_salt (key 15) must be %d bytes" % cipher.BOOT_SALT_SIZE, "salt")
        salt = v
    if d.get(14) != cipher.ALG_A256CTR:
        _fail("field cipher (key 14) must be %d (A256CTR)" % cipher.ALG_A256CTR, "cipher")
    if decode and opener is None:
        raise LocalProtocolError("sample frames are encrypted: decoding samples needs the device's cipher", "cipher")
    stream = _uint(d, 4, "stream", MAX_UPLINK_INT)
    nch = STREAM_CHANNELS.get(stream)
    if nch is None:
        _fail("unknown stream %d" % stream, "stream")
    count = _uint(d, 8, "count", MAX_SAMPLES)
    if count == 0:
        _fail("field count (key 8) must be at least 1", "range")
    rate = _uint(d, 7, "rate_hz", 100000)
    if rate == 0:
        _fail("field rate_hz (key 7) must be at least 1", "range")
    scale = _uints(d, 9, "scale", 2, 0xFFFFFFFF)
    if scale[1] == 0:
        _fail("field scale (key 9) has a zero denominator", "range")
    drive = _uints(d, 10, "ppg_drive", 4) if 10 in d else None
    if (drive is None) == (stream == STREAM_PPG_MAX30102):
        _fail("field ppg_drive (key 10) is required for PPG streams and only for them")
    status = _uints(d, 11, "status", 4)
    if _uint(d, 12, "encoding", MAX_UPLINK_INT) != samples.ENCODING_DELTA_ZIGZAG_VARINT:
        _fail("unknown sample encoding %r" % d.get(12), "encoding")
    data = d.get(13)
    if not isinstance(data, list) or len(data) != nch:
        _fail("field samples (key 13) must hold %d byte strings for stream %d" % (nch, stream))
    channels: "list[list[int]]" = []
    # 32 bits each: the counter block of the sample cipher holds them.
    epoch, seq = _uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ)
    offset = 0
    for ch in data:
        if not isinstance(ch, bytes):
            _fail("field samples (key 13) must hold byte strings")
        if not count <= len(ch) <= count * samples.WORST_BYTES_PER_SAMPLE:
            _fail("field samples (key 13): %d bytes cannot hold %d samples" % (len(ch), count), "sample_count")
        if opener is not None:
            clear = bytearray(ch)
            opener.apply(clear, 0, len(clear), epoch, seq, offset, salt)
            offset += len(clear)
            ch = bytes(clear)
        if decode:
            channels.append(samples.decode(ch, count))
        else:
            channels.append(ch)  # type: ignore[arg-type]
    frame = SampleFrame(epoch, seq, stream, _uint(d, 5, "t0_ms", MAX_UPLINK_INT),
                        _uint(d, 6, "first_index", MAX_UPLINK_INT), rate, count, (scale[0], scale[1]),
                        None if drive is None else (drive[0], drive[1], drive[2], drive[3]),
                        (status[0], status[1], status[2], status[3]), channels)
    frame.boot_salt = salt
    return frame
