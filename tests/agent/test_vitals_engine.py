# The vitals engine on frames as boards send them: real ECG and PPG, in windows.
import dataclasses

import numpy as np
import wfdb

from agent.dev.sim import waveforms
from agent.record import FrameRecord
from agent.vitals.engine import VitalsEngine
from protocols import messages


def _ecg(seq: int, first: int, rate: int, samples: list[int], flags: int = 0) -> FrameRecord:
    return FrameRecord("pb-v", 1, seq, messages.STREAM_ECG_MAX30003, rate, seq * 1000, first, len(samples), 1000000,
                       2621440, None, flags, 0, 0, 0, (np.array(samples, dtype=np.int32),), None, 0.0, b"")


def _ecg_frames(seconds: int, rate: int = 512) -> list[FrameRecord]:
    rec = wfdb.rdrecord(str(waveforms.data_dir() / waveforms.ECG_RECORD), channel_names=["MLII"],
                        sampto=360 * (seconds + 1))
    x = rec.p_signal[:, 0]
    t = np.arange(len(x)) / 360
    codes = np.round(np.interp(np.arange(0, seconds, 1 / rate), t, x) * 1000 * 2621.44).astype(int)
    return [_ecg(i, i * rate, rate, codes[i * rate:(i + 1) * rate].tolist()) for i in range(seconds)]


def test_heart_rate_from_streamed_ecg_frames() -> None:
    eng = VitalsEngine()
    docs = []
    for f in _ecg_frames(30):
        docs += eng.frame(f, "pb-v1", 1_800_000_000.0 + f.first_index / 512, "pb-v1:1:%d" % f.seq)
    hr = [d for d in docs if d["type"] == "vital" and d["kind"] == "heart_rate"]
    assert len(hr) >= 4 and all(65 < d["value"] < 85 for d in hr), [d["value"] for d in hr]
    assert all(d["source_frames"] and len(d["rr_ms"]) >= 3 for d in hr)
    assert not [d for d in docs if d["type"] == "alert"]


def test_a_gap_restarts_the_detector_and_lead_off_alarms_after_60_s() -> None:
    eng = VitalsEngine()
    frames = _ecg_frames(10)
    eng.frame(frames[0], "pb-v2", 0.0, "k0")
    state = eng._ecg["pb-v2"]
    eng.frame(frames[3], "pb-v2", 3.0, "k3")  # frames 1-2 lost
    assert eng._ecg["pb-v2"] is not state
    off = _ecg(99, 0, 512, [0] * 512, messages.FLAG_LEAD_OFF)
    raised = []
    for k in range(70):
        off = dataclasses.replace(off, first_index=k * 512)
        raised += [d for d in eng.frame(off, "pb-v3", float(k), "x") if d["type"] == "alert"]
    assert [(d["alert"], d["state"]) for d in raised] == [("lead_off", "raised")]
