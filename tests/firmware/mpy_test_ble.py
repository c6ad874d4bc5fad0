# The BLE link under MicroPython against the fake `bluetooth` module (the
# radio is the one boundary this machine cannot reach). The central here
# reassembles notifications and acks through protocols.hub, as the hub does.
import json
import os

from app import config, link_ble, main
from protocols import cose, hub, hub_link, link, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock


class Central:
    def __init__(self, radio, device_id, key):
        self.radio = radio
        self.hub = hub.Hub()
        self.hub.add_device(device_id, key)
        self.device_id = device_id
        self.reasm = hub_link.Reassembler()
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
            if self.acking and r.verdict != hub.REJECTED and r.message.kind in (messages.T_SAMPLES, messages.T_ORIGIN):
                for a in self.hub.ack(self.device_id, r.message.epoch, [r.message.seq]):
                    self.radio.write(hub_link.downlink_line(a))

    def connect(self, mtu):
        self.reasm.reset()
        self.radio.connect(mtu)

    def frames(self):
        return [r.message for r in self.results if r.verdict == hub.ACCEPTED
                and r.message.kind == messages.T_SAMPLES]


def _setup(ble_cfg=None, keep_bonds=False):
    if not keep_bonds:  # each test starts with a board no phone ever paired with
        for p in (link_ble.BONDS, link_ble.BONDS + ".new"):
            try:
                os.remove(p)
            except OSError:
                pass
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


def test_a_busy_link_rarely_meets_enomem_and_loses_nothing():
    # Two stack buffers and two packets per 15 ms interval: about 3 kB/s at
    # MTU 23, just above what the sensors produce. The link's window learns
    # the two: each ENOMEM (an exception object in the board's heap) is a
    # probe past them, and the probes grow rarer. Before, the link tried 8
    # fragments at each loop and met ENOMEM at every burst (549 in
    # these 20 s).
    board, app, central = _setup({"buffers": 2, "interval_ms": 15, "packets_per_interval": 2})
    app.start()
    central.connect(23)
    _run(board, app, 20000)
    assert 0 < app.link.enomem <= 10 and board.radio.enomem == app.link.enomem, app.link.enomem
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


def test_a_frame_sent_from_the_ring_stops_when_the_outbox_reuses_its_bytes():
    # Frames longer than an MTU are fragmented where the outbox ring keeps
    # them (no 1.7 kB copy). When the ring reuses bytes of the one in flight
    # (full, it dropped it; or an ack freed it), the link stops sending it:
    # the hub drops the part it got, never a message half old, half new.
    board, app, central = _setup()
    app.start()
    central.connect(23)  # 20-byte fragments: a frame takes several loops
    ring = app.outbox.buf
    for _ in range(2000):
        app.step()
        board.sleep_ms(2)
        frag = app.link._frag
        if frag.busy and frag._msg is ring and frag._off > 0:
            break
    else:
        raise AssertionError("no frame fragmented from the ring")
    assert frag._len > link.MAX_MTU  # a long frame, read in place
    start = app.outbox.reserve(len(ring))  # the ring reuses all its bytes (dropping what it held)
    for i in range(start, len(ring)):
        ring[i] = 0xA5
    assert not app.link.busy() and app.link.released == 1
    _run(board, app, board.ticks_ms() + 4000)
    assert central.discards, central.discards  # the part sent was dropped by the hub's reassembler
    assert not [r for r in central.results if r.verdict == hub.REJECTED]
    assert central.frames()  # and the link went on with the next frames


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
    board.radio.write(hub_link.downlink_line(forged.seal(messages.encoded(messages.Ack(app.epoch, [(0, 9999)])))))
    app.step()
    assert app.downlink_rejected == 1
    assert app.outbox.depth() >= depth  # nothing freed


def _handle(radio, uuid):
    for _svc, chars in radio.services:
        for cuuid, _flags, h in chars:
            if cuuid == uuid:
                return h
    raise AssertionError("no characteristic %r" % (uuid,))


def _sfloat(raw):
    m = raw & 0x0FFF
    e = raw >> 12
    if e >= 8:
        e -= 16
    return m * 10 ** e


