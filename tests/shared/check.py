# Assertion helpers available on both interpreters (MicroPython has no pytest).
import binascii


def unhex(s: str) -> bytes:
    return binascii.unhexlify(s.replace(" ", "").replace("\n", ""))


def raises(exc_type: type, fn, *args) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except exc_type as e:
        return e
    raise AssertionError("%s not raised by %r%r" % (exc_type.__name__, fn, args))


class Rng:
    # A seeded xorshift generator: the same sequence on both interpreters, so
    # a failing seed reproduces anywhere. Tests print the seed they use.
    def __init__(self, seed: int) -> None:
        self.state = (seed & 0xFFFFFFFF) or 1

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def below(self, n: int) -> int:
        return self.next() % n

    def bytes(self, n: int) -> bytes:
        return bytes(self.next() & 0xFF for _ in range(n))
