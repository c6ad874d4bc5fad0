# AD8232 single-lead heart-rate front end: an analog output read by the
# ESP32 ADC, plus LO+ and LO- pins that go high when an electrode is off.
# The AD8232 has no clock: a hardware timer paces the ADC reads. The timer
# callback only reads the ADC into a preallocated ring and records how late
# it ran; the worst lateness in a window is reported as sampling jitter.
# The timer's callbacks are soft IRQs: while the VM is inside a long C call
# (a blocking write, a GC) they wait in the scheduler's queue (8 deep), and
# those beyond it are lost without a trace. So read_into() counts the ticks
# the timer should have given by now and reports the missing ones as lost
# samples: the sample clock (index / rate) stays true across the gap.
import time

from micropython import const

_MID = const(32768)  # read_u16() midscale: the AD8232 output rests at REFOUT = Vs/2
_ADC_FULL_SCALE_UV = const(3300000)  # 11 dB attenuation: about 0..3.3 V
_AD8232_GAIN = const(100)  # instrumentation gain of the reference circuit, V/V
_RING = const(128)  # samples buffered between two polls: 0.5 s at 250 Hz
# Tick counts wrap at 2**20 (small ints on a 32-bit port, for ever); the
# difference between two of them is meaningful within half that.
_TICK_MASK = const(0xFFFFF)
_TICK_HALF = const(0x80000)


class AD8232:
    def __init__(self, adc, lo_plus, lo_minus, timer, rate_hz=250, ticks_us=time.ticks_us,
                 ticks_diff=time.ticks_diff):
        self._adc = adc
        self._lo_plus = lo_plus
        self._lo_minus = lo_minus
        self._timer = timer
        self.rate_hz = rate_hz
        self._period_us = 1000000 // rate_hz
        self._ticks_us = ticks_us
        self._ticks_diff = ticks_diff
        self._ring = [0] * _RING
        self._wr = 0
        self._rd = 0
        self._last_us = 0
        self._jitter_us = 0
        self._lost = 0
        self._check_us = 0
        self._phase_us = 0  # time since the last tick due, as of _check_us
        # Three wrapping counts: ticks delivered (written by the callback
        # only, so no update is ever lost to it), ticks due and ticks counted
        # lost (written by read_into only).
        self._ticks = 0
        self._due = 0
        self._counted = 0
        self._cb = self._on_tick  # bound once: no allocation when the timer fires
        self.saturated = False
        self.lost = 0
        self.lost_after = False  # the ticks it never got came before the samples read

    def start(self):
        self._wr = self._rd = 0
        self._ticks = self._due = self._counted = 0
        self._phase_us = 0
        # The timer's ticks fall k periods from here: nothing runs between
        # this reading and its start but the call (microseconds).
        self._last_us = self._check_us = self._ticks_us()
        self._timer.init(freq=self.rate_hz, callback=self._cb)

    def stop(self):
        self._timer.deinit()

    def alive(self):
        return True  # an analog front end: nothing to ask

    def restart(self):
        self.stop()
        self.start()

    def _on_tick(self, _timer):
        now = self._ticks_us()
        late = self._ticks_diff(now, self._last_us) - self._period_us
        if late < 0:
            late = -late
        if late > self._jitter_us:
            self._jitter_us = late
        self._last_us = now
        self._ticks = (self._ticks + 1) & _TICK_MASK
        if self._wr - self._rd < _RING:
            self._ring[self._wr % _RING] = self._adc.read_u16()
            self._wr += 1
        else:
            self._lost += 1

    def scale(self):
        # uV at the electrodes per count of the signed read_u16() value.
        return _ADC_FULL_SCALE_UV, 65536 * _AD8232_GAIN

    def lead_off(self):
        return bool(self._lo_plus.value() or self._lo_minus.value())

    def take_jitter_us(self):
        j = self._jitter_us
        self._jitter_us = 0
        return j

    def _missed(self):
        # Ticks due by now that no callback delivered. The last one due may
        # be on its way: a soft IRQ waits in the scheduler's queue only while
        # a C call runs, and none runs here, so a tick is on its way only
        # just after its time. It counts as come if a callback ran since its
        # time, as on its way if not and less than half a period has passed,
        # as lost otherwise (and if it comes after all, the next read counts
        # it in the ticks come: nothing is counted twice).
        # (At every read: this, _advance and read_into keep within the VM's
        # 11 words of frame, so none takes its frame from the heap, README
        # "call frames".)
        now = self._ticks_us()
        phase = self._advance(now)
        last_us = self._last_us  # (read before _ticks: a tick coming in between is then never taken for lost)
        behind = (self._due - self._ticks - self._counted) & _TICK_MASK
        if behind >= _TICK_HALF:
            behind -= _TICK_MASK + 1
        if phase < self._period_us // 2 and self._ticks_diff(now, last_us) > phase:
            behind -= 1  # on its way
        if behind <= 0:
            return 0
        self._counted = (self._counted + behind) & _TICK_MASK
        return behind

    def _advance(self, now):
        # The ticks due since the last look added to _due; returns the time
        # since the last tick's (its phase).
        acc = self._phase_us + self._ticks_diff(now, self._check_us)
        self._check_us = now
        due = acc // self._period_us
        self._phase_us = acc - due * self._period_us
        self._due = (self._due + due) & _TICK_MASK
        return self._phase_us

    def read_into(self, chans, pos, room):
        self.lost = self._lost + self._missed()
        self._lost = 0
        self.saturated = False
        out = chans[0]
        n = 0
        while n < room and self._rd != self._wr:
            v = self._ring[self._rd % _RING] - _MID
            if v >= 32767 or v <= -32768:
                self.saturated = True
            out[pos + n] = v
            self._rd += 1
            n += 1
        return n
