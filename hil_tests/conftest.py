"""Hardware-in-the-loop fixtures.

With --port a real board on USB serial is tested (its --device-id and
--key-file, as provisioning exported them); without it, a simulated board
(the same firmware under micropython on a pty) stands in, so the suite runs
anywhere. Cases that need hardware this run does not have are skipped,
and the skip says what to pass to run them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ingest import Volatile
from agent.session import BoardSession, BoardStats
from agent.sim import boards
from agent.sim.runner import SimulatedBoard
from agent.transports.serial import SerialTransport
from protocols import hub


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("pulsebridge hardware")
    g.addoption("--port", default=None, help="serial port of a provisioned board (e.g. /dev/ttyACM0)")
    g.addoption("--device-id", default=None, help="the board's device id")
    g.addoption("--key-file", default=None, help="file holding the board's key, 64 hex digits")
    g.addoption("--stream-seconds", type=float, default=20.0, help="length of the streaming case")


@dataclass
class BoardUnderTest:
    kind: str  # "hardware" or "simulated"
    port: str
    device_id: str
    key: bytes
    sim: SimulatedBoard | None = None


@pytest.fixture
def board(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BoardUnderTest]:
    port = request.config.getoption("--port")
    if port:
        dev = request.config.getoption("--device-id")
        key_file = request.config.getoption("--key-file")
        if not dev or not key_file:
            pytest.fail("--port needs --device-id and --key-file")
        key = bytes.fromhex(Path(key_file).read_text().strip())
        yield BoardUnderTest("hardware", port, dev, key)
        return
    spec = boards.BoardSpec("pb-hil01")
    sim = SimulatedBoard(spec, tmp_path / "board", tmp_path / "cache")
    sim.start()
    try:
        yield BoardUnderTest("simulated", sim.port, spec.device_id, spec.key, sim)
    finally:
        sim.stop()


def stream(b: BoardUnderTest, seconds: float) -> BoardStats:
    """Verifies and acknowledges the board's frames for a while, as the hub does."""
    h = hub.Hub()
    h.add_device(b.device_id, b.key)
    stats = BoardStats(b.device_id, "serial:" + b.port)
    session = BoardSession(SerialTransport(b.port), Volatile(h), stats)

    async def go() -> None:
        task = asyncio.create_task(session.run())
        await asyncio.sleep(seconds)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(go())
    return stats
