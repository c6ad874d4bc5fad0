import random

from agent.timemap import BoardClocks, TimeMap


def test_offset_and_drift_of_a_board_clock() -> None:
    rng = random.Random(5)
    tm = TimeMap()
    epoch_utc = 1_795_000_000_000.0
    drift = 80e-6  # the board's crystal runs 80 ppm slow
    for k in range(16):
        tick = k * 60_000 + 12_345
        true_utc = epoch_utc + tick / (1 - drift)
        rtt = rng.uniform(2, 20)
        sent = true_utc - rtt / 2 + rng.uniform(-1, 1)
        tm.add(tick, sent, sent + rtt)
    assert abs(tm.drift_ppm - 80) < 5, tm.drift_ppm
    tick = 16 * 60_000
    assert abs(tm.to_utc_ms(tick) - (epoch_utc + tick / (1 - drift))) < 10  # type: ignore[operator]
    assert tm.jumps == 0


def test_a_jump_is_counted_and_restarts_the_history() -> None:
    tm = TimeMap()
    for k in range(5):
        tm.add(k * 1000, 1e12 + k * 1000, 1e12 + k * 1000 + 4)
    tm.add(5000, 1e12 + 5000 + 3_600_000, 1e12 + 5000 + 3_600_004)  # the hub's clock moved an hour
    assert tm.jumps == 1 and len(tm.pairs) == 1
    assert abs(tm.to_utc_ms(5000) - (1e12 + 5000 + 3_600_002)) < 1  # type: ignore[operator]


def test_no_pair_no_time() -> None:
    assert TimeMap().to_utc_ms(1000) is None


def test_a_boards_clock_map_outlives_its_session_but_not_its_boot() -> None:
    clocks = BoardClocks(max_boards=2)
    first = clocks.for_boot("pb-a", 7)
    first.add(1000, 1e12, 1e12 + 4)
    again = clocks.for_boot("pb-a", 7)  # a reconnect, same boot: the map goes on
    assert again is first and again.to_utc_ms(2000) is not None
    rebooted = clocks.for_boot("pb-a", 8)  # a new epoch: ticks start again
    assert rebooted is not first and rebooted.to_utc_ms(2000) is None
    clocks.for_boot("pb-b", 1)
    clocks.for_boot("pb-c", 1)  # bounded: the least recently used board goes
    assert clocks.for_boot("pb-a", 8) is not rebooted
