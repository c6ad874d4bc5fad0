# A board whose epoch file was lost or rolled back between two boots, with
# one hub across the boots (protocols.hub, as the agent runs it): the hub
# refuses the stale epoch and sends an epoch resync; the board moves its
# epoch past the hub's newest, durably, resends what was never acknowledged
# as new frames, and reports it. Runs under the MicroPython unix port (see
# test_firmware_on_micropython.py).
import os

from app import config, faults, main
from protocols import cose, hub, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock
from sim.loopback import LoopbackLink
from tests.firmware.mpy_test_app import _key, _sim
from tests.firmware.mpy_test_faults import _check_stream

_RATE_HZ = 512


def _boot(the_hub):
    sim = _sim()
    sim["virtual_clock"] = True
    b = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg["ppg"] = None
    link = LoopbackLink(cfg["device_id"], _key(), the_hub)
    b.link_override = link
    app = main.App(b, cfg, _key(), config.next_epoch())
    return b, app, link


def _run(b, app, until_ms, started=False):
    if not started:
        app.start()
    while b.ticks_ms() < until_ms:
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])


def _new_hub():
    h = hub.Hub()
    h.add_device(config.load()["device_id"], _key())
    return h


def _epoch_on_flash():
    with open(config.EPOCH) as f:
        return int(f.read())


def _clear_epoch():
    try:
        os.remove(config.EPOCH)
    except OSError:
        pass


def _boot_offline_then_connect(the_hub, offline_ms, until_ms):
    # The board boots with its link down (frames pile up in the outbox),
    # then the link comes up.
    b, app, link = _boot(the_hub)
    link.connected = False
    _run(b, app, offline_ms)
    waiting = app.outbox.depth()
    assert waiting >= 2, waiting
    link.connected = True
    _run(b, app, until_ms, started=True)
    return b, app, link, waiting


def _resynced(the_hub, b, app, link, stale_epoch, newest, waiting, until_s, reason):
    refused = [r for r in link.received if r.verdict == hub.REJECTED]
    assert refused and all(r.reason == reason for r in refused), [r.reason for r in refused]
    assert all(r.message.epoch == stale_epoch for r in refused)
    assert the_hub.rejects[reason] == len(refused)
    # Moved past the hub's newest epoch, once, durably.
    assert app.epoch == newest + 1, (app.epoch, newest)
    assert _epoch_on_flash() == newest + 1
    accepted = [r.message for r in link.received if r.verdict == hub.ACCEPTED]
    assert all(m.epoch == newest + 1 for m in accepted)
    # Nothing lost: the frames built before the resync (never acknowledged)
    # came again as new frames, and the stream is whole from its start.
    frames = [m for m in accepted if m.kind == messages.T_SAMPLES]
    assert frames[0].first_index == 0
    assert _check_stream(frames, _RATE_HZ, until_s) == 0
    assert len(frames) == len({f.first_index for f in frames})  # each once
    assert app.outbox.dropped == 0 and app.outbox.depth() <= 2
    # Reported: error report code 6, and said hello again under the new epoch.
    reports = [m for m in accepted if m.kind == messages.T_ERROR and m.code == faults.ERR_EPOCH_RESYNC]
    assert len(reports) == 1, reports
    text = reports[0].text
    assert ("epoch %d refused" % stale_epoch) in text and ("resending %d frames" % waiting) in text, text
    assert any(m.kind == messages.T_HELLO for m in accepted)


def test_epoch_file_deleted_between_two_boots_frames_flow_again():
    _clear_epoch()
    the_hub = _new_hub()
    for _ in range(2):  # epochs 1 and 2, acknowledged
        b, app, link = _boot(the_hub)
        _run(b, app, 2500)
        assert app.outbox.depth() <= 2 and not the_hub.rejects
    assert the_hub.window(app.cfg["device_id"]).epoch == 2
    _clear_epoch()  # lost: the next boot is epoch 1 again
    b, app, link, waiting = _boot_offline_then_connect(the_hub, 3500, 7000)
    _resynced(the_hub, b, app, link, 1, 2, waiting, 6, "replay:old_epoch")


