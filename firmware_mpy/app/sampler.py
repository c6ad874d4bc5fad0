# One sensor stream: drains a sensor's FIFO into preallocated per-channel
# arrays and cuts them into windows (frames). Sample indices count samples
# on the sensor's own clock since the stream started; they, not a timer,
# give every sample its time: t = start + index / rate.
#
# Indices and times are carried as two halves, value = hi * 2**30 + lo
# (first_index_hi/first_index, t0_ms_hi/t0_ms_lo), down to the CBOR writer
# (cbor.Writer.uint_halves): an ESP32's small ints hold 31 bits, and the
# ECG's index passes 2**30 after 24.3 days at 512 Hz, a frame's time in ms
# after 12.4 days; as one int each would then be a heap int per frame.
#
# A FIFO overflow loses samples: the window is cut before the gap, the gap
# is skipped in the indices, and the next frame reports it.
#
# When the chip's FIFO interrupt output is wired (irq_pin), the stream is
# drained when it asks: the pin's handler, a soft IRQ, only sets `ready`;
# otherwise the app polls it every poll_ms.
import array

from micropython import const

from app import ticks
from protocols import fields

# Room after a window for what the FIFO gives while that window waits to
# be framed and while its frame is built (the FIFOs are read between a
# frame's pieces into this room): at least a full sensor FIFO (one drain
# always fits), and 3 FIFOs' worth at 512 Hz (188 ms): at an ESP32's speed
# a BLE board's ECG frame with its heart-rate feed takes 50-110 ms, and a
# PPG frame or a collection may come first; with 32 the room filled, the
# FIFO went unread and overflowed (bench firmware --stretches). 256 bytes
# more for the ECG; the PPG's 32 already last 320 ms at 100 Hz.
_SPARE_FIFO = const(32)
_SPARE_MS = const(188)
_LO_MAX = const((1 << 30) - 1)  # the low half's largest value (2**30 itself is a heap int on an ESP32)
_RATE_MAX_HZ = const(1023)  # the halves' arithmetic needs rate_hz * 2**20 under 2**30



def _shift(ch, count, rest):
    # ch[0:rest] = ch[count:count + rest], in place (a slice would allocate;
    # apart from Stream.advance, whose frame it would take past 11 words).
    for i in range(rest):
        ch[i] = ch[count + i]


