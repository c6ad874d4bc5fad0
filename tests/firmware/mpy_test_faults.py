# Faults a real board lives through, injected in the simulation (chip
# models, fake buses, fake radio, flash): the board recovers by itself,
# nothing acknowledged is lost, and the fault is reported. Runs under the
# MicroPython unix port (see test_firmware_on_micropython.py).
import errno
import io
import os

from app import config, faults, main
from protocols import cbor, cose, hub, hub_link, link, messages
from sim.board_sim import SimBoard
from sim.clock import VirtualClock
from sim.loopback import LoopbackLink
from tests.firmware.mpy_test_app import _key, _run_until, _sim


def _boot(cfg_changes=None, sim_changes=None):
    # One boot of the board, as main.run() does it: a new epoch from flash.
    sim = _sim()
    sim["virtual_clock"] = True
    sim.update(sim_changes or {})
    b = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg.update(cfg_changes or {})
    link = LoopbackLink(cfg["device_id"], _key())
    b.link_override = link
    app = main.App(b, cfg, _key(), config.next_epoch())
    return b, app, link


def _sealed_samples(raw):
    # (epoch, seq, boot salt, encrypted sample bytes) of a sealed sample frame, read without the key.
    d = cbor.decode(cose.parse(raw).payload)
    return d[2], d[3], d[15], b"".join(d[13])


def test_epoch_file_lost_never_brings_a_keystream_back():
    # Boot, lose the epoch file (flash restored, file corrupted then
    # cleared), boot again: the same epoch comes back, with the same seqs,
    # but every counter block is under another key.
    runs = []
    for _ in range(2):
        try:
            os.remove(config.EPOCH)
        except OSError:
            pass
        b, app, link = _boot({"ppg": None})
        _run_until(b, app, 3000)
        frames = {}
        for r in link.received:
            if r.verdict == hub.ACCEPTED and r.message.kind == messages.T_SAMPLES:
                epoch, seq, salt, sealed = _sealed_samples(r.raw)
                frames[(epoch, seq)] = (salt, sealed, r.message.channels)
        runs.append(frames)
    same = set(runs[0]) & set(runs[1])
    assert len(same) >= 2, (sorted(runs[0]), sorted(runs[1]))  # the same (epoch, seq) came back
    for k in same:
        salt0, sealed0, clear0 = runs[0][k]
        salt1, sealed1, clear1 = runs[1][k]
        assert salt0 != salt1 and len(salt0) == 16
        # Other ciphertext for the same (epoch, seq): XOR of the two would
        # otherwise give away the XOR of two recordings.
        n = min(len(sealed0), len(sealed1))
        assert sealed0[:n] != sealed1[:n]
        # Each hub decrypted its frames under that boot's key: the same
        # recording from the same start, so the same samples.
        assert clear0 == clear1 and clear0[0]


# ---- helpers ---------------------------------------------------------------

def _accepted(link):
    return [r.message for r in link.received if r.verdict == hub.ACCEPTED]


def _samples(msgs, stream):
    return [m for m in msgs if m.kind == messages.T_SAMPLES and m.stream == stream]


def _errors(msgs, code=None):
    return [m for m in msgs if m.kind == messages.T_ERROR and (code is None or m.code == code)]


def _check_stream(frames, rate_hz, until_s):
    # SPEC: frame k+1 starts where frame k ended unless samples were lost,
    # and then exactly the reported loss later; the stream reaches until_s.
    # Returns the samples reported lost.
    assert frames
    frames = sorted(frames, key=lambda f: f.first_index)  # resent frames arrive late
    lost = 0
    nxt = frames[0].first_index
    for f in frames:
        gap = f.first_index - nxt
        assert gap == f.status[1], (f.first_index, nxt, f.status)
        assert (gap > 0) == bool(f.status[0] & messages.FLAG_FIFO_OVERFLOW) or gap == 0, f.status
        lost += gap
        nxt = f.first_index + f.count
    assert nxt >= rate_hz * until_s, (nxt, rate_hz, until_s)
    return lost


