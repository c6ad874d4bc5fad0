# The board's application: sensors -> frames -> outbox -> link, one
# cooperative loop. Per loop: drain each sensor FIFO that asks for it (no
# allocation per sample), frame every full window, send what the link can
# take, read acks and commands; then sleep until a sensor's FIFO interrupt
# (its handler only sets a flag), the link's next piece, or the next thing
# due. Sensors without an interrupt line are polled every poll_ms. A board
# with no key or no configuration refuses to stream and says why on its
# console.
import gc

from micropython import const

from app import config
from app.outbox import Outbox
from app.sampler import Stream
from protocols import cbor, cipher, cose, messages
from protocols.errors import ProtocolError

FIRMWARE = "pulsebridge-fw 0.1.0"
_SMALL = const(160)  # buffer for hello/status/time messages
_MAX_SENDS_PER_LOOP = const(4)
_IDLE_MAX_MS = const(100)  # the longest sleep: downlink (acks, commands) is read at least this often
# Our sensors give at most 18-bit samples: a delta-zigzag varint of one
# takes at most 3 bytes. Headers and the COSE envelope take under 200.
_WORST_BYTES_PER_SAMPLE = const(3)
_FRAME_OVERHEAD = const(200)


class App:
    def __init__(self, board, cfg, key, epoch):
        self.board = board
        self.cfg = cfg
        self.epoch = epoch
        kid = cfg["device_id"].encode()
        self.up = cose.MacKey(key, kid, cose.AAD_UPLINK)
        self.down = cose.MacKey(key, kid, cose.AAD_DOWNLINK)
        self.seq = 0
        self.last_command = -1
        self.running = True
        self.streams = []
        now = board.ticks_ms()
        for stream_id, sensor, lead_off in board.sensors(cfg):
            window = sensor.rate_hz * cfg["window_ms"] // 1000
            if not 0 < window <= messages.MAX_SAMPLES:
                raise config.ConfigError("window_ms gives %d samples per frame, outside 1..%d"
                                         % (window, messages.MAX_SAMPLES))
            st = Stream(sensor, stream_id, window, now, lead_off)
            pin = board.irq_pin(stream_id)
            if pin is not None:
                st.use_irq(pin)
            self.streams.append(st)
        self.worst = [s.window * len(s.chans) * _WORST_BYTES_PER_SAMPLE + _FRAME_OVERHEAD for s in self.streams]
        biggest = max(self.worst)
        self.payload = bytearray(biggest)
        self.payload_mv = memoryview(self.payload)
        self.scratch = bytearray(max(s.window for s in self.streams) * _WORST_BYTES_PER_SAMPLE + 8)
        gc.collect()  # the outbox is the one big block: make room for it in one piece
        self.outbox = Outbox(max(cfg["outbox_bytes"], 2 * biggest), cfg["outbox_frames"])
        self.small = bytearray(_SMALL)
        self.small_sealed = bytearray(_SMALL + 96)
        self.link = board.link(cfg, biggest)
        # Samples are encrypted, then MACed, under a key of this boot: its
        # salt is drawn now (a BLE board's radio is on by now) and never
        # stored, so a lost or restored epoch file cannot bring a counter
        # block back (protocols/cipher.py).
        self.sealer = cipher.SampleCipher(key, board.random_bytes(cipher.BOOT_SALT_SIZE))
        # The board's own rough vitals, for the standard BLE services only.
        self.hr = None
        self.ox = None
        if hasattr(self.link, "set_vitals"):  # BLE only: a serial board never loads them
            from app.vitals_lite import HeartRate, PulseOx

            for st in self.streams:
                if st.stream_id == messages.STREAM_PPG_MAX30102:
                    self.ox = PulseOx(st.rate_hz)
                else:
                    self.hr = HeartRate(st.rate_hz)
        self.frames_built = 0
        self.downlink_rejected = 0
        self.next_status_ms = now + cfg["status_every_ms"]
        self._woken = self._any_ready  # bound once: the idle loop calls it often

    def _seq(self):
        s = self.seq
        self.seq = s + 1
        return s

    def _send_small(self, msg):
        w = cbor.Writer(self.small)
        messages.encode(w, msg)
        sw = cbor.Writer(self.small_sealed)
        self.up.seal_into(sw, memoryview(self.small)[:w.pos])
        self.link.send(self.small_sealed, sw.pos)

    def hello(self):
        self._send_small(messages.Hello(self.epoch, self._seq(), FIRMWARE, self.board.ticks_ms(),
                                        [(s.stream_id, s.rate_hz) for s in self.streams]))

    def status(self):
        self._send_small(messages.Status(self.epoch, self._seq(), self.board.ticks_ms(), self.outbox.depth(),
                                         self.outbox.dropped, gc.mem_free()))

    def build_frame(self, k, st, count):
        sensor = st.sensor
        flags = 0
        if st.lead_off():
            flags |= messages.FLAG_LEAD_OFF
        if st.saturated:
            flags |= messages.FLAG_SATURATED
        if st.pending_lost:
            flags |= messages.FLAG_FIFO_OVERFLOW
        num, den = sensor.scale()
        drive = sensor.drive() if st.stream_id == messages.STREAM_PPG_MAX30102 else None
        jitter = sensor.take_jitter_us() if st.stream_id == messages.STREAM_ECG_AD8232 else 0
        seq = self._seq()
        region = self.outbox.reserve(self.worst[k])  # may drop the oldest frames: this one then says so
        w = cbor.Writer(self.payload)
        messages.encode_sample_frame(w, self.scratch, self.epoch, seq, st.stream_id, st.t0_ms(), st.first_index,
                                     st.rate_hz, count, num, den, drive, flags, st.pending_lost,
                                     self.outbox.dropped, jitter, st.chans, self.sealer)
        sw = cbor.Writer(region)
        self.up.seal_into(sw, self.payload_mv[:w.pos])
        self.outbox.commit(seq, sw.pos)
        if st.stream_id == messages.STREAM_PPG_MAX30102:
            if self.ox is not None:
                if flags & messages.FLAG_LEAD_OFF or st.pending_lost:
                    self.ox.reset()
                else:
                    self.ox.feed(st.chans[0], st.chans[1], count)
        elif self.hr is not None:
            if flags & messages.FLAG_LEAD_OFF or st.pending_lost:
                self.hr.reset()
            else:
                self.hr.feed(st.chans[0], count)
        st.advance(count)
        self.frames_built += 1

    def on_downlink(self, data):
        try:
            msg = cose.parse(data)
            self.down.verify(msg)
            m = messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)
        except ProtocolError:
            self.downlink_rejected += 1  # never acted upon: a forged ack frees nothing
            return
        if isinstance(m, messages.Ack):
            self.outbox.ack(m, self.epoch)
        elif isinstance(m, messages.TimeRequest):
            self._send_small(messages.TimeResponse(self.epoch, self._seq(), m.nonce, self.board.ticks_ms()))
        elif isinstance(m, messages.Command):
            if m.epoch != self.epoch or m.nonce <= self.last_command:
                self.downlink_rejected += 1  # replayed or meant for another boot
                return
            self.last_command = m.nonce
            if m.name == "stop":
                self.running = False
            elif m.name == "status":
                self.status()

    def _any_ready(self):
        for st in self.streams:
            if st.ready:
                return True
        return False

    def step(self):
        board = self.board
        board.service()
        now = board.ticks_ms()
        poll_ms = self.cfg["poll_ms"]
        for k in range(len(self.streams)):
            st = self.streams[k]
            if st.due(now, poll_ms):
                count = st.poll(now)
                if count:
                    self.build_frame(k, st, count)
        if self.link.service():
            self.outbox.resend_all()  # reconnected: resend what was in flight
            self.hello()
        if self.link.connected:
            ob = self.outbox
            for _ in range(_MAX_SENDS_PER_LOOP):
                i = ob.next_to_send(now, self.cfg["retransmit_ms"])
                if i < 0 or not self.link.send(ob.frame(i), ob.lens[i]):
                    break
                ob.mark_sent(i, now)
        while True:
            data = self.link.receive()
            if data is None:
                break
            self.on_downlink(data)
        if self.hr is not None or self.ox is not None:
            hr, ox = self.hr, self.ox
            self.link.set_vitals(now, hr.bpm_x10 if hr else 0, ox.spo2_x10 if ox else 0, ox.pr_x10 if ox else 0,
                                 self.board.battery_pct(self.cfg))
        if now >= self.next_status_ms:
            self.next_status_ms = now + self.cfg["status_every_ms"]
            if self.link.connected:
                self.status()

    def start(self):
        for st in self.streams:
            st.sensor.start()
            st.start_ms = self.board.ticks_ms()
        self.hello()

    def stop(self):
        for st in self.streams:
            st.sensor.stop()

    def wait(self):
        # Sleeps until a sensor's interrupt, or the next thing due: a polled
        # sensor, the link's next piece of a frame, the status message.
        now = self.board.ticks_ms()
        t = _IDLE_MAX_MS
        for st in self.streams:
            if st.irq_pin is None:
                d = st.next_poll_ms - now
                if d < t:
                    t = d
        if self.link.busy() and self.link.pump_ms < t:
            t = self.link.pump_ms
        d = self.next_status_ms - now
        if d < t:
            t = d
        if t > 0 and not self._any_ready():
            self.board.idle_ms(t, self._woken)

    def run(self, until_ms=None):
        self.start()
        try:
            while self.running and (until_ms is None or self.board.ticks_ms() < until_ms):
                self.step()
                self.wait()
        finally:
            self.stop()


def run(board, until_ms=None):
    # Entry point: returns when streaming stops (Ctrl-C, a stop command, or
    # until_ms on the board clock); the caller then drops to the REPL.
    try:
        cfg = config.load()
        key = config.load_key()
        epoch = config.next_epoch()
    except config.ConfigError as e:
        print("pulsebridge: not streaming:", e)
        return None
    try:
        app = App(board, cfg, key, epoch)
    except Exception as e:  # a sensor missing or misconfigured: say which
        print("pulsebridge: not streaming: sensor set-up failed:", e)
        return None
    board.console("pulsebridge: %s streaming over %s, boot epoch %d; Ctrl-C for the REPL"
                  % (cfg["device_id"], app.link.name, epoch))
    try:
        app.run(until_ms)
    finally:
        # For the technician (and the simulator's accounting), whatever stopped us.
        board.console("\r\npulsebridge: stopped after %d frames built, %d awaiting an ack, %d dropped"
                      % (app.frames_built, app.outbox.depth(), app.outbox.dropped))
    return app
