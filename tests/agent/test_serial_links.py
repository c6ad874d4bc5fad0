# Serial ports without a board process: the transport keeps the port read
# when the hub is behind, and which ports the discovery picks. The ports are
# real ptys; the listing is injected at the list_ports boundary.
import asyncio
import os
import pty
import threading
import tty
from pathlib import Path

import pytest
from serial.tools.list_ports_common import ListPortInfo

from agent.links import LinkManager, SerialDiscovery, SerialWant
from agent.transports import serial as serial_transport
from agent.transports.serial import SerialTransport
from protocols import link
from tests.waiting import async_wait_for


def test_the_port_is_read_even_when_nobody_takes_the_messages() -> None:
    # An ESP32-S3's native USB blocks the board's writes when the host stops
    # reading: the hub must drain the port whatever its own queues hold. The
    # board side writes 2 MB of frames (100x a pty's buffer) with blocking
    # writes; nobody calls receive(). Every write must complete, the excess
    # be dropped and counted, and the queue keep its bound.
    master, slave = pty.openpty()
    tty.setraw(slave)
    frame = link.StreamFramer().frame(bytes(range(256)) * 3)
    total = 2_000_000 // len(frame)
    done = threading.Event()

    def board() -> None:
        for _ in range(total):
            os.write(master, frame)  # blocks while the port is not read
        done.set()

    async def run() -> SerialTransport:
        t = SerialTransport(os.ttyname(slave))
        await t.open()
        threading.Thread(target=board, daemon=True).start()
        await async_wait_for(done.is_set, 60, "the board's writes to complete (the port read)")
        # What the last writes put in the buffer, read too: the excess counted.
        await async_wait_for(lambda: t.discarded["overflow"] >= total - serial_transport.QUEUE_DEPTH - 100, 30,
                             "the excess dropped and counted", lambda: dict(t.discarded))
        await t.close()
        return t

    try:
        t = asyncio.run(run())
    finally:
        os.close(master)
        os.close(slave)
    assert t._queue.qsize() == serial_transport.QUEUE_DEPTH
    assert t.discarded["overflow"] >= total - serial_transport.QUEUE_DEPTH - 100


def test_a_boards_last_words_after_its_last_frame_are_told() -> None:
    # A board stopped by Ctrl-C prints its stop summary after its last frame, then its REPL's prompt:
    # no 0x00 follows, so the deframer holds that text, and `console` (lines ended by a 0x00) never had
    # it. `pulsebridge-dev sim` waits for the summary before it stops the boards (its last origin
    # checkpoint recorded): it waited out its 30 s bound each time (test_sim_capture_verifies_... 42 s).
    master, slave = pty.openpty()
    tty.setraw(slave)
    frame = link.StreamFramer().frame(b"the last frame")
    summary = b"\r\npulsebridge: stopped after 8 frames built, 0 awaiting an ack, 0 dropped, boot epoch 1\n>>> "

    async def run() -> tuple[bytes, str]:
        t = SerialTransport(os.ttyname(slave))
        await t.open()
        os.write(master, frame + summary)
        got = await asyncio.wait_for(t.receive(), 30)
        await async_wait_for(lambda: "stopped after 8 frames" in t.console_last(), 30, "the summary told",
                             t.console_last)
        await t.close()
        return got, t.console_last()

    try:
        got, last = asyncio.run(run())
    finally:
        os.close(master)
        os.close(slave)
    assert got == b"the last frame"
    assert last == summary.decode()


def _port(device: str, vid: int | None, pid: int | None, serial_number: str | None) -> ListPortInfo:
    p = ListPortInfo(device, skip_link_detection=True)
    p.vid, p.pid, p.serial_number = vid, pid, serial_number
    return p


def test_discovery_picks_ports_by_identity(tmp_path: Path) -> None:
    a = tmp_path / "ttyACM0"
    b = tmp_path / "ttyACM1"
    c = tmp_path / "ttyUSB0"
    for p in (a, b, c):
        p.write_text("")
    by_id = tmp_path / "usb-Silicon_Labs_CP2102-0001-if00"
    by_id.symlink_to(c)
    listed = [_port(str(a), 0x303A, 0x1001, "S3-A"), _port(str(b), 0x303A, 0x1001, "S3-B"),
              _port(str(c), 0x10C4, 0xEA60, "0001"), _port("/dev/ttyS0", None, None, None),
              _port("/dev/ttyUSB3", 0x12D1, 0x1506, "MODEM")]
    manager = LinkManager(processor=None)  # type: ignore[arg-type]
    # No [[serial]] section: every USB serial port of the vendors ESP32 boards carry; not the modem.
    found = SerialDiscovery(manager, [], lambda: listed).candidates()
    assert set(found) == {"usb:303a:1001:S3-A", "usb:303a:1001:S3-B", "usb:10c4:ea60:0001"}
    # One VID:PID: both boards of it.
    found = SerialDiscovery(manager, [SerialWant(usb_vid=0x303A, usb_pid=0x1001)], lambda: listed).candidates()
    assert {k: v[0] for k, v in found.items()} == {"usb:303a:1001:S3-A": str(a), "usb:303a:1001:S3-B": str(b)}
    # A /dev/serial/by-id name: that port, described by what the listing says of its device.
    found = SerialDiscovery(manager, [SerialWant(port=str(by_id))], lambda: listed).candidates()
    assert found == {"port:" + str(by_id): (str(by_id), 115200, "10c4:ea60 0001")}
    # Re-enumerated under another name: the same identity.
    moved = [_port(str(b), 0x303A, 0x1001, "S3-A")]
    assert set(SerialDiscovery(manager, [], lambda: moved).candidates()) == {"usb:303a:1001:S3-A"}
    # A bridge without a serial number (CH340): its name is all there is.
    ch340 = [_port(str(c), 0x1A86, 0x7523, None)]
    assert set(SerialDiscovery(manager, [], lambda: ch340).candidates()) == {"port:" + str(c)}


