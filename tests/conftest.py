import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The tests that press Ctrl-C on a command or a board (SIGINT) need the
# default disposition in what they start. A runner that starts the suite in
# the background of a script hands it SIGINT ignored, and an ignored signal
# stays ignored across exec: those commands would then never see the Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def require_tool(name: str) -> str:
    # A real component the test needs. On a developer machine its absence
    # skips the test with the reason; in CI it fails: CI must run them all.
    search = [str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
    path = shutil.which(name, path=os.pathsep.join(search))
    if path is None:
        msg = "%s is not installed (./run tests installs it)" % name
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where simulated boards' compiled firmware and waveforms go (build.compile_firmware,
    sim.waveforms), shared by the session's tests: each is named by its content, so no test sees
    another's state. A cache per test compiled the firmware again for each (about 2 s of mpy-cross)."""
    return tmp_path_factory.mktemp("sim-cache")


@pytest.fixture(scope="session")
def micropython() -> str:
    return require_tool("micropython")


@pytest.fixture(scope="session")
def mpy_cross() -> str:
    return require_tool("mpy-cross")


from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis prints the falsifying example and a reproduction blob on failure. No deadline and
# no too_slow health check: the suite must pass on a machine whose cores are busy with other
# jobs, where generating examples can be slow.
settings.register_profile("default", print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


PYCOSE_VENV = ROOT / ".venv-pycose"


@pytest.fixture(scope="session")
def pycose_python() -> str:
    # pycose 1.1.0 cannot decode with cbor2 6 (its issue 141), so it lives in
    # its own environment, made by ./run tests.
    exe = PYCOSE_VENV / "bin" / "python"
    if not exe.exists():
        msg = "%s is missing (./run tests creates it)" % PYCOSE_VENV
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    return str(exe)


@pytest.fixture(scope="session")
def mosquitto() -> str:
    return require_tool("mosquitto")
