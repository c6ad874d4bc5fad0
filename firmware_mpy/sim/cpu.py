# The CPU time this MicroPython thread has really run, in microseconds: the
# kernel's own count (sum_exec_runtime, the first field of
# /proc/thread-self/schedstat, in ns). It leaves out what wall time less
# run-queue waits still held: the virtual CPU itself being descheduled by
# the hypervisor (steal time: this machine is a VM; with
# CONFIG_PARAVIRT_TIME_ACCOUNTING the scheduler's task clock excludes it),
# and any sleep inside a call. Measured on this machine, a 10 us span read
# by wall time less run_delay showed up to 1.1 ms (a 2-core VM with two CPU
# hogs beside it), by this meter at most 0.1 ms.
# The kernel brings that count up to date only at scheduler events (a tick,
# a switch), so it is read just after reading /proc/self/stat: for the
# whole process the kernel sums its threads' times and first updates the
# calling thread's (thread_group_cputime() calls task_sched_runtime() on
# current; kernel/sched/cputime.c), so the count is exact at that moment.
# (The unix port has no ffi for clock_gettime(CLOCK_THREAD_CPUTIME_ID), and
# its time.clock() has millisecond steps and allocates a float.) Reading
# allocates nothing.
import time

from micropython import const

_SCHEDSTAT = "/proc/thread-self/schedstat"
_STAT = "/proc/self/stat"
_STAT_BYTES = const(512)  # /proc/self/stat is ~300 bytes; only reading it matters
_PROBE_US = const(2000)


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
            self._f = open(_SCHEDSTAT, "rb")
            self._g = open(_STAT, "rb")
        except OSError:
            raise OSError("no %s: the board speed modes need Linux scheduler statistics" % _SCHEDSTAT) from None
        self._a = bytearray(96)
        self._s = bytearray(_STAT_BYTES)
        self._check()

    def _check(self):
        # The count must move with the CPU this thread runs, not only at the
        # kernel's ticks (4 ms at HZ=250): spin 2 ms of wall time, and each
        # reading along the way must have moved from the one before in most
        # of the steps (a tick-stale count would stand still in nearly all).
        t0 = time.ticks_us()
        last = self.now_us()
        steps = 0
        still = 0
        while time.ticks_diff(time.ticks_us(), t0) < _PROBE_US:
            now = self.now_us()
            steps += 1
            if now == last:
                still += 1
            last = now
        if still * 2 > steps:
            raise OSError("%s does not follow this thread's CPU time between scheduler ticks "
                          "(%d of %d readings stood still): the board speed modes cannot meter it"
                          % (_SCHEDSTAT, still, steps))

    def now_us(self):
        g = self._g
        g.seek(0)
        g.readinto(self._s)  # brings this thread's count up to date
        f = self._f
        f.seek(0)
        f.readinto(self._a)
        return _field(self._a, 0) // 1000

    # A measured span opens with start_us() and closes with stop_us(); the
    # meter's own work inside the span is the same every time: the clock
    # takes it off as its tare.
    def start_us(self):
        return self.now_us()

    def stop_us(self):
        return self.now_us()
