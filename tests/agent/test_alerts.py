from agent.vitals.alerts import AlertEngine


def _feed(engine: AlertEngine, values: list[float], signal: str = "spo2", dt: float = 1.0) -> list[tuple[float, str]]:
    out = []
    for i, v in enumerate(values):
        for ev in engine.observe("pb-1", signal, v, i * dt):
            out.append((ev.at, ev.state))
    return out


def test_spo2_below_90_for_30_s_raises_once_and_clears_with_hysteresis() -> None:
    e = AlertEngine()
    values = [96] * 10 + [88] * 20 + [95] * 3 + [88] * 40 + [91] * 40 + [93] * 40
    events = _feed(e, values)
    # a 20 s dip does not alarm; the 40 s one does, at its 30th second; 91 % is not yet clear (hysteresis);
    # 93 % held 30 s clears it.
    assert events == [(63.0, "raised"), (143.0, "cleared")]
    assert e.active() == []


def test_heart_rate_both_bounds_and_no_flapping() -> None:
    e = AlertEngine()
    hr = [135, 128] * 30 + [128] * 40  # oscillating around the bound: never 30 s above it
    assert _feed(e, hr, "heart_rate") == []
    assert _feed(AlertEngine(), [35] * 31, "heart_rate") == [(30.0, "raised")]


def test_silent_board_raises_at_once() -> None:
    e = AlertEngine()
    assert [ev.state for ev in e.observe("pb-2", "silence_s", 125, 1000.0)] == ["raised"]
    assert e.observe("pb-2", "silence_s", 130, 1001.0) == []  # deduplicated
    assert [ev.state for ev in e.observe("pb-2", "silence_s", 0, 1002.0)] == ["cleared"]
