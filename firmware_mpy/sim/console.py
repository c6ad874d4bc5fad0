# The board's console UART at a chip's speed, as the serial link uses it
# (write, readinto, select.poll). Bytes leave at the configured baud rate,
# 10 bits each (8N1); a write returns once what does not fit the driver's
# TX buffer has gone out (the esp32 port's REPL UART has no driver ring:
# only the 128-byte hardware FIFO), and that wait is the chip's. The bytes
# themselves go to the host's stream at once. Received bytes come from a
# host stream, or (stream_in None) from feed().
#
# The firmware asks it for waiting bytes with any(), as it would a
# machine.UART: polled by select.poll instead, the unix port would sleep a
# millisecond in poll() (objects without a file descriptor), which an ESP32
# does not do and which the CPU meter would charge.
import io
import select

from micropython import const

_POLL = const(3)  # MP_STREAM_POLL
_POLLIN = const(1)
_NO_FILENO = const(-1)
_GET_FILENO = const(10)  # MP_STREAM_GET_FILENO
_RX_RING = const(512)  # received bytes held for the firmware
UART_FIFO_BYTES = const(128)


class SimConsole(io.IOBase):
    def __init__(self, clock, stream_in, stream_out, baud=115200, tx_buffer=UART_FIFO_BYTES):
        self._clock = clock
        self._in = stream_in
        self._out = stream_out
        self._rx = bytearray(_RX_RING)
        self._rx_n = 0  # bytes put in the ring, ever
        self._rx_pos = 0  # bytes taken from it
        self._byte = bytearray(1)
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
        # As a MicroPython stream: write(buf[, off, n]). (The firmware's
        # entry, a C function on the chip: its frame kept within the VM's
        # 11 words, or it would be charged to the firmware; the work runs in
        # the simulation's time and hands back what it raised.)
        c = self._clock
        c.enter()
        r = self._write(buf, off, n)
        c.leave()
        if isinstance(r, Exception):
            raise r
        return r

    def _write(self, buf, off, n):
        c = self._clock
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
        except Exception as e:
            return e

    def feed(self, data):
        for b in data:
            self._put(b)

    def _put(self, b):
        if self._rx_n - self._rx_pos < _RX_RING:
            self._rx[self._rx_n % _RX_RING] = b
            self._rx_n += 1

    def _fill(self):
        # What the host has for us, moved into the RX ring: the UART's
        # hardware FIFO, whose filling is not the chip's CPU. (Called from
        # any(), in the firmware's time: a frame within 11 words, as write.)
        c = self._clock
        c.enter()
        e = self._fill_ring()
        c.leave()
        if e is not None:
            raise e

    def _fill_ring(self):
        try:
            while self._rx_n - self._rx_pos < _RX_RING:
                ready = False
                for _obj, ev in self._poll.ipoll(0):
                    ready = ev & _POLLIN
                if not ready or self._in.readinto(self._byte) != 1:
                    break
                self._put(self._byte[0])
        except Exception as e:
            return e
        return None

    def any(self):
        # As machine.UART.any(): how many bytes wait. Served from the ring as
        # a C call would be (no simulation time); the host is asked only
        # when the ring is empty.
        n = self._rx_n - self._rx_pos
        if not n and self._in is not None:
            self._fill()
            n = self._rx_n - self._rx_pos
        return n

    def readinto(self, buf):
        n = 0
        while n < len(buf) and self.any():
            buf[n] = self._rx[self._rx_pos % _RX_RING]
            self._rx_pos += 1
            n += 1
        return n

    def ioctl(self, req, arg):
        if req == _GET_FILENO:
            return _NO_FILENO
        if req != _POLL:
            return _NO_FILENO
        return arg & _POLLIN if self.any() else 0
