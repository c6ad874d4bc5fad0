# Firmware benchmark, run under the MicroPython unix port by `pulsebridge
# bench firmware`: the unmodified app on a simulated board with a virtual
# clock, for N simulated minutes of ECG 512 Hz + PPG 100 Hz, its frames
# going to an in-process hub over the loopback link. Prints one JSON line
# of figures. Usage: micropython -X heapsize=... sim/bench_board.py MINUTES [SPEED]
# SPEED "host" (the default) runs the board at this machine's speed; a chip
# (esp32, esp32-240, esp32s3) at that chip's, on a sim.clock.ChipClock: the
# hub's time and allocations are then the simulation's, not the firmware's.
import gc
import json
import sys
import time

from app import config, main
from protocols import messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock, mem_total
from sim.loopback import LoopbackLink


class Tally:
    # Hub-side accounting, kept small: per stream the next expected sample
    # index and the byte counts; hub time is measured to be left out of the
    # firmware's CPU figure.
    def __init__(self, link):
        self.link = link
        self.next_index = {}
        self.samples = {}
        self.wire = {}
        self.data = {}
        self.frames = {}
        self.gaps = 0
        self.rejected = 0
        self.other_wire = 0
        self.hub_us = 0
        self.fifo_lost = 0
        self.dropped = 0

    def __call__(self, r):
        m = r.message
        if m is None:
            self.rejected += 1
            return
        wire = self.link.last_wire
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
        self.dropped = m.status[2]
        d = 0
        for ch in m.channels:
            d += _varint_bytes(ch)
        self.data[s] = self.data.get(s, 0) + d


def _varint_bytes(samples):
    n = 0
    prev = 0
    for v in samples:
        d = v - prev
        prev = v
        z = (d << 1) if d >= 0 else ((-d << 1) - 1)
        n += 1
        while z >= 0x80:
            z >>= 7
            n += 1
    return n


class TimedLoopback(LoopbackLink):
    # The hub end of the link: its time and allocations are not the board's.
    def __init__(self, device_id, key, clock):
        super().__init__(device_id, key)
        self.keep = False
        self.hub_us = 0
        self.clock = clock

    def send(self, buf, n):
        # Framing (COBS, CRC) is board work; what follows is the hub's.
        c = self.clock
        c.enter()
        t = time.ticks_us()
        try:
            return LoopbackLink.send(self, buf, n)
        finally:
            self.hub_us += time.ticks_diff(time.ticks_us(), t)
            c.leave()

    def receive(self):
        c = self.clock
        c.enter()
        try:
            return LoopbackLink.receive(self)
        finally:
            c.leave()


