# The board's application: sensors -> frames -> outbox -> link, one
# cooperative loop. Per loop: drain each sensor FIFO that asks for it (no
# allocation per sample), frame every full window, send what the link can
# take, read acks and commands; then sleep until a sensor's FIFO interrupt
# (its handler only sets a flag), the link's next piece, or the next thing
# due. Sensors without an interrupt line are polled every poll_ms. A board
# with no key or no configuration refuses to stream and says why on its
# console.
import gc
import sys

from micropython import const

from app import acks, faults, origin, ticks
from protocols import cose, fields
from protocols.errors import ProtocolError

# For the board's type check (App's annotations): mypy reads this block,
# MicroPython's compiler drops it (a const false: no code, no names
# interned, each of which costs heap: README, "qstr pools").
_TYPE_CHECKING = const(0)
if _TYPE_CHECKING:
    from typing import Any

    from app.outbox import Outbox
    from app.sampler import Stream
    from protocols import cbor

FIRMWARE = "pulsebridge-fw 0.1.0"
_MAX_SENDS_PER_LOOP = const(4)
_VITALS_CHUNK = const(128)  # samples fed to the board's vitals between two FIFO reads
_READ = const(1)  # _read_sensor: read the chip's FIFO
_CHECK = const(2)  # _read_sensor: check the chip still answers
_RX_CHUNKS_PER_LOOP = const(16)  # downlink read per loop at most: messages, or the links' chunks (32 bytes)
_IDLE_MAX_MS = const(100)
# Garbage is collected when the loop chooses: right after the fastest FIFO
# was drained (wherever that was: a collection takes 25-45 ms at an ESP32's
# speed, and from a drain the FIFO has its whole fill time, 62.5 ms at 512
# Hz), once less than this is free (or, if that was less, what the last
# collection left free less _GC_GARBAGE, and never less than half of it),
# rather than wherever an allocation finds the heap full
# (in the middle of a frame, with a FIFO filling). After start-up the loop
# makes next to no garbage (README, Memory on the board), so the free heap
# is looked at only every _GC_CHECK_MS: gc.mem_free() walks the whole
# allocation table, 18 us on a PC for a 230 kB heap, 2-4 ms at an ESP32's
# speed; once a loop it cost more than a frame did.
_GC_HEADROOM = const(16384)
_GC_CHECK_MS = const(250)
# The garbage a board with less free than that lets build: 25 s of a BLE
# board's control reads (gatts_read, ~82 bytes/s), a collection every 25 s
# (25-45 ms at esp32 speed: 0.1-0.2 % of its CPU), where half its free heap
# (4.7 kB of 9.3) let it build for a minute and left its low-water at 4.5
# kB: the room a rarer message's decoding or a fault's report has without
# a collection in the middle of a frame.
_GC_GARBAGE = const(2048)
# A loop iteration that has not ended after this long is stalled: the
# watchdog restarts the board (a healthy one takes milliseconds).
WATCHDOG_MS = const(5000)
# At a clean stop (Ctrl-C, a stop command) what the outbox never sent, the
# last origin checkpoint with it, goes out for at most this long: a second
# at the chip's speed carries ~11 kB over serial, more than an outbox holds
# unsent, and stays far below the watchdog's WATCHDOG_MS.
_STOP_FLUSH_MS = const(1000)
_NEVER_MS = const(0x1FFFFFFF)  # a retransmit delay no tick difference reaches: only unsent frames go
# What a firmware update loads (app/ota.py, imported when one starts or on
# a trial boot), dropped once it is over: a streaming board keeps none of it.
_UPDATE_MODULES = (("app", "ota"), ("protocols", "bundle"), ("protocols", "ed25519"), ("protocols", "_sha512"),
                   ("protocols", "cbor_items"))
# The small messages that must not be lost to a link busy with a frame (the
# hello, the time answer, the status): each a bit of App.due, set until the
# link takes it (_send_due, in this order; the error reports after them, from
# their own bounded list). Each is built only then, with the seq it spends:
# a bounded set, nothing allocated, nothing sent twice, no seq skipped.
_DUE_HELLO = const(1)
_DUE_TIME = const(2)
_DUE_STATUS = const(4)
_DUE_REPORTS = const(8)  # (not in App.due: faults.Reports holds them)
_DUE_ALL = const(15)


