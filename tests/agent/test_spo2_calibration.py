# The desaturation bench's calibration of a sensor type, on windows made up here: every choice
# and fit of a fold is made without the subject it scores (leave one subject out), and the
# < 90 % decision scored is the agent's own alert rule.
from typing import Any

import numpy as np

from agent.dev.bench_vitals import _alert_active, leave_one_subject_out

PAIRS = ("red/green", "green/blue")


def _windows(per_subject: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], ref: np.ndarray) -> dict[str, Any]:
    # per_subject: subject -> pair -> (ratio, quality) over the windows whose reference is ref.
    subjects = sorted(per_subject)
    n = len(ref)
    w: dict[str, Any] = {"subject": np.repeat(subjects, n), "ref_spo2": np.tile(ref, len(subjects)),
                         "recording": np.repeat(subjects, n), "second": np.tile(np.arange(n), len(subjects)),
                         "pairs": {}}
    for p in PAIRS:
        w["pairs"][p] = {"ratio": np.concatenate([per_subject[s][p][0] for s in subjects]),
                         "quality": np.concatenate([per_subject[s][p][1] for s in subjects])}
    return w


def test_the_pair_is_chosen_without_the_subject_scored() -> None:
    rng = np.random.default_rng(5)
    ref = np.linspace(70.0, 100.0, 120)
    line = (110.0 - ref) / 25.0  # R on the calibration line SpO2 = 110 - 25 R
    good_q = np.ones(len(ref))
    noise = lambda: 0.8 + 0.3 * rng.random(len(ref))  # noqa: E731  (a ratio that says nothing)
    # green/blue follows one line on A and B; red/green only on C, where it is exact and
    # green/blue is far off the line (it would read ~35 %): were C's own windows part of the
    # choice, red/green would win there.
    w = _windows({"A": {"green/blue": (line + rng.normal(0, 0.01, len(ref)), good_q), "red/green": (noise(), good_q)},
                  "B": {"green/blue": (line + rng.normal(0, 0.01, len(ref)), good_q), "red/green": (noise(), good_q)},
                  "C": {"green/blue": (3.0 + rng.normal(0, 0.01, len(ref)), good_q), "red/green": (line, good_q)}}, ref)
    fold = leave_one_subject_out(w, PAIRS)
    in_c = w["subject"] == "C"
    assert set(fold["pair"][in_c]) == {"green/blue"}


def test_the_quality_gate_is_set_on_the_others() -> None:
    ref = np.linspace(70.0, 100.0, 100)
    line = (110.0 - ref) / 25.0
    q_hi = np.linspace(0.9, 1.0, len(ref))
    q_lo = np.full(len(ref), 0.5)  # C's signal is poorer than anything the others showed
    w = _windows({s: {p: (line, q_lo if s == "C" else q_hi) for p in PAIRS} for s in "ABC"}, ref)
    fold = leave_one_subject_out(w, ("green/blue",))
    in_c = w["subject"] == "C"
    assert not fold["shown"][in_c].any()
    # A's gate comes from B (0.9-1.0) and C (0.5): the 20 % quantile falls among C's windows,
    # so all of A is shown, each estimate on the line.
    in_a = w["subject"] == "A"
    assert fold["shown"][in_a].all()
    assert np.allclose(fold["estimate"][in_a], ref, atol=0.01)


def test_the_decision_scored_is_the_alert_rule_with_its_hysteresis() -> None:
    # One recording, one estimate a second: 85 % for 60 s (raised after 30 s), 91 % for 40 s
    # (still raised: it clears only at >= 92 %), 95 % for 40 s (cleared after 30 s), with the
    # middle of the 85 % stretch withheld (the rule's state holds through it).
    est = np.array([85.0] * 60 + [91.0] * 40 + [95.0] * 40)
    shown = np.ones(len(est), dtype=bool)
    shown[40:45] = False
    w = {"recording": np.array(["r"] * len(est)), "second": np.arange(len(est))}
    active = _alert_active(w, est, shown)
    assert not active[:30].any() and active[30:130].all() and not active[130:].any()
