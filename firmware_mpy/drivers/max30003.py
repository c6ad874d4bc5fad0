# MAX30003 ECG analog front end (SPI, mode 0, up to 12 MHz). Its ECG channel
# writes 18-bit samples, each tagged, into a 32-word FIFO at a rate set by
# its own 32.768 kHz clock; we drain the FIFO with burst reads.
#
# The chip has no FIFO count register: what it says about its fill level is
# STATUS.EINT, set while at least EFIT samples are unread (MNGR_INT.EFIT),
# and STATUS.EOVF after an overflow. A burst therefore reads exactly EFIT
# words, all of them known to hold samples, and only while EINT is set:
# nothing is clocked out past the last sample (a word clocked out is popped,
# and one that arrives during a burst would be lost if discarded).
#
# SPI transaction: one command byte (register << 1 | 1 to read), then 24 bits
# of data per register, or per FIFO word in a burst. An ECG FIFO word is
#   bits 23..6: sample (two's complement), bits 5..3: ETAG, bits 2..0: PTAG.
# Nothing in read_into allocates.
from micropython import const

from drivers import _native

_REG_STATUS = const(0x01)
_REG_EN_INT = const(0x02)
_REG_MNGR_INT = const(0x04)
_REG_SW_RST = const(0x08)
_REG_SYNCH = const(0x09)
_REG_FIFO_RST = const(0x0A)
_REG_INFO = const(0x0F)
_REG_CNFG_GEN = const(0x10)
_REG_CNFG_EMUX = const(0x14)
_REG_CNFG_ECG = const(0x15)
_REG_ECG_FIFO_BURST = const(0x20)
_REG_ECG_FIFO = const(0x21)  # one sample a read

# ETAG 0/1: valid (normal/fast mode), 2/3: valid and last in the FIFO.
_ETAG_EMPTY = const(6)
_ETAG_OVERFLOW = const(7)

_INFO_REV_MASK = const(0xF00000)
_INFO_REV = const(0x500000)  # INFO[23:20] reads 0101 on the MAX30003
_STATUS_EOVF = const(1 << 22)
_STATUS_DCLOFF = const(1 << 20)
_STATUS_LDOFF = const(0xF)  # LDOFF_PH, LDOFF_PL, LDOFF_NH, LDOFF_NL

_STATUS_EINT = const(1 << 23)  # at least EFIT samples unread
# EN_INT: INTB (open drain, active low) follows EINT and EOVF; INTB_TYPE 11:
# open drain with the chip's own 125 kohm pull-up.
_EN_INT_FIFO = const((1 << 23) | (1 << 22) | 3)

# CNFG_GEN fields (datasheet register map): EN_ECG bit 19, EN_DCLOFF 13:12,
# IPOL 11, IMAG 10:8, VTH 7:6, EN_RBIAS 5:4, RBIASV 3:2, RBIASP 1, RBIASN 0.
_CNFG_GEN_EN_ECG = const(1 << 19)
_CNFG_GEN_DCLOFF = const(1 << 12)  # EN_DCLOFF = 01: DC lead-off detection on ECGP/ECGN
_CNFG_GEN_IMAG_10NA = const(2 << 8)  # IMAG = 010: lead-off current 10 nA
_CNFG_GEN_VTH_300MV = const(0 << 6)  # VTH = 00: lead-off threshold VMID +/- 300 mV (01 would be 400)
# Lead bias as Maxim's reference configuration sets it: resistive bias on
# (EN_RBIAS = 01), 100 Mohm (RBIASV = 01), on both inputs (RBIASP, RBIASN).
# Without it (and no third electrode) the inputs float out of their
# common-mode range and the channel rails.
_CNFG_GEN_RBIAS = const((1 << 4) | (1 << 2) | (1 << 1) | 1)
_CNFG_GEN = const(_CNFG_GEN_DCLOFF | _CNFG_GEN_IMAG_10NA | _CNFG_GEN_VTH_300MV | _CNFG_GEN_RBIAS)
_CNFG_ECG_DLPF_40HZ = const(1 << 12)
_EFIT = const(16)  # samples per burst: EINT is set while at least this many are unread
_MNGR_INT_EFIT = const((_EFIT - 1) << 19)  # EFIT field holds the threshold minus one
_FULL_SCALE_CODE = const(0x1FFFF)

