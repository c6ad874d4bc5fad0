"""Fixtures the agent's tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from tests.agent import harness


@pytest.fixture
def hub_config(tmp_path: Path) -> agent_config.AgentConfig:
    """A hub with no boards and no backends, everything under tmp_path (hub id "test-hub"),
    loaded from the file an operator would write (cfg.source)."""
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
        tmp_path / "data", tmp_path / "log", tmp_path / "run"))
    return agent_config.load(path)


@pytest.fixture
def pki(tmp_path: Path) -> harness.Pki:
    """The test's own CA, with server and client certificates, under tmp_path/pki."""
    return harness.pki_for(tmp_path)


@pytest.fixture
def make_hub(tmp_path: Path, micropython: str, pki: harness.Pki,
             sim_cache: Path) -> Iterator[Callable[..., harness.Hub]]:
    """make_hub(boards, **options) -> harness.Hub under tmp_path (options: Hub.start's); every hub
    made is closed after the test (boards stopped, backend closed, what it deferred)."""
    hubs: list[harness.Hub] = []

    def make(boards: int = 1, **options: Any) -> harness.Hub:
        hub = harness.Hub(tmp_path, micropython, pki, sim_cache)
        hubs.append(hub)  # closed even if it fails half-started
        return hub.start(boards, **options)

    yield make
    for hub in hubs:
        hub.close()
