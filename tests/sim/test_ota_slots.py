# A simulated board runs its firmware from slot a or b of its flash
# directory, as boot.py chooses (SPEC.md, Firmware updates): a version on
# trial that fails is left by the board itself at the next reset.
import shutil
from pathlib import Path

import pytest

from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard
from agent.provision import build
from tests.waiting import wait_for


def _flash(tmp_path: Path, cache: Path) -> tuple[boards.BoardSpec, Path]:
    spec = boards.BoardSpec("pb-slots01")
    d = tmp_path / "board"
    boards.prepare(spec, d, cache)
    boards.install_firmware(d, build.compile_firmware(cache))
    return spec, d


@pytest.mark.micropython
def test_the_board_streams_from_slot_a_of_its_flash(micropython: str, sim_cache: Path, tmp_path: Path) -> None:
    spec, d = _flash(tmp_path, sim_cache)
    (d / "a" / "app" / "main.mpy").unlink()  # its flash, not the build: without the slot's app it cannot stream
    b = SimulatedBoard(spec, d, sim_cache, micropython)
    b.start()
    try:
        wait_for(lambda: "main.mpy" in b.console_tail() or "ImportError" in b.console_tail(), 30,
                 "the board to fail without its slot's firmware", b.console_tail)
        assert "streaming over" not in b.console_tail()
    finally:
        b.stop()
    shutil.rmtree(d / "a")  # a factory board again
    b = SimulatedBoard(spec, d, sim_cache, micropython)
    b.start()
    try:
        wait_for(lambda: "streaming over" in b.console_tail(), 30, "the board to stream", b.console_tail)
    finally:
        b.stop()


@pytest.mark.micropython
def test_a_version_that_crashes_at_start_is_rolled_back_by_the_next_reset(micropython: str, sim_cache: Path,
                                                                          tmp_path: Path) -> None:
    spec, d = _flash(tmp_path, sim_cache)
    shutil.copytree(d / "a", d / "b")
    (d / "b" / "app" / "__init__.mpy").unlink(missing_ok=True)
    (d / "b" / "app" / "__init__.py").write_text("raise RuntimeError('broken release')\n")
    (d / "pulsebridge" / "boot.next").write_text("b")
    b = SimulatedBoard(spec, d, sim_cache, micropython)
    b.start()
    try:
        wait_for(lambda: "streaming over" in b.console_tail(), 60, "the board to stream again", b.console_tail)
        tail = b.console_tail()
        assert "broken release" in tail and "failed at start" in tail
        assert tail.index("failed at start") < tail.index("streaming over")
        assert b.resets == 1
        flash = d / "pulsebridge"
        assert not (flash / "boot.next").exists() and not (flash / "boot.trial").exists()
        assert not (flash / "boot.ok").exists()  # never confirmed: a remains the slot it boots
    finally:
        b.stop()
