"""SpO2 relative to the sensor's placement, with a quality learnt from the signal.

On real desaturations (the camera set, `./run bench vitals`) an absolute ratio of
ratios reads each person with an offset of their own (-9 to +5 %); what moves
with SpO2 within a placement moves more alike between people. This estimator
takes the sensor's own figures at the start of a placement as its reference:

- each second, from the SpO2 estimator's window (agent.vitals.spo2): log R (the
  ratio of ratios), the log of the mean red light and of the mean IR light
  (deoxygenated haemoglobin absorbs red: the red light falls as SpO2 falls);
- each feature smoothed: the median of its last SMOOTH_S values;
- the placement's reference: each smoothed feature's median over its first
  BASELINE_S seconds, during which nothing is shown (the patient at rest);
- SpO2 = the calibration's SpO2 at rest + slopes . (smoothed - reference).

Its quality is the error it expects: |error| regressed, in the sensor type's
calibration, on figures each second gives of itself (QUALITY_FIGURES: the red/IR
pulse correlation and R's consistency, the pulse's periodicity, each channel's
perfusion and slow light motion, the stability of log R and of the red light over
SMOOTH_S, how far each feature has moved from the reference). An estimate whose
expected error is over the calibration's ceiling is withheld. The SpO2 < 90 %
decision has its own threshold on the estimate (a least-squares line reads low
SpO2 high and high SpO2 low).

A sensor type's RelativeCalibration comes from a desaturation study, fitted
leave one subject out as agent/dev/bench_spo2_methods.py does (README: "SpO2
calibration of a sensor type"); none is fitted per patient. The SpO2 at rest is
the study's; a patient whose SpO2 at rest is not (chronic hypoxaemia) reads wrong
by the difference, and a sensor placed during a desaturation reads high for the
whole placement: the README says so.

Memory: SMOOTH_S seconds of features and BASELINE_S of the reference's, per
placement.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from agent.vitals.spo2 import Oximetry

BASELINE_S = 60.0  # the placement's reference: its first minute, nothing shown then
# Features: the median of the last 15 one-second values. The camera's red light leads the
# reference oximeters by 6-12 s at a re-oxygenation; a 15 s median (its lag ~7 s) lands
# within a few seconds of them, a 30 s median (the value before) ~9 s behind (median of the
# twelve recordings; tests/agent/test_spo2_relative.py on one). Chosen after looking at the
# desaturation set's figures (10, 15, 20, 30, 45 s tried; README, "SpO2 on real desaturations").
SMOOTH_S = 15
FEATURES = ("log_ratio", "log_red", "log_ir")
QUALITY_FIGURES = ("quality", "pulse_quality", "log_perfusion_red", "log_perfusion_ir", "log_motion_red",
                   "log_motion_ir", "sd_log_ratio", "sd_log_red") + tuple("distance_" + f for f in FEATURES)
FIGURES = tuple("rel_" + f for f in FEATURES) + QUALITY_FIGURES  # one row a second, in this order


@dataclass(frozen=True)
class RelativeCalibration:
    """A sensor type's relative SpO2 line and learnt quality (module docstring).
    rest_spo2_pct: SpO2 at the placement's reference; slopes: % per unit of each of
    FEATURES' change; error_*: the expected |error| (%) = error_coef . [(q - error_mean) /
    error_scale, 1] over QUALITY_FIGURES q; shown when it is at most error_ceiling_pct;
    below_90_threshold_pct: the estimate under which SpO2 < 90 % is decided."""

    rest_spo2_pct: float
    slopes: tuple[float, ...]
    error_mean: tuple[float, ...]
    error_scale: tuple[float, ...]
    error_coef: tuple[float, ...]
    error_ceiling_pct: float
    below_90_threshold_pct: float


@dataclass(frozen=True)
class RelativeEstimate:
    spo2_pct: float | None  # None: withheld (the reference being taken, or an expected error over the ceiling)
    expected_error_pct: float | None  # the learnt quality: the |error| expected (None while the reference is taken)
    quality: float  # 0..1: 1 - expected error / (2 x the ceiling), so the gate is quality 0.5
    below_90: bool | None  # the SpO2 < 90 % decision (None when withheld)


def estimate(cal: RelativeCalibration, figures: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SpO2 (%), expected |error| (%) and shown (bool) for rows of FIGURES, (n, len(FIGURES)).
    NaN / NaN / False where a figure is missing (the reference being taken)."""
    f = np.atleast_2d(np.asarray(figures, dtype=float))
    k = len(FEATURES)
    ok = np.isfinite(f).all(axis=1)
    x, q = np.nan_to_num(f[:, :k]), np.nan_to_num(f[:, k:])
    spo2 = np.clip(cal.rest_spo2_pct + x @ np.asarray(cal.slopes), 0.0, 100.0)
    z = (q - np.asarray(cal.error_mean)) / np.asarray(cal.error_scale)
    coef = np.asarray(cal.error_coef)
    err = z @ coef[:-1] + coef[-1]
    spo2, err = np.where(ok, spo2, np.nan), np.where(ok, err, np.nan)
    return spo2, err, ok & (err <= cal.error_ceiling_pct)


