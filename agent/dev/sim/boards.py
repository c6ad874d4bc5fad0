"""A simulated board's flash: its directory, as provisioning leaves it.

A board directory holds what an ESP32's flash would after provisioning
(pulsebridge/config.json, pulsebridge/device.key) plus sim.json, which
tells the simulated board which recordings its chip models play.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agent.dev.sim import waveforms
from agent.provision.build import FIRMWARE_DIR, REPO_DIR
from agent.registry import write_private


@dataclass
class BoardSpec:
    device_id: str
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    # The origin key (protocols/origin.py): board and backend only; None: a board provisioned without one.
    origin_key: bytes | None = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    ecg: str | None = "max30003"  # "max30003", "ad8232" or None
    ppg: bool = True
    link: str = "serial"
    air: str = ""  # the software radio's board socket, for link="ble"
    spo2_pct: float = 97.0
    ppm: dict[str, int] = field(default_factory=dict)
    lead_off: list[tuple[float, float]] = field(default_factory=list)
    finger_off: list[tuple[float, float]] = field(default_factory=list)
    virtual_clock: bool = False
    board_speed: str = "host"  # or a chip: the firmware then runs at its speed (firmware_mpy/sim/clock.py)
    window_ms: int = 1000
    outbox_bytes: int = 24576
    seed: int = 1
    provisioned: bool = True  # config.json and device.key written
    key_on_board: bool = True  # False: configured, but the key is missing
    # The chip's unique id (machine.unique_id(); an ESP32's is its 6-byte base MAC): one per board.
    unique_id: bytes = field(default_factory=lambda: secrets.token_bytes(6))
    extra: dict[str, object] = field(default_factory=dict)
    # The vendor's public keys (32 bytes each) the board installs updates signed by (pulsebridge/vendor.keys,
    # as provisioning's --vendor-key writes them); empty: none written (it installs no update).
    vendor_keys: bytes = b""

    def board_config(self) -> dict[str, object]:
        cfg: dict[str, object] = {"device_id": self.device_id, "link": self.link, "window_ms": self.window_ms,
                                  "outbox_bytes": self.outbox_bytes}
        if self.ecg == "max30003":
            cfg["ecg"] = {"chip": "max30003", "rate_hz": 512, "gain": 20}
        elif self.ecg == "ad8232":
            cfg["ecg"] = {"chip": "ad8232", "rate_hz": 250}
        else:
            cfg["ecg"] = None
        if not self.ppg:
            cfg["ppg"] = None
        cfg.update(self.extra)
        return cfg


def ble_address(device_id: str) -> str:
    """A random static address (two top bits set), stable for one device id."""
    raw = bytearray(hashlib.sha256(device_id.encode()).digest()[:6])
    raw[0] |= 0xC0
    return ":".join("%02X" % b for b in raw)


def prepare(spec: BoardSpec, directory: Path, cache: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    flash = directory / "pulsebridge"
    if spec.provisioned:
        flash.mkdir(exist_ok=True)
        (flash / "config.json").write_text(json.dumps(spec.board_config(), indent=1))
        if spec.key_on_board:
            write_private(flash / "device.key", spec.key)
        if spec.origin_key is not None:
            write_private(flash / "origin.key", spec.origin_key)
        if spec.vendor_keys:  # public
            (flash / "vendor.keys").write_bytes(spec.vendor_keys)
    sim: dict[str, object] = {
        "ppm": spec.ppm, "lead_off": spec.lead_off, "finger_off": spec.finger_off,
        "virtual_clock": spec.virtual_clock, "seed": spec.seed, "board_speed": spec.board_speed,
        "unique_id": spec.unique_id.hex(),
        "truth": {"spo2_pct": spec.spo2_pct, "ratio": waveforms.ratio_for_spo2(spec.spo2_pct)},
    }
    if spec.link == "ble":
        sim["ble"] = {"air": spec.air, "address": ble_address(spec.device_id)}
    if spec.ecg:
        ecg = waveforms.ecg_signal(cache)
        # Each board starts at its own place in the recording; its ECG and
        # PPG at the same place, as one patient's.
        sim["ecg"] = {"file": str(ecg.path), "rate_hz": ecg.rate_hz, "offset": spec.seed * 13 * ecg.rate_hz}
    if spec.ppg:
        ppg = waveforms.ppg_signal(cache, spec.spo2_pct)
        sim["ppg"] = {"file": str(ppg.path), "rate_hz": ppg.rate_hz, "offset": spec.seed * 13 * ppg.rate_hz}
    (directory / "sim.json").write_text(json.dumps(sim, indent=1))
    return directory


def install_firmware(directory: Path, compiled: Path) -> None:
    """The board's flash as it left the factory: boot.py and main.py at its
    root, the firmware in slot a (SPEC.md, Firmware updates). A board that
    has taken an update (boot.ok, boot.next or boot.trial) keeps its slots;
    one that never has runs this tree's build (slot a marked with it)."""
    from agent.provision import build

    for name in build.ROOT_FILES:
        shutil.copy(build.FIRMWARE_DIR / name, directory / name)
    flash = directory / "pulsebridge"
    if any((flash / n).exists() for n in ("boot.ok", "boot.next", "boot.trial")):
        return
    slot = directory / "a"
    stamp = slot / ".factory"
    if stamp.exists() and stamp.read_text() == compiled.name:
        return
    tmp = directory / "a.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for path, src in build.slot_files(compiled).items():
        dest = tmp / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (tmp / ".factory").write_text(compiled.name)
    shutil.rmtree(slot, ignore_errors=True)
    tmp.rename(slot)


def micropython_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(FIRMWARE_DIR), str(REPO_DIR)])
    return env
