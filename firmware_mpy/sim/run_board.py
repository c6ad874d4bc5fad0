# Entry point of a simulated board under the MicroPython unix port: the same
# app as main.py on an ESP32, on the simulated board. `pulsebridge sim` runs
# it as `micropython -i sim/run_board.py` in the board's directory (its flash), so
# Ctrl-C or a stop command leaves a live REPL, as on a real board.
# The outbox's ring first, while the heap is in one piece (app/outbox.py).
from app import config, outbox

outbox.preallocate(config.ring_bytes())
from app import main  # noqa: E402
from sim.board_sim import SimBoard, run_forever  # noqa: E402

try:
    # A watchdog reset boots the firmware again, as it does the chip.
    run_forever(SimBoard.from_file("sim.json"), main.run, boot=lambda: outbox.preallocate(config.ring_bytes()))
except KeyboardInterrupt:
    print("\r\npulsebridge: streaming stopped (Ctrl-C)")
