# Code a streaming board does not use stays out of its RAM (issue 11: the
# BLE board's heap is nearly full, and every kB of code loaded as .mpy is a
# kB less to collect garbage in). A BLE board streams, is acknowledged and
# answers the hub's time requests with its configuration's code dropped
# once started and without loading the message decoder
# (protocols/decode.py, protocols/cbor_items.py, cose.parse's
# protocols/mac0.py), the epoch resync (app/resync.py) or the firmware
# update (app/ota.py, protocols/bundle.py, ed25519); a rarer message loads
# the decoder and drops it once handled; an update loads its code and drops
# it when it is over. The app's construction (app/setup.py) and the GATT
# table (app/ble_gatt.py) are dropped once made; CPython's keystream code
# (protocols/_ctr_cpython.py) and the backend's origin verifier are never
# loaded. The hub's side here only encodes and seals (it never
# decodes: that would load the decoder in this interpreter), and what the
# board sent is decoded only at the end.
import json
import sys

from app import config, main
from protocols import hub, hub_link, link, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock

_RARE = ("protocols.decode", "protocols.cbor_items", "protocols.mac0", "app.resync", "app.ota", "protocols.bundle",
         "protocols.ed25519", "protocols._sha512",
         # The app's construction and the GATT table, dropped once made; the
         # hub's and the backend's side of the cipher and the origin proof.
         "app.setup", "app.ble_gatt", "protocols._ctr_cpython", "protocols.origin_verify")


def _loaded():
    return [m for m in _RARE if m in sys.modules]


class _Central:
    # Keeps what the board notified; answers with acks for every seq the
    # board has used (the app's own count: no decoding).
    def __init__(self, board, app, device_id, key):
        self.board = board
        self.app = app
        self.radio = board.radio
        self.hub = hub.Hub()
        self.hub.add_device(device_id, key)
        self.device_id = device_id
        self.fragments = []
        self.radio.on_notify = self.notified
        self.acked = 0

    def notified(self, data):
        self.fragments.append(bytes(data))  # (data is the radio's buffer, valid during the call)

    def write(self, msg):
        self.radio.write(hub_link.downlink_line(msg))

    def run(self, until_ms):
        app = self.app
        while self.board.uptime_ms() < until_ms:
            app.step()
            if app.seq > self.acked:
                for a in self.hub.ack(self.device_id, app.epoch, list(range(self.acked, app.seq))):
                    self.write(a)
                self.acked = app.seq
            app.wait()

    def messages(self):
        # What the board sent, decoded now (loads the decoder here).
        reasm = hub_link.Reassembler()
        out = []
        for f in self.fragments:
            reasm.feed(f)
            while True:
                ev = reasm.next_event()
                if ev is None:
                    break
                assert isinstance(ev, link.Frame), ev
                r = self.hub.receive(ev.data)
                if r.verdict == hub.ACCEPTED:
                    out.append(r.message)
        return out


def test_a_streaming_board_loads_no_rare_code_and_drops_what_a_rare_message_loaded():
    assert not _loaded(), _loaded()  # (this module runs alone in its interpreter)
    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    sim["ble"] = {}
    board = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg["link"] = "ble"
    key = config.load_key()
    app = main.App(board, cfg, key, config.next_epoch(), True)  # as main.run(): the configuration is read at boot only
    assert "app.config" not in sys.modules
    central = _Central(board, app, cfg["device_id"], key)
    app.start()
    board.radio.connect(247)
    central.run(3000)
    nonce, request = central.hub.time_request(cfg["device_id"], 1764547200000)
    central.write(request)
    central.run(6000)
    assert app.frames_built >= 8 and app.outbox.depth() <= 4, (app.frames_built, app.outbox.depth())
    assert not _loaded(), _loaded()
    # A rarer message (a command): the decoder is loaded for it, then dropped.
    seq = app.seq
    central.write(central.hub.command(cfg["device_id"], app.epoch, 1, "status"))
    central.run(7000)
    assert app.seq > seq and app.last_command == 1 and app.downlink_rejected == 0
    assert not _loaded(), _loaded()
    # An update that is refused (not a bundle): its code is loaded, then dropped.
    bogus = bytes(64)
    central.write(central.hub.update_chunk(cfg["device_id"], app.epoch, 0, bogus))
    central.run(7100)
    central.run(9000)
    assert app.update is None and not _loaded(), (app.update, _loaded())
    got = central.messages()
    answers = [m for m in got if isinstance(m, messages.TimeResponse)]
    assert [m.nonce for m in answers] == [nonce], answers
    states = [m.state for m in got if isinstance(m, messages.UpdateState)]
    assert states and states[-1].startswith("refused:"), states
    assert [m for m in got if isinstance(m, messages.Status)], "no status after the command"
