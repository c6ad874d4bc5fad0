# The vitals engine on frames as boards send them: real ECG and PPG, in windows.
import dataclasses
import json
from datetime import datetime
from typing import Any

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


def _a103l_frames(seconds: int) -> tuple[list[FrameRecord], list[FrameRecord]]:
    """One patient's ECG (lead II, 512 Hz) and PPG (red/IR codes, 100 Hz), recorded together
    (a103l: ~128 /min), as one board sends them."""
    rec = wfdb.rdrecord(str(waveforms.data_dir() / waveforms.PPG_RECORD), sampto=250 * (seconds + 1))
    t = np.arange(rec.sig_len) / 250
    ecg = np.round(np.interp(np.arange(0, seconds, 1 / 512), t, rec.p_signal[:, rec.sig_name.index("II")])
                   * 1000 * 2621.44).astype(int)
    both = waveforms.synthesise_ppg(rec.p_signal[:, rec.sig_name.index("PLETH")], 97.0)
    t100 = np.arange(0, seconds, 1 / 100)
    red, ir = (np.round(np.interp(t100, t, both[:, c]) * 7 * 262144 / 16384000).astype(np.int32) for c in (0, 1))
    ecg_frames = [_ecg(i, i * 512, 512, ecg[i * 512:(i + 1) * 512].tolist()) for i in range(seconds)]
    ppg_frames = [FrameRecord("pb-v", 1, 1000 + i, messages.STREAM_PPG_MAX30102, 100, i * 1000, i * 100, 100, 1, 1,
                              (7, 7, 0, 0), 0, 0, 0, 0, (red[i * 100:(i + 1) * 100], ir[i * 100:(i + 1) * 100]),
                              None, 0.0, b"")
                  for i in range(seconds)]
    return ecg_frames, ppg_frames


def _stream(eng: VitalsEngine, dev: str, ecg: list[FrameRecord], ppg: list[FrameRecord]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i in range(max(len(ecg), len(ppg))):
        for frames in (ecg, ppg):
            if i < len(frames):
                f = frames[i]
                docs += eng.frame(f, dev, 1_800_000_000.0 + f.first_index / f.rate_hz, "%s:1:%d" % (dev, f.seq))
    return docs


def test_one_heart_two_sensors_agree_and_every_vital_names_its_method() -> None:
    ecg, ppg = _a103l_frames(40)
    docs = _stream(VitalsEngine(), "pb-x1", ecg, ppg)
    vitals = [d for d in docs if d["type"] == "vital"]
    assert {d["kind"] for d in vitals} == {"heart_rate", "spo2", "pulse_rate", "perfusion_index"}
    assert all(d["method"] and 0 <= d["quality"] <= 1 for d in vitals)
    checked = [d for d in vitals if "cross_check" in d]
    assert {d["kind"] for d in checked} == {"heart_rate", "pulse_rate"}
    assert all(d["cross_check"]["agrees"] for d in checked), [d["cross_check"] for d in checked]
    rates = [d["value"] for d in vitals if d["kind"] == "pulse_rate"]
    assert rates and all(115 < v < 140 for v in rates), rates


def test_sensors_that_disagree_lower_both_qualities_without_an_alert() -> None:
    # One board whose ECG plays MIT-BIH 100 (~75 /min) and whose PPG plays a103l (~128 /min):
    # one of the two is wrong, and neither may be shown as sure.
    _, ppg = _a103l_frames(40)
    alone = [d for d in _stream(VitalsEngine(), "pb-x2", [], ppg) if d["type"] == "vital"]
    docs = _stream(VitalsEngine(), "pb-x3", _ecg_frames(40), ppg)
    json.loads(json.dumps(docs))  # stored as JSON: plain values only (a numpy bool was refused by the store)
    vitals = [d for d in docs if d["type"] == "vital"]
    hr = [d for d in vitals if d["kind"] == "heart_rate" and "cross_check" in d]
    pr = [d for d in vitals if d["kind"] == "pulse_rate" and "cross_check" in d]
    assert hr and pr
    assert all(not d["cross_check"]["agrees"] and d["quality"] <= 0.5 for d in hr + pr), [d["quality"] for d in hr + pr]
    q_alone = max(d["quality"] for d in alone if d["kind"] == "pulse_rate")
    assert max(d["quality"] for d in pr) <= 0.5 * q_alone + 0.01
    assert not [d for d in docs if d["type"] == "alert"]


def test_a_sensor_type_with_a_relative_calibration_shows_the_change_from_its_placement() -> None:
    # SpO2 = 97 % at the placement's reference + 40 x the red light's change; expected error 2 %.
    # Nothing for the placement's first minute, then the relative estimate with its expected
    # error and method; a stream that restarts (samples lost) is a new placement: a minute again.
    from agent.vitals.spo2_relative import BASELINE_S, QUALITY_FIGURES, SMOOTH_S, RelativeCalibration

    n = len(QUALITY_FIGURES)
    cal = RelativeCalibration(97.0, (0.0, 40.0, 0.0), (0.0,) * n, (1.0,) * n, (0.0,) * n + (2.0,), 4.0, 88.0)
    _, ppg = _a103l_frames(190)
    eng = VitalsEngine(relative_calibration={"max30102": cal})
    first, second = ppg[:90], ppg[95:]  # 5 s lost: the stream restarts at 95 s
    docs = _stream(eng, "pb-r1", [], first) + _stream(eng, "pb-r1", [], second)
    spo2 = [d for d in docs if d["type"] == "vital" and d["kind"] == "spo2"]
    seconds = [datetime.fromisoformat(d["at"]).timestamp() - 1_800_000_000.0 for d in spo2]  # since the stream began
    assert spo2 and all(d["method"].startswith("PPG ratio of ratios and red and IR light") for d in spo2)
    # The method names the smoothing and the reference the estimator uses.
    assert all("median of the last %d s less its median over the placement's first %d s" % (SMOOTH_S, BASELINE_S)
               in d["method"] for d in spo2), spo2[0]["method"]
    assert all(abs(d["value"] - 97.0) < 1.0 and d["expected_error_pct"] == 2.0 and d["quality"] == 0.75
               for d in spo2), [(d["value"], d["expected_error_pct"]) for d in spo2]
    assert seconds and min(seconds) > BASELINE_S, seconds
    assert any(s < 90 for s in seconds) and not [s for s in seconds if 90 <= s <= 95 + BASELINE_S], seconds
    assert any(s > 95 + BASELINE_S for s in seconds), seconds
