# The board's console UART at a chip's speed, as the serial link uses it
# (write, readinto, select.poll). Bytes leave at the configured baud rate,
# 10 bits each (8N1); a write returns once what does not fit the driver's
# TX buffer has gone out (the esp32 port's REPL UART has no driver ring:
# only the 128-byte hardware FIFO), and that wait is the chip's. The bytes
# themselves go to the host's stream at once.
import io
import select

from micropython import const

_POLL = const(3)  # MP_STREAM_POLL
_POLLIN = const(1)
_NO_FILENO = const(-1)
UART_FIFO_BYTES = const(128)


class SimConsole(io.IOBase):
    def __init__(self, clock, stream_in, stream_out, baud=115200, tx_buffer=UART_FIFO_BYTES):
        self._clock = clock
        self._in = stream_in
        self._out = stream_out
        self._poll = select.poll()
        self._poll.register(stream_in, select.POLLIN)
        self.baud = baud
        self._byte_ns = 10 * 1000000000 // baud
        self._tx_buffer = tx_buffer
        self._done_ns = 0  # when the last byte queued will have left
        self.blocked_us = 0
        self.bytes_out = 0

    def write(self, buf):
        c = self._clock
        c.enter()
        try:
            n = len(buf)
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
            self._out.write(buf)
            return n
        finally:
            c.leave()

    def readinto(self, buf):
        c = self._clock
        c.enter()
        try:
            return self._in.readinto(buf)
        finally:
            c.leave()

    def ioctl(self, req, arg):
        if req != _POLL:
            return _NO_FILENO
        c = self._clock
        c.enter()
        try:
            for _obj, ev in self._poll.ipoll(0):
                if ev & _POLLIN:
                    return arg & _POLLIN
            return 0
        finally:
            c.leave()
