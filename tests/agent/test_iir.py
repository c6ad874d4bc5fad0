"""The vitals' filters on numpy (agent/vitals/iir.py) against scipy.signal, their reference:
the same designs (frequency response), the same output and state frame by frame."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from agent.vitals.iir import SUB_BLOCK, SlidingZeroPhase, SosCascade, ZeroPhaseWindow, butter_sos

# (order, cutoff(s) in Hz, type, rate in Hz): the vitals' own designs, at their sensors'
# rates and others a board may be set to, and a few beyond.
DESIGNS = [
    (2, 5.0, "highpass", 512.0), (2, 15.0, "lowpass", 512.0),  # R peaks (rpeak.py)
    (2, 5.0, "highpass", 250.0), (2, 15.0, "lowpass", 128.0),
    (4, (0.5, 5.0), "bandpass", 100.0), (4, (0.5, 11.25), "bandpass", 25.0),  # the pulse (spo2.py)
    (6, 40.0, "lowpass", 1000.0), (4, (1.0, 40.0), "bandpass", 360.0), (8, 0.7, "highpass", 100.0),
]


def _response(sos: np.ndarray, w: np.ndarray) -> np.ndarray:
    # H(e^jw) of a cascade of sections, evaluated directly (no scipy).
    zinv = np.exp(-1j * w)
    h = np.ones_like(zinv)
    for b0, b1, b2, _, a1, a2 in sos:
        h *= (b0 + b1 * zinv + b2 * zinv ** 2) / (1 + a1 * zinv + a2 * zinv ** 2)
    return h


@pytest.mark.parametrize("order,cutoff,btype,rate_hz", DESIGNS)
def test_a_design_is_scipys_butterworth(order: int, cutoff: float | tuple[float, float], btype: str,
                                        rate_hz: float) -> None:
    ours = butter_sos(order, cutoff, btype, rate_hz)
    ref = signal.butter(order, cutoff, btype, fs=rate_hz, output="sos")
    assert ours.shape == ref.shape
    w = np.linspace(0, np.pi, 4001)
    np.testing.assert_allclose(_response(ours, w), _response(ref, w), rtol=0, atol=1e-9)
    # The same poles (the sections may pair them otherwise).
    poles = np.sort_complex(np.concatenate([np.roots(s[3:]) for s in ours]))
    np.testing.assert_allclose(poles, np.sort_complex(np.concatenate([np.roots(s[3:]) for s in ref])), atol=1e-9)


def test_a_cascade_filters_frame_by_frame_as_sosfilt_with_its_state() -> None:
    rng = np.random.default_rng(20261201)
    sos = np.vstack([signal.butter(2, 5.0, "highpass", fs=512, output="sos"),
                     signal.butter(2, 15.0, "lowpass", fs=512, output="sos")])
    cascade = SosCascade(sos)
    # An ECG-like input: a large offset, a random walk, spikes; frames of every kind of length
    # (empty, one sample, the sensor's 512, one past a block, several blocks).
    x = 50000 + np.cumsum(rng.normal(0, 30, 20000)) + 2000 * (rng.random(20000) < 0.002)
    lengths = [512, 0, 1, 7, 512, 512, SUB_BLOCK + 1, 3 * SUB_BLOCK, 40 * SUB_BLOCK + 5, 100, 512]
    zi = signal.sosfilt_zi(sos)
    np.testing.assert_allclose(cascade.unit_step_state, zi.ravel(), rtol=1e-12, atol=1e-12)
    ref_state = zi * x[0]
    state = cascade.unit_step_state * x[0]
    at = 0
    for n in lengths:
        frame = x[at:at + n]
        at += n
        if n == 0:  # scipy refuses an empty input; nothing changes
            ours, after = cascade.filter(frame, state)
            assert ours.shape == (0,) and np.array_equal(after, state)
            continue
        ref, ref_state = signal.sosfilt(sos, frame, zi=ref_state)
        ours, state = cascade.filter(frame, state)
        assert ours.shape == frame.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)  # the output is ~1e3 here
        np.testing.assert_allclose(state, ref_state.ravel(), rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("order,cutoff,btype,rate_hz", DESIGNS)
def test_every_design_filters_as_sosfilt(order: int, cutoff: float | tuple[float, float], btype: str,
                                         rate_hz: float) -> None:
    # The same sections through scipy's recursion and ours, frames of a few lengths: poles
    # near the unit circle (low cut-offs, high orders) are where the block form could drift.
    sos = butter_sos(order, cutoff, btype, rate_hz)
    cascade = SosCascade(sos)
    x = np.random.default_rng(order * 1000 + int(rate_hz)).normal(0, 100, 6000) + 3000
    ref, _ = signal.sosfilt(sos, x, zi=signal.sosfilt_zi(sos) * x[0])
    state, out, at = cascade.unit_step_state * x[0], [], 0
    for n in (100, 512, 17, 4133, 1238):
        y, state = cascade.filter(x[at:at + n], state)
        out.append(y)
        at += n
    np.testing.assert_allclose(np.concatenate(out), ref, rtol=0, atol=1e-9 * float(np.max(np.abs(ref))))


def test_rows_are_filtered_each_with_its_own_state() -> None:
    rng = np.random.default_rng(7)
    sos = signal.butter(4, (0.5, 5.0), "bandpass", fs=100, output="sos")
    cascade = SosCascade(sos)
    x = rng.normal(size=(2, 848)) + np.array([[9e4], [1.4e5]])
    states = x[:, :1] * cascade.unit_step_state
    ours, after = cascade.filter(x, states)
    for row in range(2):
        ref, zf = signal.sosfilt(sos, x[row], zi=signal.sosfilt_zi(sos) * x[row, 0])
        np.testing.assert_allclose(ours[row], ref, rtol=0, atol=1e-8)
        np.testing.assert_allclose(after[row], zf.ravel(), rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("args,words", [
    ((3, 5.0, "lowpass", 100.0), "even"),
    ((2, 60.0, "lowpass", 100.0), "Nyquist"),
    ((2, 0.0, "highpass", 100.0), "Nyquist"),
    ((4, (5.0, 0.5), "bandpass", 100.0), "rise"),
    ((4, 5.0, "bandpass", 100.0), "bandpass two"),
    ((2, 5.0, "notch", 100.0), "notch"),
])
def test_a_design_that_cannot_be_made_is_refused_saying_why(args: tuple, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=words):
        butter_sos(*args)


def test_sections_not_in_the_normal_form_are_refused() -> None:
    with pytest.raises(ValueError, match="rows"):
        SosCascade(np.ones((2, 5)))
    with pytest.raises(ValueError, match="rows"):
        SosCascade([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]])


def test_a_sliding_window_keeps_the_zero_phase_band_of_scipys_detrend_and_sosfiltfilt() -> None:
    # The band of the last window (linear trend off, sosfiltfilt with odd extension) kept frame
    # by frame from carried state: at every frame, scipy's whole-window computation of the
    # same samples. Frames of every kind of length: a 100 Hz sensor's 100, one sample, odd
    # ones, one longer than the window; two signals (rows) at a PPG's levels.
    rng = np.random.default_rng(20261202)
    sos = butter_sos(4, (0.5, 5.0), "bandpass", 100.0)
    window, pad = 800, 24
    design = ZeroPhaseWindow(SosCascade(sos), window, pad)
    sliding = SlidingZeroPhase(design)
    n = 6000
    t_s = np.arange(n) / 100
    x = np.log(np.vstack([9e4 * (1 + 0.01 * np.sin(2 * np.pi * 1.3 * t_s)), 1.4e5 * (1 + 0.02 * np.sin(
        2 * np.pi * 1.3 * t_s + 0.2))]) + np.cumsum(rng.normal(0, 20, (2, n)), axis=1))
    at, checked = 0, 0
    for length in [100] * 12 + [1, 37, 0, 999, 100, 100, 213] + [100] * 10:
        sliding.push(x[:, at:at + length])
        at += length
        kept = sliding.window_and_band()
        if at < window:
            assert kept is None
            continue
        assert kept is not None
        samples, band = kept
        np.testing.assert_array_equal(samples, x[:, at - window:at])
        ref = signal.sosfiltfilt(sos, signal.detrend(samples, axis=1), axis=1, padlen=pad)
        np.testing.assert_allclose(band, ref, rtol=0, atol=1e-10 * float(np.abs(ref).max()))
        np.testing.assert_allclose(band, design.reference(samples), rtol=0, atol=1e-10 * float(np.abs(ref).max()))
        checked += 1
    assert checked >= 20
    sliding.reset()  # a new stream: no band until a window of it came
    sliding.push(x[:, :window - 1])
    assert sliding.window_and_band() is None
    sliding.push(x[:, window - 1:window])
    kept = sliding.window_and_band()
    assert kept is not None
    np.testing.assert_allclose(kept[1], design.reference(x[:, :window]), rtol=0, atol=1e-12)


def test_a_sliding_window_holds_few_frame_maps_whatever_lengths_it_is_sent() -> None:
    # A board sets its frames' length: the per-length maps a design makes are bounded, and
    # frames past them still filter right (through the cascade).
    design = ZeroPhaseWindow(SosCascade(butter_sos(4, (0.5, 5.0), "bandpass", 100.0)), 300, 24)
    sliding = SlidingZeroPhase(design)
    x = np.random.default_rng(5).normal(0, 1, (1, 2000)) + 11.0
    at = 0
    for length in range(1, 40):
        sliding.push(x[:, at:at + length])
        at += length
    assert len(design._frame_maps) <= 4
    kept = sliding.window_and_band()
    assert kept is not None
    np.testing.assert_allclose(kept[1], design.reference(x[:, at - 300:at]), rtol=0, atol=1e-11)
