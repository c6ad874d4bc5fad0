# The firmware's steady state allocates nothing (issue 11, §2): after
# start-up the unmodified app streams ECG 512 Hz + PPG 100 Hz over its real
# serial or BLE link on a simulated board, with the hub at the link's far
# end in this interpreter, and runs every loop under
# micropython.heap_lock(): any allocation of the firmware raises
# MemoryError where it happens (its traceback printed). The simulation
# (chip models, console, radio: between the clock's enter() and leave())
# and the hub may allocate; the firmware's call frames that do not fit the
# C stack fall back to it under the lock (they are freed on return, never
# garbage). A third run starts the board's ticks just before they wrap
# and its sample indices 25 days along (past 2**30 at 512 Hz). The unix
# port's small ints have 63 bits, an ESP32's 31: every integer the frame
# writer is given is checked to be under 2**30 (_SmallIntWriter), so what
# would be a heap int on the chip fails here too. A fourth starts the
# board's uptime just before 2**30 ms (12.4 days), with the status message
# and the answer to a time request under the lock and counted as well.
import errno
import gc
import json
import sys

import micropython

from app import config, main, outbox
from protocols import cbor, hub, hub_link, link, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock

_BLE_MTU = 247
_START_MS = 4000  # start-up (hello, first windows, first acks): allocations allowed
_STEADY_MS = 12000  # then this long under the heap lock: a status message (every 10 s) included
_SMALL_INT_MAX = (1 << 30) - 1  # an ESP32's (32-bit port's) largest small int


class _SmallIntWriter(cbor.Writer):
    # The app's frame writer, counting the integers it is given that a
    # 32-bit port would hold as heap ints (the unix port's small ints have
    # 63 bits: this makes them visible). Counts, not asserts: under the heap
    # lock an assertion's message could not be made.
    big = 0

    def head(self, major, value):
        if value > _SMALL_INT_MAX:
            _SmallIntWriter.big += 1
        cbor.Writer.head(self, major, value)

    def uint_halves(self, hi, lo):
        if hi > _SMALL_INT_MAX or lo > _SMALL_INT_MAX:
            _SmallIntWriter.big += 1
        cbor.Writer.uint_halves(self, hi, lo)


def _load(path, mode="r"):
    with open(path, mode) as f:
        return json.load(f) if mode == "r" else f.read()


class _Hub:
    # The hub's end of the link: verifies what the board sends and answers
    # each sample frame with an ack, as the agent does (allocates freely).
    def __init__(self, device_id, key, kind):
        self.hub = hub.Hub()
        self.hub.add_device(device_id, key)
        self.device_id = device_id
        self.kind = kind
        self.source = hub_link.StreamDeframer() if kind == "serial" else hub_link.Reassembler()
        self.accepted = 0
        self.rejected = 0
        self.next_index = {}
        self.gaps = 0
        self.frames = []  # (stream, t0_ms, first_index) of each sample frame accepted
        self.times = []  # (nonce, tick_ms) of each time response
        self.statuses = []  # tick_ms of each status
        self.hellos = []  # tick_ms of each hello

    def write(self, buf, off, n):  # the serial console's far end (inside SimConsole.write)
        self.source.feed(bytes(memoryview(buf)[off:off + n]))
        return n

    def notify(self, data):  # the central (inside the radio's service)
        self.source.feed(bytes(data))

    def answer(self):
        out = bytearray()
        while True:
            ev = self.source.next_event()
            if ev is None:
                return bytes(out)
            if not isinstance(ev, link.Frame):
                continue
            r = self.hub.receive(ev.data)
            m = r.message
            if r.verdict != hub.ACCEPTED:
                self.rejected += 1
                continue
            self.accepted += 1
            if isinstance(m, messages.TimeResponse):
                self.times.append((m.nonce, m.tick_ms))
            if isinstance(m, messages.Status):
                self.statuses.append(m.tick_ms)
            if isinstance(m, messages.Hello):
                self.hellos.append(m.tick_ms)
            if isinstance(m, messages.SampleFrame):
                if self.next_index.get(m.stream, m.first_index) != m.first_index:
                    self.gaps += 1
                self.next_index[m.stream] = m.first_index + m.count
                self.frames.append((m.stream, m.t0_ms, m.first_index))
            if isinstance(m, (messages.SampleFrame, messages.OriginCheckpoint)):  # as the hub acks them
                for msg in self.hub.ack(self.device_id, m.epoch, [m.seq]):
                    out += hub_link.downlink_line(msg)