def run(minutes, speed):
    sim = json.load(open("sim.json"))
    sim["board_speed"] = speed
    sim["virtual_clock"] = True
    board = SimBoard(sim, None if speed != "host" else VirtualClock())
    clock = board.clock
    cfg = config.load()
    key = config.load_key()
    link = TimedLoopback(cfg["device_id"], key, clock)
    tally = Tally(link)
    link.on_receive = tally
    board.link_override = link
    gc.collect()
    code_heap = gc.mem_alloc()
    app = main.App(board, cfg, key, config.next_epoch())
    app.start()
    gc.collect()
    heap_after_start = gc.mem_alloc()
    # Preallocated: a list grown while measuring would show as heap growth.
    heap_by_minute = [0] * int(minutes)
    minute = 0
    memory_errors = 0
    end_ms = int(minutes * 60000)
    poll_ms = cfg["poll_ms"]
    next_minute = 60000
    t0 = time.ticks_us()
    peak = 0
    low_free = gc.mem_free()
    worst_step_us = 0
    # Allocations are counted from the steady state on: after the first
    # frames (start-up fills the first windows and tables).
    steady_ms = min(10000, end_ms // 2)
    steady_alloc0 = -1
    while board.ticks_ms() < end_ms:
        s0 = clock.now_us()
        try:
            app.step()
        except MemoryError:
            memory_errors += 1
        s1 = clock.now_us()
        if s1 - s0 > worst_step_us:
            worst_step_us = s1 - s0
        used = gc.mem_alloc()
        if used > peak:
            peak = used
        free = gc.mem_free()
        if free < low_free:
            low_free = free
        board.sleep_ms(poll_ms)
        now_ms = board.ticks_ms()
        if steady_alloc0 < 0 and now_ms >= steady_ms:
            steady_alloc0 = mem_total() - clock.sim_alloc
            steady_t0 = now_ms
        if now_ms >= next_minute:
            next_minute += 60000
            clock.enter()  # the bench's own collection is no firmware time
            gc.collect()
            if minute < len(heap_by_minute):
                heap_by_minute[minute] = gc.mem_alloc()
            minute += 1
            clock.leave()
    steady_alloc = mem_total() - clock.sim_alloc - steady_alloc0
    steady_s = (board.ticks_ms() - steady_t0) / 1000
    wall_us = time.ticks_diff(time.ticks_us(), t0)
    app.stop()
    fw_us = wall_us - link.hub_us
    streams = {}
    chips = {messages.STREAM_ECG_MAX30003: "max30003", messages.STREAM_PPG_MAX30102: "max30102"}
    for st in app.streams:
        s = st.stream_id
        nch = len(st.chans)
        model = board.models[chips[s]]
        fifo = model.count if s == messages.STREAM_ECG_MAX30003 else (
            (model.regs[4] - model.regs[6]) & 31 or (32 if model._unread_full else 0))
        streams[messages.STREAM_NAMES[s]] = {
            "samples": tally.samples.get(s, 0), "frames": tally.frames.get(s, 0),
            "wire_bytes": tally.wire.get(s, 0), "sample_data_bytes": tally.data.get(s, 0),
            # What the chip converted, against what reached the hub, what the
            # board holds in its current window and what waits in the FIFO.
            "converted": model.index * nch, "on_board": st.n * nch, "in_fifo": fifo * nch,
            "lost": (model.index - st.n - fifo) * nch - tally.samples.get(s, 0),
        }
    chip = {}
    if clock.chip:
        fifo_fill_ms = {}
        for name, m in board.models.items():
            if hasattr(m, "max_level"):
                fifo_fill_ms[name] = {"depth": 32, "fill_ms": 32000 / m.rate_hz(), "worst_level": m.max_level}
        timer_dropped = 0
        for t in board._timers:
            timer_dropped += t.dropped
        chip = {
            "speed": speed, "factor": clock.factor_milli / 1000, "factors": [f / 1000 for f in board.speed_each],
            "chip_us": clock.t_us, "compute_us": clock.compute_us, "io_us": clock.io_us,
            "cpu_pct": 100 * (clock.compute_us + clock.io_us) / max(1, clock.t_us),
            "worst_step_us": worst_step_us, "fifos": fifo_fill_ms, "sched_dropped": clock.sched_dropped,
            "timer_dropped": timer_dropped, "tare_us": clock.tare_us,
            "console_blocked_us": board.console_port.blocked_us if board.console_port else 0,
        }
    print(json.dumps({
        "minutes": minutes, "board_speed": speed, "chip": chip,
        "alloc_bytes_per_s": steady_alloc / max(1e-9, steady_s), "heap_low_free": low_free,
        "largest_block": max(len(app.outbox.buf), len(app.payload)),
        "heap_total": gc.mem_alloc() + gc.mem_free(), "code_heap": code_heap,
        "heap_after_start": heap_after_start, "heap_by_minute": heap_by_minute,
        "peak_heap": peak,
        "memory_errors": memory_errors, "gaps": tally.gaps, "rejected": tally.rejected,
        "fifo_lost": tally.fifo_lost, "frames_dropped": tally.dropped, "outbox_depth_end": app.outbox.depth(),
        "firmware_us": fw_us, "hub_us": link.hub_us, "data_seconds": end_ms / 1000,
        "other_wire_bytes": tally.other_wire, "streams": streams,
    }))


run(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0, sys.argv[2] if len(sys.argv) > 2 else "host")
