# A fake of MicroPython's `bluetooth` module for the unix port, which has
# none. It is a test double for the radio, named as such, and it keeps the
# real module's constraints, because the firmware must cope with them:
#   - one BLE() object; irq events in the real order (connect, then MTU
#     exchange, then writes; disconnect);
#   - a notification longer than MTU-3 is refused;
#   - the stack holds a few notifications at a time: more raise
#     OSError(ENOMEM) until the air has carried them (one connection
#     interval carries a few packets);
#   - control-characteristic writes go to a buffer of gatts_set_buffer()'s
#     size, appended when asked, cleared by gatts_read();
#   - advertising data is at most 31 bytes;
#   - the stack's own work allocates nothing in the firmware's heap (its
#     buffers and event data are NimBLE's, or on the C stack): here the
#     notification slots and the control buffer are preallocated and the
#     event data of a write reused, so the simulation leaves no garbage for
#     the firmware's collector (a board has none of it); what the firmware
#     itself allocates (gatts_read's bytes) is made outside the clock's
#     enter()/leave() and counts as the firmware's;
#   - bonds are the application's to keep: pairing hands the secrets over
#     through _IRQ_SET_SECRET, and a bonded phone's reconnection is
#     encrypted only if _IRQ_GET_SECRET gives back the key it holds.
# The far side (a "central") is driven through Radio: in-process tests call
# it directly. AirRadio instead puts the board on the software radio (the
# "air", agent/dev/sim/air.py) through a Unix socket, where the hub's bleak
# backend finds it, connects and subscribes; the wire between the two is
# described in agent/dev/sim/air.py.
import errno
import json
import select
import socket
import struct

from micropython import const

FLAG_READ = const(0x0002)
FLAG_WRITE_NO_RESPONSE = const(0x0004)
FLAG_WRITE = const(0x0008)
FLAG_NOTIFY = const(0x0010)

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_MTU_EXCHANGED = const(21)
_IRQ_ENCRYPTION_UPDATE = const(28)
_IRQ_GET_SECRET = const(29)
_IRQ_SET_SECRET = const(30)
_SEC_OURS = const(1)  # the stack's secret types (NimBLE's store object types)
_SEC_PEER = const(2)
_PHONE = b"\x00\x11\x22\x33\x44\x55"
_MAX_ADV = const(31)
_MAX_NOTIFY = const(514)  # MTU 517 - 3


class UUID:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, UUID) and other.value == self.value


