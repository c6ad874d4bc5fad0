"""Board ticks to UTC, from time request/response pairs (coincident timestamps).

The hub asks a board for its tick (TimeRequest); the board answers with its
tick (TimeResponse). The pair (board tick, hub UTC at the midpoint of the
round trip) is accurate to half the round trip. A least-squares line through
the last pairs gives the board clock's offset and drift; a pair far off the
line is a jump (the board's clock or the hub's moved): counted, and the
history restarts from it.
"""

from __future__ import annotations

from collections import deque

# Pairs kept for the fit: at one a minute, a quarter of an hour.
MAX_PAIRS = 16
# Off the line by more than this (plus the round trips' uncertainty): a jump.
JUMP_MS = 50.0


class TimeMap:
    def __init__(self) -> None:
        self.pairs: deque[tuple[float, float]] = deque(maxlen=MAX_PAIRS)
        self.rtts: deque[float] = deque(maxlen=MAX_PAIRS)
        self.jumps = 0
        self._a = 0.0  # utc = a + b * tick
        self._b = 1.0
        self.last_rtt_ms = 0.0

    @property
    def ready(self) -> bool:
        return bool(self.pairs)

    @property
    def drift_ppm(self) -> float:
        return (self._b - 1.0) * 1e6

    @property
    def drift_uncertainty_ppm(self) -> float:
        """How far the drift estimate may be off: each pair is good to half its
        round trip, over the span of ticks the pairs cover."""
        if len(self.pairs) < 2:
            return float("inf")
        span = self.pairs[-1][0] - self.pairs[0][0]
        return float("inf") if span <= 0 else max(self.rtts) / span * 1e6

    def to_utc_ms(self, tick_ms: float) -> float | None:
        if not self.pairs:
            return None
        return self._a + self._b * tick_ms

    def add(self, tick_ms: int, sent_utc_ms: float, received_utc_ms: float) -> None:
        rtt = max(0.0, received_utc_ms - sent_utc_ms)
        utc = sent_utc_ms + rtt / 2
        self.last_rtt_ms = rtt
        predicted = self.to_utc_ms(tick_ms)
        # The new pair is good to half its round trip, the line to half the
        # worst round trip among its pairs: only what both cannot explain is a jump.
        slack = JUMP_MS + rtt / 2 + (max(self.rtts) / 2 if self.rtts else 0.0)
        if predicted is not None and abs(predicted - utc) > slack:
            self.jumps += 1
            self.pairs.clear()
            self.rtts.clear()
        self.pairs.append((float(tick_ms), utc))
        self.rtts.append(rtt)
        self._fit()

    def _fit(self) -> None:
        n = len(self.pairs)
        ticks = [p[0] for p in self.pairs]
        utcs = [p[1] for p in self.pairs]
        span = max(ticks) - min(ticks)
        if n < 2 or span < 10_000:  # under 10 s of history a drift estimate is noise
            self._b = 1.0
            self._a = sum(u - t for t, u in self.pairs) / n
            return
        mt = sum(ticks) / n
        mu = sum(utcs) / n
        cov = sum((t - mt) * (u - mu) for t, u in self.pairs)
        var = sum((t - mt) ** 2 for t in ticks)
        self._b = cov / var
        self._a = mu - self._b * mt


# Boards whose clock maps are kept between sessions: bounded like the registry's
# active boards; the least recently used goes first.
MAX_BOARDS = 256


class BoardClocks:
    """One TimeMap per board boot, (device id, boot epoch), kept across the
    board's sessions: a reconnect (a cable cut, a BLE link lost) keeps the
    board's ticks, so the frames it resends at once are placed in UTC as before
    instead of by their arrival, and the drift estimate goes on. A new epoch
    (the board rebooted, its ticks start again) gets a new map."""

    def __init__(self, max_boards: int = MAX_BOARDS) -> None:
        self.max_boards = max_boards
        self._maps: dict[str, tuple[int, TimeMap]] = {}

    def for_boot(self, device_id: str, epoch: int) -> TimeMap:
        known = self._maps.pop(device_id, None)
        tm = known[1] if known is not None and known[0] == epoch else TimeMap()
        self._maps[device_id] = (epoch, tm)  # the most recent last
        while len(self._maps) > self.max_boards:
            self._maps.pop(next(iter(self._maps)))
        return tm
