# The app's construction (app/main.py, App.__init__), apart: it runs once
# at boot, and its code (2 kB of a board's heap as .mpy) leaves RAM once
# the app is built (App.__init__ forgets this module).
import gc

from micropython import const

from app import acks, faults, main, origin, ticks
from app.outbox import Outbox
from app.sampler import Stream
from protocols import cbor, cipher, cose, fields

_SMALL = const(160)  # buffer for hello/status/time messages
# Our sensors give at most 18-bit samples: a delta-zigzag varint of one
# takes at most 3 bytes. Headers and the COSE envelope take under 200.
_WORST_BYTES_PER_SAMPLE = const(3)
_FRAME_OVERHEAD = const(200)
_CHIPS = {fields.STREAM_ECG_MAX30003: "MAX30003", fields.STREAM_ECG_AD8232: "AD8232",
          fields.STREAM_PPG_MAX30102: "MAX30102"}


def build(app, board, cfg, key, epoch, forget_config):
    from app import config

    config_error = config.ConfigError
    # The update's code is loaded for a trial boot, and for one that follows a rollback (to report it).
    app._on_trial = config.on_trial() or config.rolled_back()
    firmware = config.release_name(main.FIRMWARE)  # the hello's: the release an update installed, if any
    app._epoch_unreadable = config.epoch_unreadable  # (reported at start)
    config.epoch_unreadable = None
    del config
    if forget_config:
        main.forget("app", "config")
    app.board = board
    app.cfg = cfg
    app.epoch = epoch
    kid = cfg["device_id"].encode()
    app.up = cose.MacKey(key, kid, cose.AAD_UPLINK)
    app.down = cose.MacKey(key, kid, cose.AAD_DOWNLINK)
    app.acks = acks.AckReader(app.down)
    app.unique_id = board.unique_id()  # the chip's, sent in each status
    app.seq = 0
    app.last_command = -1
    app.running = True
    app.streams = []
    now = board.ticks_ms()  # a tick (app.ticks): wraps; only ticks.diff/add on it
    for stream_id, sensor, lead_off in board.sensors(cfg):
        window = sensor.rate_hz * cfg["window_ms"] // 1000
        if not 0 < window <= fields.MAX_SAMPLES:
            raise config_error("window_ms gives %d samples per frame, outside 1..%d" % (window, fields.MAX_SAMPLES))
        st = Stream(sensor, stream_id, window, board.uptime_ms(), lead_off)
        st.uptime_ms = board.uptime_ms
        st.next_poll_ms = now
        pin = board.irq_pin(stream_id)
        if pin is not None:
            st.use_irq(pin)
        app.streams.append(st)
    app.worst = [s.window * len(s.chans) * _WORST_BYTES_PER_SAMPLE + _FRAME_OVERHEAD for s in app.streams]
    biggest = max(app.worst)
    gc.collect()  # the outbox is the one big block: make room for it in one piece
    ring_bytes = max(cfg["outbox_bytes"], 2 * biggest)
    app.outbox = Outbox(ring_bytes, cfg["outbox_frames"], 2 * biggest)  # (a smaller ring from boot: reported)
    app._frame_writer = cbor.Writer(app.outbox.buf)  # build_frame bounds it to a region
    # hello/status/time/error messages, sealed in place (as frames are).
    app._small_w = cbor.Writer(bytearray(_SMALL + 96))
    app.link = board.link(cfg, biggest)
    app.outbox.release = getattr(app.link, "release", None)  # BLE: its frames are sent from the ring
    # Samples are encrypted, then MACed, under a key of this boot: its
    # salt is drawn now (a BLE board's radio is on by now) and never
    # stored, so a lost or restored epoch file cannot bring a counter
    # block back (protocols/cipher.py).
    app.sealer = cipher.SampleCipher(key, board.random_bytes(cipher.BOOT_SALT_SIZE))
    # Origin proof (app/origin.py): only with an origin key from provisioning.
    okey = origin.load_key()
    gc.collect()  # (what reading the keys and building the link left: the log's buffers in one piece)
    app.origin = None if okey is None else origin.OriginLog(okey, kid, key, app.sealer.boot_salt,
                                                             cfg["origin_every_ms"], now, app.up)
    # The board's own rough vitals, for the standard BLE services only.
    app.hr = None
    app.ox = None
    if hasattr(app.link, "set_vitals"):  # BLE only: a serial board never loads them
        from app.vitals_lite import HeartRate, PulseOx

        for st in app.streams:
            if st.stream_id == fields.STREAM_PPG_MAX30102:
                app.ox = PulseOx(st.rate_hz, st.chans[0], st.chans[1])
            else:
                app.hr = HeartRate(st.rate_hz, st.chans[0])
    app.frames_built = 0
    app.downlink_rejected = 0
    app._time_nonce = 0  # the time request's, answered when _DUE_TIME goes
    app.firmware = firmware
    # A firmware update (app/ota.py, imported only then): installing one,
    # or this boot's version on trial. acked_ms: when an ack last came.
    app.acked_ms = None
    app.update = None
    if app._on_trial:
        from app import ota

        app.update = ota.Updater(app, now)
    app.reseal_due = False  # an epoch resync left frames of the old epoch in the outbox
    app._reseal_oom = False
    app.guard = faults.SensorGuard([_CHIPS[st.stream_id] for st in app.streams], now)
    app.reports = faults.Reports()
    if len(app.outbox.buf) < ring_bytes:  # streams on, with less room for frames awaiting their ack
        text = "outbox ring %d bytes, not %d: no larger block at boot" % (len(app.outbox.buf), ring_bytes)
        app.reports.add(faults.ERR_NO_MEMORY, text)
        board.console("pulsebridge: " + text)
    app.loop_restarts = 0
    app._link_fault = getattr(app.link, "take_fault", None)  # a fake link may have none
    app.wdt = None
    app.next_status_ms = ticks.add(now, cfg["status_every_ms"])
    app.due = 0  # the small messages waiting for the link (_DUE_*)
    app._woken = app._any_ready  # bound once: the idle loop calls it often
    app._gc_checked_ms = now
    # A sample frame's fields, set for each frame (build_frame); between
    # its pieces the FIFOs are read (_read_fifos, bound once).
    app._read_fifos_cb = app._read_fifos  # (bound once: checkpoints pass it on too)
    app._fields = fields.SampleFrameFields(app.sealer)
    app._fields.between = app._read_fifos_cb
    if app.origin is not None:  # (the FIFOs read between a checkpoint's pieces)
        app.origin.between = app._read_fifos_cb
    # A chip read's bus errors, and the read's time and kind for the
    # pieces of _read_sensor and _read_fifos (frames within 11 words).
    app._bus_errors = faults.Caught()
    app._read_now = 0
    app._read_how = 0
    app._fastest = app.streams[0]
    for st in app.streams:
        if st.rate_hz > app._fastest.rate_hz:
            app._fastest = st
