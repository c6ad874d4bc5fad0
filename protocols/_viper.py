# mypy: ignore-errors
# The codec's byte loops as native code (MicroPython's viper emitter), for
# the board: on an ESP32 each Python-level byte operation costs about a
# microsecond, and a frame has a thousand bytes to encode, encrypt and
# frame. MicroPython only: on CPython `import micropython` fails and the
# callers keep their plain loops (the same results, the golden vectors and
# tests hold both to it). This module is installed as source (agent/provision/
# build.py), so the board compiles it for its own CPU.
#
# Viper ints are machine words (32 bits on an ESP32, 64 on the unix port):
# the values here stay far inside 31 bits, and a sample read from an
# array("i") is sign-extended by hand so both give the same result.
import micropython


@micropython.viper
def cobs_into(msg, start: int, n: int, crc, out, pos: int) -> int:
    # 0x00 | COBS(msg[start:start+n] | crc[0:4]) | 0x00 at out[pos:];
    # returns the end.
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
            b = m[start + i]
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
def cobs_frame(f, msg, start: int, n: int) -> int:
    # A link.StreamFramer's frame of msg[start:start+n] (its CRC-32 into
    # f._crc, by the table f._nibbles) at f.out[0:]; returns the end.
    crc32_into(msg, start, n, f._nibbles, f._crc)
    return int(cobs_into(msg, start, n, f._crc, f.out, 0))


@micropython.viper
def ctr_xor(buf, start: int, end: int, offset: int, c):
    # XORs buf[start:end] with the AES-CTR keystream of cipher c (a
    # cipher.SampleCipher) from byte `offset` of its message on: c._ctr
    # holds the message's counter block (bytes 12-15, the block counter,
    # set here), c._ks each block's keystream from c._aes.encrypt.
    ctr = c._ctr
    ks = c._ks
    aes = c._aes
    b = ptr8(buf)
    cb = ptr8(ctr)
    s = ptr8(ks)
    block = offset >> 4
    k = offset & 15
    cb[15] = block & 0xFF
    cb[14] = (block >> 8) & 0xFF
    cb[13] = (block >> 16) & 0xFF
    cb[12] = (block >> 24) & 0xFF
    aes.encrypt(ctr, ks)
    i = start
    while i < end:
        if k == 16:
            block += 1
            cb[15] = block & 0xFF
            cb[14] = (block >> 8) & 0xFF
            cb[13] = (block >> 16) & 0xFF
            aes.encrypt(ctr, ks)
            k = 0
        b[i] = b[i] ^ s[k]
        i += 1
        k += 1


@micropython.viper
def varint_into(src, count: int, out, pos: int, limit: int) -> int:
    # Delta-zigzag-varint of src[0:count] (an array("i")) at out[pos:limit]
    # (limit < 0: to its end); returns the end, or -1 - i if out had no
    # room for sample i (5 bytes, the most one takes). Two int32 samples
    # differ by up to 33 bits, past a 32-bit viper int: the difference is
    # taken as its magnitude less its sign (u, 32 bits unsigned) and the
    # sign s, whose zigzag (u << 1) | s is written 6 bits first, then 7 a
    # byte from u >> 6.
    s = ptr32(src)
    o = ptr8(out)
    if limit < 0:
        limit = int(len(out))
    end = limit - 5
    # Shifted at run time, not folded by the compiler into constants too
    # big for a 32-bit port's small ints: bit 31, the upper half of a word
    # (0 on a 32-bit port, where no sign needs extending), the low 32 bits.
    one = 1
    sign_bit = (one << 15) << 16
    hi = ((0 - one) << 16) << 16
    mask = uint(((one << 16) << 16) - one)
    prev = 0
    i = 0
    while i < count:
        if pos > end:
            return -1 - i
        v = s[i]
        if v & sign_bit:
            v = v | hi
        if v >= prev:
            u = (uint(v) - uint(prev)) & mask
            b = (u & 0x3F) << 1
        else:
            u = (uint(prev) - uint(v) - uint(1)) & mask
            b = ((u & 0x3F) << 1) | 1
        prev = v
        u = u >> 6
        while u:
            o[pos] = b | 0x80
            pos += 1
            b = u & 0x7F
            u = u >> 7
        o[pos] = b
        pos += 1
        i += 1
    return pos


