"""`pulsebridge demo`: the whole pipeline on one machine, on embedded defaults.

Simulated boards (the firmware under micropython, on ptys) stream to the
agent over its serial transport; the agent verifies, stores and forwards to
the embedded local backend over HTTPS (its own CA, verification on), which
checks every frame end to end. The status page is served on loopback with
a one-time password (printed with its address). Live progress each second
(agent/dev/demo_view.py: a live view in a terminal, plain lines otherwise);
at the end, or at Ctrl-C, the boards are stopped (Ctrl-C on their consoles,
as a technician would), the agent drains its backlog, and the summary
counts frames generated, acknowledged, forwarded and lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from agent.audit import AuditLog
from agent.config import AgentConfig, BleConfig, SerialConfig
from agent.dev import demo_ota, demo_view, release
from agent.dev.bench_ota import stream_report
from agent.dev.local_backend import LocalBackend
from agent.dev.sim.air import Air
from agent.dev.sim.runner import SimulatedBoard
from agent.dev.simrun import SimOptions, board_specs, start_air
from agent.dev.tlsgen import make_pki
from agent.forwarders.webhook import WebhookConfig
from agent.provision import build
from agent.provision.build import default_cache
from agent.registry import Registry, write_private
from agent.status_server import SUN_PATH_BYTES
from agent.supervisor import Agent

# A boot's stop summary (firmware_mpy/app/main.py): at a Ctrl-C, and in the simulation at the reset an
# update's switch or rollback makes.
_BUILT = re.compile(r"stopped after (\d+) frames built, (\d+) awaiting an ack, (\d+) dropped(?:, boot epoch (\d+))?")
DRAIN_TIMEOUT_S = 30.0
# The status page's port, once the agent has it open, is awaited this long.
PAGE_UP_S = 10.0


def _frames_built(console: str) -> tuple[int, int, int, int | None] | None:
    """The last stop summary on a console: (frames built, awaiting an ack, dropped, boot epoch or None)."""
    found = _BUILT.findall(console)
    if not found:
        return None
    built, awaiting, dropped, epoch = found[-1]
    return int(built), int(awaiting), int(dropped), int(epoch) if epoch else None


async def run_demo(opts: SimOptions, out: IO[str]) -> dict[str, Any]:
    # Ctrl-C from here on: the run stops, the boards are stopped and the summary follows (a
    # KeyboardInterrupt while boards start would leave their processes running: each has its own session).
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread: no Ctrl-C handling
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        with tempfile.TemporaryDirectory(prefix="pulsebridge-demo-") as tmp_s, _air_directory(Path(tmp_s)) as air_dir:
            tmp = Path(tmp_s)
            air = start_air(opts, air_dir)
            try:
                return await _run_demo(opts, out, tmp, air, interrupted)
            finally:
                if air is not None:
                    air.stop()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


@contextlib.contextmanager
def _air_directory(tmp: Path) -> Iterator[Path]:
    """Where the software radio's sockets go: tmp/air, or, when their addresses would not fit a Unix
    socket's (SUN_PATH_BYTES: a deep TMPDIR), a directory of its own under /tmp, removed after."""
    if len(os.fsencode(str(tmp / "air" / "boards.sock"))) <= SUN_PATH_BYTES:
        yield tmp / "air"
        return
    with tempfile.TemporaryDirectory(prefix="pb-air-", dir="/tmp") as short:
        yield Path(short)


