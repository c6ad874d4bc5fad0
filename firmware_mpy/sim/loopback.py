# A fake link for in-process runs (tests, benchmarks): what the board sends
# goes straight to a hub endpoint (protocols.hub) in the same interpreter,
# and the hub's acks come straight back. It stands where the serial or BLE
# link stands; faults (an outage, a forged ack) are injected by the caller.
from protocols import hub, link


class LoopbackLink:
    name = "loopback"

    def __init__(self, device_id, key, hub_=None):
        # hub_: a hub endpoint that outlives this link (a board booted
        # again talks to the same hub), else a new one.
        if hub_ is None:
            hub_ = hub.Hub()
            hub_.add_device(device_id, key)
        self.hub = hub_
        self.device_id = device_id
        self.connected = True
        self.ack_enabled = True
        self.inbox = []  # downlink messages waiting for the board
        self.message = b""  # the one receive() gave
        self.received = []  # hub.Received events, in order
        self.bytes_up = 0  # COSE bytes
        self.bytes_wire = 0  # as the serial link would send them: COBS, CRC, delimiters
        self.messages_up = 0
        self.last_wire = 0
        self._framer = link.StreamFramer()
        self._tx = bytearray(link.MAX_MESSAGE + link.MAX_MESSAGE // 254 + 8)
        self.keep = True  # keep events (tests); off for long benchmarks
        self.pump_ms = 10
        self.on_receive = None

    def service(self):
        return False

    def busy(self):
        return False

    def send(self, buf, n, off=0):
        if not self.connected:
            return False
        self.last_wire = self._framer.frame_into(buf, n, self._tx, 0, off)
        self.bytes_wire += self.last_wire
        data = bytes(memoryview(buf)[off:off + n])
        self.bytes_up += n
        self.messages_up += 1
        r = self.hub.receive(data)
        if self.keep:
            self.received.append(r)
        if self.on_receive is not None:
            self.on_receive(r)
        if self.ack_enabled and r.verdict in (hub.ACCEPTED, hub.DUPLICATE) and r.message.kind in (1, 10):
            self.inbox.extend(self.hub.ack(self.device_id, r.message.epoch, [r.message.seq]))
        if r.reply is not None:  # an epoch resync
            self.inbox.append(r.reply)
        return True

    rx_more = False  # (messages are taken whole)

    def receive(self):
        # As the board's links: the length of the next message, then in self.message.
        if self.inbox:
            self.message = self.inbox.pop(0)
            return len(self.message)
        return 0