# Sensor types with a relative calibration (the engine uses it instead of the absolute line).
# None yet: the only one fitted is the camera set's (red and blue of a phone camera, bench
# vitals), and a MAX30102 needs a desaturation study of its own (README).
RELATIVE_CALIBRATION: dict[str, RelativeCalibration] = {}


class PlacementFigures:
    """FIGURES for each second of one placement, from the SpO2 estimator's Oximetry of the
    window ending then. A new placement (the sensor put on again, a stream restarted) needs a
    new PlacementFigures: the reference is its first BASELINE_S."""

    def __init__(self) -> None:
        self._recent: deque[tuple[float, float, float]] = deque(maxlen=SMOOTH_S)
        self._reference_rows: list[np.ndarray] = []  # smoothed features in the first BASELINE_S (bounded by it)
        self.reference: np.ndarray | None = None

    def observe(self, ox: Oximetry, elapsed_s: float) -> np.ndarray:
        """The second's FIGURES (NaN where not to be had: relative features while the reference is
        taken, figures of a window without light). elapsed_s: seconds since the placement began."""
        nan = float("nan")
        light, perf, motion = ox.light, ox.perfusion, ox.light_motion
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = (float(np.log(ox.ratio)) if ox.ratio else nan,
                   float(np.log(light[0])) if light else nan, float(np.log(light[1])) if light else nan)
        self._recent.append(raw)
        recent = np.array(self._recent)
        with np.errstate(all="ignore"):
            smooth = np.array([np.nanmedian(c) if np.isfinite(c).any() else nan for c in recent.T])
            sd = [float(np.nanstd(c)) if np.isfinite(c).any() else nan for c in recent.T[:2]]
        if elapsed_s <= BASELINE_S:
            if np.isfinite(smooth).any():
                self._reference_rows.append(smooth)
            rel = np.full(len(FEATURES), nan)
        else:
            if self.reference is None and self._reference_rows:
                with np.errstate(all="ignore"):
                    self.reference = np.nanmedian(np.array(self._reference_rows), axis=0)
                self._reference_rows = []
            rel = smooth - self.reference if self.reference is not None else np.full(len(FEATURES), nan)
        with np.errstate(divide="ignore"):
            logs = [float(np.log(v)) if v > 0 else nan for v in (*(perf or (nan, nan)), *(motion or (nan, nan)))]
        return np.array([*rel, ox.quality, ox.pulse_quality, *logs, *sd, *np.abs(rel)])


class RelativeOximetry:
    """One placement's relative SpO2 (module docstring): each second's Oximetry in, the
    calibration's estimate out."""

    def __init__(self, cal: RelativeCalibration) -> None:
        self.cal = cal
        self.figures = PlacementFigures()

    def observe(self, ox: Oximetry, elapsed_s: float) -> RelativeEstimate:
        spo2, err, shown = estimate(self.cal, self.figures.observe(ox, elapsed_s))
        if not np.isfinite(err[0]):
            return RelativeEstimate(None, None, 0.0, None)
        e = float(err[0])
        quality = max(0.0, min(1.0, 1.0 - e / (2.0 * self.cal.error_ceiling_pct)))
        if not shown[0]:
            return RelativeEstimate(None, round(e, 2), quality, None)
        value = round(float(spo2[0]), 1)
        return RelativeEstimate(value, round(e, 2), quality, value < self.cal.below_90_threshold_pct)
