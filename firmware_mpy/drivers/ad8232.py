# AD8232 single-lead heart-rate front end: an analog output read by the
# ESP32 ADC, plus LO+ and LO- pins that go high when an electrode is off.
# The AD8232 has no clock: a hardware timer paces the ADC reads. The timer
# callback only reads the ADC into a preallocated ring and records how late
# it ran; the worst lateness in a window is reported as sampling jitter.
import time

from micropython import const

_MID = const(32768)  # read_u16() midscale: the AD8232 output rests at REFOUT = Vs/2
_ADC_FULL_SCALE_UV = const(3300000)  # 11 dB attenuation: about 0..3.3 V
_AD8232_GAIN = const(100)  # instrumentation gain of the reference circuit, V/V
_RING = const(128)  # samples buffered between two polls: 0.5 s at 250 Hz


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
        self._cb = self._on_tick  # bound once: no allocation when the timer fires
        self.saturated = False
        self.lost = 0

    def start(self):
        self._wr = self._rd = 0
        self._last_us = self._ticks_us()
        self._timer.init(freq=self.rate_hz, callback=self._cb)

    def stop(self):
        self._timer.deinit()

    def _on_tick(self, _timer):
        now = self._ticks_us()
        late = self._ticks_diff(now, self._last_us) - self._period_us
        if late < 0:
            late = -late
        if late > self._jitter_us:
            self._jitter_us = late
        self._last_us = now
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

    def read_into(self, chans, pos, room):
        out = chans[0]
        self.lost = self._lost
        self._lost = 0
        n = 0
        sat = False
        while n < room and self._rd != self._wr:
            v = self._ring[self._rd % _RING] - _MID
            if v >= 32767 or v <= -32768:
                sat = True
            out[pos + n] = v
            self._rd += 1
            n += 1
        self.saturated = sat
        return n
