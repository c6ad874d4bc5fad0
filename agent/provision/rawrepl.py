"""MicroPython's raw REPL over a serial port, as mpremote drives it.

Ctrl-C (twice) stops whatever runs (our firmware stops streaming and
leaves the REPL), Ctrl-B leaves a raw REPL left half-way, Ctrl-A enters
the raw REPL. Code is sent in raw-paste mode where the board offers it
(Ctrl-E 'A' Ctrl-A answered "R\\x01" and a window size: the board asks
for each next window with 0x01, so a long file never overruns its input
buffer), else as plain raw-REPL input; Ctrl-D ends it. The board answers
the output, 0x04, the error output, 0x04, then ">". Ctrl-D on an empty
raw REPL is a soft reset: a fresh heap, main.py not run.

Why our own client rather than mpremote's transport: mpremote is a
command-line tool whose transport module is not a documented library API
(it moved from pyboard.py to transport_serial.py within two years), it
opens the port without pyserial's exclusive lock (the hub agent and the
provisioning tool would then share a board's port unknowingly) and
without our wait for a port the agent is letting go, and its errors carry
no step. The protocol itself is small and is tested against the real
MicroPython unix port (tests/sim/test_provision.py).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from collections.abc import Callable

import serial

from agent.errors import PulsebridgeError
from agent.transports.serial import open_failure, open_port, port_busy

CTRL_A, CTRL_B, CTRL_C, CTRL_D, CTRL_E = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"
RAW_PASTE_ENTER = CTRL_E + b"A" + CTRL_A
# Bytes of a file sent per raw-REPL command: small enough for a board's
# input buffer (plain raw REPL has no flow control) and heap (base64 makes
# 1.33x that, held twice while decoded).
CHUNK = 1024
# With raw-paste's flow control only the heap bounds a command.
CHUNK_PASTE = 4096
# A board's answer to a command is read up to this many bytes: what our
# scripts print is short, so anything longer is not the board we expect.
MAX_REPLY_BYTES = 64 * 1024


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
# How often a board that has not answered a Ctrl-C or a Ctrl-A is asked again.
ASK_AGAIN_S = 2.0
BUSY_RETRY_S = 0.5


def _open_failure(e: Exception) -> str:
    """open_failure's words, and who likely holds a busy port: the hub agent."""
    return open_failure(e) + (": is the hub agent using this board?" if port_busy(e) else "")


