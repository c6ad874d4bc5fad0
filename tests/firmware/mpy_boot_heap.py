# Run by test_boot_heap.py in a simulated board's flash directory, under the
# heap a simulated board gets (sim/runner.py): the board's own boot (boot.py,
# then main.py, as sim/power_on.py runs them) on a virtual clock, with only
# this injected through the simulated hardware (the ROM, not the firmware):
#   argv[1] == "update_then_stall": at 3 s of board time the update's code is
#     loaded (as while a bundle is verified) and the I2C bus hangs for 8 s:
#     the watchdog resets the board, which must boot again and stream;
#   argv[1] == "fragmented": before boot the heap holds no 24 kB hole;
#   argv[1] == "shattered": nor any 4 kB one.
# It ends streaming (Ctrl-C) 6 s after the last boot and prints RESULT.
import gc
import json
import sys

import boot

boot.start()  # the firmware's slot on sys.path
from sim import board_sim  # noqa: E402  (the simulated hardware; it imports app.ticks)

mode = sys.argv[1]
_held = []
if mode in ("fragmented", "shattered"):
    # Blocks until the heap is full, then some freed: two in three of 8 kB
    # (holes of 16 kB, smaller than the ring: two thirds of the heap free),
    # or every other one of 3 kB (holes smaller than any ring the board
    # would take).
    size, kept = (8000, 3) if mode == "fragmented" else (3000, 2)
    if mode == "shattered":  # what main.py imports first, loaded while there is room to load code
        from app import config, outbox  # noqa: F401
    try:
        while True:
            _held.append(bytearray(size))
    except MemoryError:
        pass
    for i in range(len(_held)):
        if i % kept:
            _held[i] = None
    gc.collect()

_state = {"boots": 0, "stall_at_ms": 3000 if mode == "update_then_stall" else None, "stop_at_ms": None}
_service = board_sim.SimBoard.service


def _inject(board):
    now = board.uptime_ms()
    if _state["stall_at_ms"] is not None and now >= _state["stall_at_ms"]:
        _state["stall_at_ms"] = None
        from app import ota  # noqa: F401  (what verifying a bundle holds in RAM)
        from protocols import _sha512, bundle, cbor_items, decode, ed25519  # noqa: F401

        board.buses["i2c"].faults.stall(8000)
    if _state["stop_at_ms"] is None:
        _state["stop_at_ms"] = now + 6000
    elif now >= _state["stop_at_ms"] and _state["stall_at_ms"] is None:
        raise KeyboardInterrupt


def _service_injected(self):
    _inject(self)
    _service(self)


def _reboot_after_watchdog(self, _orig=board_sim.SimBoard.reboot_after_watchdog):
    _state["stop_at_ms"] = None  # 6 s from this boot
    _orig(self)


def _from_file(cls, path="sim.json"):
    with open(path) as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    b = cls(sim)
    _state["board"] = b
    return b


board_sim.SimBoard.service = _service_injected
board_sim.SimBoard.reboot_after_watchdog = _reboot_after_watchdog
board_sim.SimBoard.from_file = classmethod(_from_file)

exec(open("main.py").read())
b = _state["board"]
print("RESULT", json.dumps({"watchdog_resets": b.watchdog_resets, "mem_free": gc.mem_free()}))
