"""Boards over BLE, end to end through the software radio.

Simulated boards run the unmodified firmware under micropython; their
`bluetooth` module is the fake one, on the software radio (agent/dev/sim/air.py);
the agent reaches them through bleak with the software radio's backend. The
radio loses notifications, drops connections and loses its adapter; one
registered board misbehaves. Every ack that crossed the air (read back from
the radio's capture, as a sniffer would record it) must be at the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.audit import AuditLog
from agent.config import AgentConfig, BleConfig
from agent.dev.sim import boards
from agent.dev.sim.air import Air, Faults
from agent.dev.sim.runner import SimulatedBoard
from agent.forwarders.webhook import WebhookConfig
from agent.registry import Registry
from agent.supervisor import Agent
from agent.transports import softradio
from agent.transports.ble import SERVICE_UUID
from protocols import cipher, cose, hub_link, link, messages
from protocols.errors import RemoteProtocolError
from tests.agent.harness import ThreadedBackend, pki_for, running
from tests.waiting import async_wait_for


def capture_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def acked_over_air(records: list[dict[str, Any]], keys: dict[str, bytes],
                   addresses: dict[str, str]) -> set[tuple[str, int, int]]:
    """Every (device, epoch, seq) that an authentic ack written over the air covered."""
    out: set[tuple[str, int, int]] = set()
    deframers = {addr: hub_link.LineQueue() for addr in addresses}
    for r in records:
        if r["pdu"] != "write" or r["address"] not in deframers:
            continue
        dev = addresses[r["address"]]
        d = deframers[r["address"]]
        d.feed(bytes.fromhex(r["data"]))
        while (raw := d.next_message()) is not None:
            msg = cose.parse(raw)
            cose.MacKey(keys[dev], dev.encode(), cose.AAD_DOWNLINK).verify(msg)
            m = messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)
            if isinstance(m, messages.Ack):
                for a, b in m.ranges:
                    out.update((dev, m.epoch, s) for s in range(a, b + 1))
    return out


def uplink_over_air(records: list[dict[str, Any]], address: str) -> list[bytes]:
    """The whole messages a sniffer reassembles from one board's notifications."""
    r = hub_link.Reassembler()
    out = []
    for rec in records:
        if rec["pdu"] == "notify" and rec["address"] == address:
            r.feed(bytes.fromhex(rec["data"]))
            while (ev := r.next_event()) is not None:
                if isinstance(ev, link.Frame):
                    out.append(ev.data)
    return out


class GarbageBoard:
    """A fake peripheral (named as such) with a registered board's name that
    floods its hub with random fragments: the misbehaving board."""

    def __init__(self, air: Air, device_id: str, table: list[Any]) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(air.board_path))
        self.device_id = device_id
        self.stop = threading.Event()
        self.connected = threading.Event()
        name = device_id.encode()
        adv = b"\x02\x01\x06" + bytes((17, 0x07)) + bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1]
        resp = bytes((len(name) + 1, 0x09)) + name
        self._send(b"H", boards.ble_address(device_id).encode())
        self._send(b"S", json.dumps(table).encode())
        self.advert = bytes((len(adv),)) + adv + resp
        self._send(b"A", self.advert)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, kind: bytes, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">cH", kind, len(payload)) + payload)

    def _run(self) -> None:
        rng = random.Random(7)
        self.sock.settimeout(0.005)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
                if b"X\x00\x00" in data:  # the hub left: advertise again
                    self.connected.clear()
                    self._send(b"A", self.advert)
                if data.startswith(b"C\x00\x00"):
                    self.connected.set()
            except TimeoutError:
                pass
            except OSError:
                return
            if self.connected.is_set():
                for _ in range(5):
                    junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
                    try:
                        self._send(b"N", struct.pack(">H", 2) + junk)
                    except OSError:
                        return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def _registry(cfg: AgentConfig, keys: dict[str, bytes]) -> None:
    reg = Registry(cfg.registry_path, AuditLog(cfg.audit_path))
    for dev, key in keys.items():
        reg.add(dev, label="test board", key=key, actor="test")
    reg.close()


def _frames(agent: Agent, device_id: str) -> int:
    """Frames verified from one board over all its connections so far."""
    assert agent.ble is not None
    lk = agent.ble.links.get(device_id)
    if lk is None:
        return 0
    live = lk.stats.frames if lk.stats is not None and lk.transport is not None else 0
    return sum(st.frames for st in lk.history) + live


