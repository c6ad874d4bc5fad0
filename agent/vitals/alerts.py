"""Alert rules: a condition held for a minimum duration raises an alert;
it clears only once the value is back past a hysteresis margin for that
same duration. One raise and one clear per episode: no flapping, no
duplicates.

Default rules (the care team configures its own):
- SpO2 < 90 % for 30 s (clears at >= 92 %);
- heart rate outside 40-130 bpm for 30 s (clears inside 45-125);
- lead off for 60 s;
- a board silent for 2 min.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    name: str  # also the alert's code
    signal: str  # "spo2", "heart_rate", "lead_off", "silence_s"
    low: float | None = None  # raise below this
    high: float | None = None  # raise above this
    hysteresis: float = 0.0
    min_duration_s: float = 30.0


DEFAULT_RULES = (
    Rule("spo2_low", "spo2", low=90.0, hysteresis=2.0, min_duration_s=30.0),
    Rule("heart_rate_out_of_range", "heart_rate", low=40.0, high=130.0, hysteresis=5.0, min_duration_s=30.0),
    Rule("lead_off", "lead_off", high=0.5, min_duration_s=60.0),
    Rule("board_silent", "silence_s", high=120.0, min_duration_s=0.0),
)


@dataclass
class AlertEvent:
    device_id: str
    rule: str
    state: str  # "raised" or "cleared"
    at: float  # UTC seconds
    value: float


@dataclass
class _State:
    active: bool = False
    since: float | None = None  # when the condition (or its end) began to hold


@dataclass
class AlertEngine:
    rules: tuple[Rule, ...] = DEFAULT_RULES
    _states: dict[tuple[str, str], _State] = field(default_factory=dict)

    def _bad(self, rule: Rule, v: float, active: bool) -> bool:
        # While raised, the alert holds until the value is back past the margin.
        m = rule.hysteresis if active else 0.0
        return bool((rule.low is not None and v < rule.low + m) or (rule.high is not None and v > rule.high - m))

    def observe(self, device_id: str, signal: str, value: float, at: float) -> list[AlertEvent]:
        out = []
        for rule in self.rules:
            if rule.signal != signal:
                continue
            st = self._states.setdefault((device_id, rule.name), _State())
            changing = self._bad(rule, value, st.active) != st.active
            if not changing:
                st.since = None
                continue
            if st.since is None:
                st.since = at
            if at - st.since >= rule.min_duration_s:
                st.active = not st.active
                st.since = None
                out.append(AlertEvent(device_id, rule.name, "raised" if st.active else "cleared", at, value))
        return out

    def restore(self, device_id: str, rule: str, active: bool) -> None:
        """Sets an alert's state as last stored (after a restart): an alert still raised is not raised
        a second time, and clears as any other. Rules no longer configured are ignored."""
        if any(r.name == rule for r in self.rules):
            self._states[(device_id, rule)] = _State(active=active)

    def forget(self, device_id: str) -> None:
        for k in [k for k in self._states if k[0] == device_id]:
            del self._states[k]

    def active(self) -> list[tuple[str, str]]:
        return sorted(k for k, s in self._states.items() if s.active)
