"""Simulated boards with the hub's end attached: `pulsebridge sim` and `demo`.

Starts the boards (firmware under micropython on ptys), opens each port as
the agent opens hardware, and runs a verifying, acknowledging session on
each. Optionally records every message exactly as received (--capture) and
prints live progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.ble_links import BleManager
from agent.config import BleConfig
from agent.dev.sim import boards
from agent.dev.sim.air import Air, Faults
from agent.dev.sim.runner import SimulatedBoard
from agent.ingest import Volatile
from agent.provision.build import default_cache
from agent.registry import write_private
from agent.session import BoardSession, BoardStats
from agent.transports.serial import SerialTransport
from protocols import hub


@dataclass
class SimOptions:
    boards: int = 2
    ecg: str | None = "max30003"
    ppg: bool = True
    seconds: float | None = None
    capture: Path | None = None
    directory: Path | None = None
    spo2_pct: float = 97.0
    attach_hub: bool = True
    live: bool = True
    json: bool = False
    blank: bool = False
    link: str = "serial"  # serial | ble (through the software radio) | mixed (the demo's: serial and BLE in turn)
    fragment_loss: float = 0.0  # ble: probability that a notification is lost on air
    disconnect_every_s: float = 0.0  # ble: mean time between forced disconnects
    air_capture: Path | None = None  # ble: what a sniffer would record, as JSON lines
    board_speed: str = "host"  # host, or a chip the firmware runs at the speed of (esp32, esp32-240, esp32s3)
    updates: bool = False  # the demo: signed firmware updates pushed to the boards (agent/dev/demo_ota.py)
    stop_after_updates: bool = False  # the demo: stop once they have ended (at most `seconds`)


def board_specs(opts: SimOptions, air: Air | None = None) -> list[boards.BoardSpec]:
    return [boards.BoardSpec("pb-sim%02d" % (i + 1), ecg=opts.ecg, ppg=opts.ppg, spo2_pct=opts.spo2_pct,
                             seed=i + 1, ppm={"max30003": 15 * (i + 1), "max30102": -20 * (i + 1)},
                             link=_link(opts.link, i), air=str(air.board_path) if air else "",
                             board_speed=opts.board_speed)
            for i in range(opts.boards)]


def _link(link: str, i: int) -> str:
    """Board i's link: mixed puts the first board on serial, the second on BLE, and so on."""
    if link == "mixed":
        return "serial" if i % 2 == 0 else "ble"
    return link


def start_air(opts: SimOptions, directory: Path) -> Air | None:
    """The software radio for --link ble or mixed, with the faults asked for."""
    if opts.link not in ("ble", "mixed"):
        return None
    air = Air(directory, Faults(opts.fragment_loss, opts.disconnect_every_s, seed=1), capture=opts.air_capture)
    air.start()
    return air


