# A board's key belongs to one chip: provisioning reads the chip's unique id
# (machine.unique_id()) and the registry keeps it; each status (every 10 s)
# says the chip's id. A key copied or moved to another board (its flash cloned, the card
# swapped) is shown as a fault on the page and in `pulsebridge status`; its
# authentic frames are still stored.
import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.audit import AuditLog
from agent.cli import _board_line
from agent.registry import Registry
from agent.status_page import view
from agent.supervisor import Agent
from tests.agent import harness
from tests.waiting import async_wait_for


def _sessions(agent: Agent) -> list[Any]:
    return [lk.stats for lk in agent.links.links.values() if lk.stats is not None]


@pytest.mark.micropython
@pytest.mark.slow
def test_a_key_on_another_chip_is_shown_as_a_fault_and_its_frames_kept(make_hub: Callable[..., harness.Hub]) -> None:
    hub = make_hub(1)  # registered with its chip's id, as provisioning does
    board = hub.board
    dev, chip = board.device_id, board.spec.unique_id

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with harness.running(Agent(hub.cfg)) as agent:
            def state() -> dict[str, Any]:
                return harness.board_state(agent, dev)

            await async_wait_for(lambda: any(s.unique_id for s in _sessions(agent)) and agent.store.stats.ingested >= 2,
                                 60, "the board's status (with its chip's id) and frames", state)
            right = state()
            await asyncio.to_thread(board.stop)
            board.spec.unique_id = bytes.fromhex("0badc0ffee00")  # its flash (key and all) on another chip
            await asyncio.to_thread(board.start)
            stored = agent.store.stats.ingested
            await async_wait_for(lambda: state().get("identity") and agent.store.stats.ingested >= stored + 2, 60,
                                 "the other chip's status told, its frames stored", state)
            return right, state(), agent.snapshot()

    right, moved, snap = asyncio.run(scenario())
    assert right["identity"] == "" and right["state"] == "connected", right
    assert moved["state"] == "connected", moved  # served: its frames are authentic
    assert "on chip 0badc0ffee00, not on chip %s" % chip.hex() in moved["identity"], moved
    assert "FAULT: its key is on chip 0badc0ffee00" in _board_line(moved)
    v = view(snap)
    assert {"level": "attention", "key": "sensor_not_the_one_set_up", "args": {"label": "test board"}} in v[
        "notices"], v["notices"]
    assert v["level"] != "ok"


def test_a_registry_from_before_chip_ids_keeps_its_devices_and_records_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path)  # the schema as it was (before next_key and unique_id)
    db.execute("CREATE TABLE devices(device_id TEXT PRIMARY KEY, key BLOB NOT NULL, state TEXT NOT NULL, "
               "label TEXT NOT NULL DEFAULT '', patient_ref TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, "
               "key_changed_at REAL NOT NULL, revoked_at REAL, revoke_reason TEXT)")
    db.execute("INSERT INTO devices VALUES('pb-old', ?, 'active', '', '', 1, 1, NULL, NULL)", (bytes(32),))
    db.commit()
    db.close()
    path.chmod(0o600)
    reg = Registry(path, AuditLog(tmp_path / "audit.log"))
    try:
        old = reg.get("pb-old")
        assert old is not None and old.unique_id is None  # not known: nothing to compare a status with
        reg.add("pb-new", key=bytes(range(32)), unique_id=bytes.fromhex("a4cf12e0b3c8"))
        new = reg.get("pb-new")
        assert new is not None and new.unique_id == bytes.fromhex("a4cf12e0b3c8")
        assert [d.unique_id for d in reg.read_all()] == [bytes.fromhex("a4cf12e0b3c8"), None]
        with pytest.raises(Exception, match="1 to 16 bytes"):
            reg.add("pb-bad", unique_id=bytes(17))
    finally:
        reg.close()
    assert '"unique_id": "a4cf12e0b3c8"' in (tmp_path / "audit.log").read_text()
