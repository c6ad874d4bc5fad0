# Firmware benchmark, run under the MicroPython unix port by `pulsebridge
# bench firmware`: the unmodified app on a simulated board (ECG 512 Hz + PPG
# 100 Hz) for N simulated minutes, alone in its interpreter: its link goes
# to the hub in the benchmark's other process (agent/dev/bench.py) through two
# pipes. Prints one JSON line of figures.
# Usage: micropython -m sim.bench_board MINUTES SPEED LINK UP_FD DOWN_FD [stretches]
#   SPEED: host (this machine's speed, on a virtual clock) or a chip (esp32,
#   esp32-240, esp32s3: sim.clock.ChipClock, calibrated at start);
#   LINK: serial (the console UART) or ble (the fake radio, one central);
#   stretches: also report the longest stretches between two ECG FIFO reads
#   and what the firmware did in them (sim.stretches; a chip speed only).
# Pipe records, a kind byte then a 4-byte big-endian length then data:
#   board to hub: U serial bytes, N a notification, S sync (the board is
#   about to sleep; its clock's ms, 4 bytes); hub to board, once per S: K the downlink bytes the hub
#   answered with (ack lines) for the radio, or nothing when it wrote them
#   to the board's console (stdin) already. The hub thus answers before the
#   board's next loop, whatever the machine's load, and its time is not the
#   board's.
import gc
import sys

# The heap as the firmware finds it: what this script and the interpreter
# hold (m0), then the firmware's modules, loaded as a board loads them
# (code_heap), then the simulation's (sim_heap: not on a board).
gc.collect()
_M0 = gc.mem_alloc()
_LINK = sys.argv[3] if len(sys.argv) > 3 else "serial"
from app import config, outbox  # noqa: E402  (as the board's main.py: the ring first)

outbox.preallocate(config.ring_bytes())
del config  # (as main.py, not held: the app drops it once started)
gc.collect()
_MR = gc.mem_alloc()  # the ring is the firmware's data, not code
from app import main  # noqa: E402
from protocols import fields  # noqa: E402

if _LINK == "ble":
    from app import bonds, link_ble, vitals_lite  # noqa: E402,F401
else:
    from app import link_serial  # noqa: E402,F401
# The drivers of this board's chips are firmware code too (the board
# imports each when it asks for its sensors).
from drivers import max30003, max30102  # noqa: E402,F401

gc.collect()
_M1 = gc.mem_alloc()


def _next_qstr_pool():
    # The names (qstrs) of every module share pools that double (20, 40,
    # ... 640 entries: 1260 in six; a seventh takes 1280 more, 15 kB on
    # this 64-bit port), each allocated by the first name past the last.
    # The simulation's ~300 names would push the firmware's (~1000 here,
    # fewer on a chip, whose port has more of them built in) past the
    # sixth pool's end, and whichever name came first past it, often one
    # the app interns as it starts, was charged the whole next pool: the
    # benchmark's heap figures moved by 15 kB with a name or two, and
    # its start failed with MemoryError. So the next pool is made here, as
    # the simulation's, by interning names until one allocates it.
    i = 0
    gc.collect()
    before = gc.mem_alloc()
    while True:
        hasattr(_next_qstr_pool, "_qstr_pool_filler_%d" % i)  # interns the name
        i += 1
        gc.collect()
        now = gc.mem_alloc()
        if now - before > 4096:  # a pool, not one name
            return i
        before = now


_next_qstr_pool()
import json  # noqa: E402

from sim import models  # noqa: E402  (loaded by sim.board_sim anyway)
from sim.board_sim import SimBoard  # noqa: E402
from sim.clock import VirtualClock, mem_current, mem_total  # noqa: E402

gc.collect()
_M2 = gc.mem_alloc()

_BLE_MTU = 247  # what the hub's BlueZ and most phones negotiate
_ANSWER_BYTES = 1024  # the hub's answer to one sync (ack lines), before it has to grow
_DRAIN_MS = 20000  # after the run: sensors stopped, what was built goes out


