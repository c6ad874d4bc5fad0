"""Vitals from the frames a board streams: heart rate and RR intervals (ECG),
SpO2, pulse rate and perfusion index (PPG), and alert events.

One engine per hub; state per device and stream, bounded (a detector, an
estimator, a few frame keys). A stream restarts its state when the board
reboots (new epoch) or samples were lost (a gap in first_index). Each
vital names the frames it came from (their idempotency keys).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.record import FrameRecord
from agent.vitals.alerts import AlertEngine, AlertEvent
from agent.vitals.rpeak import RPeakDetector
from agent.vitals.spo2 import OximetryEstimator
from agent.vitals.spo2_relative import (
    BASELINE_S,
    RELATIVE_CALIBRATION,
    SMOOTH_S,
    RelativeCalibration,
    RelativeEstimate,
    RelativeOximetry,
)
from protocols import messages

RR_BEATS = 8  # heart rate over the last 8 beats
EMIT_EVERY_S = 5.0  # a vital of each kind per device at most this often (alerts: at once)
PLAUSIBLE_RR_S = (0.25, 2.5)  # 24-240 bpm
# Cross-check of one board's ECG heart rate and PPG pulse rate (one heart): they may differ by
# this much (the larger of the two bounds) before both lose quality; a figure only this recent
# from the other sensor is compared (both are averages over ~8 s).
AGREE_BPM = 10.0
AGREE_FRACTION = 0.10
CROSS_CHECK_AGE_S = 10.0
DISAGREE_QUALITY_FACTOR = 0.5  # both qualities are halved while the two disagree
PPG_SENSOR_TYPES = {messages.STREAM_PPG_MAX30102: "max30102"}  # a PPG stream's sensor type (its calibration)
# What each vital is computed by (every forwarded vital names its method).
METHODS = {
    "heart_rate": "ECG R-R intervals, streaming Pan-Tompkins detector, mean of the last %d beats" % RR_BEATS,
    "spo2": "PPG ratio of ratios, AC/DC sample by sample (band-passed log of the light), 8 s window, "
            "calibration curve of the sensor type; quality: red/IR pulse correlation and R's beat-to-beat consistency",
    "spo2_relative": "PPG ratio of ratios and red and IR light, each the median of the last %d s less its median over "
                     "the placement's first %d s, line of the sensor type; quality: the error expected from the "
                     "signal's own figures (agent/vitals/spo2_relative.py)" % (SMOOTH_S, BASELINE_S),
    "pulse_rate": "PPG autocorrelation period, checked against its multiples and sub-multiples, 8 s window",
    "pulse_rate_ecg": "PPG autocorrelation period, checked against its multiples and sub-multiples and "
                      "chosen nearest the same board's ECG R-R interval, 8 s window",
    "perfusion_index": "PPG infrared AC/DC, 8 s window",
}


@dataclass
class _Ecg:
    det: RPeakDetector
    next_index: int
    epoch: int
    beats: deque[int] = field(default_factory=lambda: deque(maxlen=RR_BEATS + 1))
    sources: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    heart_rate: tuple[float, float] | None = None  # (bpm, at UTC s): the last one computed


@dataclass
class _Ppg:
    est: OximetryEstimator
    next_index: int
    epoch: int
    sources: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    pulse_rate: tuple[float, float] | None = None  # (bpm, at UTC s): the last one estimated
    # SpO2 relative to the placement, when the sensor type has a relative calibration: a stream that
    # restarts is a new placement (the hub cannot tell a reconnect from the sensor put on again).
    relative: RelativeOximetry | None = None
    first_index: int = 0  # the placement's first sample
    relative_s: int = 0  # the last whole second of the placement observed
    relative_estimate: RelativeEstimate | None = None


def _continues(st: _Ecg | _Ppg, f: FrameRecord) -> bool:
    # Same boot and no sample lost since the last frame: the stream's state holds.
    return st.epoch == f.epoch and st.next_index == f.first_index


def _cross_check(rate_bpm: float, other: tuple[float, float] | None, at: float, other_kind: str
                 ) -> dict[str, Any] | None:
    """The other sensor's recent rate beside this one: None when there is none to compare."""
    if other is None or abs(at - other[1]) > CROSS_CHECK_AGE_S:
        return None
    diff = float(rate_bpm) - float(other[0])
    agrees = bool(abs(diff) <= max(AGREE_BPM, AGREE_FRACTION * float(other[0])))
    return {"with": other_kind, "other_value": round(float(other[0]), 1), "difference_per_min": round(diff, 1),
            "agrees": agrees}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int(t * 1000 % 1000)


