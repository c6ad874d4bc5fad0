"""`pulsebridge-dev bench ota`: a firmware bundle's signature check on the
board at a chip's speed (firmware_mpy/sim/bench_ota.py under MicroPython),
on a bundle of the current firmware signed by a throwaway vendor key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.dev import release
from agent.dev.sim import boards
from agent.dev.sim.runner import find_micropython
from agent.provision import build
from agent.provision.build import FIRMWARE_DIR


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
    (ms) its frames cover; `pause_ms`: the longest gap between one boot's last
    sample and the next boot's first (the reboots: nothing is sampled then)."""
    db = sqlite3.connect("file:%s?mode=ro" % store_path, uri=True)
    try:
        rows = db.execute("SELECT epoch, stream, first_index, count, t0_utc_ms, info FROM frames WHERE device_id=? "
                          "AND kind=1 ORDER BY epoch, stream, first_index", (device_id,)).fetchall()
    finally:
        db.close()
    epochs: dict[int, dict[str, Any]] = {}
    expected: dict[tuple[int, int], int] = {}
    for epoch, stream, first, count, t0_utc_ms, info in rows:
        h = json.loads(info) if info else {}
        e = epochs.setdefault(epoch, {"samples": 0, "missing": 0, "fifo_lost": 0, "dropped": 0,
                                      "first_utc_ms": None, "end_utc_ms": None})
        lost = int(h.get("fifo_lost_samples", 0))
        at = expected.get((epoch, stream), 0)
        if first > at:
            e["missing"] += max(0, first - at - lost)
        expected[(epoch, stream)] = max(at, first + count)
        e["samples"] += count
        e["fifo_lost"] += lost
        e["dropped"] = max(e["dropped"], int(h.get("frames_dropped_by_board", 0)))
        if t0_utc_ms is not None:
            end = t0_utc_ms + count * 1000 // max(1, int(h.get("rate_hz", 1)))
            e["first_utc_ms"] = t0_utc_ms if e["first_utc_ms"] is None else min(e["first_utc_ms"], t0_utc_ms)
            e["end_utc_ms"] = end if e["end_utc_ms"] is None else max(e["end_utc_ms"], end)
    pause = 0
    order = sorted(epochs)
    for a, b in zip(order, order[1:]):
        if epochs[a]["end_utc_ms"] is not None and epochs[b]["first_utc_ms"] is not None:
            pause = max(pause, epochs[b]["first_utc_ms"] - epochs[a]["end_utc_ms"])
    return {"epochs": epochs, "pause_ms": pause}
