# The simulated chip's reset line, apart from the firmware (it imports none
# of it, so even a version that fails at import can be reset).


def reset_process():
    # This interpreter ends at once, by SIGUSR1 (the unix port has no exit
    # that skips `-i`'s REPL), and the simulator (agent/dev/sim/runner.py)
    # powers the board up again from its flash: boot.py chooses the slot.
    import os
    import time

    os.system("kill -USR1 $PPID")  # sh's parent: this interpreter
    while True:  # until the signal ends it
        time.sleep_ms(100)
