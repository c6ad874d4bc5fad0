# A simulated board's boot when its heap is short of the outbox's 24 kB ring
# (tests/firmware/mpy_boot_heap.py runs the board's boot.py and main.py under
# the heap `pulsebridge sim` gives a board, its firmware compiled and in
# slot a as provisioning leaves it, the BLE link on a local fake radio).
import json
import signal
import subprocess
from pathlib import Path

import pytest

from agent.dev.sim import boards
from agent.dev.sim.runner import DEFAULT_HEAP_KB
from agent.provision import build
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "firmware" / "mpy_boot_heap.py"


def _boot(micropython: str, tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    cache = tmp_path / "cache"
    board = tmp_path / "board"
    spec = boards.BoardSpec("pb-heap01", seed=1, link="ble", air="")
    boards.prepare(spec, board, cache)
    boards.install_firmware(board, build.compile_firmware(cache))
    env = boards.micropython_env()
    env["MICROPYPATH"] = "%s:%s" % (board, build.sim_rom(cache))
    return subprocess.run([micropython, "-X", "heapsize=%dK" % DEFAULT_HEAP_KB, str(SCRIPT), mode], cwd=board,
                          env=env, capture_output=True, text=True, timeout=300)


def _result(p: subprocess.CompletedProcess[str]) -> dict[str, int]:
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    return json.loads(lines[-1][len("RESULT "):])  # type: ignore[no-any-return]


@pytest.mark.micropython
def test_a_watchdog_reset_while_an_update_is_verified_boots_again_and_streams(micropython: str,
                                                                               tmp_path: Path) -> None:
    # CI: the BLE board's loop stalled past the watchdog while a bundle was
    # verified (the update's code in RAM); the reboot then found no 24 kB
    # hole for the ring (MemoryError in outbox.preallocate) and sat at the
    # REPL, and the push waited in 'verifying' for good.
    p = _boot(micropython, tmp_path, "update_then_stall")
    assert _result(p)["watchdog_resets"] == 1
    out = p.stdout
    assert "MemoryError" not in out, out[-1500:]
    after = out[out.index("watchdog reset (simulated board)"):]
    assert "streaming over ble" in after and "frames built" in after, out[-1500:]


@pytest.mark.micropython
def test_a_heap_with_no_hole_for_the_ring_streams_with_a_smaller_one_and_says_so(micropython: str,
                                                                                 tmp_path: Path) -> None:
    p = _boot(micropython, tmp_path, "fragmented")
    _result(p)
    out = p.stdout
    assert "outbox ring " in out and "not 24576: no larger block at boot" in out, out[-1500:]  # also reported (code 7)
    assert "streaming over ble" in out and "MemoryError" not in out, out[-1500:]


@pytest.mark.micropython
def test_a_heap_with_no_room_for_any_ring_resets_the_board_instead_of_sitting_at_the_repl(micropython: str,
                                                                                          tmp_path: Path) -> None:
    p = _boot(micropython, tmp_path, "shattered")
    assert p.returncode == -signal.SIGUSR1, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])  # the chip's reset
    assert "no memory for the outbox ring at boot: resetting" in p.stdout, p.stdout[-1500:]
