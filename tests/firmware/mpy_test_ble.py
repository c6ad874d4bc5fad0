# The BLE link under MicroPython against the fake `bluetooth` module (the
# radio is the one boundary this machine cannot reach). The central here
# reassembles notifications and acks through protocols.hub, as the hub does.
import json

from app import config, main
from protocols import cose, hub, link, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock


class Central:
    def __init__(self, radio, device_id, key):
        self.radio = radio
        self.hub = hub.Hub()
        self.hub.add_device(device_id, key)
        self.device_id = device_id
        self.reasm = link.Reassembler()
        self.results = []
        self.discards = []
        self.acking = True
        radio.on_notify = self.on_notify

    def on_notify(self, fragment):
        assert len(fragment) <= self.radio.mtu - 3
        self.reasm.feed(fragment)
        while True:
            ev = self.reasm.next_event()
            if ev is None:
                return
            if not isinstance(ev, link.Frame):
                self.discards.append(ev.reason)
                continue
            r = self.hub.receive(ev.data)
            self.results.append(r)
            if self.acking and r.verdict != hub.REJECTED and r.message.kind == messages.T_SAMPLES:
                for a in self.hub.ack(self.device_id, r.message.epoch, [r.message.seq]):
                    self.radio.write(link.downlink_line(a))

    def connect(self, mtu):
        self.reasm.reset()
        self.radio.connect(mtu)

    def frames(self):
        return [r.message for r in self.results if r.verdict == hub.ACCEPTED
                and r.message.kind == messages.T_SAMPLES]


def _setup(ble_cfg=None):
    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    sim["ble"] = ble_cfg or {}
    board = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg["link"] = "ble"
    key = config.load_key()
    app = main.App(board, cfg, key, config.next_epoch())
    central = Central(board.radio, cfg["device_id"], key)
    return board, app, central


def _run(board, app, until_ms):
    while board.ticks_ms() < until_ms:
        app.step()
        board.sleep_ms(app.cfg["poll_ms"])


def _complete(frames, rate, seconds):
    nxt = {}
    total = {}
    for f in sorted(frames, key=lambda f: (f.stream, f.first_index)):
        assert nxt.get(f.stream, 0) == f.first_index, (f.stream, f.first_index, nxt)
        nxt[f.stream] = f.first_index + f.count
        total[f.stream] = total.get(f.stream, 0) + f.count
    return total


def test_advertises_service_and_name_within_31_bytes():
    board, app, central = _setup()
    app.start()
    adv, resp = board.radio.advertising
    assert len(adv) <= 31 and len(resp) <= 31
    assert b"pb-test01" in resp
    assert bytes(reversed(bytes.fromhex("7b3e00016c1a4f5e9d352f0e5a1c9b10"))) in adv


def test_streams_whole_frames_at_minimum_and_large_mtu():
    for mtu in (23, 247):
        board, app, central = _setup()
        app.start()
        central.connect(mtu)
        _run(board, app, 10000)
        frames = central.frames()
        total = _complete(frames, 512, 10)
        assert total[messages.STREAM_ECG_MAX30003] >= 512 * 8, (mtu, total)
        assert not central.discards and not [r for r in central.results if r.verdict == hub.REJECTED]
        assert app.outbox.depth() <= 3, (mtu, app.outbox.depth())


def test_enomem_backs_off_and_loses_nothing():
    # Two stack buffers and one packet per 15 ms interval: about 3 kB/s at
    # MTU 23, just above what the sensors produce, so ENOMEM is frequent.
    board, app, central = _setup({"buffers": 2, "interval_ms": 15, "packets_per_interval": 2})
    app.start()
    central.connect(23)
    _run(board, app, 20000)
    assert board.radio.enomem > 50 and app.link.enomem > 50
    total = _complete(central.frames(), 512, 20)
    assert total[messages.STREAM_ECG_MAX30003] >= 512 * 15, total
    assert not central.discards


def test_disconnect_mid_frame_then_reconnect_resends_unacked():
    board, app, central = _setup()
    app.start()
    central.connect(23)
    _run(board, app, 3000)
    central.acking = False
    _run(board, app, 4200)  # frames sent but never acked
    board.radio.disconnect()  # mid-fragment, likely
    _run(board, app, 8000)  # no central: frames pile up in the outbox
    assert not app.link.connected and app.outbox.depth() >= 8
    central.acking = True
    central.connect(185)
    _run(board, app, 16000)
    frames = central.frames()
    total = _complete(frames, 512, 16)  # complete: what was unacked came again
    assert total[messages.STREAM_ECG_MAX30003] >= 512 * 14, total
    assert app.link.reconnects == 2
    assert "gap" not in central.discards or central.discards.count("gap") <= 1


def test_forged_control_write_is_ignored():
    board, app, central = _setup()
    app.start()
    central.connect(64)
    central.acking = False
    _run(board, app, 3000)
    depth = app.outbox.depth()
    assert depth >= 4
    board.radio.write(b"~" + b"A" * 40 + b"\n")  # garbage line
    board.radio.write(b"hello\n")
    forged = cose.MacKey(bytes(32), b"pb-test01", cose.AAD_DOWNLINK)
    board.radio.write(link.downlink_line(forged.seal(messages.encoded(messages.Ack(app.epoch, [(0, 9999)])))))
    app.step()
    assert app.downlink_rejected == 1
    assert app.outbox.depth() >= depth  # nothing freed
