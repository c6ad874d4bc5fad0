# Faults a real board lives through, injected in the simulation (chip
# models, fake buses, fake radio, flash): the board recovers by itself,
# nothing acknowledged is lost, and the fault is reported. Runs under the
# MicroPython unix port (see test_firmware_on_micropython.py).
import os

from app import config, main
from protocols import cbor, cose, hub, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock
from sim.loopback import LoopbackLink
from tests.firmware.mpy_test_app import _key, _run_until, _sim


def _boot(cfg_changes=None, sim_changes=None):
    # One boot of the board, as main.run() does it: a new epoch from flash.
    sim = _sim()
    sim["virtual_clock"] = True
    sim.update(sim_changes or {})
    b = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg.update(cfg_changes or {})
    link = LoopbackLink(cfg["device_id"], _key())
    b.link_override = link
    app = main.App(b, cfg, _key(), config.next_epoch())
    return b, app, link


def _sealed_samples(raw):
    # (epoch, seq, boot salt, encrypted sample bytes) of a sealed sample frame, read without the key.
    d = cbor.decode(cose.parse(raw).payload)
    return d[2], d[3], d[15], b"".join(d[13])


def test_epoch_file_lost_never_brings_a_keystream_back():
    # Boot, lose the epoch file (flash restored, file corrupted then
    # cleared), boot again: the same epoch comes back, with the same seqs,
    # but every counter block is under another key.
    runs = []
    for _ in range(2):
        try:
            os.remove(config.EPOCH)
        except OSError:
            pass
        b, app, link = _boot({"ppg": None})
        _run_until(b, app, 3000)
        frames = {}
        for r in link.received:
            if r.verdict == hub.ACCEPTED and r.message.kind == messages.T_SAMPLES:
                epoch, seq, salt, sealed = _sealed_samples(r.raw)
                frames[(epoch, seq)] = (salt, sealed, r.message.channels)
        runs.append(frames)
    same = set(runs[0]) & set(runs[1])
    assert len(same) >= 2, (sorted(runs[0]), sorted(runs[1]))  # the same (epoch, seq) came back
    for k in same:
        salt0, sealed0, clear0 = runs[0][k]
        salt1, sealed1, clear1 = runs[1][k]
        assert salt0 != salt1 and len(salt0) == 16
        # Other ciphertext for the same (epoch, seq): XOR of the two would
        # otherwise give away the XOR of two recordings.
        n = min(len(sealed0), len(sealed1))
        assert sealed0[:n] != sealed1[:n]
        # Each hub decrypted its frames under that boot's key: the same
        # recording from the same start, so the same samples.
        assert clear0 == clear1 and clear0[0]
