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
import select

from micropython import const

from protocols import link

_RX_BUDGET = const(256)  # bytes read per loop at most: acks are ~100 bytes
UART_FIFO_BYTES = const(128)  # the ESP32 UART's hardware transmit FIFO


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
        self._poll = select.poll()
        self._poll.register(stream_in, select.POLLIN)
        self._tx = bytearray(max_message + max_message // 254 + 8)
        self._txv = memoryview(self._tx)
        self._framer = link.StreamFramer()
        self._rx = link.LineDeframer()
        self._byte = bytearray(1)
        self.connected = True

    def service(self):
        self._pump()
        return False  # a serial console never reconnects by itself

    def busy(self):
        return self._pending > 0

    def send(self, buf, n):
        # Takes a whole message if the previous one has gone out.
        if self._pending:
            return False
        self._pending = self._framer.frame_into(buf, n, self._tx)
        self._off = 0
        self._pump()
        return True

    def _pump(self):
        n = self._pending
        if not n:
            return
        if self._ticks_us is not None:
            now = self._ticks_us()
            queued_us = self._ticks_diff(self._empty_at, now)
            if queued_us < 0:
                queued_us = 0
                self._empty_at = now
            room = self._tx_fifo - (queued_us + self._byte_us - 1) // self._byte_us
            if room <= 0:
                return
            if n > room:
                n = room
            self._empty_at += n * self._byte_us
        self._out.write(self._tx, self._off, n)  # (buf, offset, length): no slice to allocate
        self._off += n
        self._pending -= n

    def receive(self):
        # The next downlink message (bytes, not yet authenticated) or None.
        for _ in range(_RX_BUDGET):
            ready = False
            for _obj, ev in self._poll.ipoll(0):
                ready = ev & select.POLLIN
            if not ready or self._in.readinto(self._byte) != 1:
                break
            self._rx.feed(self._byte)
        return self._rx.next_message()
