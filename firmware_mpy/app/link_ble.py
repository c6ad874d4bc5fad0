# Frames over BLE: a GATT peripheral on MicroPython's `bluetooth` module.
#
# Service (UUIDs in protocols/SPEC.md; the GATT table in app/ble_gatt.py):
#   data characteristic (notify): uplink messages cut into fragments of at
#     most MTU-3 bytes (protocols.link.Fragmenter);
#   control characteristic (write): downlink messages as "~" base64 lines,
#     which stay whole however the central splits its writes.
# Standard services beside it, so off-the-shelf apps can read a board:
# Device Information (0x180A), Battery (0x180F), Pulse Oximeter (0x1822,
# PLX Continuous Measurement) and Heart Rate (0x180D). Their measurements
# are health data: they are notified only on an encrypted link (an app
# paired with LE Secure Connections), never in clear, and are not readable.
# The hub's own link needs no pairing: the protocol encrypts its samples.
# Bonds with paired phones are kept in flash (app.bonds), so a phone paired
# once reads the board again after it restarts.
# The IRQ handler only records what happened; service(), called from the
# app's loop, does the work. Notifications are paced by a window: at most
# so many handed to the stack per connection interval, what its buffers
# were seen to take. MicroPython reports no notification sent (its
# _IRQ_GATTS_INDICATE_DONE is for indications), so an ENOMEM is the one
# sign the buffers are full; on the chip each makes an exception object in
# the heap. After one the window shrinks to what the stack took in that
# interval and nothing more goes until the next. A window sent whole for
# _PROBE_START intervals is known good; up to the largest known good one
# it grows by one after as many, past it only after _probe_after, which
# doubles at each probe that met ENOMEM (a good size that fails is good no
# longer). So a busy link meets ENOMEM rarely, not at every burst (15 a
# second at MTU 23 before).
# Never stuck: a central that connects and leaves before the loop sees it
# leaves no link behind; any other radio error (ENOTCONN when the central
# vanished mid-notify, an error of the stack) ends the connection on our
# side, the app resends what was unacknowledged on the next one, and
# take_fault() says what happened.
import errno
import struct

from micropython import const

from app import ticks
from app.bonds import BondStore
from app.faults import Caught
from protocols import link

BONDS = "pulsebridge/bonds.bin"

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_MTU_EXCHANGED = const(21)
_IRQ_ENCRYPTION_UPDATE = const(28)
_IRQ_GET_SECRET = const(29)
_IRQ_SET_SECRET = const(30)
_IO_NO_INPUT_OUTPUT = const(3)


_ADV_INTERVAL_US = const(250000)
_WINDOW_START = const(4)  # notifications per connection interval on a new connection (NimBLE's ESP32 default
# connection event carries 4 or more packets; the window learns the rest)
_WINDOW_MAX = const(8)  # and at most: notifications tried per loop
_PROBE_START = const(16)  # intervals with the window sent whole before it grows by one (0.24 s at 15 ms)
_PROBE_MAX = const(1024)  # and at most, after repeated failed probes (15 s at 15 ms)
_RX_CHUNK = const(32)  # bytes deframed per receive() at most: the app reads the sensors between two
_PREFERRED_MTU = const(517)
_PUMP_MS = const(15)  # a typical connection interval: notifications leave the stack at that pace
_STD_EVERY_MS = const(1000)  # standard measurements notified once a second
_SFLOAT_NAN = const(0x07FF)
_SFLOAT_TENTHS = const(0xF000)  # exponent -1



def _sfloat(x10):
    # IEEE 11073 16-bit SFLOAT of a value in tenths: 12-bit mantissa, 4-bit
    # exponent; 0 means "no value" (NaN).
    if not x10:
        return _SFLOAT_NAN
    if x10 <= 2047:
        return _SFLOAT_TENTHS | x10
    return (x10 + 5) // 10  # exponent 0: whole units


