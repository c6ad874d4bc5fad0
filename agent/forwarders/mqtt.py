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

The client is paho-mqtt, driven on the agent's event loop through paho's
external-loop API (its socket callbacks; loop_read, loop_write, and
loop_misc once a second for keepalive), with no thread of its own. A batch
of rows is published at once, all of it in paho's in-flight window, and
awaited as one: a single future, resolved by the batch's last PUBACK. A
connection that drops fails the batch at once; a batch with no PUBACK for
timeout_s fails and its connection is closed. Either way none of its rows
is marked forwarded: they are published again on a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import cbor2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BackendConfig, Table
from agent.forwarders.base import DeliveryError, Forwarder, encode_json, read_secret, tls_context
from agent.record import SAMPLE_DTYPE
from agent.store import Row

log = logging.getLogger(__name__)

PAYLOADS = ("json", "cbor")
# RFC 8746: a typed array of signed 32-bit integers, little-endian.
TAG_INT32_LE = 78
# How long a closing connection may take to send its DISCONNECT before its socket is closed.
CLOSE_TIMEOUT_S = 2.0
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


class Connection:
    """One connection to the broker: a paho client on the running event loop.

    open() connects (TCP and TLS on a thread: paho's connect blocks) and awaits
    the CONNACK; publish() sends a batch and returns once every message of it
    is PUBACKed, raising DeliveryError (.backend) when the connection drops, the
    broker refuses one, or no PUBACK comes for timeout_s; close() ends it. A
    connection that failed is not used again (`usable` is False)."""

    def __init__(self, backend: str, client: paho.Client, timeout_s: float) -> None:
        self.backend = backend
        self.client = client
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.down_reason = ""  # why the connection ended ("": it has not)
        self._connack: asyncio.Future[ReasonCode] = self.loop.create_future()
        self._down = asyncio.Event()
        self._closing = False
        self._fd = -1  # the socket's descriptor, as registered with the loop
        self._quickack: Callable[[], None] | None = None  # TCP_QUICKACK set again (Linux), once connected
        self._misc: asyncio.Task[None] | None = None
        self._awaited: set[int] = set()  # the mids of the batch in flight without their PUBACK
        self._acked: asyncio.Future[None] | None = None  # the batch's: set at its last PUBACK
        self._progress_at = 0.0  # loop time of the last PUBACK
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    @property
    def usable(self) -> bool:
        return self._connack.done() and not self._down.is_set() and not self._closing

    def _error(self, what: str) -> DeliveryError:
        return DeliveryError("MQTT: %s" % what, backend=self.backend)

    async def open(self, host: str, port: int, tls: bool = True) -> None:
        """tls: whether the client was given a TLS context; over plaintext (mqtt://), a connection
        that ends or stays silent before its CONNACK is said to be what a TLS port does."""
        try:
            rc = await asyncio.to_thread(self.client.connect, host, port, KEEPALIVE_S)
        except (OSError, ssl.SSLError, ssl.CertificateError) as e:
            # A reset once TCP is up, or a reply that is no TLS record, is a handshake a plaintext port refused
            plain = tls and (isinstance(e, ConnectionResetError) or "WRONG_VERSION_NUMBER" in str(e))
            raise self._error("cannot connect to %s:%d: %s%s" % (
                host, port, e, ": the TLS handshake failed: is it a plaintext MQTT port (1883)? the broker "
                "must offer TLS (8883)" if plain else "")) from e
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise self._error("cannot connect to %s:%d: %s" % (host, port, paho.error_string(rc)))
        down: asyncio.Future[Any] = asyncio.ensure_future(self._down.wait())
        try:
            await asyncio.wait([self._connack, down], timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
        # A broker that expects TLS reads a plaintext CONNECT as a broken handshake: it resets the
        # connection (Mosquitto) or waits for more; either way no CONNACK, which told nobody why.
        hint = "" if tls else ": if it expects TLS (MQTT's TLS port is 8883), use mqtts://"
        if not self._connack.done():
            if self._down.is_set():  # paho's reason ("Unspecified error") would tell nothing more
                raise self._error("%s:%d closed the connection without a CONNACK%s" % (host, port, hint))
            raise self._error("no CONNACK from %s:%d in %.1f s%s" % (host, port, self.timeout_s, hint))
        code = self._connack.result()
        if code.is_failure:
            raise self._error("%s:%d refused the connection: %s" % (host, port, code))

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        if not self.usable:
            raise self._error("not connected: %s" % (self.down_reason or "closing"))
        acked: asyncio.Future[None] = self.loop.create_future()
        awaited: set[int] = set()
        self._awaited, self._acked = awaited, acked
        self._progress_at = self.loop.time()
        try:
            for name, payload in messages:
                info = self.client.publish(name, payload, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise self._error("publish failed: %s" % paho.error_string(info.rc))
                awaited.add(info.mid)
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
        """Sends DISCONNECT (bounded by CLOSE_TIMEOUT_S) and closes the socket."""
        if self._closing:
            return
        self._closing = True
        if not self._down.is_set() and self.client.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._down.wait()
            except TimeoutError:
                pass
        self._drop()

    def _drop(self) -> None:
        """Forgets the socket: off the loop, closed (paho's own client is discarded with this)."""
        if self._misc is not None:
            self._misc.cancel()
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = -1
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self._ended("closed")

    def _ended(self, reason: str) -> None:
        if not self.down_reason:
            self.down_reason = reason
        self._down.set()
        if self._acked is not None and not self._acked.done():
            self._acked.set_exception(self._error("connection lost with %d PUBACKs awaited: %s"
                                                  % (len(self._awaited), self.down_reason)))

    # ---- paho's callbacks (on the loop, except the socket's opening: on connect's thread) ----

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any) -> None:
        if not self._connack.done():
            self._connack.set_result(code)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any) -> None:
        why = str(code)
        if why == "Keep alive timeout":  # paho's words for no PINGRESP within the keepalive
            why = "no PINGRESP within the keepalive (%s s)" % KEEPALIVE_S
        self._ended("disconnected (%s)" % why)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, code: ReasonCode, props: Any) -> None:
        acked = self._acked
        if acked is None or acked.done() or mid not in self._awaited:
            return  # a PUBACK for a batch already given up
        if code.is_failure:
            acked.set_exception(self._error("the broker refused a publish: %s" % code))
            return
        self._awaited.discard(mid)
        self._progress_at = self.loop.time()
        if not self._awaited:
            acked.set_result(None)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.call_soon_threadsafe(self._watch, sock)

    def _watch(self, sock: socket.socket) -> None:
        if self._closing:
            sock.close()  # opened after close() (a connect given up on)
            return
        self._fd = sock.fileno()
        # ACK what the broker sends at once (Linux: TCP_QUICKACK, which the kernel clears by
        # itself, so it is set again after each read). A broker that sends its PUBACKs under
        # Nagle's algorithm (Mosquitto's default: set_tcp_nodelay false) holds all but the first
        # of a batch's PUBACKs until that first is ACKed, which Linux delays up to 40 ms: a
        # stall each round of PUBACKs, most of a backlog drain's time (bench agent).
        if hasattr(socket, "TCP_QUICKACK"):
            self._quickack = lambda: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self.loop.add_reader(self._fd, self._readable)
        self._misc = self.loop.create_task(self._keepalive(), name="mqtt-keepalive-%s" % self.backend)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = -1
        # paho closes the socket first, then says why (on_disconnect, in the same call): the
        # reason it gives is the one kept.
        self.loop.call_soon(self._ended, "socket closed")

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.call_soon_threadsafe(self._want_write)

    def _want_write(self) -> None:
        if self._fd >= 0:
            self.loop.add_writer(self._fd, self._writable)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._fd >= 0:
            self.loop.remove_writer(self._fd)

    def _readable(self) -> None:
        try:
            while True:
                rc = self.client.loop_read()
                sock = self.client.socket()
                # TLS may hold decrypted bytes the socket no longer signals (paho issue 131).
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                    break
            if self._quickack is not None and self._fd >= 0:
                self._quickack()
        except Exception as e:  # the connection broke under paho
            self._ended("read failed: %s" % e)
            self._drop()

    def _writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as e:
            self._ended("write failed: %s" % e)
            self._drop()

    async def _keepalive(self) -> None:
        while self.client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            await asyncio.sleep(MISC_PERIOD_S)


