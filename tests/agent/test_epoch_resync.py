# A board whose boot epoch went back (epoch file lost, rolled back, flash
# restored from an image) on the hub's side: its frames are refused, never
# taken for duplicates, and each refusal brings an authenticated epoch
# resync back; the replay state (salt included) survives a restart of the hub.
import asyncio
import secrets
import sqlite3
from pathlib import Path

from agent.audit import AuditLog
from agent.ingest import Ingestor, Outcome, Volatile
from agent.registry import Registry
from agent.session import BoardSession, BoardStats
from agent.store import Ingest, Store
from protocols import cipher, cose, hub, messages
from tests.agent.test_wire_v1 import FakeTransport

DEV = "pb-roll01"


def _frame(key: bytes, epoch: int, seq: int, salt: bytes, sample: int = 1) -> bytes:
    f = messages.SampleFrame(epoch, seq, messages.STREAM_ECG_MAX30003, seq * 1000, seq * 4, 512, 4, (1, 1), None,
                             (0, 0, 0, 0), [[sample, 2, 3, 4]])
    return cose.MacKey(key, DEV.encode(), cose.AAD_UPLINK).seal(
        messages.encoded(f, sealer=cipher.SampleCipher(key, salt)))


def _down(key: bytes, raw: bytes) -> messages.Message:
    msg = cose.parse(raw)
    cose.MacKey(key, DEV.encode(), cose.AAD_DOWNLINK).verify(msg)
    return messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)


def _submit_all(ing: Ingestor, raws: list[bytes]) -> list[Outcome]:
    async def go() -> list[Outcome]:
        outs = []
        for r in raws:  # as a session does: one judged (the store read, if need be) before the next
            out = ing.submit(r, "test")
            outs.append(await out.judging if out.judging is not None else out)
        await asyncio.gather(*(o.stored for o in outs if o.stored is not None))
        return outs
    return asyncio.run(go())


def _stored(store: Store) -> dict[tuple[int, int], bytes]:
    db = store.reader()
    try:
        return {(e, s): raw for e, s, raw in db.execute("SELECT epoch, seq, raw FROM frames WHERE device_id=?",
                                                         (DEV,))}
    finally:
        db.close()


def test_same_epoch_from_another_boot_is_refused_and_resynced_never_a_duplicate(tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=key, actor="test")
    salt_a, salt_b = secrets.token_bytes(16), secrets.token_bytes(16)
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    try:
        ing = Ingestor(store, reg)
        first = [_frame(key, 5, s, salt_a) for s in range(10)]
        assert all(o.received.verdict == hub.ACCEPTED for o in _submit_all(ing, first))
    finally:
        store.close()
    # The hub restarts: the window, salt included, comes back from the store.
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    try:
        ing = Ingestor(store, reg)
        # The same (epoch, seq) again, bytes for byte: a true duplicate, acked again.
        dup, = _submit_all(ing, [first[3]])
        assert dup.received.verdict == hub.DUPLICATE and dup.acks
        # The board booted again with its epoch file rolled back by one boot:
        # epoch 5 again, seqs from 0 (inside the window), another salt.
        again = [_frame(key, 5, s, salt_b, sample=7) for s in (0, 3, 9, 10, 11)]
        outs = _submit_all(ing, again)
        for o in outs:
            assert o.received.verdict == hub.REJECTED, o.received
            assert o.received.reason == "replay:epoch_rollback"
            (reply,) = o.acks  # no ack: the epoch resync only
            assert _down(key, reply) == messages.EpochResync(5, 5)
        assert ing.rejects["replay:epoch_rollback"] == 5
        stored = _stored(store)
        assert sorted(stored) == [(5, s) for s in range(10)]  # nothing of boot B taken for boot A's
        assert stored[(5, 3)] == first[3]
        # The board moved its epoch past the newest: its frames are new frames.
        after = [_frame(key, 6, s, salt_b, sample=7) for s in range(3)]
        assert all(o.received.verdict == hub.ACCEPTED and o.acks for o in _submit_all(ing, after))
        assert sorted(_stored(store))[-3:] == [(6, 0), (6, 1), (6, 2)]
        # An earlier boot's epoch: refused with the newest epoch named.
        old, = _submit_all(ing, [_frame(key, 4, 0, secrets.token_bytes(16))])
        assert old.received.reason == "replay:old_epoch"
        assert _down(key, old.acks[0]) == messages.EpochResync(4, 6)
        assert store.load_windows()[DEV] == (6, 2, 0b111, salt_b)
    finally:
        store.close()
        reg.close()


