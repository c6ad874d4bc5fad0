# SpO2 relative to the sensor's placement (agent/vitals/spo2_relative.py): nothing shown while
# the placement's reference is taken, then the change from it through the sensor type's line;
# an expected error over the ceiling withholds; memory stays bounded however long the stream.
import math

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