class _HeapLooks:
    # The app's gc module, counting how often it looks at the free heap
    # (gc.mem_free() walks the whole allocation table: ~2 ms of an ESP32's
    # time for its heap).
    looks = 0

    def mem_free(self):
        _HeapLooks.looks += 1
        return gc.mem_free()

    def collect(self):
        gc.collect()


def _run(kind, ticks_start_ms=0, days_streamed=0, ecg=None, uptime_start_ms=0, time_request_ms=-1):
    # time_request_ms: when (board uptime) the hub sends a time request (-1: never).
    sim = _load("sim.json")
    sim["virtual_clock"] = True
    sim["ticks_start_ms"] = ticks_start_ms
    sim["uptime_start_ms"] = uptime_start_ms
    if kind == "ble":
        sim["ble"] = {}
    cfg = config.load()
    cfg["link"] = kind
    if ecg is not None:
        cfg["ecg"] = ecg
    cfg["origin_every_ms"] = 2000  # origin checkpoints (app/origin.py) made under the heap lock too
    key = config.load_key()
    clock = VirtualClock()
    board = SimBoard(sim, clock)
    far = _Hub(cfg["device_id"], key, kind)
    board.console_in = None  # the serial link's input: SimConsole.feed()
    board.console_out = far
    outbox.preallocate(config.ring_bytes())
    main.gc = _HeapLooks()
    app = main.App(board, cfg, key, config.next_epoch())
    for st in app.streams:  # as if streaming for days: the sample indices far along
        index = days_streamed * 86400 * st.rate_hz
        st.first_index_hi, st.first_index = index >> 30, index & _SMALL_INT_MAX
    w = app._frame_writer
    app._frame_writer = _SmallIntWriter(w.buf, w.pos, w.end)
    w = app._small_w  # status messages, time responses
    app._small_w = _SmallIntWriter(w.buf, w.pos, w.end)
    _SmallIntWriter.big = 0
    radio = board.radio
    if radio is not None:
        radio.on_notify = far.notify
    reads = [0]
    if radio is not None:
        ble = app.link._ble
        read = ble.gatts_read

        def gatts_read(handle):
            # The one allocation a BLE board cannot avoid: MicroPython's
            # gatts_read returns a new bytes object (its bluetooth module
            # has no readinto); allowed here, counted.
            was = clock.heap_locked
            clock.unlock_heap()
            try:
                reads[0] += was
                return read(handle)
            finally:
                if was:
                    clock.lock_heap()

        ble.gatts_read = gatts_read
    app.start()
    if radio is not None:
        radio.connect(_BLE_MTU)
    built = 0
    looks = 0
    checkpoints = 0
    locked = False
    end_ms = uptime_start_ms + _START_MS + _STEADY_MS
    nonce = -1
    try:
        while True:
            now_ms = board.uptime_ms()
            if not locked and now_ms >= uptime_start_ms + _START_MS:
                built = app.frames_built
                checkpoints = app.origin.index
                gc.collect()
                clock.lock_heap()
                locked = True
                looks = _HeapLooks.looks
            if now_ms >= end_ms:
                break
            app.step()
            clock.unlock_heap()  # the hub's turn
            down = far.answer()
            if nonce < 0 <= time_request_ms <= now_ms:
                nonce, request = far.hub.time_request(far.device_id, 1764547200000)
                down += hub_link.downlink_line(request)
            if down:
                if radio is not None:
                    radio.write(down)
                else:
                    board.console_port.feed(down)
            if locked:
                clock.lock_heap()
            app.wait()
    except MemoryError as e:
        clock.unlock_heap()
        sys.print_exception(e)  # type: ignore[attr-defined]
        raise AssertionError("%s link: the firmware allocated in the steady state, %d ms after start-up (traceback "
                             "above)" % (kind, board.uptime_ms())) from None
    finally:
        clock.unlock_heap()
    main.gc = gc
    built = app.frames_built - built
    # The free heap looked at a few times a second (status messages
    # included), not on every loop (hundreds a second).
    looks = _HeapLooks.looks - looks
    assert looks <= 11 * (_STEADY_MS // 1000), (kind, looks)
    assert app.origin.index - checkpoints >= 2, (kind, app.origin.index, checkpoints)
    # The loop did its work meanwhile: each second two frames built, sent and
    # acknowledged, nothing lost, nothing forged.
    assert built >= 2 * (_STEADY_MS // 1000) - 2, (kind, built)
    assert far.accepted >= built and far.rejected == 0 and far.gaps == 0, (kind, far.accepted, far.rejected,
                                                                          far.gaps)
    assert app.outbox.depth() <= 4, (kind, app.outbox.depth())
    # Every integer written into a frame would be a small int on an ESP32,
    # and the hub decodes each frame's time from its index exactly.
    assert _SmallIntWriter.big == 0, (kind, _SmallIntWriter.big)
    rates = {st.stream_id: (st.rate_hz, st.start_ms) for st in app.streams}
    for stream, t0_ms, first_index in far.frames:
        rate_hz, start_ms = rates[stream]
        assert t0_ms == start_ms + first_index * 1000 // rate_hz, (kind, stream, t0_ms, first_index)
    assert app.loop_restarts == 0 and app.downlink_rejected == 0, (kind, app.loop_restarts, app.downlink_rejected)
    if radio is not None:  # at most one control read per ack written (two frames a second, each checkpoint)
        assert 0 < reads[0] <= 2 * (_STEADY_MS // 1000) + 2 + app.origin.index - checkpoints + (nonce >= 0), reads[0]
    if nonce >= 0:  # answered under the lock, with the board's uptime
        assert len(far.times) == 1 and far.times[0][0] == nonce, far.times
        assert time_request_ms <= far.times[0][1] <= time_request_ms + 1000, (far.times, time_request_ms)
    if uptime_start_ms:  # a status after 2**30 ms, exact (each says the uptime it was sent at)
        assert [t for t in far.statuses if t >= 1 << 30], far.statuses
    app.far = far
    return app


def test_serial_steady_state_allocates_nothing():
    _run("serial")


def test_ble_steady_state_allocates_nothing():
    _run("ble")


def test_steady_state_allocates_nothing_across_the_ticks_wrap():
    # The board's ticks_ms() wraps at 2**30 (12.4 days up): here 3 s into
    # the locked run; the sample indices 25 days along: the ECG's (512 Hz)
    # past 2**30, the frames' times in ms past 2**31, both carried in two
    # halves down to the frame writer.
    app = _run("serial", (1 << 30) - _START_MS - 3000, 25)
    assert app.board.ticks_ms() < 10000
    ecg = app.streams[0]
    assert ecg.rate_hz == 512 and ecg.first_index_hi == 1, (ecg.rate_hz, ecg.first_index_hi)


def test_steady_state_allocates_nothing_past_12_days_up():
    # The board's uptime passes 2**30 ms 3 s into the locked run: the status
    # message (every 10 s) and the answer to a time request after it carry
    # it in halves, and nothing allocates.
    start = (1 << 30) - _START_MS - 3000
    app = _run("ble", uptime_start_ms=start, time_request_ms=start + _START_MS + 5000)
    assert app.board.uptime_ms() > 1 << 30


def test_the_hello_after_12_days_up_carries_the_uptime_in_halves():
    # The hub connects past 2**30 ms of uptime: the hello says it exactly,
    # written as two small ints (_SmallIntWriter counts any larger int
    # the hello's writer is given: the run asserts none).
    start = (1 << 30) + 1000
    app = _run("ble", uptime_start_ms=start)
    hellos = app.far.hellos
    assert len(hellos) == 1 and start <= hellos[0] <= start + 1000, hellos


def test_frame_times_stay_exact_with_no_int_past_small_ints():
    # frame_time() = start_ms + index * 1000 // rate_hz (index = hi * 2**30
    # + lo), in halves computed with no value past 2**30 (a heap int on an
    # ESP32), exact at any index up to decades; _skip carries the index.
    from app.sampler import Stream

    class _Chip:
        def __init__(self, rate_hz):
            self.rate_hz = rate_hz

    for rate in (100, 128, 250, 360, 512, 1000):
        st = Stream(_Chip(rate), messages.STREAM_PPG_MAX30102 if rate == 100 else messages.STREAM_ECG_MAX30003,
                    rate, 1234)
        for index in (0, 1, rate - 1, rate, 1073741 * rate // 512, 12 * 86400 * rate + 77, (1 << 30) - 1,
                      1 << 30, (1 << 30) + rate - 1, 25 * 86400 * rate + 3, 5 * 365 * 86400 * rate + 511,
                      30 * 365 * 86400 * rate + rate - 1):
            st.first_index_hi, st.first_index = index >> 30, index & _SMALL_INT_MAX
            st.frame_time()
            assert st.t0_ms_lo <= _SMALL_INT_MAX, (rate, index)
            assert (st.t0_ms_hi << 30) + st.t0_ms_lo == 1234 + index * 1000 // rate, (rate, index)
        st.first_index_hi, st.first_index = 0, (1 << 30) - 5
        st._skip(7)  # across the low half's wrap
        assert (st.first_index_hi, st.first_index) == (1, 2)
        st._skip(_SMALL_INT_MAX)
        assert (st.first_index_hi, st.first_index) == (2, 1)


def test_timer_paced_ad8232_steady_state_allocates_nothing():
    # The AD8232 front end sampled by a timer callback (a soft IRQ), 250 Hz.
    _run("serial", ecg={"chip": "ad8232", "rate_hz": 250})


class _SimAllocClock(VirtualClock):
    # A virtual clock that counts what the simulation allocates between its
    # enter() and leave() (the chip models, the console, the hub's end), so
    # a test can tell the firmware's own allocations from them.
    def __init__(self):
        super().__init__()
        self.sim_bytes = 0
        self._mark = 0
        self._nest = 0

    def enter(self):
        self._nest += 1
        if self._nest == 1:
            self._mark = micropython.mem_total()  # type: ignore[attr-defined]

    def leave(self):
        self._nest -= 1
        if self._nest == 0:
            self.sim_bytes += micropython.mem_total() - self._mark  # type: ignore[attr-defined]


def _quiet_steps(kind):
    # The tests above run under micropython.heap_lock(), where a function
    # whose call frame needs more than 11 words (locals and stack: py/objfun.c
    # VM_MAX_STATE_ON_STACK) falls back to the C stack: they cannot see those
    # frames. Unlocked, each such call allocates its frame on the heap, and
    # in a heap with no garbage that allocation searches from the lowest
    # hole (README, "call frames": a sixth of the CPU at esp32 speed). So the
    # loop's pieces that run every iteration keep to 11 words: a step that
    # finds no FIFO asking, no frame to send and no downlink allocates
    # nothing at all, frames included (mem_total counts every allocation).
    # Returns (quiet steps looked at, what each that allocated allocated).
    sim = _load("sim.json")
    sim["virtual_clock"] = True
    if kind == "ble":
        sim["ble"] = {}
    cfg = config.load()
    cfg["link"] = kind
    key = config.load_key()
    clock = _SimAllocClock()
    board = SimBoard(sim, clock)
    far = _Hub(cfg["device_id"], key, kind)
    board.console_in = None
    board.console_out = far
    outbox.preallocate(config.ring_bytes())
    app = main.App(board, cfg, key, config.next_epoch())
    radio = board.radio
    if radio is not None:
        radio.on_notify = far.notify
    app.start()
    if radio is not None:
        radio.connect(_BLE_MTU)
    quiet = 0
    allocated = []
    while board.uptime_ms() < _START_MS + 3000:
        app.step()
        down = far.answer()
        if down:
            if radio is not None:
                radio.write(down)
            else:
                board.console_port.feed(down)
        app.wait()
        if board.uptime_ms() < _START_MS:
            continue
        # Right after a step the loop has nothing to do until the clock moves:
        # the next step, at the same time, is a quiet one if the link has no
        # frame going out, no FIFO asks and no downlink waits.
        app.step()
        if app.link.busy() or app._any_ready() or app.due or (
                board.console_port.any() if radio is None else app.link.rx_more or app.link._irq_write):
            continue
        gc.collect()
        sim0 = clock.sim_bytes
        before = micropython.mem_total()  # type: ignore[attr-defined]
        app.step()
        firmware = micropython.mem_total() - before - (clock.sim_bytes - sim0)  # type: ignore[attr-defined]
        quiet += 1
        if firmware:
            allocated.append(firmware)
    return quiet, allocated


def test_a_loop_with_nothing_to_do_allocates_no_call_frame():
    quiet, allocated = _quiet_steps("serial")
    assert quiet >= 10, quiet  # (the check above found quiet steps to look at)
    assert not allocated, (quiet, allocated)


def test_a_ble_loop_with_nothing_to_do_allocates_no_call_frame():
    # Over BLE, before: the link's service (its notify loop, the bonds'
    # flush), receive and set_vitals each took a heap frame at every step,
    # 920 bytes a quiet step.
    quiet, allocated = _quiet_steps("ble")
    assert quiet >= 10, quiet
    assert not allocated, (quiet, allocated)


def _steady_seconds(kind, ecg=None):
    # A whole steady stretch, every loop step counted: _STEADY_MS after
    # start-up, with two frames a second built (encoded, encrypted, MACed,
    # listed for the origin proof), framed or fragmented and sent, their
    # acks read (MAC verified), origin checkpoints (every 2 s) and a status
    # message (every 10 s) among them. Unlocked, as _quiet_steps: a call
    # frame over the VM's 11 words would come from the heap and be counted.
    # Returns (firmware bytes allocated, frames built, messages the hub
    # accepted, [bytes, number] of the control characteristic's reads:
    # MicroPython's gatts_read returns a new bytes object, the one
    # allocation a BLE board cannot avoid).
    sim = _load("sim.json")
    sim["virtual_clock"] = True
    if kind == "ble":
        sim["ble"] = {}
    cfg = config.load()
    cfg["link"] = kind
    cfg["origin_every_ms"] = 2000
    if ecg is not None:
        cfg["ecg"] = ecg
    key = config.load_key()
    clock = _SimAllocClock()
    board = SimBoard(sim, clock)
    far = _Hub(cfg["device_id"], key, kind)
    board.console_in = None
    board.console_out = far
    outbox.preallocate(config.ring_bytes())
    app = main.App(board, cfg, key, config.next_epoch())
    radio = board.radio
    read_bytes = [0, 0]  # bytes, reads
    if radio is not None:
        radio.on_notify = far.notify
        ble = app.link._ble
        read = ble.gatts_read

        def gatts_read(handle):
            before = micropython.mem_total()  # type: ignore[attr-defined]
            data = read(handle)
            read_bytes[0] += micropython.mem_total() - before  # type: ignore[attr-defined]
            read_bytes[1] += 1
            return data

        ble.gatts_read = gatts_read
    app.start()
    if radio is not None:
        radio.connect(_BLE_MTU)
    while board.uptime_ms() < _START_MS:
        app.step()
        down = far.answer()
        if down:
            if radio is not None:
                radio.write(down)
            else:
                board.console_port.feed(down)
        app.wait()
    built = app.frames_built
    acked = far.accepted
    statuses = len(far.statuses)
    checkpoints = app.origin.index
    read_bytes[0] = read_bytes[1] = 0
    firmware = 0
    gc.collect()
    while board.uptime_ms() < _START_MS + _STEADY_MS:
        sim0 = clock.sim_bytes
        before = micropython.mem_total()  # type: ignore[attr-defined]
        app.step()
        firmware += micropython.mem_total() - before - (clock.sim_bytes - sim0)  # type: ignore[attr-defined]
        down = far.answer()
        if down:
            if radio is not None:
                radio.write(down)
            else:
                board.console_port.feed(down)
        app.wait()
    # The stretch did the steady state's work: each second two frames built
    # and acknowledged, checkpoints and a status among them.
    built = app.frames_built - built
    assert built >= 2 * (_STEADY_MS // 1000) - 2, (kind, built)
    assert far.accepted - acked >= built and far.rejected == 0 and far.gaps == 0, (kind, far.accepted, acked)
    assert app.origin.index - checkpoints >= 4 and len(far.statuses) > statuses, (kind, app.origin.index)
    assert app.loop_restarts == 0 and app.downlink_rejected == 0, (kind, app.loop_restarts)
    return firmware - read_bytes[0], built, far.accepted - acked, read_bytes


def test_a_steady_stretch_with_frames_built_and_acked_allocates_no_call_frame():
    # Before: ~45 call frames a second from the heap (6.6 kB/s here over
    # serial), the codec's per-frame work: the frame's 19 fields passed as
    # arguments (build_frame 40 words, encode_sample_frame 39), the sample
    # encoder (19), the cipher (25), the MAC (19), the serial framer (23),
    # the origin digest (22), the ack reader (27). Now none.
    firmware, built, acked, _reads = _steady_seconds("serial")
    assert firmware == 0, (firmware, built, acked)


def test_a_steady_ble_stretch_with_frames_built_and_acked_allocates_no_call_frame():
    # Over BLE also the board's vitals fed from each frame and the control
    # characteristic read at each ack (its try took 16 words); gatts_read's
    # own bytes apart (asserted a few a second, no more).
    firmware, built, acked, (read_bytes, reads) = _steady_seconds("ble")
    assert firmware == 0, (firmware, built, acked)
    # At most one control read per ack, each at most a downlink line.
    assert 0 < reads <= acked + 2 and read_bytes <= reads * (link.MAX_LINE + 64), (reads, acked, read_bytes)


def test_a_steady_stretch_of_the_timer_paced_ad8232_allocates_no_call_frame():
    # Its read (read_into 12 words, the ticks it missed 12) at every poll before.
    firmware, built, acked, _reads = _steady_seconds("serial", {"chip": "ad8232", "rate_hz": 250})
    assert firmware == 0, (firmware, built, acked)


class _Sink:
    # The console's far end: takes the bytes, keeps nothing.
    def write(self, buf, off, n):
        return n


def test_a_chip_read_and_a_console_write_allocate_no_call_frame():
    # A chip read (~40 a second) and a console write (~10) each named the
    # OSError it caught (the fault report quotes it): a try so needs at
    # least 14 words of frame, past the VM's 11, and every call took its
    # frame from the heap (~200 bytes each here). With-blocks
    # (faults.Caught) keep the error and their frames on the C stack; a
    # bus error is still reported with its errno.
    sim = _load("sim.json")
    sim["virtual_clock"] = True
    cfg = config.load()
    cfg["link"] = "serial"
    clock = _SimAllocClock()
    board = SimBoard(sim, clock)
    board.console_in = None
    board.console_out = _Sink()
    outbox.preallocate(config.ring_bytes())
    app = main.App(board, cfg, config.load_key(), config.next_epoch())
    app.start()
    while board.uptime_ms() < _START_MS:
        app.step()
        app.wait()

    def firmware_bytes(call):
        gc.collect()
        sim0 = clock.sim_bytes
        before = micropython.mem_total()  # type: ignore[attr-defined]
        r = call()
        return micropython.mem_total() - before - (clock.sim_bytes - sim0), r  # type: ignore[attr-defined]

    st = app.streams[0]
    board.sleep_ms(40)  # the ECG's FIFO fills past its threshold
    n0 = st.n
    got = firmware_bytes(lambda: app._read_sensor(0, board.ticks_ms(), 1))  # 1: _READ
    assert got[0] == 0 and got[1] >= 0 and st.n > n0, (got, st.n, n0)
    line = app.link
    line._pending = 8
    line._off = 0
    got = firmware_bytes(lambda: line._write(8, board.ticks_us()))
    assert got[0] == 0 and line._pending == 0, (got, line._pending)
    ppg = app.streams[1]
    board.sleep_ms(400)  # the PPG's FIFO too (I2C: the MAX30102's status, then its burst)
    n0 = ppg.n
    got = firmware_bytes(lambda: app._read_sensor(1, board.ticks_ms(), 1))
    assert got[0] == 0 and ppg.n > n0, (got, ppg.n, n0)
    # A frame's samples moved on (each frame) and an ack's range freed
    # (each ack): 14 and 12 words before.
    got = firmware_bytes(lambda: st.advance(0))
    assert got[0] == 0, got
    got = firmware_bytes(lambda: app.outbox.ack_range(-2, -1))
    assert got == (0, 0), got
    # An ack, about twice a second: on_downlink (24 words before) and the
    # in-place reader (27 words before) take no frame.
    far = hub.Hub()
    far.add_device(cfg["device_id"], config.load_key())
    ack = far.ack(cfg["device_id"], app.epoch, [1 << 20])[0]
    data = bytearray(ack)
    reader = firmware_bytes(lambda: app.acks.read(data, len(ack)))
    got = firmware_bytes(lambda: app.on_downlink(data, len(ack)))
    assert reader == (0, 1) and got[0] == 0 and app.downlink_rejected == 0, (reader, got)  # 1: acks.ACKED
    board.buses["spi"].faults.inject(1, errno.EIO)
    board.sleep_ms(40)
    assert app._read_sensor(0, board.ticks_ms(), 1) == -1
    assert [t for c, t in app.reports.pending if "[Errno %d]" % errno.EIO in t], app.reports.pending


def test_a_ble_fragment_notified_allocates_no_call_frame():
    # Each BLE fragment was cut through link.copy_into, a wrapper of 12
    # words around the viper copy, and notified under a try naming its
    # error (14): two heap frames a fragment. Now the viper function itself
    # and a with-block (faults.Caught).
    sim = _load("sim.json")
    sim["virtual_clock"] = True
    sim["ble"] = {}
    cfg = config.load()
    cfg["link"] = "ble"
    clock = _SimAllocClock()
    board = SimBoard(sim, clock)
    outbox.preallocate(config.ring_bytes())
    app = main.App(board, cfg, config.load_key(), config.next_epoch())
    radio = board.radio
    radio.on_notify = lambda data: None
    app.start()
    radio.connect(_BLE_MTU)
    ble = app.link
    while board.uptime_ms() < _START_MS or ble.busy():
        app.step()
        app.wait()
    message = bytearray(200)  # one fragment at MTU 247
    board.sleep_ms(ble.pump_ms)  # a new connection interval: the window has room
    sent0 = radio.queued
    gc.collect()
    sim0 = clock.sim_bytes
    before = micropython.mem_total()  # type: ignore[attr-defined]
    assert ble.send(message, len(message))
    firmware = micropython.mem_total() - before - (clock.sim_bytes - sim0)  # type: ignore[attr-defined]
    assert radio.queued == sent0 + 1 and not ble.busy(), (radio.queued, sent0)
    assert firmware == 0, firmware
