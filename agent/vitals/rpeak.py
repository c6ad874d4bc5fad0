"""Streaming R-peak detection (after Pan and Tompkins, 1985), bounded memory.

Per sample: band-pass 5-15 Hz (two RBJ biquads), five-point derivative,
squaring, 150 ms moving-window integration; then adaptive signal and noise
levels with a 200 ms refractory period, a T-wave check (a candidate within
360 ms of the last beat whose slope is under half the last beat's is a T
wave), and a search back with half the threshold when no beat came for
1.66 times the running RR average. The R peak itself is located as the
largest band-passed deflection within 120 ms before the integrator's peak.

Memory: a ring of ~0.5 s of filtered samples and eight RR intervals, whatever
the length of the recording. Each detected beat comes out once, about 0.4 s
after it happened, as a sample index on the sensor's clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable


class _Biquad:
    def __init__(self, b: tuple[float, float, float], a: tuple[float, float, float]) -> None:
        self.b0, self.b1, self.b2 = (x / a[0] for x in b)
        self.a1, self.a2 = a[1] / a[0], a[2] / a[0]
        self.x1 = self.x2 = self.y1 = self.y2 = 0.0

    @classmethod
    def highpass(cls, f0: float, fs: float, q: float = 0.7071) -> _Biquad:
        w = 2 * math.pi * f0 / fs
        alpha = math.sin(w) / (2 * q)
        c = math.cos(w)
        return cls(((1 + c) / 2, -(1 + c), (1 + c) / 2), (1 + alpha, -2 * c, 1 - alpha))

    @classmethod
    def lowpass(cls, f0: float, fs: float, q: float = 0.7071) -> _Biquad:
        w = 2 * math.pi * f0 / fs
        alpha = math.sin(w) / (2 * q)
        c = math.cos(w)
        return cls(((1 - c) / 2, 1 - c, (1 - c) / 2), (1 + alpha, -2 * c, 1 - alpha))

    def step(self, x: float) -> float:
        y = self.b0 * x + self.b1 * self.x1 + self.b2 * self.x2 - self.a1 * self.y1 - self.a2 * self.y2
        self.x2, self.x1, self.y2, self.y1 = self.x1, x, self.y1, y
        return y


class RPeakDetector:
    def __init__(self, rate_hz: float) -> None:
        fs = float(rate_hz)
        self.fs = fs
        self._hp = _Biquad.highpass(5.0, fs)
        self._lp = _Biquad.lowpass(15.0, fs)
        self._bp: deque[float] = deque(maxlen=int(0.6 * fs))  # band-passed, for locating R
        self._d: deque[float] = deque([0.0] * 4, maxlen=4)
        self._win = max(1, int(0.15 * fs))
        self._sq: deque[float] = deque([0.0] * self._win, maxlen=self._win)
        self._mwi_sum = 0.0
        self._mwi: deque[float] = deque([0.0] * 3, maxlen=3)
        self._slopes: deque[float] = deque(maxlen=int(0.1 * fs))
        self.n = 0  # samples seen
        self.spki = 0.0
        self.npki = 0.0
        self._learn_until = int(2 * fs)
        self._learn_peak = 0.0
        self.last_beat = -10 ** 9
        self.last_slope = 0.0
        self.rr: deque[int] = deque(maxlen=8)
        self._refractory = int(0.2 * fs)
        self._t_wave = int(0.36 * fs)
        self._cands: deque[tuple[int, float, int, float]] = deque(maxlen=64)  # since last beat: (n, mwi, r, slope)
        self._learning: list[tuple[int, float, int, float]] = []  # candidates of the first 2 s
        self.delay = self._win // 2 + 2  # integrator lag, in samples

    @property
    def threshold(self) -> float:
        return self.npki + 0.25 * (self.spki - self.npki)

    def _r_index(self) -> int:
        # The largest band-passed deflection in the 120 ms before the integrator peak's start.
        span = min(len(self._bp), int(0.12 * self.fs) + self._win)
        best, best_k = -1.0, 0
        for k in range(1, span + 1):
            v = abs(self._bp[-k])
            if v > best:
                best, best_k = v, k
        return self.n - best_k

    def push(self, x: float) -> list[int]:
        """Feeds one sample; returns the sample indices of the R peaks now decided."""
        y = self._lp.step(self._hp.step(x))
        self._bp.append(y)
        d = self._d
        der = (2 * y + d[-1] - d[-3] - 2 * d[-4]) * self.fs / 8.0
        d.append(y)
        sq = der * der
        self._mwi_sum += sq - self._sq[0]
        self._sq.append(sq)
        m = self._mwi_sum / self._win
        self._slopes.append(abs(der))
        out: list[int] = []
        mw = self._mwi
        if mw[-2] < mw[-1] >= m:  # a local maximum of the integrator, one sample ago
            self._candidate(mw[-1], out)
        mw.append(m)
        self.n += 1
        self._search_back(out)
        return out

    def _candidate(self, peak: float, out: list[int]) -> None:
        n = self.n - 1
        slope = max(self._slopes) if self._slopes else 0.0
        r = self._r_index()
        if n < self._learn_until:
            # Learning the levels: candidates wait, then are judged against them.
            self._learn_peak = max(self._learn_peak, peak)
            self.spki = 0.6 * self._learn_peak
            self.npki = 0.1 * self._learn_peak
            self._learning.append((n, peak, r, slope))
            return
        if self._learning:
            pending, self._learning = self._learning, []
            for c in pending:
                self._decide(*c, out)
        self._decide(n, peak, r, slope, out)

    def _decide(self, n: int, peak: float, r: int, slope: float, out: list[int]) -> None:
        if n - self.last_beat < self._refractory:
            return
        if peak > self.threshold:
            if n - self.last_beat < self._t_wave and slope < 0.5 * self.last_slope:
                self.npki = 0.125 * peak + 0.875 * self.npki  # a T wave
                return
            self._beat(n, r, peak, slope, out, 0.125)
        else:
            self.npki = 0.125 * peak + 0.875 * self.npki
            self._cands.append((n, peak, r, slope))

    def _beat(self, n: int, r: int, peak: float, slope: float, out: list[int], weight: float) -> None:
        if self.last_beat > 0:
            self.rr.append(n - self.last_beat)
        self.spki = weight * peak + (1 - weight) * self.spki
        self.last_beat = n
        self.last_slope = slope
        self._cands.clear()
        out.append(r)

    def _search_back(self, out: list[int]) -> None:
        if len(self.rr) < 2 or self.last_beat < 0:
            return
        avg = sum(self.rr) / len(self.rr)
        if self.n - self.last_beat > 1.66 * avg and self._cands:
            half = 0.5 * self.threshold
            best = max((c for c in self._cands if c[1] > half and c[0] - self.last_beat >= self._refractory),
                       key=lambda c: c[1], default=None)
            if best is not None:
                self._beat(best[0], best[2], best[1], best[3], out, 0.25)
            else:
                self._cands.clear()


def detect(signal: Iterable[float], rate_hz: float) -> list[int]:
    """R peaks of a whole recording. Its last value is held for 0.5 s after
    its end, as a stream would go on, so that a beat at the very end is decided."""
    det = RPeakDetector(rate_hz)
    peaks: list[int] = []
    x = 0.0
    for x in signal:
        peaks.extend(det.push(float(x)))
    end = det.n
    tail: list[int] = []
    for _ in range(int(0.5 * rate_hz)):
        tail.extend(det.push(float(x)))
    # A beat cut by the end of the data is placed on its last real sample at most.
    return peaks + sorted({min(p, end - 1) for p in tail} - set(peaks))
