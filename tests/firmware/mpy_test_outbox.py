# The outbox ring against a plain model, under random operations (seeded):
# frames held are intact, never overlap, leave only when acked or dropped
# as the oldest, and every drop is counted.
from app.outbox import Outbox
from protocols.messages import Ack
from tests.shared.check import Rng

SEED = 1122


def _pattern(seq, n):
    return bytes((seq * 31 + i) & 0xFF for i in range(n))


def test_ring_against_model():
    print("seed", SEED)
    rng = Rng(SEED)
    ob = Outbox(3000, 12)
    held = {}  # seq -> length (the model)
    dropped = 0
    seq = 0
    for step in range(3000):
        op = rng.below(10)
        if op < 6:
            need = 50 + rng.below(700)
            before = set(held)
            start = ob.reserve(need)
            n = need - rng.below(40)
            ob.buf[start:start + n] = _pattern(seq, n)
            ob.commit(seq, n)
            gone = before - set(i for i in (ob.seqs[j] for j in range(12) if ob.state[j]))
            # only the oldest frames may go
            for g in gone:
                assert all(g < s for s in held if s not in gone), (step, g)
                del held[g]
                dropped += 1
            held[seq] = n
            seq += 1
        elif op < 9 and held:
            victims = [s for s in held if rng.below(3) == 0]
            if victims:
                ob.ack(Ack(1, [(s, s) for s in victims[:16]]), 1)
                for s in victims[:16]:
                    del held[s]
        else:
            i = ob.next_to_send(step, 100)
            if i >= 0:
                ob.mark_sent(i, step)
        assert ob.dropped == dropped
        assert ob.depth() == len(held)
        spans = []
        for j in range(12):
            if ob.state[j]:
                s = ob.seqs[j]
                assert held[s] == ob.lens[j]
                assert bytes(ob.frame(j)) == _pattern(s, ob.lens[j]), (step, s)
                spans.append((ob.off[j], ob.off[j] + ob.lens[j]))
        spans.sort()
        for a, b in zip(spans, spans[1:]):
            assert a[1] <= b[0], (step, spans)
    assert dropped > 0 and seq > 1000


def test_ack_for_another_epoch_frees_nothing():
    ob = Outbox(1000, 4)
    ob.reserve(10)
    ob.commit(0, 10)
    assert ob.ack(Ack(2, [(0, 5)]), 1) == 0 and ob.depth() == 1
    assert ob.ack(Ack(1, [(0, 5)]), 1) == 1 and ob.depth() == 0


def _held(ob):
    # (seq, bytes) of every frame held, oldest first.
    n = len(ob.off)
    out = []
    for k in range(ob.count):
        i = (ob.head + k) % n
        if ob.state[i]:
            out.append((ob.seqs[i], bytes(ob.frame(i))))
    return out


def test_reseal_moves_each_frame_once_even_when_frames_are_added_and_dropped_meanwhile():
    # An epoch resync re-seals the outbox one frame at a time (app/main.py);
    # re-sealing drains the sensors, which may add frames, and a full ring
    # then drops the oldest. Every frame left is re-sealed exactly once, in
    # order, and each drop is counted.
    ob = Outbox(1200, 6)
    for s in range(5):
        r = ob.reserve(200)
        ob.buf[r:r + 200] = _pattern(s, 200)
        ob.commit(s, 200)
    ob.ack(Ack(0, [(1, 1)]), 0)  # acknowledged: gone, never re-sealed
    state = {"next": 100, "new_seq": 500, "calls": 0}

    def add_frame():
        s = state["next"]
        state["next"] += 1
        r = ob.reserve(200)
        ob.buf[r:r + 200] = b"N" * 200
        ob.commit(s, 200)

    def seal(frame):
        state["calls"] += 1
        if bytes(frame[:1]) in (b"N", b"R"):
            return None  # sealed under the new epoch already
        if state["calls"] <= 3:
            add_frame()  # the third fills the records: the oldest (this very frame) is dropped
        s = state["new_seq"]
        state["new_seq"] += 1
        return s, b"R" + bytes(frame[1:])

    moved = 0
    while ob.reseal_oldest(seal):
        moved += 1
        assert moved < 20
    held = _held(ob)
    olds = [h for h in held if h[1][:1] not in (b"N", b"R")]
    assert olds == [], olds  # nothing of the old epoch left
    resealed = [h[1] for h in held if h[1][:1] == b"R"]
    # Frames 0, 2, 3, 4 were waiting; those not dropped came back once each, in order.
    originals = [_pattern(s, 200) for s in (0, 2, 3, 4)]
    kept = [o for o in originals if (b"R" + o[1:]) in resealed]
    assert [b"R" + o[1:] for o in kept] == resealed
    assert len(kept) + ob.dropped == 4, (len(kept), ob.dropped)
    assert ob.dropped == 1 and len(kept) == 3
