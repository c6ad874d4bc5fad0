"""`pulsebridge-dev bench vitals`: the vitals against references, and their CPU cost.

- R-peak detection accuracy on MIT-BIH record 100 (below).
- SpO2 on PPG synthesised through the calibration curve (spo2_error), and on real
  desaturations (desaturation: the spo2-camera set beside the repository, leave one subject
  out: a sensor type's calibration made on five subjects, scored on the sixth), with other
  transparent estimators compared on it (bench_spo2_methods).
- Pulse rate on real PPG (the camera set against its oximeters; a103l against its ECG) with
  the share of harmonic errors (a third, half, twice or three times the true rate).
- The vitals engine's CPU time per board-second.

Our streaming detector (agent/vitals/rpeak.py) and an established one,
wfdb's XQRS, run side by side in the same run on the same signal, scored
against the record's reference beat annotations with a 150 ms matching
window (sensitivity and positive predictivity, as in the ANSI/AAMI EC57
practice). Also on the signal resampled to 512 Hz, as a MAX30003 board
sends it.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.dev.sim import waveforms
from agent.vitals.rpeak import detect

BEAT_SYMBOLS = set("NLRBAaJSVrFejnE/fQ?")
MATCH_WINDOW_S = 0.150


def _score(ref: np.ndarray, test: np.ndarray, fs: float, sig: np.ndarray) -> dict[str, float]:
    import wfdb.processing as wp

    c = wp.compare_annotations(ref, test, int(round(MATCH_WINDOW_S * fs)), sig)
    return {"sensitivity": float(c.sensitivity), "positive_predictivity": float(c.positive_predictivity),
            "tp": int(c.tp), "fp": int(c.fp), "fn": int(c.fn)}


def run(part: str = "all") -> dict[str, Any]:
    """Every figure (part "all"), or the desaturation set's alone (part "desaturation": the
    agent's relative estimator and the absolute line, leave one subject out, and the pulse rate
    on the camera set; without the comparison of estimators, to iterate fast)."""
    if part == "desaturation":
        return {"desaturation": desaturation(compare=False)}
    import wfdb
    import wfdb.processing as wp

    base = str(waveforms.data_dir() / waveforms.ECG_RECORD)
    rec = wfdb.rdrecord(base, channel_names=["MLII"])
    fs = float(rec.fs)
    sig = rec.p_signal[:, 0]
    ann = wfdb.rdann(base, "atr")
    ref = np.array([s for s, sym in zip(ann.sample, ann.symbol) if sym in BEAT_SYMBOLS])
    out: dict[str, Any] = {"record": "MIT-BIH 100 (MLII)", "reference_beats": int(len(ref)),
                           "match_window_ms": MATCH_WINDOW_S * 1000}
    t = time.perf_counter()
    ours = np.array(sorted(set(detect(sig, fs))))
    out["pulsebridge_360hz"] = dict(_score(ref, ours, fs, sig), seconds=round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    xq = wp.xqrs_detect(sig, fs=fs, verbose=False)
    out["wfdb_xqrs_360hz"] = dict(_score(ref, np.array(xq), fs, sig), seconds=round(time.perf_counter() - t, 2))
    # As a board sends it: 512 Hz.
    fs2 = 512.0
    t360 = np.arange(len(sig)) / fs
    t512 = np.arange(0, t360[-1], 1 / fs2)
    sig2 = np.interp(t512, t360, sig)
    ref2 = np.round(ref * fs2 / fs).astype(int)
    ours2 = np.array(sorted(set(detect(sig2, fs2))))
    out["pulsebridge_512hz"] = _score(ref2, ours2, fs2, sig2)
    xq2 = wp.xqrs_detect(sig2, fs=fs2, verbose=False)
    out["wfdb_xqrs_512hz"] = _score(ref2, np.array(xq2), fs2, sig2)
    out["spo2"] = spo2_error()
    out["desaturation"] = desaturation()
    out["pulse_rate_a103l"] = pulse_rate_a103l()
    out["vitals_cpu"] = vitals_cpu()
    return out


def report(r: dict[str, Any]) -> list[str]:
    if "record" not in r:  # the desaturation set alone
        return _report_real(r)
    lines = ["R-peak detection, %s, %d reference beats, %.0f ms matching window" % (
        r["record"], r["reference_beats"], r["match_window_ms"])]
    for k in ("pulsebridge_360hz", "wfdb_xqrs_360hz", "pulsebridge_512hz", "wfdb_xqrs_512hz"):
        s = r[k]
        lines.append("  %-18s sensitivity %.2f %%  positive predictivity %.2f %%  (TP %d, FP %d, FN %d)" % (
            k, 100 * s["sensitivity"], 100 * s["positive_predictivity"], s["tp"], s["fp"], s["fn"]))
    sp = r.get("spo2")
    if sp:
        lines.append("SpO2 on synthesised PPG (a103l PLETH, SpO2 70-100 %%, %d s windows, one estimate a second)"
                     % sp["window_s"])
        for c in sp["cases"]:
            if c["withheld"] == c["estimates"]:
                lines.append("  noise %.2f %% of DC: every estimate withheld (quality too low), %d of %d" % (
                    c["noise_pct_of_dc"], c["withheld"], c["estimates"]))
                continue
            lines.append("  noise %.2f %% of DC: mean |error| %.2f %%, RMS %.2f %%, max %.2f %%; withheld %d of %d" % (
                c["noise_pct_of_dc"], c["mean_abs_error_pct"], c["rms_error_pct"], c["max_abs_error_pct"],
                c["withheld"], c["estimates"]))
    lines += _report_real(r)
    return lines


def _report_real(r: dict[str, Any]) -> list[str]:
    lines = []
    d = r.get("desaturation") or {}
    if "missing" in d:
        lines.append("SpO2 on real desaturations: the set is not at %s (set $%s)" % (d["missing"], CAMERA_ENV))
    elif d:
        lines.append("SpO2 on real desaturations (spo2-camera: %d subjects x 2 hands, camera PPG, reference oximeters; "
                     "%d estimates, 8 s windows, one a second), leave one subject out (pair, gate and line fitted "
                     "without the subject scored; the pair by an inner leave-one-subject-out), gate withholding %d %% "
                     "of the training windows" % (d["subjects"], d["estimates"], 100 * WITHHELD_GOAL))
        for label, c in d["by_choice"].items():
            dec = ", ".join("%s %s" % (k, v) for k, v in c["arms_by_decade_pct"].items())
            lines.append("  %-20s (%s): Arms %s %% shown, %.1f %% withheld; per decade: %s" % (
                label, ", ".join(c["pairs_chosen"]), c["arms_shown_pct"], 100 * c["withheld_fraction"], dec))
            lines.append("  %-20s  MAE %s %% shown; Arms by quality: best half %s %%, worst half %s %%, "
                         "withheld %s %%" % ("", c["mean_abs_error_shown_pct"], c["arms_best_quality_half_pct"],
                                             c["arms_worst_quality_half_pct"], c["arms_withheld_pct"]))
            lines.append("  %-20s  SpO2 < 90 %%: shown estimate < 90 %%: sensitivity %.1f %%, specificity %.1f %%; "
                         "the alert rule (< 90 %% for 30 s, clears at >= 92 %%), every window: sensitivity %.1f %%, "
                         "specificity %.1f %%" % ("", 100 * (c["below_90_sensitivity"] or 0),
                                                 100 * (c["below_90_specificity"] or 0),
                                                 100 * (c["alert_rule_sensitivity"] or 0),
                                                 100 * (c["alert_rule_specificity"] or 0)))
            lines.append("  %-20s  mean error per left-out subject: %s" % (
                "", ", ".join("%s %s" % (k, "all withheld" if v is None else "%+.1f" % v)
                              for k, v in c["bias_by_subject_pct"].items())))
            met = (c["arms_shown_pct"] is not None and c["arms_shown_pct"] <= 5.0
                   and c["withheld_fraction"] <= WITHHELD_GOAL
                   and (c["below_90_sensitivity"] or 0) >= 0.81 and (c["below_90_specificity"] or 0) >= 0.79)
            lines.append("  %-20s  goals (Arms <= 5 %% with <= 20 %% withheld; < 90 %%: sensitivity >= 81 %%, "
                         "specificity >= 79 %%): %s" % ("", "met" if met else "NOT met"))
        from agent.dev import bench_spo2_methods

        if "estimators" in d:
            lines += bench_spo2_methods.report(d["estimators"])
        lines += bench_spo2_methods.report_two_wavelength(d["relative"])
        p = d["pulse_rate"]
        lines.append("Pulse rate on real PPG, spo2-camera vs the oximeters: %.1f %% shown, MAE %s /min, RMS %s /min, "
                     "harmonic errors %d (share %.2f %%)" % (100 * p["shown_fraction"], p["mean_abs_error_bpm"],
                                                             p["rms_error_bpm"], p["harmonic_errors"],
                                                             100 * (p["harmonic_share"] or 0)))
    a = r.get("pulse_rate_a103l")
    if a:
        lines.append("Pulse rate on real PPG, a103l PLETH vs its ECG (~128 /min): %.1f %% shown, MAE %s /min, RMS %s "
                     "/min, harmonic errors %d (share %.2f %%)" % (100 * a["shown_fraction"], a["mean_abs_error_bpm"],
                                                                 a["rms_error_bpm"], a["harmonic_errors"],
                                                                 100 * (a["harmonic_share"] or 0)))
    c = r.get("vitals_cpu")
    if c:
        lines.append("Vitals CPU (one board: ECG 512 Hz + PPG 100 Hz, 1 s frames, %d s): %.3f ms per board-second; "
                     "20 boards: %.2f %% of one core" % (c["board_seconds"], c["cpu_ms_per_board_second"],
                                                          c["core_pct_for_20_boards"]))
    return lines


def spo2_error() -> dict[str, Any]:
    """SpO2 error on PPG synthesised from a103l's PLETH (as the simulated MAX30102
    sees it: 100 Hz, 7 mA LEDs, 18-bit codes) for SpO2 70-100 % and noise levels."""
    import wfdb

    from agent.vitals.spo2 import OximetryEstimator

    rec = wfdb.rdrecord(str(waveforms.data_dir() / waveforms.PPG_RECORD), channel_names=["PLETH"])
    fs_src = float(rec.fs)
    pleth = rec.p_signal[:, 0]
    rng = np.random.default_rng(11)
    out: dict[str, Any] = {"window_s": 8, "noise_levels_pct_of_dc": [0.0, 0.05, 0.2, 1.0], "cases": []}
    for noise in out["noise_levels_pct_of_dc"]:
        errs, withheld, total = [], 0, 0
        for spo2 in range(70, 101, 5):
            both = waveforms.synthesise_ppg(pleth, float(spo2))
            t = np.arange(len(both)) / fs_src
            t100 = np.arange(0, t[-1], 1 / 100)
            codes = [np.interp(t100, t, both[:, c]) * 7 * 262144 / (16384 * 1000) for c in (0, 1)]
            codes = [c + rng.normal(0, noise / 100 * c.mean(), len(c)) for c in codes]
            est = OximetryEstimator(100)
            for i in range(0, len(t100) - 100, 100):  # one estimate a second, once the window is full
                est.push(codes[0][i:i + 100], codes[1][i:i + 100])
                if i < 800:
                    continue
                r = est.estimate()
                total += 1
                if r.spo2_pct is None:
                    withheld += 1
                else:
                    errs.append(r.spo2_pct - spo2)
        e = np.array(errs)
        out["cases"].append({"noise_pct_of_dc": noise, "estimates": total, "withheld": withheld,
                             "mean_abs_error_pct": float(np.mean(np.abs(e))) if errs else None,
                             "rms_error_pct": float(np.sqrt(np.mean(e ** 2))) if errs else None,
                             "max_abs_error_pct": float(np.max(np.abs(e))) if errs else None})
    return out


# --- SpO2 and pulse rate on real desaturations (../shared/data/spo2-camera, see its README) ---

CAMERA_ENV = "PULSEBRIDGE_SPO2_CAMERA"
CAMERA_FS = 30  # frames/s
CAMERA_PAIRS = {"red/blue": (0, 2), "red/green": (0, 1), "green/blue": (1, 2)}  # (first, second) of R,G,B
REFERENCE_OXIMETERS = ("2", "4", "5")  # Nellcor N-600X x2, Masimo Radical-7 (column 3 is unfilled, 1 an older one)
WITHHELD_GOAL = 0.20  # the share of estimates a sensor type's gate may withhold
DECADES = ((70.0, 80.0), (80.0, 90.0), (90.0, 100.01))
HARMONICS = (1 / 3, 1 / 2, 2.0, 3.0)  # an estimate at one of these times the truth is a harmonic error


def camera_dir() -> Path:
    """``$PULSEBRIDGE_SPO2_CAMERA``, else ``shared/data/spo2-camera`` beside the repository."""
    env = os.environ.get(CAMERA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data" / "spo2-camera"


def _camera_recordings(folder: Path) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """(subject, hand, RGB frames (n, 3), reference SpO2 per second, reference pulse per second)."""
    out = []
    for gt in sorted((folder / "gt").glob("1*.csv")):
        with open(gt, encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
        head = [h.strip() for h in rows[0]]
        cols = [(head.index("SpO2 " + k), head.index("Pulse " + k)) for k in REFERENCE_OXIMETERS]
        spo2, pulse = [], []
        for row in rows[1:]:
            s = [float(row[a]) for a, _ in cols if row[a].strip() and float(row[a]) > 0]
            p = [float(row[b]) for _, b in cols if row[b].strip() and float(row[b]) > 0]
            spo2.append(float(np.mean(s)) if s else np.nan)
            pulse.append(float(np.median(p)) if p else np.nan)
        for hand in ("Left", "Right"):
            rgb = np.loadtxt(folder / "ppg-csv" / hand / gt.name, delimiter=",", skiprows=1)
            out.append((gt.stem, hand, rgb, np.array(spo2), np.array(pulse)))
    return out


def _camera_windows(folder: Path) -> dict[str, Any]:
    """The product's estimator on each recording, one 1 s frame at a time, for each channel
    pair: per estimate (once the 8 s window is full, one a second) its ratio, quality, pulse
    rate and the references over the same window; and what the estimators compared in
    bench_spo2_methods read besides the ratios: the window's mean light per channel (dc, R, G,
    B), each channel's SNR, perfusion and light motion, and each pair's spread of R across 1 s
    stretches (SignalIndices)."""
    from agent.dev.bench_spo2_methods import SignalIndices
    from agent.vitals.spo2 import WINDOW_S, OximetryEstimator
    from agent.vitals.spo2_relative import FIGURES, PlacementFigures

    win = int(WINDOW_S)
    indices = SignalIndices(CAMERA_FS)
    cols: dict[str, list[Any]] = {"subject": [], "recording": [], "second": [], "ref_spo2": [], "ref_pulse": [],
                                  "dc": [], "snr": [], "beat_spread": [], "perfusion": [], "light_motion": []}
    per_pair: dict[str, dict[str, list[float]]] = {p: {"ratio": [], "quality": []} for p in CAMERA_PAIRS}
    pulse: dict[str, list[float]] = {"rate": [], "quality": []}
    relative: list[np.ndarray] = []
    for subject, hand, rgb, spo2, ref_pulse in _camera_recordings(folder):
        seconds = min(len(spo2), len(rgb) // CAMERA_FS)
        ests = {p: OximetryEstimator(CAMERA_FS) for p in CAMERA_PAIRS}
        placement = PlacementFigures()  # the agent's relative estimator's figures, red/blue, as the agent runs it
        for k in range(seconds):
            frame = rgb[k * CAMERA_FS:(k + 1) * CAMERA_FS]
            for p, (a, b) in CAMERA_PAIRS.items():
                ests[p].push(frame[:, a], frame[:, b])
            if k + 1 < win:
                continue
            rb = ests["red/blue"].estimate()
            figures = placement.observe(rb, float(k + 1))
            if np.all(np.isnan(spo2[k + 1 - win:k + 1])):
                continue
            relative.append(figures)
            cols["subject"].append(subject)
            cols["recording"].append(subject + " " + hand)
            cols["second"].append(k + 1)
            window = rgb[(k + 1 - win) * CAMERA_FS:(k + 1) * CAMERA_FS]
            cols["dc"].append(window.mean(axis=0))  # light: R, G, B
            snr, spread, perfusion, motion = indices(window)
            cols["snr"].append(snr)
            cols["beat_spread"].append(spread)
            cols["perfusion"].append(perfusion)
            cols["light_motion"].append(motion)
            cols["ref_spo2"].append(float(np.nanmean(spo2[k + 1 - win:k + 1])))
            cols["ref_pulse"].append(float(np.nanmedian(ref_pulse[k + 1 - win:k + 1]))
                                     if not np.all(np.isnan(ref_pulse[k + 1 - win:k + 1])) else np.nan)
            for p in CAMERA_PAIRS:
                r = rb if p == "red/blue" else ests[p].estimate()
                per_pair[p]["ratio"].append(r.ratio if r.ratio is not None else np.nan)
                per_pair[p]["quality"].append(r.quality)
                if p == "red/blue":
                    pulse["rate"].append(r.pulse_rate_bpm if r.pulse_rate_bpm is not None else np.nan)
                    pulse["quality"].append(r.pulse_quality)
    return {"subject": np.array(cols["subject"]), "recording": np.array(cols["recording"]),
            "second": np.array(cols["second"]), "ref_spo2": np.array(cols["ref_spo2"]),
            "ref_pulse": np.array(cols["ref_pulse"]), "dc": np.array(cols["dc"]).reshape(-1, 3),
            "snr": np.array(cols["snr"]).reshape(-1, 3), "perfusion": np.array(cols["perfusion"]).reshape(-1, 3),
            "light_motion": np.array(cols["light_motion"]).reshape(-1, 3),
            "beat_spread": {p: np.array([d[p] for d in cols["beat_spread"]]) for p in CAMERA_PAIRS},
            "pairs": {p: {k: np.array(v) for k, v in d.items()} for p, d in per_pair.items()},
            "pulse": {k: np.array(v) for k, v in pulse.items()},
            "relative_figures": np.array(relative).reshape(-1, len(FIGURES))}


def _fit(ratio: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    # SpO2 = A - B * R, least squares.
    slope, icept = np.polyfit(ratio, ref, 1)
    return float(icept), float(-slope)


def _calibrate(w: dict[str, Any], pair: str, train: np.ndarray) -> tuple[float, float, float]:
    """A sensor type's calibration from the training windows: the quality gate that
    withholds WITHHELD_GOAL of them, and the line fitted on the rest. Returns (A, B, gate)."""
    d = w["pairs"][pair]
    ok = train & np.isfinite(d["ratio"])
    gate = float(np.quantile(d["quality"][ok], WITHHELD_GOAL))
    shown = ok & (d["quality"] >= gate)
    a, b = _fit(d["ratio"][shown], w["ref_spo2"][shown])
    return a, b, gate


def _held_out_arms(w: dict[str, Any], pair: str, train: np.ndarray) -> float:
    """Arms on what is shown when each training subject in turn is left out of a calibration
    made on the others (the inner loop of a nested leave-one-subject-out): how well the pair
    generalises to a new person, judged without the outer fold's subject."""
    d = w["pairs"][pair]
    errs = []
    for s in sorted(set(w["subject"][train].tolist())):
        inner_test = train & (w["subject"] == s)
        a, b, gate = _calibrate(w, pair, train & ~inner_test)
        shown = inner_test & np.isfinite(d["ratio"]) & (d["quality"] >= gate)
        errs.append(a - b * d["ratio"][shown] - w["ref_spo2"][shown])
    e = np.concatenate(errs)
    return float(np.sqrt(np.mean(e ** 2))) if len(e) else float("inf")


