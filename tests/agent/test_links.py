# Board links that fail in the middle: the session ends, the link manager
# reopens it, the state the hub reports is the truth, and every frame a
# board was acknowledged for reaches the backend. Real simulated boards
# (firmware under micropython on ptys), the real agent, the HTTPS backend.
import asyncio
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest
import serial
from serial.tools.list_ports_common import ListPortInfo

from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard
from agent.supervisor import Agent
from tests.agent import harness
from tests.waiting import async_wait_for


async def _until(pred: Callable[[], bool], timeout_s: float, what: Callable[[], Any]) -> None:
    # The shared bounded wait; `what` is the state its failure shows.
    await async_wait_for(pred, timeout_s, "the link's awaited state", what)


_board = harness.board_state


def _figures(hub: harness.Hub) -> tuple[int, int, int]:
    """Frames acknowledged to the boards, delivered to the backend, and lost (acknowledged, not delivered)."""
    acked, lost = len(hub.acked()), len(hub.undelivered())
    return acked, acked - lost, lost


@pytest.mark.micropython
@pytest.mark.slow
def test_a_board_that_stops_reading_its_acks_is_reconnected(make_hub: Callable[..., harness.Hub]) -> None:
    # The board goes on sending (resending often) but stops reading what the
    # hub writes: the hub's ack writes fill the OS buffer (about 20 kB on a
    # pty) and then block. The hub must end that session (never "connected"
    # while nothing reaches the board), keep the port read, and reconnect.
    hub = make_hub(1, webhook=True, extra={"retransmit_ms": 250})
    board = hub.board

    async def scenario() -> Agent:
        agent = Agent(hub.cfg)
        agent.links.time_sync_s = 0.05  # a busy downlink: the OS buffer fills within seconds
        async with harness.running(agent):
            dev = board.device_id
            await _until(lambda: _board(agent, dev).get("state") == "connected"
                         and len(harness.acked(board)) >= 3, 30, lambda: agent.snapshot()["boards"])
            board.reading = False
            await _until(lambda: _board(agent, dev).get("ends", {}).get("write_failed", 0) >= 1, 30,
                         lambda: agent.snapshot()["boards"])
            assert _board(agent, dev)["state"] != "connected"
            stalled_for = asyncio.get_running_loop().time() + 3
            while asyncio.get_running_loop().time() < stalled_for:  # never "connected" meanwhile
                assert _board(agent, dev)["state"] != "connected", _board(agent, dev)
                await asyncio.sleep(0.05)
            before = len(harness.acked(board))
            board.reading = True
            await _until(lambda: _board(agent, dev).get("state") == "connected"
                         and len(harness.acked(board)) > before + 3, 30, lambda: agent.snapshot()["boards"])
            await harness.finish(agent, hub.sims)
        return agent

    agent = asyncio.run(scenario())
    acked, delivered, lost = _figures(hub)
    print("stopped reading: acknowledged %d, delivered %d, lost %d; board %s" % (
        acked, delivered, lost, _board(agent, board.device_id)))
    assert lost == 0 and acked > 0


