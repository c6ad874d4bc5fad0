"""The agent's MQTT client: paho-mqtt driven on an asyncio event loop (Connection),
on the agent's own loop (client = "in-process", the default) or in a process of
its own (client = "process"): `python -m agent.mqtt_process`.

paho is driven through its external-loop API (its socket callbacks; loop_read,
loop_write, and loop_misc every MISC_PERIOD_S for keepalive), with no thread
of its own. A batch of messages is published at once, all of it in paho's
in-flight window, PACKETS_PER_TURN at a time (the loop's other work runs
between), and awaited as one: a single future, resolved by the batch's last
PUBACK. A connection that drops fails the batch at once; a batch with no
PUBACK for timeout_s fails and its connection is closed.

As a process, agent/forwarders/mqtt.py starts one per connection to a broker
and speaks to it in agent/mqtt_link.py's records over its stdin and stdout
(serve); a failed connection is told as FAILED, and the process ends. This
module imports paho, ssl and asyncio only: the process stays small.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent import mqtt_link
from agent.mqtt_link import CLOSE_TIMEOUT_S, LinkError

# The agent's logger for its MQTT client: this process's records are logged under it there.
log = logging.getLogger("agent.forwarders.mqtt")

# A log record's message at most, as sent to the agent (within mqtt_link.MAX_REPLY, JSON's escapes too).
LOG_CHARS = 16384
# loop_misc's period: keepalive pings, and the keepalive's own timeout (the agent's OPEN sets both).
MISC_PERIOD_S = 1.0
KEEPALIVE_S = 30
# PUBLISHes made, or packets read, in one turn of the event loop before its other work (a
# board's ack) runs: paho takes ~50 us a message here, some 3x that on a Pi; a batch of 500
# at once held the agent's loop 50-90 ms during a backlog's drain.
PACKETS_PER_TURN = 20


class Connection:
    """One connection to the broker: a paho client on this process's event loop.

    open() connects (TCP and TLS on a thread: paho's connect blocks) and awaits
    the CONNACK; publish() sends a batch and returns once every message of it
    is PUBACKed, raising LinkError when the connection drops, the broker refuses
    one, or no PUBACK comes for timeout_s; close() ends it. A connection that
    failed is not used again (`usable` is False)."""

    def __init__(self, client: paho.Client, timeout_s: float, keepalive_s: float = KEEPALIVE_S,
                 misc_period_s: float = MISC_PERIOD_S) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self.misc_period_s = misc_period_s
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
        self._publishing = False  # the batch's PUBLISHes are still being made: no last PUBACK yet
        self._progress_at = 0.0  # loop time of the last PUBACK
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Connection:
        """A connection not yet open, with its paho client made from settings (the forwarder's:
        host, port, client_id, timeout_s, keepalive_s, misc_period_s, tls, username, password)."""
        timeout_s = float(settings["timeout_s"])
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings["client_id"], clean_session=False,
                             protocol=paho.MQTTv311, reconnect_on_failure=False)
        client.enable_logger(log)
        client.connect_timeout = timeout_s
        # No in-flight window of paho's own (0): a whole batch goes out in one round trip, and
        # the batch bounds what is in flight (config.py: backend.batch <= 1000). With a window,
        # paho would scan every message in flight at each PUBACK (quadratic in the batch).
        client.max_inflight_messages_set(0)
        if settings["tls"] is not None:
            ctx = client_context(settings["tls"])
            ctx.sslsocket_class = _ClosedOnFailedHandshake
            client.tls_set_context(ctx)
            # The context checks the host name (it is off only with insecure = true).
            client.tls_insecure_set(not ctx.check_hostname)
        if settings["username"] is not None:
            client.username_pw_set(settings["username"], settings["password"])
        return cls(client, timeout_s, settings["keepalive_s"], settings["misc_period_s"])

    @property
    def usable(self) -> bool:
        return self._connack.done() and not self._down.is_set() and not self._closing

    def _error(self, what: str) -> LinkError:
        return LinkError(what)

    async def open(self, host: str, port: int, tls: bool = True) -> None:
        """tls: whether the client was given a TLS context; over plaintext (mqtt://), a connection
        that ends or stays silent before its CONNACK is said to be what a TLS port does."""
        try:
            rc = await in_daemon_thread(self.client.connect, host, port, round(self.keepalive_s))
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
        self._publishing = True
        try:
            for k, (name, payload) in enumerate(messages, 1):
                info = self.client.publish(name, payload, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise self._error("publish failed: %s" % paho.error_string(info.rc))
                awaited.add(info.mid)
                if k % PACKETS_PER_TURN == 0:
                    await asyncio.sleep(0)  # the loop's other work, and these PUBLISHes written
                    if acked.done():  # the connection ended meanwhile
                        break
            self._publishing = False
            if not awaited and not acked.done():  # every PUBACK came while the batch was being published
                acked.set_result(None)
            while awaited and not acked.done():
                await asyncio.wait([acked], timeout=self.timeout_s)
                if not acked.done() and self.loop.time() - self._progress_at >= self.timeout_s:
                    raise self._error("no PUBACK for %.1f s (%d of %d awaited)"
                                      % (self.timeout_s, len(awaited), len(messages)))
            if acked.done():
                acked.result()  # raises what ended the batch
        finally:
            self._awaited, self._acked, self._publishing = set(), None, False
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
            why = "no PINGRESP within the keepalive (%s s)" % self.keepalive_s
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
        if not self._awaited and not self._publishing:
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
        self._misc = self.loop.create_task(self._keepalive(), name="mqtt-keepalive")

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
        if self._fd < 0:  # a turn scheduled below, after the socket was closed
            return
        try:
            for _ in range(PACKETS_PER_TURN):
                rc = self.client.loop_read()
                sock = self.client.socket()
                # TLS may hold decrypted bytes the socket no longer signals (paho issue 131).
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                    break
            else:  # more of them decrypted: read on in the loop's next turn
                self.loop.call_soon(self._readable)
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
            await asyncio.sleep(self.misc_period_s)


_T = TypeVar("_T")


async def in_daemon_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """fn(*args) run on a daemon thread of its own, and awaited. paho's connect blocks (the name's
    lookup, TCP, the TLS handshake: each up to timeout_s); on the loop's default executor, an agent
    stopped while a broker stalled its handshake waited it out (asyncio.run joins that executor's
    threads: up to timeout_s, 600 s at most, past systemd's stop timeout). Awaiting this may be
    cancelled at once: the thread ends by itself, its result dropped (a socket it opened late is
    closed by _watch, or with the process)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn(*args))
        except BaseException as e:  # handed to the awaiting task, which decides
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits it

    threading.Thread(target=run, name="mqtt-connect", daemon=True).start()
    return await fut


class _ClosedOnFailedHandshake(ssl.SSLSocket):
    """paho's connect leaves the TLS socket of a failed handshake open (client.py, _ssl_wrap_socket):
    its descriptor then waits for the garbage collector. This one closes itself."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class _ToAgent(logging.Handler):
    """Log records, sent to the agent as LOG records (it logs them under their logger)."""

    def __init__(self, send: Callable[[bytes, bytes], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            self.send(mqtt_link.LOG, json.dumps({"logger": rec.name, "level": rec.levelno,
                                                 "message": rec.getMessage()[:LOG_CHARS]}).encode())
        except Exception:  # the agent gone: nothing to tell it
            self.handleError(rec)


def client_context(settings: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context of the agent's (agent.forwarders.base.tls_context, which checked the
    files and logged what it must): the CA file, the client's certificate and key, and
    verification off only when the agent's context had it off (insecure = true)."""
    ctx = ssl.create_default_context(cafile=settings["ca_file"])
    if not settings["verify"]:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings["client_cert"]:
        ctx.load_cert_chain(settings["client_cert"], settings["client_key"])
    return ctx


async def serve(stdin: asyncio.StreamReader, send: Callable[[bytes, bytes], None]) -> None:
    """Reads the agent's records from stdin and answers with send(kind, body), until
    the connection fails, the agent says CLOSE or stdin ends."""

    async def next_record() -> tuple[bytes, bytes] | None:
        try:
            kind, n = mqtt_link.HEAD.unpack(await stdin.readexactly(mqtt_link.HEAD.size))
            if n > mqtt_link.MAX_BODY:
                raise LinkError("a record of %d bytes" % n)
            return kind, await stdin.readexactly(n)
        except asyncio.IncompleteReadError:
            return None  # the agent closed our stdin: it is gone, or done with us

    first = await next_record()
    if first is None or first[0] != mqtt_link.OPEN:
        raise LinkError("the first record is not OPEN")
    settings = json.loads(first[1])
    logging.getLogger().setLevel(settings["log_level"])  # the agent's level for its MQTT logger
    connection = Connection.of(settings)
    try:
        try:
            await connection.open(settings["host"], settings["port"], tls=settings["tls"] is not None)
        except (LinkError, ssl.SSLError, OSError) as e:
            send(mqtt_link.FAILED, str(e).encode())
            return
        send(mqtt_link.CONNECTED, b"")
        reading = asyncio.ensure_future(next_record())
        down = asyncio.ensure_future(connection._down.wait())
        while True:
            await asyncio.wait([reading, down], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():  # the connection ended while idle (no PINGRESP, the broker gone)
                send(mqtt_link.FAILED, connection.down_reason.encode())
                return
            got = reading.result()
            if got is None or got[0] == mqtt_link.CLOSE:
                return
            if got[0] != mqtt_link.BATCH:
                raise LinkError("a record of type %r where a batch was expected" % got[0])
            try:
                await _publish(connection, mqtt_link.batch_messages(got[1]), send)
            except LinkError as e:
                send(mqtt_link.FAILED, str(e).encode())
                return
            send(mqtt_link.ACKED, b"")
            reading = asyncio.ensure_future(next_record())
    finally:
        await connection.close()


async def _publish(connection: Connection, messages: list[tuple[str, bytes]],
                   send: Callable[[bytes, bytes], None]) -> None:
    # The batch, with a PROGRESS record to the agent whenever PUBACKs came in a quarter of
    # timeout_s (the agent's own bound on a silent process resets at each record).
    publishing = asyncio.ensure_future(connection.publish(messages))
    seen = connection._progress_at
    try:
        while not publishing.done():
            await asyncio.wait([publishing], timeout=connection.timeout_s / 4)
            if connection._progress_at != seen:
                seen = connection._progress_at
                send(mqtt_link.PROGRESS, b"")
    finally:
        if not publishing.done():
            publishing.cancel()
    publishing.result()


def main() -> int:
    # The records go out on a descriptor of their own; what anything prints goes to stderr, never
    # into the records' stream.
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)

    def send(kind: bytes, body: bytes) -> None:
        data = memoryview(mqtt_link.record(kind, body))
        while data:
            data = data[os.write(out, data):]

    handler = _ToAgent(send)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=mqtt_link.MAX_BODY)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
        await serve(stdin, send)

    try:
        asyncio.run(run())
    except (LinkError, ValueError, KeyError, TypeError) as e:  # the agent's records broken: a bug, told
        log.error("MQTT client process: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
