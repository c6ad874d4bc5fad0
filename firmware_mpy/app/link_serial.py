# Frames over the USB serial console. Uplink: COBS frames (protocols.link);
# downlink: "~" base64 lines, which never contain Ctrl-C, so Ctrl-C typed by
# a technician still stops streaming and leaves the board at its REPL.
import select

from micropython import const

from protocols import link

_RX_BUDGET = const(256)  # bytes read per loop at most: acks are ~100 bytes


class SerialLink:
    name = "serial"

    def __init__(self, stream_in, stream_out, max_message):
        self._in = stream_in
        self._out = stream_out
        self._poll = select.poll()
        self._poll.register(stream_in, select.POLLIN)
        self._tx = bytearray(max_message + max_message // 254 + 8)
        self._txv = memoryview(self._tx)
        self._framer = link.StreamFramer()
        self._rx = link.LineDeframer()
        self._byte = bytearray(1)
        self.connected = True

    def service(self):
        return False  # a serial console never reconnects by itself

    def send(self, buf, n):
        k = self._framer.frame_into(buf, n, self._tx)
        self._out.write(self._txv[:k])
        return True

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
