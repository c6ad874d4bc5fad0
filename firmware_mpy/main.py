# Entry point at boot: stream until Ctrl-C (or a stop command), then the REPL.
# On an ESP32 the board is built from machine.*; on the MicroPython unix
# port (a simulated board) its hardware is the sim package's chip models.
import sys

# The outbox's ring first, while the heap is in one piece (app/outbox.py).
from app import outbox


def _ring_bytes():
    # (app.config is not held here: the app drops it once started)
    from app import config

    return config.ring_bytes()


outbox.preallocate(_ring_bytes())
from app import main  # noqa: E402

try:
    if sys.platform == "linux":
        from sim.board_sim import SimBoard, run_forever

        # A watchdog reset boots it again (its heap as a reset chip's: the ring first).
        run_forever(SimBoard.from_file("sim.json"), main.run, boot=lambda: outbox.preallocate(_ring_bytes()))
    else:
        from board_esp32 import Esp32Board

        main.run(Esp32Board())  # a watchdog reset reboots the chip
except KeyboardInterrupt:
    print("\r\npulsebridge: streaming stopped (Ctrl-C)")
