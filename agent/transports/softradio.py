"""A bleak backend for the software radio (agent/dev/sim/air.py).

bleak lets a program choose its backend: `BleakClient(device,
backend=...)`, `BleakScanner(..., backend=...)`. On a Raspberry Pi the
agent uses bleak's BlueZ backend; off hardware it uses this one, so the
same BleTransport code (scan, connect, MTU, subscribe, write, link lost)
runs against simulated boards running the unmodified firmware. Like a real
backend, it parses advertising data itself and raises BleakError when the
adapter (here, the air's socket) is not there.

`backends(path)` returns the client and scanner classes bound to one air.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from typing import Any, ClassVar

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError
from bleak.uuids import normalize_uuid_16, normalize_uuid_str

log = logging.getLogger(__name__)

# The air's messages, both sockets (agent/dev/sim/air.py): type (1 byte), length (2 bytes, big-endian), payload.
_HEADER = struct.Struct(">cH")

SCAN_EVERY_S = 0.25
_WANTED_MTU = 517
_PROPERTIES = ((0x02, "read"), (0x04, "write-without-response"), (0x08, "write"), (0x10, "notify"),
               (0x20, "indicate"))


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(_HEADER.size)
    kind, n = _HEADER.unpack(head)
    return kind, await reader.readexactly(n)


def pack(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def _uuid(value: int | str) -> str:
    return normalize_uuid_16(value) if isinstance(value, int) else normalize_uuid_str(value)


def parse_advertisement(adv: bytes, resp: bytes, rssi: int) -> AdvertisementData:
    """AD structures (Core Specification Supplement, part A) to bleak's AdvertisementData."""
    name = None
    uuids: list[str] = []
    manufacturer: dict[int, bytes] = {}
    service_data: dict[str, bytes] = {}
    tx_power = None
    for data in (adv, resp):
        i = 0
        while i < len(data):
            n = data[i]
            if n == 0 or i + 1 + n > len(data):
                break
            kind, value = data[i + 1], bytes(data[i + 2:i + 1 + n])
            i += 1 + n
            if kind in (0x08, 0x09):
                name = value.decode("utf-8", "replace")
            elif kind in (0x02, 0x03):
                uuids += [normalize_uuid_16(int.from_bytes(value[j:j + 2], "little")) for j in range(0, len(value), 2)]
            elif kind in (0x06, 0x07):
                for j in range(0, len(value) - 15, 16):
                    h = value[j:j + 16][::-1].hex()
                    uuids.append("%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:]))
            elif kind == 0x0A and value:
                tx_power = int.from_bytes(value[:1], "big", signed=True)
            elif kind == 0xFF and len(value) >= 2:
                manufacturer[int.from_bytes(value[:2], "little")] = value[2:]
            elif kind == 0x16 and len(value) >= 2:
                service_data[normalize_uuid_16(int.from_bytes(value[:2], "little"))] = value[2:]
    return AdvertisementData(local_name=name, manufacturer_data=manufacturer, service_data=service_data,
                             service_uuids=uuids, tx_power=tx_power, rssi=rssi, platform_data=())


async def _open(path: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError) as e:
        raise BleakError("software radio adapter not available (%s): %s" % (path, e)) from e


class SoftRadioScanner(BaseBleakScanner):
    air_path: ClassVar[str] = ""

    def __init__(self, detection_callback: AdvertisementDataCallback | None, service_uuids: list[str] | None,
                 scanning_mode: str = "active", **kwargs: Any) -> None:
        super().__init__(detection_callback, service_uuids)
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lost = ""

    async def start(self) -> None:
        self.seen_devices = {}
        self._lost = ""
        reader, writer = await _open(self.air_path, 5.0)
        self._writer = writer
        self._task = asyncio.create_task(self._scan(reader, writer), name="softradio-scan")

    async def _scan(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(pack(b"s"))
                kind, body = await read_message(reader)
                if kind == b"l":
                    for d in json.loads(body):
                        adv = parse_advertisement(bytes.fromhex(d["adv"]), bytes.fromhex(d["resp"]), d["rssi"])
                        device = self.create_or_update_device(d["address"], d["address"], adv.local_name, None, adv)
                        if self.is_allowed_uuid(adv.service_uuids):
                            self.call_detection_callbacks(device, adv)
                await asyncio.sleep(SCAN_EVERY_S)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            log.info("software radio: scanning stopped, adapter gone (%s)", e)
            self._lost = str(e) or "connection closed"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lost:  # as BlueZ reports an adapter removed under a scan
            raise BleakError("software radio adapter lost while scanning: " + self._lost)


class SoftRadioClient(BaseBleakClient):
    air_path: ClassVar[str] = ""

    def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=kwargs.get("disconnected_callback"),
                         timeout=kwargs.get("timeout", 10.0))
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._mtu = 23
        self._notify: dict[int, NotifyCallback] = {}
        self._reads: dict[int, asyncio.Future[bytes]] = {}
        self._closing = False

    @property
    def name(self) -> str:
        return self.address

    @property
    def mtu_size(self) -> int:
        return self._mtu

    @property
    def is_connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        reader, writer = await _open(self.air_path, self._timeout)
        writer.write(pack(b"c", _WANTED_MTU.to_bytes(2, "big") + self.address.encode("ascii")))
        try:
            async with asyncio.timeout(self._timeout):
                kind, body = await read_message(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            writer.close()
            raise BleakError("%s: connection failed: %s" % (self.address, e or "timeout")) from e
        if kind != b"k":
            writer.close()
            raise BleakError("%s: connection failed: %s" % (self.address, body.decode("ascii", "replace")))
        self._mtu = int.from_bytes(body[:2], "big")
        self.services = self._gatt_table(json.loads(body[2:]))
        self._reader, self._writer = reader, writer
        self._task = asyncio.create_task(self._receive(reader), name="softradio-" + self.address)

    def _gatt_table(self, table: list[Any]) -> BleakGATTServiceCollection:
        services = BleakGATTServiceCollection()
        for svc_uuid, chars in table:
            first = chars[0][2] if chars else 1
            svc = BleakGATTService(None, first - 1, _uuid(svc_uuid))
            services.add_service(svc)
            for char_uuid, flags, handle in chars:
                props = [name for bit, name in _PROPERTIES if flags & bit]
                char = BleakGATTCharacteristic(None, handle, _uuid(char_uuid), props,  # type: ignore[arg-type]
                                               lambda: self._mtu - 3, svc)
                services.add_characteristic(char)
        return services

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        reason = "link lost"
        try:
            while True:
                kind, body = await read_message(reader)
                if kind == b"n":
                    cb = self._notify.get(int.from_bytes(body[:2], "big"))
                    if cb is not None:
                        cb(bytearray(body[2:]))
                elif kind == b"v":
                    fut = self._reads.pop(int.from_bytes(body[:2], "big"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(body[2:])
                elif kind == b"g":
                    reason = body.decode("ascii", "replace")
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        for fut in self._reads.values():
            if not fut.done():
                fut.set_exception(BleakError("%s: %s" % (self.address, reason)))
        self._reads.clear()
        if self._writer is not None:
            self._writer.close()
        if not self._closing and self._disconnected_callback is not None:
            log.debug("%s: %s", self.address, reason)
            self._disconnected_callback()

    def _send(self, kind: bytes, payload: bytes) -> None:
        if not self.is_connected or self._writer is None:
            raise BleakError("%s: not connected" % self.address)
        self._writer.write(pack(kind, payload))

    async def disconnect(self) -> None:
        self._closing = True
        if self.is_connected and self._writer is not None:
            with contextlib.suppress(ConnectionError):
                self._writer.write(pack(b"x"))
                await self._writer.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise BleakError("the software radio does not pair: the protocol encrypts samples itself")

    async def unpair(self) -> None:
        raise BleakError("the software radio does not pair")

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False,
                             **kwargs: Any) -> bytearray:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._reads[characteristic.handle] = fut
        self._send(b"q", characteristic.handle.to_bytes(2, "big"))
        async with asyncio.timeout(self._timeout):
            return bytearray(await fut)

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False,
                                   **kwargs: Any) -> bytearray:
        raise BleakError("the software radio has no descriptors to read")

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any, response: bool) -> None:
        data = bytes(data)
        if len(data) > self._mtu - 3:
            raise BleakError("write of %d bytes exceeds MTU %d - 3" % (len(data), self._mtu))
        self._send(b"w", characteristic.handle.to_bytes(2, "big") + data)
        if response and self._writer is not None:
            await self._writer.drain()

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        raise BleakError("the software radio has no descriptors to write")

    async def start_notify(self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback,
                           **kwargs: Any) -> None:
        self._notify[characteristic.handle] = callback
        self._send(b"u", characteristic.handle.to_bytes(2, "big"))

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        self._notify.pop(characteristic.handle, None)


def backends(air_path: str) -> tuple[type[SoftRadioClient], type[SoftRadioScanner]]:
    """Client and scanner classes for bleak's `backend=` argument, bound to one air."""
    client: type[SoftRadioClient] = type("SoftRadioClient", (SoftRadioClient,), {"air_path": air_path})
    scanner: type[SoftRadioScanner] = type("SoftRadioScanner", (SoftRadioScanner,), {"air_path": air_path})
    return client, scanner

