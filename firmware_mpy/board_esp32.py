# The real board: an ESP32 with the sensors on its buses, built from
# machine.* (and bluetooth for the BLE link). Pins come from config.json
# ("pins"), defaulting to the reference wiring below.
import gc
import os
import sys
import time

from machine import ADC, I2C, SPI, Pin, Timer
from micropython import const

from app import ticks
from protocols import fields

_BATTERY_EVERY_MS = const(10000)  # a cell's level moves over minutes: its ADC read this often at most

PINS = {
    "i2c_scl": 22, "i2c_sda": 21, "i2c_hz": 400000,
    "spi_sck": 18, "spi_mosi": 23, "spi_miso": 19, "spi_hz": 4000000, "ecg_cs": 5,
    "ad8232_out": 36, "ad8232_lo_plus": 34, "ad8232_lo_minus": 35,
    # The chips' FIFO interrupt outputs (open drain, active low): the firmware
    # then drains each FIFO when it asks. None: not wired, polled every poll_ms.
    "ecg_intb": 4, "ppg_int": 27,
}


class Esp32Board:
    name = "esp32"

    def __init__(self):
        self.radio = None
        self._wdt = None
        self._wdt_ms = 0
        self._battery_adc = None
        self._battery_pct = -1  # the last reading (-1: none yet), taken at _battery_at_ms
        self._battery_at_ms = time.ticks_ms()
        self._last_ms = time.ticks_ms()
        self.uptime = ticks.Uptime()
        self._irq_pins = {}

    def ticks_ms(self):
        # Wraps after 12.4 days (2^30 ms): the app combines ticks only with
        # app.ticks (time.ticks_diff/ticks_add), so they stay small ints.
        return time.ticks_ms()

    def ticks_us(self):
        return time.ticks_us()

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def refresh_uptime(self):
        # ms since boot, never wrapping: the time base on the wire (t0_ms,
        # tick_ms), in halves (app.ticks.Uptime: small ints for any uptime).
        # Accumulated from the wrapping ticks, so it must be read more often
        # than every 6 days (the app does, every status period).
        raw = time.ticks_ms()
        self.uptime.advance(time.ticks_diff(raw, self._last_ms))
        self._last_ms = raw
        return self.uptime

    def uptime_ms(self):
        # The same as one int (a big int past 2^30 ms: for the rarer uses).
        return self.refresh_uptime().ms()

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def idle_ms(self, ms, woken):
        # Sleeps ms, or less once a pin interrupt's handler makes woken()
        # true; soft IRQ handlers run during time.sleep_ms.
        end = time.ticks_add(time.ticks_ms(), ms)
        while not woken() and time.ticks_diff(end, time.ticks_ms()) > 0:
            time.sleep_ms(1)

    def irq_pin(self, stream_id):
        return self._irq_pins.get(stream_id)

    def service(self):
        pass  # timers and the radio run on interrupts here

    def console(self, text):
        print(text)

    def sensors(self, cfg):
        pins = dict(PINS)
        pins.update(cfg.get("pins", {}))
        out: list = []
        ecg = cfg.get("ecg")
        # Each driver imported only for a chip the board has: its code is RAM.
        if ecg and ecg["chip"] == "max30003":
            from drivers.max30003 import MAX30003

            cs = Pin(pins["ecg_cs"], Pin.OUT, value=1)
            spi = SPI(2, baudrate=pins["spi_hz"], polarity=0, phase=0, sck=Pin(pins["spi_sck"]),
                      mosi=Pin(pins["spi_mosi"]), miso=Pin(pins["spi_miso"]))
            ecg_chip = MAX30003(spi, cs)
            ecg_chip.configure(ecg["rate_hz"], ecg["gain"])
            if pins.get("ecg_intb") is not None:
                ecg_chip.enable_fifo_irq()
                self._irq_pins[fields.STREAM_ECG_MAX30003] = Pin(pins["ecg_intb"], Pin.IN, Pin.PULL_UP)
            out.append((fields.STREAM_ECG_MAX30003, ecg_chip, ecg_chip.lead_off))
        elif ecg and ecg["chip"] == "ad8232":
            from drivers.ad8232 import AD8232

            adc = ADC(Pin(pins["ad8232_out"]), atten=ADC.ATTN_11DB)
            front = AD8232(adc, Pin(pins["ad8232_lo_plus"], Pin.IN), Pin(pins["ad8232_lo_minus"], Pin.IN),
                           Timer(0), ecg["rate_hz"])
            out.append((fields.STREAM_ECG_AD8232, front, front.lead_off))
        ppg = cfg.get("ppg")
        if ppg:
            from drivers.max30102 import MAX30102

            i2c = I2C(0, scl=Pin(pins["i2c_scl"]), sda=Pin(pins["i2c_sda"]), freq=pins["i2c_hz"])
            oxi = MAX30102(i2c, time.sleep_ms)
            oxi.configure(ppg["rate_hz"], ppg["pulse_width_us"], ppg["adc_range_na"], ppg["led_red_ua"],
                          ppg["led_ir_ua"])
            if pins.get("ppg_int") is not None:
                oxi.enable_fifo_irq()
                self._irq_pins[fields.STREAM_PPG_MAX30102] = Pin(pins["ppg_int"], Pin.IN, Pin.PULL_UP)
            out.append((fields.STREAM_PPG_MAX30102, oxi, None))
        return out

    def link(self, cfg, max_message):
        if cfg["link"] == "ble":
            import bluetooth

            from app.link_ble import BleLink
            from app.main import FIRMWARE
            return BleLink(bluetooth, cfg["device_id"], max_message, FIRMWARE, "pulsebridge ESP32 " + sys.platform,
                           ticks_ms=time.ticks_ms)
        from app.link_serial import SerialLink
        return SerialLink(sys.stdin.buffer, sys.stdout.buffer, max_message, time.ticks_us, time.ticks_diff)

    def watchdog(self, timeout_ms):
        # The task watchdog: resets the chip if the loop stops feeding it.
        # Once started it cannot be stopped (MicroPython's esp32 WDT has no
        # deinit), hence watchdog_idle().
        from machine import WDT

        self._wdt = WDT(timeout=timeout_ms)
        self._wdt_ms = timeout_ms
        return self._wdt

    def unique_id(self):
        # The chip's own id (its base MAC): the hub checks it against the one recorded at provisioning.
        import machine

        return machine.unique_id()

    def watchdog_idle(self):
        # Streaming stopped on purpose (Ctrl-C, a stop command): a timer
        # feeds the watchdog from now on, so the REPL (a technician,
        # provisioning) is not reset. A stalled *loop* still is: this runs
        # only once the loop has returned.
        if self._wdt is None:
            return
        wdt = self._wdt
        Timer(1).init(period=self._wdt_ms // 2, callback=lambda _t: wdt.feed())

    def reset_cause_watchdog(self):
        import machine

        return machine.reset_cause() == machine.WDT_RESET

    def random_bytes(self, n):
        # The hardware RNG (esp_fill_random). Before the radio is on it is
        # pseudo-random, from a state ESP-IDF's bootloader seeded with SAR ADC
        # noise at this boot: different at every boot, which is what a boot
        # salt needs (it is public: unique, not secret).
        return os.urandom(n)

    def free_heap(self):
        return gc.mem_free()

    def battery_pct(self, cfg):
        # A LiPo cell on an ADC pin through a divider ("pins": {"battery_adc":
        # 33, "battery_divider": 2}); without one the board is on USB power.
        # A BLE board's app asks on every loop iteration: the ADC (slow on
        # the chip) is read once per _BATTERY_EVERY_MS, and nothing is
        # allocated in between (a default {} for "pins" was a new dict on
        # every call).
        now = time.ticks_ms()
        if self._battery_pct >= 0 and time.ticks_diff(now, self._battery_at_ms) < _BATTERY_EVERY_MS:
            return self._battery_pct
        self._battery_at_ms = now
        pins = cfg.get("pins")
        pin = pins.get("battery_adc") if pins else None
        if pin is None:
            pct = 100
        else:
            if self._battery_adc is None:
                self._battery_adc = ADC(Pin(pin), atten=ADC.ATTN_11DB)
            mv = self._battery_adc.read_uv() // 1000 * pins.get("battery_divider", 2)
            pct = max(0, min(100, (mv - 3300) // 9))  # 3.3 V empty .. 4.2 V full
        self._battery_pct = pct
        return pct