async def _run_demo(opts: SimOptions, out: IO[str], tmp: Path, air: Air | None,
                    interrupted: asyncio.Event) -> dict[str, Any]:
    specs = board_specs(opts, air)
    vendor: Ed25519PrivateKey | None = None
    if opts.updates:
        # The vendor key for this run's releases: made now, in this process's memory only (never a
        # key shipped with the project); the boards hold its public key, as provisioning writes it.
        vendor = Ed25519PrivateKey.generate()
        for spec in specs:
            spec.vendor_keys = release.public_key(vendor)
    pki = make_pki(tmp / "pki")
    backend = LocalBackend(tmp / "backend.db", {s.device_id: s.key for s in specs})
    port = await backend.start("127.0.0.1", 0, pki.server_cert, pki.server_key)
    sims = [SimulatedBoard(spec, tmp / "boards" / spec.device_id, default_cache()) for spec in specs]
    for sim in sims:
        await asyncio.to_thread(sim.start)
    password = secrets.token_urlsafe(12)  # 16 characters, for this run only
    write_private(tmp / "status.password", (password + "\n").encode())
    cfg = agent_config(tmp, sims, air, port, pki.ca_cert, None if opts.json else tmp / "status.password")
    registry = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
    for spec in specs:
        registry.add(spec.device_id, label="simulated board %s" % spec.device_id[-2:], key=spec.key, actor="demo")
    registry.close()
    agent = Agent(cfg)
    plan: demo_ota.UpdatePlan | None = None
    if vendor is not None:
        good, broken = demo_ota.make_releases(vendor, build.compile_firmware(default_cache()))
        plan = demo_ota.UpdatePlan(agent, sims, good, broken)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    t0 = time.monotonic()
    footer = "Ctrl-C stops the boards, lets the hub forward what it holds, and prints the summary."
    if not opts.json:
        end = time.monotonic() + PAGE_UP_S
        while not agent.status.page_port and time.monotonic() < end and not task.done():
            await asyncio.sleep(0.05)
        if agent.status.page_port:
            footer = ("Status page: http://127.0.0.1:%d/ (user hub, password %s, for this run only). "
                      % (agent.status.page_port, password)) + footer
        print(footer, file=out)
        out.flush()
    tty = not opts.json and out.isatty()
    try:
        with _live(out, tty) as show:
            while opts.seconds is None or time.monotonic() - t0 < opts.seconds:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await interrupted.wait()
                if task.done() or interrupted.is_set():
                    break
                if plan is not None:
                    plan.step()
                    if opts.stop_after_updates and plan.done():
                        break
                if not opts.json:
                    show(agent, backend.summary(), time.monotonic() - t0, footer)
    finally:
        if interrupted.is_set() and not opts.json:
            print("Stopping: the boards, then what the hub still holds is forwarded (up to %.0f s)..."
                  % DRAIN_TIMEOUT_S, file=out)
        consoles = []
        ended: dict[str, int | None] = {}  # boards whose process had ended before the stop: exit status
        for sim in sims:
            if not sim.alive():
                ended[sim.device_id] = sim.proc.returncode if sim.proc is not None else None
            await asyncio.to_thread(sim.stop)
            consoles.append(sim.console_tail())
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline and not task.done():
            snap = agent.snapshot()
            if all(b["backlog"] == 0 for b in snap["backends"]):
                break
            await asyncio.sleep(0.2)
        snap = agent.snapshot()
        stored_by_board = dict(agent.frames_stored)
        stored_by_epoch = dict(agent.frames_stored_by_epoch)
        stop.set()
        await task
        summary = backend.summary()
        await backend.stop()
    integrity = agent.store.integrity_check()
    result = _result(specs, consoles, snap, summary, integrity, time.monotonic() - t0, stored_by_board, ended,
                     [sim.ended_boots for sim in sims], stored_by_epoch)
    result["link"] = opts.link
    if plan is not None and vendor is not None:
        result["updates"] = await _update_figures(plan, vendor, cfg.store_path)
    if air is not None:
        result["air"] = _air_figures(air, agent, summary, time.monotonic() - t0,
                                     {s.device_id for s in specs if s.link == "ble"})
    return result