def test_discovery_lists_the_ports_again_only_once_dev_has_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A USB listing reads sysfs for every port (0.1-0.3 ms each, with seven globs of /dev): taken
    # again only when /dev has changed (a port plugged or unplugged), or LISTING_MAX_AGE_S after the
    # last. Before: at every poll, twice a second.
    from agent import links as links_mod

    listed = [_port("/dev/ttyACM0", 0x303A, 0x1001, "S3-A")]
    calls = []
    stamp = [1]

    def list_ports() -> list[ListPortInfo]:
        calls.append(1)
        return list(listed)

    discovery = SerialDiscovery(LinkManager(processor=None), [], list_ports,  # type: ignore[arg-type]
                                dev_stamp=lambda: stamp[0])
    for _ in range(5):
        assert set(discovery.candidates()) == {"usb:303a:1001:S3-A"}
    assert len(calls) == 1
    listed.append(_port("/dev/ttyACM1", 0x303A, 0x1001, "S3-B"))  # plugged in: /dev changes
    stamp[0] = 2
    assert set(discovery.candidates()) == {"usb:303a:1001:S3-A", "usb:303a:1001:S3-B"}
    assert len(calls) == 2 and discovery.listings == 2
    monkeypatch.setattr(links_mod, "LISTING_MAX_AGE_S", 0.0)  # the listing's age alone: listed again
    discovery.candidates()
    assert len(calls) == 3
    # A lister given without a stamp (a test's, a tool's) is called at every poll, as before.
    plain = SerialDiscovery(LinkManager(processor=None), [], list_ports)  # type: ignore[arg-type]
    plain.candidates()
    plain.candidates()
    assert len(calls) == 5


def test_downlink_lines_go_whole_and_in_order_without_a_thread_while_the_port_takes_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A line the port's buffer takes is written on the loop (an ack: no thread's round trip for
    # each); once the buffer is full (a board that stopped reading), the rest of a line goes through
    # pyserial's bounded write on a thread. Every line arrives whole and in order either way.
    # Before: every line through a thread.
    from agent.transports.base import TransportClosed
    from protocols import hub_link

    master, slave = pty.openpty()
    tty.setraw(slave)
    threaded: list[int] = []
    to_thread = asyncio.to_thread

    async def counting_to_thread(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        threaded.append(1)  # counted, then run as it was
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(serial_transport.asyncio, "to_thread", counting_to_thread)
    messages = [bytes([i % 256]) * 60 for i in range(300)]  # ~25 kB of lines: several pty buffers
    got = bytearray()
    reading = threading.Event()

    def board() -> None:  # reads once told to: until then the port's buffer fills up
        reading.wait(60)
        want = sum(len(hub_link.downlink_line(m)) for m in messages)
        while len(got) < want:
            got.extend(os.read(master, 65536))

    async def run() -> None:
        t = SerialTransport(os.ttyname(slave))
        await t.open()
        try:
            for m in messages[:5]:  # the buffer takes them: no thread
                await t.send(m)
            assert threaded == []
            reader = threading.Thread(target=board, daemon=True)
            reader.start()
            sending = asyncio.ensure_future(asyncio.gather(*(t.send(m) for m in messages[5:])))
            await async_wait_for(lambda: threaded, 30, "a line waiting for the board on a thread")
            reading.set()
            async with asyncio.timeout(60):
                await sending
            await asyncio.to_thread(reader.join, 60)
        except TransportClosed as e:  # pyserial's write_timeout passed before the reader ran
            raise AssertionError("the board read too late for the write timeout: %s" % e) from e
        finally:
            await t.close()

    try:
        asyncio.run(run())
    finally:
        os.close(master)
        os.close(slave)
    assert bytes(got) == b"".join(hub_link.downlink_line(m) for m in messages)
    assert 0 < len(threaded) < len(messages) - 5
