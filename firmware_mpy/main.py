# Entry point at boot: stream until Ctrl-C (or a stop command), then the REPL.
# On an ESP32 the board is built from machine.*; on the MicroPython unix
# port (a simulated board) its hardware is the sim package's chip models.
import sys

# The outbox's ring first, while the heap is in one piece (app/outbox.py).
from app import outbox


def _reset(why):
    # A boot short of memory never sits at the REPL: it says why on the
    # console and resets the chip (an empty heap, boot.py again; the
    # simulator powers a simulated board up again).
    print("\r\npulsebridge: %s: resetting" % why)
    if sys.platform == "linux":
        from sim.reset import reset_process

        reset_process()
    import machine

    machine.reset()


def _boot():
    try:
        # (app.config is not held here: the app drops it once started)
        from app import config

        if outbox.preallocate(config.ring_bytes()):
            return
    except MemoryError:
        pass
    _reset("no memory for the outbox ring at boot")


_boot()
try:
    from app import main

    if sys.platform == "linux":
        from sim.board_sim import SimBoard, run_forever

        def _reboot():
            # After a watchdog reset: the heap as a reset chip's, as far as
            # one process can: the update's code out, the ring (kept) first.
            main.forget_update()
            _boot()

        run_forever(SimBoard.from_file("sim.json"), main.run, boot=_reboot)
    else:
        from board_esp32 import Esp32Board

        main.run(Esp32Board())  # a watchdog reset reboots the chip
except KeyboardInterrupt:
    print("\r\npulsebridge: streaming stopped (Ctrl-C)")
except MemoryError as e:  # the firmware's set-up (its loop restarts on one)
    _reset("no memory (%s)" % e)
