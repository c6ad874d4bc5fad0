# Ed25519 verification and SHA-512 (protocols/ed25519.py, _sha512.py) on both
# interpreters, against RFC 8032's test vectors (7.1, TEST 1 and 2) and the
# FIPS 180-4 example, as literal bytes.
from protocols import _sha512, ed25519
from tests.shared.check import raises, unhex

PUB1 = unhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
SIG1 = unhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")  # noqa: E501
PUB2 = unhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
SIG2 = unhex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")  # noqa: E501


def test_sha512_fips_example() -> None:
    assert _sha512.sha512(b"abc") == unhex(
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")  # noqa: E501
    # the padding's edges: 111 and 112 bytes fill one and two blocks
    assert _sha512.sha512(bytes(111)) != _sha512.sha512(bytes(112))


def test_rfc8032_vectors_verify() -> None:
    ed25519.verify(PUB1, b"", SIG1)
    ed25519.verify(PUB2, b"\x72", SIG2)


def test_any_change_is_refused() -> None:
    e = raises(ed25519.SignatureError, ed25519.verify, PUB2, b"\x73", SIG2)
    assert e.reason == "bad_signature"  # type: ignore[attr-defined]
    bad = bytearray(SIG2)
    bad[5] ^= 1
    assert raises(ed25519.SignatureError, ed25519.verify, PUB2, b"\x72", bytes(bad)).reason == "bad_signature"  # type: ignore[attr-defined]  # noqa: E501
    assert raises(ed25519.SignatureError, ed25519.verify, PUB1, b"\x72", SIG2).reason == "bad_signature"  # type: ignore[attr-defined]  # noqa: E501
    # S not below the group order (a malleable signature) is refused
    big = bytearray(SIG1)
    big[63] |= 0xF0
    assert raises(ed25519.SignatureError, ed25519.verify, PUB1, b"", bytes(big)).reason == "bad_signature"  # type: ignore[attr-defined]  # noqa: E501
    assert raises(ed25519.SignatureError, ed25519.verify, PUB1, b"", SIG1[:63]).reason == "malformed"  # type: ignore[attr-defined]  # noqa: E501


def test_a_key_off_the_curve_is_refused() -> None:
    off = bytearray(PUB1)
    off[0] ^= 2
    for key in (bytes(off), b"\xff" * 32):
        try:
            ed25519.verify(key, b"", SIG1)
        except ed25519.SignatureError as e:
            assert e.reason in ("bad_key", "bad_signature")
        else:
            raise AssertionError("verified under %r" % key)


def test_the_check_runs_in_small_slices() -> None:
    g = ed25519.verify_steps(PUB2, b"\x72", SIG2)
    n = 0
    for _ in g:  # type: ignore[attr-defined]
        n += 1
    assert n > 300, n  # one ladder bit, 8 squarings or 2 SHA-512 rounds a slice


def test_the_written_out_constants_are_rfc8032s() -> None:
    # Derived again here as RFC 8032 (5.1) defines them; the module takes them as literals
    # (computing them at import took seven modular powers: 0.56 s of an ESP32's time).
    p = 2**255 - 19
    assert ed25519.P == p
    d = -121665 * pow(121666, p - 2, p) % p
    assert ed25519._D == d and ed25519._D2 == 2 * d % p
    assert ed25519._SQRT_M1 == pow(2, (p - 1) // 4, p)
    y = 4 * pow(5, p - 2, p) % p
    x = 15112221349535400772501151409588531511454012693041857206046113283949847762202
    assert ed25519._BY == y and ed25519._BX == x
    assert (-x * x + y * y - 1 - d * x * x * y * y) % p == 0  # on the curve: -x^2 + y^2 = 1 + d x^2 y^2
    assert x & 1 == 0  # B's x is the even root (RFC 8032: "the unique point whose x is positive")
    assert ed25519._BASE == (x, y, 1, x * y % p)