def _arms(e: np.ndarray) -> float | None:
    return round(float(np.sqrt(np.mean(e ** 2))), 2) if len(e) else None


def _alert_active(w: dict[str, Any], est: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """Per window, whether the agent's own SpO2 alert rule (alerts.DEFAULT_RULES: < 90 % held
    for 30 s, clearing at >= 92 % held as long) is raised, fed each recording's shown estimates
    in time order as the engine feeds it: the decision the alerts rest on."""
    from agent.vitals.alerts import AlertEngine

    active = np.zeros(len(est), dtype=bool)
    for recording in sorted(set(w["recording"].tolist())):
        idx = np.flatnonzero(w["recording"] == recording)
        idx = idx[np.argsort(w["second"][idx])]
        engine, raised = AlertEngine(), False
        for i in idx:
            if shown[i]:
                for ev in engine.observe(recording, "spo2", float(est[i]), float(w["second"][i])):
                    raised = ev.state == "raised"
            active[i] = raised
    return active


def _sens_spec(decided_low: np.ndarray, truly_low: np.ndarray, among: np.ndarray) -> tuple[float | None, float | None]:
    tp, fn = int(np.sum(among & truly_low & decided_low)), int(np.sum(among & truly_low & ~decided_low))
    tn, fp = int(np.sum(among & ~truly_low & ~decided_low)), int(np.sum(among & ~truly_low & decided_low))
    return (round(tp / (tp + fn), 3) if tp + fn else None), (round(tn / (tn + fp), 3) if tn + fp else None)


def desaturation(pairs: tuple[str, ...] | None = None, compare: bool = True) -> dict[str, Any]:
    """The desaturation set's figures (leave_one_subject_out on the product's estimator, run
    on each recording; the agent's relative estimator, bench_spo2_methods.two_wavelength) and
    the pulse rate against the oximeters'. pairs: the channel pairs a calibration may choose
    from (default: all); compare: the other transparent estimators compared too (slow)."""
    folder = camera_dir()
    if not (folder / "gt").is_dir():
        return {"missing": str(folder)}
    w = _camera_windows(folder)
    out = score_desaturation(w, pairs or tuple(CAMERA_PAIRS))
    from agent.dev import bench_spo2_methods

    out["relative"] = bench_spo2_methods.two_wavelength(w)
    if compare:  # transparent estimators that address the offset between people and the drift
        out["estimators"] = bench_spo2_methods.compare(w)
    # Pulse rate on the same real PPG (red/blue), against the oximeters' pulse rate.
    out["pulse_rate"] = _pulse_scores(w["pulse"]["rate"], w["ref_pulse"])
    return out


def leave_one_subject_out(w: dict[str, Any], choice: tuple[str, ...]) -> dict[str, np.ndarray]:
    """For each subject, the others calibrate the sensor type (channel pair among choice,
    quality gate, line: _calibrate) and the subject's own windows are estimated with it. The
    pair is chosen inside the fold by a leave-one-subject-out among the others
    (_held_out_arms): the subject scored takes no part in any choice or fit.
    w: per window "subject", "ref_spo2" and, per pair, "ratio" and "quality" (arrays).
    Returns per window the estimate (%), its quality, whether it is shown, the pair used."""
    n = len(w["ref_spo2"])
    est, quality = np.full(n, np.nan), np.zeros(n)
    shown, used = np.zeros(n, dtype=bool), np.full(n, "", dtype=object)
    for s in sorted(set(w["subject"].tolist())):
        test = w["subject"] == s
        pair = choice[0] if len(choice) == 1 else min(choice, key=lambda p: _held_out_arms(w, p, ~test))
        a, b, gate = _calibrate(w, pair, ~test)
        d = w["pairs"][pair]
        est[test] = np.clip(a - b * d["ratio"][test], 0.0, 100.0)
        quality[test] = d["quality"][test]
        shown[test] = np.isfinite(d["ratio"][test]) & (d["quality"][test] >= gate)
        used[test] = pair
    return {"estimate": est, "quality": quality, "shown": shown, "pair": used}


def score_desaturation(w: dict[str, Any], pairs: tuple[str, ...]) -> dict[str, Any]:
    """Arms on what is shown (all, per decade, by quality half), withheld fraction, the < 90 %
    decision, each subject's mean error: red/blue alone, and the pair chosen per fold among
    pairs (leave_one_subject_out)."""
    ref = w["ref_spo2"]
    subjects = sorted(set(w["subject"].tolist()))
    out: dict[str, Any] = {"subjects": len(subjects), "estimates": int(len(ref)), "by_choice": {}}
    for label, choice in (("red/blue", ("red/blue",)), ("pair chosen per fold", pairs)):
        fold = leave_one_subject_out(w, choice)
        est, quality, shown = fold["estimate"], fold["quality"], fold["shown"]
        chosen = fold["pair"].tolist()
        err = est - ref
        e = err[shown]
        q = quality[shown]
        best = q >= np.median(q)
        low_ref = ref < 90.0
        sens, spec = _sens_spec(est < 90.0, low_ref, shown)
        alert_sens, alert_spec = _sens_spec(_alert_active(w, est, shown), low_ref, np.ones(len(ref), dtype=bool))
        out["by_choice"][label] = {
            "pairs_chosen": sorted(set(chosen)),
            "arms_shown_pct": _arms(e),
            "mean_abs_error_shown_pct": round(float(np.mean(np.abs(e))), 2) if len(e) else None,
            "withheld_fraction": round(1.0 - float(shown.mean()), 3),
            "arms_by_decade_pct": {"%d-%d" % (lo, min(hi, 100)): _arms(err[shown & (ref >= lo) & (ref < hi)])
                                   for lo, hi in DECADES},
            "arms_best_quality_half_pct": _arms(e[best]),
            "arms_worst_quality_half_pct": _arms(e[~best]),
            "arms_withheld_pct": _arms(err[~shown & np.isfinite(err)]),
            "below_90_sensitivity": sens,
            "below_90_specificity": spec,
            "alert_rule_sensitivity": alert_sens,
            "alert_rule_specificity": alert_spec,
            # Each left-out subject's mean error on what was shown (None: all withheld): how much of
            # the error is an offset between people, which no per-window quality can see.
            "bias_by_subject_pct": {s: (round(float(np.mean(err[shown & (w["subject"] == s)])), 1)
                                        if np.any(shown & (w["subject"] == s)) else None) for s in subjects},
        }
    return out


def _pulse_scores(rate: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    valid = np.isfinite(truth)
    shown = valid & np.isfinite(rate)
    e = rate[shown] - truth[shown]
    ratio = rate[shown] / truth[shown]
    harmonic = np.zeros(len(ratio), dtype=bool)
    for m in HARMONICS:
        harmonic |= np.abs(ratio - m) < 0.1 * m
    return {"estimates": int(valid.sum()), "shown_fraction": round(float(shown.sum() / max(1, valid.sum())), 3),
            "mean_abs_error_bpm": round(float(np.mean(np.abs(e))), 2) if len(e) else None,
            "rms_error_bpm": _arms(e), "harmonic_errors": int(harmonic.sum()),
            "harmonic_share": round(float(harmonic.mean()), 4) if len(e) else None}


def pulse_rate_a103l() -> dict[str, Any]:
    """Pulse rate on a103l's real PLETH (as the simulated MAX30102 sends it, 100 Hz) against
    the rate of its ECG (lead II, recorded with it) over the same 8 s windows: ~128 /min."""
    import wfdb

    from agent.vitals.spo2 import OximetryEstimator

    rec = wfdb.rdrecord(str(waveforms.data_dir() / waveforms.PPG_RECORD))
    fs = float(rec.fs)
    both = waveforms.synthesise_ppg(rec.p_signal[:, rec.sig_name.index("PLETH")], 97.0)
    beats = np.array(detect(rec.p_signal[:, rec.sig_name.index("II")], fs)) / fs
    t = np.arange(len(both)) / fs
    t100 = np.arange(0, t[-1], 1 / 100)
    red, ir = (np.interp(t100, t, both[:, c]) * 7 * 262144 / 16384000 for c in (0, 1))
    est = OximetryEstimator(100)
    rates, truth = [], []
    for i in range(0, len(t100) - 100, 100):
        est.push(red[i:i + 100], ir[i:i + 100])
        if i < 700:
            continue
        end = (i + 100) / 100
        b = beats[(beats > end - 8) & (beats <= end)]
        r = est.estimate()
        rates.append(r.pulse_rate_bpm if r.pulse_rate_bpm is not None else np.nan)
        truth.append(60.0 / float(np.median(np.diff(b))) if len(b) > 2 else np.nan)
    return _pulse_scores(np.array(rates), np.array(truth))


# A MAX30102's IR reading at a fingertip, in counts of its 18-bit ADC (of 262143).
PPG_IR_DC_COUNTS = 140000


def recorded_signals(seconds: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PhysioNet record a103l as a board's sensors give it: ECG lead II at 512 Hz in
    MAX30003 counts (scale 1000000/2621440 uV), red and IR at 100 Hz (a PPG
    synthesised from its pleth for SpO2 97 %, in 18-bit MAX30102 counts, IR's DC at
    PPG_IR_DC_COUNTS); whole seconds, at most `seconds` (None: the whole record)."""
    import wfdb

    rec = wfdb.rdrecord(str(waveforms.data_dir() / waveforms.PPG_RECORD))
    fs = float(rec.fs)
    t = np.arange(rec.sig_len) / fs
    n = int(t[-1]) - 1 if seconds is None else min(seconds, int(t[-1]) - 1)
    ecg = np.round(np.interp(np.arange(0, n, 1 / 512), t, rec.p_signal[:, rec.sig_name.index("II")])
                   * 1000 * 2621440 / 1000000).astype(np.int32)
    both = waveforms.synthesise_ppg(rec.p_signal[:, rec.sig_name.index("PLETH")], 97.0)
    both *= PPG_IR_DC_COUNTS / float(np.mean(both[:, 1]))  # one factor for both: R is unchanged
    red, ir = (np.round(np.interp(np.arange(0, n, 1 / 100), t, both[:, c])).astype(np.int32) for c in (0, 1))
    return ecg, red, ir


def vitals_cpu(seconds: int = 120) -> dict[str, Any]:
    """CPU time of the vitals engine per board-second: one board's ECG (512 Hz) and PPG
    (100 Hz) in 1 s frames, as the hub gets them (process time, this machine)."""
    from agent.record import FrameRecord
    from agent.vitals.engine import VitalsEngine
    from protocols import messages

    ecg, red, ir = recorded_signals(seconds)
    n = len(ecg) // 512
    frames = []
    for i in range(n):
        frames.append(FrameRecord("pb-bench", 1, 2 * i, messages.STREAM_ECG_MAX30003, 512, i * 1000, i * 512, 512,
                                  1000000, 2621440, None, 0, 0, 0, 0, (ecg[i * 512:(i + 1) * 512],), None, 0.0, b""))
        frames.append(FrameRecord("pb-bench", 1, 2 * i + 1, messages.STREAM_PPG_MAX30102, 100, i * 1000, i * 100,
                                  100, 1, 1, (7, 7, 0, 0), 0, 0, 0, 0,
                                  (red[i * 100:(i + 1) * 100], ir[i * 100:(i + 1) * 100]), None, 0.0, b""))
    for f in frames[:20]:  # warm up (the libraries' first calls import and compile)
        VitalsEngine().frame(f, "pb-warm", 1_800_000_000.0 + f.first_index / f.rate_hz, f.key)
    eng = VitalsEngine()
    c0 = time.process_time()
    for f in frames:
        eng.frame(f, "pb-bench", 1_800_000_000.0 + f.first_index / f.rate_hz, f.key)
    per_board_s = (time.process_time() - c0) / n
    return {"board_seconds": n, "cpu_ms_per_board_second": round(per_board_s * 1000, 3),
            "core_pct_for_20_boards": round(per_board_s * 20 * 100, 2)}
