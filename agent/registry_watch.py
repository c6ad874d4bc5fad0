"""The registry watcher: changes made to the registry beside the running agent
(pulsebridge devices add|revoke, erase, provision) take effect within
REGISTRY_POLL_S, with no restart.

The registry is SQLite in WAL mode: a write touches the -wal file, a
checkpoint the main file, so their modification times together say when to
read it again. `active` holds the active devices as the registry last said
(what the status names), so nothing else reads the registry to show it. An
erased device is forgotten everywhere: ingest refuses it,
what it stored meanwhile is erased, and `on_erased` drops what other tasks
keep in memory of it (vitals, waveforms).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path

from agent.ingest import Ingestor
from agent.links import LinkManager
from agent.registry import Device, Registry
from agent.store import Store

log = logging.getLogger(__name__)

# The registry is re-read this often when its file changed: a revocation
# takes effect within this delay.
REGISTRY_POLL_S = 1.0


def registry_mtime(path: Path) -> tuple[float, float]:
    """(main file, -wal file) modification times in s; 0.0 for a file not there."""
    def one(p: Path) -> float:
        try:
            return p.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return 0.0
    return one(path), one(Path(str(path) + "-wal"))


class RegistryWatcher:
    def __init__(self, registry: Registry, ingestor: Ingestor, store: Store, links: LinkManager,
                 on_erased: Callable[[str], None]) -> None:
        self.registry = registry
        self.path = registry.path
        self.active: list[Device] = self._active()
        self.damaged: list[str] = []  # rows of the registry that hold no device (edited by hand), said why
        self._tell_damaged()
        self.ingestor = ingestor
        self.store = store
        self.links = links
        self.on_erased = on_erased
        self.turns = 0  # the loop's heartbeat, for the liveness check

    async def run(self) -> None:
        seen = registry_mtime(self.path)
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            self.turns += 1
            now = registry_mtime(self.path)
            if now != seen:
                seen = now
                await self._reload()

    async def _reload(self) -> None:
        # Read off the event loop (SQLite), applied on it (the hub's state is the loop's).
        read = await asyncio.to_thread(self.ingestor.read_devices)
        for dev in self.ingestor.apply_devices(read):  # erased: nothing of it stays in memory either
            self.on_erased(dev)
            # What was verified before it was refused is committed first (the writer's queue
            # is in order), then erased with it.
            late = await self.store.run(functools.partial(self.store.erase_device, device_id=dev))
            log.info("device %s erased: its frames are refused from now on (%d stored meanwhile, erased)",
                     dev, late)
        self.active = [d for d in read.devices if d.state == "active"]
        self.links.registry_changed()
        log.info("registry changed: devices reloaded")
        self._tell_damaged()

    def _tell_damaged(self) -> None:
        """Logs the registry's unusable rows when they change (their boards are refused meanwhile)."""
        damaged = list(self.registry.damaged)
        for problem in damaged:
            if problem not in self.damaged:
                log.error("%s", problem)
        self.damaged = damaged

    def _active(self) -> list[Device]:
        return [d for d in self.registry.all() if d.state == "active"]
