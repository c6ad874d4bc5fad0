# Tick arithmetic as the ESP32 does it. time.ticks_ms() and ticks_us() wrap
# with a period of 2^30 on a 32-bit port (MicroPython keeps them small ints:
# 31 bits, signed), ticks_ms after 12.4 days, ticks_us after 17.9 minutes.
# Every deadline and interval in the firmware is therefore a tick value
# combined only through diff() (a signed difference, meaningful within half
# the period) and add() (a tick plus a duration, wrapped), never with + and
# -: the results stay small ints for any uptime, and nothing allocates.
# On the board these are time.ticks_diff and time.ticks_add themselves. The
# unix port's period is 2^62 (64-bit small ints), so the simulated board's
# ticks wrap at 2^30 through the same arithmetic written out here, and its
# tests can start the clock just before the wrap.
import sys

from micropython import const

PERIOD = const(1 << 30)
_MASK = const((1 << 30) - 1)
_HALF = const(1 << 29)



class Uptime:
    # Milliseconds since boot, never wrapping, as two small ints: hi * 2**30
    # + lo, lo < 2**30. One int would be a heap int on a 32-bit port past
    # 2**30 ms (12.4 days up), and every status message would then allocate
    # (the CBOR writer takes the halves: Writer.uint_halves).
    def __init__(self):
        self.hi = 0
        self.lo = 0

    def advance(self, d):
        # d >= 0 ms later (a small int); no intermediate leaves the small ints.
        room = _MASK - self.lo
        if d > room:
            self.hi += 1
            self.lo = d - room - 1
        else:
            self.lo += d

    def ms(self):
        return (self.hi << 30) + self.lo  # (one int: a heap int past 2**30 on a 32-bit port)


def _diff(a, b):
    # a - b, wrapped into -2^29 .. 2^29-1.
    return ((a - b + _HALF) & _MASK) - _HALF


def _add(a, d):
    return (a + d) & _MASK


if sys.platform == "linux":
    diff = _diff
    add = _add
else:
    import time

    diff = time.ticks_diff
    add = time.ticks_add
