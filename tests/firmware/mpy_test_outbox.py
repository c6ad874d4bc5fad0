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
            region = ob.reserve(need)
            n = need - rng.below(40)
            region[:n] = _pattern(seq, n)
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
