# The CPU meter's own cost inside a measured span, for the benchmarks that
# time short spans (sim/bench_ota.py, sim/bench_origin.py). A module of its
# own: sim/cpu.py is loaded by every simulated board, whose interned names
# the firmware benchmark's heap figures account for.

_TARE_SPANS = 1000


def tare_milli(meter):
    # What an empty span between two now_us() readings of meter shows, in
    # thousandths of a us: the reading's own cost inside a span (~6 us
    # here for sim.cpu.ThreadCpu: two /proc reads), which a benchmark
    # timing short spans with now_us() takes off each (the chip clock
    # measures its own, sim.clock). The mean of the middle 80 %
    # of _TARE_SPANS (a preemption or a tick is not the meter's).
    d = [0] * _TARE_SPANS
    for i in range(_TARE_SPANS):
        t0 = meter.now_us()
        d[i] = meter.now_us() - t0
    d.sort()
    lo = _TARE_SPANS // 10
    mid = d[lo:_TARE_SPANS - lo]
    return sum(mid) * 1000 // len(mid)
