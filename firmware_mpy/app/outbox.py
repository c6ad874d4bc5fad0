# Frames sent but not yet acknowledged by the hub: a byte ring (one
# preallocated bytearray) holding sealed frames back to back, indexed by a
# fixed table of records in seq order. A frame leaves only when an
# authenticated ack covers it; unacknowledged frames are sent again after
# retransmit_ms. When the ring is full the oldest frames are dropped, and
# `dropped` (carried in every frame's status) tells the hub: loss is never
# silent. Acked frames in the middle free their bytes once the older ones go.
import array
import gc

from micropython import const

from app import ticks

# The ring is the firmware's one big block (24 kB by default). Allocated once
# the modules are loaded, it may find no hole that large: their code (in RAM
# when installed as .mpy files) splits the heap. So the entry point asks for
# it first, at boot (preallocate), and the Outbox takes that one. This module
# keeps it for the board's life: a simulated board's watchdog reset starts
# the firmware again in the same heap (sim/board_sim.py, run_forever), where
# a chip's starts in an empty one; asked for again, the ring is the same
# block, not a new one sought in a heap the last run left in pieces (an
# update's code loaded there left no 24 kB hole, and the board ended at its
# REPL).
_MIN_RING_BYTES = const(4096)  # a smaller ring than asked for, down to this: two ECG frames of 1 s at 512 Hz
_ring = None
_ring_free = False  # preallocated, and no Outbox holds it


def preallocate(nbytes):
    # At boot, nothing of an earlier run in use: the ring, nbytes if the
    # heap has a block that large, else the largest power-of-two fraction
    # of it that fits, down to _MIN_RING_BYTES (the app reports the
    # shortfall). Returns its size, 0 if not even that fits.
    global _ring, _ring_free
    ring = _ring
    if ring is None or len(ring) != nbytes:
        _ring = ring = None
        n = nbytes
        while n >= _MIN_RING_BYTES:
            gc.collect()
            try:
                ring = bytearray(n)
                break
            except MemoryError:
                n //= 2
        _ring = ring
    _ring_free = ring is not None
    return 0 if ring is None else len(ring)


_FREE = const(0)  # record unused, or acknowledged
_UNSENT = const(1)
_SENT = const(2)


