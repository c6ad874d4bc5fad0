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

from agent.errors import PulsebridgeError

OPEN, BATCH, CLOSE = b"O", b"B", b"X"
CONNECTED, ACKED, PROGRESS, FAILED, LOG = b"C", b"A", b"P", b"E", b"L"

# How long a closing connection may take to send its DISCONNECT before its socket is closed.
CLOSE_TIMEOUT_S = 2.0

HEAD = struct.Struct(">cI")  # type, body length
_COUNT = struct.Struct(">I")
# A record's body at most: a batch of MAX_BATCH (config.py) messages of an MQTT
# packet's largest payload would not fit, but a batch of frames' documents
# (a few kB each) does many times over; a longer one is a peer's error.
MAX_BODY = 256 << 20
# A record from the process at most: a failure's reason or a log record (paho's lines are short).
MAX_REPLY = 1 << 20


class LinkError(PulsebridgeError):
    """The MQTT connection failed (the reason as the message); or a record
    broke this module's format."""


def record(kind: bytes, body: bytes = b"") -> bytes:
    """One record: kind (one of the constants above), then body (head() alone for a large
    body, written after it: no copy of it made)."""
    return head(kind, body) + body


def head(kind: bytes, body: bytes) -> bytes:
    """A record's head: its kind and its body's length."""
    return HEAD.pack(kind, len(body))


def batch_body(messages: list[tuple[str, bytes]]) -> bytes:
    """A BATCH record's body: the count of messages (4 bytes), their topics' lengths (2 bytes
    each), their payloads' lengths (4 bytes each), the topics (UTF-8), then the payloads: made
    with a few C calls a batch, not a few per message."""
    topics = [name.encode() for name, _ in messages]
    payloads = [payload for _, payload in messages]
    n = len(messages)
    return b"".join((_COUNT.pack(n), struct.pack(">%dH" % n, *map(len, topics)),
                     struct.pack(">%dI" % n, *map(len, payloads)), *topics, *payloads))


def batch_messages(body: bytes) -> list[tuple[str, bytes]]:
    """batch_body's messages back, in order; LinkError if body is not one."""
    if len(body) < _COUNT.size:
        raise LinkError("a batch of %d bytes has no count" % len(body))
    (n,) = _COUNT.unpack_from(body)
    at = _COUNT.size + 6 * n
    if len(body) < at:
        raise LinkError("a batch of %d messages has %d bytes" % (n, len(body)))
    topic_lengths = struct.unpack_from(">%dH" % n, body, _COUNT.size)
    payload_lengths = struct.unpack_from(">%dI" % n, body, _COUNT.size + 2 * n)
    if at + sum(topic_lengths) + sum(payload_lengths) != len(body):
        raise LinkError("a batch's lengths do not add up to its %d bytes" % len(body))
    topics = []
    for k in topic_lengths:
        try:
            topics.append(body[at:at + k].decode())
        except UnicodeDecodeError:
            raise LinkError("a batch's topic is not UTF-8") from None
        at += k
    out = []
    for name, k in zip(topics, payload_lengths):
        out.append((name, body[at:at + k]))
        at += k
    return out
