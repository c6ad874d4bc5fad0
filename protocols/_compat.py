# Shims so this package runs unmodified on MicroPython and CPython.
# Nothing here does I/O or reads a clock.

__all__ = ["TYPE_CHECKING", "const", "equal_ct"]

TYPE_CHECKING = False  # type checkers take this as true; MicroPython has no typing module
if TYPE_CHECKING:

    def const(value: int) -> int: ...

else:
    try:
        from micropython import const
    except ImportError:  # CPython

        def const(value):
            return value


try:
    from hmac import compare_digest as _compare_digest  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # MicroPython has no hmac module
    _compare_digest = None  # type: ignore[assignment, unused-ignore]


def equal_ct(a: bytes, b: bytes) -> bool:
    # Constant-time comparison of two MACs (no early exit on the first
    # differing byte), so a forger learns nothing from the time it takes.
    if _compare_digest is not None:
        return bool(_compare_digest(a, b))
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0
