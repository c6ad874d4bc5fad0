"""The software radio: where simulated boards and the hub's bleak backend meet.

No radio is attached to this machine, so the air is a process-local relay
with two Unix sockets in a directory:

- `boards.sock`: each simulated board's fake `bluetooth` module
  (firmware_mpy/sim/fake_bluetooth.py, AirRadio) connects here and plays
  the peripheral: it advertises, publishes its GATT table, notifies, and
  receives connections, MTU exchanges, writes and reads as IRQ events;
- `air.sock`: the hub's bleak backend (agent/transports/softradio.py)
  connects here once per scan and once per connection, as bleak talks to
  BlueZ over D-Bus.

The air adds what a radio does to a link and what tests need to inject:
notifications lost on air (`fragment_loss`), connections dropped (forced
disconnects, supervision timeouts when a board dies), the adapter going
away and coming back (`adapter_down`). It can also record, like a sniffer
next to the patient, every PDU that crosses it (`capture`, JSON lines).

Messages, both sockets: type (1 byte), length (2 bytes, big-endian),
payload. Board side as in fake_bluetooth.py. Central side, central to air:
`s` scan (answered by `l`, a JSON list of advertisers), `c` connect (MTU
wanted, 2 bytes, then the address; answered by `k` MTU + GATT table as
JSON, or `e` reason), `w` write (handle, data), `q` read (handle; answered
by `v` handle + value), `u` subscribe (handle), `x` disconnect. Air to
central: `n` notification (handle, data), `g` link lost (reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.transports.softradio import pack, read_message

# A controller of a Raspberry Pi 4 or 5 negotiates up to 517.
DEFAULT_MTU = 517
_READ_TIMEOUT_S = 2.0


@dataclass
class Faults:
    fragment_loss: float = 0.0  # probability that a notification is lost on air
    disconnect_every_s: float = 0.0  # mean time between forced disconnects (0: none)
    seed: int = 0


@dataclass
class AirStats:
    notifications: int = 0
    notification_bytes: int = 0
    lost: int = 0
    connects: int = 0
    refused: int = 0
    forced_disconnects: int = 0
    adapter_losses: int = 0
    writes: int = 0


@dataclass(eq=False)
class _Peripheral:
    address: str
    writer: asyncio.StreamWriter
    adv: bytes = b""
    resp: bytes = b""
    advertising: bool = False
    services: list[Any] = field(default_factory=list)
    central: _Central | None = None
    reads: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)


@dataclass(eq=False)
class _Central:
    writer: asyncio.StreamWriter
    peripheral: _Peripheral | None = None
    subscribed: set[int] = field(default_factory=set)
    mtu: int = 23


class Air:
    def __init__(self, directory: Path, faults: Faults | None = None, capture: Path | None = None,
                 mtu: int = DEFAULT_MTU) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.board_path = directory / "boards.sock"
        self.central_path = directory / "air.sock"
        self.faults = faults or Faults()
        self.mtu = mtu
        self.stats = AirStats()
        self._capture_path = capture
        self._capture: IO[str] | None = None
        self._rng = random.Random(self.faults.seed)
        self._peripherals: dict[str, _Peripheral] = {}
        self._centrals: set[_Central] = set()
        self._adapter_back = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self.reconnect_times: list[float] = []  # seconds from a link lost to the same board connected again
        self._lost_at: dict[str, float] = {}

    # --- life cycle ---------------------------------------------------------
    def start(self) -> None:
        if self._capture_path is not None:
            self._capture = open(self._capture_path, "w", encoding="ascii")
        self._thread = threading.Thread(target=self._main, name="air", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the software radio did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for path in (self.board_path, self.central_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        boards = await asyncio.start_unix_server(self._board, path=str(self.board_path))
        centrals = await asyncio.start_unix_server(self._central, path=str(self.central_path))
        chaos = asyncio.create_task(self._chaos())
        self._ready.set()
        await self._stopping.wait()
        chaos.cancel()
        for c in list(self._centrals):
            c.writer.close()
        for p in list(self._peripherals.values()):
            p.writer.close()
        boards.close()
        centrals.close()

    def call(self, fn: Callable[[], None]) -> None:
        """Runs fn on the air's loop (faults injected from another thread)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn)

    # --- faults -------------------------------------------------------------
    def force_disconnect(self, address: str | None = None) -> None:
        def run() -> None:
            for p in list(self._peripherals.values()):
                if p.central is not None and (address is None or p.address == address):
                    self.stats.forced_disconnects += 1
                    self._drop_link(p, "connection lost (forced)")
        self.call(run)

    def adapter_down(self, seconds: float) -> None:
        """The hub's adapter vanishes (unplugged, BlueZ restarted) for a while."""
        def run() -> None:
            self.stats.adapter_losses += 1
            self._adapter_back = time.monotonic() + seconds
            for c in list(self._centrals):
                if c.peripheral is not None:
                    self._drop_link(c.peripheral, "adapter removed")
                c.writer.close()
        self.call(run)

    async def _chaos(self) -> None:
        while True:
            every = self.faults.disconnect_every_s
            if every <= 0:
                await asyncio.sleep(0.5)
                continue
            await asyncio.sleep(self._rng.expovariate(1.0 / every))
            linked = [p for p in self._peripherals.values() if p.central is not None]
            if linked:
                self.stats.forced_disconnects += 1
                self._drop_link(self._rng.choice(linked), "connection lost (forced)")

    # --- capture --------------------------------------------------------------
    def _record(self, address: str, pdu: str, direction: str, data: bytes, handle: int = 0) -> None:
        if self._capture is not None:
            self._capture.write(json.dumps({"t": round(time.time(), 6), "address": address, "dir": direction,
                                            "pdu": pdu, "handle": handle, "data": data.hex()}) + "\n")

    # --- links ----------------------------------------------------------------
    def _drop_link(self, p: _Peripheral, reason: str) -> None:
        c = p.central
        if c is None:
            return
        p.central = None
        c.peripheral = None
        self._lost_at[p.address] = time.monotonic()
        for fut in p.reads.values():
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        p.reads.clear()
        with contextlib.suppress(ConnectionError, RuntimeError):
            p.writer.write(pack(b"X"))
        with contextlib.suppress(ConnectionError, RuntimeError):
            c.writer.write(pack(b"g", reason.encode()))
            c.writer.close()

    async def _board(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        p: _Peripheral | None = None
        try:
            while True:
                kind, body = await read_message(reader)
                if kind == b"H":
                    p = _Peripheral(body.decode("ascii"), writer)
                    old = self._peripherals.get(p.address)
                    if old is not None:
                        self._drop_link(old, "supervision timeout")
                    self._peripherals[p.address] = p
                    continue
                if p is None:
                    return
                if kind == b"A":
                    p.advertising = bool(body)
                    if body:
                        p.adv, p.resp = body[1:1 + body[0]], body[1 + body[0]:]
                        self._record(p.address, "adv", "up", p.adv + p.resp)
                elif kind == b"S":
                    p.services = json.loads(body)
                elif kind == b"N":
                    self._notify(p, body)
                elif kind == b"R":
                    fut = p.reads.pop(int.from_bytes(body[:2], "big"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(body[2:])
                elif kind == b"D":
                    self._drop_link(p, "disconnected by the board")
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            if p is not None and self._peripherals.get(p.address) is p:
                self._drop_link(p, "supervision timeout")  # the board died or its radio went silent
                del self._peripherals[p.address]
            writer.close()

    def _notify(self, p: _Peripheral, body: bytes) -> None:
        handle = int.from_bytes(body[:2], "big")
        data = body[2:]
        c = p.central
        if c is None:
            return
        self._record(p.address, "notify", "up", data, handle)
        self.stats.notifications += 1
        self.stats.notification_bytes += len(data)
        if self.faults.fragment_loss and self._rng.random() < self.faults.fragment_loss:
            self.stats.lost += 1
            return
        if handle in c.subscribed:
            c.writer.write(pack(b"n", body))

    async def _central(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._adapter_back:
            writer.close()  # no adapter: the backend cannot reach it
            return
        c = _Central(writer)
        self._centrals.add(c)
        try:
            while True:
                kind, body = await read_message(reader)
                if kind == b"s":
                    found = [{"address": p.address, "adv": p.adv.hex(), "resp": p.resp.hex(), "rssi": -60}
                             for p in self._peripherals.values() if p.advertising and p.central is None]
                    writer.write(pack(b"l", json.dumps(found).encode()))
                elif kind == b"c":
                    self._connect(c, int.from_bytes(body[:2], "big"), body[2:].decode("ascii", "replace"))
                elif c.peripheral is None:
                    writer.write(pack(b"g", b"not connected"))
                elif kind == b"w":
                    self._write(c, c.peripheral, body)
                elif kind == b"q":
                    await self._read(c, c.peripheral, body)
                elif kind == b"u":
                    c.subscribed.add(int.from_bytes(body[:2], "big"))
                elif kind == b"x":
                    self._drop_link(c.peripheral, "disconnected by the hub")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._centrals.discard(c)
            if c.peripheral is not None:
                self._drop_link(c.peripheral, "disconnected by the hub")
            writer.close()

    def _connect(self, c: _Central, mtu: int, address: str) -> None:
        p = self._peripherals.get(address)
        if p is None or not p.advertising or p.central is not None or c.peripheral is not None:
            self.stats.refused += 1
            c.writer.write(pack(b"e", b"device not advertising"))
            return
        mtu = max(23, min(mtu, self.mtu))
        c.peripheral = p
        c.mtu = mtu
        p.central = c
        p.advertising = False  # a connected peripheral stops advertising
        self.stats.connects += 1
        lost = self._lost_at.pop(address, None)
        if lost is not None:
            self.reconnect_times.append(time.monotonic() - lost)
        self._record(address, "connect", "down", mtu.to_bytes(2, "big"))
        p.writer.write(pack(b"C") + pack(b"M", mtu.to_bytes(2, "big")))
        c.writer.write(pack(b"k", mtu.to_bytes(2, "big") + json.dumps(p.services).encode()))

    def _write(self, c: _Central, p: _Peripheral, body: bytes) -> None:
        if len(body) - 2 > c.mtu - 3:
            c.writer.write(pack(b"g", b"write longer than MTU-3"))
            self._drop_link(p, "protocol error")
            return
        self.stats.writes += 1
        self._record(p.address, "write", "down", body[2:], int.from_bytes(body[:2], "big"))
        p.writer.write(pack(b"W", body))

    async def _read(self, c: _Central, p: _Peripheral, body: bytes) -> None:
        handle = int.from_bytes(body[:2], "big")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        p.reads[handle] = fut
        p.writer.write(pack(b"Q", body[:2]))
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                value = await fut
        except (TimeoutError, ConnectionError):
            return
        self._record(p.address, "read", "up", value, handle)
        c.writer.write(pack(b"v", body[:2] + value))

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {"notifications": s.notifications, "notification_bytes": s.notification_bytes, "lost": s.lost,
                "connects": s.connects, "refused": s.refused, "forced_disconnects": s.forced_disconnects,
                "adapter_losses": s.adapter_losses, "writes": s.writes,
                "reconnect_s": sorted(round(t, 3) for t in self.reconnect_times)}
