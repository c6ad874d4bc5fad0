# Epoch resync, the board's side (SPEC.md, Epoch resync): the hub refused
# this boot's epoch (the epoch file was lost or rolled back), so the board
# moves past the newest epoch the hub has seen and re-seals what the hub
# never acknowledged as new frames, one a loop. A rare path: imported only
# when a resync comes (app/main.py), so a streaming board keeps none of it
# in RAM; it allocates as it needs.
import gc

from app import config, faults
from app.main import forget, forget_decoding
from protocols import cbor, cose, messages


def resync(app, m):
    # The hub refused this boot's epoch (our epoch file was lost or rolled
    # back): move past the newest epoch it has seen, durably first, and
    # send what it never acknowledged again as new frames (SPEC.md, Epoch
    # resync). Only for our current epoch, and only ever forward: a
    # replayed resync does nothing more. True if it moved (a hello is due).
    old = app.epoch
    if m.refused_epoch != old or m.newest_epoch < old:
        return
    if m.newest_epoch >= messages.MAX_EPOCH:
        app.reports.add(faults.ERR_EPOCH_RESYNC, "epoch %d refused, none left above %d: provision again"
                        % (old, m.newest_epoch))
        return
    epoch = m.newest_epoch + 1
    try:
        config.save_epoch(epoch)
    except OSError as e:  # not durable, not used: the next refusal tries again
        app.reports.add(faults.ERR_EPOCH_RESYNC, "epoch %d refused; saving %d failed: %s" % (old, epoch, e))
        return
    app.epoch = epoch
    app.seq = 0
    app.reseal_due = True  # the outbox's frames, one a loop (step())
    if app.origin is not None:
        app.origin.forget()  # each is listed again as it is re-sealed
    app._reseal_oom = False
    app.board.console("pulsebridge: boot epoch %d refused by the hub (newest %d): now %d"
                      % (old, m.newest_epoch, epoch))
    app.reports.add(faults.ERR_EPOCH_RESYNC, "epoch %d refused (hub has %d; epoch file lost?): now %d, "
                    "resending %d frames" % (old, m.newest_epoch, epoch, app.outbox.depth()))
    return True


def reseal_step(app):
    # One outbox frame of the old epoch under the new one (a few ms on a
    # chip: the sensors are drained between two); the outbox sends again
    # once none is left.
    try:
        if not app.outbox.reseal_oldest(app._reseal):
            app.reseal_due = False
            forget_decoding()  # the resync is over: its code leaves RAM
            forget("app", "resync")
    except MemoryError:  # the frame stays; tried again next loop
        gc.collect()
        if not app._reseal_oom:
            app._reseal_oom = True
            app.reports.add(faults.ERR_EPOCH_RESYNC, "no memory to re-seal the outbox: again next loop")


def reseal(app, sealed):
    # A sample frame of the outbox under this epoch and a new seq: its
    # sample bytes (encoded, not decoded) decrypted and encrypted again
    # under this boot's key with the new counter blocks, the MAC made
    # again. Allocates (a rare path).
    f = messages.decode_payload(cose.parse(sealed).payload, (messages.T_SAMPLES, messages.T_ORIGIN),
                                decode_samples=False, opener=app.sealer)
    if isinstance(f, messages.OriginCheckpoint):  # the same checkpoint in a message of this epoch
        if f.epoch == app.epoch:
            return None  # re-sealed already
        f.epoch = app.epoch
        f.seq = app._seq()
        return f.seq, app.up.seal(messages.encoded(f, len(f.checkpoint) + 32))
    if not isinstance(f, messages.SampleFrame):  # the outbox holds sample frames and checkpoints only
        raise ValueError("outbox frame of type %d" % f.kind)
    if f.epoch == app.epoch:
        return None  # re-sealed already
    app._drain()  # half of the work done: the sensors' FIFOs go first
    f.epoch = app.epoch
    f.seq = app._seq()
    w = cbor.Writer(bytearray(len(sealed) + 16))  # the same samples: its header's integers may grow
    messages.encode(w, f, app.sealer)
    if app.origin is not None:
        app.origin.add(f.seq, w.buf, 0, w.pos)
    return f.seq, app.up.seal(memoryview(w.buf)[:w.pos])
