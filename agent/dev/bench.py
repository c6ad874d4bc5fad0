"""Benchmarks that print figures (no timed assertions anywhere).

`pulsebridge bench firmware`: the unmodified firmware under the MicroPython
unix port, ECG 512 Hz + PPG 100 Hz, N simulated minutes, alone in its
interpreter as provisioning installs it (.mpy files, loaded into the heap),
under the heap an ESP32 leaves it; this process is the hub at the other end
of its serial or BLE link. With --board-speed a chip, the board runs at that
chip's speed (firmware_mpy/sim/clock.py). Prints bytes on the wire per
sample, overhead, heap figures, allocations, MemoryErrors and lost samples;
at a chip's speed also the speed factor, CPU, worst loop latency against
the FIFOs' fill times.

`pulsebridge bench encoding`: the sample encodings we considered, measured
on the same recordings the simulated sensors play.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from agent.dev.sim import boards
from agent.dev.sim.runner import find_micropython
from agent.provision import build
from agent.provision.build import default_cache
from agent.transports.ble import BleTransport
from protocols import hub, hub_link, link, messages

# The heap a classic ESP32 leaves the firmware, its .mpy code included (as
# provisioning installs it, the bytecode lives in RAM): MicroPython 1.27's
# GC heap on a generic ESP32 is 165248 bytes at boot, Wi-Fi off (micropython
# issue #18859's log: 134544 free + 30704 used, most of the latter that
# probe's own script). Turning BLE on takes the NimBLE host's memory, about
# 32 KiB (Moddable issue #640), from the ESP-IDF heap (94 kB free at that
# boot), not from the GC heap, which is allocated at boot; its growth into
# the IDF heap (split heap, MicroPython >= 1.21) is not counted. The
# simulation's own modules and objects (chip models, clock, this
# benchmark's pipe, the interpreter's own start-up) are measured and added
# on top. The unix port's 8-byte words make code and objects larger than on
# the chip's 4-byte ones: the firmware's figures here are upper bounds.
ESP32_HEAP_BLE_ON = 165248


class _HubEnd:
    """The hub's end of the benchmark's pipe: verifies, acks, counts."""

    def __init__(self, device_id: str, key: bytes, kind: str) -> None:
        self.hub = hub.Hub()
        self.hub.add_device(device_id, key)
        self.device_id = device_id
        self.kind = kind
        self.deframer = hub_link.StreamDeframer()
        self.reassembler = hub_link.Reassembler()
        self.next_index: dict[int, int] = {}
        self.samples: dict[int, int] = {}
        self.wire: dict[int, int] = {}
        self.data: dict[int, int] = {}
        self.frames: dict[int, int] = {}
        self.gaps = 0
        self.duplicates = 0
        self.rejected = 0
        self.discarded = 0
        self.other_wire = 0
        self.fifo_lost = 0
        self._frag_bytes = 0
        # Over BLE the agent's acks linger (BleTransport.ack_linger_s) to cover
        # the frames that follow: modelled on the board's clock.
        self.ack_linger_ms = int(BleTransport.ack_linger_s * 1000) if kind == "ble" else 0
        self._to_ack: dict[int, list[int]] = {}  # epoch -> seqs stored, not yet acked
        self._to_ack_since_ms = 0
        self.acks = 0

    def feed(self, kind: int, data: bytes) -> None:
        if kind == 0x55:
            self.deframer.feed(data)
        else:
            self._frag_bytes += len(data)
            self.reassembler.feed(data)

    def answer(self, board_ms: int = 0) -> bytes:
        out = bytearray()
        source = self.deframer if self.kind == "serial" else self.reassembler
        while True:
            ev = source.next_event()
            if ev is None:
                if self._to_ack and board_ms - self._to_ack_since_ms >= self.ack_linger_ms:
                    for epoch, seqs in self._to_ack.items():
                        for msg in self.hub.ack(self.device_id, epoch, seqs):
                            out += hub_link.downlink_line(msg)
                            self.acks += 1
                    self._to_ack = {}
                return bytes(out)
            if not isinstance(ev, link.Frame):
                self.discarded += 1
                continue
            if self.kind == "serial":
                wire = len(ev.data) + len(ev.data) // 254 + 7  # 0x00 COBS(msg CRC) 0x00
            else:
                wire, self._frag_bytes = self._frag_bytes, 0
            r = self.hub.receive(ev.data)
            m = r.message
            if m is None:
                self.rejected += 1
                continue
            if r.verdict == hub.DUPLICATE:  # sent again (its ack was late or lost): acked, not counted twice
                self.duplicates += 1
                self.other_wire += wire
            else:
                self._count(m, wire)
            if r.verdict in (hub.ACCEPTED, hub.DUPLICATE) and isinstance(m, (messages.SampleFrame,
                                                                           messages.OriginCheckpoint)):
                if not self._to_ack:
                    self._to_ack_since_ms = board_ms
                self._to_ack.setdefault(m.epoch, []).append(m.seq)

    def _count(self, m: Any, wire: int) -> None:
        if m.kind != messages.T_SAMPLES:
            self.other_wire += wire
            return
        s = m.stream
        if self.next_index.get(s, m.first_index) != m.first_index:
            self.gaps += 1
        self.next_index[s] = m.first_index + m.count
        self.samples[s] = self.samples.get(s, 0) + m.count * len(m.channels)
        self.wire[s] = self.wire.get(s, 0) + wire
        self.frames[s] = self.frames.get(s, 0) + 1
        self.fifo_lost += m.status[1]
        self.data[s] = self.data.get(s, 0) + sum(_varint_len_of(np.asarray(ch, dtype=np.int64)) for ch in m.channels)


def _varint_len_of(samples: np.ndarray) -> int:
    return _varint_len(_zigzag(np.diff(np.concatenate([[0], samples]))))


def _read_exact(f: IO[bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def _serve(end: _HubEnd, up: IO[bytes], down: IO[bytes], console: IO[bytes]) -> None:
    # Records from the board (sim/bench_board.py): kind, 4-byte length, data.
    # Over serial the acks go to the board's console (its stdin), over BLE
    # they go back in the answer, for the radio to write.
    while True:
        try:
            h = _read_exact(up, 5)
        except EOFError:
            return
        n = int.from_bytes(h[1:], "big")
        data = _read_exact(up, n) if n else b""
        if h[0] == 0x53:  # S: answer what came before
            ans = end.answer(int.from_bytes(data, "big"))
            if end.kind == "serial" and ans:
                console.write(ans)
                console.flush()
                ans = b""
            down.write(b"K" + len(ans).to_bytes(4, "big") + ans)
            down.flush()
        else:
            end.feed(h[0], data)


def _run_board(directory: Path, compiled: Path, heap_kb: int, minutes: float, speed: str, kind: str,
               spec: boards.BoardSpec, stretches: bool = False) -> dict[str, Any]:
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    argv = [find_micropython(), "-X", "heapsize=%dK" % heap_kb, "-m", "sim.bench_board", str(minutes), speed, kind,
            str(up_w), str(down_r)] + (["stretches"] if stretches else [])
    proc = subprocess.Popen(argv, cwd=directory, env={"MICROPYPATH": str(compiled)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(up_w, down_r))
    os.close(up_w)
    os.close(down_r)
    end = _HubEnd(spec.device_id, spec.key, kind)
    out: dict[str, bytes] = {}

    def drain(name: str, f: IO[bytes]) -> None:
        out[name] = f.read()

    threads = [threading.Thread(target=drain, args=(n, f), daemon=True)
               for n, f in (("stdout", proc.stdout), ("stderr", proc.stderr)) if f is not None]
    for t in threads:
        t.start()
    assert proc.stdin is not None
    with os.fdopen(up_r, "rb") as up, os.fdopen(down_w, "wb") as down, proc.stdin as console:
        try:
            _serve(end, up, down, console)
        except BrokenPipeError:
            pass
    proc.wait(timeout=3600)
    for t in threads:
        t.join()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    text = out.get("stdout", b"").decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError("firmware benchmark failed: %s" % (out.get("stderr", b"").decode(errors="replace").strip()
                                                              or text.strip())[-2000:])
    r = dict(json.loads(text.strip().splitlines()[-1]))
    r["gaps"] = end.gaps
    r["rejected"] = end.rejected
    r["duplicates"] = end.duplicates
    r["hub_acks"] = end.acks
    r["discarded"] = end.discarded
    r["fifo_lost"] = end.fifo_lost
    r["other_wire_bytes"] = end.other_wire
    ids = {messages.STREAM_NAMES[s]: s for s in messages.STREAM_NAMES}
    for name, st in r["streams"].items():
        s = ids[name]
        st["samples"] = end.samples.get(s, 0)
        st["frames"] = end.frames.get(s, 0)
        st["wire_bytes"] = end.wire.get(s, 0)
        st["sample_data_bytes"] = end.data.get(s, 0)
        st["lost"] = st["converted"] - st["on_board"] - st["in_fifo"] - st["samples"]
    return r


_STRETCHES_HEAP_KB = 64  # the tracer's records and wrappers (sim/stretches.py): the simulation's, not the firmware's


def firmware(minutes: float, speed: str = "host", kind: str = "serial",
             heap: int = ESP32_HEAP_BLE_ON, stretches: bool = False) -> dict[str, Any]:
    # stretches: at a chip's speed, also the longest stretches between two
    # ECG FIFO reads and the firmware's work in each (sim/stretches.py).
    cache = default_cache()
    compiled = build.compile_firmware(cache)
    with tempfile.TemporaryDirectory(prefix="pulsebridge-bench-") as tmp:
        d = Path(tmp)
        spec = boards.BoardSpec("pb-bench01", virtual_clock=True, link=kind)
        boards.prepare(spec, d, cache)
        # A first short run with room to spare measures what the simulation
        # itself takes of the heap; the run proper gets the ESP32's heap plus that.
        probe = _run_board(d, compiled, 1024, 0.05, speed, kind, spec)
        sim_kb = -(-probe["sim_heap"] // 1024)
        heap_kb = heap // 1024 + sim_kb
        if stretches:
            heap_kb += _STRETCHES_HEAP_KB
        r = _run_board(d, compiled, heap_kb, minutes, speed, kind, spec, stretches)
    r["heapsize_kb"] = heap_kb
    r["sim_heap_kb"] = sim_kb
    r["firmware_heap"] = heap
    return r


def firmware_report(r: dict[str, Any]) -> list[str]:
    lines = ["firmware benchmark: %.1f simulated minutes over %s, ECG 512 Hz + PPG 100 Hz, 1 s windows" % (
        r["minutes"], r["link"])]
    lines.append("  heap: -X heapsize=%dK = %d bytes for the firmware, its .mpy code in it as provisioning installs "
                 "it (an ESP32 with BLE on leaves %d) + %d kB the simulation itself takes" % (
                     r["heapsize_kb"], r["firmware_heap"], ESP32_HEAP_BLE_ON, r["sim_heap_kb"]))
    lines.append("  firmware code in RAM %.1f kB; live data after start %.1f kB; after each minute (gc.collect): "
                 "%s bytes" % (r["code_heap"] / 1024, (r["heap_after_start"] - r["code_heap"]) / 1024,
                               ", ".join(str(x) for x in r["heap_by_minute"])))
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
    lines.append("  gaps %d, rejected %d, duplicates %d, FIFO overflows reported %d, frames dropped %d" % (
        r["gaps"], r["rejected"], r["duplicates"], r["fifo_lost"], r["frames_dropped"]))
    if r["link"] == "ble":
        lines.append("  the hub's acks over BLE: %d messages (each lingers %.1f s to cover the frames that follow)"
                     % (r["hub_acks"], BleTransport.ack_linger_s))
    else:
        lines.append("  the hub's acks over serial: %d messages" % r["hub_acks"])
    lines.append("  allocations in the steady state: %.0f bytes/s from the firmware's heap (%.0f bytes/s left to "
                 "the GC, %.0f bytes/s of call frames freed on return); the simulation's own garbage %.0f bytes/s" % (
                     r["alloc_bytes_per_s"], r["garbage_bytes_per_s"], r["frame_bytes_per_s"],
                     r["sim_garbage_bytes_per_s"]))
    if r["link"] == "ble":
        lines.append("  BLE notifications refused by the stack (ENOMEM, an exception object each): %d in %.0f s" % (
            r["ble_enomem"], r["data_seconds"]))
    lines.append("  heap low-water mark %d bytes free; largest block %d bytes" % (
        r["heap_low_free"], r["largest_block"]))
    if r["heap_by_minute"]:
        # The low-water counts garbage not yet collected (the app collects
        # when the free heap falls below about half of what its last
        # collection left): a MemoryError comes only when a collection
        # cannot free enough, so the margin is what is free after one.
        lines.append("  free right after a collection (each minute's): %d bytes at the least" % (
            r["heap_total"] - max(r["heap_by_minute"])))
    if r.get("chip"):
        lines += chip_report(r)
    return lines


def chip_report(r: dict[str, Any]) -> list[str]:
    c = r["chip"]
    lost = sum(s["lost"] for s in r["streams"].values()) + c["timer_dropped"]
    shortest = min(f["fill_ms"] for f in c["fifos"].values()) if c["fifos"] else 0.0
    lines = ["  at %s speed: factor %.0f chip us per host CPU us (calibration programs: %s); "
             "%.0f-%.0f as this machine's speed changed (%d probes)" % (
                 c["speed"], c["factor"], ", ".join("%.0f" % f for f in c["factors"]), c["factor_range"][0],
                 c["factor_range"][1], c["probes"])]
    lines.append("  CPU %.1f %% (computing %.1f %%, waiting on buses and console %.1f %%)" % (
        c["cpu_pct"], 100 * c["compute_us"] / max(1, c["chip_us"]), 100 * c["io_us"] / max(1, c["chip_us"])))
    worst = max([f["irq_latency_us"] for f in c["fifos"].values()] or [-1])
    if worst >= 0:  # interrupt-driven: from a chip's FIFO interrupt to the firmware reading it
        lines.append("  worst loop latency %.1f ms (a FIFO's interrupt to its drain) vs shortest FIFO fill time "
                     "%.1f ms (half: %.1f ms); longest loop iteration %.1f ms" % (
                         worst / 1000, shortest, shortest / 2, c["worst_step_us"] / 1000))
    else:
        lines.append("  worst loop latency %.1f ms (the longest loop iteration) vs shortest FIFO fill time %.1f ms "
                     "(half: %.1f ms)" % (c["worst_step_us"] / 1000, shortest, shortest / 2))
    for name, f in sorted(c["fifos"].items()):
        lines.append("    %s FIFO: %d deep, fills in %.1f ms; fullest seen by the firmware %d; samples it overflowed "
                     "%d; interrupts %d, worst served after %.1f ms (at %.3f s), 99 %% within %d ms, 99.9 %% within "
                     "%d ms" % (
                         name, f["depth"], f["fill_ms"], f["worst_level"], f["overflowed"], f["irqs"],
                         f["irq_latency_us"] / 1000, f["worst_latency_at_us"] / 1e6, f["latency_p99_ms"],
                         f["latency_p999_ms"]))
    lines.append("  samples lost %d (timer ticks dropped %d, soft IRQs dropped %d); console blocked %.1f s" % (
        lost, c["timer_dropped"], c["sched_dropped"], c["console_blocked_us"] / 1e6))
    lines += host_report(c)
    s = c.get("stretches")
    if s:
        lines.append("  stretches between two ECG FIFO reads: %d over half its fill time, %d over all of it; "
                     "the longest (ms computing/blocked on I/O/idle; the longest single span of code charged), "
                     "with the work in them (name, nesting, ms from the stretch's start, ms):" % (
                         s["over_half_fill"], s["over_fill"]))
        lines.append("    each traced piece (calls, ms in all, longest ms; the tracer's %d us a call taken off): %s" % (
            s["tare_us"], "; ".join("%s %d %.0f %.1f" % (k, v[0], v[1] / 1000, v[2] / 1000)
                                    for k, v in sorted(s["by_label"].items()))))
        for st in s["longest"] + [None] + s.get("longest_clean", []):
            if st is None:
                lines.append("    the longest the host was not seen in:")
                continue
            lines.append("    %.1f ms at %.3f s (%.1f/%.1f/%.1f; span %.1f%s): %s" % (
                st["us"] / 1000, st["at_us"] / 1e6, st["compute_us"] / 1000, st["io_us"] / 1000,
                st["idle_us"] / 1000, st["longest_span_us"] / 1000,
                ", the host in %d" % st["host_spans"] if st["host_spans"] > 0 else "", "; ".join(
                "%s%s +%.1f %.1f" % ("  " * p[1], p[0], p[2] / 1000, p[3] / 1000) for p in st["pieces"])))
    return lines


def host_report(c: dict[str, Any]) -> list[str]:
    # This machine's own work in the firmware's time (firmware_mpy/sim/cpu.py, clock.py): CPU time the kernel
    # charged while the meter read its count, not charged; interrupts and page faults in a span, which the meter
    # cannot take off: the spans they reached, and the FIFO services that waited on one, apart from the rest.
    # Every figure above counts them all.
    lines = ["  CPU time counted while the meter read it, not charged (a span's code cannot run longer than its wall "
             "time): %.1f ms of this machine's in %d spans, the most %.2f ms" % (
                 c["outside_us"] / 1000, c["outside_spans"], c["outside_max_us"] / 1000)]
    if c["host_spans"] < 0:
        return lines + ["  the host in the firmware's time: not seen here (no /proc/softirqs)"]
    lines.append("  the host in the firmware's time (a softirq run on its CPU, or a page fault, in a span of %.0f ms "
                 "or more): %d spans (%d with a page fault), %.1f ms in all, the longest %.1f ms; the longest span "
                 "without %.1f ms (at %.3f s)" % (
                     HOST_LOOK_MS, c["host_spans"], c["host_fault_spans"], c["host_span_us"] / 1000,
                     c["longest_host_span_us"] / 1000, c["longest_clean_span_us"] / 1000,
                     c["longest_clean_span_at_us"] / 1e6))
    for name, f in sorted(c["fifos"].items()):
        lines.append("    %s FIFO: %d services waited on such a span, %d samples overflowed before them; "
                     "the others' worst latency %.1f ms (at %.3f s; half the fill time %.1f ms), %d samples "
                     "overflowed" % (
                         name, f["host_services"], f["host_lost"], f["clean_latency_us"] / 1000,
                         f["clean_latency_at_us"] / 1e6, f["fill_ms"] / 2, f["overflowed"] - f["host_lost"]))
    return lines


HOST_LOOK_MS = 5  # firmware_mpy/sim/clock.py _HOST_LOOK_US


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
    from agent.dev.sim import waveforms

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


def main(what: str, minutes: float, as_json: bool, speed: str = "host", kind: str = "serial",
         heap: int = ESP32_HEAP_BLE_ON, stretches: bool = False) -> int:
    if what == "firmware":
        r = firmware(minutes, speed, kind, heap, stretches)
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
