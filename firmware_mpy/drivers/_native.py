# mypy: ignore-errors
# The drivers' per-sample loops as native code (MicroPython's viper
# emitter): unpacking a FIFO burst costs a dozen Python operations per
# sample, a millisecond per burst on an ESP32. Installed as source
# (agent/provision/build.py), so the board compiles it for its own CPU; viper
# ints are machine words, and every value here fits 24 bits.
import micropython


@micropython.viper
def max30003_words(rx, n: int, out, pos: int) -> int:
    # n ECG FIFO words (24 bits, after rx[0]) into out[pos:] (an array("i")):
    # the 18-bit sample of each, sign-extended. Returns how many were
    # samples | 0x10000 if one sat at full scale | 0x20000 if the chip said
    # overflow (ETAG 7) | 0x40000 if it said empty (ETAG 6), where it stopped.
    r = ptr8(rx)
    o = ptr32(out)
    b = 1
    i = 0
    flags = 0
    while i < n:
        word = (r[b] << 16) | (r[b + 1] << 8) | r[b + 2]
        b += 3
        etag = (word >> 3) & 7
        if etag == 7:
            return i | flags | 0x20000
        if etag == 6:
            return i | flags | 0x40000
        v = word >> 6
        if v & 0x20000:
            v = v - 0x40000
        if v >= 0x1FFFF or v <= -0x1FFFF:
            flags = 0x10000
        o[pos + i] = v
        i += 1
    return i | flags


@micropython.viper
def max30102_samples(buf, n: int, red, ir, pos: int) -> int:
    # n samples of 6 bytes (red then IR, 18 bits each, big-endian) into
    # red[pos:] and ir[pos:] (array("i")); returns 1 if one is at full scale.
    s = ptr8(buf)
    ro = ptr32(red)
    io = ptr32(ir)
    sat = 0
    b = 0
    i = 0
    while i < n:
        r = ((s[b] << 16) | (s[b + 1] << 8) | s[b + 2]) & 0x3FFFF
        x = ((s[b + 3] << 16) | (s[b + 4] << 8) | s[b + 5]) & 0x3FFFF
        if r == 0x3FFFF or x == 0x3FFFF:
            sat = 1
        ro[pos + i] = r
        io[pos + i] = x
        b += 6
        i += 1
    return sat