@micropython.viper
def b64_decode_in_place(buf, start: int, end: int) -> int:
    # Standard padded base64 in buf[start:end] decoded to buf[0:] (the
    # output never overtakes the input); returns the decoded length, or -1
    # if it is not exactly that: length a multiple of 4, the alphabet only,
    # "=" only as the last one or two characters. (link.py has the same in
    # Python for CPython.)
    b = ptr8(buf)
    n = end - start
    if n <= 0 or n & 3:
        return -1
    w = 0
    i = start
    while i < end:
        acc = 0
        pad = 0
        k = 0
        while k < 4:
            c = b[i + k]
            k += 1
            if c == 61 and i + 4 == end and k >= 3:  # "=" in the last two places
                pad += 1
                acc = acc << 6
                continue
            if pad:
                return -1
            if c >= 65 and c <= 90:
                v = c - 65
            elif c >= 97 and c <= 122:
                v = c - 71
            elif c >= 48 and c <= 57:
                v = c + 4
            elif c == 43:
                v = 62
            elif c == 47:
                v = 63
            else:
                return -1
            acc = (acc << 6) | v
        b[w] = (acc >> 16) & 0xFF
        if pad < 2:
            b[w + 1] = (acc >> 8) & 0xFF
        if pad < 1:
            b[w + 2] = acc & 0xFF
        w += 3 - pad
        i += 4
    return w


@micropython.viper
def crc32_ok(buf, m: int) -> int:
    # Whether buf[m:m+4] is the CRC-32 (ISO-HDLC, as binascii.crc32),
    # little-endian, of buf[:m]; computed bit by bit (a downlink message is
    # ~100 bytes) in 32-bit words (masked on a 64-bit port).
    b = ptr8(buf)
    one = uint(1)
    mask = ((one << 16) << 16) - one
    poly = (uint(0xEDB8) << 16) | uint(0x8320)
    crc = mask
    i = 0
    while i < m:
        crc = (crc ^ uint(b[i])) & mask
        j = 0
        while j < 8:
            if crc & 1:
                crc = ((crc >> 1) ^ poly) & mask
            else:
                crc = crc >> 1
            j += 1
        i += 1
    crc = (crc ^ mask) & mask
    got = uint(b[m]) | (uint(b[m + 1]) << 8) | (uint(b[m + 2]) << 16) | (uint(b[m + 3]) << 24)
    if (got & mask) == crc:
        return 1
    return 0


@micropython.viper
def move_down(buf, dst: int, src: int, n: int):
    # buf[src:src+n] to buf[dst:dst+n], dst < src (the regions may overlap).
    b = ptr8(buf)
    i = 0
    while i < n:
        b[dst + i] = b[src + i]
        i += 1


@micropython.viper
def crc32_into(buf, start: int, n: int, table, out):
    # The CRC-32 (ISO-HDLC, as binascii.crc32) of buf[start:start+n] into
    # out[0:4], little-endian: written as bytes, it never becomes an int
    # above 2**30 (a heap object on a 32-bit port, which binascii.crc32's
    # result is three times in four). A nibble at a time; table: its 16
    # entries (link.CRC_NIBBLES, array("I")).
    b = ptr8(buf)
    t = ptr32(table)
    o = ptr8(out)
    one = uint(1)
    mask = ((one << 16) << 16) - one
    crc = mask
    i = start
    end = start + n
    while i < end:
        crc = crc ^ uint(b[i])
        crc = (crc >> 4) ^ (uint(t[crc & 15]) & mask)
        crc = (crc >> 4) ^ (uint(t[crc & 15]) & mask)
        i += 1
    crc = crc ^ mask
    o[0] = crc & 0xFF
    o[1] = (crc >> 8) & 0xFF
    o[2] = (crc >> 16) & 0xFF
    o[3] = (crc >> 24) & 0xFF


@micropython.viper
def copy_into(dst, dpos: int, src, spos: int, n: int):
    # dst[dpos:dpos+n] = src[spos:spos+n] with no slice made (distinct buffers).
    d = ptr8(dst)
    s = ptr8(src)
    i = 0
    while i < n:
        d[dpos + i] = s[spos + i]
        i += 1
