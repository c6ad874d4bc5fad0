# `pulsebridge-dev demo` as a person sees it: the live view in a terminal, plain
# lines without one, Ctrl-C and its summary; never a board's binary output.
import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agent.dev import demo_view
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(now: float) -> dict[str, Any]:
    return {"boards": [{"device_id": "pb-sim01", "port": "/dev/pts/7", "state": "connected", "frames": 40,
                        "last_frame_at": now - 1},
                       {"device_id": "", "port": "/dev/pts/9", "state": "searching", "frames": 0,
                        "last_frame_at": None}],
            "last_vitals": {"pb-sim01": {"heart_rate": {"value": 72.4}, "spo2": {"value": 96.6},
                                         "pulse_rate": {"value": 73.0}}},
            "store": {"ingested": 80}, "rejects": {"bad_mac": 2}, "frames_stored": {"pb-sim01": 40},
            "backends": [{"forwarded": 91, "backlog": 4}]}


BACKEND = {"frames": 76, "vitals": {"heart_rate": {"n": 10}, "spo2": {"n": 5}}, "alerts": 1}


def test_live_view_shows_each_board_its_vitals_trace_and_what_each_count_means() -> None:
    now = time.time()
    beat = [0.0] * 40 + [10.0] + [0.0] * 40  # one R peak
    console = Console(file=io.StringIO(), width=130, color_system=None)
    console.print(demo_view.live_view(_snapshot(now), BACKEND, {"pb-sim01": beat * 6}, 12.0, "Ctrl-C stops."))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "pulsebridge demo: 2 simulated boards, 12 s" in text
    row = next(line for line in text.splitlines() if "pb-sim01" in line and "connected" in line)
    assert re.search(r"72 /min.*97 %.*73 /min.*40.*1 s ago", row), row
    assert "/dev/pts/9" in text and "not plugged in" in text and "never" in text
    assert re.search(r"stored and acknowledged +80 +verified, on the hub's disk, acknowledged", text), text
    assert re.search(r"forwarded +91 +confirmed by the backend: frames plus the hub's vitals and alerts", text)
    assert re.search(r"at the backend +76 +frames checked end to end there; with 15 vitals, 1 alerts", text)
    assert re.search(r"backlog +4 +stored, waiting to be forwarded", text) and re.search(r"refused +2 ", text)
    trace_line = next(line for line in text.splitlines() if "pb-sim01" in line and "█" in line)
    assert trace_line.count("█") == 6, trace_line  # each beat a peak
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text)


def test_plain_line_is_short_and_says_the_counts() -> None:
    snap = _snapshot(time.time())
    line = demo_view.plain_line(snap, BACKEND, 7.0)
    assert line == ("[   7s] boards 1/2 streaming | stored+acked 80 | forwarded 91 | backlog 4 | HR 72/min"
                    " | not streaming: /dev/pts/9 not plugged in"), line
    snap["boards"][1].update(device_id="pb-sim02", state="connected", frames=3)
    line = demo_view.plain_line(snap, BACKEND, 7.0)
    assert line == "[   7s] boards 2/2 streaming | stored+acked 80 | forwarded 91 | backlog 4 | HR 72/min -", line
    assert len(line) < 100


def _full_disk(now: float) -> dict[str, Any]:
    snap = _snapshot(now)
    snap["boards"][1].update(device_id="pb-sim02", state="connected", frames=38, last_frame_at=now - 1)
    snap["boards"][0]["frames"] = 52  # received and verified: 12 more than stored
    snap["frames_stored"] = {"pb-sim01": 40, "pb-sim02": 26}
    snap["now"] = now
    snap["store"] = {"state": "fault", "fault": "OperationalError: database or disk is full", "fault_since": now - 12,
                     "ingested": 80, "short_of_space": None}
    return snap


