# Entry point at boot: stream until Ctrl-C (or a stop command), then the REPL.
# On an ESP32 the board is built from machine.*; on the MicroPython unix
# port (a simulated board) its hardware is the sim package's chip models.
import sys

from app import main

if sys.platform == "linux":
    from sim.board_sim import SimBoard

    board = SimBoard.from_file("sim.json")
else:
    from board_esp32 import Esp32Board

    board = Esp32Board()
try:
    main.run(board)
except KeyboardInterrupt:
    print("\r\npulsebridge: streaming stopped (Ctrl-C)")