RATES_HZ = (512, 256, 128)  # with FMSTR = 32768 Hz; CNFG_ECG RATE field value = index
GAINS = (20, 40, 80, 160)  # V/V; CNFG_ECG GAIN field value = index
_VREF_UV = const(1000000)  # V_ECG = ADC * VREF / (2**17 * gain)


class SensorError(Exception):
    pass


class MAX30003:
    def __init__(self, spi, cs):
        self._spi = spi
        self._cs = cs
        self._tx = bytearray(4)
        self._rx = bytearray(4)
        self._btx = bytearray(1 + 3 * _EFIT)
        self._brx = bytearray(1 + 3 * _EFIT)
        self._btx[0] = (_REG_ECG_FIFO_BURST << 1) | 1
        self.rate_hz = 512
        self.gain = 20
        self._scale = (_VREF_UV, (1 << 17) * 20)  # scale(), made when configured: a frame allocates no tuple
        self.lost = 0
        self.lost_after = True  # its FIFO keeps what it stored before an overflow: the loss follows the samples read
        self.saturated = False
        self._more = False  # the last word read was a valid one not marked last (ETAG 0/1): samples follow it
        self.emptied = False  # read_rest_into stopped at the sample the chip marked last: the FIFO was empty then
        self._irq = False  # FIFO interrupt enabled (kept across a restart)
        cs.value(1)

    # (Each method here that runs per sample burst keeps to 11 words of
    # locals and stack, so MicroPython gives its call frame on the C stack,
    # not from the heap: README, "call frames".)
    def _xfer(self, reg, value, read):
        tx = self._tx
        tx[0] = (reg << 1) | (1 if read else 0)
        tx[1] = (value >> 16) & 0xFF
        tx[2] = (value >> 8) & 0xFF
        tx[3] = value & 0xFF
        self._transfer()
        rx = self._rx
        return (rx[1] << 16) | (rx[2] << 8) | rx[3]

    def _transfer(self):
        self._cs.value(0)
        try:
            self._spi.write_readinto(self._tx, self._rx)
        finally:
            self._cs.value(1)

    def _transfer_burst(self):
        self._cs.value(0)
        try:
            self._spi.write_readinto(self._btx, self._brx)
        finally:
            self._cs.value(1)

    def read_reg(self, reg):
        return self._xfer(reg, 0, True)

    def write_reg(self, reg, value):
        self._xfer(reg, value, False)

    def info(self):
        return self.read_reg(_REG_INFO)

    def status(self):
        return self.read_reg(_REG_STATUS)

    def configure(self, rate_hz=512, gain=20):
        if rate_hz not in RATES_HZ:
            raise SensorError("MAX30003 rate %d Hz not one of %s" % (rate_hz, RATES_HZ))
        if gain not in GAINS:
            raise SensorError("MAX30003 gain %d not one of %s" % (gain, GAINS))
        info = self.info()
        if info & _INFO_REV_MASK != _INFO_REV:
            raise SensorError("MAX30003 not found: INFO is 0x%06x" % info)
        self.write_reg(_REG_SW_RST, 0)
        # The ECG channel stays off (EN_ECG 0) until start(): no samples, no
        # FIFO interrupt while the firmware is still starting up.
        self.write_reg(_REG_CNFG_GEN, _CNFG_GEN)
        self.write_reg(_REG_CNFG_EMUX, 0)  # inputs connected, no calibration
        self.write_reg(_REG_CNFG_ECG, (RATES_HZ.index(rate_hz) << 22) | (GAINS.index(gain) << 16)
                       | _CNFG_ECG_DLPF_40HZ)
        self.write_reg(_REG_MNGR_INT, _MNGR_INT_EFIT)
        self.write_reg(_REG_EN_INT, 0)  # polled
        self.rate_hz = rate_hz
        self.gain = gain
        self._scale = (_VREF_UV, (1 << 17) * gain)

    def enable_fifo_irq(self):
        # INTB goes low when EFIT samples are unread (or the FIFO overflowed)
        # and high again once a burst read takes it below: one falling edge
        # per burst's worth, for a Pin.irq that only sets a flag.
        self.write_reg(_REG_EN_INT, _EN_INT_FIFO)
        self._irq = True

    def alive(self):
        # Whether the chip still answers as a MAX30003 (a dead one or an open
        # bus reads all ones or zeros: SPI itself reports nothing).
        return self.info() & _INFO_REV_MASK == _INFO_REV

    def restart(self):
        # Configured again as it was, sampling from now (after a fault).
        self.configure(self.rate_hz, self.gain)
        if self._irq:
            self.enable_fifo_irq()
        self.start()

    def start(self):
        self.write_reg(_REG_CNFG_GEN, self.read_reg(_REG_CNFG_GEN) | _CNFG_GEN_EN_ECG)
        self.write_reg(_REG_FIFO_RST, 0)
        self._more = False
        self.write_reg(_REG_SYNCH, 0)  # restart the sampling clock: sample 0 is now

    def stop(self):
        self.write_reg(_REG_CNFG_GEN, 0)

    def scale(self):
        # uV per ADC count: (numerator, denominator).
        return self._scale

    def lead_off(self):
        return bool(self.status() & (_STATUS_DCLOFF | _STATUS_LDOFF))

    def read_into(self, chans, pos, room):
        # Reads whole bursts of _EFIT valid samples into chans[0] from pos
        # while STATUS says that many are unread and room holds them (callers
        # give 32 spare); fewer wait for the next call, at most _EFIT / rate
        # (31 ms at 512 Hz, half the FIFO's fill time). Returns the samples
        # read; self.lost is then -1 if the FIFO overflowed after them (this
        # chip counts no lost samples: the caller estimates them), else 0.
        # After an overflow (EOVF) the FIFO still holds the samples it stored
        # before it: those are read first (their tags say valid), up to the
        # overflow's tag, as Maxim's MAX30003WING examples read them; only
        # then is the FIFO reset (FIFO_RST), which ends the overflow.
        # Nothing here allocates, not even a result tuple.
        n = 0
        self.lost = 0
        self.saturated = False
        while room - n >= _EFIT:
            got = self._burst(chans[0], pos + n)
            n += got & 0xFFFF
            if got & 0x10000:
                self.saturated = True
            if got & 0x60000:
                break  # the FIFO overflowed (and was reset), or holds fewer than a burst
        return n

    def read_rest_into(self, chans, pos, room):
        # What read_into left (fewer than _EFIT samples, EINT clear), one
        # sample a read until the chip marks one the last (ETAG 2/3), so the
        # FIFO is empty after it, before a pause longer than the 31 ms a
        # burst's threshold leaves (a collection: the FIFO's whole fill time,
        # 62.5 ms at 512 Hz, is then its own). Only as far as the last word
        # read said more follow: no word is clocked out of an empty FIFO. An
        # overflow tag stops it (read_into's next burst finds EOVF and
        # resets). Returns the samples read; saturated is set if one was at
        # full scale. (Every status period and before each collection: this
        # and _rest_word keep within the VM's 11 words of frame, so neither
        # takes its frame from the heap, README "call frames".)
        n = 0
        self.emptied = False
        while self._more and n < room and self._rest_word(chans[0], pos + n):
            n += 1
        return n

    def _rest_word(self, out, at):
        # One word of the FIFO into out[at]; False if it held no sample.
        word = self.read_reg(_REG_ECG_FIFO)
        etag = (word >> 3) & 7
        if etag > 3:  # empty or overflow: nothing more to take here
            self._more = False
            return False
        v = word >> 6
        if v & 0x20000:
            v -= 0x40000
        if v >= _FULL_SCALE_CODE or v <= -_FULL_SCALE_CODE:
            self.saturated = True
        out[at] = v
        self._more = etag < 2
        self.emptied = not self._more
        return True

    def _burst(self, out, at):
        # One burst of _EFIT samples into out[at:] if the FIFO holds that
        # many (EINT): _native.max30003_words's count and flags. With fewer
        # and an overflow (EOVF): the samples before it were read, the FIFO
        # is reset (0x20000); fewer and no overflow: 0x40000.
        status = self.status()
        if not status & _STATUS_EINT:
            if status & _STATUS_EOVF:
                self._overflowed()
                return 0x20000
            return 0x40000
        self._transfer_burst()
        got = _native.max30003_words(self._brx, _EFIT, out, at)
        # The burst's last word (its ETAG in the low byte): valid and not
        # the FIFO's last, samples remain under the threshold (read_rest_into).
        self._more = (got & 0x6FFFF) == _EFIT and (self._brx[3 * _EFIT] >> 3) & 7 < 2
        if got & 0x20000:  # the overflow's tag, after the samples stored before it
            self._overflowed()
        return got

    def _overflowed(self):
        self.write_reg(_REG_FIFO_RST, 0)
        self._more = False
        self.lost = -1
