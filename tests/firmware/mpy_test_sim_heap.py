# The simulation shares the firmware's MicroPython heap (one process), so
# whatever it allocates is garbage the firmware's collector must collect,
# at a pace no board has: a chip's radio stack keeps its buffers and event
# data out of the GC heap. These tests hold the fake radio's data path
# (the central's writes to the control characteristic, notifications
# queued and delivered) to allocating nothing, under
# micropython.heap_lock(); gatts_read's new bytes object is the firmware's
# own allocation (MicroPython's API has no readinto) and stays allowed.
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
