"""Benchmarks that print figures (no timed assertions anywhere).

`pulsebridge bench firmware`: the unmodified firmware under the MicroPython
unix port, ECG 512 Hz + PPG 100 Hz on a virtual clock, N simulated
minutes, with the heap an ESP32 gives it. Prints bytes on the wire per
sample, framing and authentication overhead, firmware CPU per second of
data, heap figures, MemoryErrors and lost samples.

`pulsebridge bench encoding`: the sample encodings we considered, measured
on the same recordings the simulated sensors play.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from agent.sim import boards, build
from agent.sim.runner import find_micropython
from agent.simrun import default_cache

# The ESP32's MicroPython heap without PSRAM, for data: modules are frozen
# in flash there, so the unix port gets their measured size on top.
ESP32_DATA_HEAP_KB = 100


def _run_board(directory: Path, compiled: Path, heap_kb: int, minutes: float, speed: str = "host") -> dict[str, Any]:
    proc = subprocess.run([find_micropython(), "-X", "heapsize=%dK" % heap_kb, "-m", "sim.bench_board",
                           str(minutes), speed], cwd=directory, env={"MICROPYPATH": str(compiled)},
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError("firmware benchmark failed: %s" % (proc.stderr.strip() or proc.stdout.strip())[-2000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def firmware(minutes: float, speed: str = "host") -> dict[str, Any]:
    cache = default_cache()
    compiled = build.compile_firmware(cache)
    with tempfile.TemporaryDirectory(prefix="pulsebridge-bench-") as tmp:
        d = Path(tmp)
        boards.prepare(boards.BoardSpec("pb-bench01", virtual_clock=True), d, cache)
        probe = _run_board(d, compiled, 512, 0.05, speed)  # measures the modules' heap
        code_kb = -(-probe["code_heap"] // 1024)
        heap_kb = code_kb + ESP32_DATA_HEAP_KB
        r = _run_board(d, compiled, heap_kb, minutes, speed)
    r["heapsize_kb"] = heap_kb
    r["code_heap_kb"] = code_kb
    return r


def firmware_report(r: dict[str, Any]) -> list[str]:
    lines = ["firmware benchmark: %.1f simulated minutes, ECG 512 Hz + PPG 100 Hz, 1 s windows" % r["minutes"]]
    lines.append("  heap: -X heapsize=%dK = %d kB of modules (frozen in flash on an ESP32) + %d kB" % (
        r["heapsize_kb"], r["code_heap_kb"], ESP32_DATA_HEAP_KB))
    data_kb = (r["heap_after_start"] - r["code_heap"]) / 1024
    lines.append("  live data after start: %.1f kB; after each minute (gc.collect): %s bytes" % (
        data_kb, ", ".join(str(x) for x in r["heap_by_minute"])))
    growth = r["heap_by_minute"][-1] - r["heap_by_minute"][0] if r["heap_by_minute"] else 0
    lines.append("  heap growth first to last minute: %d bytes; MemoryError: %d" % (growth, r["memory_errors"]))
    total_wire = r["other_wire_bytes"]
    total_samples = 0
    for name, s in sorted(r["streams"].items()):
        total_wire += s["wire_bytes"]
        total_samples += s["samples"]
        per = s["wire_bytes"] / max(1, s["samples"])
        overhead = 100.0 * (s["wire_bytes"] - s["sample_data_bytes"]) / max(1, s["wire_bytes"])
        lines.append("  %s: %d samples in %d frames; %.3f B/sample on the wire (samples alone %.3f); "
                     "framing+auth overhead %.1f %%; lost %d" % (
                         name, s["samples"], s["frames"], per, s["sample_data_bytes"] / max(1, s["samples"]),
                         overhead, s["lost"]))
    lines.append("  all streams, hello/status included: %.3f B per sample value" % (
        total_wire / max(1, total_samples)))
    cpu = r["firmware_us"] / 1e6
    lines.append("  firmware CPU: %.2f s for %.0f s of data = %.4f x real time (unix port on this machine; "
                 "hub side excluded: %.2f s)" % (cpu, r["data_seconds"], cpu / r["data_seconds"], r["hub_us"] / 1e6))
    lines.append("  gaps %d, rejected %d, FIFO overflows %d, frames dropped %d" % (
        r["gaps"], r["rejected"], r["fifo_lost"], r["frames_dropped"]))
    lines.append("  allocations in the steady state: %.0f bytes/s; heap low-water mark %d bytes free; "
                 "largest block %d bytes" % (r["alloc_bytes_per_s"], r["heap_low_free"], r["largest_block"]))
    c = r.get("chip")
    if c:
        lines += chip_report(r)
    return lines


def chip_report(r: dict[str, Any]) -> list[str]:
    c = r["chip"]
    lost = sum(s["lost"] for s in r["streams"].values()) + c["timer_dropped"]
    shortest = min(f["fill_ms"] for f in c["fifos"].values()) if c["fifos"] else 0.0
    lines = ["  at %s speed: factor %.0f chip us per host CPU us (calibration programs: %s)" % (
        c["speed"], c["factor"], ", ".join("%.0f" % f for f in c["factors"]))]
    lines.append("  CPU %.1f %% (computing %.1f %%, waiting on buses and console %.1f %%)" % (
        c["cpu_pct"], 100 * c["compute_us"] / max(1, c["chip_us"]), 100 * c["io_us"] / max(1, c["chip_us"])))
    lines.append("  worst loop latency %.1f ms vs shortest FIFO fill time %.1f ms (half: %.1f ms)" % (
        c["worst_step_us"] / 1000, shortest, shortest / 2))
    for name, f in sorted(c["fifos"].items()):
        lines.append("    %s FIFO: %d deep, fills in %.1f ms; fullest seen by the firmware: %d" % (
            name, f["depth"], f["fill_ms"], f["worst_level"]))
    lines.append("  samples lost %d (timer ticks dropped %d, soft IRQs dropped %d); console blocked %.1f s" % (
        lost, c["timer_dropped"], c["sched_dropped"], c["console_blocked_us"] / 1e6))
    return lines


# ---- sample encodings ---------------------------------------------------------

def _zigzag(d: np.ndarray) -> np.ndarray:
    return np.where(d >= 0, 2 * d, -2 * d - 1)


def _varint_len(z: np.ndarray) -> int:
    n = np.ones_like(z)
    for k in (7, 14, 21, 28):
        n += z >= (1 << k)
    return int(n.sum())


def _rice_bits(z: np.ndarray) -> int:
    # Best Rice parameter for the window, plus 5 bits to say which.
    return int(min(int((z >> k).sum()) + len(z) * (k + 1) for k in range(20))) + 5


def _windows(x: np.ndarray, n: int) -> list[np.ndarray]:
    return [x[i:i + n] for i in range(0, len(x) - n + 1, n)]


def _encodings(codes: np.ndarray, n: int) -> dict[str, float]:
    wins = _windows(codes, n)
    total = len(wins) * n
    out: dict[str, float] = {"raw 18-bit packed": 2.25, "raw 24-bit": 3.0}
    sizes = {"delta-zigzag-varint (chosen)": 0, "delta2-zigzag-varint": 0, "rice(delta)": 0, "rice(delta2)": 0,
             "deflate(delta-zigzag-varint)": 0}
    for w in wins:
        d1 = np.diff(np.concatenate([[0], w]))
        d2 = np.diff(np.concatenate([[0, 0], w]), 2)
        z1, z2 = _zigzag(d1), _zigzag(d2)
        sizes["delta-zigzag-varint (chosen)"] += _varint_len(z1)
        sizes["delta2-zigzag-varint"] += _varint_len(z2)
        sizes["rice(delta)"] += (_rice_bits(z1) + 7) // 8
        sizes["rice(delta2)"] += (_rice_bits(z2) + 7) // 8
        sizes["deflate(delta-zigzag-varint)"] += len(zlib.compress(_varint_bytes(z1), 9))
    out.update({k: v / total for k, v in sizes.items()})
    return out


def _varint_bytes(z: np.ndarray) -> bytes:
    out = bytearray()
    for v in z.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def encoding() -> dict[str, Any]:
    from agent.sim import waveforms

    cache = default_cache()
    ecg = waveforms.ecg_signal(cache)
    nv = np.fromfile(ecg.path, "<i4").astype(np.int64)[: 360 * 600]  # 10 minutes
    t = np.arange(len(nv)) / ecg.rate_hz
    t512 = np.arange(0, t[-1], 1 / 512)
    rng = np.random.default_rng(2)
    # As the MAX30003 model converts: gain 20, 0.38 uV per LSB, +-1 LSB of noise.
    codes = np.round(np.interp(t512, t, nv) * 131072 * 20 / 1e9).astype(np.int64) + rng.integers(-1, 2, len(t512))
    ppg = waveforms.ppg_signal(cache, 97.0)
    both = np.fromfile(ppg.path, "<i4").astype(np.int64).reshape(-1, 2)[: 250 * 300]
    tp = np.arange(len(both)) / ppg.rate_hz
    t100 = np.arange(0, tp[-1], 1 / 100)
    # As the MAX30102 model converts: 7 mA LEDs, 16384 nA range, 18 bits, +-2 LSB.
    ir = np.round(np.interp(t100, tp, both[:, 1]) * 7 * 262144 / (16384 * 1000)).astype(np.int64)
    ir += rng.integers(-2, 3, len(ir))
    return {"ecg_512hz_1s_windows": _encodings(codes, 512), "ppg_ir_100hz_1s_windows": _encodings(ir, 100)}


def encoding_cpu() -> dict[str, float]:
    # Board CPU of the chosen encoder against a Rice coder, under micropython.
    script = r'''
import time, array
from protocols import samples
buf = bytearray(4096)
x = array.array("i", [int(2000 * ((i * 37) % 101) / 101) for i in range(512)])
def rice(src, n, out, k):
    acc = 0; nb = 0; pos = 0; prev = 0
    for i in range(n):
        v = src[i]; d = v - prev; prev = v
        z = (d << 1) if d >= 0 else ((-d << 1) - 1)
        q = z >> k
        for _ in range(q):
            acc = (acc << 1) | 1; nb += 1
            if nb == 8: out[pos] = acc; pos += 1; acc = 0; nb = 0
        acc = (acc << (k + 1)) | (z & ((1 << k) - 1)); nb += k + 1
        while nb >= 8:
            nb -= 8; out[pos] = (acc >> nb) & 0xFF; pos += 1
        acc &= (1 << nb) - 1
    return pos
for name, fn in (("varint", lambda: samples.encode_into(x, 512, buf, 0)), ("rice", lambda: rice(x, 512, buf, 5))):
    t = time.ticks_us()
    for _ in range(200):
        fn()
    print(name, time.ticks_diff(time.ticks_us(), t) / 200)
'''
    cache = default_cache()
    compiled = build.compile_firmware(cache)
    proc = subprocess.run([find_micropython(), "-c", script], env={"MICROPYPATH": str(compiled)},
                          capture_output=True, text=True, timeout=300)
    out = {}
    for line in proc.stdout.split("\n"):
        if line.strip():
            name, us = line.split()
            out[name + "_us_per_512_samples"] = float(us)
    return out


def main(what: str, minutes: float, as_json: bool, speed: str = "host", link: str = "serial") -> int:
    if what == "firmware":
        r = firmware(minutes, speed)
        print(json.dumps(r, indent=1) if as_json else "\n".join(firmware_report(r)))
        ok = (r["memory_errors"] == 0 and all(s["lost"] == 0 for s in r["streams"].values())
              and r["gaps"] == 0)
        return 0 if ok else 1
    r = {"bytes_per_sample": encoding(), "micropython_cpu": encoding_cpu()}
    if as_json:
        print(json.dumps(r, indent=1))
    else:
        for name, table in r["bytes_per_sample"].items():
            print(name)
            for enc, v in table.items():
                print("  %-32s %.3f B/sample" % (enc, v))
        cpu = r["micropython_cpu"]
        print("MicroPython (unix port) encode time per 512-sample window: varint %.0f us, Rice %.0f us "
              "(ratio %.1f)" % (cpu["varint_us_per_512_samples"], cpu["rice_us_per_512_samples"],
                                cpu["rice_us_per_512_samples"] / cpu["varint_us_per_512_samples"]))
    return 0