class _ClosedOnFailedHandshake(ssl.SSLSocket):
    """paho's connect leaves the TLS socket of a failed handshake open (client.py, _ssl_wrap_socket):
    its descriptor then waits for the garbage collector at every retry. This one closes itself."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


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
        ctx = tls_context(self.cfg)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pulsebridge-%s-%s" % (self.hub_id, self.name),
                             clean_session=False, protocol=paho.MQTTv311, reconnect_on_failure=False)
        client.enable_logger(log)
        client.connect_timeout = self.cfg.timeout_s
        # No in-flight window of paho's own (0): a whole batch goes out in one round trip, and
        # the batch bounds what is in flight (config.py: backend.batch <= 1000). With a window,
        # paho would scan every message in flight at each PUBACK (quadratic in the batch).
        client.max_inflight_messages_set(0)
        if ctx is not None:
            ctx.sslsocket_class = _ClosedOnFailedHandshake
            client.tls_set_context(ctx)
            # The context checks the host name (it is off only with insecure = true).
            client.tls_insecure_set(not ctx.check_hostname)
        if self.cfg.username:
            password = read_secret(self.cfg.password_file, "MQTT password") if self.cfg.password_file else None
            client.username_pw_set(self.cfg.username, password)
        connection = Connection(self.name, client, self.cfg.timeout_s)
        try:
            await connection.open(u.hostname or "localhost", u.port or (8883 if ctx is not None else 1883),
                                  tls=ctx is not None)
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
