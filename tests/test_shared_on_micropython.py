# Runs every module of tests/shared under the real MicroPython interpreter.
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHARED = sorted(p.stem for p in (ROOT / "tests" / "shared").glob("test_*.py"))


@pytest.mark.micropython
@pytest.mark.parametrize("module", SHARED)
def test_shared_module_under_micropython(micropython: str, module: str) -> None:
    env = dict(os.environ, MICROPYPATH=str(ROOT))
    proc = subprocess.run([micropython, "-X", "heapsize=2M", str(ROOT / "tests" / "shared" / "mpy_runner.py"),
                           "tests.shared." + module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout


def test_every_shared_module_is_listed() -> None:
    # Guards the parametrisation above against an empty glob.
    assert "test_vectors" in SHARED
    assert Path(ROOT / "tests" / "shared" / "mpy_runner.py").exists()