class VitalsEngine:
    def __init__(self, alerts: AlertEngine | None = None,
                 relative_calibration: Mapping[str, RelativeCalibration] | None = None) -> None:
        """relative_calibration: sensor type -> its relative SpO2 calibration (default
        spo2_relative.RELATIVE_CALIBRATION); a sensor type without one keeps its absolute line."""
        self.alerts = alerts or AlertEngine()
        self._relative_calibration = RELATIVE_CALIBRATION if relative_calibration is None else relative_calibration
        self._ecg: dict[str, _Ecg] = {}
        self._ppg: dict[str, _Ppg] = {}
        self.last_seen: dict[str, float] = {}
        self._emitted: dict[tuple[str, str], float] = {}

    def _due(self, dev: str, kind: str, at: float) -> bool:
        last = self._emitted.get((dev, kind))
        if last is not None and at - last < EMIT_EVERY_S:
            return False
        self._emitted[(dev, kind)] = at
        return True

    def frame(self, f: FrameRecord, device_id: str, t0_utc_s: float, key: str) -> list[dict[str, Any]]:
        """A decoded sample frame in; vital and alert documents out."""
        self.last_seen[device_id] = time.time()
        out: list[dict[str, Any]] = []
        end_s = t0_utc_s + f.count / f.rate_hz
        if f.stream in (messages.STREAM_ECG_MAX30003, messages.STREAM_ECG_AD8232):
            out += self._ecg_frame(f, device_id, t0_utc_s, key)
            lead_off = 1.0 if f.flags & messages.FLAG_LEAD_OFF else 0.0
            out += self._alerts(self.alerts.observe(device_id, "lead_off", lead_off, end_s))
        elif f.stream == messages.STREAM_PPG_MAX30102:
            out += self._ppg_frame(f, device_id, end_s, key)
        return out

    def forget(self, device_id: str) -> None:
        """Drops everything held for a device (erased): no vital, no alert, no silence alert from it."""
        self._ecg.pop(device_id, None)
        self._ppg.pop(device_id, None)
        self.last_seen.pop(device_id, None)
        for k in [k for k in self._emitted if k[0] == device_id]:
            del self._emitted[k]
        self.alerts.forget(device_id)

    def silence(self, now: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for dev, last in self.last_seen.items():
            out += self._alerts(self.alerts.observe(dev, "silence_s", now - last, now))
        return out

    def _alerts(self, events: list[AlertEvent]) -> list[dict[str, Any]]:
        return [{"type": "alert", "device_id": e.device_id, "alert": e.rule, "state": e.state, "at": _iso(e.at),
                 "value": e.value} for e in events]

    def _ecg_frame(self, f: FrameRecord, dev: str, t0: float, key: str) -> list[dict[str, Any]]:
        st = self._ecg.get(dev)
        if st is None or not _continues(st, f):
            st = _Ecg(RPeakDetector(f.rate_hz), f.first_index, f.epoch)
            self._ecg[dev] = st
        st.sources.append(key)
        st.beats.extend(st.det.push_frame(f.channels[0]))
        st.next_index = f.first_index + f.count
        beats = list(st.beats)
        rr = [(b - a) / f.rate_hz for a, b in zip(beats, beats[1:])]
        ok = [x for x in rr if PLAUSIBLE_RR_S[0] <= x <= PLAUSIBLE_RR_S[1]]
        if len(ok) < 3:
            return []
        quality = len(ok) / len(rr)
        hr = 60.0 / (sum(ok) / len(ok))
        at = t0 + (beats[-1] - (st.next_index - f.count)) / f.rate_hz  # the last beat, on the UTC axis
        if quality < 0.75:
            return []  # withheld: too many implausible intervals
        st.heart_rate = (hr, at)
        alerts = self._alerts(self.alerts.observe(dev, "heart_rate", hr, at))
        if not self._due(dev, "heart_rate", at):
            return alerts  # (the document is made only when it goes out)
        ppg = self._ppg.get(dev)
        check = _cross_check(hr, ppg.pulse_rate if ppg else None, at, "pulse_rate")
        if check and not check["agrees"]:
            quality *= DISAGREE_QUALITY_FACTOR
        doc = {"type": "vital", "device_id": dev, "kind": "heart_rate", "value": round(hr, 1), "unit": "/min",
               "rr_ms": [round(x * 1000) for x in ok], "quality": round(quality, 2), "at": _iso(at),
               "method": METHODS["heart_rate"], "source_frames": list(st.sources)}
        if check:
            doc["cross_check"] = check
        return [doc] + alerts

    def _ppg_frame(self, f: FrameRecord, dev: str, end: float, key: str) -> list[dict[str, Any]]:
        st = self._ppg.get(dev)
        if st is None or not _continues(st, f):
            st = _Ppg(OximetryEstimator(f.rate_hz), f.first_index, f.epoch, first_index=f.first_index)
            cal = self._relative_calibration.get(PPG_SENSOR_TYPES[f.stream])
            st.relative = RelativeOximetry(cal) if cal is not None else None
            self._ppg[dev] = st
        st.sources.append(key)
        st.est.push(f.channels[0], f.channels[1])
        st.next_index = f.first_index + f.count
        ecg = self._ecg.get(dev)
        heart = ecg.heart_rate if ecg else None
        if heart is not None and abs(end - heart[1]) > CROSS_CHECK_AGE_S:
            heart = None
        r = st.est.estimate(expected_period_s=60.0 / heart[0] if heart else None)
        if r.pulse_rate_bpm is not None:
            st.pulse_rate = (r.pulse_rate_bpm, end)
        rel: RelativeEstimate | None = None
        if st.relative is not None:
            # One observation a second of the placement (its figures are per second).
            elapsed_s = (st.next_index - st.first_index) / f.rate_hz
            if int(elapsed_s) > st.relative_s:
                st.relative_s = int(elapsed_s)
                st.relative_estimate = st.relative.observe(r, elapsed_s)
            rel = st.relative_estimate
        spo2_pct = r.spo2_pct if st.relative is None else rel.spo2_pct if rel else None
        if spo2_pct is None:
            return []
        out = self._alerts(self.alerts.observe(dev, "spo2", spo2_pct, end))
        if not self._due(dev, "ppg", end):
            return out  # (the documents are made only when they go out)
        base: dict[str, Any] = {"type": "vital", "device_id": dev, "at": _iso(end), "source_frames": list(st.sources),
                                "quality": round(r.quality, 2)}
        if st.relative is None:
            out.append(dict(base, kind="spo2", value=spo2_pct, unit="%", method=METHODS["spo2"]))
        else:
            out.append(dict(base, kind="spo2", value=spo2_pct, unit="%",
                            quality=round(rel.quality, 2) if rel else 0.0, method=METHODS["spo2_relative"],
                            expected_error_pct=rel.expected_error_pct if rel else None))
        if r.pulse_rate_bpm is not None:
            check = _cross_check(r.pulse_rate_bpm, heart, end, "heart_rate")
            q = r.pulse_quality * (DISAGREE_QUALITY_FACTOR if check and not check["agrees"] else 1.0)
            rate_doc = dict(base, kind="pulse_rate", value=r.pulse_rate_bpm, unit="/min", quality=round(q, 2),
                            method=METHODS["pulse_rate_ecg" if heart else "pulse_rate"])
            if check:
                rate_doc["cross_check"] = check
            out.append(rate_doc)
        if r.perfusion_index_pct is not None:
            out.append(dict(base, kind="perfusion_index", value=r.perfusion_index_pct, unit="%",
                            method=METHODS["perfusion_index"]))
        return out
