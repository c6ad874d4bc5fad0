# The simulation shares the firmware's MicroPython heap (one process), so
# whatever it allocates is garbage the firmware's collector must collect,
# at a pace no board has: a chip's radio stack keeps its buffers and event
# data out of the GC heap. These tests hold the fake radio's data path
# (the central's writes to the control characteristic, notifications
# queued and delivered) to allocating nothing, under
# micropython.heap_lock(); gatts_read's new bytes object is the firmware's
# own allocation (MicroPython's API has no readinto) and stays allowed.
import errno
import gc
import json

import micropython

from app import config, main
from sim.board_sim import SimBoard
from sim.clock import VirtualClock

_ACK_LINE = b"~" + b"A" * 160 + b"\n"  # an ack as the hub writes it (base64 line), longer than one ATT write


def _ble_board():
    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    sim["ble"] = {}
    board = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg["link"] = "ble"
    app = main.App(board, cfg, config.load_key(), config.next_epoch())
    return board, app


def test_the_central_writing_the_control_characteristic_allocates_nothing():
    board, app = _ble_board()
    app.start()
    radio = board.radio
    radio.connect(23)  # 20-byte writes: the line takes 9 of them
    ble = app.link._ble
    line = bytearray(_ACK_LINE)
    half = len(line) // 2
    micropython.heap_lock()
    try:
        radio.write(line, None, half)  # the first half of the buffer
        radio.write(line)  # then all of it
    finally:
        micropython.heap_unlock()
    # Appended (gatts_set_buffer(..., append=True)), up to the buffer's size,
    # and cleared by the read, as the stack does.
    got = ble.gatts_read(ble.control_handle)
    assert got == bytes(line[:half]) + bytes(line), got
    assert ble.gatts_read(ble.control_handle) == b""


def test_notifications_queued_and_delivered_allocate_nothing():
    board, app = _ble_board()
    app.start()
    radio = board.radio
    radio.connect(247)
    seen = [0, 0]

    def on_notify(data):  # the central: counts, keeps nothing
        seen[0] += 1
        seen[1] += len(data)

    radio.on_notify = on_notify
    ble = app.link._ble
    fragment = bytearray(range(200))
    conn = radio.conn_handle
    micropython.heap_lock()
    try:
        for _ in range(3):
            ble.gatts_notify(conn, ble.data_handle, fragment)
        board.sleep_ms(radio.interval_ms)  # one connection interval: the air carries them
        radio.service()
    finally:
        micropython.heap_unlock()
    assert seen == [3, 600], seen


def _air_board(path):
    # A board on the air (AirRadio): the test holds the air's end of its socket.
    import socket
    import struct

    srv = socket.socket(1, socket.SOCK_STREAM)  # AF_UNIX
    srv.bind(struct.pack("H", 1) + path.encode() + b"\0")
    srv.listen(1)
    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    sim["ble"] = {"air": path, "address": "F6:98:37:4A:3B:40"}
    board = SimBoard(sim, VirtualClock())
    cfg = config.load()
    cfg["link"] = "ble"
    app = main.App(board, cfg, config.load_key(), config.next_epoch())
    board.radio.service()  # connects to the air
    air, _ = srv.accept()
    srv.close()
    return board, app, air


def _record(kind, body):
    return bytes((kind, len(body) >> 8, len(body) & 0xFF)) + body


def test_the_air_s_records_are_read_a_few_at_a_time_into_fixed_buffers():
    # An update pushed over the air queues hundreds of writes in the board's
    # socket: a service() takes at most a few (the rest wait there, as a
    # radio's link layer holds the central back), each read into the
    # radio's own buffers, allocating nothing. Before, every record was read
    # at once and copied (recv, +=, slices): ~5 kB of garbage a second while
    # an update came in, and the update ran out of memory (refused:no_memory).
    import os

    path = "air-heap.sock"  # (in the test's own directory)
    board, app, air = _air_board(path)
    try:
        app.start()
        radio = board.radio
        radio.service()
        air.send(_record(0x43, b"\x00\x05"))  # C: a central connects
        air.send(_record(0x4D, b"\x00\xf7"))  # M: MTU 247
        while radio.records_in < 2:
            radio.service()
        assert radio.connected
        ble = app.link._ble
        h = ble.control_handle
        n = 100
        write = _record(0x57, bytes((h >> 8, h & 0xFF)) + b"~" + b"A" * 150)
        for _ in range(n):
            air.send(write)
        micropython.heap_lock()
        try:
            radio.service()
            first = radio.records_in - 2
            for _ in range(4 * n):
                if radio.records_in - 2 == n:
                    break
                radio.service()
        finally:
            micropython.heap_unlock()
        assert first == 8, first
        assert radio.records_in - 2 == n, radio.records_in
        got = ble.gatts_read(ble.control_handle)
        assert got.startswith(b"~AAAA"), got[:20]
    finally:
        air.close()
        os.remove(path)


