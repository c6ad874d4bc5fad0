# Firmware tests run under the MicroPython unix port (tests/firmware/
# test_firmware_on_micropython.py prepares the board directory they run in).
# The unmodified drivers and app run against the register-level chip models
# on a virtual clock; the hub end is protocols.hub over a loopback link.
import array
import gc
import json

import micropython

from app import config, main
from app.sampler import Stream
from drivers.max30003 import MAX30003
from drivers.max30102 import MAX30102, SensorError
from protocols import cose, hub, messages
from sim import models
from sim.board_sim import SimBoard
from sim.clock import VirtualClock
from sim.loopback import LoopbackLink
from sim.waveform import Waveform


def _sim():
    with open("sim.json") as f:
        return json.load(f)


def _cfg():
    with open(config.CONFIG) as f:
        return json.load(f)


def _key():
    with open(config.KEY, "rb") as f:
        return f.read()


def _board():
    sim = _sim()
    sim["virtual_clock"] = True
    b = SimBoard(sim, VirtualClock())
    cfg = _cfg()
    link = LoopbackLink(cfg["device_id"], _key())
    b.link_override = link
    return b, link


def _ppg_chip(clock, ppm=0, bus_hz=0):
    # bus_hz: the I2C bus takes its bits' time on clock at this rate (0: none).
    sim = _sim()
    w = Waveform(sim["ppg"]["file"], sim["ppg"]["rate_hz"], 2)
    model = models.MAX30102Model(clock, w, ppm)
    bus = models.SimI2C([model], clock, bus_hz) if bus_hz else models.SimI2C([model])
    return MAX30102(bus, clock.sleep_ms), model


def _ecg_chip(clock, ppm=0):
    sim = _sim()
    w = Waveform(sim["ecg"]["file"], sim["ecg"]["rate_hz"], 1)
    model = models.MAX30003Model(clock, w, ppm)
    cs = models.SimPin(1)
    return MAX30003(models.SimSPI([(cs, model)]), cs), model


def test_max30102_identity_and_limits():
    clock = VirtualClock()
    chip, model = _ppg_chip(clock)
    assert chip.part_id() == 0x15
    for bad in ((800, 411), (1000, 215), (3200, 69), (123, 69)):
        try:
            chip.configure(rate_hz=bad[0], pulse_width_us=bad[1])
        except SensorError as e:
            assert "MAX30102" in str(e)
        else:
            raise AssertionError("accepted %r" % (bad,))
    chip.configure(rate_hz=400, pulse_width_us=411)
    assert model.regs[0x0A] & 0x1F == (3 << 2) | 3  # 400 Hz, 411 us


def test_max30102_fifo_burst_and_overflow_count():
    clock = VirtualClock()
    chip, model = _ppg_chip(clock)
    chip.configure(rate_hz=100)
    chip.start()
    red = array.array("i", bytes(4 * 64))
    ir = array.array("i", bytes(4 * 64))
    clock.sleep_ms(200)  # 20 samples at 100 Hz
    n = chip.read_into((red, ir), 0, 64)
    assert (n, chip.lost) == (20, 0), (n, chip.lost)
    assert 50000 < ir[0] < 262143 and 20000 < red[0] < ir[0]  # IR brighter than red, not saturated
    clock.sleep_ms(450)  # 45 samples into a 32-deep FIFO: 13 lost
    n = chip.read_into((red, ir), 0, 64)
    assert (n, chip.lost) == (32, 13), (n, chip.lost)
    assert model.lost == 13


def test_max30003_identity_burst_and_overflow():
    clock = VirtualClock()
    chip, model = _ecg_chip(clock)
    assert chip.info() & 0xF00000 == 0x500000
    chip.configure(rate_hz=512, gain=20)
    chip.start()
    out = array.array("i", bytes(4 * 64))
    clock.sleep_ms(25)  # 12.8 samples -> 12, fewer than a burst (EFIT 16): they wait
    n = chip.read_into((out,), 0, 64)
    assert (n, chip.lost, model.words_clocked) == (0, 0, 0), (n, chip.lost, model.words_clocked)
    clock.sleep_ms(15)  # 20 unread: one burst of 16
    n = chip.read_into((out,), 0, 64)
    assert (n, chip.lost, model.count) == (16, 0, 4), (n, chip.lost, model.count)
    clock.sleep_ms(100)  # 51 samples into 32 words: overflow
    n = chip.read_into((out,), 0, 64)
    assert n == 32  # what it stored before the overflow
    assert chip.lost == -1 and model.lost > 0 and not model.overflow  # FIFO reset after overflow
    assert chip.scale() == (1000000, 131072 * 20)


