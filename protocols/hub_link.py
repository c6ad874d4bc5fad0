# The hub's side of the link layers (protocols/link.py describes the
# formats): the serial uplink's COBS deframer, the BLE uplink's reassembler,
# the downlink's line encoder, and a queue over the board's line deframer.
# Sans-I/O, as link.py; kept apart from it because a board never needs them
# and their code would take its heap.

import binascii

from protocols._compat import const
from protocols.errors import LocalProtocolError
from protocols.link import (
    ATT_HEADER,
    CRC_SIZE,
    FIRST_FRAGMENT,
    KEEP_NOISE,
    MAX_COBS_BODY,
    MAX_DOWNLINK_MESSAGE,
    MAX_MESSAGE,
    MAX_MTU,
    NEED_DATA,
    Discarded,
    Frame,
    LineDeframer,
    crc32,
)


def _cobs_decode(chunk: "bytes | bytearray") -> "bytes | None":
    out = bytearray()
    i = 0
    n = len(chunk)
    while i < n:
        code = chunk[i]
        end = i + code
        if code == 0 or end > n:
            return None
        out.extend(chunk[i + 1:end])
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


class StreamDeframer:
    # Hub side: feed() serial bytes, next_event() gives Frame, Discarded or
    # NEED_DATA. Memory is bounded by MAX_COBS_BODY whatever arrives.
    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False  # inside an over-long chunk, until the next 0x00
        self._skipped = 0

    def feed(self, data: "bytes | bytearray | memoryview") -> None:
        self._buf.extend(data)

    def next_event(self) -> "Frame | Discarded | None":
        while True:
            buf = self._buf
            idx = buf.find(b"\x00")
            if idx < 0:
                if len(buf) > MAX_COBS_BODY:
                    self._skipped += len(buf)
                    self._skipping = True
                    self._buf = bytearray()
                return NEED_DATA
            chunk = bytes(buf[:idx])
            self._buf = buf[idx + 1:]
            if self._skipping:
                n = self._skipped + len(chunk)
                self._skipping = False
                self._skipped = 0
                return Discarded("too_long", n)
            if not chunk:
                continue
            if len(chunk) > MAX_COBS_BODY:
                return Discarded("too_long", len(chunk))
            body = _cobs_decode(chunk)
            if body is None or len(body) <= CRC_SIZE:
                return Discarded(_noise_or(chunk, "cobs"), len(chunk), chunk[:KEEP_NOISE])
            n = len(body) - CRC_SIZE
            got = body[n] | (body[n + 1] << 8) | (body[n + 2] << 16) | (body[n + 3] << 24)
            if crc32(memoryview(body)[:n]) != got:
                return Discarded(_noise_or(chunk, "crc"), len(chunk), chunk[:KEEP_NOISE])
            return Frame(body[:n])

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def held(self) -> bytes:
        # The bytes held until a 0x00 ends them: a frame still arriving, or
        # the console text a board printed after its last frame (a stopped
        # board's summary, a REPL prompt), which no 0x00 may ever follow.
        return bytes(self._buf)


def _noise_or(chunk: bytes, reason: str) -> str:
    # Console text (a board's print, a REPL banner) is noise, not corruption.
    for b in chunk:
        if b != 9 and b != 10 and b != 13 and not 32 <= b < 127:
            return reason
    return "noise"


def downlink_line(msg: "bytes | bytearray") -> bytes:
    if len(msg) > MAX_DOWNLINK_MESSAGE:
        raise LocalProtocolError("downlink message of %d bytes exceeds %d" % (len(msg), MAX_DOWNLINK_MESSAGE),
                                 "too_long")
    c = crc32(msg)
    body = bytes(msg) + bytes((c & 0xFF, (c >> 8) & 0xFF, (c >> 16) & 0xFF, c >> 24))
    return b"~" + binascii.b2a_base64(body).strip() + b"\n"