class Radio:
    # The air and the central. buffers: notifications the stack holds;
    # packets_per_interval every interval_ms leave it.
    def __init__(self, clock, buffers=4, interval_ms=15, packets_per_interval=4):
        self.clock = clock
        self.buffers = buffers
        self.interval_ms = interval_ms
        self.packets_per_interval = packets_per_interval
        self.ble = None
        self.connected = False
        self.conn_handle = 0
        self.mtu = 23
        # Notifications accepted by the stack, not yet on air: a ring of
        # `buffers` preallocated slots (NimBLE's own buffers are not in the
        # firmware's heap: copies here would be garbage the firmware's GC
        # collects, at a pace no board has).
        # Each slot is cut to its notification's length in place (a
        # bytearray keeps its capacity), so neither queuing nor delivering
        # one makes an object.
        self._slots = [bytearray(_MAX_NOTIFY) for _ in range(buffers)]
        self._slot_handle = [0] * buffers
        self._write_event = [0, 0]  # (conn handle, attr handle) of a write: reused, as the stack's
        self._q_head = 0
        self.queued = 0
        self.delivered = []  # what the central received, in order
        self.other = []  # (handle, data) notified on other characteristics
        self.on_notify = None  # callback(bytes) for a live central
        self.advertising = None
        self._last_ms = 0
        self.enomem = 0
        self.services = []  # [[service uuid, [[char uuid, flags, handle], ...]], ...]
        self.phone_ltk = None  # the long-term key the paired phone keeps
        self._pairings = 0
        # Faults (tests): notifications that fail with notify_errno, and a
        # central gone whose disconnect event has not come yet.
        self.notify_errors = 0
        self.notify_errno = errno.EIO
        self.vanished = False

    def advertise_changed(self):
        pass

    def services_changed(self):
        pass

    def service(self):
        now = self.clock.now_us() // 1000
        slots = (now - self._last_ms) // self.interval_ms * self.packets_per_interval
        if slots <= 0:
            return
        self._last_ms = now
        while slots and self.queued:
            i = self._q_head
            self._q_head = (i + 1) % len(self._slots)
            self.queued -= 1
            slots -= 1
            self._deliver(self._slot_handle[i], self._slots[i])

    def _enqueue(self, handle, data):
        i = (self._q_head + self.queued) % len(self._slots)
        self._slots[i][:] = data  # within its capacity (data is at most MTU-3 bytes)
        self._slot_handle[i] = handle
        self.queued += 1

    def _deliver(self, handle, data):
        # data: the slot itself, valid during the call
        if handle != self._ble().data_handle:
            self.other.append((handle, bytes(data)))
        elif self.on_notify is not None:
            self.on_notify(data)
        else:
            self.delivered.append(bytes(data))

    # --- what the central does -------------------------------------------
    def _ble(self):
        ble = self.ble
        if ble is None:
            raise OSError(errno.ENODEV)
        return ble

    def connect(self, mtu=23, encrypted=False):
        # encrypted: a phone bonded earlier starts encryption with its key.
        ble = self._ble()
        if self.advertising is None:
            raise OSError(errno.ENOTCONN)
        self.conn_handle += 1
        self.connected = True
        self.mtu = 23
        self.advertising = None
        ble._event(_IRQ_CENTRAL_CONNECT, (self.conn_handle, 0, _PHONE))
        if mtu != 23:
            self.mtu = mtu
            ble._event(_IRQ_MTU_EXCHANGED, (self.conn_handle, mtu))
        if encrypted:
            ours = ble._event(_IRQ_GET_SECRET, (_SEC_OURS, 0, memoryview(b"\x00" + _PHONE)))
            ok = ours is not None and self.phone_ltk is not None and bytes(ours) == self.phone_ltk
            ble._event(_IRQ_ENCRYPTION_UPDATE, (self.conn_handle, ok, False, ok, 16 if ok else 0))

    def pair(self, mtu=23):
        # A phone connects and pairs (LE Secure Connections, "just works",
        # bonding): both sides derive a long-term key, the stack asks the
        # application to store it, and the link is encrypted.
        self.connect(mtu)
        ble = self._ble()
        self._pairings += 1
        ltk = bytes((self._pairings * 37 + i) & 0xFF for i in range(16))
        key = memoryview(b"\x00" + _PHONE)
        ble._event(_IRQ_SET_SECRET, (_SEC_OURS, key, memoryview(ltk)))
        ble._event(_IRQ_SET_SECRET, (_SEC_PEER, key, memoryview(ltk)))
        self.phone_ltk = ltk
        ble._event(_IRQ_ENCRYPTION_UPDATE, (self.conn_handle, True, False, True, 16))

    def disconnect(self):
        if not self.connected:
            return
        self.connected = False
        self.queued = 0  # what had not left is lost with the link
        self._ble()._event(_IRQ_CENTRAL_DISCONNECT, (self.conn_handle, 0, _PHONE))

    def peripheral_disconnect(self):
        if self.vanished:
            self.vanished = False
            self.connected = True  # so that the event is delivered now
        self.disconnect()

    def vanish(self):
        # The central is gone (out of range, powered off) and the stack has
        # not noticed yet: notifications fail with ENOTCONN; the disconnect
        # event follows with deliver_disconnect() (the supervision timeout).
        self.connected = False
        self.vanished = True
        self.queued = 0

    def deliver_disconnect(self):
        if self.vanished:
            self.vanished = False
            self.connected = True
            self.disconnect()

    def fail_notify(self, count=1, err=errno.EIO):
        self.notify_errors = count
        self.notify_errno = err

    def read(self, handle):
        # A central's read: the stack answers from the attribute's value.
        ble = self._ble()
        buf = ble._written.get(handle)
        return bytes(buf) if buf is not None else ble._values.get(handle, b"")

    def write(self, data, handle=None, n=-1):
        # The central writes data[:n] (n < 0: all of it) to the control
        # characteristic, MTU-3 bytes at a time.
        ble = self._ble()
        h = handle if handle is not None else ble.control_handle
        if n < 0:
            n = len(data)
        step = self.mtu - 3
        ev = self._write_event
        i = 0
        while i < n:  # (range() with a variable step would make an object)
            ble._remote_write(h, data, i, min(n, i + step))
            ev[0] = self.conn_handle
            ev[1] = h
            ble._event(_IRQ_GATTS_WRITE, ev)
            i += step


