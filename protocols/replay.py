# Replay protection for one device: an RFC 6347 (DTLS, section 4.1.2.6)
# style sliding window over sequence numbers, plus the boot-epoch rule.
#
# A board numbers its messages (epoch, seq): epoch is a counter the board
# keeps in flash and increments at every boot, seq starts at 0 and strictly
# increases within a boot. So:
#   - epoch below the newest seen: a message from an earlier boot. Refused.
#   - epoch above the newest seen: the board rebooted. The window restarts.
#   - same epoch: seq above the top slides the window; seq inside the window
#     is fresh unless its bit is set; seq below the window is too old.
#   - same epoch, another boot salt than the one recorded for it: another
#     boot that reused the epoch (its epoch file lost or rolled back).
#     Refused, never taken for a duplicate: its (epoch, seq) name other
#     frames than the ones stored under them. Only sample frames carry the
#     salt (SPEC.md); the first one of an epoch records it.
# check() only answers; commit() records a message as seen. The hub calls
# commit() in the same transaction as it stores the message, so a message
# is never marked seen without being stored, nor stored twice.

from protocols._compat import const

WINDOW = const(64)

FRESH = "fresh"
DUPLICATE = "duplicate"  # seen already: store once, acknowledge again
OLD_EPOCH = "old_epoch"  # from an earlier boot than one already seen
TOO_OLD = "too_old"  # below the window: cannot tell, so refused
EPOCH_ROLLBACK = "epoch_rollback"  # the newest epoch again, from another boot (another salt)


class ReplayWindow:
    def __init__(self, epoch: int = -1, top: int = -1, bitmap: int = 0, salt: "bytes | None" = None) -> None:
        # top: highest seq seen in epoch; bit i of bitmap: seq top-i was seen;
        # salt: the boot salt of epoch's sample frames (None: none seen yet).
        self.epoch = epoch
        self.top = top
        self.bitmap = bitmap
        self.salt = salt

    def check(self, epoch: int, seq: int, salt: "bytes | None" = None) -> str:
        # salt: the message's boot salt (sample frames), else None.
        if epoch < self.epoch:
            return OLD_EPOCH
        if epoch == self.epoch and salt is not None and self.salt is not None and salt != self.salt:
            return EPOCH_ROLLBACK
        if epoch > self.epoch or seq > self.top:
            return FRESH
        back = self.top - seq
        if back >= WINDOW:
            return TOO_OLD
        return DUPLICATE if (self.bitmap >> back) & 1 else FRESH

    def commit(self, epoch: int, seq: int, salt: "bytes | None" = None) -> None:
        # Only after check() said FRESH.
        if epoch > self.epoch:
            self.epoch = epoch
            self.top = seq
            self.bitmap = 1
            self.salt = None if salt is None else bytes(salt)
            return
        if self.salt is None and salt is not None:
            self.salt = bytes(salt)
        if seq > self.top:
            shift = seq - self.top
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = seq
        else:
            self.bitmap |= 1 << (self.top - seq)

    def state(self) -> "tuple[int, int, int, bytes | None]":
        return self.epoch, self.top, self.bitmap, self.salt
