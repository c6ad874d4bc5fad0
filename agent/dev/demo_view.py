"""What `pulsebridge-dev demo` shows while it runs.

In a terminal: a live view drawn with rich (a well-kept library that
redraws in place and measures the terminal, tmux included): each board's
state, heart rate, SpO2 and pulse, its ECG trace as text, and the frame
counts with what each means. Without a terminal (a pipe, a log file,
CI): one short plain line a second. Only printable text reaches the screen.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from agent import ota, status_text

# Eight heights of a block: an ECG trace in one line of text.
_BLOCKS = "▁▂▃▄▅▆▇█"
TRACE_WIDTH = 72


def trace(values: list[float], width: int = TRACE_WIDTH) -> str:
    """values as one line of at most `width` block characters (the min-max of each slice, so R
    peaks survive the downsampling); "" for fewer than 2 values."""
    if len(values) < 2:
        return ""
    n = min(width, len(values))
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    out = []
    for i in range(n):
        part = values[i * len(values) // n:(i + 1) * len(values) // n] or values[-1:]
        # The slice's value farthest from the trace's middle: peaks and troughs stay visible.
        mid = (lo + hi) / 2
        v = max(part, key=lambda x: abs(x - mid))
        out.append(_BLOCKS[min(len(_BLOCKS) - 1, int((v - lo) / span * len(_BLOCKS)))])
    return "".join(out)


def _vital(snap: dict[str, Any], dev: str, kind: str, unit: str) -> str:
    v = snap.get("last_vitals", {}).get(dev, {}).get(kind)
    return "%.0f %s" % (v["value"], unit) if v else "-"


def _age(at: float | None, now: float) -> str:
    return "never" if not at else "%.0f s ago" % max(0.0, now - at)


def counts(snap: dict[str, Any], backend: dict[str, Any]) -> list[tuple[str, int, str]]:
    """The frame counts, each with what it means: (name, value, meaning)."""
    fw = snap["backends"][0] if snap["backends"] else {"forwarded": 0, "backlog": 0}
    vitals = sum(v["n"] for v in backend.get("vitals", {}).values())
    return [
        ("stored and acknowledged", snap["store"]["ingested"],
         "verified, on the hub's disk, acknowledged: the board may forget them"),
        ("forwarded", fw["forwarded"], "confirmed by the backend: frames plus the hub's vitals and alerts"),
        ("at the backend", backend.get("frames", 0),
         "frames checked end to end there; with %d vitals, %d alerts" % (vitals, backend.get("alerts", 0))),
        ("backlog", fw["backlog"], "stored, waiting to be forwarded"),
        ("refused", sum(snap["rejects"].values()), "not authentic or damaged: not stored"),
    ]


def live_view(snap: dict[str, Any], backend: dict[str, Any], waves: dict[str, list[float]], elapsed_s: float,
              footer: str) -> RenderableType:
    """The live view: a table of boards, their ECG traces, the counts; footer under them. snap: the
    agent's snapshot, with "frames_stored" {device id: sample frames stored} (Agent.frames_stored)."""
    now = time.time()
    boards = Table(title="pulsebridge demo: %d simulated boards, %.0f s" % (len(snap["boards"]), elapsed_s),
                   title_justify="left", expand=False)
    for col in ("board", "state", "heart rate", "SpO2", "pulse", "frames stored", "last frame"):
        boards.add_column(col, justify="right" if col in ("heart rate", "SpO2", "pulse", "frames stored") else "left")
    store = snap.get("store", {})
    # Stored, not merely received: a board's link counts what it verified (b["frames"]), which goes on
    # while the store cannot write.
    stored = snap.get("frames_stored", {})
    for b in snap["boards"]:
        dev = b["device_id"] or b["port"]
        state = Text(status_text.board_state(b, store), style="green" if status_text.streaming(b, store) else "yellow")
        boards.add_row(dev, state, _vital(snap, dev, "heart_rate", "/min"), _vital(snap, dev, "spo2", "%"),
                       _vital(snap, dev, "pulse_rate", "/min"), str(stored.get(b["device_id"], 0)),
                       _age(b["last_frame_at"], now))
    traces = Table.grid(padding=(0, 1))
    for dev, values in waves.items():
        line = trace(values)
        traces.add_row(Text(dev, style="bold"), Text(line or "(no ECG yet)", style="red" if line else "dim"))
    numbers = Table.grid(padding=(0, 2))
    for name, value, meaning in counts(snap, backend):
        numbers.add_row(Text(name, style="bold"), Text(str(value), justify="right"), Text(meaning, style="dim"))
    parts: list[RenderableType] = [boards]
    for b in snap["boards"]:  # firmware updates: each board's, as the hub last heard of it
        if b.get("update") and b["device_id"]:
            parts.append(Text("%s: %s" % (b["device_id"], firmware(b)), style="cyan"))
    trouble = status_text.store_brief(store, snap.get("now", now))
    if trouble:  # above everything else: nothing new is kept while it lasts
        parts.append(Text(trouble, style="bold red"))
    if backend.get("store_failing"):
        parts.append(Text(backend_trouble(backend), style="bold red"))
    parts += [Panel(traces, title="ECG, last 4 s", title_align="left"),
              Panel(numbers, title="frames", title_align="left"), Text(footer)]
    return Group(*parts)


