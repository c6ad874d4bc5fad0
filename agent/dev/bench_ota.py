"""`pulsebridge-dev bench ota`: a firmware bundle's signature check on the
board at a chip's speed (firmware_mpy/sim/bench_ota.py under MicroPython),
on a bundle of the current firmware signed by a throwaway vendor key.

`pulsebridge-dev bench ota-push [--board-speed esp32] [--link ble]`: a
whole update of a simulated board through the running agent (the push, the
board's receipt, checks, switch and trial boot), with the update's time,
the pause in streaming and what the streams lost, read from the hub's store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog
from agent.config import AgentConfig, BleConfig, SerialConfig
from agent.dev import release
from agent.dev.sim import boards
from agent.dev.sim.runner import find_micropython
from agent.provision import build
from agent.provision.build import FIRMWARE_DIR
from agent.record import FrameRecord
from protocols import messages


def run(target: str = "esp32") -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    files = {p: s.read_bytes() for p, s in build.board_files(build.compile_firmware(build.default_cache())).items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fw.pbb"
        path.write_bytes(release.make_bundle(files, 2, "bench", 0, target, key))
        p = subprocess.run([find_micropython(), "-X", "heapsize=2M", str(FIRMWARE_DIR / "sim" / "bench_ota.py"), target,
                            str(path), release.public_key(key).hex()], env=boards.micropython_env(),
                           capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise RuntimeError("bench_ota under micropython failed: " + p.stderr[-2000:])
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def report(r: dict[str, Any]) -> list[str]:
    return [
        "firmware bundle check at %s speed (factor %.0f, calibrated now):" % (r["target"], r["factor_x1000"] / 1000),
        "  Ed25519 signature (pure MicroPython, %d slices): %.0f ms here, %.1f s on the chip"
        % (r["slices"], r["signature_host_us"] / 1000, r["signature_chip_us"] / 1e6),
        "  a slice (what one loop iteration spends on it) on the chip: median %.1f ms, 99th percentile %.1f ms, "
        "longest %.1f ms (a garbage collection in it)"
        % (r["median_slice_chip_us"] / 1000, r["p99_slice_chip_us"] / 1000, r["worst_slice_chip_us"] / 1000),
        "  whole check of a %d-byte bundle of %d files (signature + SHA-256 of each), in one go: %.1f s on the chip"
        % (r["bundle_bytes"], r["files"], r["whole_check_chip_us"] / 1e6),
    ]


def stream_report(store_path: Path, device_id: str) -> dict[str, Any]:
    """What a board's streams say across an update, read from the hub's store:
    per boot epoch, samples stored, samples missing between its frames (a
    hole the board did not report), samples its sensors reported lost (FIFO
    overflow), frames it reported dropping unacknowledged, and the UTC span
    (ms) its frames cover (None before the boot's clock was mapped).
    `pause_ms`: the longest stretch of time no stored sample of a stream
    covers, with `pause_where` saying where: inside a boot, by the sensor's
    own clock (its frames' t0 and rate: a FIFO overflow, a hole); across a
    reboot, from one boot's last sample to the next boot's first, in UTC if
    both boots' clocks were mapped, else from when their frames arrived (the
    last frame of the old boot as its last sample's time, the first of the
    new one less its window's length as its first's)."""
    db = sqlite3.connect("file:%s?mode=ro" % store_path, uri=True)
    try:
        rows = db.execute("SELECT epoch, seq, stream, t0_ms, t0_utc_ms, first_index, count, received_at, raw, "
                          "info, samples FROM frames WHERE device_id=? AND kind=1 ORDER BY epoch, stream, "
                          "first_index", (device_id,)).fetchall()
    finally:
        db.close()
    epochs: dict[int, dict[str, Any]] = {}
    expected: dict[tuple[int, int], int] = {}
    # Per stream, the last frame seen: (epoch, end on the board clock in ms, end in UTC ms or None,
    # received_at in ms).
    last: dict[int, tuple[int, float, float | None, float]] = {}
    pause = 0.0
    where = ""
    by_stream: dict[int, list[tuple[int, int, int, int | None, int, int, float, FrameRecord]]] = {}
    for epoch, seq, stream, t0_ms, t0_utc_ms, first, count, received_at, raw, info, samples in rows:
        f = FrameRecord.from_stored(device_id, epoch, seq, stream, t0_ms, t0_utc_ms, first, count, received_at, raw,
                                    json.loads(info) if info else None, samples)
        by_stream.setdefault(stream, []).append((epoch, first, t0_ms, t0_utc_ms, count, f.rate_hz, received_at, f))
    for stream, frames in by_stream.items():
        for epoch, first, t0_ms, t0_utc_ms, count, rate_hz, received_at, f in frames:
            e = epochs.setdefault(epoch, {"samples": 0, "missing": 0, "fifo_lost": 0, "dropped": 0,
                                          "first_utc_ms": None, "end_utc_ms": None})
            lost = f.fifo_lost_samples
            at = expected.get((epoch, stream), 0)
            if first > at:
                e["missing"] += max(0, first - at - lost)
            expected[(epoch, stream)] = max(at, first + count)
            e["samples"] += count
            e["fifo_lost"] += lost
            e["dropped"] = max(e["dropped"], f.frames_dropped_by_board)
            window_ms = count * 1000 / rate_hz
            end_utc = None if t0_utc_ms is None else t0_utc_ms + window_ms
            if t0_utc_ms is not None:
                e["first_utc_ms"] = t0_utc_ms if e["first_utc_ms"] is None else min(e["first_utc_ms"], t0_utc_ms)
                e["end_utc_ms"] = end_utc if e["end_utc_ms"] is None else max(e["end_utc_ms"], end_utc)
            prev = last.get(stream)
            if prev is not None:
                p_epoch, p_end_ms, p_end_utc, p_received_ms = prev
                name = messages.STREAM_NAMES.get(stream, str(stream))
                if p_epoch == epoch:
                    gap, how = t0_ms - p_end_ms, "%s, boot %d, on the sensor's clock" % (name, epoch)
                elif p_end_utc is not None and t0_utc_ms is not None and t0_utc_ms >= p_end_utc:
                    gap, how = t0_utc_ms - p_end_utc, "%s, across the reboot %d -> %d, in UTC" % (name, p_epoch,
                                                                                                   epoch)
                else:
                    # (Also when the new boot's first sample maps to a UTC before the old boot's last:
                    # two mappings, each as good as its time answer's round trip, that disagree.)
                    gap = received_at * 1000 - window_ms - p_received_ms
                    how = "%s, across the reboot %d -> %d, from the frames' arrival" % (name, p_epoch, epoch)
                if gap > pause:
                    pause, where = gap, how
            last[stream] = (epoch, t0_ms + window_ms, end_utc, received_at * 1000)
    return {"epochs": epochs, "pause_ms": round(pause), "pause_where": where}


def run_push(speed: str = "esp32", link: str = "serial", timeout_s: float = 1200.0) -> dict[str, Any]:
    """One board at `speed` over `link` takes a signed bundle of the current firmware through the agent,
    until it streams acknowledged on the new version (or timeout_s). Times in s of wall clock (the board
    keeps pace with it at any speed)."""
    import asyncio
    import shutil
    import time

    from agent import ota
    from agent.dev.sim.air import Air
    from agent.dev.sim.runner import SimulatedBoard
    from agent.registry import Registry
    from agent.supervisor import Agent

    key = Ed25519PrivateKey.generate()
    cache = build.default_cache()
    files = {p: s.read_bytes() for p, s in build.slot_files(build.compile_firmware(cache)).items()}
    data = release.make_bundle(files, 2, "pulsebridge-fw bench", 0, "esp32", key)
    tmp = Path(tempfile.mkdtemp(prefix="pulsebridge-bench-ota-"))
    air = Air(tmp / "air") if link == "ble" else None
    if air is not None:
        air.start()
    spec = boards.BoardSpec("pb-otabench", link=link, air=str(air.board_path) if air else "", board_speed=speed)
    board = SimulatedBoard(spec, tmp / "board", cache)
    out: dict[str, Any] = {"board_speed": speed, "link": link, "bundle_bytes": len(data), "result": "timeout"}
    try:
        boards.prepare(spec, board.directory, cache)
        (board.directory / "pulsebridge" / "vendor.keys").write_bytes(release.public_key(key))
        board.start()
        cfg = AgentConfig(hub_id="bench", data_dir=tmp / "data", log_dir=tmp / "log", run_dir=tmp / "run",
                          serial=[] if air else [SerialConfig(port=str(board.link_path))],
                          ble=BleConfig(air=str(air.central_path)) if air else None)
        reg = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
        reg.add(spec.device_id, label="bench", key=spec.key, actor="bench")
        reg.close()

        async def scenario() -> None:
            agent = Agent(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))

            def frames() -> int:
                b = agent.snapshot()["boards"]
                return int(b[0]["frames"]) if b else 0

            try:
                end = time.monotonic() + timeout_s
                while frames() < 5 and time.monotonic() < end:
                    await asyncio.sleep(0.2)
                t0 = time.monotonic()
                ota.spool(cfg.run_dir, spec.device_id, data)
                states: dict[str, float] = {}
                while time.monotonic() < end:
                    st = str((ota.read_state(cfg.run_dir, spec.device_id) or {}).get("state", ""))
                    if st and st not in states:
                        states[st] = round(time.monotonic() - t0, 1)
                    if st.startswith("refused") or st == "rolled_back":
                        out["result"] = st
                        break
                    b = agent.snapshot()["boards"]
                    if board.resets and b and b[0]["firmware"] == "pulsebridge-fw bench":
                        epochs = stream_report(cfg.store_path, spec.device_id)["epochs"]
                        if len(epochs) >= 2 and epochs[max(epochs)]["samples"] >= 1000:  # ~2 s stored
                            out["result"] = "installed"
                            states["new version's frames stored"] = round(time.monotonic() - t0, 1)
                            break
                    await asyncio.sleep(0.2)
                out["states_s"] = states
            finally:
                stop.set()
                await task

        asyncio.run(scenario())
        board.stop()
        out.update(stream_report(cfg.store_path, spec.device_id))
        out["epochs"] = {str(k): v for k, v in out["epochs"].items()}
    finally:
        board.stop()
        if air is not None:
            air.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def report_push(r: dict[str, Any]) -> list[str]:
    lines = ["firmware update of a %d-byte bundle over %s at %s speed: %s" % (
        r["bundle_bytes"], r["link"], r["board_speed"], r["result"])]
    for state, t in (r.get("states_s") or {}).items():
        lines.append("  %-30s at %6.1f s after the push" % (state, t))
    lines.append("  longest pause in streaming (no stored sample covers it): %.2f s (%s)"
                 % (r["pause_ms"] / 1000, r.get("pause_where") or "none"))
    for epoch, e in sorted(r["epochs"].items()):
        lines.append("  boot %s: %d samples stored, %d lost by the sensors' FIFOs, %d missing, %d frames dropped"
                     % (epoch, e["samples"], e["fifo_lost"], e["missing"], e["dropped"]))
    return lines