def test_notifications_go_on_the_air_without_allocating():
    import os

    path = "air-notify.sock"
    board, app, air = _air_board(path)
    try:
        radio = board.radio
        air.send(_record(0x43, b"\x00\x05"))
        air.send(_record(0x4D, b"\x00\xf7"))
        while radio.records_in < 2:
            radio.service()
        ble = app.link._ble
        fragment = bytearray(range(200))
        micropython.heap_lock()
        try:
            for _ in range(3):
                ble.gatts_notify(radio.conn_handle, ble.data_handle, fragment)
            board.sleep_ms(radio.interval_ms)  # one connection interval: the air carries them
            radio.service()
        finally:
            micropython.heap_unlock()
        data = b""
        want = 3 * (3 + 2 + 200)
        while len(data) < want:
            chunk = air.recv(4096)
            assert chunk, "the air's socket closed"
            data += chunk
        i = 0
        notes = []
        while i + 3 <= len(data):
            k = (data[i + 1] << 8) | data[i + 2]
            if data[i] == 0x4E:
                notes.append(data[i + 5:i + 3 + k])
            i += 3 + k
        assert notes[-3:] == [bytes(fragment)] * 3, notes
    finally:
        air.close()
        os.remove(path)


def test_the_console_s_bytes_go_to_the_hub_s_pipe_without_allocating():
    # The serial link's path to the bench's hub (SimConsole.write, then
    # HubPipe.write): each frame's bytes, header and all, into a file.
    from sim.bench_board import HubPipe
    from sim.console import SimConsole

    path = "/tmp/mpy_test_sim_heap_console.bin"
    clock = VirtualClock()
    with open(path, "wb") as up, open("/dev/null", "rb") as down:
        pipe = HubPipe(clock, up.fileno(), down.fileno())
        console = SimConsole(clock, None, pipe, 115200)
        line = bytearray(b"~" + b"B" * 200 + b"\n")
        micropython.heap_lock()
        try:
            for _ in range(50):
                console.write(line)
                console.write(line, 1, 100)
        finally:
            micropython.heap_unlock()
        pipe.up.flush()
    with open(path, "rb") as f:
        got = f.read()
    one = b"\x55\x00\x00\x00\xca" + bytes(line) + b"\x55\x00\x00\x00\x64" + bytes(line[1:101])
    assert got == one * 50, (len(got), got[:20])
    assert console.bytes_out == 50 * (202 + 100), console.bytes_out


class _CountingClock(VirtualClock):
    # A virtual clock that counts what the simulation allocates between its
    # enter() and leave() (all of it, and what of it is left to the GC), as
    # ChipClock does for the benchmark, so the firmware's share can be told.
    def __init__(self):
        super().__init__()
        self.sim_alloc = 0
        self.sim_garbage = 0
        self._nest = 0
        self._marks = [0, 0]

    def enter(self):
        self._nest += 1
        if self._nest == 1:
            self._marks[0] = micropython.mem_total()  # type: ignore[attr-defined]
            self._marks[1] = micropython.mem_current()  # type: ignore[attr-defined]

    def leave(self):
        self._nest -= 1
        if self._nest == 0:
            self.sim_alloc += micropython.mem_total() - self._marks[0]  # type: ignore[attr-defined]
            self.sim_garbage += micropython.mem_current() - self._marks[1]  # type: ignore[attr-defined]


