# Where the firmware's time goes between two services of a FIFO, at a
# chip's speed (bench firmware --stretches): the longest stretches between
# two reads of the MAX30003's FIFO (the shortest: 62.5 ms at 512 Hz) and
# the firmware's named pieces of work that ran in each. Simulation only: it
# wraps the app's methods from outside (the wrappers' bookkeeping is the
# simulation's time, between clock.enter() and leave(); their call costs a
# few host us, charged like firmware), so figures of a run with it are a
# little pessimistic and its allocation figures are not the firmware's.
from micropython import const

_RING = const(256)  # pieces of work remembered (the ones of the last stretch or so)
_TOP = const(8)  # stretches reported
_PIECES = const(24)  # pieces reported per stretch
_NO = object()  # an argument not given (traced calls)


class Stretches:
    def __init__(self, clock):
        self._clock = clock
        self._label = [None] * _RING
        self._t0 = [0] * _RING
        self._t1 = [0] * _RING
        self._depth = [0] * _RING
        self._n = 0
        self.depth = 0
        self.last_service_us = -1
        self.top = []  # (length us, start us, [(label, depth, start offset us, us)], split)
        self.top_clean = []  # the same, of stretches the host was not seen in
        # The clock's counters at the last service: a stretch is split into
        # firmware computing, blocked in I/O, idle, and its longest single
        # span of firmware code charged at once (a host stall shows as one).
        self._compute0 = 0
        self._io0 = 0
        self._idle0 = 0
        self._host0 = 0  # the clock's host_spans: spans the host reached (sim.clock)
        self.over_half = 0  # stretches longer than half the FIFO's fill time
        self.over_fill = 0
        self.fill_us = 62500
        self.by_label = {}  # label: [calls, chip us, longest chip us]
        self.tare_us = 0

    def wrap(self, obj, name, label=None):
        # Replaces obj.name (a method or a module's function) with one that
        # records each call as a piece of work named label. Its arguments
        # (positional, at most 6) reach the wrapper as defaults, not as
        # *args: a tuple made on every call was garbage in the firmware's
        # heap (4 kB a second), so its collector ran every few seconds in a
        # run with the tracer, every few minutes without.
        f = getattr(obj, name)
        label = label or name
        clock = self._clock
        me = self

        def traced(a0=_NO, a1=_NO, a2=_NO, a3=_NO, a4=_NO, a5=_NO):
            clock.enter()
            me.depth += 1
            t0 = clock.t_us
            clock.leave()
            try:
                if a0 is _NO:
                    return f()
                if a1 is _NO:
                    return f(a0)
                if a2 is _NO:
                    return f(a0, a1)
                if a3 is _NO:
                    return f(a0, a1, a2)
                if a4 is _NO:
                    return f(a0, a1, a2, a3)
                if a5 is _NO:
                    return f(a0, a1, a2, a3, a4)
                return f(a0, a1, a2, a3, a4, a5)
            finally:
                clock.enter()
                me.depth -= 1
                me._piece(label, me.depth, t0, clock.t_us)
                clock.leave()

        setattr(obj, name, traced)

    def measure_tare(self):
        # What a traced call of nothing costs the firmware's clock (the
        # wrapper's call and bookkeeping outside the simulation's brackets):
        # taken off every piece (the median of many).
        class _Nothing:
            def f(self, *args):
                pass

        o = _Nothing()
        self.wrap(o, "f")
        d = []
        clock = self._clock
        for _ in range(101):
            t0 = clock.now_us()
            o.f()
            d.append(clock.now_us() - t0)
        d.sort()
        self.tare_us = d[50]
        self.by_label.clear()
        self._n = 0

    def _piece(self, label, depth, t0, t1):
        d = t1 - t0 - self.tare_us
        if d < 0:
            d = 0
        t1 = t0 + d
        p = self.by_label.get(label)
        if p is None:
            p = self.by_label[label] = [0, 0, 0]
        p[0] += 1
        p[1] += d
        if d > p[2]:
            p[2] = d
        i = self._n % _RING
        self._label[i] = label
        self._t0[i] = t0
        self._t1[i] = t1
        self._depth[i] = depth
        self._n += 1

    def serviced(self, t_us):
        # The FIFO was read at t_us (called by the chip model, inside the simulation).
        last = self.last_service_us
        self.last_service_us = t_us
        c = self._clock
        compute_us = c.compute_us - self._compute0
        io_us = c.io_us - self._io0
        idle_us = c.idle_us - self._idle0
        span_us = c.stretch_span_us
        host = c.host_spans - self._host0
        self._host0 = c.host_spans
        self._compute0 = c.compute_us
        self._io0 = c.io_us
        self._idle0 = c.idle_us
        c.stretch_span_us = 0
        if last < 0:
            return
        d = t_us - last
        if d > self.fill_us // 2:
            self.over_half += 1
        if d > self.fill_us:
            self.over_fill += 1
        # The longest of all, and the longest the host was not seen in
        # (sim.clock: host_spans), which are the firmware's own.
        top = self.top if host else self.top_clean
        if len(top) == _TOP and d <= top[-1][0]:
            return  # (before anything is made: the simulation's garbage shares the firmware's heap)
        if host:
            self._keep(self.top, d, last, (compute_us, io_us, idle_us, span_us, host))
            return
        self._keep(self.top_clean, d, last, (compute_us, io_us, idle_us, span_us, host))
        self._keep(self.top, d, last, (compute_us, io_us, idle_us, span_us, host))

    def _keep(self, top, d, last, split):
        if len(top) == _TOP and d <= top[-1][0]:
            return
        pieces = []
        for k in range(min(self._n, _RING)):
            i = (self._n - 1 - k) % _RING
            if self._t1[i] <= last:  # (one that ended as the FIFO was read belongs to the stretch before)
                break
            if self._t1[i] - self._t0[i] >= 500 or self._depth[i] == 0:
                pieces.append((self._label[i], self._depth[i], self._t0[i] - last, self._t1[i] - self._t0[i]))
        pieces.reverse()
        top.append((d, last, pieces[-_PIECES:], split))
        top.sort(key=lambda s: -s[0])
        del top[_TOP:]

    def report(self):
        return {"over_half_fill": self.over_half, "over_fill": self.over_fill, "tare_us": self.tare_us,
                "by_label": self.by_label,
                "longest": [_stretch(s) for s in self.top], "longest_clean": [_stretch(s) for s in self.top_clean]}