def _all_acked(app):
    assert app.outbox.dropped == 0
    assert app.outbox.depth() <= 2, app.outbox.depth()  # what is still in flight


# ---- sensors ---------------------------------------------------------------

def test_one_bus_error_on_each_bus_loses_nothing_and_is_reported():
    b, app, link = _boot()
    app.start()
    injected = {}
    while b.ticks_ms() < 8000:
        t = b.ticks_ms()
        if t >= 2000 and "i2c" not in injected:
            b.buses["i2c"].faults.inject(1)
            injected["i2c"] = t
        if t >= 3000 and "spi" not in injected:
            b.buses["spi"].faults.inject(1)
            injected["spi"] = t
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])
    assert b.buses["i2c"].faults.raised == 1 and b.buses["spi"].faults.raised == 1
    msgs = _accepted(link)
    for stream, rate in ((messages.STREAM_ECG_MAX30003, 512), (messages.STREAM_PPG_MAX30102, 100)):
        frames = _samples(msgs, stream)
        assert _check_stream(frames, rate, 7) == 0  # retried at the next loop: nothing lost
        flagged = [f for f in frames if f.status[0] & messages.FLAG_SENSOR_FAULT]
        assert len(flagged) == 1, [f.status for f in frames]  # the frame after the error says so
    texts = [m.text for m in _errors(msgs, faults.ERR_SENSOR_FAULT)]
    assert any("MAX30102" in t and "116" in t for t in texts), texts
    assert any("MAX30003" in t for t in texts), texts
    _all_acked(app)


def test_repeated_bus_errors_restart_the_sensor_and_the_gap_is_reported():
    b, app, link = _boot()
    app.start()
    done = False
    while b.ticks_ms() < 8000:
        if b.ticks_ms() >= 2000 and not done:
            b.buses["i2c"].faults.inject(6)  # 3 reads fail, then the first restarts
            done = True
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])
    msgs = _accepted(link)
    ppg = _samples(msgs, messages.STREAM_PPG_MAX30102)
    lost = _check_stream(ppg, 100, 7)
    assert 0 < lost < 100, lost  # a few hundred ms of restarts at 100 Hz
    assert app.guard.restarts[1] == 1 and app.guard.state[1] == faults.OK
    assert _check_stream(_samples(msgs, messages.STREAM_ECG_MAX30003), 512, 7) == 0  # the ECG went on
    texts = [m.text for m in _errors(msgs, faults.ERR_SENSOR_FAULT)]
    assert any("restarting" in t for t in texts) and any("restarted" in t for t in texts), texts
    _all_acked(app)


def test_sensors_that_stop_answering_are_restarted_once_back():
    # The MAX30102 stops acknowledging its address (I2C: ENODEV) from 2 s to
    # 5 s; the MAX30003 stops driving MISO (SPI: all ones, no error at all)
    # from 3 s to 4 s. Each is restarted, with backoff, once it answers.
    b, app, link = _boot()
    app.start()
    events = [(2000, lambda: b.buses["i2c"].unplug(0x57)), (3000, b.buses["spi"].unplug),
              (4000, b.buses["spi"].replug), (5000, b.buses["i2c"].replug)]
    while b.ticks_ms() < 10000:
        while events and b.ticks_ms() >= events[0][0]:
            events.pop(0)[1]()
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])
    msgs = _accepted(link)
    ppg_lost = _check_stream(_samples(msgs, messages.STREAM_PPG_MAX30102), 100, 9)
    ecg_lost = _check_stream(_samples(msgs, messages.STREAM_ECG_MAX30003), 512, 9)
    # The outage, plus at most the detection (1 s identity check) and one backoff (up to 5 s... here < 1 s).
    assert 300 <= ppg_lost <= 300 + 150, ppg_lost
    assert 512 <= ecg_lost <= 512 + 2 * 512, ecg_lost
    assert app.guard.restarts == [1, 1] and app.guard.state == [faults.OK, faults.OK], app.guard.restarts
    texts = [m.text for m in _errors(msgs, faults.ERR_SENSOR_FAULT)]
    assert any(t.startswith("MAX30003") and "identif" in t for t in texts), texts
    assert sum(1 for t in texts if "restarted after" in t) == 2, texts
    _all_acked(app)


