# Frames sent but not yet acknowledged by the hub, in a fixed set of
# preallocated slots. A frame leaves only when an authenticated ack covers
# it; unacknowledged frames are sent again after retransmit_ms. When every
# slot is taken the oldest frame is dropped, and `dropped` (carried in every
# frame's status) tells the hub: loss is never silent.
from micropython import const

_FREE = const(0)
_UNSENT = const(1)
_SENT = const(2)


class Outbox:
    def __init__(self, slots, slot_size):
        self.bufs = [bytearray(slot_size) for _ in range(slots)]
        self.lens = [0] * slots
        self.seqs = [0] * slots
        self.state = [_FREE] * slots
        self.sent_ms = [0] * slots
        self.dropped = 0

    def depth(self):
        n = 0
        for s in self.state:
            if s != _FREE:
                n += 1
        return n

    def reserve(self):
        # A free slot, or the oldest one, whose frame is then lost.
        oldest = -1
        for i in range(len(self.state)):
            if self.state[i] == _FREE:
                return i
            if oldest < 0 or self.seqs[i] < self.seqs[oldest]:
                oldest = i
        self.state[oldest] = _FREE
        self.dropped += 1
        return oldest

    def commit(self, slot, seq, length):
        self.seqs[slot] = seq
        self.lens[slot] = length
        self.state[slot] = _UNSENT

    def next_to_send(self, now_ms, retransmit_ms):
        # The oldest frame never sent, else the oldest whose ack is overdue.
        best = -1
        best_due = -1
        for i in range(len(self.state)):
            st = self.state[i]
            if st == _UNSENT:
                if best < 0 or self.seqs[i] < self.seqs[best]:
                    best = i
            elif st == _SENT and now_ms - self.sent_ms[i] >= retransmit_ms:
                if best_due < 0 or self.seqs[i] < self.seqs[best_due]:
                    best_due = i
        return best if best >= 0 else best_due

    def mark_sent(self, slot, now_ms):
        self.state[slot] = _SENT
        self.sent_ms[slot] = now_ms

    def resend_all(self):
        # After a reconnect: whatever was in flight may be lost.
        for i in range(len(self.state)):
            if self.state[i] == _SENT:
                self.state[i] = _UNSENT

    def ack(self, ack, epoch):
        # Frees every slot an authenticated ack for this boot covers.
        freed = 0
        if ack.epoch != epoch:
            return 0
        for i in range(len(self.state)):
            if self.state[i] != _FREE and ack.covers(epoch, self.seqs[i]):
                self.state[i] = _FREE
                freed += 1
        return freed
