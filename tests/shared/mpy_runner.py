# Runs the test_* functions of the given modules under the MicroPython unix
# port, as pytest would, and prints one line per test and a closing count.
# Usage: micropython tests/shared/mpy_runner.py tests.shared.test_vectors ...
import sys


def main() -> int:
    passed = failed = 0
    for name in sys.argv[1:]:
        mod = __import__(name, None, None, ("_",))
        for attr in sorted(dir(mod)):
            if not attr.startswith("test_"):
                continue
            fn = getattr(mod, attr)
            try:
                fn()
            except Exception as e:
                failed += 1
                print("FAIL %s.%s: %s: %s" % (name, attr, type(e).__name__, e))
                sys.print_exception(e)  # type: ignore[attr-defined]
            else:
                passed += 1
                print("PASS %s.%s" % (name, attr))
    print("mpy: %d passed, %d failed" % (passed, failed))
    return 1 if failed or not passed else 0


sys.exit(main())