# Messages on the air socket: type (1 byte), length (2 bytes, big-endian),
# payload. Board to air: H hello (address), A advertising (adv length,
# adv, scan response; empty: stopped), S services (JSON), N notification
# (handle, data), R read response (handle, data), D disconnect by the
# board. Air to board: C central connected (conn handle), M MTU exchanged,
# W write (handle, data), Q read (handle), X central gone.
_AF_UNIX = const(1)  # the unix port's socket.AF_UNIX (Linux); the ESP32 stubs do not know it
_RETRY_MS = const(1000)
# The longest record the air sends a board: a write (handle, then at most
# MTU 517 - 3 bytes). Records are read into fixed buffers, header then body,
# so the air's traffic makes no garbage in the firmware's heap (a radio's
# buffers are the stack's, never the firmware's): with a copy per record and
# per notification, an update pushed over the air left ~5 kB of garbage a
# second there, and the board's update ran out of memory (refused:no_memory).
_BODY_MAX = const(2 + _MAX_NOTIFY)
_RECORDS_PER_SERVICE = const(8)  # a service() reads at most this many: the rest waits in the socket
# Records for the air, kept while its socket takes them; past this many
# bytes the stack's notifications stay in its slots (ENOMEM for the
# firmware), as a radio's stay queued while the air is busy.
_TX_MAX = const(4096)