# ---- the loop itself -------------------------------------------------------

def test_an_unexpected_exception_restarts_the_loop_and_is_reported():
    b, app, link = _boot({"ppg": None})
    real = link.receive
    state = {"armed": True}

    def receive():  # a fault nobody foresaw, once
        if state["armed"] and b.ticks_ms() >= 2000:
            state["armed"] = False
            raise ValueError("injected")
        return real()

    link.receive = receive
    b.watchdog(main.WATCHDOG_MS)
    app.run(until_ms=6000)
    assert app.loop_restarts == 1
    msgs = _accepted(link)
    assert _check_stream(_samples(msgs, messages.STREAM_ECG_MAX30003), 512, 5) == 0
    texts = [m.text for m in _errors(msgs, faults.ERR_LOOP_RESTARTED)]
    assert texts and "ValueError: injected" in texts[0], texts
    assert b.wdt.fired == 0
    _all_acked(app)


def test_a_stalled_loop_is_reset_by_the_watchdog_and_the_board_streams_again():
    from sim.board_sim import run_forever

    sim = _sim()
    sim["virtual_clock"] = True
    b = SimBoard(sim, VirtualClock())
    link = LoopbackLink(_cfg_id(), _key())
    b.link_override = link
    armed = {"at": 3000}

    def run(board, until_ms):
        # app.main.run, with a hung I2C transfer (8 s) injected into the first boot
        app = None

        def stall_once():
            if armed["at"] is not None and board.ticks_ms() >= armed["at"]:
                armed["at"] = None
                board.buses["i2c"].faults.stall(8000)

        orig_step = main.App.step

        def step(self):
            stall_once()
            orig_step(self)

        main.App.step = step
        try:
            app = main.run(board, until_ms)
        finally:
            main.App.step = orig_step
        return app

    app = run_forever(b, run, until_ms=20000)
    assert b.watchdog_resets == 1
    msgs = _accepted(link)
    epochs = sorted({m.epoch for m in msgs})
    assert len(epochs) == 2, epochs  # the board booted again
    second = [m for m in msgs if m.epoch == epochs[1]]
    assert _errors(second, faults.ERR_WATCHDOG_RESET), [m.kind for m in second]
    # After the reset it streams again, from the new boot's start, without a gap.
    assert _check_stream(_samples(second, messages.STREAM_ECG_MAX30003), 512, 20 - 11 - 1) == 0
    first = [m for m in msgs if m.epoch == epochs[0]]
    assert len(_samples(first, messages.STREAM_ECG_MAX30003)) >= 2  # acked before the stall (3 s): kept by the hub
    _all_acked(app)


def _cfg_id():
    return config.load()["device_id"]


# ---- BLE -------------------------------------------------------------------

def _ble_errors(central, code):
    return [r.message.text for r in central.results
            if r.verdict == hub.ACCEPTED and r.message.kind == messages.T_ERROR and r.message.code == code]


def test_ble_central_that_connects_and_leaves_within_one_loop_leaves_no_dead_link():
    from tests.firmware.mpy_test_ble import _complete, _run, _setup

    board, app, central = _setup()
    app.start()
    _run(board, app, 1000)
    central.connect(23)
    board.radio.disconnect()  # both events before the board's loop saw either
    _run(board, app, 3000)  # a link left "connected" on a dead handle raised ENOTCONN here
    assert not app.link.connected and board.radio.advertising is not None
    central.connect(64)
    _run(board, app, 10000)
    total = _complete(central.frames(), 512, 10)
    assert total[messages.STREAM_ECG_MAX30003] >= 512 * 8, total
    assert app.link.reconnects == 1 and app.loop_restarts == 0


