"""Recorded signals for the simulated sensors, from PhysioNet via wfdb.

The chip models on the simulated boards play physical signals, not ADC
codes: each model converts them as its chip would, with the gain, range and
LED currents the firmware configured. This module writes those signals as
int32 little-endian files, at the recordings' own rates:

- ECG: PhysioNet/CinC 2015 record a103l, lead II, in nV at the electrodes (250 Hz).
- PPG: the same record's PLETH (250 Hz), recorded at the same time on the
  same patient, so heart rate and pulse rate agree. The record has no
  red/IR pair, so both are synthesised from it for a chosen SpO2: see
  synthesise_ppg() for the model and the calibration curve it inverts.

MIT-BIH record 100 (ECG_RECORD), with its reference beat annotations, is
what the R-peak detector is scored on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ENV = "PULSEBRIDGE_DATA"
ECG_RECORD = "ecg/100"
PPG_RECORD = "ppg/a103l"
# Shipped with the project, so a fresh clone runs the demo and the tests.
SHIPPED = Path(__file__).resolve().parent / "recordings"

# The empirical linear calibration SpO2 = A - B * R (R: ratio of ratios),
# the textbook first-order curve for red 660 nm / IR 880-940 nm sensors.
CAL_A = 110.0
CAL_B = 25.0
# IR perfusion index (AC/DC) of the synthetic finger, and DC transfers in
# pA of photocurrent per mA of LED drive: at 7 mA and 16384 nA full scale
# they put IR near 55 % and red near 35 % of the ADC range.
IR_PERFUSION = 0.02
IR_DC_PA_PER_MA = 1_290_000
RED_DC_PA_PER_MA = 820_000


def data_dir() -> Path:
    """The folder holding ``ecg/100.*`` and ``ppg/a103l.*``: ``$PULSEBRIDGE_DATA`` if set, else the recordings
    shipped beside this module (``agent/dev/sim/recordings``, see its README).

    Raises FileNotFoundError naming the folder if the records are not there."""
    env = os.environ.get(DATA_ENV)
    folder = Path(env) if env else SHIPPED
    if not (folder / ECG_RECORD).with_suffix(".hea").exists() or not (folder / PPG_RECORD).with_suffix(".hea").exists():
        raise FileNotFoundError("PhysioNet recordings not found in %s: it must hold %s.hea and %s.hea (%s)"
                                % (folder, ECG_RECORD, PPG_RECORD, "from $%s" % DATA_ENV if env else "shipped"))
    return folder


@dataclass(frozen=True)
class Signal:
    path: Path
    rate_hz: int
    channels: int


def ratio_for_spo2(spo2_pct: float) -> float:
    return (CAL_A - spo2_pct) / CAL_B


def ecg_signal(cache: Path) -> Signal:
    import wfdb

    out = cache / "ecg-a103l-ii-nv.i32"
    if not out.exists():
        rec = wfdb.rdrecord(str(data_dir() / PPG_RECORD), channel_names=["II"])
        nv = np.round(rec.p_signal[:, 0] * 1e6)  # mV -> nV
        _write(out, nv.astype("<i4"), int(rec.fs))
    return _signal(out, 1)


def synthesise_ppg(pleth: np.ndarray, spo2_pct: float) -> np.ndarray:
    # Blood volume (pleth, normalised to 0..1) absorbs light: the
    # photocurrent falls as it rises. IR swings by IR_PERFUSION of its DC;
    # red by R times that, R the ratio of ratios that the calibration curve
    # maps to spo2_pct. Returns (n, 2) transfers: red, IR.
    p = pleth.astype(float)
    bad = ~np.isfinite(p)
    if bad.any():
        idx = np.arange(len(p))
        p[bad] = np.interp(idx[bad], idx[~bad], p[~bad])
    lo, hi = np.percentile(p, [1, 99])
    p = np.clip((p - lo) / (hi - lo), 0.0, 1.0)
    r = ratio_for_spo2(spo2_pct)
    ir = IR_DC_PA_PER_MA * (1.0 - IR_PERFUSION * p)
    red = RED_DC_PA_PER_MA * (1.0 - r * IR_PERFUSION * p)
    return np.stack([red, ir], axis=1)


def ppg_signal(cache: Path, spo2_pct: float = 97.0) -> Signal:
    import wfdb

    tag = hashlib.sha256(("%.3f" % spo2_pct).encode()).hexdigest()[:8]
    out = cache / ("ppg-a103l-spo2-%s.i32" % tag)
    if not out.exists():
        rec = wfdb.rdrecord(str(data_dir() / PPG_RECORD), channel_names=["PLETH"])
        both = synthesise_ppg(rec.p_signal[:, 0], spo2_pct)
        _write(out, np.round(both).astype("<i4").reshape(-1), int(rec.fs))
    return _signal(out, 2)


def _signal(path: Path, channels: int) -> Signal:
    return Signal(path, int(path.with_suffix(".hz").read_text()), channels)


def _write(path: Path, arr: np.ndarray, rate_hz: int) -> None:
    # The rate first, the samples last: a file present means both are whole.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".hz").write_text("%d\n" % rate_hz)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(arr.tobytes())
    tmp.replace(path)
