# `pulsebridge-dev sim` names each board's port by a name an agent can keep:
# the board's stable name, gone with the board (a /dev/pts number, once
# freed, is the next pseudo-terminal opened on the machine, another
# program's: an agent configured with it would open a stranger's port).
from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent.dev import simrun


@pytest.mark.micropython
def test_sim_prints_the_name_to_give_an_agent(micropython: str, tmp_path: Path) -> None:
    out = io.StringIO()
    simrun.run(simrun.SimOptions(boards=1, seconds=0.5, attach_hub=False, directory=tmp_path), out)
    text = out.getvalue()
    stable = tmp_path / "pb-sim01" / "port"
    assert ('in an agent\'s [[serial]]: port = "%s", which goes with the board' % stable) in text, text
    assert not stable.exists()  # gone with the board, once it stopped


@pytest.mark.micropython
def test_a_blank_board_is_provisioned_by_its_stable_name(micropython: str, tmp_path: Path) -> None:
    # a blank board printed only its /dev/pts number, which provisioning then handed on to the agent
    # ("the hub agent takes it from /dev/pts/N"): once the board stopped, another program's terminal
    out = io.StringIO()
    simrun.run(simrun.SimOptions(boards=1, seconds=0.5, attach_hub=False, directory=tmp_path, blank=True), out)
    stable = tmp_path / "pb-sim01" / "port"
    assert "pulsebridge provision --port %s," % stable in out.getvalue(), out.getvalue()


def _board_pids(directory: Path) -> list[int]:
    """The processes running in a board's flash directory (its interpreter's)."""
    import os

    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(directory):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.micropython
def test_a_board_whose_process_dies_is_told_and_the_others_go_on(micropython: str, tmp_path: Path) -> None:
    # `sim --boards 2`, then kill -9 one board's process (a power cut, as the README suggests trying with an
    # agent): the whole simulator ended at once, silently, exit status 0, taking the other board with it
    import os
    import signal
    import threading

    from tests.waiting import wait_for

    out = io.StringIO()
    run = threading.Thread(target=simrun.run, args=(simrun.SimOptions(boards=2, seconds=120, attach_hub=False,
                                                                       directory=tmp_path), out), daemon=True)
    run.start()
    first, second = tmp_path / "pb-sim01", tmp_path / "pb-sim02"
    wait_for(lambda: (first / "port").exists() and (second / "port").exists() and _board_pids(first), 60,
             "both boards up")
    for pid in _board_pids(first):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "pb-sim01: its process ended" in out.getvalue() or not run.is_alive(), 30, "pb-sim01 told of")
    text = out.getvalue()
    assert "pb-sim01: its process ended (killed by SIGKILL: as a power cut); its port is gone; the other boards " \
           "go on" in text, text
    assert run.is_alive() and (second / "port").exists() and not (first / "port").exists()
    for pid in _board_pids(second):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not run.is_alive(), 30, "the simulator ended with its last board")
    assert "pb-sim02: its process ended (killed by SIGKILL: as a power cut); its port is gone; no board is left" \
           in out.getvalue(), out.getvalue()
