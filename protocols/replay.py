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
# check() only answers; commit() records a message as seen. The hub calls
# commit() in the same transaction as it stores the message, so a message
# is never marked seen without being stored, nor stored twice.

from protocols._compat import const

WINDOW = const(64)

FRESH = "fresh"
DUPLICATE = "duplicate"  # seen already: store once, acknowledge again
OLD_EPOCH = "old_epoch"  # from an earlier boot than one already seen
TOO_OLD = "too_old"  # below the window: cannot tell, so refused


class ReplayWindow:
    def __init__(self, epoch: int = -1, top: int = -1, bitmap: int = 0) -> None:
        # top: highest seq seen in epoch; bit i of bitmap: seq top-i was seen.
        self.epoch = epoch
        self.top = top
        self.bitmap = bitmap

    def check(self, epoch: int, seq: int) -> str:
        if epoch < self.epoch:
            return OLD_EPOCH
        if epoch > self.epoch or seq > self.top:
            return FRESH
        back = self.top - seq
        if back >= WINDOW:
            return TOO_OLD
        return DUPLICATE if (self.bitmap >> back) & 1 else FRESH

    def commit(self, epoch: int, seq: int) -> None:
        # Only after check() said FRESH.
        if epoch > self.epoch:
            self.epoch = epoch
            self.top = seq
            self.bitmap = 1
        elif seq > self.top:
            shift = seq - self.top
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = seq
        else:
            self.bitmap |= 1 << (self.top - seq)

    def state(self) -> "tuple[int, int, int]":
        return self.epoch, self.top, self.bitmap
