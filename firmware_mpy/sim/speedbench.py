# How much slower a target chip runs MicroPython than this machine's unix
# port: three programs with the workloads of MicroPython's tests/perf_bench
# at N=100 M=100 (fannkuch 6, n-queens 6, AES-256 OFB on 32 bytes: our own
# implementations of the same algorithms, not copies), timed here in CPU
# time, against the times perf_bench published for those workloads on each
# target. The factor is the geometric mean of the three ratios; their
# spread is printed with it, as its uncertainty. Sources (README, "Board
# speed"):
# - ESP32 at 160 MHz: scores of micropython/micropython PR #7850 ("esp32:
#   enable some optimisations", 2021, the optimisations today's esp32 port
#   builds with), converted to times by run-perfbench's score = 1e6 * norm / us.
# - ESP32 at 240 MHz: the 160 MHz times scaled by the clock (160/240), an
#   upper bound on the gain: flash cache misses do not scale with the clock.
# - ESP32-S3 at 240 MHz: the 160 MHz ESP32 times divided by 1.73, the ratio
#   of one program run on both chips by the same person (scruss.com, MicroPython
#   1.24/1.25: ESP32 @ 160 MHz 15.4 s, ESP32-S3 @ 240 MHz 8.9 s).
from micropython import const

# us on an ESP32 at 160 MHz: 1e6 * norm / score, norm = 6, 1000, 32.
_ESP32_US = (6000000 // 7163 * 100, 1000000000 * 100 // 223222, 32000000 * 100 // 33452)
# target -> (MHz, numerator, denominator) applied to the ESP32 times
TARGETS = {
    "esp32": (160, 1, 1),
    "esp32-240": (240, 160, 240),
    "esp32s3": (240, 890, 1540),
}
NAMES = ("fannkuch(6)", "nqueens(6)", "aes256-ofb(32 B)")
_REPEATS = const(15)


def published_us(target):
    _mhz, num, den = TARGETS[target]
    return [t * num // den for t in _ESP32_US]


# ---- fannkuch: the most flips of any permutation of 0..n-1 ------------------

def fannkuch(n):
    perm1 = list(range(n))
    count = [0] * n
    most = 0
    r = n
    while True:
        while r != 1:
            count[r - 1] = r
            r -= 1
        if perm1[0] and perm1[n - 1] != n - 1:
            p = perm1[:]
            flips = 0
            first = p[0]
            while first:
                p[:first + 1] = p[first::-1]
                flips += 1
                first = p[0]
            if flips > most:
                most = flips
        while True:
            if r == n:
                return most
            perm1.insert(r, perm1.pop(0))
            count[r] -= 1
            if count[r] > 0:
                break
            r += 1


# ---- n-queens: every permutation, kept if no two queens share a diagonal ----

def _permutations(n):
    # Lexicographic order, each as a fresh tuple (as a generator would give).
    a = list(range(n))
    yield tuple(x for x in a)
    while True:
        i = n - 2
        while i >= 0 and a[i] >= a[i + 1]:
            i -= 1
        if i < 0:
            return
        j = n - 1
        while a[j] <= a[i]:
            j -= 1
        a[i], a[j] = a[j], a[i]
        a[i + 1:] = a[i + 1:][::-1]
        yield tuple(x for x in a)


def nqueens(n):
    cols = range(n)
    found = 0
    for v in _permutations(n):
        if n == len(set(v[c] + c for c in cols)) == len(set(v[c] - c for c in cols)):
            found += 1
    return found


# ---- AES-256 (FIPS-197) in output feedback mode ------------------------------

def _sbox():
    # The S-box from its definition: inverse in GF(2^8), then the affine map.
    box = bytearray(256)
    p = q = 1
    while True:
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)  # p *= 3
        q ^= q << 1  # q /= 3
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ ((q << 1) | (q >> 7)) ^ ((q << 2) | (q >> 6)) ^ ((q << 3) | (q >> 5)) ^ ((q << 4) | (q >> 4))
        box[p] = (x ^ 0x63) & 0xFF
        if p == 1:
            break
    box[0] = 0x63
    return bytes(box)


_SBOX = _sbox()


def _xt(x):
    return ((x << 1) ^ 0x1B) & 0xFF if x & 0x80 else x << 1


def _expand(key, w):
    rcon = 1
    w[0:32] = key
    for i in range(8, 60):
        a = w[4 * i - 4]
        b = w[4 * i - 3]
        c = w[4 * i - 2]
        d = w[4 * i - 1]
        if i % 8 == 0:
            a, b, c, d = _SBOX[b] ^ rcon, _SBOX[c], _SBOX[d], _SBOX[a]
            rcon = _xt(rcon)
        elif i % 8 == 4:
            a, b, c, d = _SBOX[a], _SBOX[b], _SBOX[c], _SBOX[d]
        k = 4 * i
        w[k] = w[k - 32] ^ a
        w[k + 1] = w[k - 31] ^ b
        w[k + 2] = w[k - 30] ^ c
        w[k + 3] = w[k - 29] ^ d


def _encrypt(s, w, t):
    for i in range(16):
        s[i] ^= w[i]
    for rnd in range(1, 15):
        for c in range(4):  # sub bytes and shift rows, column by column
            t[4 * c] = _SBOX[s[4 * c]]
            t[4 * c + 1] = _SBOX[s[4 * ((c + 1) & 3) + 1]]
            t[4 * c + 2] = _SBOX[s[4 * ((c + 2) & 3) + 2]]
            t[4 * c + 3] = _SBOX[s[4 * ((c + 3) & 3) + 3]]
        k = 16 * rnd
        for c in range(4):
            a0 = t[4 * c]
            a1 = t[4 * c + 1]
            a2 = t[4 * c + 2]
            a3 = t[4 * c + 3]
            if rnd < 14:  # mix columns, but not in the last round
                e = a0 ^ a1 ^ a2 ^ a3
                s[4 * c] = a0 ^ e ^ _xt(a0 ^ a1) ^ w[k + 4 * c]
                s[4 * c + 1] = a1 ^ e ^ _xt(a1 ^ a2) ^ w[k + 4 * c + 1]
                s[4 * c + 2] = a2 ^ e ^ _xt(a2 ^ a3) ^ w[k + 4 * c + 2]
                s[4 * c + 3] = a3 ^ e ^ _xt(a3 ^ a0) ^ w[k + 4 * c + 3]
            else:
                s[4 * c] = a0 ^ w[k + 4 * c]
                s[4 * c + 1] = a1 ^ w[k + 4 * c + 1]
                s[4 * c + 2] = a2 ^ w[k + 4 * c + 2]
                s[4 * c + 3] = a3 ^ w[k + 4 * c + 3]


def _ofb(data, s, w, t):
    used = 16
    for i in range(len(data)):
        if used == 16:
            _encrypt(s, w, t)
            used = 0
        data[i] ^= s[used]
        used += 1


def aes_ofb(data, key, iv):
    # Twice encrypted, twice decrypted with fresh keys: data ends as it began.
    w = bytearray(240)
    s = bytearray(16)
    t = bytearray(16)
    for _ in range(2):
        _expand(key, w)
        s[:] = iv
        _ofb(data, s, w, t)
        _ofb(data, s, w, t)
    return data


def _run(k):
    if k == 0:
        return fannkuch(6)
    if k == 1:
        return nqueens(6)
    return aes_ofb(bytearray(32), bytes(32), bytes(16))


EXPECTED = (10, 4, bytes(32))


def host_us(meter):
    # The fastest of a few runs of each program here, in CPU microseconds.
    out = []
    for k in range(3):
        best = 0
        for _ in range(_REPEATS):
            t0 = meter.now_us()
            r = _run(k)
            dt = meter.now_us() - t0
            if r != EXPECTED[k]:
                raise AssertionError("calibration program %s gave %r" % (NAMES[k], r))
            if not best or dt < best:
                best = dt
        out.append(best)
    return out


def calibrate(target, meter):
    # Returns (factor x 1000, [per-program factors x 1000]): chip us per host us.
    pub = published_us(target)
    host = host_us(meter)
    each = [pub[k] * 1000 // max(1, host[k]) for k in range(3)]
    prod = 1.0
    for f in each:
        prod *= f
    return int(prod ** (1 / 3) + 0.5), each



class Probe:
    # A fixed piece of bytecode work that allocates nothing (a table-driven
    # CRC-8 over 512 bytes, 8 times: ~0.5 ms here), so the chip clock can
    # run it now and then in the firmware's heap to see how fast this
    # machine runs at the moment (sim.clock.ChipClock).
    def __init__(self):
        self._table = bytearray((i * 167 + 13) & 0xFF for i in range(256))
        self._buf = bytearray(i & 0xFF for i in range(512))

    def run(self):
        c = 0
        for _ in range(8):
            c = self._crc(c)
        return c

    def _crc(self, c):
        t = self._table
        b = self._buf
        for i in range(len(b)):
            c = t[(c ^ b[i]) & 0xFF]
        return c
