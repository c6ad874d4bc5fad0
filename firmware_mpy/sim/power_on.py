# A simulated board's power-up, as an ESP32 runs its flash: boot.py (which
# chooses the firmware slot, app/ota.py), then main.py, from the board's
# flash directory (the working directory). `pulsebridge sim` runs it as
# `micropython -i sim/power_on.py`; this module belongs to the simulated
# hardware (the ROM), not to the firmware an update replaces.
import sys

import boot

_slot, _trial = boot.start()
try:
    exec(open("main.py").read())
except Exception as e:  # main.py lets nothing else out when its firmware works
    if not _trial:
        raise
    sys.print_exception(e)
    # On the chip, boot.py's watchdog, never fed, resets it; boot.py then runs the confirmed slot.
    print("pulsebridge: the version on trial in slot %s failed at start: watchdog reset" % _slot)
    from sim.reset import reset_process

    reset_process()