class App:
    # Set by app/setup.py, named here for the board's type check (bare
    # annotations: no code, no RAM).
    board: "Any"
    cfg: "dict[str, Any]"
    epoch: int
    up: "cose.MacKey"
    down: "cose.MacKey"
    acks: "Any"  # (app.acks.AckReader)
    unique_id: bytes
    streams: "list[Stream]"
    worst: "list[int]"
    outbox: "Outbox"
    _frame_writer: "cbor.Writer"
    _small_w: "cbor.Writer"
    link: "Any"
    origin: "Any"  # (app.origin.OriginLog, or None)
    hr: "Any"
    ox: "Any"
    frames_built: int
    downlink_rejected: int
    firmware: str
    reseal_due: bool
    guard: "faults.SensorGuard"
    reports: "faults.Reports"
    loop_restarts: int
    _link_fault: "Any"
    due: int
    _woken: "Any"
    _fields: "fields.SampleFrameFields"
    _bus_errors: "faults.Caught"
    _fastest: "Stream"
    seq: int
    last_command: int
    update: "Any"  # (app.ota.Updater, or None)
    next_status_ms: int
    _gc_checked_ms: int
    _epoch_unreadable: "Any"

    def __init__(self, board, cfg, key, epoch, forget_config=False):
        # forget_config: drop app.config from RAM before the rest is built
        # (run() does: the configuration is read at boot only; tests keep it).
        # Built by app/setup.py, run once: its code leaves RAM after.
        from app import setup

        setup.build(self, board, cfg, key, epoch, forget_config)
        forget("app", "setup")
        self._gc_below = _GC_HEADROOM

    def _seq(self):
        s = self.seq
        self.seq = s + 1
        return s

    def _small(self):
        # The small messages' writer, at where their payload goes.
        w = self._small_w
        w.pos = self.up.payload_offset
        return w

    def _seal_small(self):
        w = self._small_w
        self.up.seal_written(w, self.up.payload_offset)
        return self.link.send(w.buf, w.pos)

    def _send_small(self, msg):
        # A rarer message object (an update's state), by the generic encoder
        # (protocols.messages: loaded with the first rarer message, not before).
        from protocols import messages

        messages.encode(self._small(), msg)
        return self._seal_small()

    def _send_due(self, now, which):
        # Sends the small messages due among which (_DUE_*), the error
        # reports last, while the link takes them: each is built just before,
        # with the seq it spends once the link took it. A link busy with a
        # frame is not tried: they go at a later turn. The FIFOs are drained
        # after each (a status and a checkpoint, both due every 10 s, take
        # ~30 ms on a chip). Returns the time after (now if nothing went).
        while self.link.connected and not self.link.busy() and self._send_first_due(which):
            now = self._drain()
        return now

    def _send_first_due(self, which):
        # The first small message due among which, built and sealed: whether
        # the link took it.
        bit = self.due & which
        bit &= -bit  # the lowest bit set: hello, time answer, status in turn
        if bit == _DUE_HELLO:
            self.hello()
        elif bit == _DUE_TIME:
            self.time_answer()
        elif bit == _DUE_STATUS:
            self.status()
        elif which & _DUE_REPORTS and self.reports.pending:
            self._error_report()
        else:
            return False
        if not self._seal_small():
            return False  # (stalled: it stays due, its seq unused)
        self.seq += 1
        if bit:
            self.due &= ~bit
        else:
            self.reports.done()
        return True

    def _error_report(self):
        code, text = self.reports.first()
        fields.encode_error_report(self._small(), self.epoch, self.seq, code, text)

    # The small messages' payloads, built into _small() at self.seq.
    def hello(self):
        # The uptime in halves, as status() sends it: one int past 2**30 ms
        # (12.4 days up) would be a heap int on the chip.
        up = self.board.refresh_uptime()
        fields.encode_hello(self._small(), self.epoch, self.seq, self.firmware, up.lo,
                              [(s.stream_id, s.rate_hz) for s in self.streams], up.hi)

    def status(self):
        # Times on the wire (tick_ms, t0_ms) are ms since boot, never wrapping,
        # in halves (app.ticks.Uptime). Field-wise, every status period:
        # nothing allocated, for any uptime.
        # (In two pieces: one call with its nine fields would need a frame
        # past the VM's 11 words, README "call frames".)
        up = self.board.refresh_uptime()
        fields.encode_status_start(self._small(), self.epoch, self.seq, up.lo, up.hi, self.unique_id)
        fields.encode_status_end(self._small_w, self.outbox.depth(), self.outbox.dropped, gc.mem_free(),
                                 self.unique_id)
        self._read_fifos()  # (the free heap's walk and the encoding: 6 ms at esp32 speed, the seal as long)

    def time_answer(self):
        # The answer to the hub's time request (one a minute): nothing
        # allocated. The time in it is when it goes.
        up = self.board.refresh_uptime()
        fields.encode_time_response(self._small(), self.epoch, self.seq, self._time_nonce, up.lo, up.hi)

    # A frame is built twice a second: build_frame and its pieces keep
    # within the VM's 11 words of frame (locals and stack), so none takes
    # its frame from the heap (README, "call frames"); the frame's fields
    # go through self._fields (fields.SampleFrameFields), not as arguments.
    def build_frame(self, k, st, count):
        f = self._fields
        f.count = count
        self._frame_status(f, st)
        self._frame_header(f, st)
        # The frame is made where it will stay: the payload encoded (and its
        # samples encrypted) in its outbox region, then sealed around it.
        # A frame takes tens of ms on a chip: the other streams' FIFOs that
        # ask meanwhile are read between its pieces (f.between: _read_fifos).
        w = self._frame_writer
        base = self.outbox.reserve(self.worst[k])  # may drop the oldest frames: this one then says so
        w.end = base + self.worst[k]
        w.pos = base + self.up.payload_offset
        f.frames_dropped = self.outbox.dropped
        f.encode(w)
        self._seal_frame(w, base)
        self._read_fifos()
        if self.ox is not None or self.hr is not None:
            self._frame_vitals(st)
        st.advance(count)
        self.frames_built += 1

    def _frame_status(self, f, st):
        flags = 0
        if self._lead_off(st):
            flags |= fields.FLAG_LEAD_OFF
        if st.fault:
            flags |= fields.FLAG_SENSOR_FAULT
        if st.saturated:
            flags |= fields.FLAG_SATURATED
        if st.pending_lost:
            flags |= fields.FLAG_FIFO_OVERFLOW
        f.flags = flags
        f.fifo_overflows = st.pending_lost
        st.framing()  # what this frame says of the stream is taken: what its FIFO says meanwhile is the next's

    def _frame_header(self, f, st):
        sensor = st.sensor
        f.scale_num, f.scale_den = sensor.scale()
        f.ppg_drive = sensor.drive() if st.stream_id == fields.STREAM_PPG_MAX30102 else None
        f.jitter_us = sensor.take_jitter_us() if st.stream_id == fields.STREAM_ECG_AD8232 else 0
        f.epoch = self.epoch
        f.seq = self._seq()
        st.frame_time()
        f.stream = st.stream_id
        f.t0_ms = st.t0_ms_lo
        f.t0_ms_hi = st.t0_ms_hi
        f.first_index = st.first_index
        f.first_index_hi = st.first_index_hi
        f.rate_hz = st.rate_hz
        f.channels = st.chans

    def _seal_frame(self, w, base):
        # Seals the payload written from base + payload_offset, lists it for
        # the origin proof and commits it to the outbox.
        start = base + self.up.payload_offset
        n = w.pos - start
        self.up.seal_written(w, start, base)
        if self.origin is not None:  # the payload ends where the tag's bstr (2 + 32 bytes) begins
            self.origin.add(self._fields.seq, w.buf, w.pos - cose.TAG_SIZE - 2 - n, n)
        self.outbox.commit(self._fields.seq, w.pos - base)

    def _frame_vitals(self, st):
        # The board's own vitals (BLE), from the frame's samples: a few ms
        # per 100 samples on a chip, fed in chunks with the FIFOs read between.
        v = self.ox if st.stream_id == fields.STREAM_PPG_MAX30102 else self.hr
        if v is None:
            return
        if self._fields.flags & (fields.FLAG_LEAD_OFF | fields.FLAG_FIFO_OVERFLOW):
            v.reset()
        else:
            self._feed_vitals(v)

    def _feed_vitals(self, v):
        for i in range(0, self._fields.count, _VITALS_CHUNK):
            v.feed(min(self._fields.count, i + _VITALS_CHUNK), i)
            self._read_fifos()

    def _read_fifos(self):
        # Reads the FIFOs of the streams whose chip asks into the streams'
        # spare room (the one being framed too: after the samples it frames),
        # framing nothing: a full window waits for the next _drain. A stream
        # that fails is left asking: _drain reads it again and handles the
        # fault.
        now = self.board.ticks_ms()
        streams = self.streams
        for k in range(len(streams)):
            st = streams[k]
            if st.irq_pin is not None and self.guard.ready(k) and st.due(now, 0):
                self._read_now = now
                self._read_fifo(st)

    def _read_fifo(self, st):
        with self._bus_errors:
            st.poll(self._read_now)
        if self._bus_errors.take() is not None:
            st.ready = True
        self._drained(st, self._read_now)

    def _drained(self, st, now):
        # After st's FIFO was read: if it was the fastest one's, just emptied,
        # it is the collection's moment, if the last look at the heap found it
        # low (_GC_HEADROOM): the whole FIFO's fill time is the collection's,
        # the look's walk (3.5 ms at esp32 speed) was taken at an earlier
        # drain, and the FIFOs that asked meanwhile are read at once. Looked
        # for only at the end of _drain, a drain followed by a frame (50 ms at
        # esp32 speed) never found it: the heap ran out and an allocation
        # collected in the middle of the next frame instead.
        if st is not self._fastest or st.drained_ms != now:
            return
        if self._gc_below < 0:  # due
            self._collect(st)
        elif ticks.diff(now, self._gc_checked_ms) >= _GC_CHECK_MS:
            self._gc_checked_ms = now
            if gc.mem_free() < self._gc_below:
                self._gc_below = -1  # (no attribute more: a BLE board's App has no room for its dict to grow)

    def _collect(self, st):
        # (Apart from _drained, which runs at every poll: with this try in it
        # its call frame would pass 11 words and come from the heap each time.)
        self._gc_below = _GC_HEADROOM  # (first: the FIFOs read after the collection come back here)
        try:
            st.drain_rest()  # (what a burst left: the collection gets the FIFO's whole fill time, not 33-62 ms)
        except OSError:
            pass  # (the bus failed: the next poll reads it, and handles the fault)
        gc.collect()
        self._read_fifos()
        self._gc_below = _gc_threshold(gc.mem_free())

    def on_downlink(self, data, n=-1):
        # data[:n] (n < 0: all of it): one downlink message, not yet authenticated.
        if n < 0:
            n = len(data)
        # (An ack arrives about twice a second: this frame and the ack's keep
        # within the VM's 11 words, README "call frames"; the rest apart.)
        r = self.acks.read(data, n)  # the common case, read in place (app/acks.py)
        if r == acks.ACKED:
            self._acked()
        elif r == acks.TIME_REQUEST:
            self._time_nonce = self.acks.nonce
            self.due |= _DUE_TIME
            self._send_due(0, _DUE_TIME)  # at once if the link is free
        elif r == acks.UPDATE_CHUNK:
            self._update_chunk_read(data)
        elif r == acks.FORGED:
            self.downlink_rejected += 1
        else:
            self._on_rare_downlink(data, n)

    def _acked(self):
        a = self.acks
        if a.epoch == self.epoch:
            for i in range(a.count):
                self.outbox.ack_range(a.first[i], a.last[i])
            self.acked_ms = self.board.ticks_ms()

    def _update_chunk_read(self, data):
        a = self.acks
        self._update_chunk(a.epoch, a.offset, a.total, data, a.data_at, a.data_len)

    def _on_rare_downlink(self, data, n):
        # A downlink message the in-place reader left to the full decoder.
        if n != len(data):
            data = memoryview(data)[:n]  # (allocates: a rarer message)
        from protocols import messages  # (loaded with the first rarer message, not before)

        try:
            msg = cose.parse(data)
            self.down.verify(msg)
            m = messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)
        except ProtocolError:
            self.downlink_rejected += 1  # never acted upon: a forged ack frees nothing
            return
        finally:
            forget_decoding()  # its code stays out of RAM until the next rare message
        if isinstance(m, messages.Ack):
            self.outbox.ack(m, self.epoch)
        elif isinstance(m, messages.EpochResync):
            self._resync(m)
        elif isinstance(m, messages.TimeRequest):  # (one the in-place reader declined: a large nonce)
            self._time_nonce = m.nonce
            self.due |= _DUE_TIME
            self._send_due(0, _DUE_TIME)
        elif isinstance(m, messages.Command):
            if m.epoch != self.epoch or m.nonce <= self.last_command:
                self.downlink_rejected += 1  # replayed or meant for another boot
                return
            self.last_command = m.nonce
            if m.name == "stop":
                self.running = False
            elif m.name == "status":
                self.due |= _DUE_STATUS  # sent by step(), once the link takes it
        elif isinstance(m, messages.UpdateChunk):  # (one the in-place reader declined)
            self._update_chunk(m.epoch, m.offset, m.total, m.data, 0, len(m.data))

    def _update_chunk(self, epoch, offset, total, buf, at, n):
        # A firmware update's chunk, authenticated: its bytes at buf[at:at + n].
        if epoch != self.epoch:
            self.downlink_rejected += 1  # meant for another boot
            return
        if self.update is None:
            from app import ota

            self.update = ota.Updater(self, self.board.ticks_ms())
        self.update.chunk(offset, total, buf, at, n)

    # An epoch resync (app/resync.py, imported only when the hub sends one:
    # a board whose epoch file is sound never loads it).
    def _resync(self, m):
        from app import resync

        if resync.resync(self, m):
            self.due |= _DUE_HELLO  # under the new epoch

    def _reseal_step(self):
        from app import resync

        resync.reseal_step(self)

    def _reseal(self, sealed):
        from app import resync

        return resync.reseal(self, sealed)

    def _any_ready(self):
        for st in self.streams:
            if st.wants():
                return True
        return False

    def _drain(self, every=False):
        # Drains each stream whose chip asks (every: each stream, for its
        # poll, health check or restart, once a loop) and frames each full
        # window. Called between the loop's other pieces of work too: each
        # takes milliseconds on a chip, and a FIFO that asked meanwhile goes
        # first (latency: the longest one piece).
        now = self.board.ticks_ms()
        for k in range(len(self.streams)):
            st = self.streams[k]
            if every or st.wants() or st.n >= st.window:  # (a window filled by _read_fifos: framed now)
                self._poll_stream(k, now)
        return self.board.ticks_ms()

    # The loop's pieces are methods of at most 11 words of locals and stack:
    # a bytecode function needing more gets its frame from the heap at every
    # call (py/objfun.c, VM_MAX_STATE_ON_STACK), and with no garbage about
    # each such allocation searches the heap from its lowest hole (README,
    # "call frames"): at esp32 speed a sixth of the CPU went there.
    def step(self):
        self.board.service()
        now = self._drain(True)
        if self.reseal_due:
            self._reseal_step()
            now = self._drain()
        if self.link.service():
            self.outbox.resend_all()  # reconnected: resend what was in flight
            self.due |= _DUE_HELLO
        if self.due & _DUE_HELLO:  # before the frames: after a reconnection they would take the link first
            now = self._send_due(now, _DUE_HELLO)
        if self.link.connected and not self.reseal_due:  # the old epoch's frames would only be refused
            now = self._send_frames(now)
        now = self._receive(now)
        if self.hr is not None or self.ox is not None:
            self._set_vitals(now)
        if ticks.diff(now, self.next_status_ms) >= 0:
            self.next_status_ms = ticks.add(now, self.cfg["status_every_ms"])
            self.board.refresh_uptime()  # also keeps an uptime built from wrapping ticks counting
            # Due until the link takes it: a status due as a frame goes out
            # (both paced by the sensor's clock, so at the same moment run
            # after run) was dropped every time, and the hub never heard the
            # chip's id.
            self.due |= _DUE_STATUS
            self._measure_drift()
        self._report_faults()
        now = self._send_due(now, _DUE_ALL)  # (after the downlink: an epoch resync comes before the reports)
        if self.origin is not None and self.origin.due(now):
            self._checkpoint(self.origin, now)
            self._drain()
        # One piece of an update per loop, each FIFO emptied first (read
        # whether or not its chip asked): a piece gets the whole time the
        # fastest one takes to fill (62 ms on an ESP32 at 512 Hz), which a
        # signature slice with a collection in it (its big numbers leave ~5
        # kB of garbage each) or a file's creation on flash needs.
        if self.update is not None and not self.update.step(self._empty_fifos()):
            self.update = None
            forget_update()  # the update's code leaves RAM with it

    def _measure_drift(self):
        # Every status period (10 s): each FIFO read to its last sample, so a
        # stream's next loss estimate has the clocks' drift taken off
        # (Stream.drain_rest; the MAX30003 counts no lost samples).
        for k in range(len(self.streams)):
            if self.guard.ready(k):
                self._drain_rest(k)

    def _drain_rest(self, k):
        # (A with-block, faults.Caught: _measure_drift's try took its frame
        # past the VM's 11 words, README "call frames".)
        with self._bus_errors:
            self.streams[k].drain_rest()
        self._bus_errors.take()  # (the next poll reads it, and handles the fault)

    def _send_frames(self, now):
        # The outbox's frames due, while the link takes them; the FIFOs
        # drained after each. Returns the time after.
        for _ in range(_MAX_SENDS_PER_LOOP):
            i = self.outbox.next_to_send(now, self.cfg["retransmit_ms"])
            if i < 0 or not self.link.send(self.outbox.buf, self.outbox.lens[i], self.outbox.off[i]):
                break
            self.outbox.mark_sent(i, now)
            now = self._drain()
        return now

    def _receive(self, now):
        # The downlink, a chunk at a time with the FIFOs drained between (a
        # chunk takes a few ms on a chip). Returns the time after.
        link = self.link
        for _ in range(_RX_CHUNKS_PER_LOOP):
            n = link.receive()
            if n:
                self.on_downlink(link.message, n)
            elif not link.rx_more:
                break
            now = self._drain()
        return now

    def _set_vitals(self, now):
        self.link.set_vitals(now, self.hr.bpm_x10 if self.hr else 0, self.ox.spo2_x10 if self.ox else 0,
                             self.ox.pr_x10 if self.ox else 0, self.board.battery_pct(self.cfg))

    def _empty_fifos(self):
        # Drains every stream's FIFO as if its chip had asked, before a long
        # piece of work; returns the time after.
        for st in self.streams:
            st.ready = True
        return self._drain()

    def checkpoint_now(self):
        # The frames listed since the last checkpoint get theirs at once: the
        # board stops streaming (run's end, an update's reboot), and frames
        # no checkpoint lists would stay unprovable.
        log = self.origin
        if log is not None and log.n:
            self._checkpoint(log, self.board.ticks_ms())

    def flush(self, budget_ms):
        # Sends what the outbox never sent, oldest first, and waits for the
        # link to pass it on, for at most budget_ms. True if all went out.
        board = self.board
        link = self.link
        ob = self.outbox
        end = ticks.add(board.ticks_ms(), budget_ms)
        while link.connected and not self.reseal_due:  # (old-epoch frames would only be refused)
            now = board.ticks_ms()
            if ticks.diff(end, now) <= 0:
                return False
            link.service()
            if not link.busy():
                i = ob.next_to_send(now, _NEVER_MS)
                if i < 0:
                    return True
                if link.send(ob.buf, ob.lens[i], ob.off[i]):
                    ob.mark_sent(i, now)
                    continue
            board.sleep_ms(1)
        return False

    def _checkpoint(self, log, now):
        # The frames listed since the last one, MACed under the origin key,
        # into the outbox like a frame: resent until the hub acknowledges it.
        # (Within the VM's 11 words of frame, README "call frames".)
        seq = self._seq()
        base = self.outbox.reserve(origin.WORST_BYTES)
        self._frame_writer.end = base + origin.WORST_BYTES
        self._frame_writer.pos = base
        log.checkpoint_into(self._frame_writer, self.epoch, seq, now)
        self.outbox.commit(seq, self._frame_writer.pos - base)

    # ---- faults (app/faults.py): each handled here, reported, never fatal ----
    def _poll_stream(self, k, now):
        if not self.guard.ready(k):
            if self.guard.restart_due(k, now):
                self._restart_sensor(k, now)
            return
        st = self.streams[k]
        # Read when the chip asked (or, unwired, its poll is due); checked
        # when its check is due, whether or not it asked: a dead one raises
        # no interrupt.
        how = _READ if st.due(now, self.cfg["poll_ms"]) else 0
        if self.guard.check_due(k, now):
            how |= _CHECK
        if how:
            count = self._read_sensor(k, now, how)
            if count < 0:
                return
        else:
            count = st.to_frame()
        self._drained(st, now)  # (before a frame: a collection after it would find the FIFO half full)
        if self.guard.read_ok(k):
            self._sensor_back(k)
        if count:
            self.build_frame(k, st, count)

    def _read_sensor(self, k, now, how):
        # Stream k's chip read (_READ) and/or checked (_CHECK): how many
        # samples to frame now, or -1 after a fault (handled here). At every
        # chip read (~40 a second), so in pieces of at most 11 words of
        # frame (README, "call frames"): the bus errors are caught by a
        # with-block (faults.Caught), whose frame has room for k alone; the
        # read's time and kind wait in _read_now and _read_how.
        self._read_now = now
        self._read_how = how
        return self._read_caught(k)

    def _read_caught(self, k):
        with self._bus_errors:
            return self._read_or_check(k)
        self._sensor_error(k, self._read_now, self._bus_errors.take())
        return -1

    def _read_or_check(self, k):
        now = self._read_now
        st = self.streams[k]
        count = st.poll(now) if self._read_how & _READ else st.to_frame()
        if self._read_how & _CHECK and not st.sensor.alive():
            self._sensor_down(k, now, "no longer identifies")
            return -1
        return count

    def _sensor_back(self, k):
        self.reports.add(faults.ERR_SENSOR_FAULT, "%s answers again" % self.guard.names[k])

    def _lead_off(self, st):
        try:
            return st.lead_off()
        except OSError:
            st.fault = True  # unknown: the frame says the sensor failed
            return False

    def _sensor_error(self, k, now, e):
        st = self.streams[k]
        st.fault = True
        g = self.guard
        first = g.state[k] == faults.OK
        if g.read_failed(k, now):
            self._sensor_down(k, now, "%d bus errors in a row (OSError %s)" % (g.errors[k], e))
        elif first:
            self.reports.add(faults.ERR_SENSOR_FAULT, "%s: bus error (OSError %s), reading again" % (g.names[k], e))

    def _sensor_down(self, k, now, why):
        # Frames what the stream holds, then restarts the chip (now and
        # after each backoff until it answers).
        st = self.streams[k]
        st.fault = True
        if st.split:
            self.build_frame(k, st, st.split)
        if st.n:
            self.build_frame(k, st, st.n)
        self.guard.go_down(k, now)
        self.reports.add(faults.ERR_SENSOR_FAULT, "%s %s: restarting it" % (self.guard.names[k], why))

    def _restart_sensor(self, k, now):
        g = self.guard
        st = self.streams[k]
        try:
            st.sensor.restart()
            alive = st.sensor.alive()
        except Exception:  # not answering yet (OSError, or the driver's "not found")
            alive = False
        if not alive:
            g.restart_failed(k, now)
            return
        now = self.board.ticks_ms()  # the chip samples from now on
        g.restarted(k, now)
        st.fault = True
        lost = st.resync(now)
        self.reports.add(faults.ERR_SENSOR_FAULT, "%s restarted after %d ms; %d samples lost"
                         % (g.names[k], ticks.diff(now, g.down_since_ms[k]), lost))

    def _report_faults(self):
        # The link's fault, if any, among the reports (_send_due sends them).
        if self._link_fault is not None:
            why = self._link_fault()
            if why:
                self.reports.add(faults.ERR_LINK_FAULT, why)

    def _loop_failed(self, e):
        # An exception nothing else caught ended this iteration: the loop
        # goes on with the next one; the hub hears of it.
        self.loop_restarts += 1
        if isinstance(e, MemoryError):
            gc.collect()
        text = "loop restarted (%d): %s: %s" % (self.loop_restarts, type(e).__name__, e)
        self.reports.add(faults.ERR_LOOP_RESTARTED, text)
        self.board.console("pulsebridge: " + text)

    def start(self):
        if self.board.reset_cause_watchdog():
            self.reports.add(faults.ERR_WATCHDOG_RESET, "restarted by the watchdog: the loop had stalled")
        if self._epoch_unreadable is not None:
            self.reports.add(faults.ERR_EPOCH_RESYNC, "epoch file held %r: started over at %d"
                             % (self._epoch_unreadable, self.epoch))
            self._epoch_unreadable = None
        self.due |= _DUE_HELLO  # the first step says it
        for k in range(len(self.streams)):
            st = self.streams[k]
            try:
                st.sensor.start()
            except OSError as e:
                self._sensor_error(k, self.board.ticks_ms(), e)
            st.start_ms = self.board.uptime_ms()
            st.next_poll_ms = self.board.ticks_ms()

    def stop(self):
        for st in self.streams:
            try:
                st.sensor.stop()
            except OSError:
                pass  # a chip that does not answer cannot be stopped either

    def wait(self):
        # Sleeps until a sensor's interrupt, or the next thing due: a polled
        # sensor, the link's next piece of a frame, the status message.
        if self.reseal_due or self.link.rx_more:
            return  # more of the outbox to re-seal, or of the downlink to read: no sleep
        now = self.board.ticks_ms()
        t = self._next_poll_in_ms(now)
        if self.link.busy() and self.link.pump_ms < t:
            t = self.link.pump_ms
        d = ticks.diff(self.next_status_ms, now)
        if d < t:
            t = d
        if t > 0 and not self._any_ready():
            self.board.idle_ms(t, self._woken)

    def _next_poll_in_ms(self, now):
        # ms until the first stream without an interrupt line is due to be
        # polled, _IDLE_MAX_MS at most.
        t = _IDLE_MAX_MS
        for k in range(len(self.streams)):
            if self.streams[k].irq_pin is None:
                d = ticks.diff(self.streams[k].next_poll_ms, now)
                if d < t:
                    t = d
        return t

    def run(self, until_ms=None):
        self.start()
        self.wdt = self.board.watchdog(WATCHDOG_MS)
        try:
            while self.running and (until_ms is None or self.board.uptime_ms() < until_ms):
                try:
                    self.step()
                    self.wait()
                except Exception as e:
                    self._loop_failed(e)
                    self.board.sleep_ms(self.cfg["poll_ms"])  # not a busy loop if it fails every time
                else:
                    self.wdt.feed()  # only a loop that works keeps the board up
        finally:
            # The loop has returned: the watchdog is fed from now on (the REPL
            # follows), before the stop's own work. Armed, a board that got no
            # CPU for longer than WATCHDOG_MS just as it was stopped (a loaded
            # machine) was reset by it at that work's first call to its clock:
            # the firmware started over, streaming, its Ctrl-C lost.
            self.board.watchdog_idle()
            try:  # a clean stop: the last frames' checkpoint leaves the board (a power cut leaves them pending)
                self.checkpoint_now()
                self.flush(_STOP_FLUSH_MS)
            finally:
                self.stop()


