# SpO2 relative to the sensor's placement (agent/vitals/spo2_relative.py): nothing shown while
# the placement's reference is taken, then the change from it through the sensor type's line;
# an expected error over the ceiling withholds; memory stays bounded however long the stream.
import math
from pathlib import Path

import numpy as np

from agent.vitals.spo2 import Oximetry, OximetryEstimator
from agent.vitals.spo2_relative import (
    BASELINE_S,
    FIGURES,
    QUALITY_FIGURES,
    SMOOTH_S,
    PlacementFigures,
    RelativeCalibration,
    RelativeOximetry,
)

DATA = Path(__file__).parent / "data"


def _calibration(error_pct: float = 2.0, motion_weight: float = 0.0) -> RelativeCalibration:
    # SpO2 = 97 + 40 x (change of log red light); expected error error_pct, plus motion_weight per
    # unit of the red light's log motion above -5.
    n = len(QUALITY_FIGURES)
    mean, coef = [0.0] * n, [0.0] * n + [error_pct]
    i = QUALITY_FIGURES.index("log_motion_red")
    mean[i], coef[i] = -5.0, motion_weight
    return RelativeCalibration(97.0, (0.0, 40.0, 0.0), tuple(mean), (1.0,) * n, tuple(coef), 4.0, 88.0)


def _second(red_light: float, motion: float = math.exp(-5.0)) -> Oximetry:
    return Oximetry(None, 70.0, 1.0, 0.95, 0.6, 0.9, light=(red_light, 500.0), perfusion=(0.01, 0.01),
                    light_motion=(motion, 0.005))


def test_nothing_is_shown_while_the_reference_is_taken_then_the_change_from_it() -> None:
    est = RelativeOximetry(_calibration())
    seen = []
    for t in range(1, 300):
        red = 1000.0 if t <= 120 else 1000.0 * math.exp(-0.25)  # the red light falls by 22 % at 120 s
        seen.append((t, est.observe(_second(red), float(t))))
    assert all(r.spo2_pct is None and r.expected_error_pct is None for t, r in seen if t <= BASELINE_S)
    at_rest = [r for t, r in seen if BASELINE_S < t <= 120]
    assert at_rest and all(r.spo2_pct == 97.0 and r.expected_error_pct == 2.0 for r in at_rest)
    assert all(r.below_90 is False for r in at_rest)
    # Once the 30 s median has the new light: 97 + 40 x (-0.25) = 87 %, under the threshold (88 %).
    settled = [r for t, r in seen if t > 120 + SMOOTH_S]
    assert all(r.spo2_pct == 87.0 and r.below_90 is True for r in settled)


def test_an_expected_error_over_the_ceiling_is_withheld_with_its_quality() -> None:
    est = RelativeOximetry(_calibration(motion_weight=1.0))
    for t in range(1, 100):
        r = est.observe(_second(1000.0), float(t))
    assert r.spo2_pct == 97.0 and r.quality == 0.75  # 1 - 2 / (2 x 4)
    r = est.observe(_second(1000.0, motion=math.exp(-2.0)), 100.0)  # the light moves: 2 + 3 = 5 % expected
    assert r.spo2_pct is None and r.below_90 is None and r.expected_error_pct == 5.0 and r.quality < 0.5


def test_a_placement_keeps_a_bounded_history_however_long() -> None:
    fig = PlacementFigures()
    for t in range(1, 5000):
        row = fig.observe(_second(1000.0 + t % 7), float(t))
    assert len(fig._recent) == SMOOTH_S and fig._reference_rows == []
    assert row.shape == (len(FIGURES),) and np.isfinite(row).all()


def test_the_estimator_gives_the_window_s_own_figures() -> None:
    rng = np.random.default_rng(4)
    t = np.arange(800) / 100
    pulse = np.sin(2 * np.pi * 1.2 * t)
    est = OximetryEstimator(100)
    est.push(50000 * (1 + 0.01 * pulse) + rng.normal(0, 5, 800), 80000 * (1 + 0.02 * pulse) * (1 + 0.01 * t))
    r = est.estimate()
    assert r.light is not None and abs(r.light[0] - 50000) < 50 and abs(r.light[1] / 80000 - 1.04) < 0.01
    assert r.perfusion is not None and abs(r.perfusion[0] / r.perfusion[1] - 0.5) < 0.05  # RMS of AC/DC
    # IR drifts by 8 % (slow: not its pulse band), red does not.
    assert r.light_motion is not None and r.light_motion[1] > 5 * r.light_motion[0]
    est.push([0] * 800, [0] * 800)
    assert est.estimate().light is None


def _half_way(t: np.ndarray, v: np.ndarray, after_s: float) -> float:
    # The first second past after_s at which v has made half its rise from its lowest (within
    # 30 s of after_s) to its highest after it.
    low = float(np.nanmin(v[(t >= after_s - 30) & (t <= after_s + 30)]))
    high = float(np.nanmax(v[t >= after_s]))
    return float(t[(t >= after_s - 30) & (v >= low + 0.5 * (high - low))][0])


def test_the_red_light_follows_a_real_reoxygenation_as_the_reference_oximeters_do() -> None:
    # Subject 100005's right hand on the phone camera (tests/agent/data/README.md), from 90 s
    # before the lowest SpO2 (68 %) of the study to two minutes after, when the gas is switched
    # back and SpO2 rises to 97 % within ~40 s. The relative red light (what moves the estimate
    # most) must make half its rise within 5 s of the reference oximeters making half theirs: a
    # median over 30 s (before) lagged them by 11 s here, one over 15 s by 3 s.
    rows = np.genfromtxt(DATA / "spo2-camera-100005-right-recovery.csv", delimiter=",", skip_header=1)
    rgb, ref = rows[:, :3], rows[::30, 3]
    est, fig = OximetryEstimator(30), PlacementFigures()
    seconds, red = [], []
    for k in range(len(rgb) // 30):
        est.push(rgb[k * 30:(k + 1) * 30, 0], rgb[k * 30:(k + 1) * 30, 2])  # red and blue pixels
        row = fig.observe(est.estimate(), float(k + 1))
        seconds.append(k + 1)
        red.append(row[FIGURES.index("rel_log_red")])
    t = np.array(seconds, dtype=float)
    t_ref = np.arange(1, len(ref) + 1, dtype=float)
    lowest_s = float(t_ref[int(np.nanargmin(ref))])
    assert lowest_s > BASELINE_S + SMOOTH_S  # the excerpt's reference is taken before the rise
    lag_s = _half_way(t, np.array(red), lowest_s) - _half_way(t_ref, ref, lowest_s)
    assert abs(lag_s) <= 5.0, lag_s
