"""`pulsebridge bench vitals`: R-peak detection accuracy on MIT-BIH record 100.

Our streaming detector (agent/vitals/rpeak.py) and an established one,
wfdb's XQRS, run side by side in the same run on the same signal, scored
against the record's reference beat annotations with a 150 ms matching
window (sensitivity and positive predictivity, as in the ANSI/AAMI EC57
practice). Also on the signal resampled to 512 Hz, as a MAX30003 board
sends it.
"""

from __future__ import annotations

import time
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


def run() -> dict[str, Any]:
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
    return out


def report(r: dict[str, Any]) -> list[str]:
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
