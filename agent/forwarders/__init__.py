"""Forwarders: each backend drains its own outbox, with its own retry."""

from __future__ import annotations

import asyncio

from agent.config import BackendConfig
from agent.forwarders.base import Forwarder, Subjects
from agent.store import Store


def make(cfg: BackendConfig, store: Store, hub_id: str, wake: asyncio.Event,
         subjects: Subjects | None = None) -> Forwarder:
    if cfg.type == "mqtt":
        from agent.forwarders.mqtt import MqttForwarder
        return MqttForwarder(cfg, store, hub_id, wake, subjects)
    if cfg.type == "webhook":
        from agent.forwarders.webhook import WebhookForwarder
        return WebhookForwarder(cfg, store, hub_id, wake, subjects)
    if cfg.type == "fhir":
        from agent.forwarders.fhir import FhirForwarder
        return FhirForwarder(cfg, store, hub_id, wake, subjects)
    raise ValueError("unknown backend type %r" % cfg.type)
