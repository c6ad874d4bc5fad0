"""The embedded local backend: a small HTTPS receiver the project ships.

It stands for a telemonitoring backend in the demo and in tests. It takes
webhook batches (JSON or CBOR), checks every sample frame end to end (the
COSE tag under the device's key, and that the decoded fields the hub sent
match the signed ones), and stores each once by its idempotency key,
answering 200 only after its own commit. GET /summary tells what it holds.

A batch it cannot store (its disk full, an I/O error) is rolled back
whole and answered 503 ("later": the hub keeps it and sends it again), so
nothing the hub was told is stored is lost; the failure is one log line
(again at most every LOG_EVERY_S while it lasts, and once when storing
works again), counted, and shown in its summary (store_failures,
store_failing, last_store_error).
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any

import cbor2
from aiohttp import web

from protocols import cipher, cose, messages

log = logging.getLogger(__name__)

# While its storage keeps failing, the backend says so again at most this often.
LOG_EVERY_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received(
    key TEXT PRIMARY KEY, type TEXT NOT NULL, device_id TEXT, stream TEXT, first_index INTEGER, count INTEGER,
    body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


async def serve_https(app: web.Application, host: str, port: int, cert: Path, key: Path) -> tuple[web.AppRunner, int]:
    """Serves app over TLS; returns its runner and the port it got (port 0: any free one)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx)
    await site.start()
    return runner, int(runner.addresses[0][1])


class LocalBackend:
    def __init__(self, db_path: Path, keys: dict[str, bytes]) -> None:
        self.keys = {dev: cose.MacKey(k, dev.encode(), cose.AAD_UPLINK) for dev, k in keys.items()}
        self.openers = {dev: cipher.SampleCipher(k) for dev, k in keys.items()}
        self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.fail_next = 0  # tests: answer 503 to this many batches
        self.store_failures = 0  # batches it could not store (answered 503), since start
        self.last_store_error = ""
        self.store_failing = False  # the last batch could not be stored
        self._logged_at = 0.0

    def _bump(self, name: str, n: int = 1) -> None:
        self.db.execute("INSERT INTO stats VALUES(?,?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value",
                        (name, n))

    def _check(self, doc: dict[str, Any]) -> str | None:
        if doc.get("type") in ("gap", "vital", "alert"):
            return None  # made by the hub, not signed by a board
        dev = doc.get("device_id")
        key = self.keys.get(str(dev))
        if key is None:
            return "unknown device"
        raw = base64.b64decode(doc["cose"])
        try:
            msg = cose.parse(raw)
            key.verify(msg)
            m = messages.decode_payload(msg.payload, messages.UPLINK_TYPES, opener=self.openers[str(dev)])
        except Exception as e:
            return "does not verify: %s" % e
        if isinstance(m, messages.OriginCheckpoint):  # its content is for pulsebridge verify-origin
            return None if doc.get("type") == "origin_checkpoint" else "an origin checkpoint sent as %r" % doc.get(
                "type")
        assert isinstance(m, messages.SampleFrame)
        if (m.epoch, m.seq, m.first_index, m.count) != (doc["epoch"], doc["seq"], doc["first_index"], doc["count"]):
            return "decoded fields differ from the signed frame"
        if list(doc["channels"].values()) != m.channels:
            return "samples differ from the signed frame"
        if doc["idempotency_key"] != "%s:%d:%d" % (dev, m.epoch, m.seq):
            return "wrong idempotency key"
        return None

    async def ingest(self, request: web.Request) -> web.Response:
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="try later")
        body = await request.read()
        docs = cbor2.loads(body) if request.content_type == "application/cbor" else json.loads(body)
        if not isinstance(docs, list):
            return web.Response(status=400, text="expected an array")
        try:
            self.db.execute("BEGIN")
            for doc in docs:
                problem = self._check(doc)
                if problem:
                    self._bump("invalid")
                    continue
                cur = self.db.execute("INSERT OR IGNORE INTO received VALUES(?,?,?,?,?,?,?)", (
                    doc["idempotency_key"], doc["type"], doc.get("device_id"), doc.get("stream"),
                    doc.get("first_index"), doc.get("count"), json.dumps(doc)))
                self._bump("stored" if cur.rowcount else "duplicates")
            self.db.execute("COMMIT")
        except sqlite3.Error as e:  # its disk full, an I/O error: nothing of the batch kept, the hub resends it
            return self._cannot_store(len(docs), e)
        if self.store_failing:
            log.warning("local backend: storing again, after %d batches it could not store", self.store_failures)
            self.store_failing = False
        return web.json_response({"ok": True})

    def _cannot_store(self, n: int, e: sqlite3.Error) -> web.Response:
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:  # SQLite may have rolled it back itself
                pass
        self.store_failures += 1
        self.last_store_error = "%s: %s" % (type(e).__name__, e)
        now = time.monotonic()
        if not self.store_failing or now - self._logged_at >= LOG_EVERY_S:
            log.error("local backend: cannot store a batch of %d documents (%s); answered 503, the hub keeps it and "
                      "sends it again (%d batches refused so far)", n, self.last_store_error, self.store_failures)
            self._logged_at = now
        self.store_failing = True
        return web.Response(status=503, text="cannot store: %s" % self.last_store_error)

    def summary(self) -> dict[str, Any]:
        stats = {k: v for k, v in self.db.execute("SELECT name, value FROM stats")}
        per: dict[str, dict[str, dict[str, int]]] = {}
        for dev, stream, n, samples in self.db.execute(
                "SELECT device_id, stream, COUNT(*), SUM(count) FROM received WHERE type='samples' "
                "GROUP BY device_id, stream"):
            per.setdefault(dev, {})[stream] = {"frames": n, "samples": samples}
        gaps = self.db.execute("SELECT COUNT(*) FROM received WHERE type='gap'").fetchone()[0]
        vitals: dict[str, list[float]] = {}
        for (body,) in self.db.execute("SELECT body FROM received WHERE type='vital'"):
            d = json.loads(body)
            vitals.setdefault(d["kind"], []).append(d["value"])
        alerts = self.db.execute("SELECT COUNT(*) FROM received WHERE type='alert'").fetchone()[0]
        return {"frames": sum(v["frames"] for d in per.values() for v in d.values() if "frames" in v),
                "by_device": per,
                "gap_records": gaps, "duplicates": stats.get("duplicates", 0), "invalid": stats.get("invalid", 0),
                "vitals": {k: {"n": len(v), "median": sorted(v)[len(v) // 2]} for k, v in vitals.items()},
                "alerts": alerts, "store_failures": self.store_failures, "store_failing": self.store_failing,
                "last_store_error": self.last_store_error}

    def keys_received(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM received")}

    async def handle_summary(self, request: web.Request) -> web.Response:
        return web.json_response(self.summary())

    async def start(self, host: str, port: int, cert: Path, key: Path) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/ingest", self.ingest)
        app.router.add_get("/summary", self.handle_summary)
        self.runner, self.port = await serve_https(app, host, port, cert, key)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