def test_a_full_disk_is_told_and_no_board_is_streaming_while_it_lasts() -> None:
    # Before: "boards 2/2 streaming" and nothing of the store while every commit failed (the
    # boards' links still up, their frames held unacknowledged).
    now = time.time()
    line = demo_view.plain_line(_full_disk(now), BACKEND, 30.0)
    assert line.startswith("[  30s] boards 0/2 streaming | stored+acked 80 |"), line
    assert line.endswith("| STORE FAULT 12 s: OperationalError: database or disk is full: nothing new stored or "
                         "acknowledged"), line
    console = Console(file=io.StringIO(), width=130, color_system=None)
    console.print(demo_view.live_view(_full_disk(now), BACKEND, {}, 30.0, "Ctrl-C stops."))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "STORE FAULT 12 s: OperationalError: database or disk is full" in text, text
    rows = [line for line in text.splitlines() if "pb-sim0" in line]
    assert len(rows) == 2 and all("its frames held: the store cannot write" in r for r in rows), text
    # The "frames stored" column counts what the store holds, not what the link received.
    assert re.search(r"pb-sim01 .* 40 +│ 1 s ago", rows[0]) and re.search(r"pb-sim02 .* 26 +│ 1 s ago", rows[1]), rows
    failing = dict(BACKEND, store_failing=True, store_failures=3,
                   last_store_error="OperationalError: database or disk is full")
    line = demo_view.plain_line(_full_disk(now), failing, 30.0)
    assert line.endswith("acknowledged | BACKEND CANNOT STORE (3 batches refused, the hub sends them again): "
                         "OperationalError: database or disk is full"), line
    short = dict(_snapshot(now), now=now, store={"state": "ok", "short_of_space": "disk_free", "ingested": 80,
                                                  "dropped_undelivered": 7})
    assert demo_view.plain_line(short, BACKEND, 3.0).endswith(
        "| STORE SHORT OF SPACE (disk_free): 7 frames deleted undelivered")


def test_cli_board_line_says_its_frames_are_held_on_a_store_fault() -> None:
    from agent.cli import _board_line

    snap = _full_disk(time.time())
    b = dict(snap["boards"][0], link="serial:pb-sim01", ends={}, last_error="")
    assert "board pb-sim01     connected, its frames held: the store cannot write, on /dev/pts/7" in _board_line(
        b, snap["store"])
    assert "board pb-sim01     connected, on /dev/pts/7" in _board_line(b, {"state": "ok"})
    # Closed as stalled (a frame waited 20 s for its commit): not "nothing received", which the board's
    # frames belie.
    stalled = dict(b, state="stalled", last_error="a frame waited 21 s to be stored and acknowledged")
    assert ("stalled: nothing delivered while the store cannot write, on /dev/pts/7" in _board_line(
        stalled, snap["store"])), _board_line(stalled, snap["store"])
    assert "last: a frame waited 21 s to be stored and acknowledged" in _board_line(stalled, snap["store"])


def test_trace_is_bounded_and_keeps_its_peaks() -> None:
    assert demo_view.trace([1.0]) == ""
    values = [0.0] * 1000
    values[500] = 5.0  # one sample peak among 1000, squeezed into 72 characters
    t = demo_view.trace(values)
    assert len(t) == demo_view.TRACE_WIDTH and t.count("█") == 1 and set(t) == {"▁", "█"}


def test_console_text_shows_a_boards_last_messages_without_its_frames() -> None:
    tail = "\x00\x81pulsebridge: pb-sim01 streaming over serial\r\n\x12\x34ab\x00\xffMemoryError: alloc\x03\x04"
    assert demo_view.console_text(tail) == "pulsebridge: pb-sim01 streaming over serial | MemoryError: alloc"
    assert demo_view.console_text("\x00\x01") == "(no text)"


def _demo(stdout: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "agent.dev.cli", "demo"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.STDOUT)


