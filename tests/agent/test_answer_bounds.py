# An HTTPS backend's answer is read up to a bound: a server that answers an endless body, or
# declares one over the bound, fails the batch like any delivery failure (retried, nothing
# marked delivered, the backend and the bound in its status), and the hub delivers once the
# server answers sanely. The server is real (aiohttp on a free loopback port).
import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.dev.local_backend import serve_https
from agent.forwarders import fhir, http, webhook
from agent.forwarders.http import HttpForwarder
from agent.store import KIND_VITAL, PRIORITY_VITALS, Ingest, Store
from tests.agent import harness
from tests.waiting import async_wait_for

# What the endless answer sends at most, so a client that never stops reading cannot hang the
# test: far over any bound the hub has.
ENDLESS_CAP_BYTES = 64 * 1024 * 1024


class HostileServer:
    """Answers the first `endless` requests with a 200 whose body never ends (chunked, no length),
    the next `declared` with a Content-Length over the bound, then sanely (a transaction-response
    for a FHIR Bundle, an empty 200 otherwise)."""

    def __init__(self, endless: int, declared: int) -> None:
        self.endless, self.declared = endless, declared
        self.requests = 0
        self.sent_bytes = 0  # the last request's body
        self.forwarder: HttpForwarder | None = None
        self.seen: list[tuple[int, str, int]] = []  # the forwarder's failures, last_error, forwarded at each request

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.sent_bytes = len(await request.read())
        if self.forwarder is not None:
            fw = self.forwarder
            self.seen.append((fw.failures, fw.last_error, fw.forwarded))
        body: Any = await request.json()
        if self.endless > 0:
            self.endless -= 1
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/fhir+json"})
            await resp.prepare(request)
            chunk = b" " * 65536
            try:
                for _ in range(ENDLESS_CAP_BYTES // len(chunk)):
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):  # the client hung up, as it should
                pass
            return resp
        if self.declared > 0:
            self.declared -= 1
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/fhir+json"})
            resp.content_length = 100 * 1024 * 1024
            await resp.prepare(request)
            try:
                await resp.write(b"{")
            except (ConnectionError, RuntimeError):
                pass
            return resp
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            return web.json_response({"resourceType": "Bundle", "type": "transaction-response", "entry": [
                {"response": {"status": "201 Created"}} for _ in body["entry"]]})
        return web.Response(status=200)


@pytest.mark.parametrize("kind", ["fhir", "webhook"])
def test_an_endless_or_oversized_answer_is_a_delivery_failure_then_retried(tmp_path: Path, kind: str) -> None:
    pki = harness.pki_for(tmp_path)
    store = Store(tmp_path / "store.db", ["ehr"])
    store.open()
    store.start()
    server = HostileServer(endless=1, declared=1)

    async def scenario() -> HttpForwarder:
        app = web.Application()
        app.router.add_post("/in", server.answer)
        runner, port = await serve_https(app, "127.0.0.1", 0, pki.server_cert, pki.server_key)
        await store.ingest(Ingest("pb-a1", -2, 1, KIND_VITAL, b"", None, priority=PRIORITY_VITALS, info={
            "type": "vital", "kind": "heart_rate", "device_id": "pb-a1", "value": 71.0, "unit": "/min",
            "at": "2026-11-30T10:00:01.000Z", "quality": 0.9, "source_frames": ["pb-a1:1:1"]}))
        url = "https://127.0.0.1:%d/in" % port
        fw: HttpForwarder
        if kind == "fhir":
            fw = fhir.FhirForwarder(fhir.FhirConfig(name="ehr", type="fhir", url=url, ca_file=pki.ca_cert,
                                                    linger_s=0), store, "hub", asyncio.Event())
        else:
            fw = webhook.WebhookForwarder(webhook.WebhookConfig(name="ehr", type="webhook", url=url,
                                                                ca_file=pki.ca_cert, linger_s=0),
                                          store, "hub", asyncio.Event())
        fw.backoff.base_s = fw.backoff.cap_s = 0.05
        server.forwarder = fw
        task = asyncio.create_task(fw.run())
        try:
            await async_wait_for(lambda: fw.forwarded == 1, 60, "delivery once the server answers sanely")
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await runner.cleanup()
        return fw

    try:
        fw = asyncio.run(scenario())
        # A FHIR Bundle: the hub's Device, the board's, the vital.
        limit = fhir.answer_max_bytes(3, server.sent_bytes) if kind == "fhir" else http.ANSWER_MAX_BYTES
        # Each request after a failure: the failure counted, in words, and nothing taken as delivered.
        assert [(f, d) for f, _, d in server.seen] == [(0, 0), (1, 0), (2, 0)], server.seen
        for _, e, _ in server.seen[1:]:
            assert e.startswith("DeliveryError: ") and "over %d bytes" % limit in e and "backend ehr" in e, e
        assert fw.failures == 2 and server.requests == 3
        db = store.reader()
        assert Store.backlog(db) == {}
        db.close()
    finally:
        store.close()
