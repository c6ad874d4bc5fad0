# Tests that run unmodified under CPython (pytest) and under the MicroPython
# unix port (tests/mpy_runner.py): the proof that the shared code is shared.
