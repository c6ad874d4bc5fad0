# Runs tests/firmware/mpy_test_*.py under the real MicroPython unix port, in
# a board directory prepared as provisioning would leave it.
import subprocess
from pathlib import Path

import pytest

from agent.dev.sim import boards
from tests.conftest import ROOT

MODULES = sorted(p.stem for p in (ROOT / "tests" / "firmware").glob("mpy_test_*.py"))


@pytest.fixture(scope="session")
def wave_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("waves")


@pytest.mark.micropython
@pytest.mark.parametrize("module", MODULES)
def test_firmware_module(micropython: str, module: str, tmp_path: Path, wave_cache: Path) -> None:
    boards.prepare(boards.BoardSpec("pb-test01"), tmp_path, wave_cache)
    env = boards.micropython_env()
    env["MICROPYPATH"] += ":" + str(ROOT)
    proc = subprocess.run([micropython, "-X", "heapsize=16M", str(ROOT / "tests" / "shared" / "mpy_runner.py"),
                           "tests.firmware." + module], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout


def test_modules_found() -> None:
    assert "mpy_test_app" in MODULES
