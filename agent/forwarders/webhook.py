"""HTTPS webhook: batches of frames as a JSON array or a CBOR array.

Each item carries its idempotency key (device, epoch, seq); a batch counts
as delivered on any 2xx answer.
"""

from __future__ import annotations

import json

import cbor2

from agent.forwarders.http import HttpForwarder
from agent.store import Row


class WebhookForwarder(HttpForwarder):
    async def deliver(self, rows: list[Row]) -> None:
        docs = [self.document(r) for r in rows]
        if self.cfg.format == "cbor":
            body, ctype = cbor2.dumps(docs), "application/cbor"
        else:
            body, ctype = json.dumps(docs).encode(), "application/json"
        await self.post(self.cfg.url, body, {"Content-Type": ctype})
