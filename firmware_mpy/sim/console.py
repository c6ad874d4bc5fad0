# The board's console UART at a chip's speed, as the serial link uses it
# (write, readinto, select.poll). Bytes leave at the configured baud rate,
# 10 bits each (8N1); a write returns once what does not fit the driver's
# TX buffer has gone out (the esp32 port's REPL UART has no driver ring:
# only the 128-byte hardware FIFO), and that wait is the chip's. The bytes
# themselves go to the host's stream at once. Received bytes come from a
# host stream, or (stream_in None) from feed().
#
# Polled with select.poll, the console gives the host's file descriptor
# (fd_in) when it has one: the unix port polls objects without one by
# sleeping a millisecond in poll(), which an ESP32 does not do and which
# would count as the firmware's time.
import io
import select

from micropython import const

_POLL = const(3)  # MP_STREAM_POLL
_POLLIN = const(1)
_NO_FILENO = const(-1)
_GET_FILENO = const(10)  # MP_STREAM_GET_FILENO
UART_FIFO_BYTES = const(128)


class SimConsole(io.IOBase):
    def __init__(self, clock, stream_in, stream_out, baud=115200, tx_buffer=UART_FIFO_BYTES, fd_in=-1):
        self._clock = clock
        self._in = stream_in
        self._out = stream_out
        self._rx = bytearray()
        self._fd_in = fd_in
        self._poll = select.poll()
        if stream_in is not None:
            self._poll.register(stream_in, select.POLLIN)
        self.baud = baud
        self._byte_ns = 10 * 1000000000 // baud
        self._tx_buffer = tx_buffer
        self._done_ns = 0  # when the last byte queued will have left
        self.blocked_us = 0
        self.bytes_out = 0

    def write(self, buf, off=0, n=-1):
        # As a MicroPython stream: write(buf[, off, n]).
        c = self._clock
        c.enter()
        try:
            if n < 0:
                n = len(buf) - off
            now_ns = c.t_us * 1000
            if self._done_ns < now_ns:
                self._done_ns = now_ns
            self._done_ns += n * self._byte_ns
            # Blocked until no more than tx_buffer bytes wait.
            wait_us = (self._done_ns - self._tx_buffer * self._byte_ns - now_ns) // 1000
            if wait_us > 0:
                self.blocked_us += wait_us
                c.charge_io_us(wait_us)
            self.bytes_out += n
            self._out.write(buf, off, n)
            return n
        finally:
            c.leave()

    def feed(self, data):
        self._rx += data

    def readinto(self, buf):
        c = self._clock
        c.enter()
        try:
            if self._in is not None:
                return self._in.readinto(buf)
            n = min(len(buf), len(self._rx))
            buf[:n] = self._rx[:n]
            self._rx = self._rx[n:]
            return n
        finally:
            c.leave()

    def ioctl(self, req, arg):
        if req == _GET_FILENO:
            return self._fd_in
        if req != _POLL:
            return _NO_FILENO
        c = self._clock
        c.enter()
        try:
            if self._in is None:
                return arg & _POLLIN if self._rx else 0
            for _obj, ev in self._poll.ipoll(0):
                if ev & _POLLIN:
                    return arg & _POLLIN
            return 0
        finally:
            c.leave()