class Reassembler:
    # Hub side: one per BLE connection. feed() one notification at a time;
    # next_event() as for the stream deframer. A message with a lost
    # fragment is reported once ("gap") and its remaining fragments skipped.
    def __init__(self) -> None:
        self._expect = -1  # counter of the next fragment, -1 before the first
        self._buf = bytearray()
        self._want = 0
        self._lost = False  # skipping the rest of a message already reported
        self._events: "list[Frame | Discarded]" = []

    def reset(self) -> None:
        # A new connection: counters start again.
        self._expect = -1
        self._buf = bytearray()
        self._want = 0
        self._lost = False

    def _abandon(self, reason: str, extra: int = 0) -> None:
        if self._want:
            self._events.append(Discarded(reason, len(self._buf) + extra))
            self._lost = True
        self._buf = bytearray()
        self._want = 0

    def feed(self, fragment: "bytes | bytearray | memoryview") -> None:
        n = len(fragment)
        if n == 0 or n > MAX_MTU - ATT_HEADER:
            self._events.append(Discarded("length", n))
            return
        hdr = fragment[0]
        counter = hdr & 0x7F
        if self._expect >= 0 and counter != self._expect:
            self._abandon("gap")
        self._expect = (counter + 1) & 0x7F
        if hdr & FIRST_FRAGMENT:
            self._abandon("gap")
            self._lost = False
            if n < 3:
                self._events.append(Discarded("length", n))
                return
            want = (fragment[1] << 8) | fragment[2]
            if not 0 < want <= MAX_MESSAGE:
                self._events.append(Discarded("too_long", n))
                self._lost = True
                return
            self._want = want
            data = fragment[3:]
        else:
            if not self._want:
                if not self._lost:
                    self._events.append(Discarded("gap", n))
                    self._lost = True
                return
            data = fragment[1:]
        if len(self._buf) + len(data) > self._want:
            self._abandon("length", len(data))
            return
        self._buf.extend(data)
        if len(self._buf) == self._want:
            self._events.append(Frame(bytes(self._buf)))
            self._buf = bytearray()
            self._want = 0

    def next_event(self) -> "Frame | Discarded | None":
        if self._events:
            return self._events.pop(0)
        return NEED_DATA


# ---- downlink lines as a board reads them, queued ---------------------------

# Downlink messages held unread: a board reads them every loop, so more is a flood.
_MAX_EVENTS = const(8)


class LineQueue:
    # A board's downlink deframer (link.LineDeframer) with its messages and
    # discarded lines queued as events (Frame / Discarded / NEED_DATA), for
    # tools and tests that read what a hub writes. At most _MAX_EVENTS wait
    # unread: more is a flood (dropped, counted in flooded).
    def __init__(self) -> None:
        self.deframer = LineDeframer()
        self._events: "list[Frame | Discarded]" = []
        self.flooded = 0
        self.discarded = 0  # discarded events read by next_message

    def feed(self, data: "bytes | bytearray | memoryview") -> None:
        for b in data:
            self.feed_byte(b)

    def feed_byte(self, b: int) -> None:
        before = self.deframer.discarded
        n = self.deframer.pending
        noise = b""
        if (b == 10 or b == 13) and n and self.deframer.message[0] != 0x7E:
            noise = bytes(self.deframer.message[:min(n, KEEP_NOISE)])
        m = self.deframer.take_byte(b)
        if m:
            self._push(Frame(bytes(self.deframer.message[:m])))
        elif self.deframer.discarded != before:
            self._push(Discarded(self.deframer.last_discarded, n, noise))

    def _push(self, ev: "Frame | Discarded") -> None:
        if len(self._events) < _MAX_EVENTS:
            self._events.append(ev)
        else:
            self.flooded += 1

    def next_event(self) -> "Frame | Discarded | None":
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

    def next_message(self) -> "bytes | None":
        # The next whole message, counting (in discarded) what was not one.
        while self._events:
            ev = self._events.pop(0)
            if isinstance(ev, Frame):
                return ev.data
            self.discarded += 1
        return None