async def _update_figures(plan: demo_ota.UpdatePlan, vendor: Ed25519PrivateKey, store_path: Path) -> dict[str, Any]:
    """The updates' figures for the summary: each push (demo_ota.Push) with its board's longest pause
    in streaming (from the hub's store), and the board's signature check at an ESP32's speed."""
    pauses: dict[str, dict[str, Any]] = {}
    for dev in plan.queues:
        r = await asyncio.to_thread(stream_report, store_path, dev)
        pauses[dev] = {"pause_ms": r["pause_ms"], "pause_where": r["pause_where"]}
    good = next(p.release for p in plan.pushes if not p.release.broken)
    sig: dict[str, Any]
    try:
        sig = await asyncio.to_thread(demo_ota.signature_check_at_chip_speed, good, release.public_key(vendor))
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        sig = {"target": "esp32", "error": str(e)[-300:]}
    return {"vendor_key": "Ed25519, made for this run; its private key in the demo's memory only",
            "pushes": plan.results(pauses), "signature_check": sig}


def agent_config(tmp: Path, sims: list[SimulatedBoard], air: Air | None, backend_port: int, ca_file: Path,
                 password_file: Path | None) -> AgentConfig:
    """The demo hub's configuration, under tmp: the boards' serial ports (or the air), the local
    backend on backend_port, the status page on loopback (with password_file). Each port is named
    by the board's stable name (SimulatedBoard.link_path), which goes with its board, as udev's
    does: its /dev/pts number, once freed, is the next pseudo-terminal opened on the machine,
    another program's."""
    return AgentConfig(hub_id="demo-hub", data_dir=tmp / "hub" / "data", log_dir=tmp / "hub" / "log",
                       run_dir=tmp / "hub" / "run",
                       serial=[SerialConfig(port=str(s.link_path)) for s in sims if s.spec.link == "serial"],
                       ble=BleConfig(air=str(air.central_path)) if air else None,
                       backends=[WebhookConfig(name="local", type="webhook",
                                               url="https://127.0.0.1:%d/ingest" % backend_port, ca_file=ca_file)],
                       status_page_listen="127.0.0.1:0", status_page_password_file=password_file)