def test_standard_services_are_registered_and_filled():
    board, app, central = _setup()
    app.start()
    r = board.radio
    uuids = [svc for svc, _ in r.services]
    assert uuids[1:] == [0x180A, 0x180F, 0x1822, 0x180D], uuids
    assert r.read(_handle(r, 0x2A29)) == b"pulsebridge"
    assert r.read(_handle(r, 0x2A25)) == b"pb-test01"
    assert r.read(_handle(r, 0x2A26)) == main.FIRMWARE.encode()
    assert r.read(_handle(r, 0x2A38)) == b"\x01"  # chest
    adv, _ = r.advertising
    assert b"\x05\x03\x22\x18\x0d\x18" in adv  # 16-bit PLX and HRS UUIDs
    central.connect(247)
    _run(board, app, 2000)
    assert 0 < r.read(_handle(r, 0x2A19))[0] <= 100  # battery level
    # The measurements have no read property: only notifications carry them.
    for uuid in (0x2A37, 0x2A5F):
        flags = [f for _s, chars in r.services for c, f, _h in chars if c == uuid][0]
        assert not flags & 0x02, uuid


def test_vitals_are_notified_only_on_an_encrypted_link():
    board, app, central = _setup()
    app.start()
    r = board.radio
    h_hr, h_plx = _handle(r, 0x2A37), _handle(r, 0x2A5F)
    central.connect(247)  # the hub: no pairing, samples encrypted by the protocol
    _run(board, app, 12000)
    assert app.link.hr_x10 > 0 and app.link.spo2_x10 > 0  # estimated all the same
    assert not [h for h, _ in r.other if h in (h_hr, h_plx)]
    r.disconnect()
    _run(board, app, 12500)
    central.reasm.reset()
    r.pair(247)  # an app that pairs (LE Secure Connections)
    _run(board, app, 24000)
    hrs = [d[1] for h, d in r.other if h == h_hr]
    plx = [d for h, d in r.other if h == h_plx]
    assert len(hrs) >= 8 and len(plx) >= 8, (len(hrs), len(plx))
    # Record a103l's patient: about 127 beats a minute (XQRS on lead II, every
    # 30 s of the record); the simulated finger reads 97 %.
    hrs.sort()
    assert 115 <= hrs[len(hrs) // 2] <= 140 and 100 <= hrs[0] and hrs[-1] <= 155, hrs
    spo2 = _sfloat(plx[-1][1] | plx[-1][2] << 8)
    pr = _sfloat(plx[-1][3] | plx[-1][4] << 8)
    print("board vitals: HR", hrs[-3:], "SpO2 %.1f PR %.1f" % (spo2, pr))
    assert 94 <= spo2 <= 100, spo2
    assert 110 <= pr <= 145, pr  # record a103l's patient: 127 a minute (FFT of the record)


def _vitals_notified(radio):
    h_hr, h_plx = _handle(radio, 0x2A37), _handle(radio, 0x2A5F)
    return len([h for h, _ in radio.other if h in (h_hr, h_plx)])


def test_a_bonded_phone_reads_the_board_again_after_a_restart():
    board, app, central = _setup()
    app.start()
    board.radio.pair(247)
    _run(board, app, 6000)
    assert app.link.encrypted and _vitals_notified(board.radio) >= 2
    phone_ltk = board.radio.phone_ltk
    assert len(app.link.bonds.entries) == 2 and os.stat(link_ble.BONDS)[6] > 0  # saved by the loop
    # Power cut: a new board process, the same flash; the phone keeps its key.
    board, app, central = _setup(keep_bonds=True)
    app.start()
    assert app.link.bonds.error == "" and len(app.link.bonds.entries) == 2
    board.radio.phone_ltk = phone_ltk
    board.radio.connect(247, encrypted=True)
    _run(board, app, 6000)
    assert app.link.encrypted and _vitals_notified(board.radio) >= 2
    # A phone holding another key (or none the board knows) gets no
    # encryption, so no measurement.
    board.radio.disconnect()
    _run(board, app, 6500)  # advertising again
    board.radio.phone_ltk = bytes(16)
    board.radio.connect(247, encrypted=True)
    board.radio.other = []
    _run(board, app, 12000)
    assert not app.link.encrypted and _vitals_notified(board.radio) == 0


def test_a_corrupt_bonds_file_costs_the_pairing_not_the_stream():
    board, app, central = _setup()
    app.start()
    board.radio.pair(247)
    _run(board, app, 2000)
    phone_ltk = board.radio.phone_ltk
    with open(link_ble.BONDS, "r+b") as f:
        f.seek(7)
        f.write(b"\xff")
    board, app, central = _setup(keep_bonds=True)
    app.start()
    assert "CRC" in app.link.bonds.error and app.link.bonds.entries == []
    board.radio.phone_ltk = phone_ltk
    central.connect(247)  # the hub streams as ever
    _run(board, app, 5000)
    assert len(central.frames()) >= 6
    board.radio.disconnect()
    _run(board, app, 5500)  # advertising again
    board.radio.connect(247, encrypted=True)  # the phone must pair again
    _run(board, app, 8000)
    assert not app.link.encrypted
