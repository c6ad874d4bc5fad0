# Origin proof on the board (app/origin.py): nothing allocated per frame or
# per checkpoint, and what the app streams is proven by the backend's
# verifier (protocols/origin_verify.py, run here under MicroPython too).
import gc

import micropython

from app import config, main, origin
from protocols import cbor, cose, hub, messages, origin_verify
from sim.board_sim import SimBoard
from sim.clock import VirtualClock
from sim.loopback import LoopbackLink


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _board():
    import json

    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    b = SimBoard(sim, VirtualClock())
    with open(config.CONFIG) as f:
        cfg = json.load(f)
    link = LoopbackLink(cfg["device_id"], _read(config.KEY))
    b.link_override = link
    return b, link, cfg["device_id"]


def test_frame_digest_and_checkpoint_allocate_nothing():
    okey = bytes(range(32))
    up = cose.MacKey(bytes(32), b"pb-test01", cose.AAD_UPLINK)
    log = origin.OriginLog(okey, b"pb-test01", bytes(32), bytes(16), 10000, 0, up)
    payload = bytearray(b"\xa5" * 700)
    out = bytearray(origin.WORST_BYTES)
    w = cbor.Writer(out)
    gc.collect()
    micropython.heap_lock()
    try:
        for seq in range(24):
            payload[3] = seq
            log.add(seq, payload, 0, len(payload))
        assert log.due(0)
        log.checkpoint_into(w, 7, 24, 0)
    finally:
        micropython.heap_unlock()
    assert log.n == 0 and log.index == 1
    m = messages.decode_payload(cose.parse(bytes(out[:w.pos])).payload, messages.UPLINK_TYPES)
    assert isinstance(m, messages.OriginCheckpoint) and (m.epoch, m.seq) == (7, 24)
    c = origin_verify.open_checkpoint(m.checkpoint, okey)
    assert c.epoch == 7 and c.index == 0 and sorted(c.entries) == list(range(24))
    payload[3] = 5
    assert c.entries[5] == origin_verify.frame_digest(payload)


def test_app_checkpoints_prove_every_frame():
    board, link, dev = _board()
    app = main.run(board, until_ms=25000)
    assert app.origin is not None
    accepted = [r for r in link.received if r.verdict == hub.ACCEPTED]
    assert len(accepted) == len(link.received)
    ckpts = [r for r in accepted if r.message.kind == messages.T_ORIGIN]
    assert len(ckpts) >= 2, len(ckpts)  # one every 10 s of the board's clock
    assert app.outbox.depth() <= 3  # the checkpoints were acknowledged like frames
    v = origin_verify.Verifier({dev: _read(origin.PATH)})
    for r in accepted:
        v.add(r.raw)
    rep = v.report()
    assert rep.ok, rep.as_dict()
    frames = [r for r in accepted if r.message.kind == messages.T_SAMPLES]
    assert rep.count(origin_verify.PROVEN) + rep.count(origin_verify.PENDING) == len(frames)
    # A clean stop (until_ms here, as Ctrl-C or a stop command) sent a last
    # checkpoint: no frame waits for one (before, up to 10 s of them did).
    assert rep.count(origin_verify.PENDING) == 0 and rep.count(origin_verify.PROVEN) == len(frames)
    last = ckpts[-1].message.seq
    assert last > max(r.message.seq for r in frames)
    # A board that loses power sends no last checkpoint: its last frames wait
    # for one ("pending"), never read as forged or missing.
    v = origin_verify.Verifier({dev: _read(origin.PATH)})
    for r in accepted:
        if r.message.seq != last:
            v.add(r.raw)
    rep = v.report()
    assert rep.ok and rep.count(origin_verify.PENDING) > 0, rep.as_dict()
    prev = ckpts[-2].message.seq
    for f in rep.frames:  # only the frames made after the previous checkpoint wait
        assert f.verdict == (origin_verify.PROVEN if f.seq < prev else origin_verify.PENDING), (f.as_dict(), prev)
