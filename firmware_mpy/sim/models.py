# Register-level models of the three sensor chips, each behind the bus a
# real one sits on, so the unmodified drivers run against them. Each chip
# converts on its own clock (the host clock scaled by a ppm error), fills
# its FIFO as the real one does and plays a real recording.
from micropython import const

from sim.clock import SCHED_DEPTH

_NOISE_A = const(1103515245)
_NOISE_C = const(12345)


class _Noise:
    # A small deterministic noise source (LCG), in integers.
    def __init__(self, seed, amplitude):
        self.state = seed & 0x7FFFFFFF
        self.amplitude = amplitude

    def next(self):
        self.state = (self.state * _NOISE_A + _NOISE_C) & 0x7FFFFFFF
        a = self.amplitude
        if not a:
            return 0
        return (self.state >> 8) % (2 * a + 1) - a


class _ChipClock:
    # Samples a chip has converted since start: its oscillator runs ppm fast
    # or slow against the host, as crystals do.
    def __init__(self, clock, ppm):
        self.clock = clock
        self.ppm = ppm
        self.t0_us = 0
        self.done = 0

    def restart(self):
        self.t0_us = self.clock.now_us()
        self.done = 0

    def due(self, rate_hz):
        elapsed = self.clock.now_us() - self.t0_us
        return elapsed * rate_hz * (1000000 + self.ppm) // 1000000000000

    def time_of(self, k, rate_hz):
        # When conversion number k (from 1) completes, on the host clock.
        per = rate_hz * (1000000 + self.ppm)
        return self.t0_us + (k * 1000000000000 + per - 1) // per


def _lead_off(schedule, t_s):
    for start, end in schedule:
        if start <= t_s < end:
            return True
    return False


# ---- MAX30102 (I2C) --------------------------------------------------------

_P_INT_STATUS_1 = const(0x00)
_P_INT_ENABLE_1 = const(0x02)
_P_A_FULL = const(0x80)  # INT_STATUS_1 bit 7, cleared by reading the register
_P_FIFO_WR = const(0x04)
_P_OVF = const(0x05)
_P_FIFO_RD = const(0x06)
_P_FIFO_DATA = const(0x07)
_P_FIFO_CONFIG = const(0x08)
_P_MODE = const(0x09)
_P_SPO2 = const(0x0A)
_P_LED1 = const(0x0C)
_P_LED2 = const(0x0D)
_P_RATES = (50, 100, 200, 400, 800, 1000, 1600, 3200)
_P_RANGES = (2048, 4096, 8192, 16384)