class RawRepl:
    """Raises ReplError naming the port if it cannot be opened: it does not
    exist, or another process still holds it after busy_wait_s
    (on_busy(message) is called once, when that wait starts)."""

    def __init__(self, port: str, baudrate: int = 115200, timeout_s: float = 10.0, busy_wait_s: float = BUSY_WAIT_S,
                 on_busy: Callable[[str], None] | None = None) -> None:
        self.port_name = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self.port = self._open(busy_wait_s, on_busy)
        self.in_raw = False
        self.raw_paste: bool | None = None  # None: not asked yet
        self._pending = b""  # read from the port, not yet taken

    def _open(self, busy_wait_s: float, on_busy: Callable[[str], None] | None) -> serial.Serial:
        deadline = time.monotonic() + busy_wait_s
        while True:
            try:
                return open_port(self.port_name, self.baudrate, timeout_s=0.05)
            except (serial.SerialException, OSError) as e:
                if not port_busy(e) or time.monotonic() >= deadline:
                    raise ReplError("cannot open %s: %s" % (self.port_name, _open_failure(e)), self.port_name) from e
                if on_busy is not None:
                    on_busy("%s is in use by another program; waiting up to %.0f s for it" % (
                        self.port_name, busy_wait_s))
                    on_busy = None
                time.sleep(BUSY_RETRY_S)

    def reopen(self, busy_wait_s: float = 5.0) -> None:
        """Opens the port again after close() (another reader had it meanwhile)."""
        if not self.port.is_open:
            self.port = self._open(busy_wait_s, None)
        self.in_raw = False

    def close(self) -> None:
        if self.in_raw and self.port.is_open:
            try:
                self.leave()
            except (ReplError, OSError, serial.SerialException):
                pass
        self.port.close()

    def _read_until(self, marker: bytes, timeout_s: float | None = None, what: str = "") -> bytes:
        """What the board sent up to and including marker; what came after waits for the next read."""
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        end = time.monotonic() + wait_s
        buf, self._pending = self._pending, b""
        seen = 0  # buf before this holds no marker: each byte is searched about once
        while buf.find(marker, seen) < 0:
            seen = max(0, len(buf) - len(marker) + 1)
            if time.monotonic() >= end:
                raise ReplError("no %s from %s within %.0f s" % (what or repr(marker), self.port_name, wait_s),
                                self.port_name, buf.decode("utf-8", "replace")[-400:])
            if len(buf) > MAX_REPLY_BYTES:
                raise ReplError("%s answered more than %d bytes without %r: not the answer of a MicroPython REPL"
                                % (self.port_name, MAX_REPLY_BYTES, marker), self.port_name,
                                buf[-400:].decode("utf-8", "replace"))
            buf += self._read_some()
        cut = buf.index(marker) + len(marker)
        self._pending = buf[cut:]
        return buf[:cut]

    def _read_some(self) -> bytes:
        # What has arrived, else the next byte as soon as it comes (or nothing after the port's
        # 50 ms timeout). read(4096) waited out that timeout on every answer shorter than 4096
        # bytes, several per command: 13 s of a 19 s provisioning of a simulated board.
        return bytes(self.port.read(self.port.in_waiting or 1))

    def _read_exact(self, n: int, timeout_s: float | None) -> bytes:
        end = time.monotonic() + (timeout_s or self.timeout_s)
        buf, self._pending = self._pending[:n], self._pending[n:]
        while len(buf) < n and time.monotonic() < end:
            buf += self.port.read(n - len(buf))
        if len(buf) < n:
            raise ReplError("%s stopped answering during a transfer" % self.port_name, self.port_name)
        return buf

    def interrupt(self) -> bytes:
        """Reaches the friendly REPL prompt from wherever the board is: a running
        program (streaming firmware) is stopped, a raw REPL or a half-sent command
        (raw-paste included) left; returns what the board printed meanwhile. Asks
        again every ASK_AGAIN_S until timeout_s: a program busy when the first
        Ctrl-C came, or a loaded host, answers late, not never."""
        self.port.reset_input_buffer()
        self._pending = b""
        self.in_raw = False
        end = time.monotonic() + self.timeout_s
        output = ""
        while time.monotonic() < end:
            self.port.write(CTRL_C)
            time.sleep(0.1)
            self.port.write(CTRL_C + CTRL_B)
            try:
                return self._read_until(b">>> ", min(ASK_AGAIN_S, max(0.1, end - time.monotonic())))
            except ReplError as e:
                output = (output + e.output)[-400:]
        raise ReplError("no MicroPython REPL on %s (no prompt after Ctrl-C within %.0f s): is MicroPython "
                        "installed? (--flash FIRMWARE.bin writes it)" % (self.port_name, self.timeout_s),
                        self.port_name, output)

    def enter(self) -> None:
        self.interrupt()
        end = time.monotonic() + self.timeout_s
        ask = b"\r" + CTRL_A
        while True:
            self.port.write(ask)
            # Asked again with a Ctrl-C first: it clears a line the REPL was still
            # holding (where Ctrl-A only moves the cursor), or a continuation.
            ask = CTRL_C + b"\r" + CTRL_A
            try:
                self._read_until(RAW_BANNER, min(ASK_AGAIN_S, max(0.1, end - time.monotonic())), "raw REPL")
                break
            except ReplError:
                if time.monotonic() >= end:
                    raise
        self.in_raw = True

    def leave(self) -> None:
        self.port.write(CTRL_B)
        self._read_until(b">>> ", self.timeout_s)
        self.in_raw = False

    def soft_reset(self, timeout_s: float = 15.0) -> None:
        """A fresh heap, as after a reset, main.py not run; ends in the raw REPL."""
        if not self.in_raw:
            self.enter()
        self.port.write(CTRL_D)
        # A board reboots into its raw REPL; a board that restarts its
        # interpreter instead shows its friendly prompt.
        end = time.monotonic() + timeout_s
        buf, self._pending = self._pending, b""
        while time.monotonic() < end and RAW_BANNER not in buf and b">>> " not in buf:
            buf += self._read_some()
        if RAW_BANNER not in buf and b">>> " not in buf:
            raise ReplError("no REPL from %s within %.0f s of a soft reset" % (self.port_name, timeout_s),
                            self.port_name, buf.decode("utf-8", "replace")[-400:])
        self.in_raw = False
        self.enter()

    def _send(self, code: bytes, timeout_s: float | None) -> None:
        if self.raw_paste is not False:
            self.port.write(RAW_PASTE_ENTER)
            head = self._read_exact(2, timeout_s)
            if head == b"R\x01":
                self.raw_paste = True
                self._paste(code, timeout_s)
                return
            self.raw_paste = False
            if head != b"R\x00":  # a board from before raw-paste: it took Ctrl-A as a new raw REPL
                self._read_until(RAW_BANNER, self.timeout_s, "raw REPL")
        self.port.write(code + CTRL_D)
        self._read_until(b"OK", timeout_s, "OK")

    def _paste(self, code: bytes, timeout_s: float | None) -> None:
        window = struct.unpack("<H", self._read_exact(2, timeout_s))[0]
        credit = window
        i = 0
        while i < len(code):
            # The board's flow control: more room, or an end.
            while credit == 0 or self._pending or self.port.in_waiting:
                b = self._read_exact(1, timeout_s)
                if b == CTRL_A:
                    credit += window
                elif b == CTRL_D:  # the board ends the transfer early: acknowledged, then its error follows
                    self.port.write(CTRL_D)
                    return
                else:
                    raise ReplError("unexpected %r from %s during a raw-paste transfer" % (b, self.port_name),
                                    self.port_name)
            n = min(credit, len(code) - i)
            self.port.write(code[i:i + n])
            i += n
            credit -= n
        self.port.write(CTRL_D)
        self._read_until(CTRL_D, timeout_s, "end of the raw-paste transfer")

    def exec(self, code: str, timeout_s: float | None = None) -> str:
        """Runs code on the board; returns its output; raises ReplError with the board's traceback."""
        if not self.in_raw:
            self.enter()
        self._send(code.encode(), timeout_s)
        out = self._read_until(CTRL_D, timeout_s, "end of output")[:-1]
        err = self._read_until(CTRL_D, timeout_s, "end of error output")[:-1]
        self._read_until(b">", timeout_s, "raw REPL prompt")
        if err:
            text = err.decode("utf-8", "replace").strip()
            raise ReplError("the board raised: %s" % (text.splitlines() or [text])[-1], self.port_name, text)
        return out.decode("utf-8", "replace")

    def eval(self, expr: str) -> str:
        return self.exec("print(repr(%s))" % expr).strip()

    def put(self, path: str, data: bytes) -> None:
        """Writes a file on the board (through a temporary name, then rename) and checks its SHA-256."""
        tmp = path + ".part"
        self.exec("import binascii, os\ntry:\n os.mkdir(%r)\nexcept OSError:\n pass\nf = open(%r, 'wb')" % (
            _parent(path) or ".", tmp)) if _parent(path) else self.exec("import binascii, os\nf = open(%r, 'wb')" % tmp)
        chunk = CHUNK_PASTE if self.raw_paste else CHUNK
        for i in range(0, len(data), chunk):
            self.exec("f.write(binascii.a2b_base64(%r))" % base64.b64encode(data[i:i + chunk]).decode())
            chunk = CHUNK_PASTE if self.raw_paste else CHUNK  # known after the first command
        self.exec("f.close()")
        got = self.exec("import hashlib, binascii\nh = hashlib.sha256()\nf = open(%r, 'rb')\nwhile True:\n"
                        " b = f.read(512)\n if not b:\n  break\n h.update(b)\nf.close()\n"
                        "print(binascii.hexlify(h.digest()).decode())" % tmp).strip()
        want = hashlib.sha256(data).hexdigest()
        if got != want:
            self.exec("os.remove(%r)" % tmp)
            raise ReplError("checksum mismatch writing %s (board %r, expected %s)" % (path, got[:64], want[:12]),
                            self.port_name)
        self.exec("os.rename(%r, %r)" % (tmp, path))

    def exists(self, path: str) -> bool:
        return self.exec("import os\ntry:\n os.stat(%r)\n print(1)\nexcept OSError:\n print(0)" % path).strip() == "1"

    def remove(self, path: str) -> None:
        self.exec("import os\ntry:\n os.remove(%r)\nexcept OSError:\n pass" % path)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""
