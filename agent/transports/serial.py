"""Boards on USB serial, through pyserial, driven by the asyncio loop.

The port is opened by pyserial (which sets the line up: raw, 8N1) and then
read without blocking from the event loop. Uplink bytes go through the
COBS deframer; what is not a frame (console text, line noise) is counted
and the console text kept for the log. Downlink messages go out as text
lines (protocols.hub_link.downlink_line).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import serial

from agent.transports.base import Transport, TransportClosed, TransportError
from protocols import hub_link, link

log = logging.getLogger(__name__)

# Uplink messages waiting for the agent: about 30 s of one board's frames.
# Beyond it messages are dropped and counted ("overflow"), never left
# unread in the port: an ESP32-S3's native USB CDC blocks the board's
# writes when the host stops reading. Nothing is lost by the drop: the
# board keeps every frame until an ack covers it, and resends.
QUEUE_DEPTH = 64
_READ_CHUNK = 4096
# Console lines kept from a board, for the log and the status page.
CONSOLE_LINES = 50


def open_port(port: str, baudrate: int, timeout_s: float | None, write_timeout_s: float | None = None) -> serial.Serial:
    """Opens a board's serial port without resetting the board or silencing it.

    On an ESP32 board a USB bridge (CP2102, CH340) drives EN and GPIO0
    through two transistors from DTR and RTS: EN is pulled low (reset) while
    RTS is asserted and DTR is not; GPIO0 low (download mode, at the next
    reset) while DTR is asserted and RTS is not; with both asserted or both
    deasserted neither moves. Linux asserts both lines, in one request, when
    a port opens (and deasserts both when it closes). So the lines are set
    to what Linux has just done, both asserted, before open(): pyserial's
    own requests then change nothing. Asking for both deasserted instead
    would reset the board: pyserial applies DTR before RTS, passing through
    "RTS only". Asserted DTR also matters to boards on native USB (ESP32-S3
    with TinyUSB CDC): MicroPython writes to the host only while TinyUSB
    reports it connected, which is DTR asserted. Raises
    serial.SerialException or OSError.
    """
    ser = serial.Serial(None, baudrate, timeout=timeout_s, write_timeout=write_timeout_s, exclusive=True)
    ser.port = port
    ser.dtr = True  # as the kernel sets it at open: no request changes a line
    ser.rts = True
    ser.open()
    return ser


def port_busy(e: Exception) -> bool:
    """Whether open_port failed because another program holds the port (its exclusive lock)."""
    return isinstance(e, serial.SerialException) and "exclusively lock" in str(e)


def open_failure(e: Exception) -> str:
    """Why open_port failed, in an operator's words: pyserial's named the port three times with two
    errnos ("[Errno 2] could not open port P: [Errno 2] No such file or directory: 'P'"), or told a file
    that is no serial port as "Could not configure port: (25, 'Inappropriate ioctl for device')"."""
    if port_busy(e):
        return "another program holds it"
    code = getattr(e, "errno", None)
    if code == errno.ENOENT:
        return "no such port (is the board plugged in? ls /dev/serial/by-id/ names the boards plugged in)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied (is this user in the dialout group?)"
    if code == errno.ENOTTY or "Inappropriate ioctl for device" in str(e):
        return "not a serial port (a board's port is a device: /dev/ttyACM0, /dev/serial/by-id/...)"
    return str(e)


class SerialTransport(Transport):
    # A pty's or a USB CDC port's buffer (the host's side and the board's): 4 kB.
    downlink_buffer_bytes = 4096

    def __init__(self, port: str, baudrate: int = 115200) -> None:
        self.port = port
        self.baudrate = baudrate
        self.name = "serial:" + port
        self.discarded: dict[str, int] = {}
        self.console: list[str] = []
        self._ser: serial.Serial | None = None
        self._deframer = hub_link.StreamDeframer()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH + 1)  # + the end-of-link marker
        self._write_lock = asyncio.Lock()  # one line at a time: two writers' lines never interleave
        self._closed = False
        self._why = ""  # why the port closed under us, for the session's end
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        try:
            self._ser = open_port(self.port, self.baudrate, timeout_s=0, write_timeout_s=2)
        except (serial.SerialException, OSError) as e:
            raise TransportError("cannot open %s: %s" % (self.port, open_failure(e)), self.name) from e
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._ser.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self._ser is not None
        try:
            data = os.read(self._ser.fileno(), _READ_CHUNK)
        except OSError as e:  # EIO: the port hung up under us
            log.info("%s: read failed (%s): link closed", self.name, e)
            self._why = "hung up (%s): unplugged, or the board lost power" % (e.strerror or e)
            data = b""
        if not data:
            self._stop_reading()
            self._closed = True
            self._why = self._why or "hung up (end of file): unplugged, or the board lost power"
            self._queue.put_nowait(None)  # its place is kept
            return
        self._deframer.feed(data)
        while (ev := self._deframer.next_event()) is not None:
            if isinstance(ev, link.Frame):
                if self._queue.qsize() >= QUEUE_DEPTH:
                    self.discarded["overflow"] = self.discarded.get("overflow", 0) + 1
                else:
                    self._queue.put_nowait(ev.data)
            else:
                self.discarded[ev.reason] = self.discarded.get(ev.reason, 0) + 1
                if ev.reason == "noise":
                    self._keep_console(ev.sample)

    def _keep_console(self, sample: bytes) -> None:
        for line in sample.decode("ascii", "replace").splitlines():
            if line.strip():
                self.console.append(line.strip())
        del self.console[:-CONSOLE_LINES]

    def _stop_reading(self) -> None:
        if self._loop is not None and self._ser is not None:
            self._loop.remove_reader(self._ser.fileno())

    def console_last(self) -> str:
        """The console text the board printed since its last frame, or so much of it as the
        deframer holds (up to MAX_COBS_BODY bytes): no 0x00 has ended it, so it is not in
        `console` yet, and after a board's last words (its stop summary) may never be."""
        return self._deframer.held().decode("ascii", "replace")

    def queued(self) -> int:
        """Messages read from the port that receive() has not handed on yet."""
        return self._queue.qsize()

    async def receive(self) -> bytes:
        if self._ser is None:
            raise TransportClosed("not open", self.name)
        if self._closed and self._queue.empty():
            raise TransportClosed("%s closed: %s" % (self.port, self._why), self.name)
        msg = await self._queue.get()
        if msg is None:
            raise TransportClosed("%s closed: %s" % (self.port, self._why), self.name)
        return msg

    async def send(self, message: bytes) -> None:
        if self._ser is None:
            raise TransportClosed("not open", self.name)
        line = hub_link.downlink_line(message)
        try:
            async with self._write_lock:
                # The port is non-blocking (pyserial opens it so): a line the port's buffer takes
                # whole (an ack, ~100 bytes) is written here, on the loop, without a thread's
                # round trip for each; what it does not take goes through pyserial's write on a
                # thread, whose write_timeout bounds a board that does not read.
                ser = self._ser
                if ser is None:
                    raise TransportClosed("%s closed" % self.port, self.name)
                try:
                    written = os.write(ser.fileno(), line)
                except BlockingIOError:
                    written = 0
                if written < len(line):
                    await asyncio.to_thread(ser.write, line[written:])
        except (serial.SerialException, OSError, ValueError) as e:  # ValueError: closed meanwhile
            raise TransportClosed("write to %s failed: %s" % (self.port, e), self.name) from e

    async def write_raw(self, data: bytes) -> None:
        """Bytes as they are (Ctrl-C, REPL input): for tools, not for messages."""
        if self._ser is None:
            raise TransportClosed("not open", self.name)
        await asyncio.to_thread(self._ser.write, data)

    async def close(self) -> None:
        if self._ser is not None:
            self._stop_reading()
            self._ser.close()
            self._ser = None