class AirRadio(Radio):
    def __init__(self, clock, path, address, buffers=4, interval_ms=15, packets_per_interval=4):
        super().__init__(clock, buffers, interval_ms, packets_per_interval)
        self.path = path
        self.address = address
        self.sock = None
        self._poll = select.poll()
        self._head = bytearray(3)  # a record's type and length
        self._body = bytearray(_BODY_MAX)
        self._got = 0  # bytes of the current record read, header included
        self._tx = bytearray(_TX_MAX + 3 + _BODY_MAX)
        self._tx[:] = b""  # (its capacity kept)
        self._retry_at = 0
        self.air_connects = 0
        self.records_in = 0  # records taken from the air (tests)

    def _open(self):
        now = self.clock.now_us() // 1000
        if now < self._retry_at:
            return False
        self._retry_at = now + _RETRY_MS
        s = socket.socket(_AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(struct.pack("H", _AF_UNIX) + self.path.encode() + b"\0")
        except OSError:
            s.close()
            return False
        s.setblocking(False)
        self.sock = s
        self._poll.register(s, select.POLLIN)
        self._got = 0
        self._tx[:] = b""
        self.air_connects += 1
        self._put(b"H", self.address.encode())
        self.services_changed()
        self.advertise_changed()
        return True

    def _close(self):
        if self.sock is not None:
            self._poll.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.disconnect()  # the air is gone: so is any central

    def _put_head(self, kind, n):
        tx = self._tx
        tx.append(kind)
        tx.append(n >> 8)
        tx.append(n & 0xFF)

    def _put(self, kind, payload):
        if self.sock is not None:
            self._put_head(kind[0], len(payload))
            self._tx.extend(payload)

    def advertise_changed(self):
        adv = self.advertising
        self._put(b"A", b"" if adv is None else bytes((len(adv[0]),)) + adv[0] + adv[1])

    def services_changed(self):
        if self.services:
            self._put(b"S", json.dumps(self.services).encode())

    def _deliver(self, handle, data):
        if self.sock is not None:
            self._put_head(0x4E, 2 + len(data))  # N
            tx = self._tx
            tx.append(handle >> 8)
            tx.append(handle & 0xFF)
            tx.extend(data)

    def peripheral_disconnect(self):
        if self.connected:
            self._put(b"D", b"")
        self.disconnect()

    def service(self):
        if self.sock is None and not self._open():
            return
        sock = self.sock
        if sock is None:
            return
        try:
            for _ in range(_RECORDS_PER_SERVICE):
                if not self._readable():
                    break
                n = self._read_record(sock)
                if n < 0:
                    break
                self._handle(n)
                if self.sock is None:
                    return
            if len(self._tx) < _TX_MAX:
                super().service()  # notifications leave the stack at the air's pace, while the air takes them
            tx = self._tx
            while tx:
                n = sock.send(tx)
                tx[:n] = b""  # (in place: its capacity kept)
        except OSError as e:
            if e.args and e.args[0] == errno.EAGAIN:
                return
            self._close()

    def _readable(self):
        for _ in self._poll.ipoll(0):  # (ipoll: its tuple is the poll object's, poll() makes a list)
            return True
        return False

    def _read_record(self, sock):
        # The body's length once a whole record is in _head/_body; -1 while
        # part of it is still to come.
        if self._got < 3 and not self._fill(sock, self._head, 0, 3):
            return -1
        head = self._head
        n = (head[1] << 8) | head[2]
        if n > _BODY_MAX:
            raise OSError(errno.EINVAL)  # not the air's: the connection is dropped
        if self._got - 3 < n and not (self._readable() and self._fill(sock, self._body, 3, n)):
            return -1
        self._got = 0
        return n

    def _fill(self, sock, buf, base, n):
        # Reads into buf the rest of its n bytes (the record's bytes from
        # `base` on); True once buf holds them. A read that ends mid-record
        # (rare: the air writes records whole) goes on through a view (an
        # object).
        at = self._got - base
        k = sock.readinto(buf if at == 0 else memoryview(buf)[at:], n - at)
        if k is None:
            return False
        if k == 0:
            raise OSError(errno.ECONNRESET)
        self._got += k
        return self._got - base == n

    def _handle(self, n):
        self.records_in += 1
        kind = self._head[0]
        body = self._body
        if kind == 0x43:  # C
            if self.advertising is None or self.connected:
                self._put(b"D", b"")  # not connectable now: the central's attempt fails
            else:
                self.connect()
        elif kind == 0x4D:  # M
            mtu = (body[0] << 8) | body[1]
            self.mtu = mtu
            self._ble()._event(_IRQ_MTU_EXCHANGED, (self.conn_handle, mtu))
        elif kind == 0x57 and self.connected:  # W
            # From the air, one write is one ATT write: already at most MTU-3.
            ble = self._ble()
            h = (body[0] << 8) | body[1]
            ble._remote_write(h, body, 2, n)
            ev = self._write_event
            ev[0] = self.conn_handle
            ev[1] = h
            ble._event(_IRQ_GATTS_WRITE, ev)
        elif kind == 0x51:  # Q
            self._put(b"R", bytes(body[:2]) + self.read((body[0] << 8) | body[1]))
        elif kind == 0x58:  # X
            self.disconnect()


_radio = None


def use_radio(radio):
    global _radio
    _radio = radio


def radio_from(cfg, clock):
    args = (cfg.get("buffers", 4), cfg.get("interval_ms", 15), cfg.get("packets_per_interval", 4))
    r = AirRadio(clock, cfg["air"], cfg["address"], *args) if cfg.get("air") else Radio(clock, *args)
    use_radio(r)
    return r


class BLE:
    def __init__(self):
        if _radio is None:
            raise OSError(errno.ENODEV)
        self._radio = _radio
        _radio.ble = self
        self._active = False
        self._handler = None
        self._values = {}  # handle: its value (gatts_write), for the central's reads
        self._limits = {}
        self._append = {}
        self._written = {}  # handle: a buffer of gatts_set_buffer's size, what centrals wrote
        self.control_handle = None
        self.data_handle = None
        self.config_values = {"mtu": 23, "gap_name": "MPY"}

    def _event(self, event, data):
        if self._handler is not None:
            return self._handler(event, data)
        return None

    def _remote_write(self, handle, data, start, end):
        # A central's write of data[start:end], kept (appended, with
        # gatts_set_buffer's append) up to the buffer's size.
        buf = self._written.get(handle)
        if buf is None:
            buf = self._written[handle] = bytearray(self._limits.get(handle, 20))
            buf[:] = b""
        if not self._append.get(handle):
            buf[:] = b""
        room = self._limits.get(handle, 20) - len(buf)
        if end - start > room:
            end = start + max(0, room)
        for i in range(start, end):  # in the buffer's own capacity: no object made
            buf.append(data[i])

    def active(self, value=None):
        if value is not None:
            self._active = bool(value)
        return self._active

    def config(self, *args, **kw):
        if args:
            return self.config_values[args[0]]
        self.config_values.update(kw)
        return None

    def irq(self, handler):
        self._handler = handler

    def gatts_register_services(self, services):
        if not self._active:
            raise OSError(errno.EPERM)
        handles = []
        table = []
        h = 1
        for uuid, chars in services:
            hs = []
            rows = []
            for cuuid, flags in chars:
                h += 1
                hs.append(h)
                rows.append([cuuid.value, flags, h])
                if flags & (FLAG_WRITE | FLAG_WRITE_NO_RESPONSE) and self.control_handle is None:
                    self.control_handle = h
                if flags & FLAG_NOTIFY and self.data_handle is None:
                    self.data_handle = h
                h += 1
            handles.append(tuple(hs))
            table.append([uuid.value, rows])
            h += 1
        self._radio.services = table
        self._radio.services_changed()
        return tuple(handles)

    def gatts_set_buffer(self, handle, length, append=False):
        self._limits[handle] = length
        self._append[handle] = append
        buf = self._written[handle] = bytearray(length)
        buf[:] = b""

    # The stack's calls are the simulation's time, not the firmware's; what
    # the real module allocates in the firmware's heap (gatts_read's bytes,
    # an OSError's exception object) is made outside enter()/leave(), so it
    # counts as the firmware's. The methods the firmware calls in its data
    # path keep their call frames within the VM's 11 words (no try: nothing
    # in them raises inside the bracket): the real ones are C functions, a
    # Python frame allocated on the heap here would be charged to the
    # firmware.
    def gatts_read(self, handle):
        c = self._radio.clock
        c.enter()
        buf = self._written.get(handle)
        c.leave()
        # MicroPython's gatts_read returns a new bytes object, made in the
        # firmware's heap (its bluetooth module has no readinto): that
        # allocation is the firmware's, not the simulation's.
        v = bytes(buf) if buf is not None else self._values.get(handle, b"")
        if buf is not None and self._append.get(handle):
            c.enter()
            buf[:] = b""
            c.leave()
        return v

    def gatts_write(self, handle, data):
        c = self._radio.clock
        c.enter()
        try:
            buf = self._written.get(handle)
            if buf is not None:  # a characteristic centrals write: one value
                buf[:] = data
            else:
                self._values[handle] = bytes(data)
        finally:
            c.leave()

    def gatts_notify(self, conn_handle, value_handle, data=None):
        c = self._radio.clock
        c.enter()
        err = self._notify(conn_handle, value_handle, data)
        c.leave()
        if err > 0:  # (as the chip's mp_raise_OSError: the exception object is the firmware's)
            raise OSError(err)
        if err < 0:
            raise ValueError("notification of %d bytes exceeds MTU %d - 3" % (len(data), self._radio.mtu))

    def _notify(self, conn_handle, value_handle, data):
        # 0 when queued, else the errno gatts_notify raises (-1: too long).
        r = self._radio
        if not r.connected or conn_handle != r.conn_handle:
            return errno.ENOTCONN
        if r.notify_errors:
            r.notify_errors -= 1
            return r.notify_errno
        if data is not None and len(data) > r.mtu - 3:
            return -1
        if r.queued >= r.buffers:
            r.enomem += 1
            return errno.ENOMEM
        r._enqueue(value_handle, data if data is not None else self._values.get(value_handle, b""))
        return 0

    def gap_advertise(self, interval_us, adv_data=None, resp_data=None, connectable=True):
        if adv_data is not None and len(adv_data) > _MAX_ADV or resp_data is not None and len(resp_data) > _MAX_ADV:
            raise ValueError("advertising data over 31 bytes")
        self._radio.advertising = None if interval_us is None else (bytes(adv_data or b""), bytes(resp_data or b""))
        self._radio.advertise_changed()

    def gap_disconnect(self, conn_handle):
        r = self._radio
        if not (r.connected or r.vanished) or conn_handle != r.conn_handle:
            return False
        r.peripheral_disconnect()
        return True
