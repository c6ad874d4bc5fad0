# The outbox loop every forwarder shares: retry with backoff, and a stored
# frame that cannot be decoded does not block the ones behind it.
import asyncio
import sqlite3
import threading
from pathlib import Path
from unittest import mock

import pytest

from agent.forwarders.base import DeliveryError, Forwarder, RefusedError, document
from agent.forwarders.webhook import WebhookConfig
from agent.ingest import FrameRecord, record_of
from agent.store import Ingest, Row, Store
from protocols import cipher, cose, messages
from tests.waiting import async_wait_for


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


def _record(device_id: str, seq: int, channel: list[int]) -> FrameRecord:
    """A board's sample frame `seq` (epoch 1, one channel of 4 samples), sealed and MACed under a
    test key as the board sends it, then read as ingest reads it: its record."""
    key = bytes(range(32))
    raw = cose.MacKey(key, device_id.encode(), cose.AAD_UPLINK).seal(messages.encoded(
        messages.SampleFrame(1, seq, 1, seq, seq * 4, 512, 4, (1, 1), None, (0, 0, 0, 0), [channel]),
        sealer=cipher.SampleCipher(key, bytes(16))))
    m = messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES, decode_samples=False,
                                opener=cipher.SampleCipher(key))
    return record_of(device_id, m, m.channels, raw, None)  # type: ignore[arg-type]


def test_retries_then_skips_an_undecodable_frame(tmp_path: Path) -> None:
    records = [_record("pb-f1", s, [1, 2, 3, 4]) for s in range(3)]
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


def test_the_documents_subjects_are_read_off_the_event_loop(tmp_path: Path) -> None:
    # The patient each board serves comes from the registry (SQLite, blocking): a forwarder reads it
    # on a thread before it delivers, never on the loop that serves the boards. (Before: in document().)
    from agent.audit import AuditLog
    from agent.forwarders.base import Subjects
    from agent.registry import Registry

    key = bytes(range(32))
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add("pb-s1", patient_ref="Patient/7", key=key, actor="test")
    record = _record("pb-s1", 0, [1, 2, 3, 4])
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()
    read_on_loop: list[bool] = []
    read_all = Registry._all

    def spied(self: Registry, db: object) -> object:
        try:
            asyncio.get_running_loop()
            read_on_loop.append(True)
        except RuntimeError:
            read_on_loop.append(False)
        return read_all(self, db)  # type: ignore[arg-type]

    class WithSubjects(RecordingBackend):
        async def deliver(self, rows: list[Row]) -> None:
            self.docs.extend(self.document(r) for r in rows)

    async def scenario() -> WithSubjects:
        await store.ingest(Ingest.frame(record, (1, 0, 1, None)))
        fw = WithSubjects(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10, linger_s=0),
                          store, "hub", asyncio.Event(), Subjects(reg))
        fw.docs = []
        task = asyncio.create_task(fw.run())
        try:
            await async_wait_for(lambda: fw.forwarded >= 1, 30, "the frame forwarded")
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return fw

    try:
        with mock.patch.object(Registry, "_all", spied):
            fw = asyncio.run(scenario())
    finally:
        store.close()
        reg.close()
    assert [d["subject"] for d in fw.docs] == ["Patient/7"]
    assert read_on_loop and not any(read_on_loop), read_on_loop


def test_a_missing_or_unsafe_secret_file_is_told_at_start(tmp_path: Path, caplog: "pytest.LogCaptureFixture") -> None:
    # Nothing is waiting to be sent: before, a missing token file was only found at the first
    # delivery, and a hub with no board streaming yet said nothing at all.
    from agent.forwarders.mqtt import MqttConfig, MqttForwarder
    from agent.forwarders.webhook import WebhookForwarder

    unsafe = tmp_path / "mqtt.password"
    unsafe.write_text("not-a-secret-anymore\n")
    unsafe.chmod(0o644)
    store = Store(tmp_path / "store.db", ["hook", "broker"])
    store.start()

    async def scenario() -> list[Forwarder]:
        fws: list[Forwarder] = [
            WebhookForwarder(WebhookConfig(name="hook", type="webhook", url="https://x",
                                           bearer_token_file=tmp_path / "nope.token"), store, "hub", asyncio.Event()),
            MqttForwarder(MqttConfig(name="broker", type="mqtt", url="mqtts://x", username="hub",
                                     password_file=unsafe), store, "hub", asyncio.Event())]
        tasks = [asyncio.create_task(fw.run()) for fw in fws]
        await async_wait_for(lambda: all(fw.last_error for fw in fws), 30, "both backends telling their secret file",
                             lambda: [fw.last_error for fw in fws])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return fws

    with caplog.at_level("WARNING", logger="agent.forwarders.base"):
        hook, broker = asyncio.run(scenario())
    store.close()
    assert "bearer token file %s: no such file" % (tmp_path / "nope.token") in hook.last_error, hook.last_error
    assert "Errno" not in hook.last_error  # Python's "[Errno 2] No such file or directory: '...'" was shown
    assert "MQTT password" in broker.last_error and "chmod 600" in broker.last_error
    assert hook.forwarded == broker.forwarded == 0
    told = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert any("backend hook" in m for m in told) and any("backend broker" in m for m in told), told
    assert not any("not-a-secret-anymore" in r.getMessage() for r in caplog.records)  # never the secret itself


