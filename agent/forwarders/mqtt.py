"""MQTT 3.1.1 over TLS, QoS 1: a row leaves the outbox on PUBACK.

Topics: <topic_prefix>/<hub_id>/<device_id>/<stream> for sample frames
(stream: ecg, ecg-ad8232, ppg), and .../<device_id>/vitals, .../alerts
and .../gap for the hub's derived vitals, alert events and gap records.
The payload is the JSON document of agent.forwarders.base:
the original COSE frame (base64), its decoded form, and the idempotency key
"<device>:<epoch>:<seq>" a subscriber uses to drop the duplicates that
QoS 1 allows. payload = "cbor" sends the same document in CBOR (RFC 8949)
instead, for consumers that want it binary: each channel's samples as an
RFC 8746 typed array (tag 78: int32, little-endian), the COSE frame as a
byte string; hub-made records are the same maps as in JSON.

The client is the agent's own (agent/forwarders/mqtt_codec.py: MQTT 3.1.1's
packets of a QoS 1 publisher, sans I/O) on an asyncio protocol over TLS, on
the agent's event loop. A batch of rows is published at once, its PUBLISH
packets written together (one write of the transport, the payloads not
copied into a buffer of ours), and awaited as one: a single future, resolved
by the batch's last PUBACK. A connection that drops fails the batch at once;
a batch with no PUBACK for timeout_s fails and its connection is closed.
Either way none of its rows is marked forwarded: they are published again
on a new connection. (paho-mqtt, used before, made a message object, a
message-info object with its threading.Condition, and at each PUBACK a
Properties and a ReasonCode object, and sent each PUBLISH in a TLS record
and a system call of its own: some 60 % of a backlog's drain.)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import cbor2

from agent.config import BackendConfig, Table
from agent.forwarders import mqtt_codec as codec
from agent.forwarders.base import DeliveryError, Forwarder, encode_json, read_secret, tls_context
from agent.record import SAMPLE_DTYPE
from agent.store import Row

log = logging.getLogger(__name__)

PAYLOADS = ("json", "cbor")
# RFC 8746: a typed array of signed 32-bit integers, little-endian.
TAG_INT32_LE = 78
# How long a closing connection may take to send its DISCONNECT before its socket is closed.
CLOSE_TIMEOUT_S = 2.0
# How often the keepalive looks at the connection; the keepalive (s) told the broker in CONNECT.
MISC_PERIOD_S = 1.0
KEEPALIVE_S = 30
# Packet ids are 16 bits: a batch in flight at most this many messages (config.py bounds batch lower).
MAX_IN_FLIGHT = 0xFFFF
# Encoded topics a connection keeps (a few per board), cleared past this many.
MAX_TOPICS_KEPT = 4096


@dataclass
class MqttConfig(BackendConfig):
    """username and password_file (mode 0600) if the broker wants them; topic_prefix
    begins every topic."""

    SCHEMES: ClassVar[tuple[str, str]] = ("mqtts", "mqtt")

    # Each message is a PUBLISH of its own, so a batch bounds only what is in flight and what
    # a failure sends again; per batch go one round trip and one commit (the rows marked
    # forwarded). A backlog drained 5x faster with 500 than with 50 (`bench agent`).
    batch: int = 500
    username: str | None = None
    password_file: Path | None = None
    topic_prefix: str = "pulsebridge"
    payload: str = "json"  # json | cbor

    def take_own(self, table: Table) -> None:
        self.payload = table.choice("payload", PAYLOADS, self.payload)
        self.username = table.text("username")
        self.password_file = table.path("password_file")
        self.topic_prefix = table.text("topic_prefix", self.topic_prefix) or ""
        if not self.topic_prefix or any(c in self.topic_prefix for c in "+#\0") or self.topic_prefix.startswith("/"):
            raise table.error("topic_prefix", "must be a non-empty MQTT topic without + # or a leading /, not %r"
                              % self.topic_prefix)


def topic(prefix: str, hub_id: str, doc: dict[str, object]) -> str:
    leaves = {"gap": "gap", "vital": "vitals", "alert": "alerts", "origin_checkpoint": "origin"}
    leaf = leaves.get(str(doc["type"])) or str(doc["stream"])
    return "%s/%s/%s/%s" % (prefix, hub_id, doc["device_id"], leaf)


class Connection(asyncio.Protocol):
    """One connection to the broker: an asyncio protocol on the running event loop.

    open() connects (TCP, TLS, CONNECT) and awaits the CONNACK; publish() sends a
    batch and returns once every message of it is PUBACKed, raising DeliveryError
    (.backend) when the connection drops, the broker breaks the protocol, or no
    PUBACK comes for timeout_s; close() ends it. A connection that failed is not
    used again (`usable` is False)."""

    def __init__(self, backend: str, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.down_reason = ""  # why the connection ended ("": it has not)
        self._transport: asyncio.Transport | None = None
        self._answers = codec.Answers()
        self._connack: asyncio.Future[int] = self.loop.create_future()  # its return code
        self._connack.add_done_callback(lambda f: f.cancelled() or f.exception())  # lost before it: retrieved
        self._down = asyncio.Event()
        self._closing = False
        self._keepalive_task: asyncio.Task[None] | None = None
        self._awaited: set[int] = set()  # the packet ids of the batch in flight without their PUBACK
        self._acked: asyncio.Future[None] | None = None  # the batch's: set at its last PUBACK
        self._progress_at = 0.0  # loop time of the last PUBACK
        self._last_id = 0  # the last packet id given (1-65535, then round again)
        self._sent_at = 0.0  # loop time of the last write (keepalive: a PINGREQ after KEEPALIVE_S idle)
        self._ping_at: float | None = None  # loop time of the PINGREQ awaiting its PINGRESP
        self._topics: dict[str, bytes] = {}  # topics as PUBLISH carries them (a few per board)

    @property
    def usable(self) -> bool:
        return (self._connack.done() and not self._connack.exception() and not self._down.is_set()
                and not self._closing)

    def _error(self, what: str) -> DeliveryError:
        return DeliveryError("MQTT: %s" % what, backend=self.backend)

    async def open(self, host: str, port: int, ctx: ssl.SSLContext | None, connect: bytes) -> None:
        """Connects (TLS with ctx; None: plaintext), sends connect (a CONNECT packet) and awaits its CONNACK."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.loop.create_connection(lambda: self, host, port, ssl=ctx,
                                                  server_hostname=host if ctx is not None else None)
        except TimeoutError:
            raise self._error("cannot connect to %s:%d in %.1f s" % (host, port, self.timeout_s)) from None
        except (OSError, ssl.SSLError) as e:
            raise self._error("cannot connect to %s:%d: %s" % (host, port, e)) from e
        self._write(connect)
        try:
            async with asyncio.timeout(self.timeout_s):
                code = await asyncio.shield(self._connack)
        except TimeoutError:
            raise self._error("no CONNACK from %s:%d in %.1f s" % (host, port, self.timeout_s)) from None
        if code != 0:
            raise self._error("%s:%d refused the connection: %s" % (
                host, port, codec.CONNACK_REFUSALS.get(code, "return code %d" % code)))
        self._keepalive_task = self.loop.create_task(self._keepalive(), name="mqtt-keepalive-%s" % self.backend)

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        if not self.usable or self._transport is None:
            raise self._error("not connected: %s" % (self.down_reason or "closing"))
        if len(messages) > MAX_IN_FLIGHT:
            raise ValueError("a batch of %d MQTT messages: at most %d" % (len(messages), MAX_IN_FLIGHT))
        acked: asyncio.Future[None] = self.loop.create_future()
        awaited: set[int] = set()
        self._awaited, self._acked = awaited, acked
        self._progress_at = self.loop.time()
        try:
            parts = []
            topics, last_id = self._topics, self._last_id
            for name, payload in messages:
                topic_bytes = topics.get(name)
                if topic_bytes is None:
                    if len(topics) >= MAX_TOPICS_KEPT:
                        topics.clear()
                    topic_bytes = topics[name] = codec.check_topic(name)
                last_id = last_id % 0xFFFF + 1
                awaited.add(last_id)
                parts.append(codec.publish_head(topic_bytes, last_id, len(payload)))
                parts.append(payload)
            self._last_id = last_id
            # One write: the batch goes to TLS in full records, not one record a packet.
            self._write(b"".join(parts))
            while awaited and not acked.done():
                await asyncio.wait([acked], timeout=self.timeout_s)
                if not acked.done() and self.loop.time() - self._progress_at >= self.timeout_s:
                    raise self._error("no PUBACK for %.1f s (%d of %d awaited)"
                                      % (self.timeout_s, len(awaited), len(messages)))
            if acked.done():
                acked.result()  # raises what ended the batch
        finally:
            self._awaited, self._acked = set(), None
            if not acked.done():
                acked.cancel()

    async def close(self) -> None:
        """Sends DISCONNECT and closes the connection (its TLS closed cleanly within
        CLOSE_TIMEOUT_S, else cut)."""
        if self._closing:
            return
        self._closing = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        transport = self._transport
        if transport is not None and not self._down.is_set():
            if self._connack.done() and not self._connack.exception():
                transport.write(codec.DISCONNECT_PACKET)
            transport.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._down.wait()
            except TimeoutError:
                transport.abort()
        self._ended("closed")

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)
        self._sent_at = self.loop.time()

    def _fail(self, reason: str) -> None:
        # The connection cannot go on (the broker broke the protocol, or stopped answering).
        self._ended(reason)
        if self._transport is not None:
            self._transport.abort()

    def _ended(self, reason: str) -> None:
        if not self.down_reason:
            self.down_reason = reason
        self._down.set()
        if not self._connack.done():
            self._connack.set_exception(self._error("connection lost before its CONNACK: %s" % self.down_reason))
        if self._acked is not None and not self._acked.done():
            self._acked.set_exception(self._error("connection lost with %d PUBACKs awaited: %s"
                                                  % (len(self._awaited), self.down_reason)))

    async def _keepalive(self) -> None:
        # A PINGREQ once nothing was sent for KEEPALIVE_S (MQTT 3.1.2.10); no PINGRESP
        # within KEEPALIVE_S after it: the link is dead, the connection closed.
        while not self._down.is_set():
            await asyncio.sleep(MISC_PERIOD_S)
            now = self.loop.time()
            if self._ping_at is not None and now - self._ping_at >= KEEPALIVE_S:
                self._fail("no PINGRESP for %d s" % KEEPALIVE_S)
            elif self._ping_at is None and now - self._sent_at >= KEEPALIVE_S and self._transport is not None:
                self._write(codec.PINGREQ_PACKET)
                self._ping_at = now

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._closing:  # opened after close() (a connect given up on)
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended("closed" if self._closing else "connection lost: %s" % (exc or "closed by the broker"))

    def data_received(self, data: bytes) -> None:
        try:
            answers = self._answers.feed(data)
        except codec.BrokerProtocolError as e:
            self._fail(str(e))
            return
        awaited, acked = self._awaited, self._acked
        for kind, value in answers:
            if kind == "puback":
                awaited.discard(value)  # a PUBACK of a batch given up: not awaited, nothing to do
            elif kind == "pingresp":
                self._ping_at = None
            elif self._connack.done():
                self._fail("MQTT: a second CONNACK")
                return
            else:
                self._connack.set_result(value)
        if acked is not None and not acked.done():
            self._progress_at = self.loop.time()
            if not awaited:
                acked.set_result(None)


