# mypy: ignore-errors
# The codec's byte loops as native code (MicroPython's viper emitter), for
# the board: on an ESP32 each Python-level byte operation costs about a
# microsecond, and a frame has a thousand bytes to encode, encrypt and
# frame. MicroPython only: on CPython `import micropython` fails and the
# callers keep their plain loops (the same results, the golden vectors and
# tests hold both to it). This module is installed as source (agent/sim/
# build.py), so the board compiles it for its own CPU.
#
# Viper ints are machine words (32 bits on an ESP32, 64 on the unix port):
# the values here stay far inside 31 bits, and a sample read from an
# array("i") is sign-extended by hand so both give the same result.
import micropython


@micropython.viper
def cobs_into(msg, n: int, crc, out, pos: int) -> int:
    # 0x00 | COBS(msg[0:n] | crc[0:4]) | 0x00 at out[pos:]; returns the end.
    m = ptr8(msg)
    c = ptr8(crc)
    o = ptr8(out)
    o[pos] = 0
    code_at = pos + 1
    w = pos + 2
    code = 1
    total = n + 4
    i = 0
    while i < total:
        if i < n:
            b = m[i]
        else:
            b = c[i - n]
        if b == 0:
            o[code_at] = code
            code_at = w
            w += 1
            code = 1
        else:
            o[w] = b
            w += 1
            code += 1
            if code == 0xFF:
                o[code_at] = code
                code_at = w
                w += 1
                code = 1
        i += 1
    o[code_at] = code
    o[w] = 0
    return w + 1


@micropython.viper
def ctr_xor(buf, start: int, end: int, aes, ctr, ks, block: int, k: int):
    # XORs buf[start:end] with the AES-CTR keystream: ks holds block `block`
    # encrypted, k bytes of it used; the next blocks change only the counter
    # (bytes 13-15 of ctr) and come from aes.encrypt(ctr, ks).
    b = ptr8(buf)
    c = ptr8(ctr)
    s = ptr8(ks)
    i = start
    while i < end:
        if k == 16:
            block += 1
            c[15] = block & 0xFF
            c[14] = (block >> 8) & 0xFF
            c[13] = (block >> 16) & 0xFF
            aes.encrypt(ctr, ks)
            k = 0
        b[i] = b[i] ^ s[k]
        i += 1
        k += 1


@micropython.viper
def varint_into(src, count: int, out, pos: int, end: int) -> int:
    # Delta-zigzag-varint of src[0:count] (an array("i")) at out[pos:];
    # returns the end; -1 - i if out had no room for sample i (pos > end);
    # -1 - count - i if sample i differs from the one before by 2**29 or
    # more, which a 32-bit viper int cannot zigzag: the caller then encodes
    # in Python (our sensors give 18-bit samples: it never happens).
    s = ptr32(src)
    o = ptr8(out)
    # Shifted at run time, not folded by the compiler into constants too
    # big for a 32-bit port's small ints: bit 31, and the upper half of a
    # word (0 on a 32-bit port, where no sign needs extending).
    one = 1
    sign = (one << 15) << 16
    hi = ((0 - one) << 16) << 16
    prev = 0
    i = 0
    while i < count:
        v = s[i]
        if v & sign:
            v = v | hi
        d = v - prev
        prev = v
        if d >= 0x20000000 or d <= -0x20000000:
            return -1 - count - i
        if d >= 0:
            z = d << 1
        else:
            z = ((0 - d) << 1) - 1
        if pos > end:
            return -1 - i
        while z >= 0x80:
            o[pos] = (z & 0x7F) | 0x80
            z = z >> 7
            pos += 1
        o[pos] = z
        pos += 1
        i += 1
    return pos
