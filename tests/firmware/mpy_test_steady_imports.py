# A streaming board keeps the message classes, the generic encoder and the
# decoder (protocols/messages.py, about 14 kB of heap as .mpy code) out of
# its RAM: it writes what it sends with protocols/fields.py alone. Here
# (alone in its interpreter, as the board) the app is built and streams for
# a few seconds over BLE, a status and an error report included.
import json
import sys

from app import config, faults, main
from sim.board_sim import SimBoard
from sim.clock import VirtualClock


def test_a_streaming_board_never_loads_the_message_classes():
    assert "protocols.messages" not in sys.modules, "loaded by an import of the firmware's"
    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    sim["ble"] = {}
    board = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg["link"] = "ble"
    cfg["status_every_ms"] = 1000
    sent = []
    app = main.App(board, cfg, config.load_key(), config.next_epoch(), True)
    board.radio.on_notify = lambda data: sent.append(len(data))
    app.start()
    board.radio.connect(247)
    app.reports.add(faults.ERR_SENSOR_FAULT, "an error report, as a fault gives")
    while board.uptime_ms() < 4000:
        app.step()
        app.wait()
    assert app.frames_built >= 6 and app.reports.sent == 1 and sent, (app.frames_built, app.reports.sent, len(sent))
    assert "protocols.messages" not in sys.modules
