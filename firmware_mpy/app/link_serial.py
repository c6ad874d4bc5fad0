# Frames over the USB serial console. Uplink: COBS frames (protocols.link);
# downlink: "~" base64 lines, which never contain Ctrl-C, so Ctrl-C typed by
# a technician still stops streaming and leaves the board at its REPL.
#
# A write to the console blocks the whole board once the UART's transmit
# FIFO is full (the esp32 port's REPL UART has no driver ring: 128 bytes of
# hardware FIFO, then it waits for the line), and at 115200 baud a 1 kB
# frame would hold it 80 ms, longer than a sensor FIFO lasts. So a frame
# goes out in pieces that fit what the FIFO has drained since the last one
# (the line's pace computed from the clock), one piece per loop: service()
# writes the next; busy() says a frame is still going out.
#
# A host that stops reading: on native USB (ESP32-S3 TinyUSB CDC) a console
# write then blocks until MicroPython's driver gives up (500 ms without
# progress) and drops the rest; USB-Serial-JTAG gives up after 200 ms. A
# write that comes back short, fails, or takes far longer than its bytes
# need at the line rate marks the line stalled: the frame being written is
# abandoned (unacknowledged, it stays in the outbox and is sent again; the
# hub's deframer skips the cut one) and nothing is written for a backoff
# doubling from _BACKOFF_MIN_MS to _BACKOFF_MAX_MS, so a host that never
# reads again costs the loop one driver timeout per _BACKOFF_MAX_MS.
# take_fault() says what happened.
import select

from micropython import const

from app import ticks
from app.faults import Caught
from protocols import link

# Bytes read per receive() at most: byte by byte they take ~0.2 ms each on
# a chip, so an ack line (~100 bytes) is read in pieces, the sensors' FIFOs
# read between them (the app calls again while rx_more says so).
_RX_CHUNK = const(32)
UART_FIFO_BYTES = const(128)  # the ESP32 UART's hardware transmit FIFO
_SLACK_US = const(50000)  # beyond a piece's time on the line, before its write counts as stalled
_BACKOFF_MIN_MS = const(250)
_BACKOFF_MAX_MS = const(8000)