def test_ble_central_vanishing_mid_notify_is_survived_and_everything_resent():
    from tests.firmware.mpy_test_ble import _complete, _run, _setup

    board, app, central = _setup()
    app.start()
    central.connect(23)
    _run(board, app, 3000)
    board.radio.vanish()  # out of range: no disconnect event yet, notifications fail
    _run(board, app, 3500)
    assert not app.link.connected and board.radio.advertising is not None  # given up on it, advertising
    _run(board, app, 5000)
    central.connect(185)
    _run(board, app, 12000)
    total = _complete(central.frames(), 512, 12)  # no gap: what was unacked came again
    assert total[messages.STREAM_ECG_MAX30003] >= 512 * 10, total
    texts = _ble_errors(central, faults.ERR_LINK_FAULT)
    assert texts and "notify" in texts[0] and str(errno.ENOTCONN) in texts[0], texts
    assert app.loop_restarts == 0


def test_ble_other_radio_error_closes_the_link_and_the_board_goes_on():
    from tests.firmware.mpy_test_ble import _complete, _run, _setup

    board, app, central = _setup()
    app.start()
    central.connect(64)
    _run(board, app, 3000)
    board.radio.fail_notify(1, errno.EIO)  # the stack fails a notification
    _run(board, app, 3500)
    assert not app.link.connected and not board.radio.connected  # closed on both sides
    central.connect(64)
    _run(board, app, 10000)
    total = _complete(central.frames(), 512, 10)
    assert total[messages.STREAM_ECG_MAX30003] >= 512 * 8, total
    texts = _ble_errors(central, faults.ERR_LINK_FAULT)
    assert texts and str(errno.EIO) in texts[0], texts
    assert app.loop_restarts == 0


# ---- serial: a host that stops reading -----------------------------------

class _HostIn(io.IOBase):
    # The board's console input: the downlink lines the fake host writes.
    def __init__(self):
        self.buf = bytearray()

    def ioctl(self, req, arg):
        return arg & 1 if req == 3 and self.buf else 0  # MP_STREAM_POLL: readable when bytes wait

    def readinto(self, b):
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


