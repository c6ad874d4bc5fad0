# A run_dir deeper than a Unix socket's address holds (107 bytes): the
# status socket works all the same. Before, the agent's status task crashed
# at each restart (OSError: AF_UNIX path too long, with its traceback) and
# `pulsebridge status` could never reach the agent; seen with the demo under
# a long TMPDIR.
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from agent import config as agent_config
from agent.status_server import SUN_PATH_BYTES, read_status
from agent.supervisor import Agent
from tests.agent import harness
from tests.conftest import ROOT


def test_status_answers_from_a_run_dir_deeper_than_a_socket_address(tmp_path: Path) -> None:
    run_dir = tmp_path / ("deep-" * 25) / "run"
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
        tmp_path / "data", tmp_path / "log", run_dir))
    cfg = agent_config.load(path)
    assert len(str(cfg.status_socket)) > SUN_PATH_BYTES

    async def scenario() -> tuple[dict[str, object], subprocess.CompletedProcess[str]]:
        async with harness.running(Agent(cfg)):
            assert cfg.status_socket.stat().st_mode & 0o077 == 0  # only the service user may ask
            snap = await read_status(cfg.status_socket)
            shown = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent.cli", "status", "--config",
                                                             str(path)], cwd=ROOT, capture_output=True, text=True,
                                            timeout=60)
        return snap, shown

    snap, shown = asyncio.run(scenario())
    assert snap["hub_id"] == "test-hub"
    assert shown.returncode == 0 and "hub test-hub" in shown.stdout, shown
    assert not cfg.status_socket.exists()  # a stopped agent leaves no socket behind
