"""Hardware-in-the-loop fixtures, figures and the bench report.

With --port a real board on USB serial is tested (its --device-id and
--key-file, as `pulsebridge devices export` wrote them); without it, a
simulated board (the same firmware under micropython on a pty) stands in,
so the suite runs anywhere. Likewise --ble ADDRESS (repeatable) tests real
boards over BLE through BlueZ; without it, simulated boards on the software
radio (agent/dev/sim/air.py) stand in. Cases that need hardware this run does not
have are skipped, and the skip says what to pass to run them.

Each run writes, in --hil-report DIR (default hil-results/): junit.xml,
and report.md, one page: what ran, on which board and firmware, the figures.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard
from agent.session import BoardStats, verify_for
from tests.waiting import async_wait_for

_FIGURES: dict[str, dict[str, Any]] = {}
_BOARDS: dict[str, str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("pulsebridge hardware")
    g.addoption("--port", default=None, help="serial port of a provisioned board (e.g. /dev/ttyACM0)")
    g.addoption("--device-id", default=None, help="the board's device id")
    g.addoption("--key-file", default=None, help="JSON from `pulsebridge devices export`, or 64 hex digits")
    g.addoption("--blank-port", default=None, help="serial port of a board the suite may (re)provision")
    g.addoption("--stream-seconds", type=_seconds, default=20.0, help="length of the streaming case")
    g.addoption("--hil-report", default="hil-results", help="directory for junit.xml and report.md")
    g.addoption("--ble", action="append", default=[], metavar="ADDRESS",
                help="a provisioned board over BLE (repeat for several); keys from --key-file (JSON)")
    g.addoption("--ble-adapter", default="hci0", help="BlueZ adapter for --ble (default hci0)")


def _seconds(text: str) -> float:
    """--stream-seconds: a finite number above 0 (-5 or nan set a case up, then failed it for no samples)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("a number of seconds above 0, not %r" % text)
    return value


def pytest_configure(config: pytest.Config) -> None:
    if not getattr(config.option, "xmlpath", None) and _hil_only(config):
        out = Path(config.getoption("--hil-report"))
        out.mkdir(parents=True, exist_ok=True)
        config.option.xmlpath = str(out / "junit.xml")


def _hil_only(config: pytest.Config) -> bool:
    return all("hil_tests" in str(a) for a in config.args) if config.args else False


@dataclass
class BoardUnderTest:
    kind: str  # "hardware" or "simulated"
    port: str
    device_id: str
    key: bytes
    sim: SimulatedBoard | None = None
    stats: list[BoardStats] = field(default_factory=list)