class _StalledUsbCdc:
    # A fake of MicroPython's native-USB console (TinyUSB CDC) on the
    # board side, with the hub at the other end. While the host does not
    # read (stalled(t_ms)), a write waits 500 ms (the driver's timeout) and
    # writes nothing; otherwise the bytes go to the hub, whose acks come
    # back as downlink lines.
    def __init__(self, board, device_id, key, host_in, stalled):
        self.board = board
        self.hub = hub.Hub()
        self.hub.add_device(device_id, key)
        self.device_id = device_id
        self.host_in = host_in
        self.stalled = stalled
        self.deframer = hub_link.StreamDeframer()
        self.received = []
        self.blocked_writes = 0

    def write(self, buf, off=0, n=None):
        if n is None:
            n = len(buf) - off
        if self.stalled(self.board.clock.now_us() // 1000):
            self.blocked_writes += 1
            self.board.clock.sleep_ms(500)
            return 0
        self.deframer.feed(bytes(buf[off:off + n]))
        while True:
            ev = self.deframer.next_event()
            if ev is None:
                return n
            if isinstance(ev, link.Frame):
                r = self.hub.receive(ev.data)
                self.received.append(r)
                if r.verdict != hub.REJECTED and r.message.kind in (messages.T_SAMPLES, messages.T_ORIGIN):
                    for a in self.hub.ack(self.device_id, r.message.epoch, [r.message.seq]):
                        self.host_in.buf += hub_link.downlink_line(a)


def test_serial_writes_to_a_host_that_stopped_reading_are_bounded():
    from app.link_serial import SerialLink

    b, app0, _ = _boot({"ppg": None})
    cfg = config.load()
    cfg["ppg"] = None
    host_in = _HostIn()
    cdc = _StalledUsbCdc(b, cfg["device_id"], _key(), host_in, lambda t: 3000 <= t < 20000)
    b.link_override = SerialLink(host_in, cdc, link.MAX_MESSAGE, b.ticks_us, b.ticks_diff, 115200)
    app = main.App(b, cfg, _key(), config.next_epoch())
    b.watchdog(main.WATCHDOG_MS)
    app.run(until_ms=45000)
    # 17 s of a host not reading (what the outbox holds): the board tried
    # (and waited 500 ms) 6 times, backing off towards one try every 8 s,
    # instead of blocking on every loop.
    assert 3 <= cdc.blocked_writes <= 7, cdc.blocked_writes
    assert b.wdt.fired == 0 and app.loop_restarts == 0
    msgs = [r.message for r in cdc.received if r.verdict == hub.ACCEPTED]
    frames = _samples(msgs, messages.STREAM_ECG_MAX30003)
    # Once the host reads again, every frame comes: the only gaps are the
    # samples the ECG FIFO lost while a write blocked, and they are reported.
    lost = _check_stream(frames, 512, 43)
    assert lost <= cdc.blocked_writes * 512 // 2 + 64, (lost, cdc.blocked_writes)
    texts = [m.text for m in _errors(msgs, faults.ERR_LINK_FAULT)]
    assert texts and "not reading" in texts[0], texts
    _all_acked(app)


# ---- ticks: years of uptime on a 32-bit port ------------------------------

_TICKS_PERIOD = 1 << 30  # time.ticks_ms()/ticks_us() on an ESP32 wrap here (31-bit small ints)


def _ticks_in_range(app):
    values = [app.next_status_ms] + [st.next_poll_ms for st in app.streams] + list(app.guard.next_ms)
    values += [app.outbox.sent_ms[i] for i in range(len(app.outbox.state)) if app.outbox.state[i]]
    for v in values:
        assert 0 <= v < _TICKS_PERIOD, v


def test_ticks_wrapping_mid_run_change_nothing():
    # The board's ticks_ms and ticks_us both wrap 3 s into the run, as an
    # ESP32's do after 12.4 days (ms) and every 17.9 minutes (us).
    for ecg in ({"chip": "max30003", "rate_hz": 512, "gain": 20}, {"chip": "ad8232", "rate_hz": 250}):
        b, app, link = _boot({"ecg": ecg}, {"ticks_start_ms": _TICKS_PERIOD - 3000})
        assert b.ticks_ms() > _TICKS_PERIOD - 3100
        app.start()
        wrapped = False
        last = b.ticks_ms()
        while b.uptime_ms() < 15000:
            link.ack_enabled = not 2000 <= b.uptime_ms() < 4500  # retransmissions due across the wrap
            app.step()
            b.sleep_ms(app.cfg["poll_ms"])
            t = b.ticks_ms()
            wrapped = wrapped or t < last
            last = t
            _ticks_in_range(app)
        assert wrapped
        msgs = _accepted(link)
        rate = ecg["rate_hz"]
        ecg_id = messages.STREAM_ECG_MAX30003 if ecg["chip"] == "max30003" else messages.STREAM_ECG_AD8232
        assert _check_stream(_samples(msgs, ecg_id), rate, 14) == 0  # polled on time throughout
        assert _check_stream(_samples(msgs, messages.STREAM_PPG_MAX30102), 100, 14) == 0
        # Times on the wire are ms since boot: monotonic across the wrap.
        t0s = [f.t0_ms for f in _samples(msgs, ecg_id)]
        assert t0s == sorted(t0s) and t0s[-1] < 15000, t0s
        status = [m.tick_ms for m in msgs if m.kind == messages.T_STATUS]
        assert len(status) >= 1 and all(s < 15000 for s in status), status  # every 10 s, after the wrap too
        _all_acked(app)
