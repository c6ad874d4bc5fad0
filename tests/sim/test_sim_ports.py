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
