# The real board's glue (board_esp32.py) under the unix port: its
# `machine` is a fake here (named so: the chip's ADC and pins are what this
# machine cannot reach), put in sys.modules before the board's module is
# imported. What the app calls on every loop iteration must allocate
# nothing on the chip either: the simulated board (sim/board_sim.py)
# stands in for this code in every other test, so this one holds the real
# code to it.
import sys

import micropython


class _FakeAdc:
    ATTN_11DB = 3
    reads = 0
    uv = 3950000 // 2  # a 3.95 V cell behind a 2:1 divider

    def __init__(self, pin, atten=None):
        self.pin = pin

    def read_uv(self):
        _FakeAdc.reads += 1
        return _FakeAdc.uv


class _FakePin:
    IN = 1
    OUT = 3
    PULL_UP = 2

    def __init__(self, *args, **kw):
        self.args = args


class _FakeMachine:
    ADC = _FakeAdc
    Pin = _FakePin
    I2C = None
    SPI = None
    Timer = None


def _board():
    real = sys.modules.get("machine")
    sys.modules["machine"] = _FakeMachine
    try:
        import board_esp32
    finally:
        if real is None:
            del sys.modules["machine"]
        else:
            sys.modules["machine"] = real
    return board_esp32.Esp32Board()


def test_the_battery_is_read_with_nothing_allocated_and_not_on_every_loop():
    # The app asks for the battery's level on every loop iteration of a BLE
    # board (the Battery service): on USB power (no battery pin) and with a
    # cell on an ADC pin, under micropython.heap_lock() (cfg.get("pins", {})
    # made a dict on every call: ~30 a second of garbage on a real board,
    # which the simulated board's constant hid), and the ADC, slow on the
    # chip, is read at most once per period, not per call.
    on_usb = _board()
    on_cell = _board()
    usb = {"link": "ble"}
    cell = {"link": "ble", "pins": {"battery_adc": 33, "battery_divider": 2}}
    assert on_usb.battery_pct(usb) == 100
    assert on_cell.battery_pct(cell) == (3950 - 3300) // 9  # (the ADC made at the first call)
    reads = _FakeAdc.reads
    levels = []
    allocated = False
    micropython.heap_lock()
    try:
        for _ in range(200):
            a = on_usb.battery_pct(usb)
            b = on_cell.battery_pct(cell)
            if a != 100 or b != 72:
                levels.append(a)  # (raises MemoryError under the lock: reported below)
    except MemoryError:
        allocated = True
    finally:
        micropython.heap_unlock()
    assert not allocated, "battery_pct allocated"
    assert not levels, levels
    assert _FakeAdc.reads - reads <= 1, _FakeAdc.reads - reads
