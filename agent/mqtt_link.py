"""The records the agent and its MQTT client's process (agent/mqtt_process.py) exchange.

The MQTT client (paho-mqtt) runs in a process of its own, one per connection to
a broker, so that its work (a PUBLISH packet built and sent per message, three
reads and a PUBACK packet decoded per message, TLS) runs beside the agent's
event loop instead of on it. They talk over the process's stdin and stdout in
records: a type byte, the body's length (4 bytes, big-endian), the body.

    agent -> process   OPEN   the connection's settings (JSON), first and once
                       BATCH  messages to publish at QoS 1 (batch_body)
                       CLOSE  send DISCONNECT and end
    process -> agent   CONNECTED  the broker's CONNACK accepted the connection
                       ACKED      every message of the last batch was PUBACKed
                       PROGRESS   PUBACKs of the batch in flight keep coming
                       FAILED     the connection is over (the reason, UTF-8): the
                                  batch in flight, if any, is not acknowledged;
                                  the process ends
                       LOG        a log record (JSON: logger, level, message)

One batch is in flight at a time. The process ends when its stdin ends (the
agent gone), so it never outlives the agent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

OPEN, BATCH, CLOSE = b"O", b"B", b"X"
CONNECTED, ACKED, PROGRESS, FAILED, LOG = b"C", b"A", b"P", b"E", b"L"

# How long a closing connection may take to send its DISCONNECT before its socket is closed.
CLOSE_TIMEOUT_S = 2.0

HEAD = struct.Struct(">cI")  # type, body length
_TOPIC = struct.Struct(">H")
_PAYLOAD = struct.Struct(">I")
# A record's body at most: a batch of MAX_BATCH (config.py) messages of an MQTT
# packet's largest payload would not fit, but a batch of frames' documents
# (a few kB each) does many times over; a longer one is a peer's error.
MAX_BODY = 256 << 20


class LinkError(Exception):
    """The MQTT connection failed (the reason as the message); or a record
    broke this module's format."""


def record(kind: bytes, body: bytes = b"") -> bytes:
    """One record: kind (one of the constants above), then body."""
    return HEAD.pack(kind, len(body)) + body


def batch_body(messages: list[tuple[str, bytes]]) -> bytes:
    """A BATCH record's body: each message as its topic (2-byte length, UTF-8)
    then its payload (4-byte length)."""
    parts: list[bytes] = []
    for name, payload in messages:
        t = name.encode()
        parts += (_TOPIC.pack(len(t)), t, _PAYLOAD.pack(len(payload)), payload)
    return b"".join(parts)


def batch_messages(body: bytes) -> Iterator[tuple[str, bytes]]:
    """batch_body's messages back, in order; LinkError if body is not one."""
    at, end = 0, len(body)
    while at < end:
        if at + _TOPIC.size > end:
            raise LinkError("a batch's message is cut short")
        (n,) = _TOPIC.unpack_from(body, at)
        at += _TOPIC.size
        if at + n + _PAYLOAD.size > end:
            raise LinkError("a batch's topic is cut short")
        name = body[at:at + n].decode()
        at += n
        (m,) = _PAYLOAD.unpack_from(body, at)
        at += _PAYLOAD.size
        if at + m > end:
            raise LinkError("a batch's payload is cut short")
        yield name, body[at:at + m]
        at += m
