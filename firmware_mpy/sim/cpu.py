# The CPU time this MicroPython process has really used, in microseconds,
# robust to a busy machine: wall time (ticks_us) less the time the kernel
# kept this thread waiting to run (run_delay in /proc/thread-self/schedstat,
# which the scheduler accounts in nanoseconds each time the thread gets a
# CPU back). Between two samples taken while the thread never sleeps
# voluntarily, the difference is the CPU time it ran. (The unix port has no
# ffi for clock_gettime(CLOCK_THREAD_CPUTIME_ID), and its time.clock() has
# millisecond steps.) Preemption between reading the wall clock and the
# file is caught by reading the file on both sides: if run_delay moved, the
# sample is taken again. Reading allocates nothing.
import time

from micropython import const

_PATH = "/proc/thread-self/schedstat"
_RETRIES = const(8)


def _field(buf, k):
    # The k-th decimal field of a schedstat line, parsed without allocating.
    v = 0
    f = 0
    i = 0
    while True:
        c = buf[i]
        if c == 32 or c == 10:
            if f == k:
                return v
            f += 1
            v = 0
        else:
            v = v * 10 + c - 48
        i += 1


class ThreadCpu:
    def __init__(self):
        try:
            self._f = open(_PATH, "rb")
        except OSError:
            raise OSError("no %s: the board speed modes need Linux scheduler statistics" % _PATH) from None
        self._a = bytearray(96)
        self._b = bytearray(96)
        self.retries = 0
        self._last = time.ticks_us()
        self._wall = 0  # ticks_us unwrapped (it wraps every 2**30 us on the unix port)

    def _wall_us(self):
        t = time.ticks_us()
        self._wall += time.ticks_diff(t, self._last)
        self._last = t
        return self._wall

    def now_us(self):
        # A reading on its own (as good as start_us and stop_us, not as cheap).
        f = self._f
        a = self._a
        b = self._b
        for _ in range(_RETRIES):
            f.seek(0)
            f.readinto(a)
            w = self._wall_us()
            f.seek(0)
            f.readinto(b)
            d = _field(a, 1)
            if d == _field(b, 1):
                return w - d // 1000
            self.retries += 1
        return w - _field(b, 1) // 1000

    # A measured span opens with start_us() and closes with stop_us(): the
    # wall clock is read last in one and first in the other, so little of
    # the meter's own work falls inside the span (what does is the same every
    # time: the clock takes it off as its tare). A preemption between the
    # wall clock and the file shows as run_delay moving across the second
    # reading of the file: the reading is taken again.
    def start_us(self):
        f = self._f
        a = self._a
        b = self._b
        for _ in range(_RETRIES):
            f.seek(0)
            f.readinto(a)
            d = _field(a, 1)
            w = self._wall_us()
            f.seek(0)
            f.readinto(b)
            if _field(b, 1) == d:
                return w - d // 1000
            self.retries += 1
        return w - d // 1000

    def stop_us(self):
        f = self._f
        a = self._a
        b = self._b
        for _ in range(_RETRIES):
            f.seek(0)
            f.readinto(a)
            w = self._wall_us()
            f.seek(0)
            f.readinto(b)
            d = _field(b, 1)
            if _field(a, 1) == d:
                return w - d // 1000
            self.retries += 1
        return w - d // 1000