class RefusingBackend(Forwarder):
    """A test double at the backend boundary: it refuses every row for good (a permanent 4xx),
    and says when it did."""

    refusing: asyncio.Event

    async def deliver(self, rows: list[Row]) -> None:
        self.refusing.set()
        raise RefusedError(400, "no such patient")


def test_the_status_counts_a_refusal_when_the_store_commits_it(tmp_path: Path) -> None:
    # A refusal leaves the outbox and is counted in one transaction; the status reads its count there,
    # with the backlog. Before, it showed the forwarder's own counter, bumped only once the forwarder's
    # task ran again after the commit: in between, the status said backlog 0 and one refusal fewer
    # than the quarantine held, and an agent stopped then (a CI run: 6 against 7) never counted it.
    from agent import config as agent_config
    from agent.store import KIND_VITAL, PRIORITY_VITALS
    from agent.supervisor import Agent
    from tests.agent import harness
    from tests.waiting import wait_for

    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n'
                    '[[backend]]\nname = "ehr"\ntype = "webhook"\nurl = "https://127.0.0.1:9/none"\nlinger_s = 0\n'
                    % (tmp_path / "data", tmp_path / "log", tmp_path / "run"))
    cfg = agent_config.load(path)
    agent = Agent(cfg)
    fw = RefusingBackend(cfg.backends[0], agent.store, "test-hub", agent.wakes[0])
    fw.refusing = asyncio.Event()
    agent.forwarders = [fw]

    def quarantined() -> int:
        db = agent.store.reader()
        try:
            return int(db.execute("SELECT COUNT(*) FROM quarantine WHERE link='backend:ehr'").fetchone()[0])
        finally:
            db.close()

    async def scenario() -> list[dict[str, object]]:
        async with harness.running(agent):
            await agent.store.ingest(Ingest("pb-v1", -2, 1, KIND_VITAL, b"", None, priority=PRIORITY_VITALS, info={
                "type": "vital", "kind": "heart_rate", "device_id": "pb-v1", "value": 71.0, "unit": "/min",
                "at": "2026-11-30T10:00:01.000Z", "quality": 0.9, "source_frames": ["pb-v1:1:1"]}))
            await asyncio.wait_for(fw.refusing.wait(), 60)
            # The forwarder has handed the refusal to the store. The loop is held here (no await) until
            # the store has committed it, so the forwarder's task cannot run meanwhile; the status then.
            wait_for(quarantined, 60, "the refusal committed")
            during = agent.snapshot()["backends"]
            # The agent stops before the forwarder's task ran again, as in the CI run.
        return during  # type: ignore[no-any-return]

    during = asyncio.run(scenario())
    assert during[0]["backlog"] == 0 and during[0]["refused"] == 1 == quarantined()