def _key(path: str, device_id: str) -> bytes:
    text = Path(path).read_text().strip()
    if text.startswith("{"):
        import json

        return bytes.fromhex(json.loads(text)[device_id])
    return bytes.fromhex(text)


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Simulated boards' compiled firmware and waveforms, shared by the session's cases (each
    named by its content): a cache per case compiled the firmware again for each."""
    return tmp_path_factory.mktemp("sim-cache")


@pytest.fixture
def board(request: pytest.FixtureRequest, tmp_path: Path, sim_cache: Path) -> Iterator[BoardUnderTest]:
    port = request.config.getoption("--port")
    if port:
        dev = request.config.getoption("--device-id")
        key_file = request.config.getoption("--key-file")
        if not dev or not key_file:
            pytest.fail("--port needs --device-id and --key-file")
        _BOARDS[dev] = "hardware on %s" % port
        yield BoardUnderTest("hardware", port, dev, _key(key_file, dev))
        return
    spec = boards.BoardSpec("pb-hil01", ppm={"max30003": 40, "max30102": -25})
    sim = SimulatedBoard(spec, tmp_path / "board", sim_cache)
    sim.start()
    _BOARDS[spec.device_id] = "simulated (firmware under micropython %s)" % platform.machine()
    try:
        # The port by its stable name (as udev gives a real board): a reboot
        # gives the board a new pty, and the old one's number may go to
        # another pty at once (the rebooted board's own console, for one).
        yield BoardUnderTest("simulated", str(sim.link_path), spec.device_id, spec.key, sim)
    finally:
        sim.stop()


@pytest.fixture
def blank_board(request: pytest.FixtureRequest, tmp_path: Path,
                sim_cache: Path) -> Iterator[tuple[str, SimulatedBoard | None]]:
    port = request.config.getoption("--blank-port")
    if port:
        yield port, None
        return
    if request.config.getoption("--port"):
        pytest.skip("provisioning a real board needs --blank-port PORT (it re-keys the board)")
    sim = SimulatedBoard(boards.BoardSpec("blank"), tmp_path / "blank", sim_cache, blank=True)
    sim.start()
    try:
        yield sim.port, sim
    finally:
        sim.stop()


@dataclass
class BleBench:
    kind: str  # "hardware" or "simulated"
    addresses: list[str]
    keys: dict[str, bytes]  # device id -> key
    client_cls: Any = None  # bleak backends: None for BlueZ
    scanner_cls: Any = None
    scanner_args: dict[str, Any] = field(default_factory=dict)
    air: Any = None
    sims: list[SimulatedBoard] = field(default_factory=list)


@pytest.fixture
def ble_bench(request: pytest.FixtureRequest, tmp_path: Path, sim_cache: Path) -> Iterator[BleBench]:
    addresses = request.config.getoption("--ble")
    if addresses:
        key_file = request.config.getoption("--key-file")
        if not key_file:
            pytest.fail("--ble needs --key-file (JSON from `pulsebridge devices export`)")
        import json

        keys = {d: bytes.fromhex(k) for d, k in json.loads(Path(key_file).read_text()).items()}
        for a in addresses:
            _BOARDS[a] = "hardware over BLE (%s)" % request.config.getoption("--ble-adapter")
        yield BleBench("hardware", addresses, keys,
                       scanner_args={"bluez": {"adapter": request.config.getoption("--ble-adapter")}})
        return
    from agent.dev.sim.air import Air
    from agent.transports import softradio

    air = Air(tmp_path / "air")
    air.start()
    specs = [boards.BoardSpec("pb-hilble%d" % (i + 1), seed=i + 1, link="ble", air=str(air.board_path))
             for i in range(3)]
    sims = [SimulatedBoard(s, tmp_path / s.device_id, sim_cache) for s in specs]
    client_cls, scanner_cls = softradio.backends(str(air.central_path))
    try:
        for sim in sims:
            sim.start()
            _BOARDS[sim.device_id] = "simulated over the software radio (firmware under micropython)"
        yield BleBench("simulated", [boards.ble_address(s.device_id) for s in specs],
                       {s.device_id: s.key for s in specs}, client_cls, scanner_cls, air=air, sims=sims)
    finally:
        for sim in sims:
            sim.stop()
        air.stop()


class Figures(dict[str, Any]):
    """A case's figures: in the bench report, and each a JUnit property of the case
    (pytest's user_properties, what record_property writes), so CI keeps them."""

    def __init__(self, item: pytest.Item) -> None:
        super().__init__()
        self.item = item

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        props = [(k, v) for k, v in self.item.user_properties if k != key]
        self.item.user_properties[:] = props + [(key, value)]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Figures a case measured, for the bench report and as JUnit properties."""
    return _FIGURES.setdefault(request.node.name, Figures(request.node))


def stream(b: BoardUnderTest, seconds: float, time_sync_s: float | None = None,
           during: Any = None) -> BoardStats:
    """Verifies and acknowledges the board's frames for `seconds` at least, and
    as long as `during` (an async function of the stats) runs, as the hub does."""
    stats = verify_for(b.port, b.device_id, b.key, seconds, time_sync_s, during)
    b.stats.append(stats)
    return stats


def frames_at_least(n: int, timeout_s: float = 120.0) -> Callable[[BoardStats], Awaitable[None]]:
    """A `during` for stream(): until n frames are verified (a bound, not a rate)."""
    async def wait(stats: BoardStats) -> None:
        await async_wait_for(lambda: stats.frames >= n, timeout_s, "%d frames verified" % n,
                             lambda: (stats.frames, dict(stats.rejects), stats.samples_missing()))
    return wait


def unaccounted_loss(sim: SimulatedBoard | None, st: BoardStats) -> int:
    """Samples missing between the first and the last received, less what the
    board may say it lost.

    A simulated board at the PC's speed (board_speed "host") samples on the
    wall clock: when the OS keeps its process waiting longer than a sensor
    FIFO lasts (62 ms for the MAX30003's 32 ECG samples at 512 Hz), the FIFO
    overflows, as a chip's would, and the board reports those samples lost.
    That is the host's scheduler, not the board: there, a missing sample the
    board reported lost is accounted for (nothing lost on the link); on
    hardware, or at a chip's speed, none may be missing at all.
    """
    missing = sum(st.samples_missing().values())
    if sim is not None and sim.spec.board_speed == "host":
        return max(0, missing - st.fifo_lost)
    return missing + st.fifo_lost


def assert_nothing_lost(sim: SimulatedBoard | None, st: BoardStats) -> None:
    """sim: the simulated board, None for hardware."""
    assert st.samples_missing(), "no samples received"
    assert unaccounted_loss(sim, st) == 0, (st.device_id, st.samples_missing(), st.fifo_lost)
    # A loop the firmware had to restart (an exception, MemoryError among them)
    # is a defect on the bench even when nothing was lost.
    assert not st.board_errors.get("loop_restarted"), (st.device_id, st.last_board_error)


def until_nothing_lost(sim: SimulatedBoard | None, timeout_s: float = 60.0) -> Callable[[BoardStats], Awaitable[None]]:
    """A `during` for stream(): until every hole in the samples is filled (frames resent)."""
    async def wait(stats: BoardStats) -> None:
        await async_wait_for(lambda: stats.samples_missing() and unaccounted_loss(sim, stats) == 0, timeout_s,
                             "every sample received", lambda: (stats.samples_missing(), stats.fifo_lost))
    return wait


_OUTCOMES: list[tuple[str, str, str]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and rep.skipped):
        why = ""
        if rep.skipped and isinstance(rep.longrepr, tuple):
            why = str(rep.longrepr[2])
        elif rep.failed:
            why = str(rep.longreprtext).strip().splitlines()[-1][:200] if rep.longreprtext else ""
        _OUTCOMES.append((item.name, rep.outcome, why))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _OUTCOMES or not any("hil_tests" in str(getattr(i, "fspath", "")) for i in session.items):
        return
    out = Path(session.config.getoption("--hil-report"))
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# pulsebridge bench report", "", "Run: %s, host %s" % (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), platform.node()), ""]
    boards_line = "; ".join("%s: %s" % kv for kv in sorted(_BOARDS.items()))
    lines += ["Boards: " + (boards_line or "none (no case needed one)"), ""]
    fw = {f.get("firmware") for f in _FIGURES.values() if f.get("firmware")}
    lines += ["Firmware: " + (", ".join(sorted(fw)) or "unknown"), "", "| case | result | note |", "|---|---|---|"]
    for name, outcome, why in _OUTCOMES:
        lines.append("| %s | %s | %s |" % (name, outcome, why.replace("|", "/")))
    lines += ["", "## Figures", ""]
    for name, figs in sorted(_FIGURES.items()):
        for k, v in sorted(figs.items()):
            lines.append("- %s: %s = %s" % (name, k, v))
    (out / "report.md").write_text("\n".join(lines) + "\n")
