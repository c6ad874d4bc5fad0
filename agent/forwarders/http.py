"""What the HTTPS forwarders (webhook, FHIR) share: one client session with
the backend's TLS settings, bearer authentication, and a POST that counts
only a 2xx answer as delivered."""

from __future__ import annotations

import aiohttp

from agent.forwarders.base import DeliveryError, Forwarder, read_secret, tls_context


class HttpForwarder(Forwarder):
    _session: aiohttp.ClientSession | None = None

    def auth_headers(self) -> dict[str, str]:
        if self.cfg.bearer_token_file:
            return {"Authorization": "Bearer " + read_secret(self.cfg.bearer_token_file, "bearer token")}
        return {}

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        """POSTs body; returns the answer's text on 2xx, raises DeliveryError otherwise."""
        if self._session is None:
            ctx = tls_context(self.cfg)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx if ctx is not None else False),
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        headers = dict(headers, **self.auth_headers())
        headers.setdefault("User-Agent", "pulsebridge-agent")
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                text = await resp.text()
                if not 200 <= resp.status < 300:
                    raise DeliveryError("HTTP %d from %s" % (resp.status, url))
                return text
        except aiohttp.ClientError as e:
            raise DeliveryError(str(e) or type(e).__name__) from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