def test_a_forwarder_stopped_during_a_read_closes_its_connection_only_after_it(tmp_path: Path) -> None:
    # The outbox is read on a thread through the forwarder's own connection. Stopped (cancelled)
    # during that read, the forwarder closed the connection at once while the thread still used
    # it: in SQLite's C code that is a segfault (seen at the end of bench runs). A slow read
    # (injected) must now end on an open connection, and the stop wait for it.
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()
    reading = threading.Event()
    release = threading.Event()
    outcome: list[str] = []
    real_fetch = Store.fetch_outbox

    def slow_fetch(db: sqlite3.Connection, backend: str, limit: int) -> list[Row]:
        reading.set()
        release.wait(30)
        try:
            return real_fetch(db, backend, limit)
        except sqlite3.ProgrammingError as e:  # "Cannot operate on a closed database."
            outcome.append("closed under the read: %s" % e)
            raise
        finally:
            outcome.append("read ended")

    async def scenario() -> None:
        fw = RecordingBackend(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10, linger_s=0),
                              store, "hub", asyncio.Event())
        fw.docs = []
        with mock.patch.object(Store, "fetch_outbox", staticmethod(slow_fetch)):
            task = asyncio.create_task(fw.run())
            await async_wait_for(reading.is_set, 30, "the forwarder's read to start")
            task.cancel()
            await asyncio.sleep(0)  # the cancellation is delivered; the read still runs
            threading.Timer(0.2, release.set).start()
            with pytest.raises(asyncio.CancelledError):
                await task

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        store.close()
    assert outcome == ["read ended"]


class HoldingBackend(Forwarder):
    """A test double at the backend boundary: each delivery waits for `go` (cleared
    again once taken), the delivery numbered `fail_at` fails; what it took is recorded."""

    fail_at = 2
    taken: list[list[int]]
    go: asyncio.Event
    inside: bool = False

    async def deliver(self, rows: list[Row]) -> None:
        self.inside = True
        try:
            await self.go.wait()
            self.go.clear()
            if len(self.taken) + 1 == self.fail_at:
                self.fail_at = 0
                raise DeliveryError("backend down")
            self.taken.append([r.seq for r in rows])
        finally:
            self.inside = False


def test_the_next_batch_is_read_while_one_is_delivered_and_each_row_goes_once(tmp_path: Path) -> None:
    # Batches overlap (the next one read while one is delivered, a delivered one marked while
    # the next goes): the read ahead leaves out the rows in flight and those being marked, so
    # each row is delivered once, in order; a failed delivery drops the read ahead, and its rows
    # go again. forwarded counts rows once marked (their outbox rows gone).
    n = 25
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()
    reads_during_delivery = 0
    real_fetch = Store.fetch_outbox

    async def scenario() -> HoldingBackend:
        nonlocal reads_during_delivery
        for s in range(n):
            await store.ingest(Ingest.frame(_record("pb-f2", s, [1, 2, 3, s]), (1, s, 1, None)))
        fw = HoldingBackend(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10, linger_s=0),
                            store, "hub", asyncio.Event())
        fw.backoff.base_s = 0.01
        fw.taken, fw.go = [], asyncio.Event()

        def spying_fetch(*args: object) -> list[Row]:  # counts the reads made while a delivery is held
            nonlocal reads_during_delivery
            reads_during_delivery += fw.inside
            return real_fetch(*args)  # type: ignore[arg-type]

        with mock.patch.object(Store, "fetch_outbox", staticmethod(spying_fetch)):
            task = asyncio.create_task(fw.run())
            try:
                for _ in range(4):  # 10 delivered, 10 failed, then those 10 and the last 5
                    await async_wait_for(lambda: fw.inside and not fw.go.is_set(), 30, "a delivery waiting")
                    fw.go.set()
                await async_wait_for(lambda: fw.forwarded == n, 30, "every row marked forwarded",
                                     lambda: (fw.forwarded, fw.taken))
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        return fw

    fw = asyncio.run(scenario())
    store.close()
    assert fw.failures == 1
    assert [s for batch in fw.taken for s in batch] == list(range(n)), fw.taken
    assert reads_during_delivery >= 1
    assert Store.backlog(Store(tmp_path / "store.db", ["rec"]).reader()) == {}


def test_at_a_low_rate_a_forwarder_reads_the_outbox_once_a_batch(tmp_path: Path) -> None:
    # Frames committed one at a time, each forwarded before the next comes: a batch short of the
    # batch size is the whole outbox, so nothing is read ahead, and the forwarder waits for the
    # next commit (its wake-up, cleared before each read) instead of reading the outbox again.
    # Before: a read, a read ahead and a read after the marking, for each frame.
    n = 12
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()
    reads = 0
    real_fetch = Store.fetch_outbox

    def counting_fetch(*args: object) -> list[Row]:
        nonlocal reads
        reads += 1
        return real_fetch(*args)  # type: ignore[arg-type]

    async def scenario() -> RecordingBackend:
        wake = asyncio.Event()
        store.on_commit = wake.set
        fw = RecordingBackend(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10, linger_s=0),
                              store, "hub", wake)
        fw.fail, fw.docs = 0, []
        with mock.patch.object(Store, "fetch_outbox", staticmethod(counting_fetch)):
            task = asyncio.create_task(fw.run())
            try:
                for s in range(n):
                    await store.ingest(Ingest.frame(_record("pb-f3", s, [1, 2, 3, s]), (1, s, 1, None)))
                    await async_wait_for(lambda s=s: fw.forwarded == s + 1, 30, "frame %d forwarded" % s)  # type: ignore[misc]
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                store.on_commit = None
        return fw

    fw = asyncio.run(scenario())
    store.close()
    assert [d["seq"] for d in fw.docs] == list(range(n))
    # One read a frame, and one more after each marking's own commit (its wake-up) at most.
    assert reads <= 2 * n + 2, reads


