# ESP32 entry point: stream until Ctrl-C (or a stop command), then the REPL.
from board_esp32 import Esp32Board

from app import main

try:
    main.run(Esp32Board())
except KeyboardInterrupt:
    print("\r\npulsebridge: streaming stopped (Ctrl-C)")
