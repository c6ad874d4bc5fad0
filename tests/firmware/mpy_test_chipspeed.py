# The chip-speed board simulation held honest (sim.clock.ChipClock), under
# the MicroPython unix port: CPU time becomes chip time by the factor, the
# simulation's own time is never charged, FIFOs overflow by the right count
# and soft IRQs beyond the scheduler's queue are lost and counted.
# Tolerances are wide: CPU time on a busy machine with shared cores varies
# (caches, a sibling hyperthread), but not by the factor of ten the
# exclusion checks look for.
import array
import json

from drivers.ad8232 import AD8232
from drivers.max30003 import MAX30003
from drivers.max30102 import MAX30102
from sim import models, speedbench
from sim.clock import SCHED_DEPTH, ChipClock
from sim.cpu import ThreadCpu
from sim.waveform import Waveform

_FACTOR_MILLI = 100000  # 100 chip us per host us


def _busy(n):
    x = 0
    for i in range(n):
        x += i & 7
    return x


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _host_us(meter, fn):
    t0 = meter.now_us()
    fn()
    return meter.now_us() - t0


def _chip_us(clock, fn):
    t0 = clock.now_us()
    fn()
    return clock.now_us() - t0


def test_meter_counts_cpu_not_sleep():
    meter = ThreadCpu()
    import time

    t0 = meter.now_us()
    time.sleep_ms(50)  # no CPU: the meter stands (nearly) still
    slept = meter.now_us() - t0
    busy = _median([_host_us(meter, lambda: _busy(20000)) for _ in range(5)])
    assert busy > 0
    assert slept < 5000, slept


def _start(script):
    # A shell script in the background ($BOARD: this MicroPython process);
    # timeout(1) ends it even if this test dies. Its process id.
    import os

    assert os.system("BOARD=$PPID timeout 60 sh -c '%s' >/dev/null 2>&1 & echo $! > bg.pid" % script) == 0
    with open("bg.pid") as f:
        return int(f.read())


def _stop(pid):
    import os

    os.system("kill %d 2>/dev/null" % pid)


def _exists(path):
    import os

    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _cores():
    with open("/proc/cpuinfo") as f:
        return sum(1 for line in f if line.startswith("processor"))


_HOG = "while :; do :; done"
_STOP_MS = 30  # each SIGSTOP's length (host ms)


