"""The transport interface: what the rest of the agent knows of a link.

A transport carries whole messages (COSE_Mac0 bytes): the link layer
(serial framing, BLE fragments) is its own business. The rest of the agent
never knows whether it holds a serial port, a BLE connection or an
in-memory pair.
"""

from __future__ import annotations

import abc

from agent.errors import PulsebridgeError


class TransportError(PulsebridgeError):
    """Base of transport failures; `link` names the link (port, address), device_id the board if known."""

    def __init__(self, message: str, link: str, device_id: str = "") -> None:
        super().__init__(message, device_id=device_id)
        self.link = link


class TransportClosed(TransportError):
    """The link went away (unplugged, board reset, connection lost)."""


class Transport(abc.ABC):
    name: str  # e.g. "serial:/dev/ttyACM0"
    # Downlink bytes the board's side holds until the board reads them: what
    # the hub may write ahead of it (a firmware push paces itself by it,
    # agent/ota.py). The least of our links unless a transport says more.
    downlink_buffer_bytes: int = 512
    # How long an ack may wait, once its first frame is stored, for later
    # frames to cover in the same message: each downlink write costs the
    # board a wake-up and, over BLE, a new object in its heap. 0: at once.
    ack_linger_s: float = 0.0

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def receive(self) -> bytes:
        """The next uplink message; raises TransportClosed when the link is gone."""

    @abc.abstractmethod
    async def send(self, message: bytes) -> None:
        """Sends one downlink message (ack, time request, command)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # Counters of what the link layer threw away, by reason ("crc", "noise"...).
    discarded: dict[str, int]
