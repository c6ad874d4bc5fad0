"""The opt-in Prometheus endpoint: `[metrics] listen = "127.0.0.1:9464"` in the config.

GET /metrics answers the Prometheus text format, made by prometheus_client
from the agent's own counters at each scrape (nothing is counted twice):

- pulsebridge_frames_stored_total{device_id}: frames verified and stored, per
  registered board (labels only from registered ids: a forged frame's claimed
  id never becomes a label, so a peer cannot grow the label set);
- pulsebridge_backend_forwarded_total / _failures_total / _refused_total
  {backend}, and the gauge pulsebridge_backend_backlog{backend};
- pulsebridge_frames_rejected_total{reason}: frames refused at ingest, per
  reason (a fixed set, the ingestor's);
- pulsebridge_boards_connected: links connected now.

Counters count from the agent's start (Prometheus handles the reset at a
restart). Served on the agent's loop (aiohttp), so it reads the agent's state
without locks; loopback unless configured otherwise, and it exposes counts
only, never a key or a sample.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class AgentCollector:
    """Reports .latest: the agent's status snapshot, plus "frames_stored": {device id: n}."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.latest
        stored = CounterMetricFamily("pulsebridge_frames_stored", "Frames verified and stored, per board",
                                     labels=["device_id"])
        for device_id, n in sorted(snap.get("frames_stored", {}).items()):
            stored.add_metric([device_id], n)
        yield stored
        rejected = CounterMetricFamily("pulsebridge_frames_rejected", "Frames refused at ingest, per reason",
                                       labels=["reason"])
        for reason, n in sorted(snap.get("rejects", {}).items()):
            rejected.add_metric([reason], n)
        yield rejected
        families = {k: CounterMetricFamily("pulsebridge_backend_" + k, help_text, labels=["backend"])
                    for k, help_text in (("forwarded", "Records a backend acknowledged"),
                                         ("failures", "Deliveries to a backend that failed (retried)"),
                                         ("refused", "Records a backend refused for good (quarantined)"))}
        backlog = GaugeMetricFamily("pulsebridge_backend_backlog", "Records waiting for a backend", labels=["backend"])
        for b in snap.get("backends", []):
            for k, fam in families.items():
                fam.add_metric([b["name"]], b.get(k) or 0)
            backlog.add_metric([b["name"]], b.get("backlog") or 0)
        yield from families.values()
        yield backlog
        yield GaugeMetricFamily("pulsebridge_boards_connected", "Board links connected now",
                                value=sum(1 for b in snap.get("boards", []) if b.get("state") == "connected"))


class MetricsServer:
    """snapshot(): the agent's state (AgentCollector.latest), taken afresh at each scrape."""

    def __init__(self, snapshot: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.snapshot = snapshot
        self.collector = AgentCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.collector.latest = await self.snapshot()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: any free port); returns the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
