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
#
# What the count cannot leave out: interrupts. A kernel built without
# CONFIG_IRQ_TIME_ACCOUNTING (this machine's) charges an interrupt handler
# and the softirq work run on its way out to whatever thread it
# interrupted. Traced here (perf, irq and softirq tracepoints, a 10 us
# loop metered 1.5 million times): nearly every span of 200-950 us was a
# virtio disk interrupt and its BLOCK softirq (other jobs' fsyncs, handled
# on the CPU that runs this thread), or a timer tick's TIMER, SCHED or RCU
# softirq; a few had no guest event at all (the hypervisor). At a chip's
# speed one such span is 30-130 ms of firmware code. So the meter also
# counts the softirqs run on this thread's CPU during each span
# (/proc/softirqs, read around the CPU count) and the page faults taken
# (host_events()), so that a chip clock can tell which spans the host
# reached: it cannot say how much of a span was the host's (that needs the
# kernel's irq time accounting), only that it was there.
import time

from micropython import const

_SCHEDSTAT = "/proc/thread-self/schedstat"
_STAT = "/proc/self/stat"
_SOFTIRQS = "/proc/softirqs"
_STAT_BYTES = const(512)  # /proc/self/stat is ~300 bytes
# /proc/self/stat's fields (proc(5)): page faults that needed no I/O and
# that did, and the CPU the thread last ran on.
_STAT_MINFLT = const(10)
_STAT_MAJFLT = const(12)
_STAT_PROCESSOR = const(39)
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
        # A span's start readings (start_us) beside its stop's: host_events()
        # compares them.
        self._s0 = bytearray(_STAT_BYTES)
        self._a0 = bytearray(96)
        try:
            self._q = open(_SOFTIRQS, "rb")
            size = 2 * len(self._q.read())  # (room for its counts to grow; the simulation's heap, not the firmware's)
        except OSError:
            self._q = None  # (no /proc/softirqs: host_events() says -1, unknown)
            size = 0
        self.sees_host = self._q is not None
        self.faults = 0
        self._q0 = bytearray(size)
        self._q1 = bytearray(size)
        self._n0 = 0  # (bytes read into each)
        self._n1 = 0
        self._w0 = time.ticks_us()  # wall us after a span's start reading, before its stop's
        self._w1 = self._w0
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
        return self._read(self._s, self._a)

    def _read(self, s, a):
        g = self._g
        g.seek(0)
        g.readinto(s)  # brings this thread's count up to date
        f = self._f
        f.seek(0)
        f.readinto(a)
        return _field(a, 0) // 1000

    # A measured span opens with start_us() and closes with stop_us(); the
    # meter's own work inside the span is the same every time: the clock
    # takes it off as its tare. The softirq counts are read outside the CPU
    # count's readings, so that whatever interrupt the span's CPU time holds
    # falls between them.
    # The wall time between the two readings is taken too (span_wall_us):
    # the span's code cannot have run longer than that, whatever the count
    # says. A count that moved further moved while the meter read it: the
    # kernel charged CPU time to the reading itself (measured: up to 5 ms of
    # one in a 10-minute benchmark, 600 ms at esp32 speed, with 2 us between
    # the readings), which is no firmware code's (sim.clock).
    def start_us(self):
        q = self._q
        if q is not None:
            q.seek(0)
            self._n0 = q.readinto(self._q0)
        t = self._read(self._s0, self._a0)
        self._w0 = time.ticks_us()
        return t

    def stop_us(self):
        self._w1 = time.ticks_us()
        t = self._read(self._s, self._a)
        q = self._q
        if q is not None:
            q.seek(0)
            self._n1 = q.readinto(self._q1)
        return t

    def span_wall_us(self):
        # Wall us from the last start_us() reading to the last stop_us() one.
        return time.ticks_diff(self._w1, self._w0)

    def host_events(self):
        # The softirqs run on this thread's CPU (on both, if it moved) and
        # the page faults taken between the last start_us() and stop_us()
        # (a chip takes none; here a fault that took long was the host's:
        # a page reclaimed, compacted or not yet backed); -1: not known here.
        if self._q is None:
            return -1
        s0 = self._s0
        s1 = self._s
        faults = (_stat_field(s1, _STAT_MINFLT) - _stat_field(s0, _STAT_MINFLT)
                  + _stat_field(s1, _STAT_MAJFLT) - _stat_field(s0, _STAT_MAJFLT))
        self.faults = faults  # (the last span's, apart)
        return faults + self._softirqs()

    def _softirqs(self):
        c0 = _stat_field(self._s0, _STAT_PROCESSOR)
        c1 = _stat_field(self._s, _STAT_PROCESSOR)
        q0 = self._q0
        q1 = self._q1
        n0 = self._n0
        n1 = self._n1
        n = _softirqs_on(q1, n1, c0) - _softirqs_on(q0, n0, c0)
        if c1 != c0:
            n += _softirqs_on(q1, n1, c1) - _softirqs_on(q0, n0, c1)
        return n


def _stat_field(buf, k):
    # Field k (1-based, as proc(5) numbers them, 3 or more) of a
    # /proc/<pid>/stat line: counted from the ')' closing the command's name
    # (field 2). Only field k is parsed: others hold numbers past the small
    # ints (rsslim: 2**64 - 1), which would allocate.
    i = 0
    while buf[i] != 41:
        i += 1
    while True:  # (the name may hold a ')' too: the last one closes it)
        j = i + 1
        while buf[j] != 41 and buf[j] != 10 and buf[j] != 0:
            j += 1
        if buf[j] != 41:
            break
        i = j
    f = 2
    i += 1
    while f < k:
        if buf[i] == 32:
            f += 1
        i += 1
    v = 0
    while 48 <= buf[i] <= 57:
        v = v * 10 + buf[i] - 48
        i += 1
    return v


def _softirqs_on(buf, end, cpu):
    # The sum of the counts in column cpu of /proc/softirqs (buf[:end]): a
    # header line of CPU names, then a line a kind of softirq, "NAME:" and
    # a count per CPU.
    i = 0
    while i < end and buf[i] != 10:  # past the header
        i += 1
    total = 0
    col = -1
    v = 0
    digits = False
    while i < end:
        c = buf[i]
        if c == 58:  # "NAME:": the counts follow
            col = 0
        elif 48 <= c <= 57 and col >= 0:
            v = v * 10 + c - 48
            digits = True
        elif digits:
            if col == cpu:
                total += v
            col += 1
            v = 0
            digits = False
        if c == 10:
            col = -1
        i += 1
    return total
