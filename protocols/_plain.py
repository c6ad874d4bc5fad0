# The byte loops protocols/_viper.py runs as native code on a board, in
# plain Python, for CPython (and a port without the viper emitter): the
# same results (tests/shared runs both). A board never loads this module.
from protocols.link import crc32

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_decode_in_place(buf: bytearray, start: int, end: int) -> int:
    # Standard padded base64 in buf[start:end] decoded to buf[0:]; returns
    # the decoded length, or -1 if it is not exactly that (length a multiple
    # of 4, alphabet only, "=" only as the last one or two characters).
    n = end - start
    if n <= 0 or n % 4:
        return -1
    w = 0
    i = start
    while i < end:
        acc = 0
        pad = 0
        for k in range(4):
            c = buf[i + k]
            if c == 61 and i + 4 == end and k >= 2:  # "="
                pad += 1
                acc <<= 6
                continue
            if pad:
                return -1
            v = _ALPHABET.find(bytes((c,)))
            if v < 0:
                return -1
            acc = (acc << 6) | v
        buf[w] = acc >> 16
        if pad < 2:
            buf[w + 1] = (acc >> 8) & 0xFF
        if pad < 1:
            buf[w + 2] = acc & 0xFF
        w += 3 - pad
        i += 4
    return w


def crc_ok(buf: bytearray, m: int) -> bool:
    # Whether buf[m:m+4] is the CRC-32 (little-endian) of buf[:m].
    got = buf[m] | (buf[m + 1] << 8) | (buf[m + 2] << 16) | (buf[m + 3] << 24)
    return crc32(memoryview(buf)[:m]) == got