class StoppedWhileDelivering(Forwarder):
    """A test double at the backend boundary: its first delivery succeeds at once (no await)
    while the forwarder is being stopped (its task cancelled then, as the agent's stop does)."""

    task: "asyncio.Task[None]"
    delivered: list[int]

    async def deliver(self, rows: list[Row]) -> None:
        self.task.cancel()
        self.delivered.extend(r.seq for r in rows)


def test_a_stop_during_a_delivery_ends_the_read_ahead_and_marks_what_was_delivered(tmp_path: Path) -> None:
    # Stopped just as a batch was delivered: the next batch's read (started before the delivery)
    # ends on its thread before the reader closes, and the delivered batch is still marked. With
    # the read ahead as a task of its own, the stop cancelled it before it ran: the read's
    # coroutine was never awaited (a RuntimeWarning, an error here; seen once under load).
    store = Store(tmp_path / "store.db", ["rec"])
    store.start()

    async def scenario() -> StoppedWhileDelivering:
        for s in range(15):
            await store.ingest(Ingest.frame(_record("pb-f3", s, [1, 2, 3, s]), (1, s, 1, None)))
        fw = StoppedWhileDelivering(WebhookConfig(name="rec", type="webhook", url="https://x", batch=10,
                                                  linger_s=0), store, "hub", asyncio.Event())
        fw.delivered = []
        fw.task = asyncio.create_task(fw.run())
        with pytest.raises(asyncio.CancelledError):
            await fw.task
        return fw

    try:
        fw = asyncio.run(scenario())
        import gc

        gc.collect()  # a coroutine never awaited is told when it is collected
        assert fw.delivered == list(range(10)) and fw.forwarded == 10
        db = store.reader()
        try:
            assert Store.backlog(db) == {"rec": 5}
        finally:
            db.close()
    finally:
        store.close()


def test_a_missing_or_unreadable_tls_file_is_named_at_start(tmp_path: Path) -> None:
    # a ca_file or client certificate that is missing said "FileNotFoundError: [Errno 2] No such file or
    # directory" (which of the three files?), one that is no PEM "SSLError: [SSL] PEM lib (_ssl.c:3905)",
    # and only once a reading was to be sent
    from agent.forwarders.mqtt import MqttConfig, MqttForwarder

    notpem = tmp_path / "hub.pem"
    notpem.write_text("not a certificate\n")
    store = Store(tmp_path / "store.db", ["a", "b", "c"])
    store.start()
    cases = {"a": (dict(ca_file=tmp_path / "ca.pem"), "ca_file %s: no such file" % (tmp_path / "ca.pem")),
             "b": (dict(ca_file=notpem), "ca_file %s: no CA certificate in it (PEM)" % notpem),
             "c": (dict(client_cert=notpem), "client_cert %s cannot be loaded with its key (PEM certificate and "
                                              "private key?)" % notpem)}

    async def scenario() -> dict[str, str]:
        fws = {name: MqttForwarder(MqttConfig(name=name, type="mqtt", url="mqtts://x", **kw), store, "hub",
                                   asyncio.Event()) for name, (kw, _) in cases.items()}
        tasks = [asyncio.create_task(fw.run()) for fw in fws.values()]
        await async_wait_for(lambda: all(fw.last_error for fw in fws.values()), 30, "each telling its TLS file",
                             lambda: [fw.last_error for fw in fws.values()])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {name: fw.last_error for name, fw in fws.items()}

    try:
        errors = asyncio.run(scenario())
    finally:
        store.close()
    for name, (_, says) in cases.items():
        assert says in errors[name], errors[name]
        assert "Errno" not in errors[name] and "_ssl.c" not in errors[name], errors[name]
