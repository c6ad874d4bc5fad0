# Wire format version 1 (before the boot salt, key 15) after the hub's
# upgrade to version 2: frames a hub stored before it are still forwarded;
# a board still speaking version 1 is refused, visibly (SPEC.md, README:
# upgrade the hub first, then the boards).
import asyncio
import os
import sqlite3
from pathlib import Path

import cbor2

from agent.audit import AuditLog
from agent.forwarders.webhook import WebhookConfig
from agent.ingest import Ingestor, Outcome
from agent.registry import Registry
from agent.session import END_SILENT, BoardSession, BoardStats, SessionEnd
from agent.store import Store
from agent.transports.base import Transport
from protocols import hub
from tests.agent.test_forwarder_loop import RecordingBackend
from tests.waiting import async_wait_for

# A version 1 sample frame, as the firmware before the boot salt sealed it
# (protocols/ at ae63487^): device pb-v1old, key bytes(range(32)), epoch 7,
# seq 3, ECG, t0_ms 12000, first_index 2048, 512 Hz, 4 samples
# [100, 105, 98, -7], scale 1/20, encrypted under the version 1 sample key
# (HKDF-Expand of the device key, no salt). Literal bytes: no code of today
# can make them.
V1_KEY = bytes(range(32))
V1_FRAME = bytes.fromhex(
    "d1844da20105044870622d76316f6c64a05832ae0001010102070303040105192ee006190800071902000804098201140b84000000000c"
    "010d8146566d3400f1520e39fffb58205d68037cf26029f8228ead02da33c2651858c8edb43ae4650072845d7770161e")
# Its samples decrypted, as that hub stored them beside it (a CBOR array of byte strings).
V1_PLAIN = cbor2.dumps([bytes.fromhex("c8010a0dd101")])


# A store of schema 2, as the hub before records kept it: sample frames as they
# came, their samples decrypted but still encoded (plain), no samples column.
SCHEMA_2 = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE replay(device_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, top INTEGER NOT NULL,
    bitmap INTEGER NOT NULL, salt BLOB);
CREATE TABLE frames(id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind INTEGER NOT NULL, stream INTEGER, priority INTEGER NOT NULL, received_at REAL NOT NULL, t0_ms INTEGER,
    t0_utc_ms INTEGER, first_index INTEGER, count INTEGER, raw BLOB, info TEXT, plain BLOB,
    UNIQUE(device_id, epoch, seq));
CREATE TABLE outbox(backend TEXT NOT NULL, frame_id INTEGER NOT NULL, priority INTEGER NOT NULL,
    PRIMARY KEY(backend, frame_id)) WITHOUT ROWID;
INSERT INTO meta VALUES('schema', '2'), ('gap_scan_id', '1');
"""


def test_v1_frames_stored_before_the_upgrade_are_still_forwarded(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_2)
    old.execute("INSERT INTO frames(device_id, epoch, seq, kind, stream, priority, received_at, t0_ms, first_index, "
                "count, raw, plain) VALUES('pb-v1old', 7, 3, 1, 1, 0, 1700000000.0, 12000, 2048, 4, ?, ?)",
                (V1_FRAME, V1_PLAIN))
    old.execute("INSERT INTO outbox VALUES('rec', 1, 0)")
    old.commit()
    old.close()
    os.chmod(path, 0o600)
    store = Store(path, ["rec"])
    store.start()
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))

    async def scenario() -> RecordingBackend:
        ing = Ingestor(store, reg)  # the agent's start: what schema 2 kept undecoded is decoded once
        assert ing.upgraded == 1
        fw = RecordingBackend(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10, linger_s=0),
                              store, "hub", asyncio.Event())
        fw.fail = 0
        fw.docs = []
        task = asyncio.create_task(fw.run())
        await async_wait_for(lambda: bool(fw.docs or fw.undeliverable), 10, "the old frame forwarded")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return fw

    try:
        fw = asyncio.run(scenario())
    finally:
        store.close()
        reg.close()
    assert fw.undeliverable == 0
    (doc,) = fw.docs
    assert (doc["device_id"], doc["epoch"], doc["seq"], doc["first_index"], doc["count"]) == ("pb-v1old", 7, 3, 2048, 4)
    assert doc["channels"] == {"ecg": [100, 105, 98, -7]}
    assert doc["scale"]["num"] == 1 and doc["scale"]["den"] == 20
    assert doc["idempotency_key"] == "pb-v1old:7:3"
    assert doc["received_at"] == "2023-11-14T22:13:20Z"  # as it was stored


def test_a_board_still_on_v1_is_refused_visibly_and_nothing_acked(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add("pb-v1old", key=V1_KEY, actor="test")
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()
    try:
        async def refused() -> tuple[Ingestor, Outcome]:
            ing = Ingestor(store, reg)
            out = ing.submit(V1_FRAME, "test")
            for _ in range(250):  # the quarantine is written in the background
                db = store.reader()
                try:
                    if db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]:
                        break
                finally:
                    db.close()
                await asyncio.sleep(0.02)
            return ing, out

        ing, out = asyncio.run(refused())
        assert out.received.verdict == hub.REJECTED and out.received.reason == "malformed:version"
        assert out.received.device_id == "pb-v1old"  # authentic: the MAC verified, the version is what is refused
        assert out.acks == [] and out.stored is None
        assert ing.rejects["malformed:version"] == 1
        db = store.reader()
        try:
            assert db.execute("SELECT device_id, reason FROM quarantine").fetchall() == [("pb-v1old",
                                                                                          "malformed:version")]
            assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 0
        finally:
            db.close()
    finally:
        store.close()
        reg.close()


class FakeTransport(Transport):
    """A fake link at the boundary: plays the given uplink messages, then
    waits; records what the hub writes back."""

    name = "fake:v1"

    def __init__(self, uplink: list[bytes]) -> None:
        self.uplink = list(uplink)
        self.sent: list[bytes] = []
        self.discarded: dict[str, int] = {}

    async def open(self) -> None:
        pass

    async def receive(self) -> bytes:
        if self.uplink:
            return self.uplink.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(self, message: bytes) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        pass


def test_a_v1_board_session_ends_saying_to_update_its_firmware(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add("pb-v1old", key=V1_KEY, actor="test")
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()
    try:
        async def go() -> tuple[SessionEnd, FakeTransport]:
            tr = FakeTransport([V1_FRAME] * 3)
            session = BoardSession(tr, Ingestor(store, reg), BoardStats("", tr.name), identify_s=0.5)
            async with asyncio.timeout(30):
                return await session.run(), tr

        end, tr = asyncio.run(go())
        assert end.reason == END_SILENT
        assert "3 authentic messages in a wire format version other than this hub's (2)" in end.detail
        assert "update the board's firmware" in end.detail
        assert tr.sent == []  # nothing acknowledged
    finally:
        store.close()
        reg.close()
