"""Boards over Bluetooth Low Energy, through bleak.

One BleTransport is one connection to one board: connect (bounded by a
timeout), subscribe to the data characteristic, reassemble its fragments
into messages (protocols.hub_link.Reassembler), and write downlink messages as
text lines to the control characteristic, cut to what one write without
response may carry (MTU-3). The backend is BlueZ on the hub; off hardware,
the software radio's (agent/transports/softradio.py).

A notification cannot be refused: when the agent falls behind, messages
beyond the queue are dropped and counted (`overflow`). Nothing is lost by
that: the board keeps every frame until an ack covers it, and resends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bleak import BleakClient
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError

from agent.transports.base import Transport, TransportClosed, TransportError
from protocols import hub_link, link

log = logging.getLogger(__name__)

SERVICE_UUID = "7b3e0001-6c1a-4f5e-9d35-2f0e5a1c9b10"
DATA_UUID = "7b3e0002-6c1a-4f5e-9d35-2f0e5a1c9b10"
CONTROL_UUID = "7b3e0003-6c1a-4f5e-9d35-2f0e5a1c9b10"
QUEUE_DEPTH = 64
CONNECT_TIMEOUT_S = 15.0
WRITE_TIMEOUT_S = 5.0


class BleTransport(Transport):
    # The board's control characteristic buffers 512 bytes of writes between
    # two reads (firmware_mpy/app/link_ble.py _CONTROL_BUFFER); beyond, the stack drops them.
    downlink_buffer_bytes = 512
    # A MicroPython board reads each write to its control characteristic as a
    # new bytes object (gatts_read has no read-into): ~140 bytes of garbage
    # per ack in a heap with a few kB to spare. Acks wait up to 1 s to cover
    # the next frames too (a board builds two or three a second): about half
    # the writes. Well under the board's 3 s resend (retransmit_ms), with the
    # store's commit before it.
    ack_linger_s = 1.0

    def __init__(self, device: BLEDevice | str, backend: type[BaseBleakClient] | None = None,
                 timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.device = device
        self.address = device.address if isinstance(device, BLEDevice) else device
        self.name = "ble:" + self.address
        self.backend = backend
        self.timeout_s = timeout_s
        self.discarded: dict[str, int] = {}
        self.mtu = link.MIN_MTU
        self.fragments = 0
        self.fragment_bytes = 0
        self._client: BleakClient | None = None
        self._rx = hub_link.Reassembler()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH + 1)
        self._closed = False

    async def open(self) -> None:
        if self._client is not None:
            return  # already open (a manager may open it before the session runs)
        client = BleakClient(self.device, disconnected_callback=self._on_disconnect, timeout=self.timeout_s,
                             backend=self.backend)
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.connect()
                self.mtu = client.mtu_size
                await client.start_notify(DATA_UUID, self._on_fragment)
        except (BleakError, TimeoutError, OSError) as e:
            await self._quietly_disconnect(client)
            raise TransportError("cannot connect to %s: %s" % (self.address, e or "timeout"), self.name) from e
        self._client = client

    @staticmethod
    async def _quietly_disconnect(client: BleakClient) -> None:
        try:
            async with asyncio.timeout(5):
                await client.disconnect()
        except (BleakError, TimeoutError, OSError) as e:
            log.debug("disconnect after a failed connect: %s", e)

    def _on_disconnect(self, client: Any) -> None:
        self._closed = True
        self._put(None)

    def _put(self, msg: bytes | None) -> None:
        if msg is not None and self._queue.qsize() >= QUEUE_DEPTH:
            self.discarded["overflow"] = self.discarded.get("overflow", 0) + 1
            return
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:  # the end-of-link marker still gets its place
            pass

    def _on_fragment(self, _char: Any, data: bytearray) -> None:
        self.fragments += 1
        self.fragment_bytes += len(data)
        self._rx.feed(data)
        while (ev := self._rx.next_event()) is not None:
            if isinstance(ev, link.Frame):
                self._put(ev.data)
            else:
                self.discarded[ev.reason] = self.discarded.get(ev.reason, 0) + 1

    async def receive(self) -> bytes:
        if self._client is None:
            raise TransportClosed("not open", self.name)
        if self._closed and self._queue.empty():
            raise TransportClosed("%s: link lost" % self.address, self.name)
        msg = await self._queue.get()
        if msg is None:
            raise TransportClosed("%s: link lost" % self.address, self.name)
        return msg

    async def send(self, message: bytes) -> None:
        client = self._client
        if client is None or self._closed:
            raise TransportClosed("not connected", self.name)
        line = hub_link.downlink_line(message)
        char = client.services.get_characteristic(CONTROL_UUID)
        if char is None:
            raise TransportError("%s has no control characteristic" % self.address, self.name)
        step = max(20, char.max_write_without_response_size)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                for i in range(0, len(line), step):
                    await client.write_gatt_char(char, line[i:i + step], response=False)
        except (BleakError, TimeoutError, OSError) as e:
            raise TransportClosed("write to %s failed: %s" % (self.address, e or "timeout"), self.name) from e

    async def read(self, uuid: str) -> bytes:
        """A characteristic's value (device information, battery)."""
        if self._client is None:
            raise TransportClosed("not open", self.name)
        try:
            return bytes(await self._client.read_gatt_char(uuid))
        except (BleakError, TimeoutError) as e:
            raise TransportError("read of %s failed: %s" % (uuid, e), self.name) from e

    async def close(self) -> None:
        client, self._client = self._client, None
        self._closed = True
        if client is not None:
            await self._quietly_disconnect(client)