class _Output:
    """A running demo's stdout (a pipe), read as it comes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.stdout = proc.stdout
        self.data = b""

    def ctrl_c(self, timeout_s: float) -> str:
        """Ctrl-C, then all it prints until it ends (within timeout_s): the whole output as text."""
        self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=timeout_s)
        self.data += rest
        return self.data.decode("utf-8")

    def seen(self, pattern: bytes) -> bool:
        """Reads what is there (waiting 0.2 s at most); True once pattern is in all read so far."""
        if select.select([self.stdout], [], [], 0.2)[0]:
            self.data += os.read(self.stdout.fileno(), 65536)
        return re.search(pattern, self.data) is not None

    def tail(self) -> bytes:
        return self.data[-2000:]


def _summary(text: str) -> dict[str, int]:
    counts = {}
    m = re.search(r"(\d+) frames built by the boards = (\d+) stored by the hub \+ (\d+) still on the boards \+ "
                  r"(\d+) dropped by the boards", text)
    assert m, text[-3000:]
    counts.update(built=int(m.group(1)), stored_of_built=int(m.group(2)), on_boards=int(m.group(3)),
                  dropped=int(m.group(4)))
    m = re.search(r"(\d+) stored by the hub = (\d+) at the backend, checked end to end \+ (\d+) not delivered", text)
    assert m, text[-3000:]
    counts.update(acked=int(m.group(1)), backend=int(m.group(2)), undelivered=int(m.group(3)))
    m = re.search(r"(\d+) lost \(dropped by the boards, or stored and not delivered\)", text)
    assert m, text[-3000:]
    counts["lost"] = int(m.group(1))
    counts["store_ok"] = int("the hub's store: ok, its file: ok" in text)
    return counts


def _check_counts(c: dict[str, int]) -> None:
    # Right counts that add up as printed: nothing lost, every stored frame at the backend, every
    # frame built stored or still on its board.
    assert c["lost"] == 0 and c["acked"] > 0 and c["backend"] == c["acked"] and c["undelivered"] == 0, c
    assert c["built"] == c["stored_of_built"] + c["on_boards"] + c["dropped"] and c["dropped"] == 0, c
    assert c["stored_of_built"] == c["acked"] and c["store_ok"], c


@pytest.mark.micropython
@pytest.mark.slow
def test_demo_without_a_terminal_prints_plain_lines_and_ctrl_c_gives_the_summary(micropython: str) -> None:
    # Before: Ctrl-C printed no summary (exit 130).
    proc = _demo(subprocess.PIPE)
    out = _Output(proc)
    try:
        wait_for(lambda: out.seen(rb"stored\+acked [1-9]\d* \|"), 120, "frames stored", out.tail)
        text = out.ctrl_c(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert "Status page: http://127.0.0.1:" in text and "(user hub, password " in text
    assert "Stopping: the boards, then what the hub still holds is forwarded" in text
    _check_counts(_summary(text))
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), "control characters on the screen"
    assert "┏" not in text  # no live view drawn into a pipe


@pytest.mark.micropython
@pytest.mark.slow
def test_demo_in_a_terminal_draws_the_live_view_and_ctrl_c_gives_the_summary(micropython: str) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 45, 130, 0, 0))
    proc = _demo(slave)
    os.close(slave)
    out = b""

    def read() -> None:
        nonlocal out
        while select.select([master], [], [], 0.1)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # the demo is gone
                return
            if not data:
                return
            out += data
    try:
        def drawn() -> bool:
            read()
            trace = re.search(rb"pb-sim0\d.{0,40}?(?:\xe2\x96[\x81-\x88]){20}", out)
            return b"ECG, last 4 s" in out and trace is not None
        wait_for(drawn, 120, "the live view with an ECG trace", lambda: out[-2000:])
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: read() or proc.poll() is not None, 120, "the demo's end", lambda: out[-2000:])
        read()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode("utf-8")
    assert proc.returncode == 0, text[-3000:]
    assert "stored and acknowledged" in text and "heart rate" in text
    _check_counts(_summary(text))
    # Escape sequences redraw the view; nothing else below a space (a board's binary frames).
    assert not re.search(r"[\x00-\x08\x0b-\x0c\x0e-\x1a\x1c-\x1f\x7f]", text), "binary on the screen"


def _result(**kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "seconds": 30.2, "boards": [{}, {}], "frames_generated": 61, "frames_stored_of_generated": 60,
        "frames_still_on_boards": 1, "frames_dropped_by_boards": 0, "frames_acknowledged": 60,
        "frames_forwarded": 60, "frames_unacked_at_stop": 1, "frames_lost": 0, "rejects": {},
        "store_integrity": "ok", "vitals_at_backend": {"spo2": {"n": 3}}, "alerts_at_backend": 0,
        "boards_without_stop_summary": [],
        "store_at_stop": {"state": "ok", "fault": None, "fault_for_s": None, "short_of_space": None,
                          "dropped_undelivered": 0, "commit_failures": 0, "faults_recovered": 0}}
    r.update(kw)
    return r


@pytest.mark.micropython
@pytest.mark.slow
def test_demo_on_a_full_disk_says_so_live_and_in_its_summary(micropython: str, tmp_path: Path) -> None:
    # The demo's whole run (hub, backend, boards' flash) on a 24 MB file system that fills up while
    # it runs. Before: "boards 2/2 streaming" every second while no commit succeeded, tracebacks from
    # the local backend, and "the hub's store: ok" in the summary, exit status 0.
    from tests.agent.test_store_faults import fill, small_filesystem

    with small_filesystem(tmp_path / "card", 24 * 1024) as card:
        proc = subprocess.Popen([sys.executable, "-m", "agent.dev.cli", "demo"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TMPDIR=str(card)))
        out = _Output(proc)
        try:
            wait_for(lambda: out.seen(rb"stored\+acked [1-9]\d* \|"), 120, "frames stored", out.tail)
            fill(card / "filler")
            wait_for(lambda: out.seen(rb"STORE FAULT \d+ s: [^\n]*disk is full"), 60,
                     "the live line telling the fault", out.tail)
            text = out.ctrl_c(180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    told = [line for line in text.splitlines() if "STORE FAULT" in line]
    assert told and all("boards 0/2 streaming" in line for line in told), told
    assert "Traceback" not in text, text[-3000:]
    assert "the hub's store: FAULT at the stop" in text and "store: ok" not in text, text[-3000:]
    c = _summary(text)
    assert c["built"] == c["stored_of_built"] + c["on_boards"] + c["dropped"] and c["on_boards"] > 0, c
    assert proc.returncode == 1, text[-3000:]  # the hub could not store: not a success


@pytest.mark.micropython
def test_the_demo_hub_names_each_port_by_a_name_that_goes_with_its_board(micropython: str, sim_cache: Path,
                                                                         tmp_path: Path) -> None:
    # Seen in a demo run: its boards stopped, the hub retried their /dev/pts paths while draining,
    # and found another program's pseudo-terminal under a freed number ("Could not exclusively lock
    # port /dev/pts/2"). A board's stable name goes with it, as udev's does.
    from agent.dev import demo
    from agent.dev.sim import boards
    from agent.dev.sim.runner import SimulatedBoard

    sim = SimulatedBoard(boards.BoardSpec("pb-sim01"), tmp_path / "boards" / "pb-sim01", sim_cache,
                         micropython)
    sim.start()
    try:
        cfg = demo.agent_config(tmp_path, [sim], None, 1, tmp_path / "ca.pem", None)
        port = cfg.serial[0].port
        assert port is not None and os.path.realpath(port) == os.path.realpath(sim.port)
        freed = sim.port
    finally:
        sim.stop()
    master, slave = pty.openpty()  # the next pseudo-terminal opened: often under the number just freed
    try:
        assert not os.path.exists(port), "the hub's port %s is now %s (freed %s)" % (
            port, os.path.realpath(port), freed)
    finally:
        os.close(master)
        os.close(slave)


def test_summary_lines_say_what_each_count_means_and_how_they_add_up() -> None:
    from agent.dev import demo

    lines = demo.summary_lines(_result())
    assert lines[0] == "Summary after 30 s with 2 boards:", lines
    text = "\n".join(lines)
    # Before: "61 built", "60 stored and acknowledged", "1 awaiting their ack", each on its own
    # line: how they relate was left to the reader.
    assert "61 frames built by the boards = 60 stored by the hub + 1 still on the boards + 0 dropped" in text, text
    assert "60 stored by the hub = 60 at the backend, checked end to end + 0 not delivered" in text, text
    assert "(the hub's 3 vitals and 0 alerts went to the backend too)" in text, text
    assert lines[-1] == "  the hub's store: ok, its file: ok", lines
    unknown = demo.summary_lines(_result(boards=[{}, {}], boards_without_stop_summary=["pb-sim01"],
                                         frames_acknowledged=90))
    assert "  frames built unknown for pb-sim01: no stop summary on its console" in unknown, unknown
    killed = demo.summary_lines(_result(boards=[{}, {}], boards_without_stop_summary=["pb-sim01"],
                                        boards_ended_before_stop={"pb-sim01": -9}))
    assert ("  frames built unknown for pb-sim01: its process had ended before the stop (killed by signal 9: "
            "for a board, a power cut)") in killed, killed
    # Its frames are in what the hub stored, not in what the others built: said so.
    assert ("61 frames built by the boards that gave their count = 60 stored by the hub + 1 still on the boards"
            in unknown[1]), unknown


def test_summary_tells_a_store_fault_at_the_stop() -> None:
    # Before: "the hub's store: ok" (its file's integrity) while every commit was failing.
    from agent.dev import demo

    full = _result(frames_generated=180, frames_stored_of_generated=72, frames_still_on_boards=86,
                   frames_dropped_by_boards=22, frames_acknowledged=72, frames_forwarded=68, frames_lost=26,
                   store_at_stop={"state": "fault", "fault": "OperationalError: database or disk is full",
                                  "fault_for_s": 31.4, "short_of_space": None, "dropped_undelivered": 0,
                                  "commit_failures": 16, "faults_recovered": 0})
    text = "\n".join(demo.summary_lines(full))
    assert "180 frames built by the boards = 72 stored by the hub + 86 still on the boards + 22 dropped" in text
    assert "72 stored by the hub = 68 at the backend, checked end to end + 4 not delivered" in text, text
    assert ("the hub's store: FAULT at the stop, for 31 s: OperationalError: database or disk is full; it stored "
            "nothing new and acknowledged nothing since (its file: ok)") in text, text
    assert "store: ok" not in text
    refused = "\n".join(demo.summary_lines(dict(full, backend_store_failures=4,
                                                 backend_last_store_error="OperationalError: disk I/O error")))
    assert ("the backend could not store 4 batches (last: OperationalError: disk I/O error); the hub kept them and "
            "sent them again") in refused, refused


def test_ble_summary_carries_the_air_figures() -> None:
    from agent.dev import demo

    air = {"frames_per_s": 3.9, "notifications": 5210, "notification_bytes": 1030000, "lost": 212, "connects": 14,
           "forced_disconnects": 11, "adapter_losses": 0, "att_bytes_per_sample_value": 1.412,
           "l2cap_bytes_per_sample_value": 1.46, "hub_reconnect_s": {"n": 11, "median": 0.61, "max": 2.3}}
    text = "\n".join(demo.summary_lines(_result(air=air, link="ble")))
    assert ("over the air: 3.90 frames/s at the backend; 5210 notifications (1030000 bytes), 212 lost on air; "
            "14 connections, 11 forced disconnects, 0 adapter losses") in text, text
    assert "1.412 as ATT values, 1.46 with ATT and L2CAP headers" in text, text
    assert "the hub's reconnections: 11, median 0.61 s, longest 2.30 s" in text, text
    assert "over the air" not in "\n".join(demo.summary_lines(_result()))


def test_the_view_and_the_line_show_each_boards_firmware_and_its_update() -> None:
    now = time.time()
    snap = _snapshot(now)
    snap["boards"][0].update(firmware="pulsebridge-fw 0.1.0", update={
        "state": "receiving", "offset": 500, "total": 1000, "version": "pulsebridge-fw 0.2.0"})
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(demo_view.live_view(snap, BACKEND, {}, 12.0, "Ctrl-C stops."))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "pb-sim01: pulsebridge-fw 0.1.0; updating pulsebridge-fw 0.2.0: 50 % received" in text, text
    assert "/dev/pts/9:" not in text  # no update, no line
    line = demo_view.plain_line(snap, BACKEND, 12.0)
    assert line.endswith("| pb-sim01 updating pulsebridge-fw 0.2.0: 50 % received"), line
    snap["boards"][0]["update"] = {"state": "rolled_back", "version": "pulsebridge-fw 0.3.0"}
    assert "rolled" not in demo_view.plain_line(snap, BACKEND, 12.0)  # an outcome: in the table and the summary
