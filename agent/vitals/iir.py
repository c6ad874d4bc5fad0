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
# A sliding zero-phase window's frames of at most this many samples go through one product
# made once per frame length ((n + S) x (n + 2S) values: 0.1 MB for a 100-sample frame), for at
# most FRAME_MAPS lengths (a board sets its frame's length: the maps a design holds are bounded);
# other frames go through the cascade twice.
FRAME_MAP_MAX = 256
FRAME_MAPS = 4


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



class ZeroPhaseWindow:
    """A sliding window's zero-phase band: the linear trend off, then the cascade forward and
    backward over the window with filtfilt's odd extension of `pad` samples at each end, each
    pass starting in the steady state of its first sample (scipy's detrend, then sosfiltfilt).
    `reference` computes it for a whole window; `SlidingZeroPhase` keeps it for a stream's
    last `window` samples, frame by frame, from the matrices made here once per design and
    window (they hold no signal's state: every stream of a rate shares them).

    Why the band can follow a stream: every step is linear, so it splits into parts that each
    follow the stream cheaply. With F the cascade from zero state, R the same backward (from
    the window's end), Z the cascade's output from each unit state with no input (S x window),
    s the stream through the cascade, carried from the stream's start, sigma(w0) that
    carried state at the window's first sample, a and b the window's mean and slope:
        band = R(s over the window) + (sigma0 - sigma(w0)) @ R(Z) - a R(F(1)) - b R(F(t))
               + reversed(tau @ Z),
    sigma0 the forward state after the front extension and tau the backward state after
    the end's (each from the p + 1 samples at that end). R(s over the window) is kept: a
    frame adds its samples' backward response and, to the samples already there, that
    response's state decaying back through them (one (rows x S) @ (S x window) product).
    The rest are matrices made here. A frame then costs its own samples through the cascade
    twice, the ends' few samples and a few (S x window) products, where the whole window took
    two passes over window + 2 pad samples.
    """

    def __init__(self, cascade: SosCascade, window: int, pad: int) -> None:
        """Raises ValueError unless 0 < pad < window."""
        if not 0 < pad < window:
            raise ValueError("pad %d must be within (0, window %d)" % (pad, window))
        self.cascade, self.window, self.pad = cascade, window, pad
        t: Array = np.arange(window, dtype=float) - (window - 1) / 2.0
        self.t_centred = t
        self.slope_weights = t / float(np.dot(t, t))  # the linear trend's slope is dot(x, this)
        s = cascade.order
        unit = cascade.unit_step_state
        zi, self.decay = cascade.filter(np.zeros((s, window)), np.eye(s))  # Z, and A^window (row form)
        self.zi_rev: Array = np.ascontiguousarray(zi[:, ::-1])
        f1, self.end_1 = cascade.filter(np.ones(window), np.zeros(s))
        ft, self.end_t = cascade.filter(t, np.zeros(s))
        # The band's terms past R(s) as one product: [sigma0 - sigma(w0), a, b, tau] @ this.
        self.terms: Array = np.vstack([self.backward(zi), -self.backward(f1), -self.backward(ft), self.zi_rev])
        # The ends' extensions, as maps of the p + 1 detrended samples at each end (and of the
        # forward state after the window): sigma0 = head @ front, tau = tail @ end + sigma_end @ end_state.
        ends = np.eye(pad + 1)
        ext = 2 * ends[:, :1] - ends[:, pad:0:-1]
        _, self.front = cascade.filter(ext, ext[:, :1] * unit)
        ext = 2 * ends[:, -1:] - ends[:, -2::-1]
        fwd, _ = cascade.filter(ext, np.zeros((pad + 1, s)))
        _, self.end = cascade.filter(fwd[:, ::-1], fwd[:, -1:] * unit)
        fwd, _ = cascade.filter(np.zeros((s, pad)), np.eye(s))
        _, self.end_state = cascade.filter(fwd[:, ::-1], fwd[:, -1:] * unit)
        self._frame_maps: dict[int, Array] = {}

    def frame_step(self, x: Array, state: Array) -> tuple[Array, Array, Array]:
        """A stream's next frame x (rows, n) from the carried forward state (rows, S): (R of the
        frame's forward output, (rows, n); the backward pass's state after it, its decay
        back through the samples before; the forward state after the frame)."""
        n, s = x.shape[1], self.cascade.order
        made = self._frame_maps.get(n)
        if made is None and n <= FRAME_MAP_MAX and len(self._frame_maps) < FRAME_MAPS:
            # The three as one linear map of [x, state], read off the unit inputs and states, and
            # below it their values for a constant 1 from its steady state (exact: the filter's).
            unit = self.cascade.unit_step_state
            eye = np.eye(n + s)
            steady = np.hstack(self._frame_step(np.ones((1, n)), unit[None, :]))
            made = self._frame_maps[n] = np.vstack([np.hstack(self._frame_step(eye[:, :n], eye[:, n:])), steady])
        if made is None:
            return self._frame_step(x, state)
        # About the frame's first sample c, as SosCascade.filter: the deviations through the map
        # (a large level would cost precision), the level's steady response added.
        c = x[:, :1]
        out = (x - c) @ made[:n] + (state - c * self.cascade.unit_step_state) @ made[n:n + s] + c * made[n + s]
        return out[:, :n], out[:, n:n + s], out[:, n + s:]

    def _frame_step(self, x: Array, state: Array) -> tuple[Array, Array, Array]:
        fwd, after = self.cascade.filter(x, state)
        back, rho = self.cascade.filter(fwd[:, ::-1], np.zeros_like(state))
        return back[:, ::-1], rho, after

    def backward(self, y: Array) -> Array:
        """The cascade run backward over y's last axis from zero state (R above)."""
        out, _ = self.cascade.filter(y[..., ::-1], np.zeros(y.shape[:-1] + (self.cascade.order,)))
        return np.asarray(out[..., ::-1])

    def reference(self, x: Array) -> Array:
        """The band of a whole window x, shape (rows, window), computed directly."""
        y = x - x.mean(axis=1, keepdims=True) - np.outer(x @ self.slope_weights, self.t_centred)
        p = self.pad
        ext = np.concatenate([2 * y[:, :1] - y[:, p:0:-1], y, 2 * y[:, -1:] - y[:, -2:-p - 2:-1]], axis=1)
        unit = self.cascade.unit_step_state
        fwd, _ = self.cascade.filter(ext, ext[:, :1] * unit)
        back, _ = self.cascade.filter(fwd[:, ::-1], fwd[:, -1:] * unit)
        return np.asarray(back[:, ::-1][:, p:p + x.shape[1]])


