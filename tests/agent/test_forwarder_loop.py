# The outbox loop every forwarder shares: retry with backoff, and a stored
# frame that cannot be decoded does not block the ones behind it.
import asyncio
from pathlib import Path

from agent.forwarders.base import DeliveryError, Forwarder, document
from agent.forwarders.webhook import WebhookConfig
from agent.ingest import record_of
from agent.store import Ingest, Row, Store
from protocols import cipher, cose, messages


class RecordingBackend(Forwarder):
    """A test double at the backend boundary: it records documents, and
    fails the first `fail` deliveries."""

    fail = 2
    docs: list[dict[str, object]]

    async def deliver(self, rows: list[Row]) -> None:
        docs = [document(r, self.hub_id) for r in rows]
        if self.fail:
            self.fail -= 1
            raise DeliveryError("backend down")
        self.docs.extend(docs)


def test_retries_then_skips_an_undecodable_frame(tmp_path: Path) -> None:
    key = bytes(range(32))
    up = cose.MacKey(key, b"pb-f1", cose.AAD_UPLINK)
    good = [up.seal(messages.encoded(messages.SampleFrame(1, s, 1, s, s * 4, 512, 4, (1, 1), None, (0, 0, 0, 0),
                                                          [[1, 2, 3, 4]]), sealer=cipher.SampleCipher(key, bytes(16))))
            for s in range(3)]
    opener = cipher.SampleCipher(key)
    decoded = [messages.decode_payload(cose.parse(g).payload, messages.UPLINK_TYPES, decode_samples=False,
                                       opener=opener) for g in good]
    records = [record_of("pb-f1", m, m.channels, g, None) for m, g in zip(decoded, good)]  # type: ignore[arg-type]
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()

    async def scenario() -> RecordingBackend:
        await store.ingest(Ingest.frame(records[0], (1, 0, 1, None)))
        # A frame held without its samples (a store of schema 2 whose frame did not decode): never deliverable.
        await store.ingest(Ingest("pb-f1", 1, 1, 1, b"\xd1\x84not a frame", (1, 1, 3)))
        await store.ingest(Ingest.frame(records[2], (1, 2, 7, None)))
        fw = RecordingBackend(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10, linger_s=0),
                              store, "hub", asyncio.Event())
        fw.backoff.base_s = 0.01
        fw.docs = []
        task = asyncio.create_task(fw.run())
        for _ in range(200):
            if fw.forwarded >= 2:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return fw

    fw = asyncio.run(scenario())
    store.close()
    assert fw.failures == 2 and fw.undeliverable == 1
    assert [d["seq"] for d in fw.docs] == [0, 2]
    assert Store.backlog(Store(tmp_path / "store.db", ["rec"]).reader()) == {}