class MqttForwarder(Forwarder):
    cfg: MqttConfig
    _connection: Connection | None = None

    def secret_files(self) -> list[tuple[Path, str]]:
        return [(self.cfg.password_file, "MQTT password")] if self.cfg.password_file else []

    def deliver_timeout_s(self) -> None:
        """None: every wait of deliver() has its own bound (connect, CONNACK; PUBACKs by progress,
        timeout_s without any), so a large batch on a slow uplink is not given up while it moves."""
        return None

    async def _connect(self) -> Connection:
        u = urlparse(self.cfg.url)
        ctx = tls_context(self.cfg)  # verifying (host name included) unless insecure = true
        password = None
        if self.cfg.username and self.cfg.password_file:
            password = read_secret(self.cfg.password_file, "MQTT password")
        # A clean session: the hub only publishes, so the broker keeps nothing for it (no
        # subscription, nothing to send it); what was not PUBACKed is in the outbox still.
        connect = codec.connect_packet("pulsebridge-%s-%s" % (self.hub_id, self.name), KEEPALIVE_S,
                                       clean_session=True, username=self.cfg.username or None, password=password)
        connection = Connection(self.name, self.cfg.timeout_s)
        try:
            await connection.open(u.hostname or "localhost", u.port or (8883 if ctx is not None else 1883), ctx,
                                  connect)
        except BaseException:
            await connection.close()
            raise
        return connection

    async def deliver(self, rows: list[Row]) -> None:
        messages = [self.message(r) for r in rows]  # all of them first: one undecodable, none sent
        if self._connection is None or not self._connection.usable:
            await self.close()
            self._connection = await self._connect()
        try:
            await self._connection.publish(messages)
        except BaseException:
            await self.close()  # its PUBACKs are given up: the rows go again on a new connection
            raise

    def message(self, row: Row) -> tuple[str, bytes]:
        """A row's topic and payload (JSON, or CBOR with typed arrays: cfg.payload)."""
        binary = self.cfg.payload == "cbor"
        doc = self.document(row, binary=binary, arrays=True)
        name = topic(self.cfg.topic_prefix, self.hub_id, doc)
        if not binary:
            return name, encode_json(doc)
        if doc["type"] == "samples":
            doc["channels"] = {k: cbor2.CBORTag(TAG_INT32_LE, v.astype(SAMPLE_DTYPE, copy=False).tobytes())
                               for k, v in doc["channels"].items()}
        return name, cbor2.dumps(doc)

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()


CONFIG = MqttConfig
FORWARDER = MqttForwarder
