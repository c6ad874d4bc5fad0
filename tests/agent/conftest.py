"""Fixtures the agent's tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config as agent_config


@pytest.fixture
def hub_config(tmp_path: Path) -> agent_config.AgentConfig:
    """A hub with no boards and no backends, everything under tmp_path (hub id "test-hub"),
    loaded from the file an operator would write (cfg.source)."""
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
        tmp_path / "data", tmp_path / "log", tmp_path / "run"))
    return agent_config.load(path)