def firmware(board: dict[str, Any]) -> str:
    """The firmware a board's hello named, and its update's state if it has one (agent/ota.py)."""
    update = ota.describe(board.get("update"))
    return "%s%s" % (board.get("firmware") or "not heard yet", "; " + update if update else "")


def plain_line(snap: dict[str, Any], backend: dict[str, Any], elapsed_s: float) -> str:
    """One short line (under 100 characters with up to a few boards, all well) for a pipe or a log;
    longer when something is wrong, which it says: the store's trouble (a board whose frames it
    cannot store is not streaming), or the boards that are not streaming and why."""
    store = snap.get("store", {})
    streaming = [b for b in snap["boards"] if status_text.streaming(b, store)]
    c = {name: value for name, value, _ in counts(snap, backend)}
    hr = " ".join(_vital(snap, b["device_id"], "heart_rate", "/min").replace(" ", "")
                  for b in snap["boards"] if b["device_id"])
    line = "[%4.0fs] boards %d/%d streaming | stored+acked %d | forwarded %d | backlog %d | HR %s" % (
        elapsed_s, len(streaming), len(snap["boards"]), c["stored and acknowledged"], c["forwarded"], c["backlog"],
        hr)
    trouble = status_text.store_brief(store, snap.get("now", time.time()))
    if trouble:
        return line + " | " + trouble + backend_trouble(backend, " | ")
    if backend.get("store_failing"):
        return line + backend_trouble(backend, " | ")
    idle = ["%s %s" % (b["device_id"] or b["port"], status_text.board_state(b, store))
            for b in snap["boards"] if b not in streaming and b["state"] != "connected"]
    # Updates under way (an outcome shows in the live view's table and in the summary).
    updates = ["%s %s" % (b["device_id"], ota.describe(b["update"])) for b in snap["boards"]
               if b.get("update") and b["device_id"] and not ota.final(str(b["update"].get("state", "")))]
    return line + (" | not streaming: " + ", ".join(idle) if idle else "") + (
        " | " + ", ".join(updates) if updates else "")


def backend_trouble(backend: dict[str, Any], lead: str = "") -> str:
    """The local backend's storage failing (its disk full), in a few words after lead; "" when it stores."""
    if not backend.get("store_failing"):
        return ""
    return "%sBACKEND CANNOT STORE (%d batches refused, the hub sends them again): %s" % (
        lead, backend.get("store_failures", 0), backend.get("last_store_error", ""))


def console_text(tail: str, runs: int = 6) -> str:
    """The last `runs` stretches of text (8 printable characters or more) in a board's console tail,
    as `strings` would show them: its last messages without the binary frames around them."""
    found = re.findall(r"[ -~]{8,}", tail)
    return " | ".join(found[-runs:]) or "(no text)"