def _firmware_bytes(clock, call):
    # (all bytes, bytes left to the GC) the call allocated outside the
    # simulation's enter()/leave().
    gc.collect()
    a0, g0 = clock.sim_alloc, clock.sim_garbage
    t0 = micropython.mem_total()  # type: ignore[attr-defined]
    c0 = micropython.mem_current()  # type: ignore[attr-defined]
    call()
    return (micropython.mem_total() - t0 - (clock.sim_alloc - a0),  # type: ignore[attr-defined]
            micropython.mem_current() - c0 - (clock.sim_garbage - g0))  # type: ignore[attr-defined]


def test_enomem_s_exception_is_the_firmware_s_and_a_notify_charges_it_nothing_else():
    # On the chip gatts_notify is a C function: a notification queued costs
    # the firmware's heap nothing, and an ENOMEM makes an OSError in it
    # (mp_raise_OSError), garbage its collector must collect. Before, the
    # fake raised inside the simulation's bracket (the exception was not
    # counted: ~15 a second at MTU 23 went unseen by the benchmark) and its
    # own Python frame (a try/finally, 168 bytes) was charged as the
    # firmware's at every notification.
    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    sim["ble"] = {"buffers": 2}
    clock = _CountingClock()
    board = SimBoard(sim, clock)
    cfg = config.load()
    cfg["link"] = "ble"
    app = main.App(board, cfg, config.load_key(), config.next_epoch())
    app.start()
    radio = board.radio
    radio.connect(247)
    radio.on_notify = lambda data: None
    ble = app.link._ble
    fragment = bytearray(100)
    conn = radio.conn_handle

    def notify():
        ble.gatts_notify(conn, ble.data_handle, fragment)

    errors = []

    def notify_full():
        try:
            ble.gatts_notify(conn, ble.data_handle, fragment)
        except OSError as e:
            errors.append(e.args[0])

    assert _firmware_bytes(clock, notify) == (0, 0)
    notify()  # the stack's two slots are full now
    total, garbage = _firmware_bytes(clock, notify_full)
    assert errors == [errno.ENOMEM], errors
    assert garbage > 0 and total >= garbage, (total, garbage)


class _Sink:
    # The console's far end: takes the bytes, keeps nothing.
    def write(self, buf, off, n):
        return n


def test_a_bus_transfer_or_a_console_write_charges_the_firmware_nothing():
    # machine.SPI.write_readinto, I2C.readfrom_mem_into and a UART's write
    # are C functions on the chip: no heap frame. The fakes' Python entries
    # allocated theirs (a try/finally: 19-24 words) before enter(), in the
    # firmware's time: ~28 kB/s of the call frames the benchmark charged to
    # the firmware at esp32 speed were these. A fault still reaches the
    # firmware as the OSError it raised.
    from sim.console import SimConsole

    with open("sim.json") as f:
        sim = json.load(f)
    sim["virtual_clock"] = True
    clock = _CountingClock()
    board = SimBoard(sim, clock)
    cfg = config.load()
    cfg["link"] = "serial"
    board.console_in = None
    board.console_out = _Sink()
    app = main.App(board, cfg, config.load_key(), config.next_epoch())
    app.start()
    spi = board.buses["spi"]
    i2c = board.buses["i2c"]
    console = SimConsole(clock, None, _Sink())
    tx = bytearray(4)
    rx = bytearray(4)
    line = bytearray(b"0123456789")
    assert _firmware_bytes(clock, lambda: spi.write_readinto(tx, rx)) == (0, 0)
    assert _firmware_bytes(clock, lambda: i2c.readfrom_mem_into(0x57, 0x00, rx)) == (0, 0)
    assert _firmware_bytes(clock, lambda: console.write(line, 2, 5)) == (0, 0)
    assert console.bytes_out == 5
    i2c.faults.errors = 1
    i2c.faults.errno = errno.ETIMEDOUT
    try:
        i2c.readfrom_mem_into(0x57, 0x00, rx)
    except OSError as e:
        assert e.args[0] == errno.ETIMEDOUT, e
    else:
        raise AssertionError("the injected bus fault was not raised")
    assert clock._nest == 0  # (the simulation's bracket closed all the same)
