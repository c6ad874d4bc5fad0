"""Boards over BLE: find the registered ones, hand them to the link manager.

Finding boards is this module's; what happens once one is found (sessions,
watchdog, backoff, states) is the link manager's, as for serial ports
(agent/links.py). One scanner, one task per connected board:

- the scanner runs in windows while some registered board is not
  connected; a board is recognised by the pulsebridge service UUID and its
  device id (the advertised name), and only an active registered device is
  connected to: a stranger's board, or a revoked one, is left alone;
- connection attempts go one at a time (controllers handle one pending
  connection), each bounded by a timeout, so a board that hangs in the
  middle of connecting delays the others by that timeout at most;
- each board has its own capped, jittered backoff (the link manager's): a
  board that keeps failing retries less and less often, and never in step
  with the others;
- the adapter may vanish (unplugged, BlueZ restarted): scanning fails, the
  links drop, and the manager retries the adapter with backoff until it is
  back, then finds and reconnects the boards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from bleak import BleakScanner
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from agent.config import BleConfig
from agent.forwarders.base import Backoff
from agent.ingest import Processor
from agent.links import Link, LinkManager, LinkState
from agent.session import END_OPEN_FAILED, SessionEnd
from agent.transports.base import TransportError
from agent.transports.ble import SERVICE_UUID, BleTransport

log = logging.getLogger(__name__)

SCAN_WINDOW_S = 2.0
IDLE_CHECK_S = 1.0
OUT_OF_RANGE_S = 15.0


class BleManager:
    def __init__(self, cfg: BleConfig, processor: Processor, wanted: Callable[[str], bool],
                 recorder_for: Callable[[str], Callable[[bytes], None] | None] | None = None,
                 time_sync_s: float | None = None, manager: LinkManager | None = None) -> None:
        self.cfg = cfg
        self.wanted = wanted  # is this device id an active registered board?
        self.manager = manager or LinkManager(processor, time_sync_s, recorder_for)
        self.scans = 0  # scan windows run: the loop's heartbeat
        self.adapter = "unknown"  # up | down
        self.adapter_error = ""
        self.adapter_losses = 0
        self._client_cls: type[BaseBleakClient] | None = None
        self._scanner_cls: type[BaseBleakScanner] | None = None
        self._scanner_args: dict[str, Any] = {}
        if cfg.air:
            from agent.transports import softradio

            self._client_cls, self._scanner_cls = softradio.backends(cfg.air)
        else:
            self._scanner_args = {"bluez": {"adapter": cfg.adapter}}
        self._connect_lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None

    @property
    def links(self) -> dict[str, Link]:
        """The BLE links, by device id."""
        return {lk.device_id: lk for lk in self.manager.links.values() if lk.kind == "ble"}

    def _connected(self) -> int:
        return sum(1 for lk in self.manager.links.values() if lk.kind == "ble" and lk.active)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._scan_forever()

    async def _scan_forever(self) -> None:
        backoff = Backoff(1.0, 15.0)
        while True:
            self.scans += 1
            if not self._need_scan():
                await asyncio.sleep(IDLE_CHECK_S)
                continue
            try:
                scanner = BleakScanner(self._seen, service_uuids=[SERVICE_UUID], backend=self._scanner_cls,
                                       **self._scanner_args)
                await scanner.start()
                try:
                    if self.adapter != "up":
                        log.info("BLE adapter up: scanning for boards")
                    self.adapter, self.adapter_error = "up", ""
                    backoff.reset()
                    await asyncio.sleep(SCAN_WINDOW_S)
                finally:
                    await scanner.stop()
            except Exception as e:  # no adapter, BlueZ gone or restarting, D-Bus errors:
                # whatever the stack raises, the hub keeps its other links and retries
                if not isinstance(e, (BleakError, OSError)):
                    log.warning("BLE scanner: unexpected %s", type(e).__name__)
                if self.adapter != "down":
                    self.adapter_losses += 1
                    log.warning("BLE adapter unavailable: %s", e)
                self.adapter, self.adapter_error = "down", str(e)
                await asyncio.sleep(backoff.next_delay())

    def _need_scan(self) -> bool:
        # Scan unless every board seen is connected and nothing else is wanted:
        # a board never seen yet may appear at any time, so an idle hub with no
        # connected board scans; one at its connection limit does not.
        return self._connected() < self.cfg.max_connections

    def _seen(self, device: BLEDevice, adv: AdvertisementData) -> None:
        device_id = adv.local_name or ""
        if not device_id or not self.wanted(device_id):
            return
        link = self.manager.link("ble", "ble:" + device_id)
        link.device_id = device_id
        link.last_seen = time.monotonic()
        if link.active or time.monotonic() < link.next_try:
            return
        if self._connected() >= self.cfg.max_connections or self._tg is None:
            return
        link.address = device.address
        link.task = self._tg.create_task(self._link(link, device), name="ble:" + device_id)

    async def _link(self, link: Link, device: BLEDevice) -> None:
        transport = BleTransport(device, backend=self._client_cls, timeout_s=self.cfg.connect_timeout_s)
        if link.state is not LinkState.STALLED:
            link.state = LinkState.CONNECTING
        try:
            async with self._connect_lock:  # one connection attempt at a time
                await transport.open()
        except TransportError as e:
            self.manager.ended(link, SessionEnd(END_OPEN_FAILED, str(e)))
            return
        log.info("%s: connected (%s, MTU %d)", link.describe(), device.address, transport.mtu)
        await self.manager.attempt(link, transport, identify=False)  # the transport is open already

    def snapshot(self) -> list[dict[str, Any]]:
        return [b for b in self.manager.snapshot(OUT_OF_RANGE_S) if b["kind"] == "ble"]
