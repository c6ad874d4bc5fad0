"""MicroPython's raw REPL over a serial port, as mpremote drives it.

Ctrl-C (twice) stops whatever runs (our firmware stops streaming and
leaves the REPL), Ctrl-A enters the raw REPL, code sent and ended by
Ctrl-D runs, and the board answers "OK", the output, 0x04, the error
output, 0x04, then ">". Ctrl-B leaves the raw REPL.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable

import serial

from agent.errors import PulsebridgeError
from agent.transports.serial import open_port

CTRL_A, CTRL_B, CTRL_C, CTRL_D = b"\x01", b"\x02", b"\x03", b"\x04"
# Bytes of a file sent per raw-REPL command: small enough for a board's
# input buffer and heap (base64 makes 1.33x that).
CHUNK = 1024


class ReplError(PulsebridgeError):
    """The board did not answer as a MicroPython REPL does, or code failed on it."""

    def __init__(self, message: str, port: str, output: str = "") -> None:
        super().__init__(message)
        self.port = port
        self.output = output


# A port another process holds (pyserial's exclusive lock) is tried again for
# this long: the hub agent looks at a newly plugged USB port for up to 10 s
# (agent.links.IDENTIFY_S) and lets it go when no registered board speaks.
BUSY_WAIT_S = 15.0
BUSY_RETRY_S = 0.5


def _busy(e: Exception) -> bool:
    return isinstance(e, serial.SerialException) and "exclusively lock" in str(e)


class RawRepl:
    """Raises ReplError naming the port if it cannot be opened: it does not
    exist, or another process still holds it after busy_wait_s
    (on_busy(message) is called once, when that wait starts)."""

    def __init__(self, port: str, baudrate: int = 115200, timeout_s: float = 10.0, busy_wait_s: float = BUSY_WAIT_S,
                 on_busy: Callable[[str], None] | None = None) -> None:
        self.port_name = port
        self.timeout_s = timeout_s
        deadline = time.monotonic() + busy_wait_s
        while True:
            try:
                self.port = open_port(port, baudrate, timeout_s=0.05)
                break
            except (serial.SerialException, OSError) as e:
                if not _busy(e) or time.monotonic() >= deadline:
                    why = " (another program holds it: is the hub agent using this board?)" if _busy(e) else ""
                    raise ReplError("cannot open %s: %s%s" % (port, e, why), port) from e
                if on_busy is not None:
                    on_busy("%s is in use by another program; waiting up to %.0f s for it" % (port, busy_wait_s))
                    on_busy = None
                time.sleep(BUSY_RETRY_S)
        self.in_raw = False

    def close(self) -> None:
        if self.in_raw:
            try:
                self.leave()
            except (ReplError, OSError, serial.SerialException):
                pass
        self.port.close()

    def _read_until(self, marker: bytes, timeout_s: float | None = None) -> bytes:
        end = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        buf = b""
        while time.monotonic() < end:
            buf += self.port.read(4096)
            if marker in buf:
                return buf
        raise ReplError("no %r from %s within %.0f s" % (marker, self.port_name, timeout_s or self.timeout_s),
                        self.port_name, buf.decode("utf-8", "replace")[-400:])

    def interrupt(self) -> bytes:
        """Reaches the REPL prompt, stopping a running program (streaming firmware) if
        need be; returns what the board printed meanwhile."""
        self.port.write(b"\r")
        try:
            return self._read_until(b">>> ", 1)
        except ReplError:
            pass
        self.port.write(CTRL_C)
        time.sleep(0.2)
        self.port.write(CTRL_C)
        try:
            return self._read_until(b">>> ", 5)
        except ReplError as e:
            raise ReplError("no MicroPython REPL on %s (no prompt after Ctrl-C): is MicroPython installed? "
                            "(--flash FIRMWARE.bin writes it)" % self.port_name, self.port_name, e.output) from None

    def enter(self) -> None:
        self.interrupt()
        self.port.write(b"\r" + CTRL_A)
        self._read_until(b"raw REPL; CTRL-B to exit\r\n>", 5)
        self.in_raw = True

    def leave(self) -> None:
        self.port.write(CTRL_B)
        self._read_until(b">>> ", 5)
        self.in_raw = False

    def exec(self, code: str, timeout_s: float | None = None) -> str:
        """Runs code on the board; returns its output; raises ReplError with the board's traceback."""
        if not self.in_raw:
            self.enter()
        self.port.write(code.encode() + CTRL_D)
        head = self._read_until(b"OK", timeout_s)
        rest = head[head.index(b"OK") + 2:]
        while rest.count(CTRL_D) < 2:
            rest += self._read_until(CTRL_D, timeout_s)
        out, err, tail = rest.split(CTRL_D)[0:3]
        if b">" not in tail:
            self._read_until(b">", 2)
        if err:
            raise ReplError("the board raised: %s" % err.decode("utf-8", "replace").strip().splitlines()[-1],
                            self.port_name, err.decode("utf-8", "replace"))
        return out.decode("utf-8", "replace")

    def eval(self, expr: str) -> str:
        return self.exec("print(repr(%s))" % expr).strip()

    def put(self, path: str, data: bytes) -> None:
        """Writes a file on the board (through a temporary name, then rename) and checks its SHA-256."""
        tmp = path + ".part"
        self.exec("import binascii, os\ntry:\n os.mkdir(%r)\nexcept OSError:\n pass\nf = open(%r, 'wb')" % (
            _parent(path) or ".", tmp)) if _parent(path) else self.exec("import binascii, os\nf = open(%r, 'wb')" % tmp)
        for i in range(0, len(data), CHUNK):
            self.exec("f.write(binascii.a2b_base64(%r))" % base64.b64encode(data[i:i + CHUNK]).decode())
        self.exec("f.close()")
        got = self.exec("import hashlib, binascii\nh = hashlib.sha256()\nf = open(%r, 'rb')\nwhile True:\n"
                        " b = f.read(512)\n if not b:\n  break\n h.update(b)\nf.close()\n"
                        "print(binascii.hexlify(h.digest()).decode())" % tmp).strip()
        want = hashlib.sha256(data).hexdigest()
        if got != want:
            self.exec("os.remove(%r)" % tmp)
            raise ReplError("checksum mismatch writing %s (board %s, expected %s)" % (path, got[:12], want[:12]),
                            self.port_name)
        self.exec("os.rename(%r, %r)" % (tmp, path))

    def exists(self, path: str) -> bool:
        return self.exec("import os\ntry:\n os.stat(%r)\n print(1)\nexcept OSError:\n print(0)" % path).strip() == "1"

    def remove(self, path: str) -> None:
        self.exec("import os\ntry:\n os.remove(%r)\nexcept OSError:\n pass" % path)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""
