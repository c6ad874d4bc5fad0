# Faults the board lives through without anyone resetting it, and how it
# tells the hub (error reports, message type 7; codes in protocols/SPEC.md).
#
# Sensors (SensorGuard), one state per stream:
#   OK    --bus error--------------------> RETRY (the next loop reads again)
#   RETRY --read works-------------------> OK
#   RETRY --_RETRIES errors in a row-----> DOWN
#   OK    --chip no longer identifies----> DOWN (SPI reports no error: a dead
#                                          chip reads all ones)
#   DOWN  --restart() works--------------> OK (the time it was down is a gap
#                                          in the stream, reported as lost)
#   DOWN  --restart() fails--------------> DOWN, next try after a backoff
#                                          doubling from _BACKOFF_MIN_MS to
#                                          _BACKOFF_MAX_MS
# Other streams go on meanwhile. Every frame after a fault carries the
# sensor-fault flag; every change of state is an error report.
from micropython import const

from app import ticks

ERR_SENSOR_SETUP = const(1)  # a sensor failed at start-up
ERR_SENSOR_FAULT = const(2)  # a sensor failed while streaming (bus error, not answering, back)
ERR_LINK_FAULT = const(3)  # the link failed (radio error, host not reading)
ERR_LOOP_RESTARTED = const(4)  # an unexpected exception ended a loop iteration
ERR_WATCHDOG_RESET = const(5)  # the board restarted because its loop stalled
ERR_EPOCH_RESYNC = const(6)  # the hub refused this boot's epoch: moved past the hub's newest (SPEC.md)
ERR_NO_MEMORY = const(7)  # the heap had no block for the whole outbox ring at boot: a smaller one

OK = const(0)
RETRY = const(1)
DOWN = const(2)

_RETRIES = const(3)  # bus errors in a row before the chip is restarted
_BACKOFF_MIN_MS = const(100)
_BACKOFF_MAX_MS = const(5000)  # a chip that came back is found within 5 s
_CHECK_EVERY_MS = const(1000)  # is the chip still there? one register read a second
_MAX_REPORTS = const(4)  # error reports held while the link is down; older ones are counted, not kept


class Caught:
    # A with-block that ends at an OSError and keeps it for the caller
    # (take()), for the bus and console calls made many times a second. A
    # try that names its exception needs at least 14 of the VM's 11 words
    # of call frame, so each call took its frame from the heap (README,
    # "call frames"); a with-block needs 5, and hands __exit__ the error.
    def __init__(self):
        self.error = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if isinstance(value, OSError):
            self.error = value
            return True
        return False

    def take(self):
        # The OSError that ended the last block, or None; forgets it.
        e = self.error
        self.error = None
        return e


class Reports:
    # Error reports waiting for the link: the newest _MAX_REPORTS, and how
    # many older ones were dropped (that count goes in the next report).
    def __init__(self):
        self.pending = []
        self.dropped = 0
        self.sent = 0

    def add(self, code, text):
        if len(self.pending) >= _MAX_REPORTS:
            self.pending.pop(0)
            self.dropped += 1
        self.pending.append((code, text[:96]))

    def first(self):
        # The oldest waiting (code, text), or None; done() once it is sent.
        if not self.pending:
            return None
        code, text = self.pending[0]
        if self.dropped:
            text = ("%d earlier reports dropped; " % self.dropped + text)[:96]
        return code, text

    def done(self):
        self.pending.pop(0)
        self.dropped = 0
        self.sent += 1


class SensorGuard:
    def __init__(self, names, now_ms):
        # now_ms: the board's tick (app.ticks): every time here is one.
        n = len(names)
        self.names = names  # a chip name per stream, for the reports
        self.state = [OK] * n
        self.errors = [0] * n  # in a row
        self.faults = [0] * n  # since boot
        self.restarts = [0] * n
        self.next_ms = [now_ms] * n  # DOWN: next restart attempt; OK: next identity check
        self.backoff_ms = [_BACKOFF_MIN_MS] * n
        self.down_since_ms = [0] * n

    def ready(self, k):
        # Whether stream k's sensor is to be read this loop.
        return self.state[k] != DOWN

    def check_due(self, k, now_ms):
        if ticks.diff(now_ms, self.next_ms[k]) >= 0:
            self.next_ms[k] = ticks.add(now_ms, _CHECK_EVERY_MS)
            return True
        return False

    def read_ok(self, k):
        # A read worked: returns True if the sensor was failing (now recovered).
        if self.state[k] == RETRY:
            self.state[k] = OK
            self.errors[k] = 0
            return True
        return False

    def read_failed(self, k, now_ms):
        # A bus error: True if the sensor is now to be restarted (DOWN).
        self.faults[k] += 1
        self.errors[k] += 1
        if self.errors[k] >= _RETRIES:
            self.go_down(k, now_ms)
            return True
        self.state[k] = RETRY
        return False

    def go_down(self, k, now_ms):
        if self.state[k] != DOWN:
            self.down_since_ms[k] = now_ms
            self.backoff_ms[k] = _BACKOFF_MIN_MS
        self.state[k] = DOWN
        self.next_ms[k] = now_ms

    def restart_due(self, k, now_ms):
        return self.state[k] == DOWN and ticks.diff(now_ms, self.next_ms[k]) >= 0

    def restarted(self, k, now_ms):
        self.restarts[k] += 1
        self.state[k] = OK
        self.errors[k] = 0
        self.next_ms[k] = ticks.add(now_ms, _CHECK_EVERY_MS)

    def restart_failed(self, k, now_ms):
        b = self.backoff_ms[k]
        self.next_ms[k] = ticks.add(now_ms, b)
        self.backoff_ms[k] = min(_BACKOFF_MAX_MS, 2 * b)
        return b