def _stretch(s):
    d, t, ps, sp = s
    return {"us": d, "at_us": t, "pieces": [list(p) for p in ps], "compute_us": sp[0], "io_us": sp[1],
            "idle_us": sp[2], "longest_span_us": sp[3], "host_spans": sp[4]}


def install(app, board, clock):
    # Names the app's pieces of work and hooks the MAX30003 model's FIFO reads.
    from app import main
    from protocols import samples

    s = Stretches(clock)
    model = board.models["max30003"]
    s.fill_us = 32 * 1000000 // model.rate_hz()
    transfer = model.transfer

    def transfer_traced(tx, rx):
        reg = tx[0] >> 1
        if tx[0] & 1 and reg in (0x20, 0x21):
            s.serviced(clock.t_us)
        elif not tx[0] & 1 and reg == 0x09:  # SYNCH: the sampling (re)starts, the first stretch with it
            s.last_service_us = -1
            s.serviced(clock.t_us)
        return transfer(tx, rx)

    model.transfer = transfer_traced
    # Only pieces called a few times a second, or once a loop at most: a
    # wrapper costs the firmware's clock its tare every call (link.service and _report_faults run once a
    # loop, _send_due twice; on BLE each took up to 15-30 ms at esp32 speed, untraced before).
    for name in ("build_frame", "on_downlink", "_send_small", "_reseal_step", "status", "_checkpoint", "hello",
                 "_report_faults", "_send_due"):
        s.wrap(app, name)
    s.wrap(app._fields, "encode", "encode_sample_frame")
    s.wrap(samples, "encode_into")
    s.wrap(app.sealer, "xor", "aes_ctr")
    s.wrap(app.up, "seal_written", "mac")
    for vit, label in ((app.hr, "heart_rate.feed"), (app.ox, "pulse_ox.feed")):
        if vit is not None:
            s.wrap(vit, "feed", label)
    link = app.link
    for name in ("send", "receive", "set_vitals", "service"):
        if hasattr(link, name):
            s.wrap(link, name, "link." + name)
    if hasattr(link, "_framer"):
        s.wrap(link._framer, "frame_from", "cobs")

    class _Gc:
        # main's gc, its collect() named
        def __init__(self, gc):
            self.mem_free = gc.mem_free
            self.collect = gc.collect

    g = _Gc(main.gc)
    s.wrap(g, "collect", "gc.collect")
    s.wrap(g, "mem_free", "gc.mem_free")  # (the look before a collection walks the heap: ms on a chip)
    main.gc = g
    s.measure_tare()
    return s
