"""Links to boards, serial and BLE: one manager, one reconnect policy.

Each link (a USB serial port, or a BLE board) has a state (LinkState) and
goes through sessions (agent/session.py). How links are found is the only
thing that differs between kinds: serial ports from the USB listing, polled
(SerialDiscovery, here); BLE boards from advertisements (agent/ble_links.py).
What happens to a link once found is the same for both, and lives here:

    SEARCHING ──found──> CONNECTING ──first delivery──> CONNECTED
        ^                   │                              │
        │   open failed,    │                              │ closed, write failed,
        │   silent, not     v                              v store error, crash
        └───────────── BACKOFF <───────────────────────────┘
                    (capped, jittered; reset after STABLE_LINK_S up)
    CONNECTED ──nothing delivered for stall_s──> STALLED (the session is
    closed and reopened like any other failure; the link reads STALLED until
    it delivers again). A store fault is no stall: frames waiting on the
    store do not count, and a board heard meanwhile is delivering all it can

    A port whose first identify_s bring no authentic message from an active
    registered board is let go and tried again only after RELEASE_RETRY_S
    (doubling to RELEASE_RETRY_MAX_S; BOUND_RETRY_MAX_S where our board
    was), at once when the registry changes or the port is plugged in again:
    the hub never keeps a port that is not one of its boards (a blank board
    being provisioned, a modem). Such a port reads RELEASED (not a
    registered board); one where our board was reads STALLED (nothing
    received: a hung board, or another device under its name).

Every session end is counted per reason (session.END_REASONS).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.forwarders.base import Backoff
from agent.ingest import Processor
from agent.session import (
    END_CLOSED,
    END_NOT_REGISTERED,
    END_SILENT,
    END_STALLED,
    BoardSession,
    BoardStats,
    SessionEnd,
)
from agent.timemap import BoardClocks
from agent.transports.base import Transport

log = logging.getLogger(__name__)

# A link that delivers nothing for this long is stalled: boards send a frame
# per stream every second and a status every 10 s; a commit on a slow SD card
# takes well under a second.
STALL_S = 20.0
# After opening a port, the longest wait for a first authentic message from
# an active registered board before the port is released: a board sends its
# frames every second, and resends what is unacknowledged every 3 s.
IDENTIFY_S = 10.0
# A released port is tried again after this (doubling up to the max).
RELEASE_RETRY_S = 30.0
RELEASE_RETRY_MAX_S = 300.0
# ... at most this when the port was one of our boards' (a hung board that
# comes back without re-enumerating is served again within a minute).
BOUND_RETRY_MAX_S = 60.0
# A link that stayed up this long has its backoff reset.
STABLE_LINK_S = 10.0
# Reconnect backoff: first retry within BACKOFF_BASE_S, at most BACKOFF_CAP_S.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# Looking for ports: done often, so a replugged board is back within a second.
SEARCH_EVERY_S = 0.5
# pyserial's USB listing (seven globs of /dev, some ten sysfs reads a port: 0.6 ms
# and 0.1-0.3 ms a port here, some 1 % of a core at 2 listings a second with 20
# boards plugged in) is taken again only once /dev has changed (a port added or
# removed changes its directory's mtime), or this long after the last listing.
LISTING_MAX_AGE_S = 30.0
# With no [[serial]] section, the USB vendors whose serial ports are looked
# at: the ones ESP32 boards carry (Espressif's native USB, Silicon Labs
# CP210x, WCH CH340/CH9102, FTDI). Other USB serial devices (a modem, a
# GPS, an Arduino that resets when its port opens) are never touched.
AUTO_USB_VIDS = frozenset({0x303A, 0x10C4, 0x1A86, 0x0403})
# Sessions kept per link, for the simulator's summaries.
HISTORY = 5


class LinkState(enum.Enum):
    SEARCHING = "searching"  # not found: not plugged in, not heard
    CONNECTING = "connecting"  # opening, or waiting for its first delivery
    CONNECTED = "connected"  # delivering
    STALLED = "stalled"  # found and opened, but nothing delivered for stall_s
    BACKOFF = "backoff"  # the last session failed: reconnecting soon
    RELEASED = "released"  # a port that is not one of our boards, let go
    OUT_OF_RANGE = "out_of_range"  # BLE: not heard for a while


@dataclass
class Link:
    kind: str  # "serial" | "ble"
    key: str  # what identifies it before its board speaks: USB identity, port path, BLE device id
    device_id: str = ""
    address: str = ""  # port path, BLE address
    state: LinkState = LinkState.SEARCHING
    stats: BoardStats | None = None
    transport: Transport | None = None
    connects: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    backoff: Backoff = field(default_factory=lambda: Backoff(BACKOFF_BASE_S, BACKOFF_CAP_S))
    release_backoff: Backoff = field(default_factory=lambda: Backoff(RELEASE_RETRY_S, RELEASE_RETRY_MAX_S))
    next_try: float = 0.0
    history: list[BoardStats] = field(default_factory=list)
    lost_at: float | None = None
    reconnect_s: list[float] = field(default_factory=list)
    last_seen: float = 0.0  # monotonic: the board last heard (its port listed, its advertisement, a message)
    last_frame_at: float | None = None  # the last frame of an earlier session (UTC s): kept for the status
    firmware: str = ""  # as the board's last hello in an earlier session said: kept for the status
    identity_fault: str = ""  # as the board's last status in an earlier session said (BoardStats.identity_fault)
    update: dict[str, Any] | None = None  # its firmware update's last state in an earlier session (the same)
    task: asyncio.Task[None] | None = None
    usb: str = ""  # "vid:pid serial" as listed, for the status
    device: str = ""  # the device node the port resolves to: a change is a re-enumeration

    def describe(self) -> str:
        return "%s:%s" % (self.kind, self.device_id or self.address or self.key)

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()


class LinkManager:
    """The links and the one policy that opens, watches and reopens them.

    processor judges and stores messages (an active registered board is one
    whose messages it accepts). stall_s and identify_s are the watchdog
    bounds (see agent/session.py).
    """

    def __init__(self, processor: Processor, time_sync_s: float | None = None,
                 recorder_for: Callable[[str], Callable[[bytes], None] | None] | None = None) -> None:
        self.processor = processor
        self.time_sync_s = time_sync_s
        self.recorder_for = recorder_for
        self.stall_s = STALL_S
        self.identify_s = IDENTIFY_S
        self.release_retry_s = RELEASE_RETRY_S
        self.release_retry_max_s = RELEASE_RETRY_MAX_S
        self.bound_retry_max_s = BOUND_RETRY_MAX_S
        self.links: dict[str, Link] = {}
        self.ends: Counter[str] = Counter()  # every link's, by reason
        self.clocks = BoardClocks()  # board ticks to UTC, kept across a board's sessions
        self.ota_run_dir: Path | None = None  # where `pulsebridge ota push` spools bundles (agent/ota.py)

    def link(self, kind: str, key: str) -> Link:
        lk = self.links.get(key)
        if lk is None:
            lk = self.links[key] = Link(kind, key)
            lk.release_backoff = Backoff(self.release_retry_s, self.release_retry_max_s)
        return lk

    async def attempt(self, link: Link, transport: Transport, identify: bool) -> SessionEnd:
        """One session on link over transport (opened here, unless it already
        is), to its end; then the link is put in its next state and its next
        try scheduled. identify: release it unless an active registered board
        speaks within identify_s."""
        link.transport = transport
        link.address = link.address or transport.name.partition(":")[2]
        if link.stats is not None and link.stats.last_frame_at is not None:
            link.last_frame_at = link.stats.last_frame_at  # a board silent since reads "last frame N s ago", not never
        if link.stats is not None and link.stats.firmware:
            link.firmware = link.stats.firmware
        if link.stats is not None and link.stats.unique_id:
            link.identity_fault = link.stats.identity_fault
        if link.stats is not None and link.stats.update is not None:
            link.update = link.stats.update
        stats = BoardStats("", transport.name)  # whose it is, the board says (nothing is written to it before)
        link.stats = stats
        if link.state is not LinkState.STALLED:
            link.state = LinkState.CONNECTING
        recorder = self.recorder_for(link.device_id) if self.recorder_for and link.device_id else None
        opened = time.monotonic()

        def on_open() -> None:
            nonlocal opened
            opened = time.monotonic()
            link.connects += 1

        def on_progress() -> None:
            if stats.device_id and stats.device_id != link.device_id:
                self._bind(link, stats.device_id)
            if link.state is not LinkState.CONNECTED:
                link.state = LinkState.CONNECTED
                if link.lost_at is not None:
                    link.reconnect_s.append(time.monotonic() - link.lost_at)
                    del link.reconnect_s[:-50]
                    link.lost_at = None
                log.info("%s: delivering", link.describe())

        session = BoardSession(transport, self.processor, stats, recorder, time_sync_s=self.time_sync_s,
                               stall_s=self.stall_s, identify_s=self.identify_s if identify else None,
                               on_open=on_open, on_progress=on_progress, clocks=self.clocks,
                               ota_run_dir=self.ota_run_dir)
        try:
            end = await session.run()
        except asyncio.CancelledError:  # the agent stops, or its discovery task restarts
            link.state, link.next_try = LinkState.BACKOFF, 0.0
            raise
        finally:
            link.transport = None
            link.history.append(stats)
            del link.history[:-HISTORY]
            if session.heard_at is not None:  # heard over the link (a connected BLE board does not advertise)
                link.last_seen = max(link.last_seen, session.heard_at)
        self.ended(link, end, opened)
        return end

    def ended(self, link: Link, end: SessionEnd, opened: float | None = None) -> None:
        """The policy after a session (or a connection attempt) ended."""
        now = time.monotonic()
        link.ends[end.reason] += 1
        self.ends[end.reason] += 1
        link.last_error = end.detail
        was_up = link.state is LinkState.CONNECTED
        if was_up and link.lost_at is None:
            link.lost_at = now
        if opened is not None and now - opened > STABLE_LINK_S and end.reason != END_STALLED:
            link.backoff.reset()
        if end.reason == END_NOT_REGISTERED or (end.reason == END_SILENT and not link.device_id):
            # Not one of our boards: let the port go, for a good while.
            link.state = LinkState.RELEASED
            link.next_try = now + link.release_backoff.next_delay()
            log.warning("%s: released: %s", link.describe(), end.detail)
            return
        if end.reason == END_SILENT:
            # Where our board was, nothing speaks (hung, or another device under its name): the port
            # is let go all the same, and looked at again sooner.
            link.state = LinkState.STALLED
            link.next_try = now + min(link.release_backoff.next_delay(), self.bound_retry_max_s)
            log.warning("%s: port let go: %s", link.describe(), end.detail)
            return
        link.release_backoff.reset()
        if end.reason == END_STALLED or (link.state is LinkState.STALLED and not was_up):
            link.state = LinkState.STALLED
        else:
            link.state = LinkState.BACKOFF
        link.next_try = now + link.backoff.next_delay()
        level = logging.INFO if end.reason == END_CLOSED else logging.WARNING
        log.log(level, "%s: session ended (%s): %s", link.describe(), end.reason, end.detail)

    def _bind(self, link: Link, device_id: str) -> None:
        # The board on this link is known: what was known of it under another
        # name (a re-enumerated port) joins this link.
        for key, other in list(self.links.items()):
            if other is not link and other.kind == link.kind and other.device_id == device_id and not other.active:
                link.connects += other.connects
                link.ends.update(other.ends)
                link.history[:0] = other.history
                del link.history[:-HISTORY]
                link.lost_at = link.lost_at or other.lost_at
                del self.links[key]
        link.device_id = device_id

    def registry_changed(self) -> None:
        """A released port may now be a registered board: try it again soon."""
        for link in self.links.values():
            if link.state is LinkState.RELEASED:
                link.release_backoff.reset()
                link.next_try = 0.0

    def snapshot(self, out_of_range_s: float | None = None) -> list[dict[str, Any]]:
        out = []
        now = time.monotonic()
        for link in self.links.values():
            st = link.stats
            state = link.state
            if (out_of_range_s is not None and link.kind == "ble" and state in (LinkState.SEARCHING, LinkState.BACKOFF)
                    and now - link.last_seen > out_of_range_s):
                state = LinkState.OUT_OF_RANGE  # a BLE board not heard for a while is out of range, or off
            tr = link.transport
            out.append({
                "link": link.describe(), "kind": link.kind, "port": link.address, "usb": link.usb,
                "state": state.value, "connects": link.connects,
                "device_id": link.device_id or (st.device_id if st else ""),
                "firmware": st.firmware if st and st.firmware else link.firmware,  # as its last hello said
                "update": st.update if st and st.update else link.update,  # agent/ota.py
                "frames": st.frames if st else 0,
                # frames heard but not taken while a store fault held the session's pipeline full
                "held_back": st.held_back if st else 0,
                # frames the board dropped unacknowledged (its outbox full: the oldest go first)
                "board_dropped": st.board_dropped if st else 0,
                "last_frame_at": st.last_frame_at if st and st.last_frame_at else link.last_frame_at,
                "last_error": link.last_error, "ends": dict(link.ends),
                "retry_in_s": round(max(0.0, link.next_try - now), 1) if state in (
                    LinkState.BACKOFF, LinkState.STALLED, LinkState.RELEASED) and not link.active else None,
                "rejects": dict(st.rejects) if st else {},
                "not_registered": sorted(st.rejected_ids) if st else [],
                "board_errors": dict(st.board_errors) if st else {},
                "last_board_error": st.last_board_error if st else "",
                # The chip's id is not the one provisioned ("" when it is, or is not known).
                "identity": st.identity_fault if st and st.unique_id else link.identity_fault,
                "clock_drift_ppm": st.clock_drift_ppm if st else None, "clock_jumps": st.clock_jumps if st else 0,
                "mtu": getattr(tr, "mtu", None) if tr is not None else None,
                "discarded": dict(tr.discarded) if tr is not None else {},
            })
        return out


# ---- serial ports, found by identity -------------------------------------------------------


class PortInfo(Protocol):
    """What serial.tools.list_ports gives for a port (ListPortInfo)."""

    device: str
    vid: int | None
    pid: int | None
    serial_number: str | None


ListPorts = Callable[[], Iterable[PortInfo]]
MakeTransport = Callable[[str, int], Transport]


@dataclass(frozen=True)
class SerialWant:
    """A [[serial]] section: a port path (a /dev/serial/by-id name is best), or a USB VID (and PID)."""

    port: str | None = None
    usb_vid: int | None = None
    usb_pid: int | None = None
    baudrate: int = 115200


def _list_ports() -> Iterable[PortInfo]:
    import serial.tools.list_ports

    return serial.tools.list_ports.comports()


def _dev_stamp() -> object:
    # Changes when a device node is added to or removed from /dev (a USB serial port plugged or unplugged).
    return os.stat("/dev").st_mtime_ns


def _serial_transport(port: str, baudrate: int) -> Transport:
    from agent.transports.serial import SerialTransport

    return SerialTransport(port, baudrate)


def usb_identity(p: PortInfo) -> str:
    """A port's identity across re-enumeration: its USB serial number when
    it has one (CP2102, ESP32-S3 native USB: yes; CH340: no), else its name."""
    if p.serial_number and p.vid is not None:
        return "usb:%04x:%04x:%s" % (p.vid, p.pid or 0, p.serial_number)
    return "port:" + p.device


class SerialDiscovery:
    """Polls the USB listing and opens each candidate port once its link is
    due. With no [[serial]] section every USB serial port of a vendor that
    ESP32 boards carry (AUTO_USB_VIDS) is a candidate; otherwise those the
    sections name (path, or VID and PID: several boards
    of one VID:PID are all served). Every port is held only once an active
    registered board speaks on it (LinkManager's identify_s)."""

    def __init__(self, manager: LinkManager, wants: list[SerialWant], list_ports: ListPorts = _list_ports,
                 make_transport: MakeTransport = _serial_transport,
                 dev_stamp: Callable[[], object] | None = None) -> None:
        """dev_stamp: what changes when the ports listed may have (then, or LISTING_MAX_AGE_S
        after the last listing, list_ports is called again); None: /dev's mtime if list_ports is
        pyserial's, else none (every poll lists)."""
        self.manager = manager
        self.wants = wants
        self.list_ports = list_ports
        self.make_transport = make_transport
        self.dev_stamp = dev_stamp
        self.polls = 0  # polls made: the loop's heartbeat
        self.listings = 0  # list_ports() calls
        self._listed: tuple[object, float, list[PortInfo]] | None = None  # (stamp, monotonic s, ports)

    def _listing(self) -> list[PortInfo]:
        stamp_of = self.dev_stamp or (_dev_stamp if self.list_ports is _list_ports else None)
        if stamp_of is None:
            self.listings += 1
            return list(self.list_ports())
        stamp, now = stamp_of(), time.monotonic()  # read before listing: a change after it is seen next
        if self._listed is None or self._listed[0] != stamp or now - self._listed[1] >= LISTING_MAX_AGE_S:
            self.listings += 1
            self._listed = (stamp, now, list(self.list_ports()))
        return self._listed[2]

    def candidates(self) -> dict[str, tuple[str, int, str]]:
        """{link key: (path to open, baud rate, USB description)} of what is plugged in now."""
        listed = self._listing()
        found: dict[str, tuple[str, int, str]] = {}

        def usb(p: PortInfo) -> str:
            if p.vid is None:
                return ""
            return "%04x:%04x%s" % (p.vid, p.pid or 0, " " + p.serial_number if p.serial_number else "")

        if not self.wants:
            for p in listed:
                if p.vid in AUTO_USB_VIDS:
                    found[usb_identity(p)] = (p.device, 115200, usb(p))
            return found
        for w in self.wants:
            if w.port:
                if os.path.exists(w.port):
                    real = os.path.realpath(w.port)
                    desc = next((usb(p) for p in listed if os.path.realpath(p.device) == real), "")
                    found["port:" + w.port] = (w.port, w.baudrate, desc)
                continue
            for p in listed:
                if p.vid == w.usb_vid and (w.usb_pid is None or p.pid == w.usb_pid):
                    found.setdefault(usb_identity(p), (p.device, w.baudrate, usb(p)))
        return found

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                self.poll(tg)
                await asyncio.sleep(SEARCH_EVERY_S * random.uniform(0.8, 1.2))

    def poll(self, tg: asyncio.TaskGroup) -> None:
        self.polls += 1
        now = time.monotonic()
        try:
            found = self.candidates()
        except OSError as e:  # the listing itself failed (sysfs): try again at the next poll
            log.warning("serial ports cannot be listed: %s", e)
            return
        for key, (path, baudrate, desc) in found.items():
            link = self.manager.link("serial", key)
            link.last_seen = now
            if link.active:
                continue
            device = os.path.realpath(path)
            if link.state is LinkState.SEARCHING or device != link.device:
                link.next_try = 0.0  # plugged in again, or another device under this name: worth a look at once
                link.release_backoff.reset()
            link.address, link.usb, link.device = path, desc, device
            if now >= link.next_try:
                link.task = tg.create_task(self._attempt(link, path, baudrate), name="serial:" + path)
        configured = {"port:" + w.port for w in self.wants if w.port}
        for key in configured - found.keys():
            self.manager.link("serial", key).address = key[5:]  # shown, as not plugged in, from the start
        for key, link in list(self.manager.links.items()):
            if link.kind != "serial" or key in found or link.active:
                continue
            if link.device_id or key in configured:
                link.state = LinkState.SEARCHING  # unplugged
            else:
                del self.manager.links[key]  # a port that was not ours, gone

    async def _attempt(self, link: Link, path: str, baudrate: int) -> None:
        await self.manager.attempt(link, self.make_transport(path, baudrate), identify=True)
