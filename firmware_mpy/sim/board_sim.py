# The simulated board: what board_esp32 builds from machine.*, built here
# from the chip models. It reads sim.json in its working directory (its
# flash), written by `pulsebridge sim`:
#   {"ecg": {"file": "ecg.i32", "rate_hz": 360}, "ppg": {"file": "ppg.i32", "rate_hz": 250},
#    "ppm": {"max30003": 20, "max30102": -30}, "lead_off": [[start_s, end_s]],
#    "finger_off": [...], "virtual_clock": false, "seed": 1,
#    "board_speed": "host", "irq_pins": true}
# irq_pins: the chips' FIFO interrupt outputs (MAX30003 INTB, MAX30102 INT)
# are wired to input pins, as in board_esp32.PINS; false: not wired.
# board_speed "host" runs the firmware at this machine's speed; a chip name
# (sim.speedbench.TARGETS) runs it at that chip's (sim.clock.ChipClock),
# calibrated when the board starts: speed_factor is then chip us per host us.
import gc
import json
import os
import sys

from app import ticks
from protocols import fields
from sim import models
from sim.clock import ChipClock, RealClock, VirtualClock
from sim.reset import reset_process
from sim.waveform import Waveform

SPI_HZ = 4000000  # board_esp32.PINS
I2C_HZ = 400000
CONSOLE_BAUD = 115200


def chip_clock(speed, real_time):
    # A ChipClock for the target named speed, calibrated now; and the
    # per-program factors (x 1000) behind its factor.
    from sim import speedbench
    from sim.cpu import ThreadCpu

    meter = ThreadCpu()
    factor, each = speedbench.calibrate(speed, meter)
    gc.collect()  # what the calibration programs left is not the firmware's
    return ChipClock(factor, meter, real_time, speedbench.Probe()), each


class WatchdogReset(BaseException):
    # What a watchdog reset does to the firmware: nothing it can catch
    # (BaseException: the loop's `except Exception` does not stop it).
    pass


class Reboot(BaseException):
    # machine.reset() on the simulated board: run_forever ends the process
    # (reset_process) and the simulator powers it up again, so boot.py
    # chooses the firmware slot afresh (app/ota.py: an update's switch and
    # rollback). In-process tests catch it.
    pass


class SimWatchdog:
    # machine.WDT's stand-in, on the board's clock: if the loop does not
    # feed it for timeout_ms, the next time the firmware calls its board
    # (ticks, sleep, service) raises WatchdogReset; the simulated board then
    # restarts the firmware as the chip would (run_forever). `fired` counts
    # resets, for tests.
    def __init__(self, clock, timeout_ms):
        self._clock = clock
        self.timeout_ms = timeout_ms
        self.fired = 0
        self.armed = True
        self._fed_ms = clock.now_us() // 1000

    def feed(self):
        self.check()  # fed too late: the real one would have fired meanwhile
        self._fed_ms = self._clock.now_us() // 1000

    def check(self):
        if self.armed and self._clock.now_us() // 1000 - self._fed_ms > self.timeout_ms:
            self.armed = False  # until the firmware starts it again
            self.fired += 1
            raise WatchdogReset()


def run_forever(board, run, until_ms=None, boot=None):
    # The firmware as the chip runs it: `run(board, until_ms)` (app.main.run)
    # started over after each watchdog reset, as a reset chip boots again.
    # A chip's reset also empties its RAM; here the last run's objects are
    # collected instead, then `boot()` does again what the entry point did
    # before the first run (the outbox's 24 kB ring: allocated in a heap the
    # last run left fragmented, it fails and the board never streams again).
    while True:
        reset = False
        try:
            return run(board, until_ms)
        except WatchdogReset:
            reset = True
        except Reboot:  # machine.reset(): the firmware starts again from boot.py
            board.console("\r\npulsebridge: rebooting (simulated board)")
            reset_process()
        if reset:  # outside the handler: nothing of the last run is still referenced
            board.reboot_after_watchdog()
            gc.collect()
            if boot is not None:
                boot()
            board.console("\r\npulsebridge: watchdog reset (simulated board)")