class SerialLink:
    name = "serial"

    def __init__(self, stream_in, stream_out, max_message, ticks_us=None, ticks_diff=None, baud=115200,
                 tx_fifo=UART_FIFO_BYTES):
        # ticks_us, ticks_diff: the board's clock; None writes whole frames.
        self._in = stream_in
        self._out = stream_out
        self._ticks_us = ticks_us
        self._ticks_diff = ticks_diff
        self._byte_us = (10000000 + baud - 1) // baud  # 8N1: 10 bits a byte
        self._tx_fifo = tx_fifo
        self._empty_at = 0  # when what was written will have left the FIFO
        self._off = 0
        self._pending = 0  # bytes of the current frame not yet written
        self.pump_ms = tx_fifo * self._byte_us // 1000 + 1  # the FIFO's drain time
        self.stalls = 0
        self._stalled = False
        self._resume_at = 0
        self._backoff_ms = _BACKOFF_MIN_MS
        self._fault = None
        self._recovered = False
        self._write_errors = Caught()
        self._chunk = 0  # the bytes _write_chunk writes
        self._any = getattr(stream_in, "any", None)  # machine.UART (and the simulated console) have it
        self._poll = select.poll()
        if self._any is None:
            self._poll.register(stream_in, select.POLLIN)
        self._tx = bytearray(max_message + max_message // 254 + 8)
        self._txv = memoryview(self._tx)
        self._framer = link.StreamFramer(self._tx)
        self._rx = link.LineDeframer()
        self.message = self._rx.message  # receive()'s message: decoded in place there
        self._byte = bytearray(1)
        self.rx_more = False  # receive() stopped at its chunk: more may wait
        self.connected = True

    def service(self):
        # True once the line works again after a stall: like a reconnection,
        # the app then resends whatever was in flight.
        if self._pending:
            self._pump()
        if self._recovered:
            self._recovered = False
            return True
        return False

    def busy(self):
        return self._pending > 0

    def send(self, buf, n, off=0):
        # Takes a whole message, buf[off:off+n], if the previous one has gone out.
        if self._pending:
            return False
        self._pending = self._framer.frame_from(buf, off, n)
        self._off = 0
        self._pump()
        return True

    # _pump runs every loop while a frame goes out, so it keeps to 11 words
    # of locals and stack (its call frame on the C stack, not the heap:
    # README, "call frames"); the write, with its try, is _write.
    def _pump(self):
        if self._ticks_us is None:
            self._write(self._pending, 0)
            return
        now = self._ticks_us()
        if self._stalled and self._ticks_diff(self._resume_at, now) > 0:
            return  # the host was not reading: wait the backoff out
        n = self._room(now)
        if n <= 0:
            return
        self._empty_at = ticks.add(self._empty_at, n * self._byte_us)
        self._write(n, now)

    def _room(self, now):
        # How many of the pending bytes the UART's FIFO takes at now.
        queued_us = self._ticks_diff(self._empty_at, now)
        if queued_us < 0:
            queued_us = 0
            self._empty_at = now
        room = self._tx_fifo - (queued_us + self._byte_us - 1) // self._byte_us
        return room if room < self._pending else self._pending

    def _write(self, n, now):
        # Writes the next n pending bytes (now: when the pump started, on the
        # board's clock; 0 without one). Several times a second, so within
        # the VM's 11 words of frame (README, "call frames"): the write and
        # its errors are _write_chunk's.
        self._chunk = n
        w = self._write_chunk()
        if w is not None and w < n:
            if w >= 0:
                self._stall("host not reading: %d of %d bytes written" % (w, n))
            return
        self._off += n
        self._pending -= n
        if self._ticks_us is not None:
            took_us = self._ticks_diff(self._ticks_us(), now)
            if took_us > n * self._byte_us + _SLACK_US:
                self._stall("host slow to read: %d bytes took %d ms" % (n, took_us // 1000))
                return
        if self._stalled:
            self._stalled = False
            self._recovered = True
            self._backoff_ms = _BACKOFF_MIN_MS

    def _write_chunk(self):
        # Writes _chunk bytes from _off; how many went (None: all, as some
        # streams say), or -1 after an error (the line stalled).
        with self._write_errors:
            return self._out.write(self._tx, self._off, self._chunk)  # (buf, offset, length): no slice
        self._stall("console write failed (OSError %s)" % self._write_errors.take())
        return -1

    def _stall(self, why):
        # The frame being written is abandoned (the outbox sends it again)
        # and the line left alone for a backoff.
        self.stalls += 1
        self._pending = 0
        self._stalled = True
        if self._ticks_us is not None:
            self._resume_at = ticks.add(self._ticks_us(), self._backoff_ms * 1000)
        self._backoff_ms = min(_BACKOFF_MAX_MS, 2 * self._backoff_ms)
        if self._fault is None:
            self._fault = why

    def take_fault(self):
        # What went wrong on the line since the last call (text), or None.
        f = self._fault
        self._fault = None
        return f

    def _ready(self):
        # A byte waits: a UART says so itself (any()); the console is polled.
        if self._any is not None:
            return self._any() > 0
        for _obj, ev in self._poll.ipoll(0):
            return bool(ev & select.POLLIN)
        return False

    def receive(self):
        # The length of the next downlink message, then in message[:n] until
        # the next call (not yet authenticated), or 0; rx_more then says
        # whether it stopped after _RX_CHUNK bytes with more maybe waiting.
        # Byte by byte: the console's read blocks until its buffer is full.
        rx = self._rx
        self.rx_more = False
        for _ in range(_RX_CHUNK):
            if not self._ready() or self._in.readinto(self._byte) != 1:
                return 0
            n = rx.take_byte(self._byte[0])
            if n:
                return n
        self.rx_more = True
        return 0
