# The board's store of bonds with paired phones (app.bonds), under
# MicroPython: lookups as the stack makes them, bounds, persistence, and
# the file parser fuzzed (a torn or altered file is refused as a whole,
# with a reason, and never raises anything but ValueError).
import os
import random

from app import bonds
from protocols.link import crc32

PATH = "bonds-test.bin"


def _fresh():
    for p in (PATH, PATH + ".new"):
        try:
            os.remove(p)
        except OSError:
            pass
    return bonds.BondStore(PATH)


def test_get_by_key_and_by_index_as_the_stack_asks():
    s = _fresh()
    assert s.get(1, 0, None) is None and s.get(1, 0, b"\x00phone") is None
    assert s.set(1, memoryview(b"\x00phoneA"), memoryview(b"ours-A"))
    assert s.set(2, b"\x00phoneA", b"peer-A")
    assert s.set(1, b"\x00phoneB", b"ours-B")
    assert s.get(1, 0, memoryview(b"\x00phoneB")) == b"ours-B"
    assert s.get(2, 0, b"\x00phoneA") == b"peer-A"
    assert [s.get(1, i, None) for i in range(3)] == [b"ours-A", b"ours-B", None]
    assert s.set(1, b"\x00phoneA", b"ours-A2")  # replaced, not doubled
    assert [s.get(1, i, None) for i in range(3)] == [b"ours-B", b"ours-A2", None]
    assert s.set(1, b"\x00phoneB", None)  # deleted
    assert s.get(1, 0, b"\x00phoneB") is None and len(s.entries) == 2


def test_persists_through_a_restart():
    s = _fresh()
    s.set(1, b"\x00phoneA", b"L" * 80)
    s.set(3, b"\x00phoneA\x00\x10", b"\x01\x00")
    s.flush()
    assert not s.dirty
    again = bonds.BondStore(PATH)
    assert again.error == "" and again.entries == s.entries
    assert again.get(1, 0, b"\x00phoneA") == b"L" * 80


def test_bounded_oldest_goes_and_oversized_refused():
    s = _fresh()
    for i in range(bonds.MAX_ENTRIES + 6):
        assert s.set(1, b"phone%02d" % i, bytes(bonds.MAX_VALUE))
    assert len(s.entries) == bonds.MAX_ENTRIES
    assert s.get(1, 0, b"phone00") is None and s.get(1, 0, b"phone%02d" % (bonds.MAX_ENTRIES + 5)) is not None
    assert not s.set(1, b"k", bytes(bonds.MAX_VALUE + 1))
    assert not s.set(1, bytes(bonds.MAX_KEY + 1), b"v")
    last = b"phone%02d" % (bonds.MAX_ENTRIES + 5)
    assert not s.set(1, last, bytes(bonds.MAX_VALUE + 1))  # refused: the stored one stays
    assert s.get(1, 0, last) == bytes(bonds.MAX_VALUE)
    s.flush()
    assert os.stat(PATH)[6] <= bonds.MAX_FILE


def test_torn_or_altered_file_is_ignored_with_a_reason():
    s = _fresh()
    s.set(1, b"\x00phoneA", b"ours-A")
    s.flush()
    with open(PATH, "rb") as f:
        good = f.read()
    for bad, why in ((good[:-3], "CRC"), (good[:3], "not a bonds file"), (b"", "not a bonds file"),
                     (good[:9] + bytes((good[9] ^ 1,)) + good[10:], "CRC"),
                     (bytes(bonds.MAX_FILE + 1), "more than")):
        with open(PATH, "wb") as f:
            f.write(bad)
        st = bonds.BondStore(PATH)
        assert st.entries == [] and why in st.error, (why, st.error)


def _with_crc(body):
    c = crc32(body)
    return bytes(body) + bytes((c & 0xFF, (c >> 8) & 0xFF, (c >> 16) & 0xFF, c >> 24))


def test_parser_fuzzed():
    # Mutations of a valid file, most with the CRC made right again so that
    # the record parsing behind it is reached.
    random.seed(4)
    valid = bytes(bonds.serialise([[1, b"\x00phoneA", b"x" * 40], [2, b"\x00phoneA", b"y" * 40], [3, b"k", b""]]))
    assert len(bonds.parse(valid)) == 3
    body = valid[:-4]
    accepted = refused = 0
    for n in range(3000):
        b = bytearray(body)
        for _ in range(1 + random.getrandbits(2)):
            op = random.getrandbits(2)
            i = random.getrandbits(8) % (len(b) + 1)
            if op == 0 and b:
                b[i % len(b)] = random.getrandbits(8)
            elif op == 1:
                b = b[:i]
            elif op == 2:
                b = b[:i] + bytes(random.getrandbits(8) for _ in range(1 + random.getrandbits(3))) + b[i:]
            elif len(b) > 4:
                b[4] = random.getrandbits(8)  # the count
        data = _with_crc(b) if n % 4 else bytes(b) + bytes(random.getrandbits(8) for _ in range(4))
        try:
            out = bonds.parse(data)
        except ValueError as e:
            assert str(e).startswith("bonds file:"), e
            refused += 1
            continue
        accepted += 1
        assert len(out) <= bonds.MAX_ENTRIES
        for t, key, value in out:
            assert 0 <= t <= 255 and len(key) <= bonds.MAX_KEY and len(value) <= bonds.MAX_VALUE
        assert bytes(bonds.serialise(out)) == data  # what parses is exactly what was written
    print("bonds parser fuzzed: %d accepted, %d refused" % (accepted, refused))
    assert refused > 1000 and accepted > 10, (accepted, refused)
