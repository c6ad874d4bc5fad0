"""What the HTTPS forwarders (webhook, FHIR) share: one client session with
the backend's TLS settings, bearer authentication, and a POST that counts
only a 2xx answer as delivered.

An answer that is not 2xx is one of two kinds. "Later" (RETRY_STATUSES,
5xx, no answer at all): the batch is retried with backoff, for as long as
it takes. "Never" (any other 4xx: the backend read the batch and refuses
what it holds): RefusedError, and the outbox loop narrows the batch down
to the frame refused and quarantines it, so one bad frame cannot hold
back the others forever.

An answer's body is read up to a bound (ANSWER_MAX_BYTES, or the caller's): a
server that answers an endless or huge body makes the batch fail like any
delivery failure (retried, nothing marked delivered, shown in status), never
fills the hub's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp

from agent.config import BackendConfig, Table
from agent.forwarders.base import REASON_CHARS, DeliveryError, Forwarder, RefusedError, read_secret, tls_context

# 4xx answers retried like a 5xx. 408, 425, 429 (RFC 9110, 8470, 6585) say "not now". 401, 403,
# 404, 405, 407, 421 say the hub's own settings are wrong (credentials, URL, proxy): every frame
# would be refused alike, so none is quarantined for it; the backend shows the error and retries
# until someone fixes the configuration.
RETRY_STATUSES = frozenset({401, 403, 404, 405, 407, 408, 421, 425, 429})
# The most of an answer's body the hub reads: a webhook's answer is only read for a refusal's
# reason (REASON_CHARS of it are kept), so 64 KiB is ample; a larger answer is a DeliveryError.
ANSWER_MAX_BYTES = 64 * 1024


@dataclass
class HttpConfig(BackendConfig):
    """An HTTPS backend's settings: bearer_token_file holds its token (mode 0600), if it wants one."""

    bearer_token_file: Path | None = None

    def take_own(self, table: Table) -> None:
        self.bearer_token_file = table.path("bearer_token_file")


class HttpForwarder(Forwarder):
    cfg: HttpConfig
    _session: aiohttp.ClientSession | None = None

    def secret_files(self) -> list[tuple[Path, str]]:
        return [(self.cfg.bearer_token_file, "bearer token")] if self.cfg.bearer_token_file else []

    def auth_headers(self) -> dict[str, str]:
        if self.cfg.bearer_token_file:
            return {"Authorization": "Bearer " + read_secret(self.cfg.bearer_token_file, "bearer token")}
        return {}

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   answer_max_bytes: int = ANSWER_MAX_BYTES) -> str:
        """POSTs body; returns the answer's text on 2xx, raises DeliveryError otherwise, and
        when the answer's body is over answer_max_bytes (it is read no further)."""
        if self._session is None:
            ctx = tls_context(self.cfg)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx if ctx is not None else False),
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        headers = dict(headers, **self.auth_headers())
        headers.setdefault("User-Agent", "pulsebridge-agent")
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                text = await self._read_answer(resp, url, answer_max_bytes)
                if 200 <= resp.status < 300:
                    return text
                if 400 <= resp.status < 500 and resp.status not in RETRY_STATUSES:
                    raise RefusedError(resp.status, self.refusal_reason(text), backend=self.name)
                raise DeliveryError("HTTP %d from %s" % (resp.status, url), backend=self.name,
                                    http_status=resp.status)
        except aiohttp.ClientError as e:
            raise DeliveryError(str(e) or type(e).__name__, backend=self.name) from e

    async def _read_answer(self, resp: aiohttp.ClientResponse, url: str, max_bytes: int) -> str:
        """The answer's body as text, read up to max_bytes; DeliveryError past that."""
        over = DeliveryError("the answer of backend %s (%s) is over %d bytes, the most the hub reads; not "
                             "taken as delivered" % (self.name, url, max_bytes), backend=self.name,
                             http_status=resp.status)
        if resp.content_length is not None and resp.content_length > max_bytes:
            raise over
        body = bytearray()
        while chunk := await resp.content.read(max_bytes + 1 - len(body)):
            body += chunk
            if len(body) > max_bytes:
                raise over
        try:
            return body.decode(resp.charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return body.decode("utf-8", errors="replace")

    def refusal_reason(self, text: str) -> str:
        """The backend's reason for a refusal, from its answer's body (bounded)."""
        return " ".join(text.split())[:REASON_CHARS] or "no reason given"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
