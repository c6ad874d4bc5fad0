"""HTTPS webhook: batches of frames as a JSON array or a CBOR array.

Each item carries its idempotency key (device, epoch, seq); a batch counts
as delivered on any 2xx answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import cbor2

from agent.config import Table
from agent.forwarders.base import encode_json
from agent.forwarders.http import HttpConfig, HttpForwarder
from agent.store import Row

FORMATS = ("json", "cbor")


@dataclass
class WebhookConfig(HttpConfig):
    """format: the body's encoding, json or cbor."""

    format: str = "json"

    def take_own(self, table: Table) -> None:
        super().take_own(table)
        self.format = table.choice("format", FORMATS, self.format)


class WebhookForwarder(HttpForwarder):
    cfg: WebhookConfig

    async def deliver(self, rows: list[Row]) -> None:
        if self.cfg.format == "cbor":
            body, ctype = cbor2.dumps([self.document(r) for r in rows]), "application/cbor"
        else:
            body, ctype = encode_json([self.document(r, arrays=True) for r in rows]), "application/json"
        await self.post(self.cfg.url, body, {"Content-Type": ctype})


CONFIG = WebhookConfig
FORWARDER = WebhookForwarder
