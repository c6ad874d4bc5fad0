# Simulated boards: the unmodified firmware under the MicroPython unix port,
# one process per board, each on a pseudo-terminal as a USB board would be.
