"""Butterworth filters for the vitals, designed and run on numpy alone.

Why not scipy.signal: importing any part of it imports the whole package
(scipy.stats, optimize, linalg, sparse, special...), +75 MB of the hub's
RSS for two functions, and its `sosfilt` wrapper costs more per call than a
frame's filtering. What the vitals need is small: a Butterworth design
(bilinear transform of the analog prototype with pre-warped band edges, as
scipy's `butter`) and a cascade of second-order sections run on a frame with
its state carried to the next (as `sosfilt` with `zi`). Both are checked
against scipy in tests/agent/test_iir.py.

How a frame is filtered: the cascade is a linear system of order S (two
states a section: transposed direct form II, as scipy's): s' = A s + B x,
y = C s + D x. Over a block of L samples x with the state s before it, the
output is T x + O s and the state after it A^L s + F x, where T (L x L, the
impulse response's lower-triangular Toeplitz matrix), O (L x S) and
F (S x L) depend on the filter alone; they are made once, by the recursion
itself. A frame is cut into blocks of SUB_BLOCK samples: the blocks' own
responses and what each adds to the state are two matrix products for the
whole frame, and only the state is carried from block to block in Python
(four steps for a 512-sample frame). Each output sample depends on the
samples up to it alone (no FFT spreading rounding across the frame), and is
taken about the frame's first sample (`SosCascade.filter`), so a flat input
in its steady state gives an exactly flat output. The output equals the
recursion's up to floating-point rounding (~1e-12 relative here).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

# Samples a block (above): larger blocks mean fewer Python steps a frame and larger
# (L x L) products; 128 keeps both small for the sensors' 100- to 512-sample frames.
SUB_BLOCK = 128
# Frames of at most this many blocks (4096 samples) get each block's starting state from
# two matrix products (maps made once per number of blocks, at most 2 x (32 x S)^2 values);
# longer inputs (a whole recording) carry it block by block.
CHAINED_BLOCKS = 32


def butter_sos(order: int, cutoff_hz: float | tuple[float, float], btype: str, rate_hz: float) -> Array:
    """A digital Butterworth filter as second-order sections, shape (order // 2 * (2 if
    bandpass), 6), rows [b0, b1, b2, 1, a1, a2], the gain in the first: scipy.signal.butter
    (order, cutoff_hz, btype, fs=rate_hz, output="sos") up to the sections' pairing and
    rounding. btype: "lowpass", "highpass" (cutoff_hz a frequency) or "bandpass" (a pair).
    order must be even (odd orders need a first-order section, not needed here).
    Raises ValueError for an odd order or a band edge not within (0, rate_hz / 2)."""
    if order < 2 or order % 2:
        raise ValueError("Butterworth order must be even and >= 2, not %r" % order)
    edges = np.atleast_1d(np.asarray(cutoff_hz, dtype=float))
    if btype not in ("lowpass", "highpass", "bandpass") or len(edges) != (2 if btype == "bandpass" else 1):
        raise ValueError("btype %r with cutoff %r: lowpass/highpass take a frequency, bandpass two" % (
            btype, cutoff_hz))
    if not (np.all(edges > 0) and np.all(edges < rate_hz / 2) and np.all(np.diff(edges) > 0)):
        raise ValueError("band edges %r Hz must rise within (0, %g) Hz (the Nyquist frequency)" % (
            cutoff_hz, rate_hz / 2))
    # The analog prototype's poles (unit cutoff), then the band edges pre-warped for the
    # bilinear transform (fs normalised to 2, as scipy does).
    m = np.arange(-order + 1, order, 2)
    p = -np.exp(1j * np.pi * m / (2 * order))
    warped = 4.0 * np.tan(np.pi * (2.0 * edges / rate_hz) / 2.0)
    z: npt.NDArray[np.complex128] = np.zeros(0, dtype=complex)
    k = 1.0
    if btype == "lowpass":
        p, k = p * warped[0], warped[0] ** order
    elif btype == "highpass":
        k = float(np.real(1.0 / np.prod(-p)))
        p, z = warped[0] / p, np.zeros(order, dtype=complex)
    else:
        bw, wo = warped[1] - warped[0], np.sqrt(warped[0] * warped[1])
        half = p * bw / 2
        root = np.sqrt(half ** 2 - wo ** 2)
        p, z, k = np.concatenate([half + root, half - root]), np.zeros(order, dtype=complex), bw ** order
    # Bilinear transform (fs2 = 4): the zeros at infinity land at z = -1.
    k = k * float(np.real(np.prod(4.0 - z) / np.prod(4.0 - p)))
    zd = np.concatenate([(4.0 + z) / (4.0 - z), -np.ones(len(p) - len(z))])
    pd = (4.0 + p) / (4.0 - p)
    # Sections: each conjugate pair of poles (upper half-plane ones, in order) with two
    # zeros, one at +1 and one at -1 where a band-pass has both.
    upper = pd[pd.imag > 0]
    if len(upper) * 2 != len(pd):
        raise ValueError("a pole is real: order %d %s not supported" % (order, btype))
    zeros = sorted(zd.real.round(12).tolist())
    pairs = [(zeros[i], zeros[-1 - i]) for i in range(len(zeros) // 2)]
    sos = np.zeros((len(upper), 6))
    for i, (pole, (z1, z2)) in enumerate(zip(upper, pairs)):
        sos[i] = [1.0, -(z1 + z2), z1 * z2, 1.0, -2.0 * pole.real, abs(pole) ** 2]
    sos[0, :3] *= k
    return sos


class SosCascade:
    """Second-order sections (rows [b0, b1, b2, 1, a1, a2]) run frame by frame on numpy
    (module docstring). State: S = 2 * sections values per signal, as a float array of
    shape (S,), or (rows, S) for several signals filtered at once. Holds no signal's state:
    one cascade serves every stream of a design."""

    def __init__(self, sos: npt.ArrayLike) -> None:
        self.sos = np.array(sos, dtype=float)
        if self.sos.ndim != 2 or self.sos.shape[1] != 6 or not np.all(self.sos[:, 3] == 1.0):
            raise ValueError("sos must be rows [b0, b1, b2, 1, a1, a2], not shape %r" % (self.sos.shape,))
        self.order = order = 2 * len(self.sos)
        # The state-space form (A, B, C, D) of one step of the cascade, read off the
        # recursion applied to each unit state and to a unit input.
        cols = [self._step(np.eye(order)[j], 0.0) for j in range(order)]
        a = np.array([c[0] for c in cols]).T
        c_row = np.array([c[1] for c in cols])
        b, d = self._step(np.zeros(order), 1.0)
        # The steady state for a constant input of 1 (scipy's sosfilt_zi, flattened), and the
        # output then (the DC gain).
        self.unit_step_state: Array = np.linalg.solve(np.eye(order) - a, b)
        self.dc_gain = float(c_row @ self.unit_step_state + d)
        # A block's matrices (module docstring), and A^r for r = 0..L (a frame's last block).
        n = SUB_BLOCK
        h = np.empty(n)
        zero_input = np.empty((n, order))
        state_from_input = np.empty((order, n))
        powers = np.empty((n + 1, order, order))
        row, col, power = c_row, b, np.eye(order)  # C A^i, A^i B, A^i
        for i in range(n):
            h[i] = d if i == 0 else zero_input[i - 1] @ b
            zero_input[i] = row
            state_from_input[:, n - 1 - i] = col
            powers[i] = power
            row, col, power = row @ a, a @ col, a @ power
        powers[n] = power
        lag = np.arange(n)[:, None] - np.arange(n)[None, :]
        self._toeplitz_t = np.where(lag >= 0, h[np.clip(lag, 0, None)], 0.0).T  # T transposed: x @ T.T
        self._zero_input_t = zero_input.T
        self._state_from_input_t = state_from_input.T
        self._powers_t = powers.transpose(0, 2, 1)  # (A^r).T
        self._chains: dict[int, tuple[Array, Array]] = {}  # by blocks a frame (_chain)

    def _step(self, s: Array, x: float) -> tuple[Array, float]:
        # One sample through the sections (transposed direct form II): (state after, output).
        out = np.empty(self.order)
        u = x
        for i, (b0, b1, b2, _, a1, a2) in enumerate(self.sos):
            v = b0 * u + s[2 * i]
            out[2 * i] = b1 * u - a1 * v + s[2 * i + 1]
            out[2 * i + 1] = b2 * u - a2 * v
            u = v
        return out, float(u)

    def _chain(self, blocks: int) -> tuple[Array, Array]:
        # For a frame of `blocks` blocks: the maps from the state before it (S x blocks*S) and
        # from what each block adds (blocks*S x blocks*S) to each block's starting state.
        made = self._chains.get(blocks)
        if made is None:
            s = self.order
            decay = [np.eye(s)]
            for _ in range(blocks):
                decay.append(decay[-1] @ self._powers_t[SUB_BLOCK])  # (A^(jL)).T
            from_state = np.hstack(decay[:blocks])
            from_added = np.zeros((blocks * s, blocks * s))
            for i in range(blocks):
                for j in range(i + 1, blocks):
                    from_added[i * s:(i + 1) * s, j * s:(j + 1) * s] = decay[j - 1 - i]
            made = self._chains[blocks] = (from_state, from_added)
        return made

    def filter(self, x: npt.ArrayLike, state: npt.ArrayLike) -> tuple[Array, Array]:
        """x: samples, shape (n,) or (rows, n); state: the state before them, (S,) or
        (rows, S). Returns (output of x's shape, state after them)."""
        a = np.asarray(x, dtype=float)
        s = np.asarray(state, dtype=float)
        n = a.shape[-1]
        if n == 0:
            return a.copy(), s.copy()
        # About the frame's first sample c (linearity): its steady response c * dc_gain, and
        # the deviations from it (the input's and the state's) through the blocks.
        c = a[..., :1]
        level = c * self.unit_step_state
        dev = a - c
        blocks = -(-n // SUB_BLOCK)
        last = n - (blocks - 1) * SUB_BLOCK  # samples in the last block (1..L)
        padded = np.zeros(a.shape[:-1] + (blocks * SUB_BLOCK,))
        padded[..., :n] = dev
        parts = padded.reshape(a.shape[:-1] + (blocks, SUB_BLOCK))
        added = parts @ self._state_from_input_t  # (..., blocks, S): what each block adds to the state
        e = s - level
        if blocks <= CHAINED_BLOCKS:
            # Each block's starting state at once: A^(jL) e + the blocks before it, decayed.
            from_state, from_added = self._chain(blocks)
            states = (e @ from_state + added.reshape(a.shape[:-1] + (blocks * self.order,)) @ from_added
                      ).reshape(a.shape[:-1] + (blocks, self.order))
        else:  # a whole recording: block by block
            states = np.empty(a.shape[:-1] + (blocks, self.order))
            decay_t = self._powers_t[SUB_BLOCK]
            for j in range(blocks):
                states[..., j, :] = e
                e = e @ decay_t + added[..., j, :]
        y = (parts @ self._toeplitz_t + states @ self._zero_input_t).reshape(padded.shape)[..., :n]
        y += c * self.dc_gain
        # The state after the last block's `last` samples (its padding is no input).
        after = (states[..., -1, :] @ self._powers_t[last]
                 + parts[..., -1, :last] @ self._state_from_input_t[SUB_BLOCK - last:])
        return y, level + after