class HubPipe:
    def __init__(self, clock, up_fd, down_fd):
        self.clock = clock
        self.up = open("/dev/fd/%d" % up_fd, "wb")
        self.down = open("/dev/fd/%d" % down_fd, "rb")
        self._hdr = bytearray(5)
        self._ms = bytearray(4)  # the board's time in each sync (the hub's acks linger on it over BLE)
        self._answer = bytearray(_ANSWER_BYTES)  # read into, cut to each answer in place (no object per sync)
        self._full = memoryview(bytearray(_ANSWER_BYTES))
        self.pending = False

    def _put(self, kind, data, off=0, n=-1):
        # A record: kind, 4-byte length, data[off:off + n] (written in place
        # with the stream's write(buf, off, n): no slice object per record).
        h = self._hdr
        if n < 0:
            n = len(data) - off
        h[0] = kind
        h[1] = n >> 24
        h[2] = (n >> 16) & 0xFF
        h[3] = (n >> 8) & 0xFF
        h[4] = n & 0xFF
        self.up.write(h)
        if n:
            self.up.write(data, off, n)

    def write(self, buf, off, n):  # the console UART's far end (inside SimConsole.write)
        self._put(0x55, buf, off, n)
        self.pending = True
        return n

    def notify(self, data):  # the central's end of the radio (inside the radio's service)
        self._put(0x4E, data)
        self.pending = True

    def sync(self):
        # Lets the hub catch up with what was sent; returns its answer, a
        # buffer valid until the next sync (empty: none). Reads into buffers
        # made once: what the simulation allocates here would be garbage in
        # the firmware's heap, which a board never sees.
        # (Called in the firmware's time, before enter(): its frame and its
        # pieces' keep within the VM's 11 words, else each sync's frame,
        # from the heap, would be counted as the firmware's: README, "call
        # frames".)
        if not self.pending:
            return b""
        c = self.clock
        c.enter()
        try:
            self.pending = False
            self._send_time(c)
            return self._answer_read()
        finally:
            c.leave()

    def _send_time(self, c):
        # The board's time in ms (clock c) to the hub.
        ms = c.now_us() // 1000
        t = self._ms
        t[0] = (ms >> 24) & 0xFF
        t[1] = (ms >> 16) & 0xFF
        t[2] = (ms >> 8) & 0xFF
        t[3] = ms & 0xFF
        self._put(0x53, t)

    def _answer_read(self):
        h = self._hdr
        self.down.readinto(h)
        n = (h[1] << 24) | (h[2] << 16) | (h[3] << 8) | h[4]
        a = self._answer
        if n > len(self._full):  # (a long answer, rare: the buffers grow once)
            self._full = memoryview(bytearray(n))
            a = self._answer = bytearray(n)
        a[:] = self._full  # its whole capacity back, then cut to n: in place
        a[n:] = b""
        if n:
            self.down.readinto(a)
        return a


def _fifo_level(name, model):
    return model.count if name == "max30003" else model.level()