class SlidingZeroPhase:
    """A stream's last `design.window` samples and their zero-phase band (ZeroPhaseWindow),
    kept frame by frame: the band equals `design.reference` of those samples up to
    floating-point rounding. Rows are signals filtered alike (frames of shape (rows, n)).
    Memory: the window's samples (and the frame the window starts in), its kept backward
    response and the cascade's state."""

    def __init__(self, design: ZeroPhaseWindow) -> None:
        self.design = design
        self.reset()

    def reset(self) -> None:
        """Forgets the stream: the next frame starts it anew."""
        self._frames: list[tuple[int, Array, Array]] = []  # (first index, carried state before, samples)
        self._state: Array | None = None  # the carried forward state after the last sample
        self._r_s: Array | None = None  # R(s) over the last samples (up to a window), backward from the last
        self.count = 0  # samples since the stream (re)started

    def push(self, x: Array) -> None:
        """The stream's next samples, shape (rows, n), finite."""
        n = x.shape[1]
        if n == 0:
            return
        w = self.design.window
        if self._state is None:
            self._state = x[:, :1] * self.design.cascade.unit_step_state
        self._frames.append((self.count, self._state, x))
        # The forward pass carried; its backward response from the frame's end. (A frame
        # longer than the window: only its last window's samples stay in R(s).)
        r_new, rho, self._state = self.design.frame_step(x, self._state)
        self.count += n
        if self._r_s is None or n >= w:
            r_s = r_new[:, -w:]
        else:
            # The samples already there get what the new ones add, decaying back through them.
            kept = self._r_s.shape[1]
            old = self._r_s + (rho @ self.design.zi_rev)[:, w - kept:]
            r_s = np.concatenate([old[:, max(0, kept + n - w):], r_new], axis=1)
        self._r_s = r_s
        w0 = self.count - w
        while len(self._frames) > 1 and self._frames[1][0] <= w0:
            del self._frames[0]

    def window_and_band(self) -> tuple[Array, Array] | None:
        """The last window's samples and their band, each (rows, window); None while fewer
        than a window's samples came since the stream (re)started."""
        d = self.design
        w, p, cascade = d.window, d.pad, d.cascade
        if self.count < w or self._r_s is None or self._state is None:
            return None
        w0 = self.count - w
        first, state, _ = self._frames[0]
        x = np.concatenate([f[2] for f in self._frames], axis=1)
        if first < w0:  # the window starts within its first frame: the carried state there
            _, state = cascade.filter(x[:, :w0 - first], state)
            x = x[:, w0 - first:]
        a = x.sum(axis=1, keepdims=True) / w  # the mean
        b = (x @ d.slope_weights)[:, None]
        t = d.t_centred
        sigma0 = (x[:, :p + 1] - a - b * t[:p + 1]) @ d.front
        # The forward pass's state after the window, then the backward pass's as it enters it
        # (after the end's extension).
        sigma_end = self._state + (sigma0 - state) @ d.decay - a * d.end_1 - b * d.end_t
        tau = (x[:, -p - 1:] - a - b * t[-p - 1:]) @ d.end + sigma_end @ d.end_state
        band = self._r_s + np.hstack([sigma0 - state, a, b, tau]) @ d.terms
        return x, np.asarray(band)