def test_three_boards_over_a_lossy_radio_lose_nothing_acknowledged(micropython: str, sim_cache: Path,
                                                                   tmp_path: Path) -> None:
    capture = tmp_path / "air.jsonl"
    air = Air(tmp_path / "air", Faults(fragment_loss=0.04, disconnect_every_s=3.0, seed=3), capture=capture)
    air.start()
    pki = pki_for(tmp_path)
    specs = [boards.BoardSpec("pb-ble%02d" % (i + 1), seed=i + 1, link="ble", air=str(air.board_path))
             for i in range(3)]
    keys = {s.device_id: s.key for s in specs}
    keys["pb-bad"] = bytes(range(32))
    backend = ThreadedBackend(tmp_path, keys, pki)
    sims = [SimulatedBoard(s, tmp_path / "boards" / s.device_id, sim_cache, micropython) for s in specs]
    cfg = AgentConfig(hub_id="test-hub", data_dir=tmp_path / "data", log_dir=tmp_path / "log",
                      run_dir=tmp_path / "run", time_sync_every_s=5.0,
                      ble=BleConfig(air=str(air.central_path), connect_timeout_s=5.0),
                      backends=[WebhookConfig(name="local", type="webhook",
                                              url="https://127.0.0.1:%d/ingest" % backend.port,
                                              ca_file=pki.ca_cert)])
    _registry(cfg, keys)
    garbage = None
    try:
        for sim in sims:
            sim.start()
        table = None

        async def scenario() -> dict[str, Any]:
            nonlocal garbage, table
            async with running(Agent(cfg)) as agent:
                assert agent.ble is not None
                ble = agent.ble
                await async_wait_for(lambda: all(_frames(agent, s.device_id) >= 3 for s in specs), 60,
                                     "all boards streaming", lambda: {d: _frames(agent, d) for d in keys})
                # The misbehaving board joins, with the real service table.
                client_cls, _ = softradio.backends(str(air.central_path))
                table = [[SERVICE_UUID, [["7b3e0002-6c1a-4f5e-9d35-2f0e5a1c9b10", 0x12, 2],
                                         ["7b3e0003-6c1a-4f5e-9d35-2f0e5a1c9b10", 0x0C, 4]]]]
                garbage = GarbageBoard(air, "pb-bad", table)
                await async_wait_for(lambda: "pb-bad" in ble.links and ble.links["pb-bad"].connects >= 1, 30,
                                     "pb-bad connected")
                before = {s.device_id: _frames(agent, s.device_id) for s in specs}
                await async_wait_for(lambda: all(_frames(agent, d) >= before[d] + 4 for d in before), 60,
                                     "the others streaming on (4 more frames each) with pb-bad connected",
                                     lambda: (before, {d: _frames(agent, d) for d in before}))
                # The adapter goes away (BlueZ restart) and comes back.
                losses = ble.adapter_losses
                air.adapter_down(5.0)
                await async_wait_for(lambda: ble.adapter_losses > losses, 30, "the adapter seen down",
                                     lambda: (ble.adapter, ble.adapter_error))
                await async_wait_for(lambda: ble.adapter == "up", 30, "the adapter back",
                                     lambda: (ble.adapter, ble.adapter_error))
                after_loss = {s.device_id: _frames(agent, s.device_id) for s in specs}
                await async_wait_for(lambda: all(_frames(agent, d) >= after_loss[d] + 4 for d in after_loss), 40,
                            "boards streaming again after the adapter came back")
                snap = agent.snapshot()
                garbage.close()
                for sim in sims:
                    await asyncio.to_thread(sim.stop)
                await async_wait_for(lambda: all(b["backlog"] == 0 for b in agent.snapshot()["backends"]), 60,
                                     "backlog drained", lambda: agent.snapshot()["backends"])
            snap["integrity"] = agent.store.integrity_check()
            snap["reconnects"] = sorted(t for lk in ble.links.values() for t in lk.reconnect_s)
            return snap

        snap = asyncio.run(scenario())
    finally:
        if garbage is not None:
            garbage.close()
        for sim in sims:
            sim.stop()
        air.stop()
    stats = air.snapshot()
    records = capture_records(capture)
    addresses = {boards.ble_address(s.device_id): s.device_id for s in specs}
    acked = acked_over_air(records, keys, addresses)
    at_backend = backend.keys()
    summary = backend.summary()
    backend.close()
    assert acked, "no ack crossed the air"
    missing = {a for a in acked if "%s:%d:%d" % a not in at_backend}
    assert not missing, "acknowledged over the air, absent at the backend: %s" % sorted(missing)[:10]
    assert summary["invalid"] == 0 and snap["integrity"] == "ok"
    # The faults really happened.
    assert stats["lost"] > 0 and stats["forced_disconnects"] > 0 and stats["adapter_losses"] == 1
    assert snap["ble_adapter"]["losses"] >= 1
    bad = [b for b in snap["boards"] if b["device_id"] == "pb-bad"]
    assert bad and bad[0]["frames"] == 0
    assert len(snap["reconnects"]) >= 3
    print("\nBLE: %d notifications (%d lost on air), %d forced disconnects, reconnect median %.2f s, "
          "%d acked frames all at the backend" % (stats["notifications"], stats["lost"],
                                                    stats["forced_disconnects"],
                                                    snap["reconnects"][len(snap["reconnects"]) // 2], len(acked)))


def test_advertisement_parsing_matches_the_firmware_advert() -> None:
    # The advert as link_ble builds it: flags, the 128-bit service UUID, the name in the scan response.
    adv = b"\x02\x01\x06" + bytes((17, 0x07)) + bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1]
    resp = b"\x0a\x09pb-3fa2c1"
    data = softradio.parse_advertisement(adv, resp, -50)
    assert data.service_uuids == [SERVICE_UUID]
    assert data.local_name == "pb-3fa2c1"
    # Truncated or zero-length structures end the parse, they do not raise.
    assert softradio.parse_advertisement(b"\x05\x09ab", b"\x00", -50).local_name is None


@pytest.mark.parametrize("mtu", [23, 185, 517])
def test_mtu_is_negotiated_down_to_what_the_air_allows(micropython: str, sim_cache: Path,
                                                       tmp_path: Path, mtu: int) -> None:
    capture = tmp_path / "air.jsonl"
    air = Air(tmp_path / "air", mtu=mtu, capture=capture)
    air.start()
    spec = boards.BoardSpec("pb-mtu", link="ble", air=str(air.board_path), ppg=False)
    sim = SimulatedBoard(spec, tmp_path / "b", sim_cache, micropython)
    sim.start()
    try:
        async def run() -> tuple[int, int]:
            from bleak import BleakScanner

            from agent.transports.ble import BleTransport

            client_cls, scanner_cls = softradio.backends(str(air.central_path))
            dev = await BleakScanner.find_device_by_name("pb-mtu", timeout=10, backend=scanner_cls)
            assert dev is not None
            t = BleTransport(dev, backend=client_cls)
            await t.open()
            frames = 0
            try:
                while frames < 2:  # a hello, then two 512-sample ECG frames
                    msg = await asyncio.wait_for(t.receive(), 10)
                    frames += cbor2.loads(cose.parse(msg).payload)[0] == 1  # type 1: a sample frame
            finally:
                await t.close()
            return t.mtu, t.fragments

        got_mtu, fragments = asyncio.run(run())
    finally:
        sim.stop()
        air.stop()
    assert got_mtu == mtu
    sizes = [len(r["data"]) // 2 for r in capture_records(capture) if r["pdu"] == "notify"]
    assert sizes and max(sizes) <= mtu - 3
    # A frame of about 650 bytes takes 1 + 650 // (MTU - 4) fragments or so: the MTU is used, not just 23.
    assert max(sizes) == mtu - 3 if mtu < 517 else max(sizes) > 185


def _entropy_bits(data: bytes) -> float:
    import math
    from collections import Counter

    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in Counter(data).values())


def test_a_sniffer_capture_holds_no_readable_sample(micropython: str, sim_cache: Path, tmp_path: Path) -> None:
    capture = tmp_path / "air.jsonl"
    air = Air(tmp_path / "air", capture=capture)
    air.start()
    spec = boards.BoardSpec("pb-sniff", link="ble", air=str(air.board_path))
    sim = SimulatedBoard(spec, tmp_path / "b", sim_cache, micropython)
    sim.start()
    try:
        async def listen() -> None:
            from bleak import BleakScanner

            from agent.transports.ble import BleTransport
            from protocols import hub

            client_cls, scanner_cls = softradio.backends(str(air.central_path))
            dev = await BleakScanner.find_device_by_name("pb-sniff", timeout=10, backend=scanner_cls)
            assert dev is not None
            t = BleTransport(dev, backend=client_cls)
            await t.open()
            h = hub.Hub()
            h.add_device(spec.device_id, spec.key)
            frames = 0
            try:
                while frames < 8:
                    r = h.receive(await asyncio.wait_for(t.receive(), 10))
                    if isinstance(r.message, messages.SampleFrame):
                        frames += 1
                        for a in h.ack(spec.device_id, r.message.epoch, [r.message.seq]):
                            await t.send(a)
            finally:
                await t.close()

        asyncio.run(listen())
    finally:
        sim.stop()
        air.stop()
    records = capture_records(capture)
    on_air = b"".join(bytes.fromhex(r["data"]) for r in records)
    opener = cipher.SampleCipher(spec.key)
    sealed_bytes = bytearray()
    clear_bytes = bytearray()
    frames = 0
    for raw in uplink_over_air(records, boards.ble_address(spec.device_id)):
        payload = cose.parse(raw).payload
        try:
            sealed = messages.decode_payload(payload, messages.UPLINK_TYPES, decode_samples=False)
        except RemoteProtocolError:
            continue
        if not isinstance(sealed, messages.SampleFrame):
            continue
        frames += 1
        clear = messages.decode_payload(payload, messages.UPLINK_TYPES, decode_samples=False, opener=opener)
        assert isinstance(clear, messages.SampleFrame)
        for enc, dec in zip(sealed.channels, clear.channels):
            enc_b, dec_b = bytes(enc), bytes(dec)  # type: ignore[call-overload]
            assert enc_b != dec_b
            sealed_bytes += enc_b
            clear_bytes += dec_b
            # No run of 8 plaintext sample bytes is anywhere in what the sniffer heard.
            for i in range(0, len(dec_b) - 8, 8):
                assert dec_b[i:i + 8] not in on_air
        # With the key, the samples are the board's real signal (not noise passing for one).
        assert len(messages.decode_payload(payload, messages.UPLINK_TYPES, opener=opener).channels[0]) == clear.count
    assert frames >= 8
    # Ciphertext looks like noise; the delta-varint plaintext does not.
    assert _entropy_bits(bytes(sealed_bytes)) > 7.8 > 7.0 > _entropy_bits(bytes(clear_bytes))


def test_only_active_registered_boards_are_connected(tmp_path: Path) -> None:
    from agent.ble_links import BleManager
    from agent.ingest import Volatile
    from protocols import hub

    air = Air(tmp_path / "air")
    air.start()
    table = [[SERVICE_UUID, [["7b3e0002-6c1a-4f5e-9d35-2f0e5a1c9b10", 0x12, 2],
                             ["7b3e0003-6c1a-4f5e-9d35-2f0e5a1c9b10", 0x0C, 4]]]]
    fakes = [GarbageBoard(air, name, table) for name in ("pb-known", "pb-stranger", "pb-revoked")]
    h = hub.Hub()
    h.add_device("pb-known", bytes(32))
    h.add_device("pb-revoked", bytes(32))
    h.remove_device("pb-revoked")  # what the ingestor does when the registry revokes it
    manager = BleManager(BleConfig(air=str(air.central_path), connect_timeout_s=3), Volatile(h), h.has_device)

    async def run() -> None:
        task = asyncio.create_task(manager.run())
        await async_wait_for(lambda: "pb-known" in manager.links and manager.links["pb-known"].connects >= 1, 10,
                    "the registered board connected")
        # Two whole scan windows more with all three advertising: time for a wrong connection.
        scans = manager.scans
        await async_wait_for(lambda: manager.scans >= scans + 3, 30, "two more scan windows",
                             lambda: manager.scans - scans)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    finally:
        for f in fakes:
            f.close()
        air.stop()
    assert set(manager.links) == {"pb-known"}
    # Nobody ever connected to the stranger or the revoked board: every connection was to pb-known.
    assert air.stats.connects == manager.links["pb-known"].connects >= 1


def test_a_ble_board_that_delivers_nothing_is_stalled_never_connected(tmp_path: Path) -> None:
    # A registered board's name, a connection that holds, and nothing
    # authentic on it (the fake peripheral floods random fragments): the
    # link manager's watchdog ends each session as stalled and reconnects;
    # the board never reads "connected".
    air = Air(tmp_path / "air", Faults(seed=1))
    air.start()
    cfg = AgentConfig(hub_id="test-hub", data_dir=tmp_path / "data", log_dir=tmp_path / "log",
                      run_dir=tmp_path / "run", ble=BleConfig(air=str(air.central_path), connect_timeout_s=5.0))
    _registry(cfg, {"pb-bad": bytes(range(32))})
    table = [[SERVICE_UUID, [["7b3e0002-6c1a-4f5e-9d35-2f0e5a1c9b10", 0x12, 2],
                             ["7b3e0003-6c1a-4f5e-9d35-2f0e5a1c9b10", 0x0C, 4]]]]
    garbage = GarbageBoard(air, "pb-bad", table)
    states: set[str] = set()
    try:
        async def scenario() -> dict[str, Any]:
            agent = Agent(cfg)
            agent.links.stall_s = 2.0
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            end = time.monotonic() + 40
            link: dict[str, Any] = {}
            while time.monotonic() < end:
                link = next((b for b in agent.snapshot()["boards"] if b["device_id"] == "pb-bad"), {})
                states.add(link.get("state", ""))
                if link.get("ends", {}).get("stalled", 0) >= 2:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
            return link

        link = asyncio.run(scenario())
    finally:
        garbage.close()
        air.stop()
    assert link["ends"].get("stalled", 0) >= 2 and link["connects"] >= 2, link
    assert "stalled" in states and "connected" not in states, states
    assert link["frames"] == 0