def test_busy_loop_keeps_its_chip_time_on_a_loaded_machine():
    # A busy loop of ~0.2 ms run again and again while CPU hogs (one per
    # core, beside this machine's other work) compete for the cores and the
    # whole process is stopped (SIGSTOP) for 30 ms ten times: stopped, it
    # runs no more than a virtual CPU the hypervisor takes away (steal
    # time), and no more than a process waiting for a core. Charged, one
    # stop would be 3 s of the chip's time (30 ms x the factor), 150 times
    # the median run. What this machine's kernel does charge, an interrupt
    # and its softirqs on this thread's way (no IRQ_TIME_ACCOUNTING, sim.cpu:
    # 0.2-1 ms, more than 5 times the median), is not a stop: so the longest
    # run must stay under a third of a stop, whatever ran in it.
    import time

    meter = ThreadCpu()
    clock = ChipClock(_FACTOR_MILLI, meter)
    hogs = [_start(_HOG) for _ in range(max(2, _cores()))]
    stopper = _start("for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.02; kill -STOP $BOARD; sleep %g; "
                     "kill -CONT $BOARD; done; : > stops.done" % (_STOP_MS / 1000))
    chip = []
    w0 = time.ticks_ms()
    try:
        while not _exists("stops.done") and len(chip) < 200000:
            clock.enter()
            t0 = clock.t_us
            clock.leave()
            _busy(5000)
            clock.enter()
            chip.append(clock.t_us - t0)
            clock.leave()
    finally:
        _stop(stopper)
        for pid in hogs:
            _stop(pid)
    wall_ms = time.ticks_diff(time.ticks_ms(), w0)
    assert _exists("stops.done") and wall_ms >= 10 * _STOP_MS, wall_ms  # it was stopped
    chip.sort()
    median = chip[len(chip) // 2]
    stop_chip_us = _STOP_MS * _FACTOR_MILLI  # (ms * chip us per host ms)
    assert 0 < median < stop_chip_us // 30, median  # (a run is far shorter than a stop)
    assert chip[-1] < stop_chip_us // 3, (median, chip[-10:])


def test_busy_loop_takes_factor_times_its_cpu():
    meter = ThreadCpu()
    clock = ChipClock(_FACTOR_MILLI, meter)
    host = _median([_host_us(meter, lambda: _busy(20000)) for _ in range(5)])
    chip = _median([_chip_us(clock, lambda: _busy(20000)) for _ in range(5)])
    expected = host * _FACTOR_MILLI // 1000
    assert expected // 2 < chip < expected * 2, (host, chip)


class _Slowed:
    # This machine's meter as if, from slow(k) on, every instruction took k
    # times as long (a machine whose neighbours got busy).
    def __init__(self, meter):
        self._m = meter
        self._k = 1
        self._base = 0
        self._off = 0

    def slow(self, k):
        raw = self._m.now_us()
        self._off = self._value(raw)
        self._base = raw
        self._k = k

    def _value(self, raw):
        return self._off + (raw - self._base) * self._k

    def now_us(self):
        return self._value(self._m.now_us())

    def start_us(self):
        return self.now_us()

    def stop_us(self):
        return self.now_us()


def test_factor_follows_this_machines_speed():
    # Calibrated, then this machine runs twice as slow: after a few seconds
    # of chip time (a probe each), a busy loop takes the chip time it took
    # before, not twice as much.
    meter = _Slowed(ThreadCpu())
    clock = ChipClock(_FACTOR_MILLI, meter, probe=speedbench.Probe())
    before = _median([_chip_us(clock, lambda: _busy(20000)) for _ in range(5)])
    meter.slow(2)
    for _ in range(12):
        clock.sleep_ms(1000)
    after = _median([_chip_us(clock, lambda: _busy(20000)) for _ in range(5)])
    assert before * 2 // 3 < after < before * 3 // 2, (before, after)
    assert clock.factor_lo_milli < clock.calibrated_milli * 2 // 3, (clock.factor_lo_milli, clock.calibrated_milli)
    assert clock.probes == 12


def test_simulation_time_is_not_charged_but_io_is():
    # The loop in 50 pieces, a slow chip model between them that burns ten
    # times the loop's CPU and charges 100 us of bus time each.
    meter = ThreadCpu()
    clock = ChipClock(_FACTOR_MILLI, meter)

    def split():
        for _ in range(50):
            _busy(400)
            clock.enter()
            _busy(4000)
            clock.charge_io_us(100)
            clock.leave()

    host = _median([_host_us(meter, lambda: _busy(20000)) for _ in range(5)])
    chip = _median([_chip_us(clock, split) for _ in range(5)])
    expected = host * _FACTOR_MILLI // 1000 + 50 * 100
    assert expected // 2 < chip < expected * 2, (host, chip, expected)  # charged, the model would make it 11x
    assert clock.io_us == 5 * 50 * 100


class _Quiet:
    # A soft IRQ's callback that allocates nothing.
    def run(self):
        pass


def test_a_soft_irq_callback_is_charged_none_of_the_clocks_own_work():
    # The clock runs a callback as firmware, then measures its CPU: that
    # measure's call frames (over the VM's 11 words, from the heap) were
    # counted as the callback's, ~5 kB/s of the firmware's call frames at
    # esp32 speed with the FIFOs' ~38 interrupts a second.
    from sim.clock import mem_total

    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    src = _Quiet()
    firmware = 0
    for _ in range(20):
        before = mem_total() - clock.sim_alloc
        clock.enter()  # (as the clock runs its sources: inside the simulation's bracket)
        clock._run_callback(src)
        clock.leave()
        firmware += mem_total() - clock.sim_alloc - before
    assert firmware == 0, firmware


def test_sleep_is_idle_time():
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    t0 = clock.now_us()
    clock.sleep_ms(250)
    assert 250000 <= clock.now_us() - t0 < 260000
    assert clock.idle_us == 250000


def test_calibration_names_a_factor_per_program():
    factor, each = speedbench.calibrate("esp32", ThreadCpu())
    assert len(each) == 3 and all(f > 1000 for f in each)  # a chip is slower than this machine
    assert min(each) <= factor <= max(each)
    # A faster chip gets a smaller factor, from the same published table.
    assert speedbench.published_us("esp32-240")[0] < speedbench.published_us("esp32")[0]
    assert speedbench.published_us("esp32s3")[0] < speedbench.published_us("esp32-240")[0]


def _wave(name, channels):
    with open("sim.json") as f:
        w = json.load(f)[name]
    return Waveform(w["file"], w["rate_hz"], channels)


def test_max30003_fifo_unread_for_one_second_overflows_by_the_right_count():
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    model = models.MAX30003Model(clock, _wave("ecg", 1))
    cs = models.SimPin(1)
    chip = MAX30003(models.SimSPI([(cs, model)], clock), cs)
    chip.configure(512, 20)
    chip.start()
    clock.sleep_ms(1000)  # 512 samples converted, 32 fit
    out = [array.array("i", bytes(4 * 64))]
    n = chip.read_into(out, 0, 64)
    # A few more are converted while the firmware's own start and read run
    # (their CPU time, on a busy machine, is charged at the chip's speed).
    assert 512 <= model.index <= 512 + 16, model.index
    assert model.lost == model.index - 32, (model.index, model.lost)
    assert chip.lost == -1  # this chip only says that it overflowed
    # What the FIFO stored before the overflow is read (valid, in order: the
    # first 32 converted), then the FIFO is reset and samples again.
    assert n == 32, n
    assert model.count == 0 and not model.overflow


def test_sensors_sample_only_once_started():
    # Configured, with their FIFO interrupt on, while the firmware still
    # starts up (here 300 ms of it): the chips convert nothing and raise no
    # interrupt, so start-up work costs no FIFO its latency; start() begins
    # sampling.
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    ecg = models.MAX30003Model(clock, _wave("ecg", 1))
    cs = models.SimPin(1)
    max30003 = MAX30003(models.SimSPI([(cs, ecg)], clock), cs)
    ecg_pin = models.SimIrqPin(clock, ecg)
    ecg_pin.irq(lambda _p: None)
    ppg = models.MAX30102Model(clock, _wave("ppg", 2))
    max30102 = MAX30102(models.SimI2C([ppg], clock), clock.sleep_ms)
    ppg_pin = models.SimIrqPin(clock, ppg)
    ppg_pin.irq(lambda _p: None)
    for chip in (max30003, max30102):
        if chip is max30003:
            chip.configure(512, 20)
        else:
            chip.configure(100, 411, 16384, 7000, 7000)
        chip.enable_fifo_irq()
    clock.sleep_ms(300)
    assert ecg.index == 0 and ppg.index == 0, (ecg.index, ppg.index)
    assert ecg_pin.edges == 0 and ppg_pin.edges == 0
    max30003.start()
    max30102.start()
    clock.sleep_ms(40)
    assert ecg_pin.edges >= 1, ecg_pin.edges  # 16 samples unread: INTB fell
    out = [array.array("i", bytes(4 * 64)), array.array("i", bytes(4 * 64))]
    n = max30003.read_into(out, 0, 64)
    assert n == 16 and max30003.lost == 0, (n, max30003.lost)  # 20 or a few more converted, read in bursts of 16
    # Its service latency: the line fell at 16 samples (31.25 ms), read at
    # 40 ms (and what the read itself took): the worst, in its ms bucket.
    p = models.latency_percentile_ms(ecg_pin.latency_ms, 1.0)
    assert 9 <= p <= 40 and p == ecg_pin.worst_latency_us // 1000 + 1, (p, ecg_pin.worst_latency_us)
    n = max30102.read_into(out, 0, 64)
    assert 4 <= n <= 6 and max30102.lost == 0, (n, max30102.lost)


class _Loopback:
    # UDP datagrams from this process to itself: the kernel delivers each in
    # a NET_RX softirq on this thread's CPU, in this thread's CPU time, as a
    # disk's interrupt and its BLOCK softirq are on a busy machine (traced
    # with perf: the long spans of the 10-minute benchmarks).
    def __init__(self):
        import socket

        self._tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._rx = None
        for port in range(47600, 47700):  # a free one (the unix port has no getsockname)
            self._addr = socket.getaddrinfo("127.0.0.1", port)[0][-1]
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rx.bind(self._addr)
            except OSError:
                rx.close()
                continue
            rx.setblocking(False)
            self._rx = rx
            break
        assert self._rx is not None

    def send(self, n):
        for _ in range(n):
            self._tx.sendto(b"x", self._addr)

    def drain(self):
        try:
            while self._rx.recv(16):
                pass
        except OSError:
            pass


def _ecg_with_pin(clock):
    ecg = models.MAX30003Model(clock, _wave("ecg", 1))
    cs = models.SimPin(1)
    chip = MAX30003(models.SimSPI([(cs, ecg)], clock), cs)
    pin = models.SimIrqPin(clock, ecg)
    pin.irq(lambda _p: None)
    chip.configure(512, 20)
    chip.enable_fifo_irq()
    chip.start()
    return chip, pin


class _ChargedReads(ThreadCpu):
    # This machine's meter, with the fault a 10-minute benchmark met: the
    # kernel charging CPU time to the thread while it reads its own count
    # (up to 5 ms of it, with 2 us of wall time between the readings).
    # Injected as that: CPU burnt inside the reading, before the count is
    # sampled.
    burn = 0

    def _read(self, s, a):
        if self.burn:
            _busy(self.burn)
        return ThreadCpu._read(self, s, a)


def test_cpu_time_counted_while_the_meter_reads_is_not_the_firmwares():
    # Before, the count's whole move was charged: ~1 ms of host CPU in the
    # reading, 100 ms of chip time here, to code of ~10 us.
    meter = _ChargedReads()
    clock = ChipClock(_FACTOR_MILLI, meter)
    plain = _median([_chip_us(clock, lambda: _busy(200)) for _ in range(5)])
    host = _median([_host_us(meter, lambda: _busy(20000)) for _ in range(5)])  # (_busy(20000) in host us)
    meter.burn = 20000
    burnt = _median([_chip_us(clock, lambda: _busy(200)) for _ in range(5)])
    meter.burn = 0
    assert host > 50  # (the reading's burn is far past the slack)
    assert burnt < plain * 3 + 2000, (plain, burnt, host * _FACTOR_MILLI // 1000)
    assert clock.outside_spans >= 3 and clock.outside_max_us >= host // 2, (clock.outside_spans,
                                                                            clock.outside_max_us, host)


def test_a_host_interrupt_in_the_firmwares_time_is_named_with_the_fifo_service_that_waited_on_it():
    # This machine's kernel charges an interrupt's softirq work to the thread
    # it interrupted (no CONFIG_IRQ_TIME_ACCOUNTING): in a 10-minute
    # benchmark, spans of 30-200 ms at esp32 speed in code that takes under
    # 1 ms, and every sample it lost. The meter cannot take such time off
    # (it cannot know how much was the interrupt's) but the clock counts
    # the spans it reached, and the FIFO service that waited on one says so:
    # the benchmark reports both apart from the rest.
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    assert clock.host_spans == 0  # (this machine has /proc/softirqs)
    net = _Loopback()
    chip, pin = _ecg_with_pin(clock)
    out = [array.array("i", bytes(4 * 64))]
    clock.sleep_ms(40)  # 16 samples at 31.25 ms: INTB fell
    assert pin.edges >= 1, pin.edges
    _busy(2000)  # firmware code, a datagram sent in it: at 100x well over the 5 ms looked at
    net.send(4)
    _busy(2000)
    chip.read_into(out, 0, 64)  # the service
    assert clock.host_spans >= 1 and clock.host_span_us >= 5000, (clock.host_spans, clock.host_span_us)
    assert clock.longest_host_span_us >= 5000
    # The wait from 31.25 ms, the span in it, is the host's: the others
    # (start-up's, or a second burst's right after) are short.
    assert pin.worst_latency_us > 5000 and pin.host_services >= 1, (pin.worst_latency_us, pin.host_services)
    assert pin.worst_clean_latency_us < 5000, pin.worst_clean_latency_us
    hit = pin.host_services
    # Code alone: of a few services (a timer tick's softirq may still reach
    # one), one at least waits on no interrupt and sets the clean latency.
    clock.enter()
    net.drain()
    clock.leave()
    for _ in range(10):
        clock.sleep_ms(34)  # (the line falls at 31.25 ms)
        _busy(2000)
        chip.read_into(out, 0, 64)
        if pin.worst_clean_latency_us > 5000:
            break
    assert pin.worst_clean_latency_us > 5000 and pin.host_services < hit + 10, (pin.host_services,)


class _AllocAtReading(ThreadCpu):
    # This machine's meter, noting the heap's allocation count (the unix
    # port's mem_total) at the first reading of a span's end after reset().
    at_reading = -1

    def reset(self):
        self.at_reading = -1

    def stop_us(self):
        import micropython

        if self.at_reading < 0:
            self.at_reading = micropython.mem_total()
        return ThreadCpu.stop_us(self)


def test_a_span_ends_before_the_clock_allocates_anything():
    # _charge_cpu needs more than the VM's 11 words of frame: each call
    # takes 136 bytes from the heap, and in the firmware's heap (~5100 small
    # holes) that allocation searches past them. Since 2e74475 it was made
    # before the meter's reading, in the firmware's time at every span (and
    # after every soft IRQ's callback). The span ends at the reading now, in
    # enter() (or after the callback) before anything else.
    import micropython

    meter = _AllocAtReading()
    clock = ChipClock(_FACTOR_MILLI, meter)
    end = [-1]  # the last callback's end

    def callback(_t):
        meter.reset()
        end[0] = micropython.mem_total()

    timer = models.SimTimer(clock)
    for _ in range(20):
        _busy(10)
        meter.reset()
        a = micropython.mem_total()  # the firmware's span ends with its call into the simulation
        clock.enter()
        assert meter.at_reading == a, meter.at_reading - a
        clock.leave()
    timer.init(freq=1000, callback=callback)
    clock.sleep_ms(5)  # five soft IRQs
    timer.deinit()
    assert end[0] > 0 and meter.at_reading == end[0], (end, meter.at_reading)


def test_max30102_fifo_unread_overflows_by_the_right_count():
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    model = models.MAX30102Model(clock, _wave("ppg", 2))
    chip = MAX30102(models.SimI2C([model], clock), clock.sleep_ms)
    chip.configure(100, 411, 16384, 7000, 7000)
    chip.start()
    clock.sleep_ms(500)  # 50 samples converted, 32 kept (FIFO rollover)
    out = [array.array("i", bytes(4 * 64)), array.array("i", bytes(4 * 64))]
    n = chip.read_into(out, 0, 64)
    assert n == 32
    assert 50 <= model.index <= 50 + 3, model.index  # (as above: a few more while start and read run)
    assert model.lost == model.index - 32, (model.index, model.lost)
    assert chip.lost == model.lost, chip.lost


def test_bus_transfers_take_their_bits():
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    model = models.MAX30102Model(clock, _wave("ppg", 2))
    bus = models.SimI2C([model], clock, 400000)
    buf = bytearray(192)
    io0 = clock.io_us
    bus.readfrom_mem_into(0x57, 0x07, buf)  # a whole FIFO: 195 bytes of 9 bits at 400 kHz
    assert clock.io_us - io0 == models.I2C_TRANSACTION_US + 195 * 9 * 1000000 // 400000


class _Adc:
    # Each read gives the next number (about midscale): the samples show
    # which ticks were read, in what order.
    def __init__(self):
        self.reads = 0

    def read_u16(self):
        self.reads += 1
        return 32768 + self.reads - 1


class _Pin:
    def value(self):
        return 0


def test_timer_ticks_beyond_the_scheduler_queue_are_dropped_counted_and_reported():
    # The driver's own code (start, read_into) is firmware: its CPU time is
    # charged, and ticks fall due meanwhile. That time is this machine's,
    # which varies with its load: at the tests' 100x, start()'s few lines
    # between its clock reading and the timer's start took 0.2 ms of chip
    # time at the median but up to 6.5 ms with two CPU hogs running (1000
    # runs), more than a tick's period (4 ms). So no count that depends on it
    # is asserted, and this test runs at 1x (the queue's and the driver's
    # counts do not depend on the factor): the counts asserted are the
    # blocking call's (chip time alone), and totals that hold whatever the
    # firmware's code cost. The test's own bookkeeping runs inside the
    # simulation (enter/leave): it is not charged.
    clock = ChipClock(1000, ThreadCpu())
    timer = models.SimTimer(clock)
    adc = _Adc()
    front = AD8232(adc, _Pin(), _Pin(), timer, 250, clock.now_us, lambda a, b: a - b)
    out = array.array("i", bytes(4 * 256))
    got = array.array("i", bytes(4 * 256))  # every sample read, in order
    reads = []  # (samples, lost) of each read_into

    def read():
        n = front.read_into([out], 0, 256)
        clock.enter()
        base = sum(k for k, _ in reads)
        for i in range(n):
            got[base + i] = out[i]
        reads.append((n, front.lost))
        clock.leave()

    front.start()
    clock.sleep_ms(100)  # idle: every tick is served on time
    clock.enter()
    assert timer.dropped == 0 and adc.reads >= 25, (timer.dropped, adc.reads)
    clock.leave()
    read()
    clock.enter()
    assert reads[0][0] >= 25 and reads[0][1] == 0, reads  # all of them read, none lost
    served = adc.reads
    clock.charge_io_us(100000)  # 100 ms in a C call: 25 ticks due, 8 queue, 17 are lost
    assert adc.reads - served == SCHED_DEPTH, adc.reads - served
    assert timer.dropped == 25 - SCHED_DEPTH and clock.sched_dropped == 25 - SCHED_DEPTH, timer.dropped
    clock.leave()
    read()
    clock.enter()
    # Reported at the first read after the call: the 8 queued callbacks ran
    # after the last tick's time, so it is not taken for one on its way.
    assert reads[1][0] >= SCHED_DEPTH and reads[1][1] == 25 - SCHED_DEPTH, reads
    clock.leave()
    clock.sleep_ms(40)
    read()
    clock.enter()
    # Exactly the ticks the scheduler dropped were reported lost, and every
    # one it served was read, in order, none twice.
    assert sum(lost for _, lost in reads) == timer.dropped, (reads, timer.dropped)
    n = sum(k for k, _ in reads)
    assert adc.reads - 1 <= n <= adc.reads, (n, adc.reads)  # (a tick may have come since)
    assert list(got[:n]) == list(range(n)), list(got[:n])
    clock.leave()


class _Wire:
    # The console's far end: what was written, and when (board clock, us).
    def __init__(self, clock):
        self.clock = clock
        self.writes = []

    def write(self, buf, off=0, n=-1):
        if n < 0:
            n = len(buf) - off
        self.writes.append((self.clock.t_us, n))
        return n


def test_serial_link_writes_no_more_than_the_uart_fifo_drains():
    from app.link_serial import UART_FIFO_BYTES, SerialLink
    from sim.clock import VirtualClock
    from sim.console import SimConsole

    clock = VirtualClock()
    wire = _Wire(clock)
    console = SimConsole(clock, None, wire)
    link = SerialLink(console, console, 1200, clock.now_us, lambda a, b: a - b, 115200)
    msg = bytes(range(256)) * 4
    assert link.send(msg, len(msg))
    assert not link.send(msg, len(msg))  # one frame at a time
    while link.busy():
        clock.sleep_ms(1)
        link.service()
    assert sum(n for _, n in wire.writes) >= len(msg) + 2
    byte_us = 87  # 10 bits at 115200 baud
    sent = 0
    for t, n in wire.writes:
        assert n <= UART_FIFO_BYTES
        sent += n
        # Never more queued than the FIFO holds: the write never blocks.
        assert sent - t // byte_us <= UART_FIFO_BYTES, (t, sent)


def test_streams_with_interrupt_lines_are_drained_when_the_chip_asks():
    from app import config, main
    from sim.board_sim import SimBoard
    from sim.clock import VirtualClock
    from sim.loopback import LoopbackLink

    with open("sim.json") as f:
        sim = json.load(f)
    board = SimBoard(sim, VirtualClock())
    with open(config.CONFIG) as f:
        cfg = json.load(f)
    with open(config.KEY, "rb") as f:
        key = f.read()
    board.link_override = LoopbackLink(cfg["device_id"], key)
    cfg = config.load()
    app = main.App(board, cfg, key, 1)
    assert all(st.irq_pin is not None for st in app.streams)
    app.start()
    steps = 0
    while board.ticks_ms() < 3000:
        app.step()
        app.wait()
        steps += 1
    ecg = board.models["max30003"]
    # EFIT 16 at 512 Hz: 32 interrupts a second, PPG's A_FULL at 17 of 100 Hz
    # about 6, the link and the status a few more; polling every 10 ms
    # would be 300 loops.
    assert steps < 150, steps
    assert ecg.lost == 0 and board.models["max30102"].lost == 0
    assert ecg.max_level <= 17, ecg.max_level  # drained as soon as it asked


def test_idle_returns_at_once_when_an_interrupt_came_while_the_firmware_ran():
    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())
    timer = models.SimTimer(clock)
    flag = [0]

    def tick(_t):
        flag[0] += 1

    timer.init(freq=20, callback=tick)  # every 50 ms
    t0 = clock.now_us()
    while clock.now_us() - t0 < 60000:  # the firmware computes past the first tick
        _busy(200)
    assert flag[0] == 1
    t1 = clock.now_us()
    clock.idle_ms(100, lambda: flag[0] > 0)
    assert clock.now_us() - t1 < 5000  # it had been woken already: no sleep till the next tick