def _gc_threshold(free):
    # The free heap below which the next collection is due, after one left free bytes.
    return min(_GC_HEADROOM, max(free // 2, free - _GC_GARBAGE))


def forget(package, name):
    # Drops a module imported for a rare task (package.name) from RAM: once
    # sys.modules and its package no longer hold it, the GC frees its code.
    # The next import loads it again.
    sys.modules.pop(package + "." + name, None)
    pkg = sys.modules.get(package)
    if pkg is not None and hasattr(pkg, name):
        delattr(pkg, name)


def forget_update():
    # What an update loads (_UPDATE_MODULES), dropped from RAM.
    for package, name in _UPDATE_MODULES:
        forget(package, name)


def forget_decoding():
    # What decoding a rarer downlink message loads (cose.parse's
    # protocols/mac0.py, the message decoder), dropped once it is handled. (protocols.messages, which such a
    # message loads too, stays: objects of its classes outlive it, and a
    # second copy's classes would not be theirs.)
    forget("protocols", "decode")
    forget("protocols", "cbor_items")
    forget("protocols", "mac0")


def run(board, until_ms=None):
    # Entry point: returns when streaming stops (Ctrl-C, a stop command, or
    # until_ms on the board clock); the caller then drops to the REPL.
    from app import config

    try:
        cfg = config.load()
        key = config.load_key()
        epoch = config.next_epoch()
    except config.ConfigError as e:
        print("pulsebridge: not streaming:", e)
        return None
    del config  # read at boot only: the app drops its code from RAM (an epoch resync loads it again)
    try:
        app = App(board, cfg, key, epoch, True)
    except MemoryError:
        raise  # not the sensors' fault: the entry point (main.py) resets the board
    except Exception as e:  # a sensor missing or misconfigured: say which
        print("pulsebridge: not streaming: sensor set-up failed:", e)
        return None
    board.console("pulsebridge: %s streaming over %s, boot epoch %d; Ctrl-C for the REPL"
                  % (cfg["device_id"], app.link.name, epoch))
    try:
        app.run(until_ms)
    finally:
        # Streaming stopped on purpose (Ctrl-C, a stop command): the REPL
        # that follows must not be reset by the watchdog.
        board.watchdog_idle()
        # For the technician (and the simulator's accounting), whatever stopped us.
        # (Its boot epoch: a simulated board's boots, ended by an update's reboot, are told apart by it.)
        board.console("\r\npulsebridge: stopped after %d frames built, %d awaiting an ack, %d dropped, boot epoch %d"
                      % (app.frames_built, app.outbox.depth(), app.outbox.dropped, app.epoch))
    return app