def test_stream_reports_fifo_loss_and_keeps_sample_clock():
    clock = VirtualClock()
    chip, model = _ppg_chip(clock)
    chip.configure(rate_hz=100)
    chip.start()
    st = Stream(chip, messages.STREAM_PPG_MAX30102, 100, 0)
    clock.sleep_ms(300)
    assert st.poll(clock.now_us() // 1000) == 0 and st.n == 30
    clock.sleep_ms(500)  # 50 more into a 32-deep FIFO: 18 lost after the first 30
    assert st.poll(clock.now_us() // 1000) == 30  # frame cut before the gap
    st.advance(30)
    assert st.first_index == 48 and st.pending_lost == 18 and st.n == 32
    st.frame_time()
    assert (st.t0_ms_hi, st.t0_ms_lo) == (0, 480)  # the first sample after the gap, on the sensor clock


def test_an_ecg_fifo_overflow_keeps_what_it_held_and_counts_what_it_lost():
    # The MAX30003 keeps the samples it stored before an overflow (their
    # tags say valid; the overflow's tag comes after them): the stream keeps
    # them, in order, and the gap follows them, as long as the samples the
    # chip dropped while full (no drift here: the board's clock is the
    # chip's). Before, the FIFO was reset unread: 32 good samples more lost.
    clock = VirtualClock()
    chip, model = _ecg_chip(clock)
    chip.configure(rate_hz=512, gain=20)
    chip.start()
    st = Stream(chip, messages.STREAM_ECG_MAX30003, 512, 0)
    clock.sleep_ms(40)  # 20 converted: a burst of 16 read, 4 left
    st.poll(clock.now_us() // 1000)
    assert st.n == 16, st.n
    clock.sleep_ms(200)  # 102 more: the FIFO is full after 28 of them, the rest lost
    st.poll(clock.now_us() // 1000)
    assert model.lost == model.index - 48 == 74, (model.index, model.lost)
    assert st.n == 48 and st.split == 48, (st.n, st.split)  # the 32 held kept, before the gap
    assert st.gap == model.lost and st.lost_total == model.lost, (st.gap, st.lost_total, model.lost)
    assert not model.overflow and model.count == 0  # reset once read
    # The samples kept are the chip's first 48, as an identical chip read
    # often enough gives them.
    ref_clock = VirtualClock()
    ref, _ = _ecg_chip(ref_clock)
    ref.configure(rate_hz=512, gain=20)
    ref.start()
    want = array.array("i", bytes(4 * 64))
    got = 0
    while got < 48:
        ref_clock.sleep_ms(32)
        got += ref.read_into((want,), got, 64 - got)
    assert list(st.chans[0][:48]) == list(want[:48])
    st.advance(48)
    assert st.first_index == 48 + 74 and st.pending_lost == 74, (st.first_index, st.pending_lost)


def test_an_ecg_loss_after_the_clocks_drifted_is_counted_without_the_drift():
    # The MAX30003 counts no lost samples: the stream estimates them from
    # the board's clock, which drifts from the chip's (crystals of 20-30
    # ppm: 37 samples an hour at 512 Hz). Read to the sample the chip marks
    # last (drain_rest, every status period in the app), the FIFO is empty
    # and the drift is measured; a loss after it is counted without it.
    # Here the chip runs 0.2 % fast: 20 samples of drift in 20 s.
    clock = VirtualClock()
    chip, model = _ecg_chip(clock, 2000)
    chip.configure(rate_hz=512, gain=20)
    chip.start()
    st = Stream(chip, messages.STREAM_ECG_MAX30003, 512, 0)
    for _ in range(1000):  # 20 s, read every 20 ms, each window framed
        clock.sleep_ms(20)
        count = st.poll(clock.now_us() // 1000)
        if count:
            st.advance(count)
    assert model.lost == 0
    st.drain_rest(clock.now_us() // 1000)
    assert chip.emptied and model.count == 0
    clock.sleep_ms(200)  # ~103 more into a FIFO that holds 32
    st.poll(clock.now_us() // 1000)
    assert model.lost > 60, model.lost
    # Within a sample (the drift over the 0.2 s since, and whole ms); the
    # board's clock alone would say ~20 fewer.
    assert abs(st.gap - model.lost) <= 1, (st.gap, model.lost)


def test_a_gap_found_while_a_window_is_framed_stays_after_the_samples_before_it():
    # The app reads a stream's FIFO while that stream's frame is being made
    # (build_frame: into the spare room after the window). An overflow found
    # then cuts after the samples read before it, not after the window.
    clock = VirtualClock()
    chip, model = _ppg_chip(clock)
    chip.configure(rate_hz=100)
    chip.start()
    st = Stream(chip, messages.STREAM_PPG_MAX30102, 20, 0)
    clock.sleep_ms(200)
    assert st.poll(clock.now_us() // 1000) == 20  # a window: its frame is being made...
    st.framing()
    clock.sleep_ms(100)
    assert st.poll(clock.now_us() // 1000) == 20 and st.n == 30  # ...10 more read meanwhile
    clock.sleep_ms(500)  # 50 into a 32-deep FIFO: 18 lost after those 10
    st.poll(clock.now_us() // 1000)
    assert st.n == 52 and st.lost_total == 18  # 22 of the FIFO's 32 fit the spare room (window + 32)
    st.advance(20)  # the window is framed
    assert st.first_index == 20 and st.pending_lost == 0 and st.to_frame() == 10  # then the 10 before the gap
    st.advance(10)
    assert st.first_index == 48 and st.pending_lost == 18 and st.n == 22
    st.frame_time()
    assert (st.t0_ms_hi, st.t0_ms_lo) == (0, 480)  # the first sample after the gap, on the sensor clock


def test_a_stream_cut_before_a_gap_reads_on_and_a_second_gap_joins_the_first():
    # While the frame before a gap is being made (tens of ms on a chip), the
    # FIFO is read on, after the gap; were it left unread it would overflow
    # again. A second overflow before that frame is made gives up the
    # samples between the two gaps (one gap per stream), counted as lost.
    clock = VirtualClock()
    chip, model = _ppg_chip(clock)
    chip.configure(rate_hz=100)
    chip.start()
    st = Stream(chip, messages.STREAM_PPG_MAX30102, 100, 0)
    clock.sleep_ms(300)
    st.poll(clock.now_us() // 1000)
    clock.sleep_ms(500)  # 50 more into a 32-deep FIFO: 18 lost after the first 30
    assert st.poll(clock.now_us() // 1000) == 30 and st.n == 62
    clock.sleep_ms(200)  # the cut frame is being made: 20 more
    assert st.poll(clock.now_us() // 1000) == 30 and st.n == 82, st.n
    clock.sleep_ms(500)  # 50 into the FIFO again: 18 more lost
    assert st.poll(clock.now_us() // 1000) == 30 and st.n == 62, st.n
    assert st.lost_total == 18 + 52 + 18, st.lost_total  # the 52 between the gaps given up
    st.advance(30)
    assert st.first_index == 30 + 88 and st.pending_lost == 88 and st.n == 32
    assert st.first_index + st.n == model.index == 150  # 1.5 s at 100 Hz, every sample accounted for
    st.frame_time()
    assert (st.t0_ms_hi, st.t0_ms_lo) == (0, 1180)


def test_per_sample_path_does_not_allocate():
    clock = VirtualClock()
    ecg, _ = _ecg_chip(clock)
    ecg.configure()
    ecg.start()
    ppg, _ = _ppg_chip(clock)
    ppg.configure()
    ppg.start()
    streams = (Stream(ecg, messages.STREAM_ECG_MAX30003, 512, 0), Stream(ppg, messages.STREAM_PPG_MAX30102, 100, 0))
    gc.collect()
    polls = 0
    micropython.heap_lock()
    try:
        for _ in range(150):  # 1.5 s in 10 ms steps, stopping at each full window
            clock.sleep_ms(10)
            for st in streams:
                if st.poll(clock.now_us() // 1000):
                    raise StopIteration
                polls += 1
    except StopIteration:
        pass
    finally:
        micropython.heap_unlock()
    assert polls > 100 and streams[0].n > 400, (polls, streams[0].n)


def test_app_streams_everything_and_the_hub_acks_it():
    board, link = _board()
    app = main.run(board, until_ms=20000)
    accepted = [r for r in link.received if r.verdict == hub.ACCEPTED]
    assert not [r for r in link.received if r.verdict != hub.ACCEPTED]
    frames = [r.message for r in accepted if r.message.kind == messages.T_SAMPLES]
    by_stream = {}
    for f in frames:
        by_stream.setdefault(f.stream, []).append(f)
    ecg = by_stream[messages.STREAM_ECG_MAX30003]
    ppg = by_stream[messages.STREAM_PPG_MAX30102]
    for fs, rate in ((ecg, 512), (ppg, 100)):
        nxt = 0
        for f in fs:
            assert f.first_index == nxt, (f.stream, f.first_index, nxt)  # no gap, no overlap
            assert f.status[1] == 0 and f.status[2] == 0
            assert f.t0_ms - fs[0].t0_ms == f.first_index * 1000 // rate
            nxt += f.count
        assert nxt >= rate * 19, (nxt, rate)
    assert app.outbox.depth() <= 2  # everything acked but what is in flight
    assert [r.message.kind for r in accepted][0] == messages.T_HELLO
    # The sample values are the recording, through the chip's gain: R waves of
    # record a103l (lead II) reach 0.53 to 0.70 mV (5th-95th percentile), some
    # 1400 to 1850 codes at 0.38 uV/LSB.
    peak = max(max(f.channels[0]) for f in ecg)
    assert 1200 < peak < 2600, peak


def test_forged_and_replayed_downlink_frees_nothing():
    board, link = _board()
    link.ack_enabled = False
    app = main.run(board, until_ms=3000)
    depth = app.outbox.depth()
    assert depth >= 4
    epoch = app.epoch
    seqs = [app.outbox.seqs[i] for i in range(len(app.outbox.state)) if app.outbox.state[i]]
    assert len(seqs) == depth
    forged = cose.MacKey(bytes(32), _cfg()["device_id"].encode(), cose.AAD_DOWNLINK)
    app.on_downlink(forged.seal(messages.encoded(messages.Ack(epoch, [(0, 10000)]))))
    # a board-to-hub message under the right key, offered as a downlink message
    up = cose.MacKey(_key(), _cfg()["device_id"].encode(), cose.AAD_UPLINK)
    app.on_downlink(up.seal(messages.encoded(messages.Ack(epoch, [(0, 10000)]))))
    # a genuine ack for another boot
    app.on_downlink(link.hub.ack(link.device_id, epoch - 1, seqs)[0])
    assert app.outbox.depth() == depth and app.downlink_rejected == 2
    app.on_downlink(link.hub.ack(link.device_id, epoch, seqs)[0])
    assert app.outbox.depth() == 0
    cmd = link.hub.command(link.device_id, epoch, 5, "status")
    app.on_downlink(cmd)
    app.on_downlink(cmd)  # replayed command
    assert app.downlink_rejected == 3


def test_full_outbox_drops_oldest_and_says_so():
    board, link = _board()
    link.ack_enabled = False
    app = main.run(board, until_ms=40000)  # about 1.1 kB/s into a 24 kB ring, no acks: drops
    frames = [r.message for r in link.received if r.message and r.message.kind == messages.T_SAMPLES]
    assert app.outbox.dropped > 0, app.outbox.dropped
    newest = max(frames, key=lambda f: f.seq)
    # the loss is in the newest frame's status; the last checkpoint, made at the stop, may drop one more
    assert 0 < newest.status[2] <= app.outbox.dropped <= newest.status[2] + 1, (newest.status, app.outbox.dropped)
    assert app.outbox.depth() == app.outbox.count  # nothing acked, all held


def test_epoch_increments_every_boot():
    e1 = config.next_epoch()
    e2 = config.next_epoch()
    assert e2 == e1 + 1


def _board_with(sim_changes, cfg_changes):
    sim = _sim()
    sim["virtual_clock"] = True
    sim.update(sim_changes)
    b = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg.update(cfg_changes)
    link = LoopbackLink(cfg["device_id"], _key())
    b.link_override = link
    app = main.App(b, cfg, _key(), config.next_epoch())
    return b, app, link


def _run_until(b, app, ms):
    app.start()
    while b.ticks_ms() < ms:
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])


def _frames(link, stream):
    return [r.message for r in link.received if r.verdict == hub.ACCEPTED and r.message.kind == messages.T_SAMPLES
            and r.message.stream == stream]


def test_max30003_lead_off_is_flagged_in_the_frames_it_spans():
    b, app, link = _board_with({"lead_off": [[3, 5]]}, {"ppg": None})
    _run_until(b, app, 8000)
    flagged = [f.t0_ms // 1000 for f in _frames(link, messages.STREAM_ECG_MAX30003)
               if f.status[0] & messages.FLAG_LEAD_OFF]
    # frames are flagged when the lead-off status is read, at the end of a window
    assert flagged and all(2 <= t <= 5 for t in flagged), flagged
    assert len(_frames(link, messages.STREAM_ECG_MAX30003)) >= 6


def test_ad8232_timer_paced_with_jitter_and_lead_off_pins():
    b, app, link = _board_with({"lead_off": [[2, 3]]}, {"ecg": {"chip": "ad8232", "rate_hz": 250}, "ppg": None})
    _run_until(b, app, 6000)
    frames = _frames(link, messages.STREAM_ECG_AD8232)
    assert len(frames) >= 4
    nxt = 0
    for f in frames:
        assert f.first_index == nxt and f.count == 250 and f.rate_hz == 250
        nxt += f.count
    # The simulated timer fires from the 10 ms loop: its lateness is measured
    # and reported, up to one loop period.
    jitters = [f.status[3] for f in frames]
    assert max(jitters) > 0 and max(jitters) <= 10000, jitters
    assert any(f.status[0] & messages.FLAG_LEAD_OFF for f in frames)
    assert frames[0].scale == (3300000, 65536 * 100)


def test_ppg_frames_carry_drive_and_scale_and_red_below_ir():
    b, app, link = _board_with({}, {"ecg": None})
    _run_until(b, app, 4000)
    frames = _frames(link, messages.STREAM_PPG_MAX30102)
    assert frames
    f = frames[-1]
    assert f.ppg_drive == (7000, 7000, 16384, 411) and f.scale == (16384, 262144)
    red, ir = f.channels
    assert sum(red) < sum(ir)
    assert max(ir) - min(ir) > 100  # the pulse is there


def _stream(app, stream_id):
    for k in range(len(app.streams)):
        if app.streams[k].stream_id == stream_id:
            return k, app.streams[k]
    raise AssertionError("no stream %d" % stream_id)


def test_the_ecg_fifo_is_read_while_a_ppg_frame_is_built():
    # On a chip a frame takes tens of ms. Here each of the PPG frame's two
    # channels takes 32 ms of the board's clock to encrypt (16.4 ECG
    # samples), and the ECG FIFO's interrupt comes meanwhile
    # (board.service() stands in for the soft IRQ): the ECG FIFO (32
    # samples, 62.5 ms at 512 Hz), under its threshold (16) when the frame
    # starts, must be read between the frame's pieces, not after it, or it
    # overflows.
    b, app, link = _board_with({}, {})
    _run_until(b, app, 500)
    k_ppg, ppg = _stream(app, messages.STREAM_PPG_MAX30102)
    _, ecg = _stream(app, messages.STREAM_ECG_MAX30003)
    model = b.models["max30003"]
    ecg.ready = True
    app._read_fifos()
    assert ppg.n > 0 and model.lost == 0 and model.count < 16
    apply = app.sealer.xor
    held = []

    def slow_apply(*args):
        held.append(ecg.n)
        b.clock.t_us += 32000
        b.service()
        return apply(*args)

    app.sealer.xor = slow_apply
    before = ecg.n
    app.build_frame(k_ppg, ppg, ppg.n)
    app.sealer.xor = apply
    assert len(held) == 2 and held[1] > held[0] >= before, (before, held)  # read between the two channels
    assert ecg.n > held[1]  # and after the last
    assert model.lost == 0, model.lost
    # The ECG's own frame: its FIFO is read while the frame is made too,
    # into the room after the samples framed.
    k_ecg = _stream(app, messages.STREAM_ECG_MAX30003)[0]
    ecg.ready = True
    app._read_fifos()
    count = ecg.n
    app.sealer.xor = slow_apply
    app.build_frame(k_ecg, ecg, count)
    app.sealer.xor = apply
    assert ecg.n >= 16 and ecg.first_index == count and model.lost == 0, (ecg.n, ecg.first_index, count)
    _run_until(b, app, 4000)
    ecg_frames = _frames(link, messages.STREAM_ECG_MAX30003)
    nxt = 0
    for f in ecg_frames:
        assert f.first_index == nxt and f.status[1] == 0, (f.first_index, nxt, f.status)
        nxt += f.count
    assert model.lost == 0 and len(ecg_frames) >= 3
    assert len(_frames(link, messages.STREAM_PPG_MAX30102)) >= 3


def test_the_fifos_are_read_after_a_status_message():
    # A status message (and an origin checkpoint, due as often) takes ~15 ms
    # each on a chip; here the status takes 40 ms of the board's clock and
    # the fault report after it 40 ms more: the ECG FIFO is read between.
    b, app, link = _board_with({}, {})
    _run_until(b, app, 500)
    _, ecg = _stream(app, messages.STREAM_ECG_MAX30003)
    model = b.models["max30003"]
    ecg.ready = True
    app._read_fifos()
    app.reports.add(main.faults.ERR_SENSOR_FAULT, "a report to send")
    status, report = app.status, main.fields.encode_error_report
    held = []

    def slow(fn):
        def run(*args):
            held.append(ecg.n)
            b.clock.t_us += 40000
            b.service()
            return fn(*args)
        return run

    app.status = slow(status)
    main.fields.encode_error_report = slow(report)
    app.next_status_ms = b.ticks_ms()
    try:
        app.step()
    finally:
        main.fields.encode_error_report = report
    assert len(held) == 2 and held[1] > held[0], held
    assert model.lost == 0, model.lost


def test_a_status_due_while_the_link_is_busy_goes_once_the_link_takes_it():
    # Frames and the status are both paced by the sensor's clock: a status
    # falling due while a frame is still on the wire was dropped, at the same
    # moment run after run, and the hub never heard the chip's id.
    b, app, link = _board_with({}, {})
    _run_until(b, app, 500)
    sent = []
    busy = [True]
    send = link.send

    def counted(buf, n, off=0):
        if busy[0]:
            return False
        ok = send(buf, n, off)
        sent.append(link.received[-1].message.kind)
        return ok

    link.send = counted
    link.busy = lambda: busy[0]
    app.next_status_ms = b.ticks_ms()
    app.step()
    busy[0] = False
    seq = app.seq
    _run_until(b, app, b.ticks_ms() + 50)
    assert messages.T_STATUS in sent, sent
    status = [r for r in link.received if r.message.kind == messages.T_STATUS]
    assert status and status[-1].verdict == hub.ACCEPTED and status[-1].message.seq >= seq, status


def test_a_time_request_with_a_large_nonce_is_answered_once_a_busy_link_takes_it():
    # A nonce past 2^30 is declined by the in-place reader and decoded: that
    # path answered at once whatever the link said, spending the seq of an
    # answer a busy link never took (lost, and a gap in the seqs).
    b, app, link = _board_with({}, {})
    _run_until(b, app, 500)
    busy = [True]
    send = link.send
    link.send = lambda buf, n, off=0: False if busy[0] else send(buf, n, off)
    link.busy = lambda: busy[0]
    link.hub._nonce = 1 << 40
    nonce, req = link.hub.time_request(link.device_id, 0)
    seq = app.seq
    app.on_downlink(req)
    assert app.seq == seq  # nothing went: no seq spent
    busy[0] = False
    end = b.ticks_ms() + 50
    while b.ticks_ms() < end:
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])
    answers = [r for r in link.received if r.message.kind == messages.T_TIME_RESPONSE]
    assert answers and answers[0].message.nonce == nonce and answers[0].verdict == hub.ACCEPTED, answers
    assert answers[0].message.seq == seq, (answers[0].message.seq, seq)


def test_a_hello_after_a_reconnection_waits_for_a_busy_link_instead_of_being_dropped():
    b, app, link = _board_with({}, {})
    _run_until(b, app, 500)
    busy = [True]
    send = link.send
    link.send = lambda buf, n, off=0: False if busy[0] else send(buf, n, off)
    link.busy = lambda: busy[0]
    reconnected = [True]

    def service():
        r, reconnected[0] = reconnected[0], False
        return r

    link.service = service
    app.step()  # reconnected while the link is busy: nothing sent yet
    busy[0] = False
    before = len(link.received)
    end = b.ticks_ms() + 50
    while b.ticks_ms() < end:  # (not _run_until: its start() says hello itself)
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])
    hellos = [r for r in link.received[before:] if r.message.kind == messages.T_HELLO]
    assert hellos and hellos[0].verdict == hub.ACCEPTED, [r.message.kind for r in link.received[before:]]


def test_garbage_is_collected_right_after_the_ecg_fifo_is_drained_not_after_the_frames_that_follow():
    # A collection takes 25-45 ms on a chip: its moment is right after the
    # fastest FIFO (the ECG's, 62.5 ms deep) was emptied, and it has that
    # FIFO's time to itself: the look at the heap (a walk of it, 3.5 ms on a
    # chip) is taken at an earlier drain. Here (a stand-in for main's gc,
    # the heap low; a collection 40 ms of the board's clock, past the 31 ms
    # the emptied FIFO takes to ask again) the look comes
    # at one ECG drain, the collection at the next, which completes the
    # windows of both streams: before their frames (each channel 20 ms),
    # and the ECG FIFO, which asked during it, is read right after.
    b, app, link = _board_with({}, {})
    _run_until(b, app, 960)
    k_ppg, ppg = _stream(app, messages.STREAM_PPG_MAX30102)
    _, ecg = _stream(app, messages.STREAM_ECG_MAX30003)
    model = b.models["max30003"]
    events = []

    class _LowHeap:
        def mem_free(self):
            events.append(("look", ecg.n))
            return 0

        def collect(self):
            events.append(("collect", ecg.n))
            b.clock.t_us += 40000
            b.service()

    apply = app.sealer.xor

    def slow_apply(*args):
        events.append(("apply", ecg.n))
        b.clock.t_us += 20000
        b.service()
        return apply(*args)

    real_gc = main.gc
    main.gc = _LowHeap()
    app.sealer.xor = slow_apply
    app._gc_checked_ms = b.ticks_ms() - 1000  # a look at the heap is due
    frames = app.frames_built
    try:
        b.sleep_ms(32)  # the ECG FIFO asks (16.4 samples more, 31.4 at most); neither window is full yet
        b.service()
        app._drain()
        first = list(events)
        b.sleep_ms(32)  # both windows are full by now, the ECG FIFO asks
        b.service()
        ppg.ready = True
        app._drain(True)
    finally:
        main.gc = real_gc
        app.sealer.xor = apply
    assert [e[0] for e in first] == ["look"], events  # the look only: the FIFO's time is not the collection's
    assert app.frames_built > frames, "no frame built"
    kinds = [e[0] for e in events]
    assert "collect" in kinds and kinds.index("collect") < kinds.index("apply"), events
    held = events[kinds.index("collect")][1]
    assert held > first[0][1] and events[kinds.index("collect") + 1][1] > held, events  # read right after it
    assert model.lost == 0, (model.lost, events)


def test_a_collection_starts_with_the_ecg_fifo_empty_and_has_its_whole_fill_time():
    # The collection comes right after the ECG FIFO was drained; a drain
    # reads whole bursts of 16 (EINT's threshold) and may leave up to 15
    # samples, 29 ms of the FIFO's 62.5. Those are read too before it (one
    # at a time, to the one the chip marks last), so a collection of 56 ms
    # of the board's clock starts with the FIFO empty and nothing overflows
    # meanwhile; the samples stay in order, none lost.
    b, app, link = _board_with({}, {})
    _run_until(b, app, 960)
    _, ecg = _stream(app, messages.STREAM_ECG_MAX30003)
    model = b.models["max30003"]
    b.service()
    app._drain(True)  # (the ECG asked or not: what its FIFO holds now is under 16)
    model._advance()
    left = model.count
    b.sleep_ms((26 - left) * 1000 // 512 + 1)  # 26-27 unread: the next drain takes 16, leaves 10-11
    at_collect = []

    class _LowHeap:
        def mem_free(self):
            return 1 << 20

        def collect(self):
            model._advance()
            at_collect.append(model.count)
            b.clock.t_us += 56000  # 28.7 samples at 512 Hz
            b.service()

    real_gc = main.gc
    main.gc = _LowHeap()
    app._gc_below = -1  # a collection is due
    try:
        b.service()
        app._drain()
    finally:
        main.gc = real_gc
    assert at_collect == [0], (at_collect, left)
    assert model.lost == 0 and ecg.lost_total == 0, (model.lost, ecg.lost_total)
    end = b.ticks_ms() + 3000
    while b.ticks_ms() < end:
        app.step()
        b.sleep_ms(app.cfg["poll_ms"])
    frames = _frames(link, messages.STREAM_ECG_MAX30003)
    assert len(frames) >= 4, len(frames)
    for a, c in zip(frames, frames[1:]):
        assert c.first_index == a.first_index + a.count, (a.first_index, a.count, c.first_index)
    assert model.lost == 0 and model.empty_words_clocked == 0, (model.lost, model.empty_words_clocked)


def test_the_fifos_are_read_between_an_origin_checkpoints_pieces():
    # An origin checkpoint (every 10 s, as the status) takes 15-25 ms on a
    # chip: its list, its MAC under the origin key and the outer MAC. Here
    # each piece takes 32 ms of the board's clock (16.4 ECG samples): the
    # ECG FIFO (32 deep, asking at 16) is read between them, else the three
    # (96 ms) overflow it.
    from app import origin as app_origin

    b, app, link = _board_with({}, {})
    _run_until(b, app, 1500)
    log = app.origin
    assert log is not None and log.n > 0
    _, ecg = _stream(app, messages.STREAM_ECG_MAX30003)
    model = b.models["max30003"]
    ecg.ready = True
    app._read_fifos()
    held = []

    def slow(fn):
        def run(*args):
            held.append(ecg.n)
            b.clock.t_us += 32000
            b.service()
            return fn(*args)
        return run

    wire = app_origin.origin
    encode, inner, outer = wire.encode_checkpoint_list, log.mac.seal_written, app.up.seal_written
    wire.encode_checkpoint_list = slow(encode)
    log.mac.seal_written = slow(inner)
    app.up.seal_written = slow(outer)
    try:
        app._checkpoint(log, b.ticks_ms())
    finally:
        wire.encode_checkpoint_list = encode
        del log.mac.seal_written
        del app.up.seal_written
    assert len(held) == 3 and held[0] < held[1] < held[2], held
    assert model.lost == 0, model.lost
    _run_until(b, app, 2500)
    assert any(r.message.kind == messages.T_ORIGIN for r in link.received if r.verdict == hub.ACCEPTED)


def test_the_fifos_are_read_between_a_status_messages_encoding_and_its_seal():
    # A status walks the free heap and is encoded, then MACed and framed:
    # each about 6 ms on a chip. Here each takes 32 ms of the board's clock:
    # the ECG FIFO is read between them.
    b, app, link = _board_with({}, {})
    _run_until(b, app, 500)
    _, ecg = _stream(app, messages.STREAM_ECG_MAX30003)
    model = b.models["max30003"]
    ecg.ready = True
    app._read_fifos()
    held = []

    def slow(fn):
        def run(*args):
            held.append(ecg.n)
            b.clock.t_us += 32000
            b.service()
            return fn(*args)
        return run

    encode, seal = main.fields.encode_status_end, app.up.seal_written
    main.fields.encode_status_end = slow(encode)
    app.up.seal_written = slow(seal)
    try:
        app.on_downlink(link.hub.command(link.device_id, app.epoch, 1, "status"))  # due: sent by the next step
        app._send_due(b.ticks_ms(), 4)  # (main._DUE_STATUS)
    finally:
        main.fields.encode_status_end = encode
        del app.up.seal_written
    assert len(held) == 2 and held[0] < held[1], held
    assert model.lost == 0, model.lost


def test_garbage_is_collected_before_it_takes_2_kb_of_a_small_free_heap():
    # The next collection is due below what the last one left free less
    # 2 kB (main._GC_GARBAGE), not half of it: a BLE board (9.3 kB free
    # after one at esp32 speed) let its control reads' garbage build for a
    # minute, to a 4.5 kB low-water (7.0 kB now, a collection every ~25 s).
    # Plenty free: _GC_HEADROOM, as before; a tight heap: half of it, never
    # a collection at every look.
    assert main._gc_threshold(9300) == 9300 - 2048
    assert main._gc_threshold(40000) == 16384
    assert main._gc_threshold(3000) == 1500
