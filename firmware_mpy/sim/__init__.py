# Simulation board support for the MicroPython unix port: register-level
# models of the sensor chips behind fake buses, a clock, a fake radio. It
# stands in for the hardware; it is never installed on a board.
