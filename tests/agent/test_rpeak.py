# R-peak detection on the reference record, scored independently
# (wfdb.processing.compare_annotations, 150 ms window).
import numpy as np
import wfdb
import wfdb.processing as wp

from agent.dev.sim import waveforms
from agent.vitals.rpeak import RPeakDetector, detect


def test_record_100_first_ten_minutes() -> None:
    base = str(waveforms.data_dir() / waveforms.ECG_RECORD)
    rec = wfdb.rdrecord(base, channel_names=["MLII"], sampto=360 * 600)
    ann = wfdb.rdann(base, "atr", sampto=360 * 600)
    ref = np.array([s for s, sym in zip(ann.sample, ann.symbol) if sym in "NLRBAaJSVrFejnE/fQ?"])
    sig = rec.p_signal[:, 0]
    c = wp.compare_annotations(ref, np.array(detect(sig, 360)), 54, sig)
    assert c.sensitivity >= 0.995 and c.positive_predictivity >= 0.995, (c.tp, c.fp, c.fn)


def test_memory_stays_bounded() -> None:
    det = RPeakDetector(512)
    for i in range(512 * 60):
        det.push(np.sin(i / 512 * 2 * np.pi * 1.2) ** 63)  # sharp peaks at 72/min
    assert len(det._bp) <= 512 and len(det.rr) <= 8 and len(det._cands) <= 64
    assert 60 / (sum(det.rr) / len(det.rr) / 512) > 70  # heart rate of the synthetic signal, ~72 bpm