class Outbox:
    def __init__(self, capacity_bytes, max_frames, min_bytes=None):
        # The preallocated ring if it is free and of capacity_bytes (or, given
        # min_bytes, down to that: all the heap had at boot); else a new one.
        global _ring, _ring_free
        ring = _ring
        if min_bytes is None:
            min_bytes = capacity_bytes
        if ring is not None and _ring_free and min_bytes <= len(ring) <= capacity_bytes:
            _ring_free = False
        else:
            if _ring_free:  # not of a size this outbox can take: its block goes back to the heap
                _ring = None
                _ring_free = False
            ring = bytearray(capacity_bytes)
        self.buf = ring
        self.mv = memoryview(self.buf)
        # The records' table as typed arrays (a list takes a word per entry):
        # off in the ring, length (a message is at most 4224 bytes: 16 bits),
        # seq (32 bits, SPEC.md), state, when sent (a tick, 30 bits).
        self.off = array.array("i", bytes(4 * max_frames))
        self.lens = array.array("H", bytes(2 * max_frames))
        self.seqs = array.array("I", bytes(4 * max_frames))
        self.state = bytearray(max_frames)  # _FREE
        self.sent_ms = array.array("i", bytes(4 * max_frames))
        self.head = 0  # oldest record
        self.count = 0  # records from head, acked ones included
        self.dropped = 0
        self._reserved = -1
        self._reserved_off = 0
        # release(buf, start, end): called before reserve() hands out bytes
        # that a link may be reading a frame from (BLE fragments frames in
        # place); None: the link copies what it sends.
        self.release = None

    def depth(self):
        n = 0
        for s in self.state:
            if s != _FREE:
                n += 1
        return n

    def _tail(self):
        if not self.count:
            return 0
        last = (self.head + self.count - 1) % len(self.off)
        return self.off[last] + self.lens[last]

    def _fits(self, start, need):
        # Whether [start, start+need) misses the live bytes.
        end = start + need
        if end > len(self.buf):
            return False
        if not self.count:
            return True
        h = self.off[self.head]
        t = self._tail()
        if t > h:  # live: [h, t)
            return start >= t or end <= h
        return start >= t and end <= h  # wrapped, live: [h, end of ring) and [0, t)

    def _drop_head(self):
        i = self.head
        if self.state[i] != _FREE:
            self.dropped += 1
            self.state[i] = _FREE
        self.head = (i + 1) % len(self.off)
        self.count -= 1

    def _trim(self):
        while self.count and self.state[self.head] == _FREE:
            self.head = (self.head + 1) % len(self.off)
            self.count -= 1

    def reserve(self, need):
        # Room for a frame of at most need bytes at the tail, dropping the
        # oldest frames if there is none. Returns where it starts in buf
        # (buf[start:start+need] is the caller's until commit(); no view of
        # it is made: that would allocate for each frame).
        if need > len(self.buf):
            raise ValueError("frame of %d bytes larger than the outbox" % need)
        self._trim()
        while True:
            if self.count == len(self.off):
                self._drop_head()
                continue
            t = self._tail()
            if self._fits(t, need):
                start = t
                break
            if self._fits(0, need):
                start = 0
                break
            self._drop_head()
        self._reserved = (self.head + self.count) % len(self.off)
        self._reserved_off = start
        if self.release is not None:  # a link reading a frame from there stops first
            self.release(self.buf, start, start + need)
        return start

    def commit(self, seq, length):
        i = self._reserved
        self.off[i] = self._reserved_off
        self.lens[i] = length
        self.seqs[i] = seq
        self.state[i] = _UNSENT
        self.count += 1
        self._reserved = -1

    def frame(self, i):
        o = self.off[i]
        return self.mv[o:o + self.lens[i]]

    # next_to_send runs every loop: it and its helpers keep to 11 words of
    # locals and stack, so their call frames go on the C stack, not the heap
    # (README, "call frames"; a range() loop takes two words more than this
    # while).
    def next_to_send(self, now_ms, retransmit_ms):
        # The oldest frame never sent, else the oldest whose ack is overdue.
        i = self._oldest_unsent()
        if i < 0:
            i = self._oldest_overdue(now_ms, retransmit_ms)
        return i

    def _oldest_unsent(self):
        k = 0
        while k < self.count:
            i = (self.head + k) % len(self.off)
            if self.state[i] == _UNSENT:
                return i
            k += 1
        return -1

    def _oldest_overdue(self, now_ms, retransmit_ms):
        k = 0
        while k < self.count:
            i = (self.head + k) % len(self.off)
            if self.state[i] == _SENT and ticks.diff(now_ms, self.sent_ms[i]) >= retransmit_ms:
                return i
            k += 1
        return -1

    def mark_sent(self, i, now_ms):
        self.state[i] = _SENT
        self.sent_ms[i] = now_ms

    def resend_all(self):
        # After a reconnect: whatever was in flight may be lost.
        for i in range(len(self.state)):
            if self.state[i] == _SENT:
                self.state[i] = _UNSENT

    def reseal_oldest(self, seal):
        # An epoch resync (SPEC.md), one frame at a time: the oldest frame not
        # acknowledged is re-sealed by seal(frame) -> (seq, sealed bytes) and
        # moves to the tail as a new frame, unsent. seal() returns None for a
        # frame sealed under the new epoch already: the frames of the old one
        # come first, so then none is left, and False is returned. A frame
        # leaves its slot only once its new form exists (if seal() raises,
        # it stays). A frame the ring drops to make room is counted as ever.
        # seal() may add frames (the sensors are drained meanwhile): if that
        # dropped any, this one may be gone, so its new form is not kept and
        # the oldest left is taken at the next call.
        self._trim()
        if not self.count:
            return False
        i = self.head
        dropped = self.dropped
        r = seal(self.frame(i))
        if r is None:
            return False
        if self.dropped != dropped:
            return True
        seq, sealed = r
        self.state[i] = _FREE
        self._trim()
        start = self.reserve(len(sealed))
        self.buf[start:start + len(sealed)] = sealed
        self.commit(seq, len(sealed))
        return True

    def ack(self, ack, epoch):
        # Frees every frame an authenticated ack (messages.Ack) for this boot covers.
        if ack.epoch != epoch:
            return 0
        freed = 0
        for first, last in ack.ranges:
            freed += self.ack_range(first, last)
        return freed

    def ack_range(self, first, last):
        # Frees the frames with first <= seq <= last (an authenticated ack
        # for this boot said so). Allocates nothing.
        # (No more locals: its frame stays within the VM's 11 words.)
        freed = 0
        state = self.state
        for i in range(len(state)):
            if state[i] != _FREE and first <= self.seqs[i] <= last:
                state[i] = _FREE
                freed += 1
        self._trim()
        return freed
