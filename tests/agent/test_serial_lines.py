"""Opening a board's port never resets it: DTR/RTS as an ESP32 board's
auto-reset circuit sees them.

The port is a real pty, opened, configured and closed by pyserial; a pty has
no modem lines though (TIOCMBIS/TIOCMBIC get ENOTTY there), and no USB bridge
is attached here, so those two requests alone go to a fake bridge
(FakeModemLines) that keeps the lines' state, starting from what Linux does
itself at open: both lines asserted (tty_port_block_til_ready raises DTR and
RTS when the baud rate is not 0). Every other request reaches the pty.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import serial
import serial.serialposix

from agent.provision.rawrepl import RawRepl
from agent.transports.serial import SerialTransport, open_port

TIOCM_DTR = 0x002
TIOCM_RTS = 0x004


class FakeModemLines:
    """DTR/RTS as a USB bridge would drive them, and the classic ESP32
    auto-reset circuit (Espressif DevKitC): EN low while RTS is asserted
    and DTR is not; GPIO0 low while DTR is asserted and RTS is not."""

    def __init__(self) -> None:
        self.dtr = True
        self.rts = True
        self.history: list[tuple[bool, bool]] = [(True, True)]

    def apply(self, request: int, mask: int) -> None:
        on = request == termios.TIOCMBIS
        if mask & TIOCM_DTR:
            self.dtr = on
        if mask & TIOCM_RTS:
            self.rts = on
        self.history.append((self.dtr, self.rts))

    def resets(self) -> int:
        return sum(1 for dtr, rts in self.history if rts and not dtr)


@pytest.fixture
def pty_port() -> Iterator[str]:
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    yield name
    os.close(master)


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> FakeModemLines:
    state = FakeModemLines()
    real: Callable[..., Any] = fcntl.ioctl

    def ioctl(fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        if request in (termios.TIOCMBIS, termios.TIOCMBIC):
            state.apply(request, struct.unpack("I", arg)[0])
            return arg
        return real(fd, request, arg, *rest)

    monkeypatch.setattr(serial.serialposix.fcntl, "ioctl", ioctl)
    return state


def test_the_circuit_model_sees_the_reset_a_naive_open_causes(pty_port: str, lines: FakeModemLines) -> None:
    # Both lines asked deasserted before open(), as mpremote does: pyserial
    # applies DTR first, so the board sees "RTS only" for a moment: a reset.
    ser = serial.Serial(None, 115200, exclusive=True)
    ser.port = pty_port
    ser.dtr = False
    ser.rts = False
    ser.open()
    ser.close()
    assert lines.resets() == 1, lines.history


def test_open_port_never_toggles_a_line(pty_port: str, lines: FakeModemLines) -> None:
    ser = open_port(pty_port, 115200, timeout_s=0)
    try:
        # Both stay as Linux raised them at open: EN and GPIO0 high (a reset
        # meanwhile boots normally), DTR up for native-USB boards.
        assert set(lines.history) == {(True, True)}, lines.history
        assert (ser.dtr, ser.rts) == (True, True)  # as pyserial reports the port
    finally:
        ser.close()


def test_agent_serial_transport_opens_without_reset(pty_port: str, lines: FakeModemLines) -> None:
    async def scenario() -> None:
        t = SerialTransport(pty_port)
        await t.open()
        try:
                assert set(lines.history) == {(True, True)}, lines.history
        finally:
            await t.close()

    asyncio.run(scenario())


def test_provisioning_raw_repl_opens_without_reset(pty_port: str, lines: FakeModemLines) -> None:
    repl = RawRepl(pty_port, timeout_s=0.1)
    try:
        assert set(lines.history) == {(True, True)}, lines.history
    finally:
        repl.close()