def test_epoch_file_rolled_back_by_one_boot_is_no_duplicate():
    # The hub has seen epoch 2; the board boots at epoch 2 again (its file
    # restored to what it held before), with seqs the hub has seen: before
    # boot salts, these were acknowledged as duplicates and never stored.
    _clear_epoch()
    the_hub = _new_hub()
    _run(*_boot(the_hub)[:2], 2500)
    b, app, link = _boot(the_hub)
    _run(b, app, 2500)
    assert app.epoch == 2
    config.save_epoch(1)
    b, app, link, waiting = _boot_offline_then_connect(the_hub, 2500, 6000)
    _resynced(the_hub, b, app, link, 2, 2, waiting, 5, "replay:epoch_rollback")


def test_a_replayed_or_stale_resync_never_moves_the_epoch_back_nor_twice():
    _clear_epoch()
    the_hub = _new_hub()
    b, app, link = _boot(the_hub)  # epoch 1
    _run(b, app, 1500)
    dev = app.cfg["device_id"]
    down = cose.MacKey(_key(), dev.encode(), cose.AAD_DOWNLINK)

    def resync(refused, newest):
        return down.seal(messages.encoded(messages.EpochResync(refused, newest)))
    for raw in (resync(0, 5), resync(1, 0), resync(2, 7)):  # another epoch refused, or newest below ours
        app.on_downlink(raw)
    assert app.epoch == 1 and _epoch_on_flash() == 1
    forged = cose.MacKey(bytes(32), dev.encode(), cose.AAD_DOWNLINK).seal(
        messages.encoded(messages.EpochResync(1, 9)))
    app.on_downlink(forged)
    assert app.epoch == 1 and app.downlink_rejected == 1
    first = resync(1, 4)
    app.on_downlink(first)
    assert app.epoch == 5 and _epoch_on_flash() == 5
    app.on_downlink(first)  # replayed: our epoch is no longer the refused one
    assert app.epoch == 5 and _epoch_on_flash() == 5


def test_out_of_memory_while_re_sealing_loses_nothing():
    # The heap runs out while the outbox is re-sealed (a fault injected in
    # the re-sealing of the second frame, once): what was not re-sealed yet
    # stays in the outbox and is re-sealed at the next loop.
    _clear_epoch()
    the_hub = _new_hub()
    _run(*_boot(the_hub)[:2], 2500)
    _clear_epoch()
    b, app, link = _boot(the_hub)  # epoch 1 again
    link.connected = False
    _run(b, app, 3500)
    waiting = app.outbox.depth()
    assert waiting >= 3, waiting
    real = app._reseal
    calls = [0]

    def reseal_out_of_memory_once(sealed):
        calls[0] += 1
        if calls[0] == 2:
            raise MemoryError("injected")
        return real(sealed)
    app._reseal = reseal_out_of_memory_once
    link.connected = True
    _run(b, app, 7000, started=True)
    assert calls[0] > waiting  # a second pass came
    assert app.epoch == 2 and not app.reseal_due
    accepted = [r.message for r in link.received if r.verdict == hub.ACCEPTED]
    frames = [m for m in accepted if m.kind == messages.T_SAMPLES]
    assert frames[0].first_index == 0 and _check_stream(frames, _RATE_HZ, 6) == 0
    assert len(frames) == len({f.first_index for f in frames})
    assert app.outbox.dropped == 0
    texts = [m.text for m in accepted if m.kind == messages.T_ERROR and m.code == faults.ERR_EPOCH_RESYNC]
    assert any("no memory to re-seal" in t for t in texts), texts


def test_an_unreadable_epoch_file_starts_over_and_is_resynced_not_a_dead_board():
    # It once stopped the board for good ("corrupt: refusing to reuse an
    # epoch") until a technician came.
    _clear_epoch()
    the_hub = _new_hub()
    for _ in range(2):
        _run(*_boot(the_hub)[:2], 2000)
    with open(config.EPOCH, "w") as f:
        f.write("\xff\x00garbage")
    b, app, link, waiting = _boot_offline_then_connect(the_hub, 2500, 6000)
    assert app.epoch == 3 and _epoch_on_flash() == 3
    accepted = [r.message for r in link.received if r.verdict == hub.ACCEPTED]
    texts = [m.text for m in accepted if m.kind == messages.T_ERROR and m.code == faults.ERR_EPOCH_RESYNC]
    assert any("epoch file held" in t and "started over at 1" in t for t in texts), texts
    assert any("epoch 1 refused" in t for t in texts), texts
    frames = [m for m in accepted if m.kind == messages.T_SAMPLES]
    assert frames[0].first_index == 0 and _check_stream(frames, _RATE_HZ, 5) == 0