class SimBoard:
    name = "sim"

    def __init__(self, sim, clock=None):
        self.sim = sim
        self.speed = sim.get("board_speed", "host")
        self.speed_each = []
        if clock is None and self.speed != "host":
            clock, self.speed_each = chip_clock(self.speed, not sim.get("virtual_clock"))
        self.clock = clock or (VirtualClock() if sim.get("virtual_clock") else RealClock())
        self.console_port = None
        self._irq_pins = {}
        self._irq_list = []
        self.console_in = sys.stdin.buffer  # what the serial link reads and writes (the bench: its hub)
        self.console_out = sys.stdout.buffer
        self._timers = []
        self.models = {}
        self.radio = None
        self.link_override = None  # a fake link object for in-process runs
        self.buses = {}  # "spi", "i2c": the simulated buses, where faults are injected
        self._tick0_ms = sim.get("ticks_start_ms", 0)
        self._uptime0_ms = sim.get("uptime_start_ms", 0)
        self.uptime = ticks.Uptime()
        self.wdt = None
        self.watchdog_resets = 0  # resets the SimWatchdog caused, across firmware restarts
        self._reset_by_wdt = False

    @classmethod
    def from_file(cls, path="sim.json"):
        with open(path) as f:
            return cls(json.load(f))

    # The ESP32's wrapping ticks (period 2^30, app.ticks), from the board's
    # clock plus sim.json's "ticks_start_ms" (default 0): a test starts them
    # just before the wrap. uptime_ms() is the clock plus "uptime_start_ms"
    # (default 0: a test starts it just before 2^30 ms, 12.4 days up).
    def ticks_ms(self):
        if self.wdt is not None:
            self.wdt.check()
        return (self.clock.now_us() // 1000 + self._tick0_ms) % ticks.PERIOD

    def ticks_us(self):
        return (self.clock.now_us() + self._tick0_ms * 1000) % ticks.PERIOD

    def ticks_diff(self, a, b):
        return ticks.diff(a, b)

    def uptime_ms(self):
        return self.clock.now_us() // 1000 + self._uptime0_ms

    def refresh_uptime(self):
        # uptime_ms() in halves (app.ticks.Uptime), as board_esp32 keeps it.
        ms = self.uptime_ms()
        u = self.uptime
        u.hi = ms >> 30
        u.lo = ms & (ticks.PERIOD - 1)
        return u

    def sleep_ms(self, ms):
        if self.wdt is not None:
            self.wdt.check()
        self.clock.sleep_ms(ms)

    def irq_pin(self, stream_id):
        # The input pin the stream's chip signals a FIFO to drain on, or None.
        return self._irq_pins.get(stream_id)

    def idle_ms(self, ms, woken):
        # Sleeps ms, or less if a soft IRQ makes woken() true.
        clock = self.clock
        if isinstance(clock, ChipClock):
            clock.idle_ms(ms, woken)
            return
        for _ in range(ms):
            self.clock.sleep_ms(1)
            self.service()
            if woken():
                return

    def watchdog(self, timeout_ms):
        w = self.wdt
        if w is None or not w.armed:
            w = self.wdt = SimWatchdog(self.clock, timeout_ms)
        w.timeout_ms = timeout_ms
        w._fed_ms = self.clock.now_us() // 1000
        return w

    def unique_id(self):
        # The simulated chip's id (sim.json, hex): what machine.unique_id() gives on an ESP32.
        import binascii

        return binascii.unhexlify(self.sim.get("unique_id", ""))

    def watchdog_idle(self):
        if self.wdt is not None:
            self.wdt.armed = False  # the ESP32 board feeds it from a timer at the REPL

    def reboot(self):
        raise Reboot()

    def reset_cause_watchdog(self):
        return self._reset_by_wdt

    def reboot_after_watchdog(self):
        # What a reset leaves: the chips and the radio as they were, the
        # firmware starting over. Timers die with the firmware.
        self.watchdog_resets += 1
        self._reset_by_wdt = True
        self.wdt = None
        for t in self._timers:
            t.deinit()
        self._timers = []

    def service(self):
        # (Runs every loop, as the firmware's board: its call frame fits the
        # C stack, 11 words at most, or the heap would give it one each
        # time, which board_esp32's does not cost.)
        for t in self._timers:
            t.fire_due()
        for p in self._irq_list:  # (a list: dict.values() would allocate a view each loop)
            p.poll()
        if self.radio is not None:
            self._radio_service(self.radio)

    def _radio_service(self, radio):
        c = self.clock
        c.enter()
        try:
            radio.service()
        finally:
            c.leave()

    def console(self, text):
        c = self.clock
        c.enter()
        try:
            print(text)
        finally:
            c.leave()

    def _wave(self, name, channels):
        w = self.sim[name]
        return Waveform(w["file"], w["rate_hz"], channels, w.get("offset", 0))

    def sensors(self, cfg):
        out: list = []
        ppm = self.sim.get("ppm", {})
        seed = self.sim.get("seed", 1)
        lead_off = [tuple(x) for x in self.sim.get("lead_off", ())]
        ecg = cfg.get("ecg")
        # Each driver imported only for a chip the board has, as board_esp32 does.
        if ecg and ecg["chip"] == "max30003":
            from drivers.max30003 import MAX30003

            model = models.MAX30003Model(self.clock, self._wave("ecg", 1), ppm.get("max30003", 0), seed, lead_off)
            cs = models.SimPin(1)
            self.models["max30003"] = model
            spi = self.buses["spi"] = models.SimSPI([(cs, model)], self.clock, SPI_HZ)
            chip = MAX30003(spi, cs)
            chip.configure(ecg["rate_hz"], ecg["gain"])
            if self.sim.get("irq_pins", True):
                chip.enable_fifo_irq()
                self._irq_pins[fields.STREAM_ECG_MAX30003] = models.SimIrqPin(self.clock, model)
                self._irq_list.append(self._irq_pins[fields.STREAM_ECG_MAX30003])
            out.append((fields.STREAM_ECG_MAX30003, chip, chip.lead_off))
        elif ecg and ecg["chip"] == "ad8232":
            from drivers.ad8232 import AD8232

            front_model = models.AD8232Model(self.clock, self._wave("ecg", 1), seed, lead_off)
            self.models["ad8232"] = front_model
            timer = models.SimTimer(self.clock)
            self._timers.append(timer)
            front = AD8232(front_model, models.LeadPin(front_model), models.LeadPin(front_model), timer,
                           ecg["rate_hz"], self.ticks_us, self.ticks_diff)
            out.append((fields.STREAM_ECG_AD8232, front, front.lead_off))
        elif ecg:
            raise ValueError("unknown ECG chip %r" % ecg["chip"])
        ppg = cfg.get("ppg")
        if ppg:
            from drivers.max30102 import MAX30102

            finger_off = [tuple(x) for x in self.sim.get("finger_off", ())]
            oxi_model = models.MAX30102Model(self.clock, self._wave("ppg", 2), ppm.get("max30102", 0), seed,
                                             finger_off)
            self.models["max30102"] = oxi_model
            i2c = self.buses["i2c"] = models.SimI2C([oxi_model], self.clock, I2C_HZ)
            oxi = MAX30102(i2c, self.sleep_ms)
            oxi.configure(ppg["rate_hz"], ppg["pulse_width_us"], ppg["adc_range_na"], ppg["led_red_ua"],
                          ppg["led_ir_ua"])
            if self.sim.get("irq_pins", True):
                oxi.enable_fifo_irq()
                self._irq_pins[fields.STREAM_PPG_MAX30102] = models.SimIrqPin(self.clock, oxi_model)
                self._irq_list.append(self._irq_pins[fields.STREAM_PPG_MAX30102])
            out.append((fields.STREAM_PPG_MAX30102, oxi, None))
        return out

    def link(self, cfg, max_message):
        if self.link_override is not None:
            return self.link_override
        if cfg["link"] == "ble":
            from app.link_ble import BleLink
            from app.main import FIRMWARE
            from sim import fake_bluetooth
            if self.radio is None or self.radio.ble is not None:  # (a radio made ahead: prepare_radio)
                self.radio = fake_bluetooth.radio_from(self.sim.get("ble", {}), self.clock)
            return BleLink(fake_bluetooth, cfg["device_id"], max_message, FIRMWARE, "pulsebridge simulated board",
                           ticks_ms=self.ticks_ms)
        from app.link_serial import SerialLink
        if not self.clock.chip and self.console_in is sys.stdin.buffer and self.console_out is sys.stdout.buffer:
            return SerialLink(sys.stdin.buffer, sys.stdout.buffer, max_message, self.ticks_us, self.ticks_diff,
                              CONSOLE_BAUD)
        from sim.console import SimConsole
        self.console_port = SimConsole(self.clock, self.console_in, self.console_out, CONSOLE_BAUD)
        return SerialLink(self.console_port, self.console_port, max_message, self.ticks_us, self.ticks_diff,
                          CONSOLE_BAUD)

    def prepare_radio(self):
        # The fake radio made before the firmware asks for its link, so that
        # a benchmark counts its buffers as the simulation's heap.
        from sim import fake_bluetooth
        self.radio = fake_bluetooth.radio_from(self.sim.get("ble", {}), self.clock)

    def random_bytes(self, n):
        return os.urandom(n)  # the host's getrandom()

    def free_heap(self):
        return gc.mem_free()

    def battery_pct(self, cfg):
        return self.sim.get("battery_pct", 100)