class BleLink:
    name = "ble"
    # The characteristics' handles, set by app/ble_gatt.py (bare
    # annotations, for the board's type check: no code, no RAM).
    _h_data: int
    _h_ctrl: int
    _h_battery: int
    _h_plx: int
    _h_hr: int

    def __init__(self, bluetooth, device_id, max_message, firmware="", model="", bonds_path=BONDS, ticks_ms=None):
        # ticks_ms: the board's clock (time.ticks_ms), for the window's pace.
        self._bt = bluetooth
        if ticks_ms is None:
            import time

            ticks_ms = time.ticks_ms  # type: ignore[attr-defined]
        self._ticks_ms = ticks_ms
        self.bonds = BondStore(bonds_path)
        if self.bonds.error:
            print("BLE: %s; paired phones must pair again" % self.bonds.error)
        ble = bluetooth.BLE()
        self._ble = ble
        ble.active(True)
        ble.config(gap_name=device_id, mtu=_PREFERRED_MTU)
        # Pairing for apps: LE Secure Connections, bonded, "just works" (a
        # board has no display nor keys).
        ble.config(bond=True, le_secure=True, mitm=False, io=_IO_NO_INPUT_OUTPUT)
        ble.irq(self._irq)
        # The GATT table and the advertising data (app/ble_gatt.py: made
        # once, its code leaves RAM after).
        from app import ble_gatt
        from app.main import forget

        self._adv = ble_gatt.register(self, bluetooth, device_id, model, firmware)
        forget("app", "ble_gatt")
        self._std = bytearray(5)
        self._std_hr = memoryview(self._std)[:2]  # the heart rate's 2 bytes, a view made once
        self._std_due = -1  # a tick (app.ticks) once the first measurement went out
        self.encrypted = False
        self.hr_x10 = 0
        self.spo2_x10 = 0
        self.pr_x10 = 0
        self.battery_pct = -1
        self.std_sent = 0
        # Messages up to MAX_MTU bytes (hello, status, the other small ones,
        # built in a buffer the app reuses at once) are copied here; longer
        # ones (frames, in the app's outbox ring) are fragmented where they
        # are, not copied (~1.7 kB of heap saved for a 1 s ECG window): the
        # outbox calls release() before it overwrites any of their bytes.
        # max_message: the longest message the app sends (not needed here).
        self._tx = bytearray(link.MAX_MTU)
        self._frag = link.Fragmenter(link.MIN_MTU)
        # A fragment is notified as a whole buffer of its length: this one,
        # made MAX_MTU long, is cut to each fragment's length in place and
        # grown back (from _tx_head: any MAX_MTU bytes) before the next is
        # built. A bytearray keeps its capacity when cut, so neither
        # allocates, where a view of each fragment would (a new object per
        # notification).
        self._fragbuf = bytearray(link.MAX_MTU)
        self._tx_head = memoryview(self._tx)
        self.released = 0  # messages stopped mid-way because their bytes were about to change
        self._frag_len = 0  # a fragment built and not yet accepted by the stack
        self._rx = link.LineDeframer()
        self.message = self._rx.message  # receive()'s message: decoded in place there
        self._written = b""  # the hub's last write to the control characteristic
        self._written_pos = 0  # how much of it was deframed
        self.rx_more = False  # receive() stopped at its chunk: more waits
        self._conn = -1
        self.connected = False
        self.pump_ms = _PUMP_MS
        self.mtu = link.MIN_MTU
        # The notification window (see the top): its size, the largest
        # known good, what was handed to the stack in the current interval
        # and when that began, the intervals sent whole since the last
        # change, and how many make it grow past the known good size.
        self._window = _WINDOW_START
        self._good = 0
        self._sent = 0
        self._interval_t0 = 0
        self._whole = 0
        self._probe_after = _PROBE_START
        self.enomem = 0
        self._notify_errors = Caught()
        self.reconnects = 0
        self.radio_errors = 0
        self._fault = None  # what went wrong, for take_fault()
        self._adv_due = False  # advertising to (re)start at the next service()
        # Set by the IRQ handler, consumed by service().
        self._irq_conn = -1
        self._irq_gone = False
        self._irq_mtu = 0
        self._irq_write = False
        self._advertise()

    def _irq(self, event, data):
        if event == _IRQ_CENTRAL_CONNECT:
            self._irq_conn = data[0]
        elif event == _IRQ_CENTRAL_DISCONNECT:
            if data[0] == self._irq_conn:
                self._irq_conn = -1  # came and went before the loop saw it
            self._irq_gone = True
        elif event == _IRQ_MTU_EXCHANGED:
            self._irq_mtu = data[1]
        elif event == _IRQ_GATTS_WRITE:
            self._irq_write = True
        elif event == _IRQ_ENCRYPTION_UPDATE:
            self.encrypted = bool(data[1])
        elif event == _IRQ_GET_SECRET:
            return self.bonds.get(data[0], data[1], data[2])
        elif event == _IRQ_SET_SECRET:
            return self.bonds.set(data[0], data[1], data[2])

    def _advertise(self):
        try:
            self._ble.gap_advertise(_ADV_INTERVAL_US, adv_data=self._adv[0], resp_data=self._adv[1])
            self._adv_due = False
        except OSError as e:
            self._adv_due = True  # the stack is busy: again at the next service()
            self._radio_error("advertising", e)

    def _radio_error(self, what, e):
        self.radio_errors += 1
        if self._fault is None:
            self._fault = "BLE %s failed (OSError %s)" % (what, e)

    def take_fault(self):
        # What went wrong on the radio since the last call (text), or None.
        f = self._fault
        self._fault = None
        return f

    def _drop(self):
        # The connection is over for us (the central left, or the radio
        # failed on it): the app resends whole messages on the next one.
        self._conn = -1
        self.connected = False
        self.encrypted = False
        self._frag_len = 0
        self._frag.abort()

    def service(self):
        # Returns True when a central has just connected (the app then
        # resends what was in flight).
        fresh = False
        if self._irq_gone:
            self._irq_gone = False
            self._drop()
            self._adv_due = True
        if self._adv_due and not self.connected and self._irq_conn < 0:
            self._advertise()
        if self._irq_conn >= 0:
            self._conn = self._irq_conn
            self._irq_conn = -1
            self.connected = True
            self.mtu = link.MIN_MTU
            self._frag.set_mtu(link.MIN_MTU)
            self._frag_len = 0
            self._window = _WINDOW_START  # (another central, another connection interval)
            self._good = 0
            self._probe_after = _PROBE_START
            self._whole = 0
            self.reconnects += 1
            fresh = True
        if self._irq_mtu:
            self.mtu = min(self._irq_mtu, link.MAX_MTU)
            self._irq_mtu = 0
            self._frag.set_mtu(self.mtu)
        if self.connected:
            self._pump()
        self.bonds.flush()  # a bond made or removed since the last loop
        return fresh

    def _close_failed(self):
        conn = self._conn
        self._drop()
        try:
            self._ble.gap_disconnect(conn)  # if the stack still thinks it is up
        except OSError:
            pass
        self._adv_due = True

    def set_vitals(self, now_ms, hr_x10, spo2_x10, pr_x10, battery_pct):
        # The board's latest figures (0: none), for the standard services.
        # (Runs at every loop: the work apart keeps its frame in 11 words.)
        self.hr_x10 = hr_x10
        self.spo2_x10 = spo2_x10
        self.pr_x10 = pr_x10
        if battery_pct != self.battery_pct:
            self._write_battery(battery_pct)
        if self.connected and self.encrypted and not self._frag_len and (
                self._std_due < 0 or ticks.diff(now_ms, self._std_due) >= 0):
            self._std_due = ticks.add(now_ms, _STD_EVERY_MS)
            self._notify_std()

    def _write_battery(self, battery_pct):
        self.battery_pct = battery_pct
        try:
            self._ble.gatts_write(self._h_battery, bytes((battery_pct,)))
        except OSError as e:
            self._radio_error("battery write", e)

    # (Every second with a subscribed phone: within the VM's 11 words of
    # frame, the errors caught by a with-block, faults.Caught.)
    def _notify_std(self):
        with self._notify_errors:
            if self.hr_x10:
                self._notify_hr()
            if self.spo2_x10:
                self._notify_plx()
        self._notify_errors.take()  # out of buffers: the next second's values will do

    def _notify_hr(self):
        s = self._std
        s[0] = 0  # flags: heart rate as uint8
        s[1] = min(255, (self.hr_x10 + 5) // 10)
        self._ble.gatts_notify(self._conn, self._h_hr, self._std_hr)
        self._sent += 1  # (the stack's buffers are the same)
        self.std_sent += 1

    def _notify_plx(self):
        s = self._std
        struct.pack_into("<BHH", s, 0, 0, _sfloat(self.spo2_x10), _sfloat(self.pr_x10))
        self._ble.gatts_notify(self._conn, self._h_plx, s)
        self._sent += 1
        self.std_sent += 1

    # _pump and its helpers keep to the VM's 11 words of frame (README,
    # "call frames"): _pump runs at every loop while connected.
    def _pump(self):
        self._next_interval()
        while self._sent < self._window:
            if not self._frag_len and not (self._frag.busy and self._next_fragment()):
                return
            if not self._notify():
                return

    def _next_interval(self):
        # A connection interval has passed since the window's last one
        # began: the stack has sent some; the window starts over.
        now = self._ticks_ms()
        if ticks.diff(now, self._interval_t0) < self.pump_ms:
            return
        self._interval_t0 = now
        w = self._window
        if self._sent >= w:  # the whole window went without ENOMEM
            self._whole += 1
            if self._whole >= _PROBE_START and w > self._good:
                self._good = w
            if w < _WINDOW_MAX and self._whole >= (_PROBE_START if w < self._good else self._probe_after):
                self._window = w + 1
                self._whole = 0
        self._sent = 0

    def _next_fragment(self):
        # Builds the next fragment in _fragbuf; False when none is left.
        fb = self._fragbuf
        if len(fb) < self._frag.fragment_size:
            fb[:] = self._tx_head  # back to MAX_MTU bytes, in its own capacity
        n = self._frag.next_into(fb)
        if not n:
            return False
        if n < len(fb):
            fb[n:] = b""  # cut to the fragment, in place
        self._frag_len = n
        return True

    def _notify(self):
        # Hands the fragment to the stack; False if it did not take it. (A
        # with-block, faults.Caught: a try naming its error needs 14 words.)
        with self._notify_errors:
            self._ble.gatts_notify(self._conn, self._h_data, self._fragbuf)
            self._frag_len = 0
            self._sent += 1
            return True
        self._refused(self._notify_errors.take())
        return False

    def _refused(self, e):
        if e.args and e.args[0] == errno.ENOMEM:
            # The stack's buffers are full: keep the fragment, shrink the
            # window to what they took this interval, wait for the next;
            # the next probe past it waits twice as long.
            self.enomem += 1
            if self._window > self._good:  # a probe past the known good size
                self._probe_after = min(_PROBE_MAX, 2 * self._probe_after)
            else:
                self._good = self._window - 1
            self._window = max(1, self._sent)
            self._sent = self._window
            self._whole = 0
            return
        # ENOTCONN (the central vanished before its disconnect event) or
        # any other error of the stack: this connection is over.
        self._radio_error("notify", e)
        self._close_failed()

    def busy(self):
        # A message is still being notified, fragment by fragment.
        return self.connected and (self._frag.busy or self._frag_len > 0)

    def send(self, buf, n, off=0):
        # Takes a whole message, buf[off:off+n], if no other is being
        # fragmented. One of up to MAX_MTU bytes is copied; a longer one is
        # read where it is until sent, its bytes unchanged meanwhile unless
        # release() is called first.
        if not self.connected or self._frag.busy or self._frag_len:
            return False
        if n <= len(self._tx):
            link.copy_into(self._tx, 0, buf, off, n)
            self._frag.start(self._tx, n)
        else:
            self._frag.start(buf, n, off)
        self._pump()
        return True

    def release(self, buf, start, end):
        # buf[start:end] is about to change (the outbox reuses it): a
        # message being sent from there is stopped (the hub's reassembler
        # drops its part; the outbox sends the frame again if it keeps it).
        if self._frag.holds(buf, start, end):
            self._frag.abort()
            self._frag_len = 0
            self.released += 1

    def receive(self):
        # The length of the next downlink message, then in message[:n] until
        # the next call (not yet authenticated), or 0. The hub's writes are
        # read whole and deframed a message at a time.
        data = self._written
        if self._written_pos >= len(data) and self._irq_write:
            data = self._read_control()
        rx = self._rx
        i = self._written_pos
        end = len(data)
        self.rx_more = end - i > _RX_CHUNK
        if self.rx_more:
            end = i + _RX_CHUNK
        while i < end:
            n = rx.take_byte(data[i])
            i += 1
            if n:
                self._written_pos = i
                self.rx_more = False
                return n
        self._written_pos = i
        return 0

    def _read_control(self):
        # (Apart from receive(), which runs at every loop; twice a second,
        # at each ack, within the VM's 11 words too: a with-block,
        # faults.Caught, as _notify's; a try naming its error needs 14.)
        self._irq_write = False
        self._written = b""
        with self._notify_errors:
            self._written = self._ble.gatts_read(self._h_ctrl)
        e = self._notify_errors.take()
        if e is not None:
            self._radio_error("control read", e)  # the hub writes it again if it matters
        self._written_pos = 0
        return self._written
