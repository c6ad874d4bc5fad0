# mypy: ignore-errors
# SHA-256 (FIPS 180-4) for the board's HMACs (protocols/cose.py), as native
# code (MicroPython's viper emitter) that allocates nothing: hashlib on
# MicroPython makes a new object per hash and a new bytes per digest (~450
# bytes of garbage per HMAC, four HMACs a second, which the board's GC then
# collects in tens of milliseconds while a sensor FIFO fills). MicroPython
# only: on CPython `import micropython` fails and cose.py uses hashlib (the
# same tags: tests/shared/test_properties.py holds both to RFC 2104 over
# hashlib). Installed as source (agent/provision/build.py), so the board compiles
# it for its own CPU; a module of its own, so the board's compiler never
# holds this and protocols/_viper.py in RAM at once.
#
# st: array("I") of 8 words, the chaining state; blk: a 64-byte bytearray
# holding `used` bytes of the block not yet hashed. sha256_into and
# hmac_into take the object holding their buffers (h: its _st, _blk, _out;
# an HMAC key's also _ist, _ost, _prefix, _hbuf) in place of them: a
# caller's bytecode frame then keeps within the VM's 11 words, so it is
# not taken from the heap at every call (README, "call frames"). On a 64-bit port the words are
# masked to 32 bits (m); on a 32-bit one the mask is all ones and uint
# arithmetic wraps by itself.
import array

import micropython

# The initial state and the round constants (FIPS 180-4, 5.3.3 and 4.2.2),
# big-endian: bytes constants take no more RAM than their bytes.
IV = (
    b"\x6a\x09\xe6\x67\xbb\x67\xae\x85\x3c\x6e\xf3\x72\xa5\x4f\xf5\x3a"
    b"\x51\x0e\x52\x7f\x9b\x05\x68\x8c\x1f\x83\xd9\xab\x5b\xe0\xcd\x19")
_K = (
    b"\x42\x8a\x2f\x98\x71\x37\x44\x91\xb5\xc0\xfb\xcf\xe9\xb5\xdb\xa5"
    b"\x39\x56\xc2\x5b\x59\xf1\x11\xf1\x92\x3f\x82\xa4\xab\x1c\x5e\xd5"
    b"\xd8\x07\xaa\x98\x12\x83\x5b\x01\x24\x31\x85\xbe\x55\x0c\x7d\xc3"
    b"\x72\xbe\x5d\x74\x80\xde\xb1\xfe\x9b\xdc\x06\xa7\xc1\x9b\xf1\x74"
    b"\xe4\x9b\x69\xc1\xef\xbe\x47\x86\x0f\xc1\x9d\xc6\x24\x0c\xa1\xcc"
    b"\x2d\xe9\x2c\x6f\x4a\x74\x84\xaa\x5c\xb0\xa9\xdc\x76\xf9\x88\xda"
    b"\x98\x3e\x51\x52\xa8\x31\xc6\x6d\xb0\x03\x27\xc8\xbf\x59\x7f\xc7"
    b"\xc6\xe0\x0b\xf3\xd5\xa7\x91\x47\x06\xca\x63\x51\x14\x29\x29\x67"
    b"\x27\xb7\x0a\x85\x2e\x1b\x21\x38\x4d\x2c\x6d\xfc\x53\x38\x0d\x13"
    b"\x65\x0a\x73\x54\x76\x6a\x0a\xbb\x81\xc2\xc9\x2e\x92\x72\x2c\x85"
    b"\xa2\xbf\xe8\xa1\xa8\x1a\x66\x4b\xc2\x4b\x8b\x70\xc7\x6c\x51\xa3"
    b"\xd1\x92\xe8\x19\xd6\x99\x06\x24\xf4\x0e\x35\x85\x10\x6a\xa0\x70"
    b"\x19\xa4\xc1\x16\x1e\x37\x6c\x08\x27\x48\x77\x4c\x34\xb0\xbc\xb5"
    b"\x39\x1c\x0c\xb3\x4e\xd8\xaa\x4a\x5b\x9c\xca\x4f\x68\x2e\x6f\xf3"
    b"\x74\x8f\x82\xee\x78\xa5\x63\x6f\x84\xc8\x78\x14\x8c\xc7\x02\x08"
    b"\x90\xbe\xff\xfa\xa4\x50\x6c\xeb\xbe\xf9\xa3\xf7\xc6\x71\x78\xf2")
_W = array.array("I", bytes(256))  # the message schedule every hash shares (the board runs one at a time)


@micropython.viper
def _sha256_block(st, blk):
    s = ptr32(st)
    W = ptr32(_W)
    K = ptr8(_K)
    b = ptr8(blk)
    one = uint(1)
    m = ((one << 16) << 16) - one
    i = 0
    while i < 16:
        j = 4 * i
        W[i] = (uint(b[j]) << 24) | (uint(b[j + 1]) << 16) | (uint(b[j + 2]) << 8) | uint(b[j + 3])
        i += 1
    while i < 64:
        x = uint(W[i - 15]) & m
        y = uint(W[i - 2]) & m
        s0 = ((x >> 7) | (x << 25)) ^ ((x >> 18) | (x << 14)) ^ (x >> 3)
        s1 = ((y >> 17) | (y << 15)) ^ ((y >> 19) | (y << 13)) ^ (y >> 10)
        W[i] = (uint(W[i - 16]) + s0 + uint(W[i - 7]) + s1) & m
        i += 1
    a = uint(s[0]) & m
    bb = uint(s[1]) & m
    c = uint(s[2]) & m
    d = uint(s[3]) & m
    e = uint(s[4]) & m
    f = uint(s[5]) & m
    g = uint(s[6]) & m
    h = uint(s[7]) & m
    i = 0
    while i < 64:
        j = 4 * i
        kw = (uint(K[j]) << 24) | (uint(K[j + 1]) << 16) | (uint(K[j + 2]) << 8) | uint(K[j + 3])
        t1 = (h + ((((e >> 6) | (e << 26)) ^ ((e >> 11) | (e << 21)) ^ ((e >> 25) | (e << 7))) & m)
              + ((e & f) ^ ((e ^ m) & g)) + kw + (uint(W[i]) & m)) & m
        t2 = (((((a >> 2) | (a << 30)) ^ ((a >> 13) | (a << 19)) ^ ((a >> 22) | (a << 10))) & m)
              + ((a & bb) ^ (a & c) ^ (bb & c))) & m
        h = g
        g = f
        f = e
        e = (d + t1) & m
        d = c
        c = bb
        bb = a
        a = (t1 + t2) & m
        i += 1
    s[0] = (uint(s[0]) + a) & m
    s[1] = (uint(s[1]) + bb) & m
    s[2] = (uint(s[2]) + c) & m
    s[3] = (uint(s[3]) + d) & m
    s[4] = (uint(s[4]) + e) & m
    s[5] = (uint(s[5]) + f) & m
    s[6] = (uint(s[6]) + g) & m
    s[7] = (uint(s[7]) + h) & m


