"""Streaming R-peak detection (after Pan and Tompkins, 1985), frame by frame, bounded memory.

Per frame, on arrays, filter state carried from one frame to the next:
band-pass 5-15 Hz (second-order Butterworth high-pass and low-pass,
agent.vitals.iir), five-point derivative, squaring, 150 ms moving-window
integration (numpy convolutions over the frame and the inputs before it),
and each candidate's slope and R location. Python only runs per candidate (a
local maximum of the integrator, some twenty a second on a real recording):
adaptive signal and noise levels with a 200 ms
refractory period, a T-wave check (a candidate within 360 ms of the last
beat whose slope is under half the last beat's is a T wave), and a search
back with half the threshold when no beat came for 1.66 times the running RR
average. The R peak itself is the largest band-passed deflection within
120 ms before the integrator's peak.

Settling, as Pan and Tompkins' learning phase: the filters start in their
steady state for the stream's first sample (an offset is no step), no
candidate counts before the integrator's window has filled, and the first
2 s only set the signal and noise levels; their candidates are judged
against those levels once learnt. So a stream (and each restart of one)
reports no beat from its filters' settling, and the levels are not learnt
from a start-up transient.

Memory: ~0.6 s of filtered samples, the filters' states and eight RR
intervals, whatever the length of the recording. Each beat comes out once,
about 0.4 s after it happened, as a sample index on the sensor's clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from agent.vitals.iir import SosCascade, butter_sos

LEARN_S = 2.0  # Pan-Tompkins learning phase 1: levels from the first 2 s
HISTORY_S = 0.6  # filtered samples kept across frames (R location, slopes)
RR_KEPT = 8  # the running RR average's length


@lru_cache(maxsize=8)
def _band_pass(rate_hz: float) -> SosCascade:
    # The 5-15 Hz band-pass at rate_hz, designed once per rate and shared by every board's
    # detector (a design costs more than a frame's filtering); each carries its own state.
    return SosCascade(np.vstack([butter_sos(2, 5.0, "highpass", rate_hz), butter_sos(2, 15.0, "lowpass", rate_hz)]))


class RPeakDetector:
    """Feed frames of one ECG lead (any length, any units) with push_frame();
    get back the sample indices of the beats decided, counted from the stream's
    first sample."""

    def __init__(self, rate_hz: float) -> None:
        fs = float(rate_hz)
        self.fs = fs
        self._band = _band_pass(fs)
        self._band_state: npt.NDArray[np.float64] | None = None  # set from the first sample (steady state)
        self._der_b = np.array([2.0, 1.0, 0.0, -1.0, -2.0]) * fs / 8.0
        self._der_in = np.zeros(len(self._der_b) - 1)  # the band-passed samples before this frame
        self._win = max(1, int(0.15 * fs))
        self._mwi_b = np.full(self._win, 1.0 / self._win)
        self._mwi_in = np.zeros(self._win - 1)  # the squared derivative before this frame
        keep = int(HISTORY_S * fs)
        self._bp_hist = np.zeros(0)  # the last `keep` band-passed samples
        self._slope_hist = np.zeros(0)  # |derivative|, same span
        self._keep = keep
        self._mwi_tail = np.zeros(2)  # the integrator's last two values (local maxima across frames)
        self._slope_span = max(1, int(0.1 * fs))
        self._r_span = int(0.12 * fs) + self._win
        self._slope_offsets = np.arange(self._slope_span)  # a window's samples, from its start
        self._r_offsets = np.arange(self._r_span)
        self.n = 0  # samples seen
        self.spki = 0.0
        self.npki = 0.0
        self._settle = self._win  # no candidate before the integrator's window has filled
        self._cut = int(0.06 * fs)  # an R this close to the start is a QRS (~0.1 s) the start cut
        self._learn_until = int(LEARN_S * fs)
        self._learn_peak = 0.0
        self.last_beat = -10 ** 9
        self.last_slope = 0.0
        self.rr: deque[int] = deque(maxlen=RR_KEPT)
        # Samples after the last beat past which the search back looks (1.66 RR averages);
        # infinite until two RR intervals are known. Set at each beat (rr and last_beat change
        # only there): the check runs for every candidate.
        self._search_after = math.inf
        self._refractory = int(0.2 * fs)
        self._t_wave = int(0.36 * fs)
        self._cands: deque[tuple[int, float, int, float]] = deque(maxlen=64)  # since last beat: (n, mwi, r, slope)
        self._learning: list[tuple[int, float, int, float]] = []  # candidates of the learning phase

    @property
    def threshold(self) -> float:
        return self.npki + 0.25 * (self.spki - self.npki)

    def push_frame(self, x: Sequence[float] | np.ndarray) -> list[int]:
        """Feeds a frame of samples; returns the sample indices of the R peaks now decided."""
        a = np.asarray(x, dtype=float)
        if not a.size:
            return []
        if self._band_state is None:
            self._band_state = self._band.unit_step_state * a[0]
        bp, self._band_state = self._band.filter(a, self._band_state)
        # The FIR stages (derivative, integrator) as convolutions over the frame and the
        # inputs before it: lfilter with its state carried, in a quarter of the time here.
        bp_in = np.concatenate([self._der_in, bp])
        self._der_in = bp_in[len(bp_in) - len(self._der_in):]
        der = np.convolve(bp_in, self._der_b, "valid")
        sq_in = np.concatenate([self._mwi_in, der * der])
        self._mwi_in = sq_in[len(sq_in) - len(self._mwi_in):]
        mwi = np.convolve(sq_in, self._mwi_b, "valid")
        base = self.n - len(self._bp_hist)  # sample index of bp_all[0]
        bp_all = np.concatenate([self._bp_hist, bp])
        slope_all = np.concatenate([self._slope_hist, np.abs(der)])
        m = np.concatenate([self._mwi_tail, mwi])  # m[j] is sample self.n - 2 + j
        peaks = np.flatnonzero((m[:-2] < m[1:-1]) & (m[1:-1] >= m[2:]))  # local maxima at m[j + 1]
        out: list[int] = []
        if len(peaks):
            # For every candidate at once: its slope (the largest |derivative| over the
            # _slope_span samples up to it) and its R (the largest |band-passed| over the
            # _r_span up to it, the first if several), over windows ending at `now`, the
            # position of the sample after the integrator's maximum in the *_all arrays.
            # Windows cut by the arrays' start are padded with values that never win.
            nows = (self.n - base) + peaks
            span, r_span = self._slope_span, self._r_span
            slopes = np.concatenate([np.zeros(span - 1), slope_all])[nows[:, None] + self._slope_offsets].max(axis=1)
            rs = base + nows + 1 - r_span + np.concatenate([np.full(r_span - 1, -1.0), np.abs(bp_all)])[
                nows[:, None] + self._r_offsets].argmax(axis=1)
            for j, slope, r in zip(peaks.tolist(), slopes.tolist(), rs.tolist()):
                k = self.n - 1 + j  # the integrator's maximum; decided at sample k + 1
                self._search_back(k + 1, out)
                self._candidate(k, float(m[j + 1]), r, slope, out)
                self._search_back(k + 2, out)
        self.n += len(a)
        self._search_back(self.n, out)
        self._bp_hist = bp_all[-self._keep:]
        self._slope_hist = slope_all[-self._keep:]
        self._mwi_tail = m[-2:]
        return out

    def _candidate(self, n: int, peak: float, r: int, slope: float, out: list[int]) -> None:
        if n < self._settle or r < self._cut:
            return  # the integrator's window is not full yet, or a QRS cut by the stream's start
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
        if len(self.rr) >= 2 and n >= 0:
            self._search_after = 1.66 * (sum(self.rr) / len(self.rr))

    def _search_back(self, now: int, out: list[int]) -> None:
        # As of sample `now`: no beat for 1.66 RR averages, so the best candidate under the
        # threshold (over half of it) was a beat.
        if not self._cands or now - self.last_beat <= self._search_after:
            return
        half = 0.5 * self.threshold
        best = max((c for c in self._cands if c[1] > half and c[0] - self.last_beat >= self._refractory),
                   key=lambda c: c[1], default=None)
        if best is not None:
            self._beat(best[0], best[2], best[1], best[3], out, 0.25)
        else:
            self._cands.clear()


def detect(samples: Iterable[float], rate_hz: float) -> list[int]:
    """R peaks of a whole recording, in order. Its last value is held for 0.5 s after its
    end, as a stream would go on, so that a beat near the end is decided; a beat whose
    largest deflection is not inside the data (it lies in the held tail, or on the very
    last sample, cut by the end) is none: the recording holds no such beat."""
    a = np.asarray(list(samples) if not isinstance(samples, np.ndarray) else samples, dtype=float)
    if not a.size:
        return []
    det = RPeakDetector(rate_hz)
    peaks = det.push_frame(a)
    end = det.n
    out = list(peaks)
    span = int(0.12 * rate_hz) + det._win
    for p in det.push_frame(np.full(int(0.5 * rate_hz), a[-1])):
        # A beat decided in the held tail: the filters' delay may put its band-passed peak
        # past the end; it is a beat of the recording if the signal's own largest deflection
        # nearby is inside it, not on its last sample (where a cut slope would put it).
        lo = max(0, min(p, end - 1) - span)
        w = a[lo:end]
        i = int(np.argmax(np.abs(w - np.median(w))))
        if lo + i < end - 1:
            out.append(lo + i)
    return out
