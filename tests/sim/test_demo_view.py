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
            "store": {"ingested": 80}, "rejects": {"bad_mac": 2},
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
    assert "/dev/pts/9" in text and "searching" in text and "never" in text
    assert re.search(r"stored and acknowledged +80 +verified, on the hub's disk, acknowledged", text), text
    assert re.search(r"forwarded +91 +confirmed by the backend: frames plus the hub's vitals and alerts", text)
    assert re.search(r"at the backend +76 +frames checked end to end there; with 15 vitals, 1 alerts", text)
    assert re.search(r"backlog +4 +stored, waiting to be forwarded", text) and re.search(r"refused +2 ", text)
    trace_line = next(line for line in text.splitlines() if "pb-sim01" in line and "█" in line)
    assert trace_line.count("█") == 6, trace_line  # each beat a peak
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text)


def test_plain_line_is_short_and_says_the_counts() -> None:
    line = demo_view.plain_line(_snapshot(time.time()), BACKEND, 7.0)
    assert line == "[   7s] boards 1/2 streaming | stored+acked 80 | forwarded 91 | backlog 4 | HR 72/min", line
    assert len(line) < 100


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


def _summary(text: str) -> dict[str, int]:
    counts = {}
    for key, pattern in (("built", r"(\d+) frames built by the boards"),
                         ("acked", r"(\d+) stored and acknowledged by the hub"),
                         ("backend", r"(\d+) at the backend, checked end to end"),
                         ("unacked", r"(\d+) awaiting their ack on the boards at the stop"),
                         ("lost", r"(\d+) lost, \d+ refused; the hub's store: ok")):
        m = re.search(pattern, text)
        assert m, (key, text[-3000:])
        counts[key] = int(m.group(1))
    return counts


def _check_counts(c: dict[str, int]) -> None:
    # Right counts: nothing lost, every acknowledged frame at the backend, and what the boards built
    # but the hub did not acknowledge is what they still held at the stop.
    assert c["lost"] == 0 and c["acked"] > 0 and c["backend"] == c["acked"], c
    assert 0 <= c["built"] - c["acked"] <= c["unacked"], c


@pytest.mark.micropython
@pytest.mark.slow
def test_demo_without_a_terminal_prints_plain_lines_and_ctrl_c_gives_the_summary(micropython: str) -> None:
    # Before: Ctrl-C printed no summary (exit 130).
    proc = _demo(subprocess.PIPE)
    assert proc.stdout is not None
    out = b""
    try:
        def streaming() -> bool:
            nonlocal out
            if select.select([proc.stdout], [], [], 0.2)[0]:
                out += os.read(proc.stdout.fileno(), 65536)
            return re.search(rb"stored\+acked [1-9]\d* \|", out) is not None
        wait_for(streaming, 120, "frames stored", lambda: out[-2000:])
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode("utf-8")
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


def test_summary_lines_say_what_each_count_means() -> None:
    from agent.dev import demo

    lines = demo.summary_lines({"seconds": 30.2, "boards": [{}, {}], "frames_generated": 61,
                                "frames_acknowledged": 60, "frames_forwarded": 60, "frames_unacked_at_stop": 1,
                                "frames_lost": 0, "rejects": {}, "store_integrity": "ok",
                                "vitals_at_backend": {"spo2": {"n": 3}}, "alerts_at_backend": 0,
                                "boards_without_stop_summary": []})
    assert lines[0] == "Summary after 30 s with 2 boards:" and "60 at the backend" in lines[3], lines
    assert "(the hub's 3 vitals and 0 alerts went too)" in lines[3] and len(lines) == 6, lines
    unknown = demo.summary_lines({**dict(seconds=1, boards=[{}], frames_generated=0, frames_acknowledged=5,
                                         frames_forwarded=5, frames_unacked_at_stop=0, frames_lost=0, rejects={},
                                         store_integrity="ok", vitals_at_backend={}, alerts_at_backend=0),
                                  "boards_without_stop_summary": ["pb-sim01"]})
    assert unknown[-1] == "  frames built unknown for pb-sim01: no stop summary on its console", unknown