@micropython.viper
def sha256_copy(dst, src):
    # The 8-word state src into dst.
    d = ptr32(dst)
    s = ptr32(src)
    i = 0
    while i < 8:
        d[i] = s[i]
        i += 1


@micropython.viper
def sha256_start(st):
    # The initial state into st.
    d = ptr32(st)
    v = ptr8(IV)
    i = 0
    while i < 8:
        d[i] = (uint(v[4 * i]) << 24) | (uint(v[4 * i + 1]) << 16) | (uint(v[4 * i + 2]) << 8) | uint(v[4 * i + 3])
        i += 1


@micropython.viper
def sha256_update(st, blk, used: int, data, start: int, end: int) -> int:
    # Hashes data[start:end]; returns how many bytes blk now holds.
    src = ptr8(data)
    b = ptr8(blk)
    i = start
    while i < end:
        b[used] = src[i]
        used += 1
        i += 1
        if used == 64:
            _sha256_block(st, blk)
            used = 0
    return used


@micropython.viper
def sha256_final(st, blk, used: int, total: int, out):
    # Pads (total: bytes hashed in all, below 2^28), hashes the last block(s)
    # and writes the 32-byte digest to out.
    b = ptr8(blk)
    b[used] = 0x80
    used += 1
    if used > 56:
        while used < 64:
            b[used] = 0
            used += 1
        _sha256_block(st, blk)
        used = 0
    while used < 60:
        b[used] = 0
        used += 1
    bits = total << 3
    b[60] = (bits >> 24) & 0xFF
    b[61] = (bits >> 16) & 0xFF
    b[62] = (bits >> 8) & 0xFF
    b[63] = bits & 0xFF
    _sha256_block(st, blk)
    s = ptr32(st)
    o = ptr8(out)
    i = 0
    while i < 8:
        v = uint(s[i])
        o[4 * i] = (v >> 24) & 0xFF
        o[4 * i + 1] = (v >> 16) & 0xFF
        o[4 * i + 2] = (v >> 8) & 0xFF
        o[4 * i + 3] = v & 0xFF
        i += 1


@micropython.viper
def sha256_into(h, data, start: int, n: int):
    # The SHA-256 of data[start:start+n] into h._out (32 bytes), hashed in
    # h._st and h._blk.
    st = h._st
    blk = h._blk
    sha256_start(st)
    used = int(sha256_update(st, blk, 0, data, start, start + n))
    sha256_final(st, blk, used, n, h._out)


@micropython.viper
def hmac_into(k, data, start: int, n: int):
    # The COSE_Mac0 tag of the payload data[start:start+n] into k._out (32
    # bytes): HMAC-SHA256 (RFC 2104) over k._prefix, the payload's bstr head
    # (written to k._hbuf) and the payload, from the key's inner and outer
    # states k._ist and k._ost (each after its padded key's block).
    st = k._st
    blk = k._blk
    out = k._out
    p = k._prefix
    np = int(len(p))
    h = ptr8(k._hbuf)
    if n < 24:  # the CBOR head of a byte string of n bytes (RFC 8949, 3.1)
        h[0] = 0x40 | n
        nh = 1
    elif n < 0x100:
        h[0] = 0x58
        h[1] = n
        nh = 2
    elif n < 0x10000:
        h[0] = 0x59
        h[1] = (n >> 8) & 0xFF
        h[2] = n & 0xFF
        nh = 3
    else:
        h[0] = 0x5A
        h[1] = (n >> 24) & 0xFF
        h[2] = (n >> 16) & 0xFF
        h[3] = (n >> 8) & 0xFF
        h[4] = n & 0xFF
        nh = 5
    sha256_copy(st, k._ist)
    used = int(sha256_update(st, blk, 0, p, 0, np))
    used = int(sha256_update(st, blk, used, k._hbuf, 0, nh))
    used = int(sha256_update(st, blk, used, data, start, start + n))
    sha256_final(st, blk, used, 64 + np + nh + n, out)
    sha256_copy(st, k._ost)
    used = int(sha256_update(st, blk, 0, out, 0, 32))
    sha256_final(st, blk, used, 96, out)


@micropython.viper
def equal_at(a, b, at: int, n: int) -> int:
    # Whether a[0:n] equals b[at:at+n], in constant time (no early exit).
    x = ptr8(a)
    y = ptr8(b)
    diff = 0
    i = 0
    while i < n:
        diff = diff | (x[i] ^ y[at + i])
        i += 1
    if diff:
        return 0
    return 1
