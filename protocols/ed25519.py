# Ed25519 signature verification (RFC 8032, section 5.1.7), pure Python for
# both interpreters: a board checks a firmware bundle's signature with it
# (once per update), where MicroPython has neither Ed25519 nor SHA-512.
# Verification only: signing happens on the vendor's release machine
# (`cryptography`), never on a board or a hub.
#
# The check is a generator (verify_steps) that does a bounded slice of the
# work per next() (one ladder bit, a few squarings of a modular power, 16
# rounds of SHA-512): the board runs one slice per loop iteration between
# sensor drains, so streaming never pauses for the whole check.
#
# Cofactorless check: encode([S]B - [k]A) == R, with S < L and A, R on the
# curve (decoding rejects non-canonical y); the group arithmetic uses
# extended twisted Edwards coordinates (RFC 8032, 5.1.4).

import hashlib

from protocols._compat import TYPE_CHECKING, const

if TYPE_CHECKING:
    from collections.abc import Generator

if not hasattr(hashlib, "sha512"):  # MicroPython: ours, imported now rather than inside a slice of a check
    from protocols import _sha512

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
# The curve's constants as RFC 8032 (5.1) gives them, written out: derived
# here (d = -121665/121666, sqrt(-1) = 2^((p-1)/4), the base point's y =
# 4/5 and its x) they took seven 255-bit modular powers at import, 0.56 s of
# an ESP32's time in one piece while a sensor FIFO that lasts 62 ms filled
# (tests/shared/test_ed25519.py derives them again).
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 16295367250680780974490674513165176452449235426866156013048779062215315747161
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
KEY_SIZE = const(32)
SIGNATURE_SIZE = const(64)
_SQUARINGS_PER_STEP = const(8)  # of a modular power, per slice


class SignatureError(Exception):
    # The signature does not verify, or a key or signature is malformed.
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _pow_steps(b: int, e: int) -> "Generator[None, None, int]":
    # A generator computing b^e mod P, most significant bit first, a few
    # squarings per slice; returns the power (yield from).
    r = 1
    i = 255  # every exponent here is below 2^256 (MicroPython's int has no bit_length)
    while i > 0 and not (e >> i) & 1:
        i -= 1
    n = 0
    while i >= 0:
        r = r * r % P
        if (e >> i) & 1:
            r = r * b % P
        i -= 1
        n += 1
        if n == _SQUARINGS_PER_STEP:
            n = 0
            yield
    return r


def _recover_x_steps(y: int, sign: int) -> "Generator[None, None, int | None]":
    # x from y and x's sign bit (RFC 8032, 5.1.3), in slices (yield from): x or None.
    if y >= P:
        return None
    inv = yield from _pow_steps((_D * y * y + 1) % P, P - 2)
    x2 = (y * y - 1) * inv % P
    if x2 == 0:
        return None if sign else 0
    x = yield from _pow_steps(x2, (P + 3) // 8)
    if (x * x - x2) % P:
        x = x * _SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


def _decode_steps(b: bytes) -> "Generator[None, None, tuple[int, int, int, int] | None]":
    # A point from its 32 bytes, in slices (yield from); None if it is none.
    y = int.from_bytes(b, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = yield from _recover_x_steps(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % P)


def _add(p: "tuple[int, int, int, int]", q: "tuple[int, int, int, int]") -> "tuple[int, int, int, int]":
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * _D2 * t2 % P
    d = z1 * 2 * z2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p: "tuple[int, int, int, int]") -> "tuple[int, int, int, int]":
    x1, y1, z1, _t = p
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    s = x1 + y1
    e = h - s * s % P
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


_BASE = (_BX, _BY, 1, _BX * _BY % P)
_ZERO = (0, 1, 1, 0)


def _sha512_steps(data: bytes) -> "Generator[None, None, bytes]":
    # SHA-512 of data (yield from): hashlib's where there is one, else ours in slices.
    if hasattr(hashlib, "sha512"):
        return bytes(hashlib.sha512(data).digest())
    digest = yield from _sha512.sha512_steps(data)
    return digest


def verify_steps(public_key: bytes, message: bytes, signature: bytes) -> "Generator[None, None, None]":
    # A generator: each next() does one slice of the check; it ends by
    # returning, or raises SignatureError. verify() runs it to the end.
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise SignatureError("a key is 32 bytes and a signature 64", "malformed")
    a = yield from _decode_steps(bytes(public_key))
    if a is None:
        raise SignatureError("the public key is not a point of the curve", "bad_key")
    r_bytes = bytes(signature[:32])
    r = yield from _decode_steps(r_bytes)
    if r is None:
        raise SignatureError("the signature's R is not a point of the curve", "bad_signature")
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        raise SignatureError("the signature's S is not below the group order", "bad_signature")
    h = yield from _sha512_steps(r_bytes + bytes(public_key) + bytes(message))
    k = int.from_bytes(h, "little") % L
    # [S]B + [k](-A), one shared ladder (Straus), most significant bit first, a bit per slice.
    neg_a = ((P - a[0]) % P, a[1], a[2], (P - a[3]) % P)
    both = _add(_BASE, neg_a)
    acc = _ZERO
    for i in range(255, -1, -1):
        acc = _double(acc)
        bs = (s >> i) & 1
        bk = (k >> i) & 1
        if bs and bk:
            acc = _add(acc, both)
        elif bs:
            acc = _add(acc, _BASE)
        elif bk:
            acc = _add(acc, neg_a)
        yield
    x, y, z, _t = acc
    zi = yield from _pow_steps(z, P - 2)
    x = x * zi % P
    y = y * zi % P
    if (y | ((x & 1) << 255)).to_bytes(32, "little") != r_bytes:
        raise SignatureError("the signature does not verify under this key", "bad_signature")


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    # Raises SignatureError unless signature is public_key's over message.
    for _ in verify_steps(public_key, message, signature):
        pass
