# The simulated board's time. RealClock follows the host's monotonic clock;
# VirtualClock only moves when the board sleeps, so a long run takes only
# the CPU time it needs (benchmarks, soak tests) and is reproducible.
import time


class RealClock:
    def __init__(self):
        self._t0 = time.ticks_us()

    def now_us(self):
        return time.ticks_diff(time.ticks_us(), self._t0)

    def sleep_ms(self, ms):
        time.sleep_ms(ms)


class VirtualClock:
    def __init__(self):
        self.t_us = 0

    def now_us(self):
        return self.t_us

    def sleep_ms(self, ms):
        self.t_us += ms * 1000
