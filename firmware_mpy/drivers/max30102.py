# MAX30102 pulse oximeter (I2C address 0x57), run in SpO2 mode: red and IR
# LEDs alternate, each sample is two 18-bit ADC values in the 32-sample FIFO.
# The chip paces the samples on its own oscillator; we only drain its FIFO.
#
# Per-sample work (read_into) allocates nothing: the burst buffer and its
# memoryview slices are made once, in __init__.
from micropython import const

from drivers import _native

ADDRESS = const(0x57)
_REG_INT_STATUS_1 = const(0x00)  # then INT_STATUS_2, INT_ENABLE_1/2, FIFO_WR_PTR...
_INT_A_FULL = const(0x80)  # INT_STATUS_1: a write left FIFO_A_FULL or fewer free slots
_REG_INT_ENABLE_1 = const(0x02)
_REG_FIFO_WR_PTR = const(0x04)  # then OVF_COUNTER (0x05), FIFO_RD_PTR (0x06)
_REG_FIFO_DATA = const(0x07)
_REG_FIFO_CONFIG = const(0x08)
_REG_MODE_CONFIG = const(0x09)
_REG_SPO2_CONFIG = const(0x0A)
_REG_LED1_PA = const(0x0C)  # red
_REG_LED2_PA = const(0x0D)  # IR
_REG_PART_ID = const(0xFF)

PART_ID = const(0x15)
_MODE_RESET = const(0x40)
_MODE_SPO2 = const(0x03)
_FIFO_ROLLOVER = const(0x10)  # FIFO_A_FULL (bits 3:0) 0 unless an interrupt pin is wired: A_FULL means 32 unread
# With an interrupt pin: A_FULL (and the INT pin, active low) once 17 samples
# are unread, 170 ms at 100 Hz, leaving 15 (150 ms) before the FIFO rolls over.
_FIFO_A_FULL_IRQ = const(15)
_FIFO_DEPTH = const(32)
_BYTES_PER_SAMPLE = const(6)  # 3 bytes red, 3 bytes IR
_SAMPLE_MASK = const(0x3FFFF)  # 18 bits, left-justified for every pulse width
_FULL_SCALE = const(0x3FFFF)
_LED_UA_PER_LSB = const(200)  # 0.2 mA per step, 0 to 51 mA
_RESET_POLLS = const(50)
_OVF_SATURATED = const(0x1F)

RATES_HZ = (50, 100, 200, 400, 800, 1000, 1600, 3200)
PULSE_WIDTHS_US = (69, 118, 215, 411)
ADC_RANGES_NA = (2048, 4096, 8192, 16384)
# Highest SpO2-mode sample rate for each pulse width (datasheet, SpO2 mode
# settings table): a longer LED pulse leaves less time per sample.
_MAX_RATE_FOR_PW = (1600, 1000, 800, 400)


class SensorError(Exception):
    pass


