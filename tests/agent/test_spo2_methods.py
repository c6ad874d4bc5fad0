# The desaturation bench's estimators compared (agent/dev/bench_spo2_methods.py), on windows
# made up here: a relative estimate removes an offset between people that no absolute line can,
# its baseline minute is withheld, and no subject's own reference takes part in its estimates.
from typing import Any

import numpy as np

from agent.dev import bench_spo2_methods as bm

SECONDS = 400


def _reference() -> np.ndarray:
    # At rest (97 %) for the first 90 s, then down to 70 % and back, as the study does.
    t = np.arange(1, SECONDS + 1, dtype=float)
    return np.where(t <= 90, 97.0, 97.0 - 27.0 * np.sin(np.pi * np.clip((t - 90) / (SECONDS - 90), 0, 1)))


def _windows(offsets: dict[str, float]) -> dict[str, Any]:
    # One recording per subject, one window a second; log R on the line SpO2 = 110 - 25 R
    # plus the subject's own offset (a person's skin, a finger's pressure); quality at random.
    ref = _reference()
    rng = np.random.default_rng(7)
    subjects = sorted(offsets)
    n = len(ref)
    ratio = np.concatenate([np.exp((110.0 - ref) / 25.0 + offsets[s]) for s in subjects])
    pair = {"ratio": ratio, "quality": rng.random(n * len(subjects))}
    return {"subject": np.repeat(subjects, n), "recording": np.repeat(subjects, n),
            "second": np.tile(np.arange(1, n + 1), len(subjects)), "ref_spo2": np.tile(ref, len(subjects)),
            "dc": np.full((n * len(subjects), 3), 50.0), "pairs": {p: dict(pair) for p in bm.CAMERA_PAIRS}}


# Not smoothed: the made-up SpO2 falls faster than a real one, and a 30 s median would lag it.
ABSOLUTE = bm.Method("absolute", ("logR:green/blue",), "product:green/blue", smooth=False)
RELATIVE = bm.Method("relative", ("logR:green/blue",), "product:green/blue", relative=True, smooth=False)
SMOOTHED = bm.Method("relative", ("logR:green/blue",), "product:green/blue", relative=True)
ABSOLUTE_RB = bm.Method("absolute", ("logR:red/blue",), "error_model", smooth=False)


def test_a_relative_estimate_removes_an_offset_between_people() -> None:
    w = _windows({"A": -0.2, "B": 0.0, "C": 0.25, "D": 0.1})
    c = bm.compare(w, (ABSOLUTE, RELATIVE), search=())
    absolute, relative = c["methods"]
    assert absolute["arms_shown_pct"] > 4.0, absolute
    assert relative["arms_shown_pct"] < 0.5, relative
    assert all(abs(b) < 0.5 for b in relative["bias_by_subject_pct"].values()), relative


def test_the_baseline_minute_is_withheld_and_counted() -> None:
    w = _windows({"A": 0.0, "B": 0.1, "C": -0.1})
    x, q, base = bm._inputs(w, RELATIVE, {})
    est, shown = bm._loso(x, q, w["ref_spo2"], base, w["subject"], np.ones(len(q), dtype=bool))
    assert not shown[w["second"] <= bm.BASELINE_S].any()
    # The gate withholds 20 % of the training windows in all, the baseline (60 of 400 s) among them.
    assert abs((1.0 - shown.mean()) - bm.WITHHELD_GOAL) < 0.02


def test_no_subject_s_own_reference_takes_part_in_its_estimates() -> None:
    w = _windows({"A": 0.0, "B": 0.1, "C": -0.1})
    for m in (ABSOLUTE, RELATIVE):
        x, q, base = bm._inputs(w, m, {})
        every = np.ones(len(q), dtype=bool)
        est, _ = bm._loso(x, q, w["ref_spo2"], base, w["subject"], every)
        moved = w["ref_spo2"].copy()
        in_c = w["subject"] == "C"
        moved[in_c] = 60.0  # C's reference, were it used, would pull C's own line down
        est2, _ = bm._loso(x, q, moved, base, w["subject"], every)
        assert np.allclose(est[in_c], est2[in_c]), m.label
        assert not np.allclose(est[~in_c], est2[~in_c]), m.label  # the others' fits did use it


def test_features_are_causal() -> None:
    # A feature at second k depends on the windows up to k only: changing what comes after
    # leaves it as it was.
    w = _windows({"A": 0.0, "B": 0.1})
    x1 = bm.features(w, SMOOTHED)
    w["pairs"]["green/blue"]["ratio"] = w["pairs"]["green/blue"]["ratio"].copy()
    later = (w["subject"] == "A") & (w["second"] > 200)
    w["pairs"]["green/blue"]["ratio"][later] *= 3.0
    x2 = bm.features(w, SMOOTHED)
    early = (w["subject"] == "A") & (w["second"] <= 200)
    assert np.allclose(x1[early], x2[early]) and not np.allclose(x1[later], x2[later])


