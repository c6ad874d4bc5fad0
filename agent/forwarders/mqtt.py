"""MQTT 3.1.1 / 5 over TLS, QoS 1: a row leaves the outbox on PUBACK.

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
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import aiomqtt
import cbor2

from agent.config import BackendConfig, Table
from agent.forwarders.base import DeliveryError, Forwarder, document, read_secret, tls_context
from agent.record import SAMPLE_DTYPE
from agent.store import Row

PAYLOADS = ("json", "cbor")
# RFC 8746: a typed array of signed 32-bit integers, little-endian.
TAG_INT32_LE = 78
# Publishes in flight at once (sent, PUBACK awaited): plenty to keep the link
# busy, few enough that aiomqtt's bookkeeping, which scans every pending call
# at each publish, stays cheap (with a whole batch of 500 pending it cost
# more than all the rest of forwarding: quadratic in the batch).
MAX_IN_FLIGHT = 64


@dataclass
class MqttConfig(BackendConfig):
    """username and password_file (mode 0600) if the broker wants them; topic_prefix
    begins every topic."""

    SCHEMES: ClassVar[tuple[str, str]] = ("mqtts", "mqtt")

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


class MqttForwarder(Forwarder):
    cfg: MqttConfig
    _client: aiomqtt.Client | None = None

    def secret_files(self) -> list[tuple[Path, str]]:
        return [(self.cfg.password_file, "MQTT password")] if self.cfg.password_file else []

    async def _connect(self) -> aiomqtt.Client:
        u = urlparse(self.cfg.url)
        ctx = tls_context(self.cfg)
        password = read_secret(self.cfg.password_file, "MQTT password") if self.cfg.password_file else None
        client = aiomqtt.Client(
            hostname=u.hostname or "localhost", port=u.port or (8883 if ctx is not None else 1883),
            username=self.cfg.username, password=password, identifier="pulsebridge-%s-%s" % (self.hub_id, self.name),
            tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V311, keepalive=30, timeout=self.cfg.timeout_s,
            clean_session=False, max_inflight_messages=MAX_IN_FLIGHT)
        # MAX_IN_FLIGHT publishes are pending together by design (deliver()):
        # aiomqtt's warning is for more than that, not for every publish
        # beyond its default of 10 (0.8 lines a frame in a backlog).
        client.pending_calls_threshold = max(MAX_IN_FLIGHT, client.pending_calls_threshold)
        await client.__aenter__()
        return client

    async def deliver(self, rows: list[Row]) -> None:
        try:
            if self._client is None:
                self._client = await self._connect()
            client = self._client
            messages = [self.message(r) for r in rows]  # all of them first: one undecodable, none sent
            window = asyncio.Semaphore(MAX_IN_FLIGHT)

            async def publish(name: str, payload: bytes) -> None:
                async with window:
                    await client.publish(name, payload=payload, qos=1)

            await asyncio.gather(*(publish(name, payload) for name, payload in messages))
        except aiomqtt.MqttError as e:
            await self.close()
            raise DeliveryError("MQTT: %s" % e, backend=self.name) from e

    def message(self, row: Row) -> tuple[str, bytes]:
        """A row's topic and payload (JSON, or CBOR with typed arrays: cfg.payload)."""
        subject = self.subjects.of(row.device_id, row.received_at) if self.subjects is not None else None
        binary = self.cfg.payload == "cbor"
        doc = document(row, self.hub_id, subject, binary=binary)
        name = topic(self.cfg.topic_prefix, self.hub_id, doc)
        if not binary:
            return name, json.dumps(doc).encode()
        if doc["type"] == "samples":
            doc["channels"] = {k: cbor2.CBORTag(TAG_INT32_LE, v.astype(SAMPLE_DTYPE, copy=False).tobytes())
                               for k, v in doc["channels"].items()}
        return name, cbor2.dumps(doc)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.__aexit__(None, None, None)
            except Exception:  # the connection is gone already
                pass


CONFIG = MqttConfig
FORWARDER = MqttForwarder
