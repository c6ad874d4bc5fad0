# Link layers: how COSE messages cross a byte stream or a BLE characteristic.
#
# Uplink over a byte stream (USB serial, board to hub):
#     0x00 | COBS(message | CRC-32 little-endian) | 0x00
# COBS removes every 0x00 from the body, so 0x00 only ever delimits frames: a
# receiver that starts mid-stream, or meets console text, line noise or a
# cut, resynchronises at the next 0x00. The leading delimiter keeps stray
# console output from merging into the next frame.
#
# Downlink over a byte stream (hub to board):
#     "~" base64(message | CRC-32 little-endian) "\n"
# Printable text on purpose: a board's console turns byte 0x03 into Ctrl-C
# (KeyboardInterrupt), so binary data towards a board could stop it at random.
# Lines that do not start with "~" are ignored.
#
# BLE (notifications board to hub, writes hub to board): a message is cut
# into fragments of at most MTU-3 bytes. Byte 0 of a fragment is
#     bit 7: first fragment of a message; bits 0-6: fragment counter mod 128
# and a first fragment then carries the message length (2 bytes, big-endian).
# The counter runs on across messages, so a lost fragment is always seen.
#
# Receivers here are sans-I/O: feed() bytes in, next_event() events out.
# This module is what a board needs; the hub's receivers (serial deframer,
# BLE reassembler) and its downlink encoder are in protocols/hub_link.py,
# which a board never loads (its code would take ~5 kB of the board's heap).

import array
import binascii

from protocols._compat import const
from protocols.errors import LocalProtocolError

try:
    from protocols import _viper  # MicroPython: the COBS loop as native code
except ImportError:  # CPython, or a port without the viper emitter
    _viper = None  # type: ignore[assignment]

