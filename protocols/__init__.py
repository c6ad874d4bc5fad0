# The pulsebridge wire format: a sans-I/O codec shared unmodified by the
# board firmware (MicroPython) and the hub agent (CPython). See SPEC.md.