class MAX30102:
    def __init__(self, i2c, sleep_ms, address=ADDRESS):
        self._i2c = i2c
        self._sleep_ms = sleep_ms
        self._addr = address
        self._one = bytearray(1)
        self._ptrs = bytearray(7)  # INT_STATUS_1 .. FIFO_RD_PTR, one transaction
        self._burst = bytearray(_FIFO_DEPTH * _BYTES_PER_SAMPLE)
        mv = memoryview(self._burst)
        self._views = [mv[:n * _BYTES_PER_SAMPLE] for n in range(_FIFO_DEPTH + 1)]
        self.rate_hz = 100
        self.pulse_width_us = 411
        self.adc_range_na = 16384
        self.led_red_ua = 0
        self.led_ir_ua = 0
        self._scale = (16384, 1 << 18)  # scale() and drive(), made when configured: a frame allocates no tuple
        self._drive = (0, 0, 16384, 411)
        self.saturated = False
        self._irq = False  # FIFO interrupt enabled (kept across a restart)
        self.lost = 0
        self.lost_after = False  # its FIFO rolls over, the oldest overwritten: the loss precedes the samples read
        self._rd_ptr = 0  # FIFO_RD_PTR as the last drain found it, before its burst

    def _write(self, reg, value):
        self._one[0] = value
        self._i2c.writeto_mem(self._addr, reg, self._one)

    def _read(self, reg):
        self._i2c.readfrom_mem_into(self._addr, reg, self._one)
        return self._one[0]

    def part_id(self):
        return self._read(_REG_PART_ID)

    def reset(self):
        pid = self.part_id()
        if pid != PART_ID:
            raise SensorError("MAX30102 not found: PART_ID is 0x%02x, expected 0x%02x" % (pid, PART_ID))
        self._write(_REG_MODE_CONFIG, _MODE_RESET)
        for _ in range(_RESET_POLLS):
            if not self._read(_REG_MODE_CONFIG) & _MODE_RESET:
                return
            self._sleep_ms(1)
        raise SensorError("MAX30102 did not come out of reset")

    def configure(self, rate_hz=100, pulse_width_us=411, adc_range_na=16384, led_red_ua=7000, led_ir_ua=7000):
        if rate_hz not in RATES_HZ:
            raise SensorError("MAX30102 rate %d Hz not one of %s" % (rate_hz, RATES_HZ))
        if pulse_width_us not in PULSE_WIDTHS_US:
            raise SensorError("MAX30102 pulse width %d us not one of %s" % (pulse_width_us, PULSE_WIDTHS_US))
        if adc_range_na not in ADC_RANGES_NA:
            raise SensorError("MAX30102 ADC range %d nA not one of %s" % (adc_range_na, ADC_RANGES_NA))
        pw = PULSE_WIDTHS_US.index(pulse_width_us)
        if rate_hz > _MAX_RATE_FOR_PW[pw]:
            raise SensorError("MAX30102 cannot sample at %d Hz with %d us pulses (at most %d Hz)"
                              % (rate_hz, pulse_width_us, _MAX_RATE_FOR_PW[pw]))
        for ua in (led_red_ua, led_ir_ua):
            if not 0 <= ua <= 255 * _LED_UA_PER_LSB:
                raise SensorError("MAX30102 LED current %d uA outside 0..51000" % ua)
        self.reset()
        self._write(_REG_INT_ENABLE_1, 0)  # polled, no interrupt pin needed
        self._write(_REG_FIFO_CONFIG, _FIFO_ROLLOVER)  # no averaging; overflow counted
        self._write(_REG_SPO2_CONFIG,
                    (ADC_RANGES_NA.index(adc_range_na) << 5) | (RATES_HZ.index(rate_hz) << 2) | pw)
        self._write(_REG_LED1_PA, led_red_ua // _LED_UA_PER_LSB)
        self._write(_REG_LED2_PA, led_ir_ua // _LED_UA_PER_LSB)
        self.rate_hz = rate_hz
        self.pulse_width_us = pulse_width_us
        self.adc_range_na = adc_range_na
        self.led_red_ua = (led_red_ua // _LED_UA_PER_LSB) * _LED_UA_PER_LSB
        self.led_ir_ua = (led_ir_ua // _LED_UA_PER_LSB) * _LED_UA_PER_LSB
        self._scale = (adc_range_na, 1 << 18)
        self._drive = (self.led_red_ua, self.led_ir_ua, adc_range_na, pulse_width_us)

    def enable_fifo_irq(self):
        # INT falls when FIFO_A_FULL slots are left; reading INT_STATUS_1
        # (read_into does, with the pointers) releases it.
        self._write(_REG_FIFO_CONFIG, _FIFO_ROLLOVER | _FIFO_A_FULL_IRQ)
        self._write(_REG_INT_ENABLE_1, _INT_A_FULL)
        self._irq = True

    def alive(self):
        return self.part_id() == PART_ID

    def restart(self):
        # Reset and configured again as it was, sampling from now (after a fault).
        self.configure(self.rate_hz, self.pulse_width_us, self.adc_range_na, self.led_red_ua, self.led_ir_ua)
        if self._irq:
            self.enable_fifo_irq()
        self.start()

    def start(self):
        # Clear the FIFO pointers and overflow counter, then start sampling.
        self._write(_REG_FIFO_WR_PTR, 0)
        self._write(_REG_FIFO_WR_PTR + 1, 0)
        self._write(_REG_FIFO_WR_PTR + 2, 0)
        self._read(_REG_INT_STATUS_1)
        self._write(_REG_MODE_CONFIG, _MODE_SPO2)

    def stop(self):
        self._write(_REG_MODE_CONFIG, 0x80 | _MODE_SPO2)  # SHDN: LEDs off

    def scale(self):
        # nA of photodiode current per ADC count: (numerator, denominator).
        return self._scale

    def drive(self):
        # (red LED uA, IR LED uA, ADC range nA, pulse width us)
        return self._drive

    def read_into(self, chans, pos, room):
        # Drains up to room samples into chans[0] (red) and chans[1] (IR) from
        # pos; returns how many. self.lost is then the number the FIFO lost
        # before them, or -1 when more were lost than the chip can count.
        #
        # WR_PTR == RD_PTR means empty or full (32 unread). It is full if
        # samples overflowed (OVF_COUNTER > 0) or if A_FULL was set since we
        # last read INT_STATUS_1: A_FULL needs a write that leaves FIFO_A_FULL
        # slots free, and the status is read again after each burst, so the
        # FIFO cannot be empty again (see _after_burst). Status and pointers
        # come in one transaction (registers 0x00..0x06).
        # (In pieces of at most 11 words of call frame, or each read would
        # take its frame from the heap: README, "call frames".)
        n = self._level(room)
        if n == 0:
            return 0
        self._read_burst(chans, pos, n)
        self._after_burst(n)
        return n

    def _level(self, room):
        # Samples to read (room at most); sets self.lost.
        regs = self._ptrs
        self._i2c.readfrom_mem_into(self._addr, _REG_INT_STATUS_1, regs)
        lost = regs[5]
        if lost == _OVF_SATURATED:
            lost = -1  # 31 or more: the count saturated, the caller estimates
        self.lost = lost
        self._rd_ptr = regs[6]
        n = (regs[4] - regs[6]) & (_FIFO_DEPTH - 1)
        if n == 0 and (lost or regs[0] & _INT_A_FULL):
            n = _FIFO_DEPTH
        return n if n < room else room

    def _read_burst(self, chans, pos, n):
        self._i2c.readfrom_mem_into(self._addr, _REG_FIFO_DATA, self._views[n])
        self.saturated = _native.max30102_samples(self._burst, n, chans[0], chans[1], pos) != 0

    def _after_burst(self, n):
        # Samples that arrive between the pointer read and the burst's first
        # pop, in a full FIFO, overwrite its oldest (RD_PTR moves on with
        # WR_PTR) and count in OVF_COUNTER, which the pop clears: lost before
        # the samples read, counted by nobody (at 400 kHz a whole FIFO's
        # burst takes 4.4 ms, 0.44 of a sample at 100 Hz). RD_PTR tells: it
        # moved by the n pops, the overwrites and those after the last pop
        # (OVF_COUNTER now; the next drain counts them). Their writes also
        # set A_FULL after our status read: read again with the pointers,
        # it no longer makes an emptied FIFO's equal pointers read as full.
        regs = self._ptrs
        self._i2c.readfrom_mem_into(self._addr, _REG_INT_STATUS_1, regs)
        if self.lost >= 0:
            self.lost += (regs[6] - self._rd_ptr - n - regs[5]) & (_FIFO_DEPTH - 1)