class Stream:
    def __init__(self, sensor, stream_id, window, start_ms, lead_off_fn=None):
        self.sensor = sensor
        self.stream_id = stream_id
        self.rate_hz = rate = sensor.rate_hz
        if not 0 < rate <= _RATE_MAX_HZ:
            raise ValueError("stream %d: rate_hz %r not in 1..%d" % (stream_id, rate, _RATE_MAX_HZ))
        # 2**30 = _wrap_s * rate + _wrap_rem: one low-half wrap of the index, in seconds and samples
        q = _LO_MAX // rate
        r = _LO_MAX - q * rate + 1
        if r == rate:
            q += 1
            r = 0
        self._wrap_s = q
        self._wrap_rem = r
        self.window = window
        self.capacity = window + max(_SPARE_FIFO, rate * _SPARE_MS // 1000)
        nch = fields.STREAM_CHANNELS[stream_id]
        self.chans = tuple(array.array("i", bytes(4 * self.capacity)) for _ in range(nch))
        self.n = 0  # samples held in chans
        self.first_index = 0  # sensor index of chans[*][0]: its low half, under 2**30
        self.first_index_hi = 0  # ... and its high half (2**30 samples each)
        self.t0_ms_hi = 0  # the time of chans[*][0] (ms since boot), set by frame_time()
        self.t0_ms_lo = 0
        self.start_ms = start_ms  # ms since boot (monotonic), the time base of t0_ms
        # The board's uptime_ms(), for how many samples are due by now (a
        # loss estimate, rare); None: the now_ms given to poll() is uptime.
        self.uptime_ms = None
        self.split = 0  # if set: a gap follows the first `split` samples
        self.gap = 0
        self.pending_lost = 0  # reported by the next frame after a gap
        self.lost_total = 0
        # _behind() when the FIFO was last known empty (drain_rest): what the
        # board's clock expects beyond the samples the chip made is then the
        # two clocks' drift (20 ppm: 37 samples an hour at 512 Hz), not a loss.
        self._drift = 0
        self.saturated = False
        self.fault = False  # a sensor fault since the last frame: reported by the next one
        self._lead_off_fn = lead_off_fn
        self.irq_pin = None
        self.ready = False  # set by the interrupt handler, cleared by the app
        self.drained_ms = start_ms  # when a read last took samples from its FIFO
        self.next_poll_ms = start_ms  # a tick (app.ticks); the app sets it from its clock
        self._rest = hasattr(sensor, "read_rest_into")  # a chip whose FIFO can be emptied below its threshold

    def use_irq(self, pin):
        self.irq_pin = pin
        self.ready = True  # drain once at start: the line may already be low
        pin.irq(handler=self.on_irq, trigger=pin.IRQ_FALLING)

    def on_irq(self, _pin):
        self.ready = True

    def wants(self):
        # The chip asked, or its line is still low: a drain that could not
        # take enough (a full window waiting to be framed) left it asking,
        # and a line that stays low makes no new edge.
        pin = self.irq_pin
        return self.ready or (pin is not None and not pin.value())

    def due(self, now_ms, poll_ms):
        # Whether to drain now: the chip asked (or its line is still low,
        # an edge we may not see again), or, unwired, the poll is due.
        pin = self.irq_pin
        if pin is not None:
            if self.ready or not pin.value():
                self.ready = False
                return True
            return False
        if ticks.diff(now_ms, self.next_poll_ms) >= 0:
            self.next_poll_ms = ticks.add(now_ms, poll_ms)
            return True
        return False

    def frame_time(self):
        # Sets t0_ms_hi/t0_ms_lo to start_ms + index * 1000 // rate_hz
        # (index: first_index_hi * 2**30 + first_index) with every
        # intermediate value under 2**30 (a small int on a 32-bit port) for
        # 34 years of streaming: the index in whole seconds and the rest,
        # the seconds' ms in two halves.
        rate = self.rate_hz
        hi = self.first_index_hi
        lo = self.first_index
        x = hi * self._wrap_rem + lo % rate
        s = hi * self._wrap_s + lo // rate + x // rate
        a = (s >> 20) * 1000  # s * 1000 = a * 2**20 + (s & 0xFFFFF) * 1000
        self.t0_ms_hi = a >> 10
        self.t0_ms_lo = (a & 1023) << 20
        self._t0_add((s & 0xFFFFF) * 1000)
        self._t0_add(self.start_ms)
        self._t0_add((x % rate) * 1000 // rate)

    def _t0_add(self, x):
        # t0 += x (0 <= x < 2**30), carried into the high half.
        lo = self.t0_ms_lo
        if x > _LO_MAX - lo:
            self.t0_ms_lo = x - (_LO_MAX - lo) - 1
            self.t0_ms_hi += 1
        else:
            self.t0_ms_lo = lo + x

    def _skip(self, n):
        # first_index += n (0 <= n < 2**30), carried into the high half.
        lo = self.first_index
        if n > _LO_MAX - lo:
            self.first_index = n - (_LO_MAX - lo) - 1
            self.first_index_hi += 1
        else:
            self.first_index = lo + n

    def poll(self, now_ms):
        # Drains the sensor; returns how many samples to put in a frame now.
        # A window already full is drained on into the spare room: the app
        # reads the FIFOs while it builds another stream's frame. So is a
        # stream cut before a gap (split): what follows the gap goes after
        # it (at an ESP32's speed the cut frame takes tens of ms, and a FIFO
        # left unread meanwhile overflowed again, a gap after every gap).
        if self.n < self.capacity:
            got = self.sensor.read_into(self.chans, self.n, self.capacity - self.n)
            if got:
                self.drained_ms = now_ms  # its FIFO just went below the chip's threshold
            if self.sensor.saturated:
                self.saturated = True
            if self.sensor.lost:
                self._lost(now_ms, got)
            else:
                self.n += got
        return self.to_frame()

    def drain_rest(self, now_ms=0):
        # Before a pause of the loop longer than its threshold leaves (a
        # collection), what the chip holds below it is read too (the
        # MAX30003: up to 15 samples, 29 ms of its 62.5): the pause then has
        # the FIFO's whole fill time. After a poll() that read samples. Read
        # to the sample the chip marks last, the FIFO is empty: the clocks'
        # drift is measured then (now_ms: as poll's, if uptime_ms is None).
        if self._rest and self.n < self.capacity:
            self.n += self.sensor.read_rest_into(self.chans, self.n, self.capacity - self.n)
            if self.sensor.saturated:
                self.saturated = True
            if self.sensor.emptied and not self.split:  # (a gap waiting to be framed is not in the indices yet)
                self._drift = self._behind(now_ms)

    def _lost(self, now_ms, got):
        # The sensor lost samples around the got it just read: before them
        # (lost_after False: a FIFO that overwrites its oldest), or after
        # them (True: one that keeps what it stored before overflowing).
        lost = self.sensor.lost
        if self.sensor.lost_after:
            self.n += got
            got = 0
        if lost < 0:  # the chip does not count: estimate from the board clock, its drift off
            lost = self._behind(now_ms, got) - self._drift
            if lost < 1:
                lost = 1
        self._lose(lost)
        self.n += got

    def to_frame(self):
        # How many samples to put in a frame now.
        if self.split:
            return self.split
        if self.n >= self.window:
            return self.window
        return 0

    def _behind(self, now_ms, extra=0):
        # Samples the sensor's clock should have given by now_ms (less
        # `extra` just read) that the stream does not hold.
        if self.uptime_ms is not None:
            now_ms = self.uptime_ms()
        ms = now_ms - self.start_ms
        s = ms // 1000  # (as t0_ms: ms * rate_hz would pass 2**30 after 35 minutes at 512 Hz)
        expected = s * self.rate_hz + (ms - s * 1000) * self.rate_hz // 1000 - extra
        # (rare: a heap int here past 2**30 samples is allowed)
        return expected - ((self.first_index_hi << 30) + self.first_index + self.n)

    def _lose(self, lost):
        # `lost` samples went missing after the n held: cut the window before
        # the gap (if any is held), skip the gap in the indices, and let the
        # next frame report it.
        self.lost_total += lost
        if self.split:
            # A second gap before the first one is framed: the samples read
            # between the two are given up to the first (a frame holds one
            # run of samples and the stream one gap), counted as lost.
            between = self.n - self.split
            self.lost_total += between
            self.gap += between + lost
            self.n = self.split
        elif self.n:
            self.split = self.n
            self.gap = lost
        else:
            self._skip(lost)
            self.pending_lost += lost

    def resync(self, now_ms):
        # The sensor was restarted at now_ms (after a fault): its samples
        # from now on follow the ones the stream holds after a gap as long
        # as the time they did not come. Returns the gap in samples.
        if self.split:
            return 0  # a gap is already waiting to be framed: the next poll finds the rest
        lost = self._behind(now_ms)
        if lost > 0:
            self._lose(lost)
            return lost
        return 0

    def lead_off(self):
        return self._lead_off_fn() if self._lead_off_fn else False

    def framing(self):
        # A frame of the first samples is being made, its flags taken: what
        # the sensor says from now on (its FIFO is read meanwhile) goes in
        # the next frame.
        self.saturated = False
        self.fault = False

    def advance(self, count):
        # The first count samples are framed: move the rest to the front. A
        # gap found after them (split, while the frame was being made) stays
        # ahead, after the samples before it.
        rest = self.n - count
        chans = self.chans
        for k in range(len(chans)):
            _shift(chans[k], count, rest)
        self.n = rest
        self._skip(count)
        self.pending_lost = 0
        if self.split > count:
            self.split -= count
        elif self.split:
            self._skip(self.gap)
            self.pending_lost = self.gap
            self.split = 0
            self.gap = 0
