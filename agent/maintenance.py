"""Store maintenance: the retention policy, as a task of the agent.

Every HOUSEKEEPING_EVERY_S, frames older than the retention that every
backend has are purged. The work runs on the store's writer thread (as
every write does), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging

from agent.store import Store

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_S = 60.0


class StoreMaintenance:
    def __init__(self, store: Store, retention_days: float) -> None:
        self.store = store
        self.retention_s = retention_days * 86400

    async def run(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY_S)
            await self.purge()

    async def purge(self) -> int:
        """Purges once; returns how many frames went."""
        n: int = await self.store.run(lambda db: self.store.purge(db, self.retention_s))
        if n:
            log.info("retention: purged %d frames delivered to every backend", n)
        return n
