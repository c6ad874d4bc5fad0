"""HTTPS webhook: batches of frames as a JSON array or a CBOR array.

Each item carries its idempotency key (device, epoch, seq); a batch counts
as delivered on any 2xx answer.
"""

from __future__ import annotations

import json

import aiohttp
import cbor2

from agent.forwarders.base import DeliveryError, Forwarder, document, read_secret, tls_context
from agent.store import Row


class WebhookForwarder(Forwarder):
    _session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/cbor" if self.cfg.format == "cbor" else "application/json",
             "User-Agent": "pulsebridge-agent"}
        if self.cfg.bearer_token_file:
            h["Authorization"] = "Bearer " + read_secret(self.cfg.bearer_token_file, "bearer token")
        return h

    async def deliver(self, rows: list[Row]) -> None:
        if self._session is None:
            ssl_ctx = tls_context(self.cfg)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx is not None else False),
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        docs = [document(r, self.hub_id) for r in rows]
        body = cbor2.dumps(docs) if self.cfg.format == "cbor" else json.dumps(docs).encode()
        try:
            async with self._session.post(self.cfg.url, data=body, headers=self._headers()) as resp:
                if not 200 <= resp.status < 300:
                    raise DeliveryError("HTTP %d from %s" % (resp.status, self.cfg.url))
        except aiohttp.ClientError as e:
            raise DeliveryError(str(e) or type(e).__name__) from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
