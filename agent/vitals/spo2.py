"""SpO2, pulse rate, perfusion index and signal quality from red/IR PPG.

Ratio of ratios over a sliding window: for each wavelength the pulsatile
part (AC: the RMS of the 0.5-5 Hz band, times 2*sqrt(2) for a peak-to-peak
equivalent) over the steady part (DC: the window mean); R = (AC/DC)red /
(AC/DC)IR, mapped to SpO2 by the sensor type's calibration curve
SpO2 = A - B*R. Pulse rate from the IR pulse's autocorrelation. Perfusion
index = AC/DC of IR, in %. Signal quality: the correlation of the red and
IR pulses (one heart, one pulse: near 1 on a good signal, falling with
noise and motion). SpO2 is withheld (None) when that quality is under
MIN_QUALITY, and the pulse rate when the pulse does not repeat clearly
(autocorrelation under MIN_PERIODICITY): never guessed.

Memory: one window of samples per channel, whatever the stream's length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

# Calibration curves per sensor type (A, B in SpO2 = A - B * R). The
# MAX30102 entry is the textbook linear fit for 660/880 nm emitters; a
# deployed sensor type gets its own from a desaturation study.
CALIBRATION = {"max30102": (110.0, 25.0)}
WINDOW_S = 8.0
MIN_QUALITY = 0.9
MIN_PERIODICITY = 0.5


@dataclass
class Oximetry:
    spo2_pct: float | None
    pulse_rate_bpm: float | None
    perfusion_index_pct: float | None
    quality: float  # 0..1
    ratio: float | None


def _band(x: np.ndarray, fs: float, lo: float = 0.5, hi: float = 5.0) -> np.ndarray:
    spec = np.fft.rfft(x - x.mean())
    f = np.fft.rfftfreq(len(x), 1 / fs)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, len(x))


class OximetryEstimator:
    def __init__(self, rate_hz: float, sensor: str = "max30102", window_s: float = WINDOW_S) -> None:
        self.fs = float(rate_hz)
        self.cal = CALIBRATION[sensor]
        n = int(window_s * self.fs)
        self.red: deque[float] = deque(maxlen=n)
        self.ir: deque[float] = deque(maxlen=n)

    def push(self, red: list[int] | np.ndarray, ir: list[int] | np.ndarray) -> None:
        self.red.extend(float(v) for v in red)
        self.ir.extend(float(v) for v in ir)

    def estimate(self) -> Oximetry:
        if len(self.ir) < self.ir.maxlen:  # type: ignore[operator]
            return Oximetry(None, None, None, 0.0, None)
        red = np.array(self.red)
        ir = np.array(self.ir)
        dc_r, dc_i = red.mean(), ir.mean()
        if dc_r <= 0 or dc_i <= 0:  # no light: probe off
            return Oximetry(None, None, None, 0.0, None)
        ac_r, ac_i = _band(red, self.fs), _band(ir, self.fs)
        rms_r, rms_i = float(np.sqrt(np.mean(ac_r ** 2))), float(np.sqrt(np.mean(ac_i ** 2)))
        if rms_i == 0 or rms_r == 0:
            return Oximetry(None, None, None, 0.0, None)
        corr = float(np.dot(ac_r, ac_i) / (np.linalg.norm(ac_r) * np.linalg.norm(ac_i)))
        rate, periodicity = self._pulse_rate(ac_i)
        if periodicity < MIN_PERIODICITY:
            rate = None
        quality = max(0.0, corr)
        ratio = (rms_r / dc_r) / (rms_i / dc_i)
        pi = 100.0 * 2 * np.sqrt(2) * rms_i / dc_i
        if quality < MIN_QUALITY:
            return Oximetry(None, None, round(pi, 2), quality, ratio)
        spo2 = max(0.0, min(100.0, self.cal[0] - self.cal[1] * ratio))
        return Oximetry(round(spo2, 1), rate, round(pi, 2), quality, ratio)

    def _pulse_rate(self, ac: np.ndarray) -> tuple[float | None, float]:
        # The lag (40-220 bpm) at which the pulse best repeats itself.
        x = ac - ac.mean()
        full = np.correlate(x, x, mode="full")[len(x) - 1:]
        if full[0] <= 0:
            return None, 0.0
        full = full / full[0] * len(x) / (len(x) - np.arange(len(x)))  # unbiased: fewer terms at long lags
        lo, hi = int(self.fs * 60 / 220), int(self.fs * 60 / 40)
        seg = full[lo:hi]
        if not len(seg):
            return None, 0.0
        k = int(np.argmax(seg)) + lo
        return round(60.0 * self.fs / k, 1), float(full[k])
