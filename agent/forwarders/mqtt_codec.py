"""MQTT 3.1.1 (OASIS standard, 2014), a QoS 1 publisher's side, sans I/O.

The packets a publisher that never subscribes sends (CONNECT, PUBLISH at QoS 1,
PINGREQ, DISCONNECT) as bytes, and a reader of what a broker answers such a
client (CONNACK, PUBACK, PINGRESP): the caller writes the bytes and feeds what
it reads (Answers.feed), h11's way. Nothing here does I/O, keeps time or logs.

Answers to a publisher are fixed-size (CONNACK and PUBACK: 2 bytes after the
fixed header, PINGRESP: none), so the reader holds at most one partial packet
of 4 bytes: any other packet type or length is the broker's error
(BrokerProtocolError), raised before anything of it is buffered.
"""

from __future__ import annotations

import struct

from agent.forwarders.base import DeliveryError

CONNECT, CONNACK, PUBLISH, PUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 12, 13, 14
PINGREQ_PACKET = bytes((PINGREQ << 4, 0))
DISCONNECT_PACKET = bytes((DISCONNECT << 4, 0))
# The largest remaining length MQTT's variable-length integer can say (4 bytes: 256 MB).
MAX_REMAINING_LENGTH = 268_435_455
# A topic and a string field are UTF-8 behind a 16-bit length.
MAX_STRING_BYTES = 65_535
# CONNACK return codes 1-5 (3.2.2.3).
CONNACK_REFUSALS = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                    4: "bad user name or password", 5: "not authorized"}
# What each answer's fixed header must be (type << 4 | flags) and how long its rest is.
_ANSWERS = {(CONNACK << 4): 2, (PUBACK << 4): 2, (PINGRESP << 4): 0}
_U16 = struct.Struct(">H")


class BrokerProtocolError(DeliveryError):
    """The broker sent what MQTT 3.1.1 forbids a broker to send a publisher here."""


def _string(value: str, what: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > MAX_STRING_BYTES or "\0" in value:
        raise ValueError("MQTT %s must be at most %d bytes of UTF-8 without NUL" % (what, MAX_STRING_BYTES))
    return _U16.pack(len(data)) + data


def _remaining_length(n: int) -> bytes:
    # The variable-length integer of 2.2.3: 7 bits a byte, least significant first.
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError("an MQTT packet's remaining length must be 0-%d, not %d" % (MAX_REMAINING_LENGTH, n))
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive_s: int, clean_session: bool = True, username: str | None = None,
                   password: str | None = None) -> bytes:
    """CONNECT (3.1): protocol level 4, no will; a password only with a user name (3.1.2.9)."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError("keepalive_s must be 0-65535, not %d" % keepalive_s)
    if password is not None and username is None:
        raise ValueError("an MQTT 3.1.1 password goes with a user name")
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0) \
        | (0x40 if password is not None else 0)
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + _U16.pack(keepalive_s) + _string(client_id, "client id")
    if username is not None:
        body += _string(username, "user name")
    if password is not None:
        body += _string(password, "password")
    return bytes((CONNECT << 4,)) + _remaining_length(len(body)) + body


def check_topic(name: str) -> bytes:
    """A topic name to publish on (4.7): 1-65535 bytes of UTF-8, no wildcard (+ #), no NUL;
    returns it encoded with its length, as PUBLISH carries it. Raises ValueError."""
    if not name or "+" in name or "#" in name:
        raise ValueError("MQTT topic name %r is empty or holds a wildcard" % name)
    return _string(name, "topic name")


def publish_head(topic: bytes, packet_id: int, payload_bytes: int) -> bytes:
    """The head of a QoS 1 PUBLISH (3.3) of payload_bytes, not retained, first delivery:
    fixed header, topic (check_topic's bytes) and packet id; the payload follows it on the
    wire as it is (no copy of it is made here)."""
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError("an MQTT packet id must be 1-65535, not %d" % packet_id)
    return (bytes((PUBLISH << 4 | 0x02,)) + _remaining_length(len(topic) + 2 + payload_bytes) + topic
            + _U16.pack(packet_id))


class Answers:
    """Reads a broker's answers from the bytes fed in any pieces. feed() returns what
    they completed, in order: ("connack", return code), ("puback", packet id),
    ("pingresp", 0). Raises BrokerProtocolError at the first byte that cannot begin
    or continue one; the reader is then of no further use."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[tuple[str, int]]:
        buf = self._partial + data if self._partial else data
        out: list[tuple[str, int]] = []
        at, end = 0, len(buf)
        while at < end:
            head = buf[at]
            size = _ANSWERS.get(head)
            if size is None:
                raise BrokerProtocolError("MQTT: the broker sent packet type %d (flags %d), not an answer to a "
                                          "publisher" % (head >> 4, head & 0x0F))
            if at + 1 >= end:
                break
            if buf[at + 1] != size:
                raise BrokerProtocolError("MQTT: the broker sent a packet of type %d with %d bytes, not %d"
                                          % (head >> 4, buf[at + 1], size))
            if at + 2 + size > end:
                break
            if head == PUBACK << 4:
                out.append(("puback", (buf[at + 2] << 8) | buf[at + 3]))
            elif head == CONNACK << 4:
                if buf[at + 2] & 0xFE:
                    raise BrokerProtocolError("MQTT: CONNACK flags %#x have reserved bits set" % buf[at + 2])
                out.append(("connack", buf[at + 3]))
            else:
                out.append(("pingresp", 0))
            at += 2 + size
        self._partial = bytes(buf[at:])
        return out
