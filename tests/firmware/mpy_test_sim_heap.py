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
