"""Boards over BLE: find the registered ones, keep each connected.

One scanner, one task per connected board, under the agent's TaskGroup:

- the scanner runs in windows while some registered board is not
  connected; a board is recognised by the pulsebridge service UUID and its
  device id (the advertised name), and only an active registered device is
  connected to: a stranger's board, or a revoked one, is left alone;
- connection attempts go one at a time (controllers handle one pending
  connection), each bounded by a timeout, so a board that hangs in the
  middle of connecting delays the others by that timeout at most;
- each board has its own capped, jittered backoff: a board that keeps
  failing retries less and less often, and never in step with the others;
- the adapter may vanish (unplugged, BlueZ restarted): scanning fails, the
  links drop, and the manager retries the adapter with backoff until it is
  back, then finds and reconnects the boards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bleak import BleakScanner
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from agent.config import BleConfig
from agent.forwarders.base import Backoff
from agent.ingest import Processor
from agent.session import BoardSession, BoardStats
from agent.transports.base import TransportError
from agent.transports.ble import SERVICE_UUID, BleTransport

log = logging.getLogger(__name__)

SCAN_WINDOW_S = 2.0
IDLE_CHECK_S = 1.0
STABLE_LINK_S = 10.0
OUT_OF_RANGE_S = 15.0


@dataclass
class BleLink:
    device_id: str
    address: str = ""
    state: str = "searching"  # searching | connecting | connected | backoff
    stats: BoardStats | None = None
    connects: int = 0
    last_error: str = ""
    next_try: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(0.25, 30.0))
    history: list[BoardStats] = field(default_factory=list)
    transport: BleTransport | None = None
    lost_at: float | None = None
    last_seen: float = 0.0  # when its advertisement was last heard
    reconnect_s: list[float] = field(default_factory=list)

    def describe(self) -> str:
        return "ble:" + self.device_id


class BleManager:
    def __init__(self, cfg: BleConfig, processor: Processor, wanted: Callable[[str], bool],
                 recorder_for: Callable[[str], Callable[[bytes], None] | None] | None = None,
                 time_sync_s: float | None = None) -> None:
        self.cfg = cfg
        self.recorder_for = recorder_for
        self.processor = processor
        self.wanted = wanted  # is this device id an active registered board?
        self.time_sync_s = time_sync_s
        self.links: dict[str, BleLink] = {}
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

    def _connected(self) -> int:
        return sum(1 for lk in self.links.values() if lk.state in ("connecting", "connected"))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._scan_forever()

    async def _scan_forever(self) -> None:
        backoff = Backoff(1.0, 15.0)
        while True:
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
        link = self.links.get(device_id)
        if link is None:
            link = self.links[device_id] = BleLink(device_id)
        link.last_seen = time.monotonic()
        if link.state in ("connecting", "connected") or time.monotonic() < link.next_try:
            return
        if self._connected() >= self.cfg.max_connections or self._tg is None:
            return
        link.address = device.address
        link.state = "connecting"
        self._tg.create_task(self._link(link, device), name="ble:" + device_id)

    async def _link(self, link: BleLink, device: BLEDevice) -> None:
        transport = BleTransport(device, backend=self._client_cls, timeout_s=self.cfg.connect_timeout_s)
        stats = BoardStats("", transport.name)
        link.stats = stats
        recorder = self.recorder_for(link.device_id) if self.recorder_for else None
        session = BoardSession(transport, self.processor, stats, recorder, time_sync_s=self.time_sync_s)
        started = time.monotonic()
        try:
            async with self._connect_lock:  # one connection attempt at a time
                await transport.open()
            link.state = "connected"
            link.connects += 1
            link.transport = transport
            if link.lost_at is not None:
                link.reconnect_s.append(time.monotonic() - link.lost_at)
                del link.reconnect_s[:-50]
            log.info("%s: connected (%s, MTU %d)", link.describe(), device.address, transport.mtu)
            await session.run()  # opens nothing more: the transport is already open
            link.last_error = "link lost"
        except TransportError as e:
            link.last_error = str(e)
            log.info("%s: %s", link.describe(), e)
        except Exception as e:  # one board's failure never takes the others down
            link.last_error = "%s: %s" % (type(e).__name__, e)
            log.exception("%s: session failed", link.describe())
            await transport.close()
        finally:
            link.transport = None
            link.history.append(stats)
            del link.history[:-5]
        if link.state == "connected":
            link.lost_at = time.monotonic()
        if time.monotonic() - started > STABLE_LINK_S:
            link.backoff.reset()
        link.state = "backoff"
        link.next_try = time.monotonic() + link.backoff.next_delay()

    def snapshot(self) -> list[dict[str, Any]]:
        out = []
        for link in self.links.values():
            st = link.stats
            out.append({
                "link": link.describe(), "port": link.address, "connects": link.connects,
                # A BLE board not heard for a while is out of range (or off), not unplugged.
                "state": ("out_of_range" if link.state in ("searching", "backoff")
                          and time.monotonic() - link.last_seen > OUT_OF_RANGE_S else link.state),
                "device_id": (st.device_id if st and st.device_id else link.device_id),
                "frames": st.frames if st else 0, "last_frame_at": st.last_frame_at if st else None,
                "last_error": link.last_error, "rejects": dict(st.rejects) if st else {},
                "clock_drift_ppm": st.clock_drift_ppm if st else None, "clock_jumps": st.clock_jumps if st else 0,
                "mtu": link.transport.mtu if link.transport else None,
                "discarded": dict(link.transport.discarded) if link.transport else {},
            })
        return out