def test_stretch_tracer_names_the_work_between_two_fifo_reads():
    # sim.stretches (bench firmware --stretches): a stretch between two FIFO
    # services is reported with the traced pieces of work inside it, the
    # longest first, and a piece's time excludes the tracer's own.
    from sim.stretches import Stretches

    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())

    class _Work:
        def short(self):
            _busy(200)

        def long(self):
            _busy(20000)

    work = _Work()
    tracer = Stretches(clock)
    tracer.wrap(work, "short")
    tracer.wrap(work, "long", "the long one")
    tracer.measure_tare()
    tracer.serviced(clock.now_us())
    work.short()
    tracer.serviced(clock.now_us())
    work.short()
    work.long()
    work.short()
    end = clock.now_us()
    tracer.serviced(end)
    r = tracer.report()
    longest = r["longest"][0]
    assert [p[0] for p in longest["pieces"]] == ["short", "the long one", "short"], longest
    assert r["longest"][1]["us"] < longest["us"] and longest["at_us"] + longest["us"] == end
    long_us = longest["pieces"][1][3]
    assert long_us > 10 * longest["pieces"][0][3], longest
    assert r["by_label"]["short"][0] == 3 and r["by_label"]["the long one"][0] == 1


def test_stretch_tracer_leaves_no_garbage_in_the_firmware_s_heap():
    # A traced call (0 to 6 positional arguments; the frame encoder's 20
    # have a wrapper of their own) leaves nothing to collect: with the tracer's garbage
    # the firmware's collector ran every few seconds (bench firmware
    # --stretches), not as it does without the tracer. The arguments reach
    # the piece of work unchanged, and its result comes back.
    import micropython

    from sim.stretches import Stretches

    clock = ChipClock(_FACTOR_MILLI, ThreadCpu())

    class _Work:
        def none(self):
            return -1

        def three(self, a, b, c=0):
            return a * 100 + b * 10 + c

        def six(self, a0, a1, a2, a3, a4, a5):
            return a0 + a5 * 1000 + a3 * 100000

    work = _Work()
    tracer = Stretches(clock)
    for name in ("none", "three", "six"):
        tracer.wrap(work, name)
    tracer.measure_tare()

    def calls():
        assert work.none() == -1
        assert work.three(1, 2) == 120 and work.three(1, 2, 3) == 123
        assert work.six(7, 0, 0, 5, 0, 3) == 503007

    calls()  # (the first calls record their labels: the tracer's, between enter() and leave())
    total0 = micropython.mem_current()  # type: ignore[attr-defined]
    garbage0 = total0 - clock.sim_garbage
    for _ in range(50):
        calls()
    total = micropython.mem_current() - total0  # type: ignore[attr-defined]
    garbage = total + total0 - clock.sim_garbage - garbage0
    assert garbage == 0 and total == 0, (garbage, total)  # the firmware's share, and the tracer's neither
    assert tracer.report()["by_label"]["six"][0] == 51