def test_store_from_before_salts_learns_the_salt_and_too_old_other_bytes_are_no_duplicate(tmp_path: Path) -> None:
    # A store made before boot salts: its replay table had no salt column.
    key = secrets.token_bytes(32)
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=key, actor="test")
    salt_a, salt_b = secrets.token_bytes(16), secrets.token_bytes(16)
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    first = [_frame(key, 5, s, salt_a) for s in range(80)]
    try:
        _submit_all(Ingestor(store, reg), first)
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "store.db")
    db.execute("CREATE TABLE r(device_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, top INTEGER NOT NULL, "
               "bitmap INTEGER NOT NULL)")  # as the schema was
    db.execute("INSERT INTO r SELECT device_id, epoch, top, bitmap FROM replay")
    db.execute("DROP TABLE replay")
    db.execute("ALTER TABLE r RENAME TO replay")
    db.commit()
    db.close()
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    try:
        ing = Ingestor(store, reg)
        epoch, top, _, salt = store.load_windows()[DEV]
        assert (epoch, top, salt) == (5, 79, None)
        # Below the window, same (epoch, seq) as a stored frame, other bytes
        # (another boot): not a duplicate.
        o, = _submit_all(ing, [_frame(key, 5, 2, salt_b, sample=9)])
        assert o.received.verdict == hub.REJECTED and o.received.reason == "replay:too_old" and not o.acks
        # The very frame again is one.
        o, = _submit_all(ing, [first[2]])
        assert o.received.verdict == hub.DUPLICATE and o.acks
        # The next sample frame of the epoch teaches the window its salt.
        o, = _submit_all(ing, [_frame(key, 5, 80, salt_a)])
        assert o.received.verdict == hub.ACCEPTED
        assert store.load_windows()[DEV][3] == salt_a
        o, = _submit_all(ing, [_frame(key, 5, 81, salt_b)])
        assert o.received.reason == "replay:epoch_rollback" and o.acks
    finally:
        store.close()
        reg.close()


def test_the_session_sends_the_resync_back_on_the_link(tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=key, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    salt = secrets.token_bytes(16)
    try:
        async def go() -> FakeTransport:
            tr = FakeTransport([_frame(key, 3, 0, salt), _frame(key, 1, 0, salt), _frame(key, 3, 1, salt)])
            session = BoardSession(tr, Ingestor(store, reg), BoardStats("", tr.name))
            task = asyncio.create_task(session.run())
            async with asyncio.timeout(30):
                while len(tr.sent) < 3:
                    await asyncio.sleep(0.02)
            task.cancel()
            return tr

        tr = asyncio.run(go())
        ack, resync, ack2 = (_down(key, raw) for raw in tr.sent)
        assert ack == messages.Ack(3, [(0, 0)]) and ack2 == messages.Ack(3, [(1, 1)])
        assert resync == messages.EpochResync(1, 3)
    finally:
        store.close()
        reg.close()


def test_the_bare_simulator_hub_sends_the_resync_too() -> None:
    # pulsebridge sim (Volatile: verify and ack, store nothing) serves a stale board the same way.
    key = secrets.token_bytes(32)
    h = hub.Hub()
    h.add_device(DEV, key)
    v = Volatile(h)
    salt = secrets.token_bytes(16)
    assert v.submit(_frame(key, 5, 0, salt), "sim").received.verdict == hub.ACCEPTED
    out = v.submit(_frame(key, 2, 0, salt), "sim")
    assert out.received.reason == "replay:old_epoch"
    assert [_down(key, a) for a in out.acks] == [messages.EpochResync(2, 5)]


def test_a_recovered_store_keeps_the_windows_salt(tmp_path: Path) -> None:
    # A damaged store is recovered row by row (store.py): the replay windows'
    # boot salts come with them, so a rolled-back boot is still told apart.
    path = tmp_path / "store.db"
    salt = secrets.token_bytes(16)
    s = Store(path, ["b"], commit_interval_s=0)
    s.start()

    async def go() -> None:
        for seq in range(300):
            await s.ingest(Ingest(DEV, 1, seq, 1, secrets.token_bytes(1500), (1, seq, 1, salt), stream=1,
                                  t0_ms=seq * 1000, first_index=seq * 512, count=512,
                                  samples=secrets.token_bytes(2048)))
    asyncio.run(go())
    s.close()
    page = 4096
    with open(path, "r+b") as f:
        f.seek((path.stat().st_size // page) * 2 // 5 * page)  # a page among the frames
        f.write(secrets.token_bytes(page))
    s = Store(path, ["b"], commit_interval_s=0)
    s.start()
    try:
        assert s.recovery is not None
        assert s.load_windows()[DEV] == (1, 299, 1, salt)
    finally:
        s.close()