class MAX30102Model:
    # ppg: Waveform of 2 channels, red and IR photodiode transfer in
    # pA of photocurrent per mA of LED drive.
    ADDRESS = 0x57

    def __init__(self, clock, ppg, ppm=0, seed=1, finger_off=()):
        self.regs = bytearray(256)
        self.fifo_red = [0] * 32
        self.fifo_ir = [0] * 32
        self._clock = _ChipClock(clock, ppm)
        self._ppg = ppg
        self._noise = _Noise(seed, 2)
        self._finger_off = finger_off
        self.index = 0  # samples converted since start (for tests)
        self.lost = 0
        self.max_level = 0  # the fullest the FIFO was when the firmware looked
        self.irq_pins = []  # SimIrqPins wired to INT
        self._unread_full = False  # WR == RD means full, not empty
        self._reset()

    def _reset(self):
        for i in range(256):
            self.regs[i] = 0
        self.regs[0xFE] = 0x03
        self.regs[0xFF] = 0x15
        self.regs[_P_SPO2] = 0

    def _sampling(self):
        return self.regs[_P_MODE] & 0x87 == 0x03

    def rate_hz(self):
        return _P_RATES[(self.regs[_P_SPO2] >> 2) & 7]

    def level(self):
        n = (self.regs[_P_FIFO_WR] - self.regs[_P_FIFO_RD]) & 31
        return 32 if not n and self._unread_full else n

    def _advance(self):
        if not self._sampling():
            return
        spo2 = self.regs[_P_SPO2]
        rate = _P_RATES[(spo2 >> 2) & 7]
        due = self._clock.due(rate)
        while self._clock.done < due:
            self._convert(rate, spo2)
            self._clock.done += 1

    def _code(self, transfer_pa_per_ma, led_reg, range_na, pw_bits):
        # Photocurrent (pA) = transfer * LED current (mA); code = I / range * 2^18.
        current_pa = transfer_pa_per_ma * led_reg // 5  # LED: 0.2 mA per step
        code = current_pa * 262144 // (range_na * 1000) + self._noise.next()
        if code < 0:
            code = 0
        if code > 0x3FFFF:
            code = 0x3FFFF
        shift = 3 - pw_bits  # 69 us pulses give 15 bits, left-justified
        return (code >> shift) << shift

    def _convert(self, rate, spo2):
        k = self.index
        self.index += 1
        rng = _P_RANGES[(spo2 >> 5) & 3]
        pw = spo2 & 3
        if _lead_off(self._finger_off, k // rate):
            red = ir = 0
        else:
            red = self._code(self._ppg.at(k, rate, 0), self.regs[_P_LED1], rng, pw)
            ir = self._code(self._ppg.at(k, rate, 1), self.regs[_P_LED2], rng, pw)
        wr = self.regs[_P_FIFO_WR]
        rd = self.regs[_P_FIFO_RD]
        full = ((wr - rd) & 31) == 0 and self._unread_full
        if full:
            self.lost += 1
            if self.regs[_P_OVF] < 0x1F:
                self.regs[_P_OVF] += 1
            if not self.regs[_P_FIFO_CONFIG] & 0x10:
                return  # no rollover: FIFO keeps old data, new sample lost
            self.regs[_P_FIFO_RD] = (rd + 1) & 31  # rollover: oldest overwritten
        self.fifo_red[wr] = red
        self.fifo_ir[wr] = ir
        self.regs[_P_FIFO_WR] = (wr + 1) & 31
        self._unread_full = ((self.regs[_P_FIFO_WR] - self.regs[_P_FIFO_RD]) & 31) == 0
        # A_FULL: set by a write that leaves FIFO_A_FULL or fewer free slots
        # (FIFO_CONFIG bits 3:0; 0 means the FIFO is now full).
        if 32 - self.unread() <= self.regs[_P_FIFO_CONFIG] & 0x0F:
            self.regs[_P_INT_STATUS_1] |= _P_A_FULL

    def unread(self):
        if self._unread_full:
            return 32
        return (self.regs[_P_FIFO_WR] - self.regs[_P_FIFO_RD]) & 31

    # The INT pin (active low): A_FULL while enabled (INT_ENABLE_1 bit 7)
    # and not yet cleared by a read of INT_STATUS_1.
    def irq_asserted(self):
        self._advance()
        return bool(self.regs[_P_INT_ENABLE_1] & self.regs[_P_INT_STATUS_1] & _P_A_FULL)

    def next_irq_us(self):
        # When the line will next assert if nothing reads the chip meanwhile.
        if not self._sampling() or not self.regs[_P_INT_ENABLE_1] & _P_A_FULL:
            return -1
        need = 32 - (self.regs[_P_FIFO_CONFIG] & 0x0F) - self.unread()
        if need < 1:
            need = 1  # the next write sets A_FULL again
        return self._clock.time_of(self._clock.done + need, self.rate_hz())

    def write(self, reg, data):
        for b in data:
            if reg == _P_MODE and b & 0x40:
                self._reset()
                self._unread_full = False
            else:
                self.regs[reg] = b
                if reg == _P_MODE and self._sampling():
                    self._clock.restart()
                    self.index = 0
                    self.lost = 0  # (counts from the start of sampling)
                    self.max_level = 0
                if reg in (_P_FIFO_WR, _P_FIFO_RD):
                    self._unread_full = False
            if reg != _P_FIFO_DATA:
                reg = (reg + 1) & 0xFF

    def read_into(self, reg, buf):
        self._advance()
        if reg <= _P_FIFO_WR < reg + len(buf):  # the firmware looks at the write pointer
            lv = self.level()
            if lv > self.max_level:
                self.max_level = lv
        if reg == _P_FIFO_DATA:
            i = 0
            while i + 6 <= len(buf):
                rd = self.regs[_P_FIFO_RD]
                red = self.fifo_red[rd]
                ir = self.fifo_ir[rd]
                buf[i] = red >> 16
                buf[i + 1] = (red >> 8) & 0xFF
                buf[i + 2] = red & 0xFF
                buf[i + 3] = ir >> 16
                buf[i + 4] = (ir >> 8) & 0xFF
                buf[i + 5] = ir & 0xFF
                if ((self.regs[_P_FIFO_WR] - rd) & 31) or self._unread_full:
                    self.regs[_P_FIFO_RD] = (rd + 1) & 31  # a sample popped
                    self.regs[_P_OVF] = 0
                    self._unread_full = False
                i += 6
            return
        for i in range(len(buf)):
            buf[i] = self.regs[(reg + i) & 0xFF]
        if reg == _P_INT_STATUS_1 and len(buf):
            self.regs[_P_INT_STATUS_1] = 0  # interrupt flags clear when read


# What a bus transfer costs the chip's CPU beyond its bits on the wire: the
# ESP-IDF driver's set-up and completion of one transaction (our estimate
# for the esp32 port's machine.I2C and machine.SPI; the HIL bench measures
# the real figure).
I2C_TRANSACTION_US = const(40)
SPI_TRANSACTION_US = const(15)


class _Plain:
    # Stand-in clock for buses built without one (unit tests of a model).
    def enter(self):
        pass

    def leave(self):
        pass

    def charge_io_us(self, us):
        pass


_PLAIN = _Plain()


class BusFaults:
    # Faults injected on a simulated bus (tests, `pulsebridge sim`): the next
    # `errors` transfers raise OSError(errno) as machine.I2C/SPI do when the
    # ESP-IDF driver reports a timeout or a NACK. A device unplugged from a
    # bus is the bus's own business (SimI2C: ENODEV; SimSPI: MISO reads 1s).
    def __init__(self):
        self.errors = 0
        self.errno = 116  # ETIMEDOUT
        self.raised = 0
        self.stall_ms = 0

    def inject(self, count=1, err=116):
        self.errors = count
        self.errno = err

    def stall(self, ms):
        # The next transfer hangs for ms of board time (a bus held low).
        self.stall_ms = ms

    def check(self, clock):
        if self.stall_ms:
            ms = self.stall_ms
            self.stall_ms = 0
            clock.sleep_ms(ms)
        if self.errors:
            self.errors -= 1
            self.raised += 1
            raise OSError(self.errno)


class SimI2C:
    # machine.I2C's memory-access methods, routed to device models. With a
    # chip-speed clock a transfer takes its bits at freq_hz (9 per byte:
    # address, register, repeated start and address, then the data) plus
    # the driver's overhead; the model's own host time is not the firmware's.
    def __init__(self, devices, clock=None, freq_hz=400000):
        self._devices = devices
        self._clock = clock or _PLAIN
        self._freq_hz = freq_hz
        self.faults = BusFaults()
        self.unplugged = []

    def unplug(self, addr):
        # The device stops answering: its address is no longer acknowledged.
        for d in self._devices:
            if d.ADDRESS == addr:
                self._devices.remove(d)
                self.unplugged.append(d)
                return

    def replug(self):
        self._devices.extend(self.unplugged)
        self.unplugged = []

    def _dev(self, addr):
        for d in self._devices:
            if d.ADDRESS == addr:
                return d
        raise OSError(19)  # ENODEV: nothing acknowledged the address

    def _cost_us(self, nbytes):
        return I2C_TRANSACTION_US + (nbytes + 3) * 9 * 1000000 // self._freq_hz

    # The firmware's entries (C functions on the chip) keep their call
    # frames within the VM's 11 words: a Python frame allocated on the heap
    # before enter() would be charged to the firmware. Their work runs in
    # the simulation's time and hands back what it raised.
    def readfrom_mem_into(self, addr, memaddr, buf):
        self._clock.enter()
        e = self._transfer(addr, memaddr, buf, False)
        self._clock.leave()
        if e is not None:
            raise e

    def writeto_mem(self, addr, memaddr, buf):
        self._clock.enter()
        e = self._transfer(addr, memaddr, buf, True)
        self._clock.leave()
        if e is not None:
            raise e

    def _transfer(self, addr, memaddr, buf, write):
        # None, or the exception the call raises (once out of the simulation).
        c = self._clock
        try:
            c.charge_io_us(self._cost_us(len(buf)))
            self.faults.check(c)
            dev = self._dev(addr)
            if write:
                dev.write(memaddr, buf)
            else:
                dev.read_into(memaddr, buf)
            for p in dev.irq_pins:
                p.refresh()
        except Exception as e:
            return e
        return None

    def scan(self):
        return [d.ADDRESS for d in self._devices]


# ---- MAX30003 (SPI) --------------------------------------------------------

_E_STATUS = const(0x01)
_E_EN_INT = const(0x02)
_E_MNGR_INT = const(0x04)
_E_SW_RST = const(0x08)
_E_SYNCH = const(0x09)
_E_FIFO_RST = const(0x0A)
_E_INFO = const(0x0F)
_E_CNFG_GEN = const(0x10)
_E_CNFG_ECG = const(0x15)
_E_FIFO_BURST = const(0x20)
_E_FIFO = const(0x21)
_E_RATES = (512, 256, 128, 512)
_E_GAINS = (20, 40, 80, 160)
_ETAG_EMPTY_WORD = const(6 << 3)
_ETAG_OVF_WORD = const(7 << 3)


class MAX30003Model:
    # ecg: Waveform of 1 channel in nV at the electrodes.
    def __init__(self, clock, ecg, ppm=0, seed=2, lead_off=()):
        self.regs = [0] * 128
        self.fifo = [0] * 32
        self.count = 0
        self.head = 0
        self.overflow = False
        self._clock = _ChipClock(clock, ppm)
        self._ecg = ecg
        self._noise = _Noise(seed, 1)
        self._lead_off = lead_off
        self.index = 0
        self.lost = 0
        self.words_clocked = 0  # FIFO words clocked out in bursts or single reads
        self.empty_words_clocked = 0  # of which past the last sample (a reader that ignores the count)
        self.max_level = 0  # the fullest the FIFO was when the firmware read it
        self.irq_pins = []  # SimIrqPins wired to INTB
        self._reset()

    def rate_hz(self):
        return self._rate()

    def _reset(self):
        for i in range(128):
            self.regs[i] = 0
        self.regs[_E_INFO] = 0x51D000
        self.count = 0
        self.head = 0
        self.overflow = False

    def _rate(self):
        return _E_RATES[(self.regs[_E_CNFG_ECG] >> 22) & 3]

    def efit(self):
        # MNGR_INT bits 23:19: EINT while this many samples or more are unread.
        return ((self.regs[_E_MNGR_INT] >> 19) & 0x1F) + 1

    def lead_bias_mohm(self):
        # The resistive lead bias on both inputs (CNFG_GEN EN_RBIAS = 01,
        # RBIASP, RBIASN), by RBIASV: 50, 100 or 200 Mohm; 0 if any is off.
        g = self.regs[_E_CNFG_GEN]
        if (g >> 4) & 3 != 1 or g & 3 != 3:
            return 0
        return (50, 100, 200, 0)[(g >> 2) & 3]

    def dcloff_vth_mv(self):
        # CNFG_GEN VTH (bits 7:6): the DC lead-off threshold around VMID.
        return (300, 400, 450, 500)[(self.regs[_E_CNFG_GEN] >> 6) & 3]

    def _advance(self):
        if not self.regs[_E_CNFG_GEN] & (1 << 19):
            return
        rate = self._rate()
        due = self._clock.due(rate)
        gain = _E_GAINS[(self.regs[_E_CNFG_ECG] >> 16) & 3]
        while self._clock.done < due:
            self._clock.done += 1
            k = self.index
            self.index += 1
            if _lead_off(self._lead_off, k // rate) or not self.lead_bias_mohm():
                # Inputs float to a rail: electrode off, or no lead bias to
                # hold them in the common-mode range (the simulated board has
                # no third electrode).
                code = 0x1FFFF
            else:
                nv = self._ecg.at(k, rate)
                code = nv * 131072 * gain // 1000000000 + self._noise.next()
                if code > 0x1FFFF:
                    code = 0x1FFFF
                if code < -0x1FFFF:
                    code = -0x1FFFF
            if self.count == 32 or self.overflow:
                # Full, or overflowed and not reset yet (EOVF: "the data
                # record has been corrupted" until FIFO_RST or SYNCH): lost.
                self.overflow = True
                self.lost += 1
                continue
            self.fifo[(self.head + self.count) & 31] = code
            self.count += 1

    # INTB (active low, EN_INT bits 1:0 not 0): EINT while at least EFIT
    # samples are unread and EN_EINT (bit 23) is set; EOVF with EN_EOVF (22).
    def irq_asserted(self):
        self._advance()
        en = self.regs[_E_EN_INT]
        if not en & 3:
            return False
        return bool(en & self._status() & (3 << 22))

    def next_irq_us(self):
        en = self.regs[_E_EN_INT]
        if not en & 3 or not en & (1 << 23) or not self.regs[_E_CNFG_GEN] & (1 << 19):
            return -1
        need = self.efit() - self.count
        if need < 1:
            need = 1
        return self._clock.time_of(self._clock.done + need, self._rate())

    def _status(self):
        s = 0
        if self.count >= self.efit():
            s |= 1 << 23
        if self.overflow:
            s |= 1 << 22
        rate = self._rate()
        if self.regs[_E_CNFG_GEN] & (3 << 12) and _lead_off(self._lead_off, self.index // rate):
            s |= (1 << 20) | 0x3
        return s

    def _pop_word(self):
        # After an overflow the samples stored before it are still read, in
        # order, as valid (Maxim's MAX30003WING examples read the FIFO up to
        # the overflow's tag and keep what came before); then the overflow's
        # tag (ETAG 7) until a FIFO_RST or SYNCH. The samples converted
        # while the FIFO was full are lost (self.lost).
        self.words_clocked += 1
        if not self.count:
            if self.overflow:
                return _ETAG_OVF_WORD
            self.empty_words_clocked += 1
            return _ETAG_EMPTY_WORD
        code = self.fifo[self.head]
        self.head = (self.head + 1) & 31
        self.count -= 1
        etag = 2 if self.count == 0 and not self.overflow else 0  # valid, or valid end of FIFO
        return ((code & 0x3FFFF) << 6) | (etag << 3)

    def transfer(self, tx, rx):
        self._advance()
        reg = tx[0] >> 1
        read = tx[0] & 1
        n = len(tx)
        if not read:
            value = (tx[1] << 16) | (tx[2] << 8) | tx[3]
            if reg == _E_SW_RST:
                self._reset()
            elif reg == _E_SYNCH:
                self._clock.restart()
                self.index = 0
                self.count = 0
                self.overflow = False
                self.lost = 0  # (counts from the start of sampling)
                self.max_level = 0
                for p in self.irq_pins:
                    p.restart()
            elif reg == _E_FIFO_RST:
                # The firmware's answer to an overflow (EOVF): the line it
                # releases counts as served, however late (refresh), so an
                # overflow's latency shows in the figures.
                self.count = 0
                self.overflow = False
            elif reg != _E_INFO and reg < 128:
                self.regs[reg] = value
            for i in range(n):
                rx[i] = 0
            return
        rx[0] = 0
        if reg == _E_FIFO_BURST or reg == _E_FIFO:
            if self.count > self.max_level:
                self.max_level = self.count
            i = 1
            while i + 3 <= n:
                w = self._pop_word()
                rx[i] = w >> 16
                rx[i + 1] = (w >> 8) & 0xFF
                rx[i + 2] = w & 0xFF
                i += 3
                if reg == _E_FIFO:
                    break
            return
        value = self._status() if reg == _E_STATUS else self.regs[reg & 0x7F]
        rx[1] = value >> 16
        rx[2] = (value >> 8) & 0xFF
        rx[3] = value & 0xFF


class SimPin:
    def __init__(self, value=0):
        self._value = value

    def value(self, v=None):
        if v is None:
            return self._value
        self._value = 1 if v else 0
        return None

    def __call__(self, v=None):
        return self.value(v)


_LATENCY_BUCKETS = const(200)  # ms


def latency_percentile_ms(buckets, fraction):
    # The latency (whole ms, rounded up) that fraction of the services met.
    total = sum(buckets)
    need = total * fraction
    seen = 0
    for ms in range(len(buckets)):
        seen += buckets[ms]
        if seen >= need:
            return ms + 1
    return len(buckets)


class SimIrqPin:
    # An input pin wired to a chip's interrupt output (active low), with
    # machine.Pin's irq(handler, trigger): the handler is a soft IRQ on a
    # falling edge. On a chip-speed clock the clock fires it when the chip
    # asserts its line (the chip says when: next_irq_us); otherwise the
    # board loop calls poll() (service()).
    IRQ_FALLING = 2

    def __init__(self, clock, chip):
        self._clock = clock
        self._chip = chip
        self._handler = None
        self._low = False
        self.dropped = 0
        # Service latency: from the line falling to the firmware's next
        # transfer to the chip (chip-speed clock only).
        self._fell_at = -1
        self.worst_latency_us = 0
        self.worst_at_us = 0  # when the line fell, for the worst latency
        # Every service's latency, in whole ms (the last bucket: that or
        # more): the worst is one event, and on a shared machine one host
        # stall sets it; the distribution's tail shows the firmware's own
        # long pieces of work.
        self.latency_ms = [0] * (_LATENCY_BUCKETS + 1)
        self.edges = 0
        # Services whose wait held a span the host reached (the
        # clock's host_spans moved: sim.clock, sim.cpu), the samples the
        # chip overflowed before them, and the worst latency of the others.
        self._host0 = 0
        self._lost0 = 0
        self.host_services = 0
        self.host_lost = 0
        self.worst_clean_latency_us = 0
        self.worst_clean_at_us = 0  # (when the line fell)
        clock.add_source(self)
        chip.irq_pins.append(self)

    def value(self):
        # The line as last seen: the clock looks when it fires, the bus after
        # every transfer to the chip (refresh), so reading it costs the
        # firmware what reading a GPIO does, and the model no host time.
        return 0 if self._low else 1

    def restart(self):
        # Sampling (re)starts: what the line did before is no service latency
        # (the chip counts its losses from 0 again).
        self._fell_at = -1
        self._lost0 = 0

    def refresh(self):
        # After each transfer to the chip. A line the firmware's reads have
        # released goes high (and the FIFO counts as served); one that fell
        # meanwhile stays "high" here until the clock fires its edge, as a
        # GPIO interrupt would, whatever register the firmware was reading.
        if self._chip.irq_asserted():
            return
        if self._fell_at >= 0:
            c = self._clock
            d = c.t_us - self._fell_at
            if d > self.worst_latency_us:
                self.worst_latency_us = d
                self.worst_at_us = self._fell_at
            self.latency_ms[min(d // 1000, _LATENCY_BUCKETS)] += 1
            lost = self._chip.lost
            if c.host_spans != self._host0:
                self.host_services += 1
                if lost > self._lost0:
                    self.host_lost += lost - self._lost0
            elif d > self.worst_clean_latency_us:
                self.worst_clean_latency_us = d
                self.worst_clean_at_us = self._fell_at
            self._lost0 = lost
            self._fell_at = -1
        self._low = False

    def irq(self, handler=None, trigger=IRQ_FALLING):
        self._handler = handler
        self._low = self._chip.irq_asserted()

    # ---- the chip-speed clock's interface ----------------------------------
    def next_us(self):
        if self._handler is None:
            return -1
        low = self._chip.irq_asserted()
        if low and self._low:
            return -1  # no edge until something reads the chip
        if low:
            return self._clock.t_us  # fell while nobody looked: now
        self._low = False
        t = self._chip.next_irq_us()
        if 0 <= t <= self._clock.t_us:
            t = self._clock.t_us + 1  # not asserted yet after all: a little later
        return t

    def fired(self):
        low = self._chip.irq_asserted()
        edge = low and not self._low
        self._low = low
        if edge and self._clock.chip:
            self.edges += 1
            if self._fell_at < 0:
                self._fell_at = self._clock.t_us
                self._host0 = self._clock.host_spans
        return edge and self._handler is not None

    def run(self):
        h = self._handler
        if h is not None:
            h(self)

    def poll(self):
        # Without a chip-speed clock: a falling edge since the last look
        # runs the handler now.
        if self._handler is not None and not self._clock.chip and self.fired():
            self.run()


class SimSPI:
    # machine.SPI's write_readinto, routed to the device whose CS is low; a
    # transfer takes its bits at baud_hz plus the driver's overhead.
    def __init__(self, devices, clock=None, baud_hz=4000000):
        self._devices = devices  # list of (cs SimPin, model)
        self._clock = clock or _PLAIN
        self._baud_hz = baud_hz
        self.faults = BusFaults()
        self.unplugged = []

    def unplug(self):
        # The devices stop answering: nothing drives MISO.
        self.unplugged = self._devices
        self._devices = []

    def replug(self):
        self._devices = self.unplugged
        self.unplugged = []

    def write_readinto(self, tx, rx):
        # (The firmware's entry: as SimI2C's, a frame within 11 words.)
        c = self._clock
        c.enter()
        e = self._transfer(tx, rx)
        c.leave()
        if e is not None:
            raise e

    def _transfer(self, tx, rx):
        c = self._clock
        try:
            c.charge_io_us(SPI_TRANSACTION_US + len(tx) * 8 * 1000000 // self._baud_hz)
            self.faults.check(c)
            for cs, dev in self._devices:
                if not cs.value():
                    dev.transfer(tx, rx)
                    for p in dev.irq_pins:
                        p.refresh()
                    return None
            for i in range(len(rx)):
                rx[i] = 0xFF  # nobody selected: MISO pulled up
        except Exception as e:
            return e
        return None


# ---- AD8232 (analog) -------------------------------------------------------

class AD8232Model:
    # The AD8232 output seen through a 12-bit ESP32 ADC as read_u16(), and
    # its LO+/LO- pins. ecg: Waveform in nV at the electrodes.
    def __init__(self, clock, ecg, seed=3, lead_off=()):
        self._clock = clock
        self._ecg = ecg
        self._noise = _Noise(seed, 16)
        self._lead_off = lead_off

    def _t_us(self):
        return self._clock.now_us()

    def read_u16(self):
        c = self._clock
        c.enter()
        try:
            return self._read_u16()
        finally:
            c.leave()

    def _read_u16(self):
        t = self._t_us()
        if self._leads_off():
            return 65535
        # 100 V/V around mid-rail; 12-bit converter, so steps of 16 in read_u16.
        nv = self._ecg.at(t, 1000000)
        code = 32768 + nv * 100 * 65536 // 3300000000 + self._noise.next()
        code &= ~15
        return 0 if code < 0 else (65535 if code > 65535 else code)

    def leads_off(self):
        c = self._clock
        c.enter()
        try:
            return self._leads_off()
        finally:
            c.leave()

    def _leads_off(self):
        return _lead_off(self._lead_off, self._t_us() // 1000000)


class LeadPin:
    def __init__(self, model):
        self._model = model

    def value(self):
        return 1 if self._model.leads_off() else 0


class SimTimer:
    # machine.Timer(freq=, callback=). Its callback is a soft IRQ, as on the
    # esp32 port: scheduled, run by the VM between bytecodes, and lost when
    # the scheduler queue (clock.SCHED_DEPTH) is full. On a chip-speed clock
    # the clock fires it at its times. Otherwise the unix port has no timer
    # interrupt: the board loop calls fire_due(), which runs the callback for
    # each period that has elapsed, late by up to one loop, and at most
    # SCHED_DEPTH of them: more would not have fitted in the queue.
    def __init__(self, clock):
        self._clock = clock
        self._cb = None
        self._period_us = 0
        self._next_us = -1
        self.dropped = 0  # ticks lost (the firmware cannot see this count)
        clock.add_source(self)

    def init(self, freq, callback, mode=None):
        self._period_us = 1000000 // freq
        self._cb = callback
        self._next_us = self._clock.now_us() + self._period_us

    def deinit(self):
        self._cb = None
        self._next_us = -1

    # ---- the chip-speed clock's interface ----------------------------------
    def next_us(self):
        return self._next_us

    def fired(self):
        self._next_us += self._period_us
        return self._cb is not None

    def run(self):
        cb = self._cb
        if cb is not None:
            cb(self)

    def fire_due(self):
        if self._cb is None or self._clock.chip:
            return
        now = self._clock.now_us()
        due = 0
        while self._next_us <= now:
            self._next_us += self._period_us
            due += 1
        if due > SCHED_DEPTH:
            self.dropped += due - SCHED_DEPTH
            due = SCHED_DEPTH
        for _ in range(due):
            self.run()
