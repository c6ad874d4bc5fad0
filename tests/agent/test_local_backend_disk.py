# The embedded local backend on a disk that fills up (a real small tmpfs):
# a batch it cannot store is one clear log line, counted and shown in its
# summary, answered 503 so that the hub sends it again; once space is back
# the same batch is stored, and nothing the hub sent is missing.
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest

from agent.dev.local_backend import LocalBackend
from agent.dev.tlsgen import make_pki
from tests.agent.test_store_faults import fill, small_filesystem


def _gaps(first: int, n: int) -> list[dict[str, object]]:
    # Gap records: documents the hub makes (no board key needed), each with its idempotency key.
    return [{"type": "gap", "device_id": "pb-t01", "epoch": 1, "seq_ranges": [[i, i]], "frames_dropped": 1,
             "reason": "disk_quota", "idempotency_key": "gap:pb-t01:1:%d" % i} for i in range(first, first + n)]


def test_a_full_disk_is_one_line_counted_and_the_batch_comes_again(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    with small_filesystem(tmp_path / "card", 1024) as card:
        backend = LocalBackend(card / "backend.db", {})

        async def scenario() -> list[int]:
            port = await backend.start("127.0.0.1", 0, pki.server_cert, pki.server_key)
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            url = "https://127.0.0.1:%d/ingest" % port
            statuses = []
            try:
                async with aiohttp.ClientSession() as http:
                    async def post(docs: list[dict[str, object]]) -> int:
                        async with http.post(url, data=json.dumps(docs), ssl=ctx,
                                             headers={"Content-Type": "application/json"}) as r:
                            await r.read()
                            return r.status

                    statuses.append(await post(_gaps(0, 5)))
                    await asyncio.to_thread(fill, card / "filler")
                    big = _gaps(5, 400)  # more than the pages SQLite still has room for
                    statuses.append(await post(big))
                    statuses.append(await post(big))  # the hub's retry, the disk still full
                    failing = dict(backend.summary())
                    (card / "filler").unlink()  # space is back
                    statuses.append(await post(big))
                    statuses.append(failing["store_failures"])
                    statuses.append(int(failing["store_failing"]))
            finally:
                await backend.stop()
            return statuses

        with caplog.at_level(logging.INFO):
            try:
                statuses = asyncio.run(scenario())
                keys = backend.keys_received()
                after = backend.summary()
            finally:
                backend.db.close()
    assert statuses == [200, 503, 503, 200, 2, 1], statuses
    assert keys == {"gap:pb-t01:1:%d" % i for i in range(405)}  # nothing sent is missing
    assert after["store_failures"] == 2 and not after["store_failing"], after
    assert "disk is full" in after["last_store_error"], after
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Before: aiohttp's "Error handling request" with a traceback, at each batch, answered 500.
    assert [r.getMessage() for r in errors] == [
        "local backend: cannot store a batch of 400 documents (OperationalError: database or disk is full); "
        "answered 503, the hub keeps it and sends it again (1 batches refused so far)"], errors
    assert all(r.exc_info is None for r in caplog.records), "a traceback was logged"
    assert any("storing again, after 2 batches" in r.getMessage() for r in caplog.records)
