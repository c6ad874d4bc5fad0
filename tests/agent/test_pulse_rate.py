# Pulse rate on real PPG at a low and a high rate: never a harmonic (a period two or three
# pulses long), and a quality that says when the period is in doubt.
from pathlib import Path

import numpy as np
import wfdb

from agent.dev.sim import waveforms
from agent.vitals.rpeak import detect
from agent.vitals.spo2 import OximetryEstimator, pulse_period

DATA = Path(__file__).parent / "data"


def _a103l() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a103l's PLETH as the simulated MAX30102 sends it (red, IR codes at 100 Hz) and the
    beat times (s) of its ECG, recorded together: a true rate of ~128 /min."""
    rec = wfdb.rdrecord(str(waveforms.data_dir() / waveforms.PPG_RECORD))
    both = waveforms.synthesise_ppg(rec.p_signal[:, rec.sig_name.index("PLETH")], 97.0)
    t = np.arange(len(both)) / 250
    t100 = np.arange(0, t[-1], 1 / 100)
    red, ir = (np.interp(t100, t, both[:, c]) * 7 * 262144 / 16384000 for c in (0, 1))
    beats = np.array(detect(rec.p_signal[:, rec.sig_name.index("II")], 250)) / 250
    return red, ir, beats


def test_high_rate_is_never_read_as_a_third_of_it() -> None:
    # The status page showed 42 /min for this record's ~128 /min, with quality 100 %.
    red, ir, beats = _a103l()
    est = OximetryEstimator(100)
    shown, errors = 0, []
    for i in range(0, len(red) - 100, 100):
        est.push(red[i:i + 100], ir[i:i + 100])
        r = est.estimate()
        if r.pulse_rate_bpm is None:
            continue
        end_s = (i + 100) / 100
        in_window = beats[(beats > end_s - 8) & (beats <= end_s)]
        truth = 60 / float(np.median(np.diff(in_window)))
        shown += 1
        errors.append(abs(r.pulse_rate_bpm - truth) / truth)
    assert shown >= 100 and max(errors) < 0.05, (shown, max(errors))


def test_the_ecg_period_settles_the_pulse_rate() -> None:
    red, ir, beats = _a103l()
    est = OximetryEstimator(100)
    est.push(red[:800], ir[:800])
    heart_period_s = float(np.median(np.diff(beats[beats < 8])))
    r = est.estimate(expected_period_s=heart_period_s)
    assert r.pulse_rate_bpm is not None and abs(r.pulse_rate_bpm - 60 / heart_period_s) < 3


def test_low_rate_on_a_real_camera_recording() -> None:
    rows = np.genfromtxt(DATA / "spo2-camera-100004-left-excerpt.csv", delimiter=",", skip_header=1)
    rgb, ref = rows[:, :3], rows[::30, 3]
    est = OximetryEstimator(30)
    errors = []
    for k in range(len(rgb) // 30):
        est.push(rgb[k * 30:(k + 1) * 30, 0], rgb[k * 30:(k + 1) * 30, 2])  # red and blue pixels
        r = est.estimate()
        if r.pulse_rate_bpm is not None:
            errors.append(abs(r.pulse_rate_bpm - float(np.median(ref[max(0, k - 7):k + 1]))))
    assert len(errors) >= 40 and max(errors) < 5, errors


def test_an_ambiguous_period_costs_quality() -> None:
    fs = 50.0
    t = np.arange(0, 8, 1 / fs)
    clean = np.sin(2 * np.pi * 1.5 * t)  # 90 /min
    # A second rhythm, no multiple of the first, beside it: which one is the pulse is in doubt.
    mixed = clean + 0.9 * np.sin(2 * np.pi * 1.1 * t)
    p_clean, q_clean = pulse_period(clean, fs)
    _, q_mixed = pulse_period(mixed, fs)
    assert p_clean is not None and abs(60 / p_clean - 90) < 1
    assert q_clean > 0.8 and q_mixed < 0.5 * q_clean, (q_clean, q_mixed)
