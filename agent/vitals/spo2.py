"""SpO2, pulse rate, perfusion index and their quality from two-wavelength PPG.

Ratio of ratios over a sliding window: for each wavelength the pulsatile
part over the steady part, AC/DC, sample by sample: the band (0.5-5 Hz) of
the logarithm of the light, since log(DC*(1 + a)) = log(DC) + a for a
small pulse a, so the steady part, drifting or not, drops out with the
band's low end and what is left is AC/DC against the DC of that very
moment. The DC of a window mean used before followed the drift as
saturation fell and weighted every beat by the window's average light
instead of its own: on the camera set the light moves by 7-38 % within
8 s in one window in a hundred (by recording, up to 40 % at times), and
red light falling by 30 % within the window read 1.6 % low that way
(tests/agent/test_spo2.py). The band is
taken from the window with its linear trend removed first, by a zero-phase
Butterworth band-pass (agent.vitals.iir, run forward and backward), kept
frame by frame: each frame filters its own samples and updates the window's
band (iir.SlidingZeroPhase: the same band as the whole window's, computed
from carried state).
R = RMS(AC/DC)red / RMS(AC/DC)IR, mapped to SpO2 by the sensor type's
calibration curve SpO2 = A - B*R. Perfusion index: the IR pulse's
peak-to-peak (5th to 95th percentile of its AC/DC), in %.

Pulse rate: the period at which the pulse best repeats itself (the
autocorrelation of both pulses, normalised and summed, over 40-220 /min),
checked against its sub-multiples and multiples: a period that is two or
three pulses long repeats as well as one pulse (the 42 /min read for a true
128 /min), so the shortest period that repeats nearly as well as the best
one is taken, and that period must repeat again at twice its length. When
the caller knows the heart's period (the R-R intervals of an ECG on the
same board) the candidate nearest it among the repeating ones is taken.
The pulse's quality is the autocorrelation at the period taken, lowered by
how well a rival period (one that is no multiple of it) repeats:
ambiguity costs quality.

Signal quality (of SpO2 and the perfusion index): the lower of two
figures, each near 1 on a good signal. The red/IR pulse correlation (one
heart, one pulse: it falls with noise and motion), and the ratio's
consistency from beat to beat: R is computed on each SEGMENT_S stretch of
the window (two to four beats) and 1 - the standard deviation of log R
across them is taken (R wandering by 5 % between stretches gives 0.95):
one R for the whole window is only meaningful if each stretch agrees with
it. The pulse rate has its own (above). SpO2 is withheld (None) when the
quality is under MIN_QUALITY, the pulse rate when its quality is under
MIN_PERIODICITY: never guessed.

Calibration of a sensor type (how a deployed one gets its A and B; the
README's "SpO2 calibration of a sensor type" gives the steps): a
desaturation study on healthy adults breathing controlled O2/N2 mixtures
down to ~70 % (ISO 80601-2-61 annex EE.2), reference SpO2 from arterial
blood gases (or, as in the evaluation set, from clinical oximeters), the
line fitted on windows that pass the quality gate, its error measured on
subjects left out of the fit (leave one subject out, every fitted choice
made inside the fold), and the gate's threshold set so that the shown Arms
meets the claim; the curve is stored per sensor type in CALIBRATION, never
fitted per patient.

Memory: one window of samples per channel (raw, and the log with its band),
whatever the stream's length, and the band-pass's carried state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from agent.vitals.iir import SlidingZeroPhase, SosCascade, ZeroPhaseWindow, butter_sos

# Calibration curves per sensor type (A, B in SpO2 = A - B * R). The
# MAX30102 entry is the textbook linear fit for 660/880 nm emitters; a
# deployed sensor type gets its own from a desaturation study (above).
CALIBRATION = {"max30102": (110.0, 25.0)}
WINDOW_S = 8.0
MIN_QUALITY = 0.9
MIN_PERIODICITY = 0.5
BAND_HZ = (0.5, 5.0)  # the pulse's band (30-300 /min and its first harmonics)
PULSE_BPM = (40.0, 220.0)  # the pulse rates looked for
NEAR_BEST = 0.8  # a shorter period that repeats this well (of the best) is the pulse's
EXPECTED_TOLERANCE = 0.15  # a repeating period this close to the ECG's is the heart's
AMBIGUITY_FREE = 0.3  # a rival period repeating at most this well (of the best) costs nothing
SEGMENT_S = 2.0  # R's consistency is judged across stretches this long (two to four beats at 60-120 /min)


@dataclass
class Oximetry:
    spo2_pct: float | None
    pulse_rate_bpm: float | None
    perfusion_index_pct: float | None
    quality: float  # 0..1: the lower of the red/IR pulse correlation and R's consistency (module docstring)
    ratio: float | None
    pulse_quality: float = 0.0  # 0..1: how clearly the pulse repeats at the period taken (the rate's quality)
    # The window's own figures (red, IR), for a relative estimate and its learnt quality
    # (agent.vitals.spo2_relative); None before a full window or without light:
    light: tuple[float, float] | None = None  # mean light over the window (the sensor's units)
    perfusion: tuple[float, float] | None = None  # RMS of AC/DC (the band of the log of the light)
    light_motion: tuple[float, float] | None = None  # SD of the log of the light less its pulse band


def _row_std(x: np.ndarray) -> np.ndarray:
    # The standard deviation along the last axis, as np.std computes it (the mean off, the
    # mean square's root), without its generic wrapper's cost (~10 us a call).
    d = x - x.sum(axis=-1, keepdims=True) / x.shape[-1]
    return np.asarray(np.sqrt(np.einsum("...i,...i->...", d, d) / x.shape[-1]))


def _local_maxima(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero((x[1:-1] > x[:-2]) & (x[1:-1] >= x[2:])) + 1


def pulse_period(ac: np.ndarray, fs: float, expected_period_s: float | None = None) -> tuple[float | None, float]:
    """The pulse's period in seconds and its quality (0..1) from a band-passed pulse
    (or the sum of several, normalised), checked against sub-multiples and multiples
    (module docstring). expected_period_s: the heart's period from an ECG, if known.
    (None, quality) when nothing repeats."""
    x = ac - ac.sum() / len(ac)  # the mean (np.mean's arithmetic, without its wrapper)
    n = len(x)
    spec = np.fft.rfft(x, 2 * n)
    full = np.fft.irfft(spec.real ** 2 + spec.imag ** 2, 2 * n)[:n]  # the autocorrelation, lags 0..n-1
    if full[0] <= 0:
        return None, 0.0
    full = full / full[0]  # biased: a long lag has fewer terms and counts less, as it should
    lo, hi = max(1, int(fs * 60 / PULSE_BPM[1])), min(n - 2, int(fs * 60 / PULSE_BPM[0]) + 1)
    peaks = [int(k) for k in _local_maxima(full[:min(n - 1, 2 * hi + 2)]) if lo <= k <= hi and full[k] > 0]
    if not peaks:
        return None, 0.0
    best = max(peaks, key=lambda k: full[k])
    top = float(full[best])
    repeating = [k for k in peaks if full[k] >= NEAR_BEST * top]
    k = min(repeating)  # the shortest period that repeats nearly as well as the best
    if expected_period_s is not None:
        # The heart's period settles it, if one of the repeating periods is that period;
        # if none is, the pulse stays the shortest (and the cross-check will disagree).
        near = min(repeating, key=lambda j: abs(j / fs - expected_period_s))
        if abs(near / fs - expected_period_s) <= EXPECTED_TOLERANCE * expected_period_s:
            k = near
    if 2 * k < len(full) and 2 * k <= 2 * hi + 1:  # a period repeats at twice its length too
        near2 = full[max(0, 2 * k - 2):2 * k + 3]
        if near2.size and float(near2.max()) < 0.5 * float(full[k]):
            return None, max(0.0, float(near2.max()))
    # A rival: a peak whose lag is no multiple of k (nor k a multiple of it), within 10 %.
    rival = 0.0
    for j in peaks:
        ratio = j / k if j >= k else k / j
        if abs(ratio - round(ratio)) > 0.1 * round(ratio):
            rival = max(rival, float(full[j]) / float(full[k]))
    penalty = max(0.0, (rival - AMBIGUITY_FREE) / (1.0 - AMBIGUITY_FREE))
    quality = max(0.0, float(full[k]) * (1.0 - min(1.0, penalty)))
    # Refined to a fraction of a sample by the parabola through the peak.
    y0, y1, y2 = full[k - 1], full[k], full[k + 1]
    den = y0 - 2 * y1 + y2
    shift = 0.5 * (y0 - y2) / den if den < 0 else 0.0
    return float((k + shift) / fs), quality


@lru_cache(maxsize=8)
def _band_window(rate_hz: float, window: int) -> ZeroPhaseWindow:
    # The pulse band's Butterworth band-pass at rate_hz over a window, with filtfilt's odd
    # extension at each end, designed once per rate and window: every board's estimator
    # shares it (it keeps no signal's state).
    cascade = SosCascade(butter_sos(4, (BAND_HZ[0], min(BAND_HZ[1], 0.45 * rate_hz)), "bandpass", rate_hz))
    return ZeroPhaseWindow(cascade, window, min(window - 1, 3 * cascade.order))


class OximetryEstimator:
    def __init__(self, rate_hz: float, sensor: str = "max30102", window_s: float = WINDOW_S) -> None:
        self.fs = float(rate_hz)
        self.cal = CALIBRATION[sensor]
        self._n = int(window_s * self.fs)
        self._light = np.zeros((2, 0))  # the window's red and IR light, as pushed
        self._design = _band_window(self.fs, self._n)
        # The log of the light and its band, kept frame by frame (agent.vitals.iir.SlidingZeroPhase)
        # from the last sample without light on.
        self._log_band = SlidingZeroPhase(self._design)
        self._seg = max(1, int(SEGMENT_S * self.fs))

    def _band(self, x: np.ndarray) -> np.ndarray:
        # Each row (channel) of a whole window: linear trend off, then the band-pass forward and
        # backward (zero phase), as scipy's detrend and sosfiltfilt do. What estimate() keeps
        # frame by frame; the other methods of bench_spo2_methods call it on their windows.
        return self._design.reference(x)

    def push(self, red: list[int] | np.ndarray, ir: list[int] | np.ndarray) -> None:
        """A frame of both channels (equal lengths, any units proportional to light)."""
        both = np.vstack([np.asarray(red, dtype=float), np.asarray(ir, dtype=float)])
        self._light = np.concatenate([self._light, both], axis=1)[:, -self._n:]
        if both.size and float(both.min()) <= 0:  # no light (probe off): its log and band start again after it
            self._log_band.reset()
            both = both[:, int(np.flatnonzero((both <= 0).any(axis=0))[-1]) + 1:]
        self._log_band.push(np.log(both))

    def estimate(self, expected_period_s: float | None = None) -> Oximetry:
        """The window's estimate; expected_period_s: the heart's period from an ECG on the
        same board, if any (it settles which repeating period is the pulse's)."""
        # AC/DC sample by sample: the band of the log of the light (module docstring); none
        # before a full window, nor while one of its samples had no light (probe off).
        kept = self._log_band.window_and_band()
        if kept is None:
            return Oximetry(None, None, None, 0.0, None)
        log_light, ac = kept
        return self._figures(self._light, log_light, ac, expected_period_s)

    def estimate_window(self, red: np.ndarray, ir: np.ndarray, expected_period_s: float | None = None) -> Oximetry:
        """The estimate of one whole window of samples (each of the window's length), computed
        directly, the estimator's state neither read nor changed: what estimate() gives once
        that window has been pushed, frame by frame or at once (up to floating-point
        rounding). Raises ValueError for another length."""
        light = np.vstack([np.asarray(red, dtype=float), np.asarray(ir, dtype=float)])
        if light.shape[1] != self._n:
            raise ValueError("a window is %d samples, not %d" % (self._n, light.shape[1]))
        if float(light.min()) <= 0:  # no light: probe off
            return Oximetry(None, None, None, 0.0, None)
        log_light = np.log(light)
        return self._figures(light, log_light, self._design.reference(log_light), expected_period_s)

    def _figures(self, light_window: np.ndarray, log_light: np.ndarray, ac: np.ndarray,
                 expected_period_s: float | None) -> Oximetry:
        # The estimate from a window's light, its log and the log's band (each (2, window)).
        ac_r, ac_i = ac
        sq_r, sq_i = float(np.dot(ac_r, ac_r)), float(np.dot(ac_i, ac_i))
        if sq_r == 0 or sq_i == 0:
            return Oximetry(None, None, None, 0.0, None)
        rms_r, rms_i = np.sqrt(sq_r / len(ac_r)), np.sqrt(sq_i / len(ac_i))
        light = light_window.sum(axis=1) / light_window.shape[1]  # the means
        motion = _row_std(log_light - ac)
        figures = dict(light=(float(light[0]), float(light[1])), perfusion=(float(rms_r), float(rms_i)),
                       light_motion=(float(motion[0]), float(motion[1])))
        corr = max(0.0, float(np.dot(ac_r, ac_i) / np.sqrt(sq_r * sq_i)))
        period_s, pulse_q = pulse_period(ac_r / rms_r + ac_i / rms_i, self.fs, expected_period_s)
        rate = round(60.0 / float(period_s), 1) if period_s is not None and pulse_q >= MIN_PERIODICITY else None
        ratio = float(rms_r / rms_i)
        quality = min(corr, self._consistency(ac_r, ac_i))
        k = len(ac_i) // 20
        p5, p95 = np.partition(ac_i, [k, len(ac_i) - 1 - k])[[k, len(ac_i) - 1 - k]]
        pi = round(100.0 * float(p95 - p5), 2)
        if quality < MIN_QUALITY:
            return Oximetry(None, rate, pi, quality, ratio, pulse_q, **figures)
        spo2 = max(0.0, min(100.0, self.cal[0] - self.cal[1] * ratio))
        return Oximetry(round(spo2, 1), rate, pi, quality, ratio, pulse_q, **figures)

    def _consistency(self, ac_r: np.ndarray, ac_i: np.ndarray) -> float:
        # 1 - the standard deviation of log R over the window's SEGMENT_S stretches (0 when a
        # stretch has no pulse in one channel: nothing to compare).
        m = self._seg
        k = len(ac_r) // m
        if k < 2:
            return 1.0
        seg_r, seg_i = ac_r[:k * m].reshape(k, m), ac_i[:k * m].reshape(k, m)
        e_r, e_i = np.einsum("ij,ij->i", seg_r, seg_r), np.einsum("ij,ij->i", seg_i, seg_i)
        if float(e_r.min()) <= 0 or float(e_i.min()) <= 0:
            return 0.0
        return max(0.0, 1.0 - float(_row_std(0.5 * np.log(e_r / e_i))))
