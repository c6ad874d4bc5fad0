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

documents_per_message = N > 1 puts up to N documents of a topic in one
message, as an array (JSON or CBOR), in the order stored.

The client is paho-mqtt, driven on the agent's event loop (client =
"in-process", InProcessConnection) or in a process of its own per connection
(client = "process", Connection: agent/mqtt_process.py, which says how paho is
driven in either case); the documents are made on the outbox read's thread
and handed to the client a batch at a time (to the process over its stdin,
agent/mqtt_link.py). A batch of rows is published at once, all of it in
flight, and is acknowledged to the forwarder only once every message of it is
PUBACKed. A connection that drops fails the batch at once; a batch with no
PUBACK for timeout_s fails and its connection is closed; so does one whose
process ends or falls silent. Either way none of its rows is marked
forwarded: they are published again on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import cbor2

from agent import mqtt_link, mqtt_process
from agent.config import BackendConfig, Table
from agent.forwarders.base import DeliveryError, Forwarder, encode_json, read_secret, tls_context
from agent.record import SAMPLE_DTYPE
from agent.store import Row

log = logging.getLogger(__name__)

PAYLOADS = ("json", "cbor")
# Documents in one PUBLISH at most (documents_per_message): a message of 100 ECG frames' JSON
# documents is ~400 kB, well under what brokers take by default (Mosquitto: 256 MB).
MAX_DOCUMENTS_PER_MESSAGE = 100
# Messages above this may be more than a broker takes (AWS IoT Core: 128 kB a message); such a
# broker closes the connection, and a batch that fails so says its largest message and the setting.
LARGE_MESSAGE_BYTES = 128 * 1024
# Where the MQTT client (paho) runs: on the agent's event loop, or in a process of its own per connection.
CLIENTS = ("in-process", "process")
# RFC 8746: a typed array of signed 32-bit integers, little-endian.
TAG_INT32_LE = 78
# How long a closing connection may take to send its DISCONNECT before its socket is closed.
CLOSE_TIMEOUT_S = mqtt_link.CLOSE_TIMEOUT_S
# The pipe to the MQTT client's process, asked for: a batch of 500 frames' documents fits.
PIPE_BYTES = 1 << 20
# The MQTT client's process: what the interpreter is given (a benchmark runs it under cProfile).
PROCESS_ARGS: tuple[str, ...] = ("-m", "agent.mqtt_process")
# The MQTT client's process's start, at most (a fresh interpreter's imports, on a loaded Pi).
START_BOUND_S = 20.0
# Prepared batches kept at most: the one read ahead, and one whose read ahead was dropped.
PREPARED_KEPT = 2
# loop_misc's period: keepalive pings, and the keepalive's own timeout.
MISC_PERIOD_S = 1.0
KEEPALIVE_S = 30


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
    client: str = "in-process"  # in-process | process
    # 1: a document a message. N > 1: each message's payload an array of up to N documents of
    # its topic, in the order stored (fewer PUBLISHes and PUBACKs: the client's cost is per message).
    documents_per_message: int = 1

    def take_own(self, table: Table) -> None:
        self.payload = table.choice("payload", PAYLOADS, self.payload)
        self.client = table.choice("client", CLIENTS, self.client)
        self.documents_per_message = table.integer("documents_per_message", self.documents_per_message, 1,
                                                   MAX_DOCUMENTS_PER_MESSAGE)
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


