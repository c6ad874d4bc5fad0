# Decoding the messages (protocols/messages.py): any bytes to one typed
# message, or RemoteProtocolError naming the field that was wrong. Apart
# from the encoders so that a board, which decodes only its rarer downlink
# messages (acks and time requests are read in place: app/acks.py), loads
# it only when one comes; messages.decode_payload() imports it.

from protocols import cbor, cipher, samples
from protocols._compat import const
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.messages import (
    EXTENSION_KEYS,
    MAX_ACK_RANGES,
    MAX_BUNDLE,
    MAX_EPOCH,
    MAX_ORIGIN_CHECKPOINT,
    MAX_SAMPLES,
    MAX_SEQ,
    MAX_STREAMS,
    MAX_TEXT,
    MAX_UNIQUE_ID,
    MAX_UPDATE_CHUNK,
    MAX_UPLINK_INT,
    STREAM_CHANNELS,
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
    Ack,
    Command,
    EpochResync,
    ErrorReport,
    Hello,
    Message,
    OriginCheckpoint,
    SampleFrame,
    Status,
    TimeRequest,
    TimeResponse,
    UpdateChunk,
    UpdateState,
)

TYPE_CHECKING = False  # type checkers take this as true; MicroPython has no typing module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

_UINT64_MAX = const(0xFFFFFFFFFFFFFFFF)


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
                   versions: "tuple[int, ...]" = (VERSION,),
                   cbor_decode: "Callable[[bytes | bytearray | memoryview], object] | None" = None) -> Message:
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
    # cbor_decode: cbor.decode (None), or a decoder that answers exactly as it
    # does, value or error, for any input (the hub's: agent/fastdecode.py).
    # One decoder for every path, board and hub alike: the strict one (SPEC.md's deterministic encoding).
    d = cbor.decode(payload) if cbor_decode is None else cbor_decode(payload)
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
        _check_keys(d, 8, (8,))
        uid = d.get(8, b"")
        if not isinstance(uid, bytes) or (8 in d and not 0 < len(uid) <= MAX_UNIQUE_ID):
            _fail("field unique_id (key 8) must be 1 to %d bytes" % MAX_UNIQUE_ID)
        return Status(_uint(d, 2, "epoch", MAX_EPOCH), _uint(d, 3, "seq", MAX_SEQ),
                      _uint(d, 4, "tick_ms", MAX_UPLINK_INT), _uint(d, 5, "outbox_depth", MAX_UPLINK_INT),
                      _uint(d, 6, "frames_dropped", MAX_UPLINK_INT), _uint(d, 7, "free_heap", MAX_UPLINK_INT),
                      uid)
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
