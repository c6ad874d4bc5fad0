# The simulated board's time. RealClock follows the host's monotonic clock;
# VirtualClock only moves when the board sleeps, so a long run takes only
# the CPU time it needs (benchmarks, soak tests) and is reproducible.
# ChipClock runs the board at a chip's speed: it moves by the CPU time the
# firmware really takes here times the chip's speed factor, plus the time
# the chip would spend in I/O, so the firmware meets its sensors as it
# would on the chip.
#
# Every piece of the simulation the firmware calls (chip models, buses,
# console, radio) brackets itself with enter() and leave(): the host time
# spent between them is the simulation's, never charged to the firmware,
# and so are the bytes it allocates.
import time

import micropython
from micropython import const

# MicroPython's scheduler queue (MICROPY_SCHEDULER_DEPTH on the esp32 port):
# soft IRQ callbacks (machine.Timer, Pin.irq) wait there while the VM cannot
# run them (inside a C call: a bus transfer, a blocking write, a GC);
# beyond it, mp_sched_schedule() fails and the interrupt is lost.
SCHED_DEPTH = const(8)
# Bytes allocated since start, and of those the ones not freed explicitly:
# the unix port counts them (MICROPY_MEM_STATS); an ESP32 build does not,
# hence no stub. A call whose frame needs more than 11 words (locals and
# stack) allocates it on the heap and frees it on return: that shows in
# mem_total only; garbage, which the GC must collect, shows in mem_current.
mem_total = micropython.mem_total  # type: ignore[attr-defined]
mem_current = micropython.mem_current  # type: ignore[attr-defined]
_TARE_SAMPLES = const(1000)
# How fast this machine runs now (a shared machine's cores slow down when
# their neighbours get busy: caches, a sibling hyperthread; the CPU figures
# of a 10-minute run moved from 29 % to 47 % with the load): a fixed probe
# run every second of chip time, the median of the last few against the
# fastest run at calibration scales the factor.
_PROBE_EVERY_US = const(1000000)
_PROBES = const(9)
# Spans of firmware code at least this long (chip us) are asked whether the
# host reached them (sim.cpu: the kernel charges an interrupt's softirqs to
# the thread it interrupted; a page fault): 5 ms at a chip's speed are ~40
# us here, and a shorter span cannot cost a FIFO its samples whatever ran
# in it.
_HOST_LOOK_US = const(5000)
# A span's CPU count may pass its wall time by this much (host us) before
# the excess is taken for what it is, CPU time the kernel charged while the
# meter read its count (sim.cpu): the two clocks' rounding and their tares'
# spread stay far below it.
_OUTSIDE_SLACK_US = const(20)


class _Plain:
    # What VirtualClock and RealClock share: the simulation's bracketing
    # only unlocks the heap (lock_heap), bus time is not modelled, timers
    # fire from the board loop.
    chip = False
    sim_alloc = 0
    sim_garbage = 0
    host_spans = 0
    heap_locked = False
    _depth = 0

    def lock_heap(self):
        # (Tests) From here on the firmware runs under micropython.heap_lock():
        # whatever it allocates raises MemoryError where it does; the
        # simulation (between enter() and leave()) may allocate.
        self.heap_locked = True
        self._depth = 0  # (an instance attribute now: made under the lock, it would allocate)
        micropython.heap_lock()

    def unlock_heap(self):
        if self.heap_locked:
            self.heap_locked = False
            micropython.heap_unlock()

    def enter(self):
        if self.heap_locked:
            self._depth += 1
            if self._depth == 1:
                micropython.heap_unlock()

    def leave(self):
        if self.heap_locked:
            self._depth -= 1
            if self._depth == 0:
                micropython.heap_lock()

    def charge_io_us(self, us):
        pass

    def add_source(self, src):
        pass


def _middle_mean_milli(d):
    # The mean of the middle 80 % of d (sorted in place), in thousandths.
    d.sort()
    lo = len(d) // 10
    mid = d[lo:len(d) - lo]
    return sum(mid) * 1000 // len(mid)


class RealClock(_Plain):
    def __init__(self):
        self._t0 = time.ticks_us()

    def now_us(self):
        return time.ticks_diff(time.ticks_us(), self._t0)

    def sleep_ms(self, ms):
        time.sleep_ms(ms)


class VirtualClock(_Plain):
    def __init__(self):
        self.t_us = 0

    def now_us(self):
        return self.t_us

    def sleep_ms(self, ms):
        self.t_us += ms * 1000