def test_an_anchored_estimate_reads_no_subject_s_own_reference_either() -> None:
    # The rest level read by the absolute line: in C's fold neither C's line nor the other
    # subjects' anchors may have seen C's reference.
    m = bm.Method("anchored", ("logR:green/blue",), "product:green/blue", relative=True, smooth=False,
                  anchor="green/blue")
    w = _windows({"A": 0.0, "B": 0.1, "C": -0.1, "D": 0.05})
    x, q, base = bm._inputs(w, m, {})
    est, shown = bm._loso_anchored(w, m, x, q, base, {})
    assert shown.any() and np.isfinite(est[shown]).all()
    in_c = w["subject"] == "C"
    w2 = dict(w, ref_spo2=np.where(in_c, 60.0, w["ref_spo2"]))
    est2, _ = bm._loso_anchored(w2, m, x, q, base, {})
    assert np.allclose(est[in_c], est2[in_c])
    assert not np.allclose(est[~in_c], est2[~in_c])


def _light(red_pulse: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    # 8 s of camera light at 30 frames/s (R, G, B), a 72 /min pulse in each, plus white noise.
    t = np.arange(240) / 30.0
    pulse = np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 2.4 * t)
    out = np.column_stack([100 * (1 + red_pulse * pulse), 80 * (1 + 0.01 * pulse), 60 * (1 + 0.008 * pulse)])
    return out * (1 + noise * rng.standard_normal(out.shape))


def test_signal_indices_tell_a_clean_pulse_from_noise_and_a_steady_ratio_from_a_moving_one() -> None:
    rng = np.random.default_rng(3)
    indices = bm.SignalIndices(30)
    snr_clean, spread_clean, _, _ = indices(_light(np.full(240, 0.01), 0.0, rng))
    snr_noisy, _, _, _ = indices(_light(np.full(240, 0.01), 0.03, rng))
    assert snr_clean.min() > 0.9 and snr_noisy.max() < 0.5, (snr_clean, snr_noisy)
    assert spread_clean["red/blue"] < 0.02, spread_clean
    # The red pulse doubles halfway: R is no longer one number across the beats.
    _, spread_moving, _, _ = indices(_light(np.where(np.arange(240) < 120, 0.01, 0.02), 0.0, rng))
    assert spread_moving["red/blue"] > 0.2 and spread_moving["green/blue"] < 0.02, spread_moving


def _noisy_windows() -> tuple[dict[str, Any], np.ndarray]:
    # The made-up windows with the signal figures the learnt quality reads; in a random third of
    # them the light moves (log_motion high) and R is off by noise: those are the wrong ones.
    w = _windows({"A": 0.0, "B": 0.05, "C": -0.05, "D": 0.02})
    n = len(w["ref_spo2"])
    rng = np.random.default_rng(5)
    moving = rng.random(n) < 1 / 3
    w["pairs"]["red/blue"] = {"ratio": w["pairs"]["red/blue"]["ratio"] * np.exp(np.where(moving, 0.3, 0.0)
                                                                              * rng.standard_normal(n)),
                              "quality": np.ones(n)}
    w["perfusion"] = np.full((n, 3), 0.01)
    w["light_motion"] = np.where(moving, 0.05, 0.005)[:, None] * np.ones((1, 3))
    w["snr"], w["beat_spread"] = np.ones((n, 3)), {p: np.zeros(n) for p in bm.CAMERA_PAIRS}
    w["pulse"] = {"quality": np.ones(n), "rate": np.full(n, 70.0)}
    return w, moving


def test_the_learnt_quality_predicts_error_and_withholds_the_wrong_windows() -> None:
    w, moving = _noisy_windows()
    est, shown, predicted = bm._loso_error_model(w, ABSOLUTE_RB, {}, (bm.SIGNAL,))
    err = np.abs(est - w["ref_spo2"])
    assert np.median(predicted[moving]) > 2 * np.median(predicted[~moving])
    assert np.sqrt(np.mean(err[shown] ** 2)) < 0.5 * np.sqrt(np.mean(err[~shown] ** 2))
    assert abs((1.0 - shown.mean()) - bm.WITHHELD_GOAL) < 0.05


def test_the_learnt_quality_reads_no_subject_s_own_reference() -> None:
    w, _ = _noisy_windows()
    est, shown, predicted = bm._loso_error_model(w, ABSOLUTE_RB, {}, (bm.SIGNAL,))
    in_c = w["subject"] == "C"
    w2 = dict(w, ref_spo2=np.where(in_c, 60.0, w["ref_spo2"]))
    est2, shown2, predicted2 = bm._loso_error_model(w2, ABSOLUTE_RB, {}, (bm.SIGNAL,))
    assert np.allclose(est[in_c], est2[in_c]) and np.allclose(predicted[in_c], predicted2[in_c])
    assert (shown[in_c] == shown2[in_c]).all()
    assert not np.allclose(predicted[~in_c], predicted2[~in_c])  # the others' error models did use it