# The longest message a link carries: the largest COSE_Mac0 (payload bound
# plus headers) with room to spare. It bounds every receive buffer.
MAX_MESSAGE = const(4224)
CRC_SIZE = const(4)
# COBS adds one byte per 254 plus one.
MAX_COBS_BODY = const(MAX_MESSAGE + CRC_SIZE + (MAX_MESSAGE + CRC_SIZE) // 254 + 2)
# A downlink line: "~", base64 of the body, "\n". Downlink messages are small.
MAX_DOWNLINK_MESSAGE = const(256)
MAX_LINE = const(2 + ((MAX_DOWNLINK_MESSAGE + CRC_SIZE + 2) // 3) * 4 + 1)
# How much of a discarded chunk an event keeps, for the console log.
KEEP_NOISE = const(120)

MIN_MTU = const(23)
MAX_MTU = const(517)
ATT_HEADER = const(3)
FIRST_FRAGMENT = const(0x80)


class Frame:
    # A message delivered whole and with a good CRC (not yet authenticated).
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return "Frame(%d bytes)" % len(self.data)


class Discarded:
    # Bytes the receiver threw away, and why: "noise" (console text or line
    # noise between frames), "crc", "cobs", "too_long", "gap" (BLE fragment
    # lost), "length". sample holds the first bytes, for a console log.
    def __init__(self, reason: str, nbytes: int, sample: bytes = b"") -> None:
        self.reason = reason
        self.nbytes = nbytes
        self.sample = sample

    def __repr__(self) -> str:
        return "Discarded(%s, %d bytes)" % (self.reason, self.nbytes)


NEED_DATA = None


def crc32(data: "bytes | bytearray | memoryview", crc: int = 0) -> int:
    return binascii.crc32(data, crc) & 0xFFFFFFFF


def _crc_nibbles() -> "array.array[int]":
    # The CRC-32's table for 4 bits at a time (the board's crc32_into).
    t = array.array("I", bytes(64))
    for i in range(16):
        c = i
        for _ in range(4):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        t[i] = c
    return t


def _copy_into(dst: "bytearray | memoryview", dpos: int, src: "bytes | bytearray | memoryview", spos: int,
               n: int) -> None:
    dst[dpos:dpos + n] = memoryview(src)[spos:spos + n]


# copy_into(dst, dpos, src, spos, n): dst[dpos:dpos+n] = src[spos:spos+n].
# On a board the viper function itself, with no slice made and no bytecode
# call frame between (a wrapper's took 12 words: past the VM's 11, on the
# heap at each BLE fragment).
copy_into = _viper.copy_into if _viper is not None else _copy_into


# ---- uplink byte stream: COBS + CRC-32 --------------------------------------

class StreamFramer:
    # Board side: frames a message into a caller-owned buffer, no allocation
    # beyond a 4-byte CRC buffer made once. out: the buffer frame_from()
    # writes to (a board's transmit buffer, given once).
    def __init__(self, out: "bytearray | None" = None) -> None:
        self._crc = bytearray(CRC_SIZE)
        self._nibbles = _crc_nibbles() if _viper is not None else None
        self.out = out

    def frame_from(self, msg: "bytes | bytearray | memoryview", start: int, n: int) -> int:
        # Frames msg[start:start+n] at out[0:]; returns the end. (A board
        # frames two messages a second: this frame keeps within the VM's
        # 11 words, so it is not taken from the heap, README "call frames".)
        if self.out is None:
            raise LocalProtocolError("this framer was given no output buffer", "misuse")
        _check_frame(n, len(self.out), 0)
        if _viper is not None:  # no int above 2**30, no view: nothing allocated on a board
            return int(_viper.cobs_frame(self, msg, start, n))
        return self.frame_into(msg, n, self.out, 0, start)

    def frame_into(self, msg: "bytes | bytearray | memoryview", n: int, out: bytearray, pos: int = 0,
                   start: int = 0) -> int:
        # Frames msg[start:start+n] at out[pos:]; returns the end.
        _check_frame(n, len(out), pos)
        crc = self._crc
        if _viper is not None:
            _viper.crc32_into(msg, start, n, self._nibbles, crc)
            return int(_viper.cobs_into(msg, start, n, crc, out, pos))
        c = crc32(memoryview(msg)[start:start + n])
        crc[0] = c & 0xFF
        crc[1] = (c >> 8) & 0xFF
        crc[2] = (c >> 16) & 0xFF
        crc[3] = c >> 24
        out[pos] = 0
        code_at = pos + 1
        w = pos + 2
        code = 1
        total = n + CRC_SIZE
        for i in range(total):
            b = msg[start + i] if i < n else crc[i - n]
            if b == 0:
                out[code_at] = code
                code_at = w
                w += 1
                code = 1
            else:
                out[w] = b
                w += 1
                code += 1
                if code == 0xFF:
                    out[code_at] = code
                    code_at = w
                    w += 1
                    code = 1
        out[code_at] = code
        out[w] = 0
        return w + 1

    def frame(self, msg: "bytes | bytearray | memoryview") -> bytes:
        out = bytearray(len(msg) + len(msg) // 254 + 8)
        return bytes(out[:self.frame_into(msg, len(msg), out)])


def _check_frame(n: int, room: int, pos: int) -> None:
    if n > MAX_MESSAGE:
        raise LocalProtocolError("message of %d bytes exceeds the link bound %d" % (n, MAX_MESSAGE), "too_long")
    if pos + n + n // 254 + 8 > room:
        raise LocalProtocolError("link output buffer too small", "buffer_full")


# ---- downlink byte stream: base64 lines ------------------------------------

class LineDeframer:
    # Board side. Lines collect in a fixed buffer of MAX_LINE bytes and are
    # decoded (base64, CRC) in place there, so a board's downlink allocates
    # nothing per message:
    #   take_byte(b) -> n: n > 0 once a line held a whole message: its bytes
    #   are message[:n] until the next call; lines that were not one are
    #   counted in discarded (their reason in last_discarded).
    # hub_link.LineQueue queues what it delivers, for tools and tests.
    def __init__(self) -> None:
        self._buf = bytearray(MAX_LINE)
        self.message = memoryview(self._buf)
        self.pending = 0  # bytes of the line so far
        self._overlong = False
        self.discarded = 0
        self.last_discarded = ""

    def take_byte(self, b: int) -> int:
        if b == 10 or b == 13:
            n = self.pending
            self.pending = 0
            if self._overlong:
                self._overlong = False
                return self._discard("too_long")
            if n:
                return self._line(n)
            return 0
        if self.pending < MAX_LINE:
            self._buf[self.pending] = b
            self.pending += 1
        else:
            self._overlong = True
        return 0

    def _discard(self, reason: str) -> int:
        self.discarded += 1
        self.last_discarded = reason
        return 0

    def _line(self, n: int) -> int:
        buf = self._buf
        if buf[0] != 0x7E:  # "~"
            return self._discard("noise")
        m = int(_b64_decode_in_place(buf, 1, n))
        if m < 0:
            return self._discard("base64")
        if m <= CRC_SIZE:
            return self._discard("length")
        m -= CRC_SIZE
        if not _crc_ok(buf, m):
            return self._discard("crc")
        return m


if _viper is not None:
    _b64_decode_in_place = _viper.b64_decode_in_place
    _crc_ok = _viper.crc32_ok
else:  # CPython: the same loops in plain Python
    from protocols._plain import b64_decode_in_place as _b64_decode_in_place
    from protocols._plain import crc_ok as _crc_ok


# ---- BLE fragments ---------------------------------------------------------

class Fragmenter:
    # Board side: cuts messages into fragments for one connection's MTU.
    # next_into() fills a caller-owned buffer with the next fragment.
    def __init__(self, mtu: int = MIN_MTU) -> None:
        self.counter = 0
        self.set_mtu(mtu)
        self._msg: "bytes | bytearray | memoryview" = b""
        self._base = 0
        self._len = 0
        self._off = -1  # -1: no message in progress

    def set_mtu(self, mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise LocalProtocolError("MTU %d outside %d..%d" % (mtu, MIN_MTU, MAX_MTU), "mtu")
        self.fragment_size = mtu - ATT_HEADER

    def start(self, msg: "bytes | bytearray | memoryview", n: int, base: int = 0) -> None:
        # The message is msg[base:base+n], read as each fragment is made (not
        # copied: a board fragments it where its outbox keeps it), so those
        # bytes must not change until busy is False or abort() was called.
        if not 0 < n <= MAX_MESSAGE:
            raise LocalProtocolError("message of %d bytes outside 1..%d" % (n, MAX_MESSAGE), "too_long")
        if not 0 <= base <= len(msg) - n:
            raise LocalProtocolError("message of %d bytes at %d outside its buffer of %d" % (n, base, len(msg)),
                                     "misuse")
        self._msg = msg
        self._base = base
        self._len = n
        self._off = 0

    def holds(self, msg: "bytes | bytearray | memoryview", start: int, end: int) -> bool:
        # Whether a message in progress is read from msg[start:end] (in part).
        b = self._base
        return self.busy and msg is self._msg and start < b + self._len and b < end

    @property
    def busy(self) -> bool:
        return 0 <= self._off < self._len

    def abort(self) -> None:
        # The connection dropped: the rest of the message will not be sent.
        self._off = -1
        self._msg = b""

    def next_into(self, out: bytearray) -> int:
        # Returns the fragment length written to out (0: message done).
        # (Its locals kept within the VM's 11 words of frame: one a fragment.)
        off = self._off
        if not 0 <= off < self._len:
            return 0
        if off == 0:
            out[0] = FIRST_FRAGMENT | self.counter
            out[1] = self._len >> 8
            out[2] = self._len & 0xFF
            hdr = 3
        else:
            out[0] = self.counter
            hdr = 1
        take = min(self.fragment_size - hdr, self._len - off)
        copy_into(out, hdr, self._msg, self._base + off, take)
        self._off = off + take
        if off + take >= self._len:
            self._msg = b""  # sent: the buffer is not held (a board's outbox ring may be let go)
        self.counter = (self.counter + 1) & 0x7F
        return hdr + take

    def fragments(self, msg: "bytes | bytearray") -> "list[bytes]":
        self.start(msg, len(msg))
        out = bytearray(self.fragment_size)
        frags: "list[bytes]" = []
        while True:
            n = self.next_into(out)
            if not n:
                return frags
            frags.append(bytes(out[:n]))