class Recorder:
    """DIR/<device-id>.cbor: each message as the firmware emitted it, concatenated."""

    def __init__(self, directory: Path, device_id: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._f: IO[bytes] = open(directory / (device_id + ".cbor"), "wb")

    def __call__(self, raw: bytes) -> None:
        self._f.write(raw)

    def close(self) -> None:
        self._f.close()


def write_keys(directory: Path, specs: list[boards.BoardSpec]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "keys.json"
    data = json.dumps({s.device_id: s.key.hex() for s in specs}, indent=1).encode()
    write_private(path, data)
    # What a backend holds to check origin (pulsebridge verify-origin --key): never the hub.
    origin = {s.device_id: s.origin_key.hex() for s in specs if s.origin_key is not None}
    write_private(directory / "origin_keys.json", json.dumps(origin, indent=1).encode())
    return path


def summary(stats: list[BoardStats], elapsed_s: float) -> dict[str, Any]:
    per_board = []
    for st in stats:
        per_board.append({
            "device_id": st.device_id, "link": st.link, "firmware": st.firmware, "epoch": st.epoch,
            "messages": st.messages, "frames_verified": st.frames, "duplicates": st.duplicates,
            "acks_sent": st.acks_sent, "rejects": dict(st.rejects),
            "samples": st.samples_received(), "samples_missing": st.samples_missing(),
            "fifo_lost": st.fifo_lost, "frames_dropped_by_board": st.board_dropped,
        })
    return {
        "seconds": round(elapsed_s, 1),
        "boards": per_board,
        "frames_verified": sum(s.frames for s in stats),
        "rejects": sum(sum(s.rejects.values()) for s in stats),
        "samples_missing": sum(sum(s.samples_missing().values()) for s in stats),
    }


def _live_line(st: BoardStats, t: float) -> str:
    rx = st.samples_received()
    parts = " ".join("%s %d" % (k, v) for k, v in sorted(rx.items()))
    rej = sum(st.rejects.values())
    state = "connected" if st.connected else "waiting"
    return "[%5.0fs] %s %-9s frames verified %4d  samples: %s  missing %d  rejected %d" % (
        t, st.device_id, state, st.frames, parts or "-", sum(st.samples_missing().values()), rej)


async def _run(opts: SimOptions, sims: list[SimulatedBoard], out: IO[str], air: Air | None) -> list[BoardStats]:
    h = hub.Hub()
    stats = []
    sessions = []
    recorders = {}
    for sim in sims:
        h.add_device(sim.device_id, sim.spec.key)
        if opts.capture:
            recorders[sim.device_id] = Recorder(opts.capture, sim.device_id)
    ble = None
    if air is not None:
        ble = BleManager(BleConfig(air=str(air.central_path)), Volatile(h), h.has_device, recorders.get)
    else:
        for sim in sims:
            st = BoardStats(sim.device_id, "serial:" + sim.port)
            stats.append(st)
            sessions.append(BoardSession(SerialTransport(sim.port), Volatile(h), st, recorders.get(sim.device_id)))
    t0 = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            tasks: list[asyncio.Task[Any]] = [tg.create_task(s.run(), name="session-" + s.stats.device_id)
                                              for s in sessions]
            if ble is not None:
                tasks.append(tg.create_task(ble.run(), name="ble"))
            while opts.seconds is None or time.monotonic() - t0 < opts.seconds:
                await asyncio.sleep(1.0)
                if ble is not None:
                    stats = [lk.stats for lk in ble.links.values() if lk.stats is not None]
                if opts.live and not opts.json:
                    for st in stats:
                        print(_live_line(st, time.monotonic() - t0), file=out)
                    out.flush()
                if any(not sim.alive() for sim in sims):
                    dead = [sim.device_id for sim in sims if not sim.alive()]
                    print("board process ended: %s" % ", ".join(dead), file=sys.stderr)
                    break
            if ble is None:
                await _stop_serial_boards(sims, [s.transport for s in sessions])
            for t in tasks:
                t.cancel()
    finally:
        for rec in recorders.values():
            rec.close()
    if ble is not None:  # every connection's stats, not only the last
        stats = [st for lk in ble.links.values() for st in lk.history]
    return stats


# How long stopped boards' last messages (their last origin checkpoint) are
# awaited at the hub: a board stopped by Ctrl-C sends what it never sent
# within a second of its own clock; under load its process may wait longer.
_STOP_HEARD_S = 30.0


async def _stop_serial_boards(sims: list[SimulatedBoard], transports: list[Any]) -> None:
    """Ctrl-C on each board's console while the hub still reads it, then waits (at most
    _STOP_HEARD_S) until the hub has read each board's stop summary and handed on every
    message before it: the last origin checkpoint is recorded (a capture then proves the
    board's last frames). The boards are shut down afterwards (SimulatedBoard.stop)."""
    for sim in sims:
        if sim.alive():
            sim.interrupt()
    deadline = time.monotonic() + _STOP_HEARD_S

    def heard(t: Any) -> bool:
        # The summary, the board's last words, is held by the deframer (no 0x00 follows it).
        said = "stopped after" in t.console_last() or any("stopped after" in line for line in t.console)
        return said and t.queued() == 0

    while time.monotonic() < deadline and not all(heard(t) for t, sim in zip(transports, sims) if sim.alive()):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0)  # a message just taken from a queue is recorded before this task runs again


def run(opts: SimOptions, out: IO[str] = sys.stdout) -> dict[str, Any]:
    cache = default_cache()
    with contextlib.ExitStack() as stack:
        base = opts.directory or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pulsebridge-sim-")))
        air = start_air(opts, base / "air")
        if air is not None:
            stack.callback(air.stop)
            if not opts.json:
                print("software radio: boards advertise on %s; point an agent's [ble] air at it" % air.central_path,
                      file=out)
        specs = board_specs(opts, air)
        sims = [SimulatedBoard(spec, base / spec.device_id, cache, blank=opts.blank) for spec in specs]
        try:
            for sim in sims:
                sim.start()
                if opts.blank:
                    # Its stable name (below) again: provisioning, then an agent, keep the port they are given.
                    print("blank board (bare MicroPython, no firmware, no key): port %s; provision it "
                          "(pulsebridge provision --port %s, a name that goes with the board; the same in an "
                          "agent's [[serial]] port): it streams from PASS on" % (sim.port, sim.link_path), file=out)
                elif not opts.json:
                    # The stable name for an agent's [[serial]] port: it goes with the board, as udev's
                    # does; a /dev/pts number, once freed, is the next pseudo-terminal's, another program's.
                    print("%s: firmware running under micropython, port %s (in an agent's [[serial]]: port = "
                          "\"%s\", which goes with the board)" % (sim.device_id, sim.port, sim.link_path), file=out)
                out.flush()
            if opts.capture:
                write_keys(opts.capture, specs)
            t0 = time.monotonic()
            if opts.attach_hub:
                stats = asyncio.run(_run(opts, sims, out, air))
            else:
                stats = []
                _wait_plain(opts, sims, out)
            elapsed = time.monotonic() - t0
        finally:
            for sim in sims:
                sim.stop()
    result = summary(stats, elapsed)
    result["hub_attached"] = opts.attach_hub  # False: the boards only waited for an agent of your own
    if air is not None:
        result["air"] = air.snapshot()
    if opts.capture:
        result["capture"] = str(opts.capture)
    return result


def _wait_plain(opts: SimOptions, sims: list[SimulatedBoard], out: IO[str]) -> None:
    """Until Ctrl-C, --seconds, or no board is left. A board whose process dies (kill -9: a power cut;
    a crash) is told of, with how it ended, and the others go on: the whole simulator ended silently,
    the other boards with it, so an agent could not be shown one board's power cut beside the others."""
    t0 = time.monotonic()
    told: set[str] = set()
    try:
        while opts.seconds is None or time.monotonic() - t0 < opts.seconds:
            time.sleep(0.5)
            for s in sims:
                if s.power_lost and s.device_id not in told:  # not a reset: it comes back from one
                    told.add(s.device_id)
                    code = s.proc.returncode if s.proc is not None else None
                    if code is not None and code < 0:
                        try:
                            name = signal.Signals(-code).name
                        except ValueError:  # a real-time signal has no name
                            name = "signal %d" % -code
                        how = "killed by %s: as a power cut" % name
                    else:
                        how = "exit status %s: see its console" % code
                    print("%s: its process ended (%s); its port is gone; %s" % (
                        s.device_id, how, "no board is left" if len(told) == len(sims) else "the other boards go on"),
                        file=out, flush=True)
            if len(told) == len(sims):
                break
    except KeyboardInterrupt:
        pass
