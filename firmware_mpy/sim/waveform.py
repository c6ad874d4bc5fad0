# A recorded signal played back in a loop: int32 little-endian samples at
# the recording's own rate, read from a file in chunks (the recordings are
# far larger than a board's heap). at(k, rate) gives the value at sample k
# of a sensor sampling at rate, by linear interpolation in integers: no
# floats, no allocation.
import array

from micropython import const

_CHUNK = const(512)


class Waveform:
    def __init__(self, path, rate_hz, channels=1, offset_samples=0):
        self._f = open(path, "rb")
        self.rate_hz = rate_hz
        self.channels = channels
        self._f.seek(0, 2)
        self.frames = self._f.tell() // (4 * channels)
        if self.frames < 2:
            raise ValueError("waveform %s is too short" % path)
        self._buf = array.array("i", bytes(4 * _CHUNK * channels))
        self._base = -1  # frame index of _buf[0]
        self._offset = offset_samples % self.frames

    def _frame(self, i, ch):
        i = (i + self._offset) % self.frames
        base = self._base
        if base < 0 or i < base or i >= base + _CHUNK:
            base = i
            self._f.seek(4 * base * self.channels)
            got = self._f.readinto(self._buf)
            if got < 4 * self.channels * _CHUNK:  # wrapped: rest from the start
                self._f.seek(0)
                rest = memoryview(self._buf)[got // 4:]
                self._f.readinto(rest)
            self._base = base
        return self._buf[(i - base) * self.channels + ch]

    def at(self, k, rate_hz, ch=0):
        num = k * self.rate_hz
        i = num // rate_hz
        frac = num - i * rate_hz
        a = self._frame(i, ch)
        if frac == 0:
            return a
        b = self._frame(i + 1, ch)
        return a + (b - a) * frac // rate_hz