def run(minutes, speed, link_kind, up_fd, down_fd, stretches=False):
    from app import config

    with open("sim.json") as f:
        sim = json.load(f)
    sim["board_speed"] = speed
    sim["virtual_clock"] = True
    if link_kind == "ble":
        sim["ble"] = {}  # the in-process radio: this benchmark's pipe is its central
    gc.collect()
    b0 = gc.mem_alloc()
    board = SimBoard(sim, None if speed != "host" else VirtualClock())
    clock = board.clock
    pipe = HubPipe(clock, up_fd, down_fd)
    board.console_out = pipe  # the console's input stays stdin: the hub writes there
    cfg = config.load()
    cfg["link"] = link_kind
    key = config.load_key()
    if link_kind == "ble":
        board.prepare_radio()  # its notification buffers are the simulation's (NimBLE's are not in the GC heap)
    gc.collect()
    sim_heap = _M0 + (_M2 - _M1) + (gc.mem_alloc() - b0)
    code_heap = _M1 - _MR
    # The chip models (and their recordings' buffers) are made when the app
    # asks the board for its sensors: the simulation's too (the drivers'
    # few hundred bytes with them).
    sensors = board.sensors
    models_heap = [0]

    def measured_sensors(c):
        gc.collect()
        a = gc.mem_alloc()
        out = sensors(c)
        gc.collect()
        models_heap[0] = gc.mem_alloc() - a
        return out

    board.sensors = measured_sensors
    epoch = config.next_epoch()
    del config  # as main.run(): the app drops it from RAM
    app = main.App(board, cfg, key, epoch, True)
    sim_heap += models_heap[0]
    radio = board.radio
    if radio is not None:
        radio.on_notify = pipe.notify
    tracer = None
    if stretches and clock.chip:
        from sim import stretches as stretches_mod

        tracer = stretches_mod.install(app, board, clock)
    app.start()
    if radio is not None:
        radio.connect(_BLE_MTU)
    clock.enter()  # the benchmark's collection and list, with the sensors running: not the firmware's time
    gc.collect()
    heap_after_start = gc.mem_alloc()
    # Preallocated: a list grown while measuring would show as heap growth.
    heap_by_minute = [0] * int(minutes)
    clock.leave()
    minute = 0
    memory_errors = 0
    end_ms = int(minutes * 60000)
    next_minute = 60000
    low_free = gc.mem_free()
    worst_step_us = 0
    # Allocations are counted from the steady state on, after start-up.
    steady_ms = min(10000, end_ms // 2)
    steady_alloc0 = -1
    steady_garbage0 = 0
    steady_sim0 = 0
    steady_t0 = 0
    steady_alloc = 0
    steady_garbage = 0
    steady_sim = 0
    t_end = 0
    busy_end = 0
    draining = False
    drain_end_ms = end_ms + _DRAIN_MS
    while True:
        s0 = clock.now_us()
        try:
            app.step()
        except MemoryError:
            memory_errors += 1
        s1 = clock.now_us()
        if not draining and s1 - s0 > worst_step_us:
            worst_step_us = s1 - s0
        clock.enter()  # (the benchmark's look at the heap walks it all: not the firmware's time)
        free = gc.mem_free()
        clock.leave()
        if free < low_free:
            low_free = free
        down = pipe.sync()
        if down:
            clock.enter()
            if radio is not None:
                radio.write(down)
            clock.leave()
        app.wait()
        now_ms = board.ticks_ms()
        if draining:
            if now_ms >= drain_end_ms or app.outbox.depth() == 0:
                break
            continue
        if steady_alloc0 < 0 and now_ms >= steady_ms:
            steady_alloc0 = mem_total() - clock.sim_alloc
            steady_garbage0 = mem_current() - clock.sim_garbage
            steady_sim0 = clock.sim_garbage
            steady_t0 = now_ms
        if now_ms >= next_minute:
            next_minute += 60000
            clock.enter()  # the benchmark's own collection is not the firmware's time
            gc.collect()
            if minute < len(heap_by_minute):
                heap_by_minute[minute] = gc.mem_alloc()
            minute += 1
            clock.leave()
        if now_ms >= end_ms:
            steady_alloc = mem_total() - clock.sim_alloc - steady_alloc0
            steady_garbage = mem_current() - clock.sim_garbage - steady_garbage0
            steady_sim = clock.sim_garbage - steady_sim0
            steady_s = (now_ms - steady_t0) / 1000
            t_end = now_ms
            if clock.chip:
                busy_end = (clock.t_us, clock.compute_us, clock.io_us)
            app.stop()
            draining = True
    # The firmware's figures first; then its big buffers go, so the report
    # itself finds room in the heap the firmware was given.
    largest_block = len(app.outbox.buf)
    outbox_depth = app.outbox.depth()
    frames_dropped = app.outbox.dropped
    heap_total = gc.mem_alloc() + gc.mem_free()
    app.outbox = None
    app._frame_writer = None  # (it writes into the ring: holds it too)
    outbox._ring = None  # (app/outbox.py keeps it for a reboot)
    gc.collect()
    from protocols import messages  # (the report's stream names: not the firmware's)

    streams = {}
    chips = {fields.STREAM_ECG_MAX30003: "max30003", fields.STREAM_PPG_MAX30102: "max30102"}
    for st in app.streams:
        name = chips[st.stream_id]
        nch = len(st.chans)
        model = board.models[name]
        # What the chip converted, what the board still holds in its current
        # window and what waits in the FIFO: the hub adds what it received.
        streams[messages.STREAM_NAMES[st.stream_id]] = {
            "converted": model.index * nch, "on_board": st.n * nch, "in_fifo": _fifo_level(name, model) * nch,
        }
    chip = {}
    if clock.chip:
        fifos = {}
        for name, m in board.models.items():
            if hasattr(m, "max_level"):
                lat = max([p.worst_latency_us for p in m.irq_pins] or [-1])
                lat_at = max([p.worst_at_us for p in m.irq_pins] or [-1])
                edges = sum(p.edges for p in m.irq_pins)
                buckets = m.irq_pins[0].latency_ms if m.irq_pins else [0]  # (one line per chip: no list made)
                fifos[name] = {"depth": 32, "fill_ms": 32000 / m.rate_hz(), "worst_level": m.max_level,
                               "overflowed": m.lost, "irq_latency_us": lat, "worst_latency_at_us": lat_at,
                               "clean_latency_us": max([p.worst_clean_latency_us for p in m.irq_pins] or [-1]),
                               "clean_latency_at_us": max([p.worst_clean_at_us for p in m.irq_pins] or [-1]),
                               "host_services": sum(p.host_services for p in m.irq_pins),
                               "host_lost": sum(p.host_lost for p in m.irq_pins),
                               "irqs": edges, "latency_p99_ms": models.latency_percentile_ms(buckets, 0.99),
                               "latency_p999_ms": models.latency_percentile_ms(buckets, 0.999)}
        timer_dropped = 0
        for t in board._timers:
            timer_dropped += t.dropped
        chip_us, compute_us, io_us = busy_end
        chip = {
            "speed": speed, "factor": clock.calibrated_milli / 1000, "factors": [f / 1000 for f in board.speed_each],
            "factor_range": [clock.factor_lo_milli / 1000, clock.factor_hi_milli / 1000], "probes": clock.probes,
            "chip_us": chip_us, "compute_us": compute_us, "io_us": io_us,
            "cpu_pct": 100 * (compute_us + io_us) / max(1, chip_us),
            "worst_step_us": worst_step_us, "fifos": fifos, "sched_dropped": clock.sched_dropped,
            "timer_dropped": timer_dropped, "tare_us": clock.tare_us,
            "longest_span_us": clock.longest_span_us, "longest_span_at_us": clock.longest_span_at_us,
            "host_spans": clock.host_spans, "host_span_us": clock.host_span_us,
            "host_fault_spans": clock.host_fault_spans, "longest_clean_span_at_us": clock.longest_clean_span_at_us,
            "outside_us": clock.outside_us, "outside_spans": clock.outside_spans,
            "outside_max_us": clock.outside_max_us, "tare_wall_us": clock.wall_tare_milli / 1000,
            "longest_host_span_us": clock.longest_host_span_us, "longest_clean_span_us": clock.longest_clean_span_us,
            "console_blocked_us": board.console_port.blocked_us if board.console_port else 0,
        }
        if tracer is not None:
            chip["stretches"] = tracer.report()
    print(json.dumps({
        "minutes": minutes, "board_speed": speed, "link": link_kind, "chip": chip,
        # Allocations: every byte the firmware took from its heap (a chip's
        # gc_alloc calls), of them garbage: left to the GC; frames: call
        # frames allocated on the heap and freed on return (no GC, but
        # allocator time).
        "alloc_bytes_per_s": steady_alloc / max(1e-9, steady_s),
        "garbage_bytes_per_s": steady_garbage / max(1e-9, steady_s),
        "frame_bytes_per_s": (steady_alloc - steady_garbage) / max(1e-9, steady_s),
        "sim_garbage_bytes_per_s": steady_sim / max(1e-9, steady_s), "heap_low_free": low_free,
        "largest_block": largest_block,
        "heap_total": heap_total, "code_heap": code_heap, "sim_heap": sim_heap,
        "heap_after_start": heap_after_start - sim_heap, "heap_by_minute": heap_by_minute,
        "memory_errors": memory_errors,
        # Each ENOMEM of gatts_notify made an OSError in the firmware's heap.
        "ble_enomem": app.link.enomem if link_kind == "ble" else 0, "outbox_depth_end": outbox_depth,
        "frames_dropped": frames_dropped, "data_seconds": t_end / 1000, "streams": streams,
    }))


if __name__ == "__main__":  # (micropython -m; imported, as by tests, it only defines)
    run(float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
        len(sys.argv) > 6 and sys.argv[6] == "stretches")