def _air_figures(air: Air, agent: Agent, backend: dict[str, Any], elapsed: float,
                 ble_devices: set[str]) -> dict[str, Any]:
    """What went over the software radio (from ble_devices, the boards on it), per second and per
    sample delivered."""
    snap = air.snapshot()
    samples = {"ecg": 0, "ppg": 0}
    frames = 0
    for dev, streams in backend["by_device"].items():
        if dev not in ble_devices:
            continue
        for name, v in streams.items():
            samples["ppg" if "ppg" in name else "ecg"] += v["samples"] or 0
            frames += v.get("frames", 0)
    values = samples["ecg"] + 2 * samples["ppg"]  # a PPG sample is a red and an IR value
    reconnects = sorted(t for lk in (agent.ble.links.values() if agent.ble else ()) for t in lk.reconnect_s)
    snap.update({
        "frames_per_s": round(frames / elapsed, 2) if elapsed else 0.0,
        "samples_at_backend": samples,
        # Notification payloads (ATT values) over sample values delivered,
        # all overhead included (fragment headers, hello, status, resends).
        "att_bytes_per_sample_value": round(snap["notification_bytes"] / values, 3) if values else None,
        # The same with the ATT (3 B) and L2CAP (4 B) headers of each notification.
        "l2cap_bytes_per_sample_value": (round((snap["notification_bytes"] + 7 * snap["notifications"]) / values, 3)
                                         if values else None),
        "hub_reconnect_s": {"n": len(reconnects),
                            "median": reconnects[len(reconnects) // 2] if reconnects else None,
                            "max": reconnects[-1] if reconnects else None},
    })
    return snap


@contextlib.contextmanager
def _live(out: IO[str], tty: bool) -> Any:
    """Yields show(agent, backend summary, elapsed s, footer): in a terminal a live view redrawn in
    place (the agent's log lines printed above it), otherwise one plain line a second."""
    if not tty:
        def line(agent: Agent, backend: dict[str, Any], t: float, footer: str) -> None:
            print(demo_view.plain_line(agent.snapshot(), backend, t), file=out)
            out.flush()
        yield line
        return
    console = Console(file=out)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [RichHandler(console=console, show_path=False)]
    try:
        with Live(console=console, auto_refresh=False, redirect_stderr=False) as live:
            def show(agent: Agent, backend: dict[str, Any], t: float, footer: str) -> None:
                snap = dict(agent.snapshot(), frames_stored=dict(agent.frames_stored))
                wave = agent.vitals_runner.waveform
                waves = {b["device_id"]: [float(x) for x in wave(b["device_id"], "ecg")["values"]]
                         for b in snap["boards"] if b["device_id"]}
                live.update(demo_view.live_view(snap, backend, waves, t, footer), refresh=True)
            yield show
    finally:
        root.handlers = saved


def _result(specs: list[Any], consoles: list[str], snap: dict[str, Any], backend: dict[str, Any], integrity: str,
            elapsed: float, stored_by_board: dict[str, int],
            ended: dict[str, int | None] | None = None, ended_boots: list[list[str]] | None = None,
            stored_by_epoch: dict[tuple[str, int], int] | None = None) -> dict[str, Any]:
    """The run's figures. stored_by_board: the sample frames the hub stored from each board (Agent.frames_stored);
    ended: the boards whose process had ended before the stop, with its exit status (-N: signal N);
    ended_boots: per board (as specs), the console's last text of each boot its firmware ended by a
    reset (an update's switch or rollback: SimulatedBoard.ended_boots); stored_by_epoch: the frames
    stored per (board, boot epoch) (Agent.frames_stored_by_epoch).
    A frame a board built is either stored by the hub, still in the board's outbox at the stop (kept
    and sent again), dropped by the board (its outbox full, nothing acknowledged it), or, built in
    a boot that a reset ended, lost with that boot's RAM: each board's built = stored + still on the
    board + dropped + lost at its resets, summed over its boots (each boot's stop summary gives
    what it built and its epoch; the frames stored from an epoch count to the first boot whose
    epoch is not below it: an epoch resync moves a boot to a later one)."""
    ended = ended or {}
    generated = unacked = dropped = on_boards = lost_at_resets = 0
    boards = []
    missing: list[str] = []
    stored_known = 0  # by the boards that gave their count
    for i, (spec, console) in enumerate(zip(specs, consoles)):
        built = _frames_built(console)
        stored = stored_by_board.get(spec.device_id, 0)
        earlier = [_frames_built(t) or (0, 0, 0, None) for t in (ended_boots[i] if ended_boots else [])]
        if built is None:
            missing.append(spec.device_id)
            if spec.device_id in ended:
                print("board %s gave no stop summary: %s" % (spec.device_id, _ended_words(ended[spec.device_id])),
                      file=sys.stderr)
            else:
                print("board %s gave no stop summary; the last text on its console: %s"
                      % (spec.device_id, demo_view.console_text(console)), file=sys.stderr)
            boards.append({"device_id": spec.device_id, "frames_built": None, "awaiting_ack_at_stop": None,
                           "dropped_by_board": None, "frames_stored_by_hub": stored, "frames_still_on_board": None})
            continue
        # Each boot's frames stored; the last boot (the running one) takes what no ended boot does.
        boots = earlier + [built]
        stored_in = [0] * len(boots)
        by_epoch = {e: n for (d, e), n in (stored_by_epoch or {}).items() if d == spec.device_id}
        if not earlier:
            stored_in[-1] = stored
        else:
            for epoch, n in by_epoch.items():
                k = next((k for k, b in enumerate(earlier) if b[3] is not None and b[3] >= epoch), len(boots) - 1)
                stored_in[k] += n
            stored_in[-1] += stored - sum(by_epoch.values())  # (none: both count the same frames)
        board_built = board_drop = board_lost = 0
        on_board = 0
        for k, (b, n) in enumerate(zip(boots, stored_in)):
            not_stored = max(0, b[0] - n)
            b_dropped = min(b[2], not_stored)
            board_built += b[0]
            board_drop += b[2]
            if k == len(boots) - 1:
                on_board = not_stored - b_dropped
            else:
                board_lost += not_stored - b_dropped
        generated += board_built
        unacked += built[1]
        dropped += board_drop
        on_boards += on_board
        lost_at_resets += board_lost
        stored_known += stored
        boards.append({"device_id": spec.device_id, "link": spec.link, "frames_built": board_built,
                       "awaiting_ack_at_stop": built[1], "dropped_by_board": board_drop,
                       "frames_stored_by_hub": stored, "frames_still_on_board": on_board,
                       "boots": len(boots), "frames_lost_at_resets": board_lost})
    acknowledged = snap["store"]["ingested"]
    forwarded = backend["frames"]
    st = snap["store"]
    return {
        "seconds": round(elapsed, 1),
        "boards": boards,
        "frames_generated": generated,
        "frames_acknowledged": acknowledged,
        # Of frames_generated (the boards that gave their count): stored by the hub, still on the
        # boards at the stop, lost with the RAM of a boot a reset ended (an update's switch or
        # rollback), dropped by the boards. They add up to it.
        "frames_stored_of_generated": stored_known,
        "frames_still_on_boards": on_boards,
        "frames_lost_at_resets": lost_at_resets,
        "frames_dropped_by_boards": generated - stored_known - on_boards - lost_at_resets,
        "frames_forwarded": forwarded,
        # Acknowledged to a board but absent from the backend, plus frames a
        # board dropped unacknowledged or lost at a reset unstored: all count as lost.
        "frames_lost": max(0, acknowledged - forwarded) + dropped + lost_at_resets,
        # The boards' own count: messages in their outboxes at the stop (frames not stored, frames
        # stored whose ack was on its way, origin checkpoints).
        "frames_unacked_at_stop": unacked,
        "backlog": {b["name"]: b["backlog"] for b in snap["backends"]},
        "rejects": snap["rejects"],
        "backend_invalid": backend["invalid"],
        "vitals_at_backend": backend.get("vitals", {}),
        "alerts_at_backend": backend.get("alerts", 0),
        # Batches the local backend could not store (its disk full), answered 503 and sent again.
        "backend_store_failures": backend.get("store_failures", 0),
        "backend_last_store_error": backend.get("last_store_error", ""),
        "store_integrity": integrity,
        # The store at the stop (Store.status()): "fault" while its commits failed (a full disk).
        "store_at_stop": {"state": st.get("state", "ok"), "fault": st.get("fault"),
                          "fault_for_s": (round(snap["now"] - st["fault_since"], 1)
                                          if st.get("fault_since") is not None else None),
                          "short_of_space": st.get("short_of_space"),
                          "dropped_undelivered": st.get("dropped_undelivered", 0),
                          "commit_failures": st.get("commit_failures", 0),
                          "faults_recovered": st.get("faults_recovered", 0)},
        # Boards whose console gave no stop summary: frames_generated does not count theirs.
        "boards_without_stop_summary": missing,
        # Boards whose process had ended before the stop (killed: a power cut), with their exit status.
        "boards_ended_before_stop": dict(ended),
    }


def _ended_words(status: int | None) -> str:
    how = ("killed by signal %d" % -status if status is not None and status < 0 else
           "exit status %s" % status)
    return "its process had ended before the stop (%s: for a board, a power cut)" % how


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The demo's result for a person: each count with what it means, and the sums that hold
    between them written out."""
    vitals = sum(v["n"] for v in r["vitals_at_backend"].values())
    stored, forwarded = r["frames_acknowledged"], r["frames_forwarded"]
    lines = ["Summary after %.0f s with %d boards:" % (r["seconds"], len(r["boards"])),
             "  %6d frames built by the boards%s = %d stored by the hub + %d still on the boards + %d dropped by "
             "the boards%s" % (r["frames_generated"],
                               " that gave their count" if r["boards_without_stop_summary"] else "",
                               r["frames_stored_of_generated"], r["frames_still_on_boards"],
                               r["frames_dropped_by_boards"],
                               " + %d lost at their resets" % r.get("frames_lost_at_resets", 0)
                               if any(b.get("boots", 1) > 1 for b in r["boards"]) else ""),
             "           stored: verified, written to the hub's disk, acknowledged to the board (it may forget them)",
             "           still on the boards: not stored by the stop; each board keeps them and sends them again",
             "           dropped: a board's outbox was full and nothing had acknowledged them: lost",
             *(["           lost at their resets: built in a boot an update's switch or rollback ended (the "
                "board waits for its acks first), never stored"]
               if any(b.get("boots", 1) > 1 for b in r["boards"]) else []),
             "  %6d stored by the hub = %d at the backend, checked end to end + %d not delivered" % (
                 stored, min(stored, forwarded), max(0, stored - forwarded)),
             "           (the hub's %d vitals and %d alerts went to the backend too)"
             % (vitals, r["alerts_at_backend"]),
             "  %6d lost (dropped by the boards, or stored and not delivered), %d refused (not authentic or damaged)"
             % (r["frames_lost"], sum(r["rejects"].values()))]
    if r.get("updates"):
        lines += demo_ota.summary_lines(r["updates"])
    ended = r.get("boards_ended_before_stop") or {}
    for dev in r["boards_without_stop_summary"]:
        lines.append("  frames built unknown for %s: %s" % (
            dev, _ended_words(ended[dev]) if dev in ended else "no stop summary on its console"))
    if r.get("backend_store_failures"):
        lines.append("  the backend could not store %d batches (last: %s); the hub kept them and sent them again"
                     % (r["backend_store_failures"], r["backend_last_store_error"]))
    air = r.get("air")
    if air:  # over BLE: what crossed the software radio (as the JSON summary's "air")
        rc = air["hub_reconnect_s"]
        lines += ["  over the air: %.2f frames/s at the backend; %d notifications (%d bytes), %d lost on air; "
                  "%d connections, %d forced disconnects, %d adapter losses" % (
                      air["frames_per_s"], air["notifications"], air["notification_bytes"], air["lost"],
                      air["connects"], air["forced_disconnects"], air["adapter_losses"]),
                  "           bytes per sample value delivered: %s as ATT values, %s with ATT and L2CAP headers "
                  "(every overhead included)" % (air["att_bytes_per_sample_value"],
                                                 air["l2cap_bytes_per_sample_value"]),
                  "           the hub's reconnections: %d%s" % (
                      rc["n"], ", median %.2f s, longest %.2f s" % (rc["median"], rc["max"]) if rc["n"] else "")]
    st = r.get("store_at_stop") or {"state": "ok"}
    if st["state"] == "fault":
        lines.append("  the hub's store: FAULT at the stop, for %.0f s: %s; it stored nothing new and acknowledged "
                     "nothing since (its file: %s)" % (st.get("fault_for_s") or 0, st.get("fault"),
                                                       r["store_integrity"]))
    else:
        recovered = st.get("faults_recovered", 0)
        lines.append("  the hub's store: %s, its file: %s%s" % (
            "ok" if not st.get("short_of_space") else "SHORT OF SPACE (%s): %d frames deleted before delivery" % (
                st["short_of_space"], st.get("dropped_undelivered", 0)),
            r["store_integrity"], "; %d storage faults during the run, recovered" % recovered if recovered else ""))
    return lines


def main(opts: SimOptions, out: IO[str] = sys.stdout) -> dict[str, Any]:
    return asyncio.run(run_demo(opts, out))