@pytest.mark.micropython
@pytest.mark.slow
def test_a_store_commit_that_raises_does_not_kill_the_session(make_hub: Callable[..., harness.Hub]) -> None:
    hub = make_hub(2, webhook=True)
    sims = hub.sims

    async def scenario() -> None:
        agent = Agent(hub.cfg)
        agent.links.stall_s = 3.0
        failing = {"on": False}
        apply = agent.store._apply

        def faulty(db: sqlite3.Connection, batch: Any) -> Any:  # fault injection: the disk is full
            if failing["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return apply(db, batch)

        agent.store._apply = faulty  # type: ignore[method-assign]
        async with harness.running(agent):
            devs = [s.device_id for s in sims]
            await _until(lambda: all(_board(agent, d).get("state") == "connected" for d in devs), 30,
                         lambda: agent.snapshot()["boards"])
            failing["on"] = True
            await _until(lambda: agent.store.fault is not None, 30, lambda: agent.snapshot()["store"])
            before = [len(harness.acked(s)) for s in sims]
            # A store fault is not a stalled board: each session stays open and reads on (frames beyond
            # its pipeline heard and left on the board) for well over the stall bound, nothing acked.
            await _until(lambda: all(_board(agent, d).get("held_back", 0) >= 5 for d in devs)
                         and time.time() - (agent.store.fault_since or time.time()) > 2 * agent.links.stall_s, 60,
                         lambda: agent.snapshot()["boards"])
            for d in devs:
                assert _board(agent, d)["state"] == "connected" and not _board(agent, d)["ends"], _board(agent, d)
            assert [len(harness.acked(s)) for s in sims] == before
            failing["on"] = False  # space is back
            await _until(lambda: all(_board(agent, d).get("state") == "connected" for d in devs)
                         and all(len(harness.acked(s)) > n + 3 for s, n in zip(sims, before)), 40,
                         lambda: agent.snapshot()["boards"])
            await harness.finish(agent, sims)

    asyncio.run(scenario())
    acked, delivered, lost = _figures(hub)
    print("store commit raising: acknowledged %d, delivered %d, lost %d" % (acked, delivered, lost))
    assert lost == 0 and acked > 0


def _usb_port(device: str, serial_number: str, vid: int = 0x303A, pid: int = 0x1001) -> ListPortInfo:
    # What serial.tools.list_ports reports for a USB serial port (an ESP32-S3's native USB here);
    # the device node itself is a real pty with a simulated board behind it.
    p = ListPortInfo(device, skip_link_detection=True)
    p.vid, p.pid, p.serial_number = vid, pid, serial_number
    return p


def _blank(hub: harness.Hub) -> SimulatedBoard:
    # A board fresh from the factory, waiting at its REPL to be provisioned: not ours (yet).
    sim = SimulatedBoard(boards.BoardSpec("blank", seed=99), hub.tmp / "boards" / "blank", hub.cache,
                         hub.micropython, blank=True)
    hub.defer(sim.stop)
    sim.record = True
    sim.start()
    return sim


def _free(port: str) -> bool:
    try:
        serial.Serial(port, exclusive=True).close()  # as provisioning opens it
    except serial.SerialException:
        return False
    return True


@pytest.mark.micropython
@pytest.mark.slow
def test_boards_found_by_identity_without_any_serial_section(make_hub: Callable[..., harness.Hub],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    # No [[serial]] section: every USB serial port is looked at. Two boards
    # and a blank board share one VID:PID; the boards are both served, the
    # blank board is let go untouched; a board unplugged and plugged back
    # (a new device node) is found again by its USB serial number. The
    # listing raises twice first: the discovery task crashes, is logged,
    # counted and restarted.
    hub = make_hub(2, webhook=True, listed=False)
    sims = hub.sims
    b1, b2 = sims
    blank = _blank(hub)
    listing: list[ListPortInfo] = []
    calls = [0]

    def list_ports() -> list[ListPortInfo]:  # the list_ports boundary; two injected crashes first
        calls[0] += 1
        if calls[0] <= 2:
            raise RuntimeError("injected fault in the USB listing")
        return list(listing)

    async def scenario() -> None:
        agent = Agent(hub.cfg)
        agent.serial.list_ports = list_ports
        agent.links.identify_s = 3.0
        async with harness.running(agent):
            await _until(lambda: "serial" in agent.tasks and agent.tasks["serial"].restarts == 2 and calls[0] > 2, 30,
                         lambda: agent.tasks)
            listing[:] = [_usb_port(b1.port, "SN-1"), _usb_port(blank.port, "SN-BLANK"), _usb_port(b2.port, "SN-2")]
            await _until(lambda: all(_board(agent, s.device_id).get("state") == "connected" for s in sims)
                         and any(b["state"] == "released" for b in agent.snapshot()["boards"]), 40,
                         lambda: agent.snapshot()["boards"])
            released = [b for b in agent.snapshot()["boards"] if b["state"] == "released"]
            assert [b["port"] for b in released] == [blank.port] and released[0]["usb"] == "303a:1001 SN-BLANK"
            assert released[0]["ends"] == {"silent": 1} and released[0]["retry_in_s"] > 10
            assert await asyncio.to_thread(_free, blank.port)  # let go: provisioning can open it
            assert blank.taps()[1] == b""  # and the hub wrote nothing to its REPL
            # Unplugged, then plugged back: a new device node, the same USB serial number.
            listing[:] = [p for p in listing if p.serial_number != "SN-1"]
            await asyncio.to_thread(b1.stop)
            await _until(lambda: _board(agent, b1.device_id).get("state") == "searching", 20,
                         lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(b1.start)
            listing.append(_usb_port(b1.port, "SN-1"))
            await _until(lambda: _board(agent, b1.device_id).get("state") == "connected"
                         and _board(agent, b1.device_id)["connects"] == 2
                         and _board(agent, b1.device_id)["port"] == b1.port, 40, lambda: agent.snapshot()["boards"])
            assert len([b for b in agent.snapshot()["boards"] if b["device_id"] == b1.device_id]) == 1
            await harness.finish(agent, sims)

    with caplog.at_level(logging.ERROR, logger="agent.supervisor"):
        asyncio.run(scenario())
    crashes = [r for r in caplog.records if "task serial crashed" in r.getMessage()]
    assert len(crashes) == 2 and crashes[0].exc_info is not None  # logged with the traceback
    acked, delivered, lost = _figures(hub)
    print("found by identity: acknowledged %d, delivered %d, lost %d" % (acked, delivered, lost))
    assert lost == 0 and all(harness.acked(s) for s in sims)


@pytest.mark.micropython
@pytest.mark.slow
def test_a_port_name_taken_by_another_device_is_let_go(make_hub: Callable[..., harness.Hub]) -> None:
    # [[serial]] port = a name; the board is unplugged and the name given to
    # a blank board being provisioned. The hub looks, hears no registered
    # board, and lets the port go; when the board is back under that name,
    # it is served again at once.
    hub = make_hub(1, webhook=True, listed=False)
    board = hub.board
    blank = _blank(hub)
    name = hub.tmp / "ttyUSB0"  # a device name, as udev gives it to whatever is plugged in

    def plug(port: str) -> None:
        tmp = hub.tmp / "ttyUSB0.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(port)
        tmp.replace(name)

    plug(board.port)
    cfg = hub.configure(harness.webhook_section(hub.pki, hub.backend.port), listed=False,
                        settings='\n[[serial]]\nport = "%s"\n' % name)

    async def scenario() -> Agent:
        agent = Agent(cfg)
        agent.links.identify_s = 3.0
        async with harness.running(agent):
            key = "serial:" + board.device_id
            await _until(lambda: _board(agent, board.device_id).get("state") == "connected", 30,
                         lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(board.stop)
            plug(blank.port)
            # Where the board was, nothing of ours speaks: "stalled", and the port let go.
            await _until(lambda: _board(agent, board.device_id).get("ends", {}).get("silent") == 1, 30,
                         lambda: agent.snapshot()["boards"])
            assert _board(agent, board.device_id)["state"] == "stalled"
            assert await asyncio.to_thread(_free, blank.port)
            assert blank.taps()[1] == b""
            await asyncio.to_thread(board.start)
            plug(board.port)
            await _until(lambda: _board(agent, board.device_id).get("state") == "connected"
                         and _board(agent, board.device_id)["connects"] == 3, 30, lambda: agent.snapshot()["boards"])
            assert _board(agent, board.device_id)["link"] == key
            await harness.finish(agent, [board])
        return agent

    agent = asyncio.run(scenario())
    acked, delivered, lost = _figures(hub)
    print("name taken: acknowledged %d, delivered %d, lost %d; ends %s" % (
        acked, delivered, lost, _board(agent, board.device_id)["ends"]))
    assert lost == 0 and acked > 0
    assert os.path.realpath(name) == os.path.realpath(board.port)


@pytest.mark.micropython
@pytest.mark.slow
def test_a_hung_board_is_stalled_then_served_again(make_hub: Callable[..., harness.Hub],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # The firmware hangs with USB up (the process stopped): nothing arrives.
    # The link reads "stalled" (never "connected"), its port is let go and
    # looked at again; the board's watchdog resets it, and it is served
    # again. Then one
    # unexpected exception inside the session (a bug): logged with its
    # traceback, counted, the link reopened.
    hub = make_hub(1, webhook=True)
    board = hub.board

    async def scenario() -> Agent:
        agent = Agent(hub.cfg)
        agent.links.stall_s, agent.links.identify_s, agent.links.release_retry_s = 3.0, 2.0, 1.0
        async with harness.running(agent):
            dev = board.device_id
            b = lambda: _board(agent, dev)  # noqa: E731
            # Connected by its hello, and a frame stored (so there is a last frame to tell).
            await _until(lambda: b().get("state") == "connected" and b().get("last_frame_at") is not None, 30,
                         lambda: agent.snapshot()["boards"])
            assert board.proc is not None
            os.killpg(board.proc.pid, signal.SIGSTOP)
            await _until(lambda: b().get("ends", {}).get("stalled", 0) >= 1, 20, b)
            await _until(lambda: b().get("ends", {}).get("silent", 0) >= 2, 20, b)  # reopened, still silent
            assert b()["state"] != "connected"
            assert b()["last_frame_at"] is not None  # its last frame is still told ("never" before)
            os.killpg(board.proc.pid, signal.SIGCONT)  # its watchdog resets it; it boots again by itself
            acked = len(harness.acked(board))
            await _until(lambda: b().get("state") == "connected" and len(harness.acked(board)) > acked + 3, 30, b)
            assert "watchdog reset" in board.console_tail()
            ingestor = agent.ingestor
            submit = ingestor.submit
            faults = [1]

            def buggy(*args: Any, **kw: Any) -> Any:  # fault injection: a bug, once
                if faults:
                    faults.pop()
                    raise RuntimeError("injected bug")
                return submit(*args, **kw)

            ingestor.submit = buggy  # type: ignore[method-assign]
            await _until(lambda: b().get("ends", {}).get("crashed") == 1 and b()["state"] == "connected", 30, b)
            acked = len(harness.acked(board))
            await _until(lambda: len(harness.acked(board)) > acked + 3, 30, b)
            await harness.finish(agent, [board])
        return agent

    with caplog.at_level(logging.ERROR, logger="agent.session"):
        agent = asyncio.run(scenario())
    assert any(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in caplog.records)
    acked, delivered, lost = _figures(hub)
    print("hung board, then a bug: acknowledged %d, delivered %d, lost %d; ends %s" % (
        acked, delivered, lost, _board(agent, board.device_id)["ends"]))
    assert lost == 0 and acked > 0


def test_a_ble_board_heard_until_its_link_dropped_reads_reconnecting_not_out_of_range(tmp_path: Any) -> None:
    # A connected BLE board does not advertise: when it was last seen stayed at its scan, so a link
    # that dropped after more than OUT_OF_RANGE_S connected (the board rebooting into an update, a
    # moment's interference) read "out of range" at once, and the status page told the patient "It
    # is out of range: bring it closer to the hub" (the demo's BLE board at its update's reboot).
    import secrets

    from agent.audit import AuditLog
    from agent.ble_links import OUT_OF_RANGE_S
    from agent.ingest import Ingestor
    from agent.links import LinkManager
    from agent.registry import Registry
    from agent.store import Store
    from agent.transports.base import TransportClosed
    from tests.agent.test_epoch_resync import DEV, _frame
    from tests.agent.test_wire_v1 import FakeTransport

    class Dropping(FakeTransport):
        name = "ble:" + DEV

        async def receive(self) -> bytes:
            if self.uplink:
                return self.uplink.pop(0)
            raise TransportClosed("disconnected", self.name, DEV)

    key, salt = secrets.token_bytes(32), secrets.token_bytes(16)
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=key, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    try:
        manager = LinkManager(Ingestor(store, reg))
        link = manager.link("ble", "ble:" + DEV)
        link.device_id = DEV
        link.last_seen = time.monotonic() - 2 * OUT_OF_RANGE_S  # its advertisement, then connected since
        asyncio.run(manager.attempt(link, Dropping([_frame(key, 1, seq, salt) for seq in range(3)]), False))
        assert link.stats is not None and link.stats.frames == 3
        board, = manager.snapshot(OUT_OF_RANGE_S)
        assert board["state"] == "backoff", board["state"]
        board, = manager.snapshot(0.0)  # not heard since, for longer than the bound: out of range
        assert board["state"] == "out_of_range", board["state"]
    finally:
        store.close()
        reg.close()
