# Rough vitals on the board, for the standard BLE services (Heart Rate,
# Pulse Oximeter) that off-the-shelf apps read. The hub's vitals engine
# (agent/vitals) is the reference: it sees the whole signal, checks its
# quality and raises the alerts; these are the board's own quick figures.
# Integer arithmetic on each framed window, no allocation after start.
import array

from micropython import const

_RR_KEPT = const(4)
_OX_SECONDS = const(4)
# SpO2 = A - B * R, the calibration the hub uses for the MAX30102 (x1000).
_CAL_A_X1000 = const(110000)
_CAL_B = const(25)


# Each feed keeps within the VM's 11 words of frame (locals and stack):
# called at every frame, it then takes no frame from the heap (README,
# "call frames"); the rarer steps are methods of their own.
class HeartRate:
    # R waves from the ECG's slope: a beat when the slope passes half the
    # largest slope of the last seconds, at least 250 ms after the last one.
    # ecg: the stream's sample buffer (array), fed from by index.
    def __init__(self, rate_hz, ecg):
        self.rate = rate_hz
        self.ecg = ecg
        self.refractory = rate_hz // 4
        self.prev = 0
        self.peak = 0
        self.since = -1  # samples since the last beat; -1 before the first
        self.rr = array.array("i", [0] * _RR_KEPT)
        self.nrr = 0
        self.bpm_x10 = 0  # 0: no estimate yet
        self.decay_shift = 8 if rate_hz < 400 else 9  # about 1 s time constant

    def reset(self):
        self.since = -1
        self.nrr = 0
        self.bpm_x10 = 0

    def feed(self, n, start=0):
        # Samples ecg[start:n], following the ones fed before.
        for i in range(start, n):
            d = self.ecg[i] - self.prev
            self.prev += d
            if d < 0:
                d = -d
            self.peak -= self.peak >> self.decay_shift
            if d > self.peak:
                self.peak = d
            if self.since >= 0:
                self.since += 1
            if d * 2 > self.peak and self.peak > 0 and (self.since < 0 or self.since > self.refractory):
                self._beat()
        if self.nrr >= 2:
            self._rate()

    def _beat(self):
        if self.since > 0 and self.rate * 3 // 10 <= self.since <= self.rate * 2:
            self.rr[self.nrr % _RR_KEPT] = self.since
            self.nrr += 1
        self.since = 0

    def _rate(self):
        k = self.nrr if self.nrr < _RR_KEPT else _RR_KEPT
        total = 0
        for j in range(k):
            total += self.rr[j]
        self.bpm_x10 = 600 * self.rate * k // total


class PulseOx:
    # Ratio of ratios over 4 s windows of red and IR; pulse rate from the
    # IR's upward crossings of its mean (the previous window's), with a
    # hysteresis of a sixteenth of its swing, so a dicrotic notch is no beat.
    # red, ir: the stream's two sample buffers (arrays), fed from by index.
    def __init__(self, rate_hz, red, ir):
        self.rate = rate_hz
        self.red = red
        self.ir = ir
        self.want = rate_hz * _OX_SECONDS
        self.spo2_x10 = 0  # 0: no estimate yet
        self.pr_x10 = 0
        self._clear()
        self.ref = 0  # the previous window's IR mean
        self.hyst = 0
        self.above = False

    def _clear(self):
        self.n = 0
        self.sum_r = 0
        self.sum_ir = 0
        self.min_r = self.min_ir = 1 << 30
        self.max_r = self.max_ir = -(1 << 30)
        self.crossings = 0
        self.first_cross = -1
        self.last_cross = -1

    def reset(self):
        self._clear()
        self.ref = 0
        self.spo2_x10 = 0
        self.pr_x10 = 0

    def feed(self, n, start=0):
        # Samples [start:n] of red and IR, following the ones fed before.
        for i in range(start, n):
            r = self.red[i]
            self.sum_r += r
            if r < self.min_r:
                self.min_r = r
            if r > self.max_r:
                self.max_r = r
            self._ir(self.ir[i])

    def _ir(self, x):
        self.sum_ir += x
        if x < self.min_ir:
            self.min_ir = x
        if x > self.max_ir:
            self.max_ir = x
        if self.ref:
            if not self.above and x > self.ref + self.hyst:
                self._crossed()
            elif self.above and x < self.ref - self.hyst:
                self.above = False
        self.n += 1
        if self.n >= self.want:
            self._estimate()

    def _crossed(self):
        self.above = True
        if self.first_cross < 0:
            self.first_cross = self.n
        else:
            self.crossings += 1
        self.last_cross = self.n

    def _estimate(self):
        n = self.n
        dc_r = self.sum_r // n
        dc_ir = self.sum_ir // n
        self.spo2_x10 = self._spo2(dc_r, dc_ir)
        if self.crossings >= 2 and self.last_cross > self.first_cross:
            self.pr_x10 = 600 * self.rate * self.crossings // (self.last_cross - self.first_cross)
        self.ref = dc_ir
        self.hyst = (self.max_ir - self.min_ir) >> 4
        self._clear()

    def _spo2(self, dc_r, dc_ir):
        ac_r = self.max_r - self.min_r
        ac_ir = self.max_ir - self.min_ir
        if dc_r > 0 and dc_ir > 0 and ac_r > 0 and ac_ir > 0:
            # ac_r * dc_ir * 1000 // (dc_r * ac_ir) in steps whose values stay
            # under 2**30 (18-bit samples: a heap int on a 32-bit port).
            return _spo2_x10(ac_r * 1000 // ac_ir * dc_ir // dc_r)
        return 0


def _spo2_x10(ratio_x1000):
    return max(0, min(1000, (_CAL_A_X1000 - _CAL_B * ratio_x1000) // 100))