def test_the_estimator_chosen_with_a_learnt_quality_reads_no_subject_s_own_reference() -> None:
    w, _ = _noisy_windows()
    relative = bm.Method("relative", ("logR:red/blue",), "error_model", relative=True, smooth=False)
    candidates = ((ABSOLUTE_RB, (bm.SIGNAL,)), (relative, (bm.SIGNAL,)), (relative, (bm.SIGNAL, bm.DISTANCE)))
    est, shown, predicted, chosen = bm._choose_learnt(w, candidates)
    in_c = w["subject"] == "C"
    w2 = dict(w, ref_spo2=np.where(in_c, 60.0, w["ref_spo2"]))
    est2, shown2, predicted2, chosen2 = bm._choose_learnt(w2, candidates)
    assert chosen["C"] == chosen2["C"]
    assert np.allclose(est[in_c], est2[in_c]) and np.allclose(predicted[in_c], predicted2[in_c])
    assert (shown[in_c] == shown2[in_c]).all() and shown[in_c].any()
    assert not np.allclose(est[~in_c], est2[~in_c])  # the others' lines did use it


def _relative_figures(w: dict[str, Any], moving: np.ndarray) -> np.ndarray:
    # Rows of the agent's FIGURES for the made-up windows: log R from rest as the relative
    # feature (the lights steady), the quality figures saying which windows move.
    from agent.vitals.spo2_relative import FIGURES

    rows = np.zeros((len(w["ref_spo2"]), len(FIGURES)))
    log_r = np.log(w["pairs"]["red/blue"]["ratio"])
    for s in set(w["subject"].tolist()):
        mine = w["subject"] == s
        rows[mine, 0] = log_r[mine] - np.median(log_r[mine & (w["second"] <= bm.BASELINE_S)])
    rows[:, FIGURES.index("log_motion_red")] = np.where(moving, np.log(0.05), np.log(0.005))
    rows[:, FIGURES.index("distance_log_ratio")] = np.abs(rows[:, 0])
    rows[w["second"] <= bm.BASELINE_S] = np.nan  # the reference minute: nothing to show
    return rows


def test_the_relative_calibration_s_fold_reads_no_subject_s_own_reference() -> None:
    w, moving = _noisy_windows()
    w["relative_figures"] = _relative_figures(w, moving)
    in_c = w["subject"] == "C"
    cal = bm.fit_relative_calibration(w["relative_figures"], w["ref_spo2"], w["subject"], ~in_c)
    w2 = dict(w, ref_spo2=np.where(in_c, 60.0, w["ref_spo2"]))
    assert cal == bm.fit_relative_calibration(w2["relative_figures"], w2["ref_spo2"], w2["subject"], ~in_c)
    assert cal != bm.fit_relative_calibration(w2["relative_figures"], w2["ref_spo2"], w2["subject"], ~(
        w["subject"] == "A"))  # a fold that trains on C does read it


def test_the_relative_estimator_withholds_the_moving_windows_and_its_threshold_undoes_the_pull_to_the_mean() -> None:
    # With R noisy in a third of the windows (the light moving), a least-squares line reads high
    # SpO2 low and low SpO2 high (towards the mean): "estimate < 90" calls too many windows low.
    # The fold's threshold, from the training subjects' held-out estimates, sits under 90 and
    # balances the decision; the expected error withholds the moving windows.
    w, moving = _noisy_windows()
    w["relative_figures"] = _relative_figures(w, moving)
    t = bm.two_wavelength(w)
    assert all(v < 90.0 for v in t["decision_threshold_pct"]), t["decision_threshold_pct"]
    assert abs(t["below_90_at_threshold_sensitivity"] - t["below_90_at_threshold_specificity"]) < abs(
        t["below_90_sensitivity"] - t["below_90_specificity"]), t
    assert t["arms_best_quality_half_pct"] < 0.5 * t["arms_worst_quality_half_pct"], t
    assert abs(t["withheld_fraction"] - bm.WITHHELD_GOAL) < 0.05, t
    lines = bm.report_two_wavelength(t)
    assert "goals:" in lines[-1] and lines[-1].count("met") == 5, lines[-1]


def test_arms_interval_resamples_people_not_windows() -> None:
    # Four subjects of 300 shown windows each, errors of +-2 % in every window: whichever
    # people are drawn, Arms is 2 %. One reading 8 % high instead: Arms over all is sqrt(19) =
    # 4.36 %, and a new cohort of four may hold no such person (2 %) or two and more (over 5 %).
    subject = np.repeat(["A", "B", "C", "D"], 300)
    err = np.where(np.arange(1200) % 2 == 0, 2.0, -2.0)
    shown = np.ones(1200, dtype=bool)
    assert bm.subject_bootstrap_arms(err, shown, subject) == (2.0, 2.0)
    offset = err + np.where(subject == "D", 8.0, 0.0) - np.where(subject == "D", err, 0.0)
    interval = bm.subject_bootstrap_arms(offset, shown, subject)
    assert interval is not None and interval[0] == 2.0 and interval[1] > 5.0, interval
    # The windows withheld take no part; nothing shown, no interval.
    assert bm.subject_bootstrap_arms(offset, shown & (subject != "D"), subject) == (2.0, 2.0)
    assert bm.subject_bootstrap_arms(err, np.zeros(1200, dtype=bool), subject) is None