class Connection:
    """One connection to the broker, held by the MQTT client's process (agent/mqtt_process.py,
    one per connection), so that paho's work and TLS run beside the event loop, not on it.

    open() starts the process and awaits its word that the broker accepted the connection;
    publish() hands it a batch and returns once every message of it is PUBACKed, raising
    DeliveryError (.backend) when the connection drops, the broker refuses one, no PUBACK
    comes for timeout_s, or the process ends or falls silent; close() ends it (DISCONNECT,
    then the process; killed if it does not end in time, or if close() is cancelled). A
    connection that failed is not used again (`usable` is False)."""

    def __init__(self, backend: str, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.down_reason = ""  # why the connection ended ("": it has not)
        self.pid: int | None = None  # the process's, once started
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._received = bytearray()  # the process's output not yet read as records
        self._connected: asyncio.Future[None] = self.loop.create_future()
        self._exited: asyncio.Future[None] = self.loop.create_future()
        self._acked: asyncio.Future[None] | None = None  # the batch in flight's: set when it is PUBACKed
        self._heard_at = 0.0  # loop time of the process's last record
        self._closing = False

    @property
    def usable(self) -> bool:
        return self._connected.done() and not self.down_reason and not self._closing

    def _error(self, what: str) -> DeliveryError:
        return DeliveryError("MQTT: %s" % what, backend=self.backend)

    async def open(self, settings: dict[str, Any]) -> None:
        """settings: agent/mqtt_process.py's OPEN (host, port, client_id, tls...)."""
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
        try:
            transport, _ = await self.loop.subprocess_exec(
                lambda: _ProcessProtocol(self), sys.executable, *PROCESS_ARGS,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env)
        except OSError as e:
            raise self._error("cannot start the MQTT client's process: %s" % e) from e
        self._transport, self.pid = transport, transport.get_pid()
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        self._stdin = stdin
        self._heard_at = self.loop.time()
        # A batch's record (a few hundred kB of documents) in the pipe at once, where Linux lets it (up to
        # /proc/sys/fs/pipe-max-size, 1 MB by default): no copy of it kept by the loop while the pipe drains.
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(stdin.get_extra_info("pipe").fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._send(mqtt_link.OPEN, json.dumps(settings).encode())
        bound_s = START_BOUND_S + 2 * self.timeout_s
        try:
            # The process's start (its imports), the TCP and TLS connection, the CONNACK: each bounded.
            async with asyncio.timeout(bound_s):
                await asyncio.shield(self._connected)
        except TimeoutError:
            self._ended("no CONNACK from %s:%d in %.1f s" % (settings["host"], settings["port"], bound_s))
        if self.down_reason:  # the process's reason names the broker; the process's end is told as it is
            raise self._error(self.down_reason)

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        if not self.usable:
            raise self._error("not connected: %s" % (self.down_reason or "closing"))
        acked: asyncio.Future[None] = self.loop.create_future()
        self._acked = acked
        self._heard_at = self.loop.time()
        try:
            self._send(mqtt_link.BATCH, mqtt_link.batch_body(messages))
            # The process gives the batch up after timeout_s without a PUBACK, and says PROGRESS
            # while PUBACKs come: a process silent for twice that is stuck.
            while not acked.done():
                await asyncio.wait([acked], timeout=self.timeout_s)
                if not acked.done() and self.loop.time() - self._heard_at >= 2 * self.timeout_s:
                    self._ended("the MQTT client's process is silent with %d messages awaiting PUBACKs"
                                % len(messages))
            acked.result()  # raises what ended the batch
        finally:
            self._acked = None
            if not acked.done():
                acked.cancel()

    async def close(self) -> None:
        """Asks the process to DISCONNECT and end (bounded by CLOSE_TIMEOUT_S), then ends it."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._transport is not None and not self._exited.done():
                self._send(mqtt_link.CLOSE)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S + 1.0):
                        await asyncio.shield(self._exited)
        finally:
            if self._transport is not None:
                self._transport.close()  # kills the process if it is still there, closes its pipes
            self._ended("closed")

    def _send(self, kind: bytes, body: bytes = b"") -> None:
        if self._stdin is None or self._stdin.is_closing() or self._exited.done():
            self._ended("the MQTT client's process has ended")
            return
        self._stdin.write(mqtt_link.head(kind, body))
        if body:
            self._stdin.write(body)

    def _ended(self, reason: str) -> None:
        if not self.down_reason:
            self.down_reason = reason
        if not self._connected.done():
            self._connected.set_result(None)
        if self._acked is not None and not self._acked.done():
            self._acked.set_exception(self._error("connection lost with a batch awaiting its PUBACKs: %s"
                                                  % self.down_reason))
        if self._transport is not None and not self._closing and not self._exited.done():
            self._transport.kill()  # a connection that failed is not used again: its process ends with it

    # ---- the process's output and end (_ProcessProtocol's calls) ----

    def _output(self, data: bytes) -> None:
        self._received += data
        head = mqtt_link.HEAD.size
        while len(self._received) >= head:
            kind, n = mqtt_link.HEAD.unpack_from(self._received)
            if n > mqtt_link.MAX_REPLY:  # none of the process's records is near this: it is broken
                self._received.clear()
                self._ended("the MQTT client's process wrote a record of %d bytes" % n)
                return
            if len(self._received) < head + n:
                return
            body = bytes(self._received[head:head + n])
            del self._received[:head + n]
            self._record(kind, body)

    def _record(self, kind: bytes, body: bytes) -> None:
        self._heard_at = self.loop.time()
        if kind == mqtt_link.ACKED:
            if self._acked is not None and not self._acked.done():
                self._acked.set_result(None)
        elif kind == mqtt_link.CONNECTED:
            if not self._connected.done():
                self._connected.set_result(None)
        elif kind == mqtt_link.FAILED:
            self._ended(body.decode(errors="replace"))
        elif kind == mqtt_link.LOG:
            rec = json.loads(body)
            logging.getLogger(str(rec["logger"])).log(int(rec["level"]), "%s", rec["message"])

    def _process_exited(self) -> None:
        status = self._transport.get_returncode() if self._transport is not None else None
        if not self._exited.done():
            self._exited.set_result(None)
        self._ended("the MQTT client's process ended (exit status %s)" % status)


class InProcessConnection:
    """One connection to the broker, its paho client driven on the agent's own event loop
    (agent/mqtt_process.py's Connection, which says how). The same interface as Connection;
    its failures are DeliveryError (.backend) alike."""

    pid = None  # no process of its own

    def __init__(self, backend: str, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self._connection: mqtt_process.Connection | None = None

    @property
    def usable(self) -> bool:
        return self._connection is not None and self._connection.usable

    @property
    def down_reason(self) -> str:
        return self._connection.down_reason if self._connection is not None else ""

    def _error(self, e: Exception) -> DeliveryError:
        return DeliveryError("MQTT: %s" % e, backend=self.backend)

    async def open(self, settings: dict[str, Any]) -> None:
        self._connection = mqtt_process.Connection.of(settings)
        try:
            await self._connection.open(settings["host"], settings["port"], tls=settings["tls"] is not None)
        except (mqtt_link.LinkError, ssl.SSLError, OSError) as e:
            raise self._error(e) from e

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        if self._connection is None:
            raise self._error(mqtt_link.LinkError("not connected"))
        try:
            await self._connection.publish(messages)
        except mqtt_link.LinkError as e:
            raise self._error(e) from e

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


class _ProcessProtocol(asyncio.SubprocessProtocol):
    # The MQTT client's process, as the loop sees it: its stdout's bytes and its end, to the connection.

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.connection._output(data)

    def process_exited(self) -> None:
        self.connection._process_exited()


class MqttForwarder(Forwarder):
    cfg: MqttConfig
    _connection: Connection | InProcessConnection | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Batches' messages made by prepare(), by their rows' ids, until deliver takes them.
        self._prepared: dict[tuple[int, ...], list[tuple[str, bytes]] | Exception] = {}
        self._prepared_lock = threading.Lock()

    def secret_files(self) -> list[tuple[Path, str]]:
        return [(self.cfg.password_file, "MQTT password")] if self.cfg.password_file else []

    def deliver_timeout_s(self) -> None:
        """None: every wait of deliver() has its own bound (connect, CONNACK; PUBACKs by progress,
        timeout_s without any), so a large batch on a slow uplink is not given up while it moves."""
        return None

    async def _connect(self) -> Connection | InProcessConnection:
        u = urlparse(self.cfg.url)
        ctx = tls_context(self.cfg)  # checks the files, says what is insecure; the process makes its own alike
        host, port = u.hostname or "localhost", u.port or (8883 if ctx is not None else 1883)
        settings = {
            "host": host, "port": port, "client_id": "pulsebridge-%s-%s" % (self.hub_id, self.name),
            "timeout_s": self.cfg.timeout_s, "keepalive_s": KEEPALIVE_S, "misc_period_s": MISC_PERIOD_S,
            "log_level": log.getEffectiveLevel(),
            "tls": None if ctx is None else {
                "ca_file": str(self.cfg.ca_file) if self.cfg.ca_file else None, "verify": ctx.check_hostname,
                "client_cert": str(self.cfg.client_cert) if self.cfg.client_cert else None,
                "client_key": str(self.cfg.client_key) if self.cfg.client_key else None},
            "username": self.cfg.username,
            # Over the process's stdin, never its command line or environment.
            "password": read_secret(self.cfg.password_file, "MQTT password") if self.cfg.password_file else None,
        }
        connection: Connection | InProcessConnection = (
            Connection if self.cfg.client == "process" else InProcessConnection)(self.name, self.cfg.timeout_s)
        try:
            await connection.open(settings)
        except BaseException:
            await connection.close()
            raise
        return connection

    def prepare(self, rows: list[Row]) -> None:
        """The batch's messages, made on the read's thread (Forwarder.prepare) and kept for
        deliver by the rows' ids; what failed is kept to be raised there."""
        built: list[tuple[str, bytes]] | Exception
        try:
            built = self.messages(rows)
        except Exception as e:
            built = e
        with self._prepared_lock:
            self._prepared[tuple(r.id for r in rows)] = built
            while len(self._prepared) > PREPARED_KEPT:  # a read ahead dropped: its batch is read again
                del self._prepared[next(iter(self._prepared))]

    async def deliver(self, rows: list[Row]) -> None:
        with self._prepared_lock:
            built = self._prepared.pop(tuple(r.id for r in rows), None)
        if isinstance(built, Exception):
            raise built
        # All of them first: one undecodable, none sent.
        messages = built if built is not None else self.messages(rows)
        if self._connection is None or not self._connection.usable:
            await self.close()
            self._connection = await self._connect()
        try:
            await self._connection.publish(messages)
        except BaseException as e:
            await self.close()  # its PUBACKs are given up: the rows go again on a new connection
            largest = max((len(payload) for _, payload in messages), default=0)
            if isinstance(e, DeliveryError) and self.cfg.documents_per_message > 1 and largest > LARGE_MESSAGE_BYTES:
                # (the same batch fails the same way at every retry: the operator must hear why it may)
                raise DeliveryError("%s; its largest message was %d kB (documents_per_message = %d): a broker "
                                    "that takes smaller messages closes the connection, lower documents_per_message"
                                    % (e, largest // 1024, self.cfg.documents_per_message),
                                    backend=self.name) from e
            raise

    def messages(self, rows: list[Row]) -> list[tuple[str, bytes]]:
        """The rows' messages, (topic, payload): a row's document each, or with
        documents_per_message = N > 1, each topic's documents in arrays of up to N, in the
        rows' order."""
        n = self.cfg.documents_per_message
        if n == 1:
            return [self.message(r) for r in rows]
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            name, doc = self._document(r)
            by_topic.setdefault(name, []).append(doc)
        return [(name, self._payload(docs[i:i + n])) for name, docs in by_topic.items()
                for i in range(0, len(docs), n)]

    def message(self, row: Row) -> tuple[str, bytes]:
        """A row's topic and payload (JSON, or CBOR with typed arrays: cfg.payload)."""
        name, doc = self._document(row)
        return name, self._payload(doc)

    def _document(self, row: Row) -> tuple[str, dict[str, Any]]:
        # A row's topic and document, ready for _payload (for CBOR: its channels tagged typed arrays).
        binary = self.cfg.payload == "cbor"
        doc = self.document(row, binary=binary, arrays=True)
        name = topic(self.cfg.topic_prefix, self.hub_id, doc)
        if binary and doc["type"] == "samples":
            doc["channels"] = {k: cbor2.CBORTag(TAG_INT32_LE, v.astype(SAMPLE_DTYPE, copy=False).tobytes())
                               for k, v in doc["channels"].items()}
        return name, doc

    def _payload(self, doc: dict[str, Any] | list[dict[str, Any]]) -> bytes:
        # A document, or an array of them, in cfg.payload's encoding.
        return cbor2.dumps(doc) if self.cfg.payload == "cbor" else encode_json(doc)

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()


CONFIG = MqttConfig
FORWARDER = MqttForwarder
