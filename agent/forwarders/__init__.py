"""Forwarders: each backend drains its own outbox, with its own retry.

One registry: a backend type is the module of this package of that name
(mqtt, webhook, fhir...), imported when a configuration names it. Such a
module defines CONFIG (its BackendConfig subclass: its own settings, read by
take_own, and its URL schemes) and FORWARDER (its Forwarder subclass). A new
backend is one new module here and its test; nothing else names it. The
modules that only hold what backends share are listed in SHARED.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from types import ModuleType

from agent.config import BackendConfig
from agent.forwarders.base import Forwarder, Subjects
from agent.store import Store

# Modules of this package that are not backends.
SHARED = frozenset({"base", "http"})


def types() -> list[str]:
    """The backend types there are: this package's modules, less SHARED."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED and not m.name.startswith("_"))


def backend(kind: str) -> ModuleType:
    """The module of backend type kind; ValueError for a type there is none of."""
    if kind not in types():
        raise ValueError("unknown backend type %r (there are: %s)" % (kind, ", ".join(types())))
    return importlib.import_module("%s.%s" % (__name__, kind))


def config_class(kind: str) -> type[BackendConfig]:
    cls: type[BackendConfig] = backend(kind).CONFIG
    return cls


def make(cfg: BackendConfig, store: Store, hub_id: str, wake: asyncio.Event,
         subjects: Subjects | None = None) -> Forwarder:
    """The forwarder of a configured backend."""
    fw: Forwarder = backend(cfg.type).FORWARDER(cfg, store, hub_id, wake, subjects)
    return fw