class ChipClock:
    # factor_milli: chip microseconds per 1000 host CPU microseconds (from
    # sim.speedbench.calibrate). meter: a CPU time source (sim.cpu.ThreadCpu).
    # real_time: sleep on the host too, so the board keeps pace with the
    # wall clock (a live simulated board); else time only moves (benchmarks).
    # probe: a fixed piece of work (sim.speedbench.Probe) that keeps the
    # factor true to this machine's speed of the moment: taken right after
    # the calibration, its fastest run stands for the speed the factor was
    # calibrated at; run again every second of chip time while the board
    # sleeps, the median of its last runs against that scales the factor.
    chip = True

    def __init__(self, factor_milli, meter, real_time=False, probe=None):
        self.t_us = 0
        self.factor_milli = factor_milli
        self.calibrated_milli = factor_milli
        self.factor_lo_milli = factor_milli  # the range the factor took
        self.factor_hi_milli = factor_milli
        self.probes = 0
        self._probe = probe
        self._probe_us = [0] * _PROBES  # the last runs' host us, a ring
        self._probe_sorted = [0] * _PROBES
        self._probe_fastest = 0
        self._next_probe_us = _PROBE_EVERY_US
        self._meter = meter
        self._depth = 0
        self._frac = 0
        self._irq = False
        self._sources = []
        self._queue = []  # (source) waiting in the scheduler queue
        self._next_t = 0
        self.compute_us = 0  # chip time the firmware ran code (main loop and callbacks)
        self.io_us = 0  # chip time it waited in blocking I/O (buses, console)
        self.idle_us = 0  # chip time it slept
        self.sched_dropped = 0  # soft IRQs lost: the scheduler queue was full
        # The longest span of firmware code charged at once (chip us), and
        # when it ended: one interrupt of this machine's charged to it
        # (0.2-1 ms, sim.cpu) is 20-200 ms of a chip's time, and shows here.
        self.longest_span_us = 0
        self.longest_span_at_us = 0
        self.stretch_span_us = 0  # the same since sim.stretches last reset it
        # Spans the host reached (a softirq ran on this thread's CPU
        # meanwhile, or a page fault: charged to it, sim.cpu), of
        # _HOST_LOOK_US or more: how many, the chip time charged in them,
        # the longest; and the longest span the host was not seen in. A
        # FIFO's service whose wait held such a span says so
        # (sim.models.SimIrqPin). host_spans is -1 where the meter cannot
        # tell (no /proc/softirqs).
        sees = getattr(meter, "sees_host", False)
        self._host_events = meter.host_events if sees else None
        self.host_spans = 0 if sees else -1
        self.host_span_us = 0
        self.host_fault_spans = 0  # of host_spans, those with a page fault
        self.longest_host_span_us = 0
        self.longest_clean_span_us = 0
        self.longest_clean_span_at_us = 0  # (when it ended)
        # A span's CPU time is held to its wall time (the meter's
        # span_wall_us, where it has one): what the count moved beyond it
        # moved while the meter read it, and is not charged; here how much
        # (host us), in how many spans past _OUTSIDE_SLACK_US, the most.
        self._span_wall = getattr(meter, "span_wall_us", None)
        self.wall_tare_milli = 0
        self.outside_us = 0
        self.outside_spans = 0
        self.outside_max_us = 0
        self._stop_us = 0  # the meter's reading at the last span's end
        self._span_host_us = 0  # the last span's readings, raw (the tares are measured on them)
        self._span_wall_us = 0
        self.sim_alloc = 0  # bytes the simulation allocated (not the firmware's)
        self.sim_garbage = 0  # of those, the ones left to the GC
        self._alloc_mark = 0
        self._garbage_mark = 0
        self.tare_us = 0
        self.tare_milli = 0
        self.real_time = real_time
        self._wall0 = time.ticks_ms()
        self._wall = 0
        self._measure_tare()
        if probe is not None:
            for i in range(_PROBES):
                self._probe_us[i] = self._run_probe()
            self._probe_fastest = min(self._probe_us)
            self._rescale()
        self._mark = meter.start_us()
        self.sim_alloc = 0
        self.sim_garbage = 0

    def _measure_tare(self):
        # What an empty span between leave() and the next enter() shows: the
        # meter's and the bracketing's own work, taken off every span. The
        # mean of many (the middle 80 %: a preemption or a tick is not the
        # meter's), in thousandths of a host us: a span is read in whole us,
        # and its fraction, times the chip's factor, would add up otherwise.
        # The wall time between the readings likewise (wall_tare_milli).
        m = self._meter
        d = [0] * _TARE_SAMPLES
        w = [0] * _TARE_SAMPLES
        self._mark = m.start_us()
        for i in range(_TARE_SAMPLES):
            self.enter()
            self.leave()
            d[i] = self._span_host_us
            w[i] = self._span_wall_us
        self.tare_milli = _middle_mean_milli(d)
        self.tare_us = self.tare_milli // 1000
        self.wall_tare_milli = _middle_mean_milli(w)
        self.compute_us = 0
        self.t_us = 0
        self._frac = 0
        self.longest_span_us = 0
        self.longest_clean_span_us = 0
        if self.host_spans > 0:
            self.host_spans = 0
        self.host_span_us = 0
        self.host_fault_spans = 0
        self.longest_host_span_us = 0
        self.outside_us = 0
        self.outside_spans = 0
        self.outside_max_us = 0

    def _run_probe(self):
        m = self._meter
        t0 = m.now_us()
        self._probe.run()
        return m.now_us() - t0

    def _rescale(self):
        # The factor at this machine's speed of the last _PROBES probes (their
        # median, sorted in place: nothing allocated).
        a = self._probe_sorted
        for i in range(_PROBES):
            v = self._probe_us[i]
            j = i
            while j > 0 and a[j - 1] > v:
                a[j] = a[j - 1]
                j -= 1
            a[j] = v
        f = self.calibrated_milli * self._probe_fastest // max(1, a[_PROBES // 2])
        self.factor_milli = f
        if f < self.factor_lo_milli:
            self.factor_lo_milli = f
        if f > self.factor_hi_milli:
            self.factor_hi_milli = f

    def _maybe_probe(self):
        # (Between enter() and leave(): the probe's time is the simulation's.)
        if self._probe is not None and self.t_us >= self._next_probe_us:
            self._next_probe_us = self.t_us + _PROBE_EVERY_US
            self._probe_us[self.probes % _PROBES] = self._run_probe()
            self.probes += 1
            self._rescale()

    # ---- the firmware enters and leaves the simulation ---------------------
    def enter(self):
        self._depth += 1
        if self._depth == 1:  # (the simulation's own calls to the clock nest)
            # The firmware's span ends with the meter's reading, before
            # anything else: _charge_cpu's own call frame (over 11 words,
            # from the heap) is the simulation's. From here on what is
            # allocated is the simulation's, the clock's own work included
            # (callbacks it runs are the firmware's again).
            self._stop_us = self._meter.stop_us()
            self._alloc_mark = mem_total()
            self._garbage_mark = mem_current()
            self._charge_cpu()

    def leave(self):
        self._depth -= 1
        if self._depth == 0:
            self.sim_alloc += mem_total() - self._alloc_mark
            self.sim_garbage += mem_current() - self._garbage_mark
            self._mark = self._meter.start_us()

    def _chip_us(self, host_us, wall_us):
        # Chip us for a span of host_us CPU in wall_us (-1: not known), its
        # tare off; the remainder carries.
        x = host_us * 1000 - self.tare_milli
        if wall_us >= 0:
            y = wall_us * 1000 - self.wall_tare_milli
            if x - y > _OUTSIDE_SLACK_US * 1000:  # counted while the meter read it: not the span's
                e = (x - y) // 1000
                self.outside_us += e
                self.outside_spans += 1
                if e > self.outside_max_us:
                    self.outside_max_us = e
                x = y
        if x <= 0:
            return 0
        x = x * self.factor_milli + self._frac
        self._frac = x % 1000000
        return x // 1000000

    def _charge_cpu(self):
        h = self._stop_us - self._mark
        w = self._span_wall() if self._span_wall is not None else -1
        self._span_host_us = h
        self._span_wall_us = w
        d = self._chip_us(h, w)
        if d > self.longest_span_us:
            self.longest_span_us = d
            self.longest_span_at_us = self.t_us + d
        events = self._host_events
        host = d >= _HOST_LOOK_US and events is not None and events() > 0
        if host:
            if self._meter.faults:
                self.host_fault_spans += 1
            self.host_span_us += d
            if d > self.longest_host_span_us:
                self.longest_host_span_us = d
        elif d > self.longest_clean_span_us:
            self.longest_clean_span_us = d
            self.longest_clean_span_at_us = self.t_us + d
        if d > self.stretch_span_us:
            self.stretch_span_us = d
        self.compute_us += d
        if self._irq:
            self.t_us += d  # a callback's own time: no callback interrupts it
        else:
            self._advance(d, False, True)
        if host:  # (after the span: an interrupt line that fell in it was waiting on it)
            self.host_spans += 1

    # ---- what the simulation asks of time ----------------------------------
    def now_us(self):
        self.enter()
        t = self.t_us
        self.leave()
        return t

    def charge_io_us(self, us):
        # The firmware waits us in a C call (a bus transfer, a blocking
        # write): soft IRQs due meanwhile queue, up to the scheduler's depth.
        # Called between enter() and leave().
        if us > 0:
            self.io_us += us
            self._advance(us, True, False)

    def sleep_ms(self, ms):
        self.enter()
        self.idle_us += ms * 1000
        self._advance(ms * 1000, False, False)
        self._maybe_probe()
        if self.real_time:
            self._pace()
        self.leave()

    def idle_ms(self, ms, woken):
        # Sleeps like sleep_ms, but returns as soon as a soft IRQ callback
        # has made woken() true (the board waiting for its sensors).
        self.enter()  # (the firmware's time up to here may have run a callback already)
        start = self.t_us
        end = start + ms * 1000
        while not woken():
            src = self._next_source(end)
            if src is None:
                self.t_us = end
                break
            t = self._next_t
            if t > self.t_us:
                self.t_us = t
            if src.fired():
                self._run_callback(src)
                if woken():
                    break
        self.idle_us += self.t_us - start
        self._maybe_probe()
        if self.real_time:
            self._pace()
        self.leave()

    def _pace(self):
        # The board's time may run ahead of the wall clock (it is faster than
        # real time when it has little to do): wait for the wall clock.
        t = time.ticks_ms()
        self._wall += time.ticks_diff(t, self._wall0)
        self._wall0 = t
        ahead = self.t_us // 1000 - self._wall
        if ahead > 0:
            time.sleep_ms(ahead)

    def add_source(self, src):
        # A soft-IRQ source (SimTimer, an interrupt pin): next_us() is when it
        # fires next (-1: never), fired() moves it on and says whether its
        # callback is to be scheduled.
        self._sources.append(src)

    def _next_source(self, end):
        # The source to fire first, by end at the latest; its time in _next_t
        # (no tuple: the simulation makes no garbage to collect either).
        best = None
        t = end + 1
        for s in self._sources:
            n = s.next_us()
            if 0 <= n < t:
                t = n
                best = s
        self._next_t = t
        return best

    def _advance(self, d, blocking, extend):
        # Moves time on by d: computing (extend: callbacks interrupt the
        # code, which then ends later), sleeping, or blocked in a C call.
        end = self.t_us + d
        while True:
            src = self._next_source(end)
            if src is None:
                break
            t = self._next_t
            if t > self.t_us:
                self.t_us = t
            if not src.fired():
                continue
            if blocking or self._queue:
                if len(self._queue) < SCHED_DEPTH:
                    self._queue.append(src)
                else:
                    self.sched_dropped += 1
                    src.dropped += 1
                continue
            cost = self._run_callback(src)
            if extend:
                end += cost
        if end > self.t_us:
            self.t_us = end
        while self._queue and not self._irq:
            self._run_callback(self._queue.pop(0))

    def _run_callback(self, src):
        # Runs a soft IRQ callback now, as firmware: its CPU is charged.
        depth = self._depth
        self._depth = 0
        self._irq = True
        t0 = self.t_us
        self.sim_alloc += mem_total() - self._alloc_mark
        self.sim_garbage += mem_current() - self._garbage_mark
        self._mark = self._meter.start_us()
        try:
            src.run()
        finally:
            # The meter's reading first (as in enter()), then the marks:
            # _charge_cpu's own call frame (over 11 words, from the heap)
            # and what it and its callees allocate are the clock's, not the
            # callback's, in CPU time and in bytes (~5 kB/s at esp32 speed,
            # ~38 callbacks a second).
            self._stop_us = self._meter.stop_us()
            self._alloc_mark = mem_total()
            self._garbage_mark = mem_current()
            self._charge_cpu()
            self._irq = False
            self._depth = depth
        return self.t_us - t0
