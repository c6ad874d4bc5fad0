"""`pulsebridge demo`: the whole pipeline on one machine, on embedded defaults.

Simulated boards (the firmware under micropython, on ptys) stream to the
agent over its serial transport; the agent verifies, stores and forwards to
the embedded local backend over HTTPS (its own CA, verification on), which
checks every frame end to end. Live progress each second; at the end, the
boards are stopped (Ctrl-C, as a technician would), the agent drains its
backlog, and the summary counts frames generated, acknowledged, forwarded
and lost.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from agent.audit import AuditLog
from agent.config import AgentConfig, BleConfig, SerialConfig
from agent.dev.local_backend import LocalBackend
from agent.dev.sim.air import Air
from agent.dev.sim.runner import SimulatedBoard
from agent.dev.simrun import SimOptions, board_specs, start_air
from agent.dev.tlsgen import make_pki
from agent.forwarders.webhook import WebhookConfig
from agent.provision.build import default_cache
from agent.registry import Registry
from agent.supervisor import Agent

_BUILT = re.compile(r"stopped after (\d+) frames built, (\d+) awaiting an ack, (\d+) dropped")
DRAIN_TIMEOUT_S = 30.0


def _frames_built(console: str) -> tuple[int, int, int] | None:
    found = _BUILT.findall(console)
    return tuple(int(x) for x in found[-1]) if found else None  # type: ignore[return-value]


async def run_demo(opts: SimOptions, out: IO[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pulsebridge-demo-") as tmp_s:
        tmp = Path(tmp_s)
        air = start_air(opts, tmp / "air")
        try:
            return await _run_demo(opts, out, tmp, air)
        finally:
            if air is not None:
                air.stop()


async def _run_demo(opts: SimOptions, out: IO[str], tmp: Path, air: Air | None) -> dict[str, Any]:
    specs = board_specs(opts, air)
    pki = make_pki(tmp / "pki")
    backend = LocalBackend(tmp / "backend.db", {s.device_id: s.key for s in specs})
    port = await backend.start("127.0.0.1", 0, pki.server_cert, pki.server_key)
    sims = [SimulatedBoard(spec, tmp / "boards" / spec.device_id, default_cache()) for spec in specs]
    for sim in sims:
        await asyncio.to_thread(sim.start)
    cfg = AgentConfig(hub_id="demo-hub", data_dir=tmp / "hub" / "data", log_dir=tmp / "hub" / "log",
                      run_dir=tmp / "hub" / "run",
                      serial=[] if air else [SerialConfig(port=s.port) for s in sims],
                      ble=BleConfig(air=str(air.central_path)) if air else None,
                      backends=[WebhookConfig(name="local", type="webhook",
                                              url="https://127.0.0.1:%d/ingest" % port, ca_file=pki.ca_cert)])
    registry = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
    for spec in specs:
        registry.add(spec.device_id, label="simulated board", key=spec.key, actor="demo")
    registry.close()
    agent = Agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    t0 = time.monotonic()
    try:
        while opts.seconds is None or time.monotonic() - t0 < opts.seconds:
            await asyncio.sleep(1.0)
            if task.done():
                break
            if not opts.json:
                _progress(agent.snapshot(), backend.summary(), time.monotonic() - t0, out)
    finally:
        consoles = []
        for sim in sims:
            await asyncio.to_thread(sim.stop)
            consoles.append(sim.console_tail())
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline and not task.done():
            snap = agent.snapshot()
            if all(b["backlog"] == 0 for b in snap["backends"]):
                break
            await asyncio.sleep(0.2)
        snap = agent.snapshot()
        stop.set()
        await task
        summary = backend.summary()
        await backend.stop()
    integrity = agent.store.integrity_check()
    result = _result(specs, consoles, snap, summary, integrity, time.monotonic() - t0)
    result["link"] = opts.link
    if air is not None:
        result["air"] = _air_figures(air, agent, summary, time.monotonic() - t0)
    return result


def _air_figures(air: Air, agent: Agent, backend: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """What went over the software radio, per second and per sample delivered."""
    snap = air.snapshot()
    samples = {"ecg": 0, "ppg": 0}
    for streams in backend["by_device"].values():
        for name, v in streams.items():
            samples["ppg" if "ppg" in name else "ecg"] += v["samples"] or 0
    values = samples["ecg"] + 2 * samples["ppg"]  # a PPG sample is a red and an IR value
    reconnects = sorted(t for lk in (agent.ble.links.values() if agent.ble else ()) for t in lk.reconnect_s)
    snap.update({
        "frames_per_s": round(backend["frames"] / elapsed, 2) if elapsed else 0.0,
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


def _progress(snap: dict[str, Any], backend: dict[str, Any], t: float, out: IO[str]) -> None:
    connected = sum(1 for b in snap["boards"] if b["state"] == "connected" and b["frames"])
    stored = snap["store"]["ingested"]
    fw = snap["backends"][0]
    rejects = sum(snap["rejects"].values())
    print("[%4.0fs] boards streaming %d/%d | frames verified+stored %5d | forwarded %5d | backlog %4d | "
          "backend holds %5d | rejected %d" % (t, connected, len(snap["boards"]), stored, fw["forwarded"],
                                               fw["backlog"], backend["frames"], rejects), file=out)
    out.flush()


def _result(specs: list[Any], consoles: list[str], snap: dict[str, Any], backend: dict[str, Any], integrity: str,
            elapsed: float) -> dict[str, Any]:
    generated = unacked = dropped = 0
    boards = []
    for spec, console in zip(specs, consoles):
        built = _frames_built(console)
        if built is None:
            print("board %s gave no stop summary; console: %s" % (spec.device_id, console[-400:]), file=sys.stderr)
            built = (0, 0, 0)
        generated += built[0]
        unacked += built[1]
        dropped += built[2]
        boards.append({"device_id": spec.device_id, "frames_built": built[0], "awaiting_ack_at_stop": built[1],
                       "dropped_by_board": built[2]})
    acknowledged = snap["store"]["ingested"]
    forwarded = backend["frames"]
    return {
        "seconds": round(elapsed, 1),
        "boards": boards,
        "frames_generated": generated,
        "frames_acknowledged": acknowledged,
        "frames_forwarded": forwarded,
        # Acknowledged to a board but absent from the backend, plus frames a
        # board dropped unacknowledged: both count as lost.
        "frames_lost": max(0, acknowledged - forwarded) + dropped,
        "frames_unacked_at_stop": unacked,
        "backlog": {b["name"]: b["backlog"] for b in snap["backends"]},
        "rejects": snap["rejects"],
        "backend_invalid": backend["invalid"],
        "vitals_at_backend": backend.get("vitals", {}),
        "alerts_at_backend": backend.get("alerts", 0),
        "store_integrity": integrity,
    }


def main(opts: SimOptions, out: IO[str] = sys.stdout) -> dict[str, Any]:
    return asyncio.run(run_demo(opts, out))
