import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from agent import store as store_mod
from agent.audit import AuditLog
from agent.registry import Registry, RegistryError
from agent.store import Ingest, Store, StoreError
from tests.conftest import IN_CI


def _item(seq: int, dev: str = "pb-a", raw_size: int = 200, duplicate: bool = False) -> Ingest:
    return Ingest(dev, 1, seq, 1, os.urandom(raw_size), (1, seq, 1), stream=1, t0_ms=seq * 1000,
                  first_index=seq * 512, count=512, duplicate=duplicate)


async def _ingest_all(s: Store, items: list[Ingest]) -> None:
    await asyncio.gather(*(s.ingest(i) for i in items))


def test_group_commit_outbox_per_backend_and_delivery(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.db", ["mqtt", "fhir"], commit_interval_s=0)
    s.start()
    try:
        asyncio.run(_ingest_all(s, [_item(i) for i in range(300)]))
        assert s.stats.ingested == 300 and s.stats.commits < 300  # many frames per commit
        db = s.reader()
        assert Store.backlog(db) == {"mqtt": 300, "fhir": 300}
        rows = Store.fetch_outbox(db, "mqtt", 50)
        assert [r.seq for r in rows] == list(range(50))
        asyncio.run(s.delivered("mqtt", [r.id for r in rows]))
        assert Store.backlog(db) == {"mqtt": 250, "fhir": 300}
        # a duplicate stores nothing new
        asyncio.run(s.ingest(_item(5, duplicate=True)))
        asyncio.run(s.ingest(_item(5)))  # and even if asked, the unique key holds
        assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 300
        assert s.load_windows()["pb-a"] == (1, 5, 1, None)  # the window of the last message committed
        assert s.integrity_check() == "ok"
    finally:
        s.close()
    assert (tmp_path / "store.db").stat().st_mode & 0o077 == 0


def test_on_commit_runs_on_the_loop_once_the_commits_waiters_are_settled(tmp_path: Path) -> None:
    # One hand-off to the event loop a commit: the frames' futures settled, then on_commit (it wakes
    # the forwarders), on the loop's own thread; not on the writer's thread, which took a second
    # call_soon_threadsafe to reach the loop. Once a commit.
    import threading

    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    futures: list[asyncio.Future[object]] = []
    calls: list[tuple[bool, bool]] = []  # (on the loop's thread, every future submitted done then)

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        s.on_commit = lambda: calls.append((threading.get_ident() == loop_thread, all(f.done() for f in futures)))
        s.start()
        for seq in range(2):
            futures.append(s.submit_ingest(_item(seq)))
            await futures[-1]
            await asyncio.sleep(0)  # what was handed over with the settles has run

    try:
        asyncio.run(scenario())
    finally:
        s.close()
    assert calls == [(True, True), (True, True)], calls


def test_replay_window_is_stored_with_the_frame(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    try:
        asyncio.run(s.ingest(Ingest("pb-a", 3, 17, 1, b"x", (3, 17, (1 << 64) - 1))))
    finally:
        s.close()
    s2 = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s2.open()
    w = s2.load_windows()["pb-a"]
    assert (w[0], w[1], store_mod.unsigned64(w[2])) == (3, 17, (1 << 64) - 1)
    s2.close()


def test_quota_drops_oldest_raw_first_and_queues_gap_records(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.db", ["b1"], quota_bytes=300_000, commit_interval_s=0)
    s.start()
    try:
        vitals = Ingest("pb-a", 1, 100000, 1, b"v" * 100, (1, 0, 0), priority=store_mod.PRIORITY_VITALS)
        asyncio.run(s.ingest(vitals))
        for first in range(0, 400, 20):  # commits far smaller than the quota, as in service
            asyncio.run(_ingest_all(s, [_item(i, raw_size=2000) for i in range(first, first + 20)]))
        db = s.reader()
        assert s.db_bytes(db) <= 300_000  # enforced after every commit, the WAL counted
        assert Store.counters(db)["quota_dropped"] > 0
        kept = [r[0] for r in db.execute("SELECT seq FROM frames WHERE kind=1 ORDER BY seq")]
        assert 100000 in kept  # vitals survive
        assert min(kept) > 0  # the oldest raw frames went
        gaps = [r for r in Store.fetch_outbox(db, "b1", 1000) if r.kind == store_mod.KIND_GAP]
        assert gaps and gaps[0].info and gaps[0].info["frames_dropped"] > 0
        order = [r.priority for r in Store.fetch_outbox(db, "b1", 1000)]
        assert order == sorted(order, reverse=True)  # vitals first, then gap records, then waveforms
        assert order[0] == store_mod.PRIORITY_VITALS and order[1] == store_mod.PRIORITY_GAP
        assert order[-1] == store_mod.PRIORITY_RAW
        # each gap record says which frames: device, epoch and seq ranges, all of them once
        lost = [seq for g in gaps for a, b in g.info["seq_ranges"] for seq in range(a, b + 1)]
        assert sorted(lost) == [seq for seq in range(400) if seq not in kept]
        assert {(g.info["device_id"], g.info["epoch"]) for g in gaps} == {("pb-a", 1)}
    finally:
        s.close()


def _one_by_one(tmp: Path, quota: int, frames: int, raw_size: int) -> tuple[int, list[int]]:
    # Frames committed one by one (as at a low rate): how many checks of the quota, free
    # space and WAL followed a commit, and db_bytes - quota after each commit.
    s = Store(tmp / "store.db", ["b1", "b2"], quota_bytes=quota, commit_interval_s=0)
    checks = []
    room = s._room
    s._room = lambda db: checks.append(1) or room(db)  # type: ignore[method-assign]
    s.start()
    try:
        db = s.reader()
        over = []
        for i in range(frames):
            asyncio.run(s.ingest(_item(i, raw_size=raw_size)))
            over.append(s.db_bytes(db) - quota)
        assert s.stats.commits == frames
        return len(checks), over
    finally:
        s.close()


def test_commits_with_room_left_skip_the_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The quota, free space and WAL are checked after a commit only once what was committed
    # since the last check might have used the room it left, or HOUSEKEEP_EVERY_S after it
    # (made too long to matter here).
    monkeypatch.setattr(store_mod, "HOUSEKEEP_EVERY_S", 3600.0)
    checks, over = _one_by_one(tmp_path, 50_000_000, 200, 1500)
    assert 0 < checks < 10, checks
    assert max(over) < 0


def test_the_quota_holds_between_checks_as_when_every_commit_is_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Near a small quota the room is small: checks come often, and what commits add between
    # two is bounded (store.ROOM_*). The store stays within its quota, WAL counted, after each
    # commit as well as it does when every commit is checked (the WAL may pass its limit by
    # a transaction before SQLite starts it over: that overshoot is the same either way).
    for every_s, where in ((0.0, "each"), (3600.0, "room")):
        monkeypatch.setattr(store_mod, "HOUSEKEEP_EVERY_S", every_s)
        (tmp_path / where).mkdir()
        checks, over = _one_by_one(tmp_path / where, 1_000_000, 700, 1500)
        if where == "each":
            assert checks == 700
            worst = max(over)
        else:
            assert checks < 700 and max(over) <= max(worst, 0), (checks, max(over), worst)


def test_quota_drops_what_every_backend_has_before_what_is_still_on_its_way(tmp_path: Path) -> None:
    # Vitals travel ahead of a waveform backlog: delivered, they are kept
    # only for retention. Over the quota they make way before any waveform
    # still waiting for its backend is lost.
    s = Store(tmp_path / "store.db", ["b1"], quota_bytes=300_000, commit_interval_s=0)
    s.start()
    try:
        vitals = [Ingest("pb-a", 1, 100000 + i, 1, os.urandom(2000), (1, 0, 0), priority=store_mod.PRIORITY_VITALS)
                  for i in range(40)]
        asyncio.run(_ingest_all(s, vitals))
        db = s.reader()
        asyncio.run(s.delivered("b1", [r.id for r in Store.fetch_outbox(db, "b1", 1000)]))
        for first in range(0, 200, 20):  # the backend is behind: none of these delivered yet
            asyncio.run(_ingest_all(s, [_item(i, raw_size=2000) for i in range(first, first + 20)]))
        assert s.db_bytes(db) <= 300_000
        kept_vitals = db.execute("SELECT COUNT(*) FROM frames WHERE seq >= 100000").fetchone()[0]
        kept_raw = {r[0] for r in db.execute("SELECT seq FROM frames WHERE kind=1 AND seq < 100000")}
        gaps = [r.info for r in Store.fetch_outbox(db, "b1", 1000) if r.kind == store_mod.KIND_GAP]
        lost = {seq for g in gaps if g for a, b in g["seq_ranges"] for seq in range(a, b + 1)}
        assert lost == set(range(200)) - kept_raw  # each undelivered frame dropped has its gap record
        assert kept_vitals == 0, (kept_vitals, len(lost))  # every delivered one went before any was lost
        assert 0 < len(lost) < 200 - 40 + 10
        st = s.status()  # what pulsebridge status and the page read: not "ok" and nothing more
        assert st["short_of_space"] == "disk_quota" and st["dropped_undelivered"] == len(lost), st
    finally:
        s.close()


def test_purge_only_delivered_and_old(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    try:
        asyncio.run(_ingest_all(s, [_item(i) for i in range(10)]))
        db = s.reader()
        rows = Store.fetch_outbox(db, "b", 4)
        asyncio.run(s.delivered("b", [r.id for r in rows]))
        assert asyncio.run(s.run(lambda d: s.purge(d, 3600))) == 0  # too recent
        time.sleep(0.05)  # the rows' age: older than the 0.01 s asked below, however busy the machine
        assert asyncio.run(s.run(lambda d: s.purge(d, 0.01))) == 4  # delivered ones only
        assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 6
    finally:
        s.close()


def test_erase_removes_every_trace(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    try:
        asyncio.run(_ingest_all(s, [_item(i, "pb-a") for i in range(5)] + [_item(i, "pb-b") for i in range(3)]))
        asyncio.run(s.reject("bad_mac", "serial:x", "pb-a", b"forged"))
        n = asyncio.run(s.run(lambda d: s.erase_device(d, "pb-a")))
        assert n == 5
        db = s.reader()
        for q in ("SELECT COUNT(*) FROM frames WHERE device_id='pb-a'", "SELECT COUNT(*) FROM quarantine",
                  "SELECT COUNT(*) FROM replay WHERE device_id='pb-a'"):
            assert db.execute(q).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 3
    finally:
        s.close()


def test_store_and_registry_refuse_files_others_can_read(tmp_path: Path) -> None:
    p = tmp_path / "store.db"
    sqlite3.connect(p).close()
    os.chmod(p, 0o644)
    with pytest.raises(StoreError, match="readable by others"):
        Store(p, [], commit_interval_s=0).open()
    r = tmp_path / "registry.db"
    sqlite3.connect(r).close()
    os.chmod(r, 0o640)
    with pytest.raises(RegistryError, match="chmod 600"):
        Registry(r, AuditLog(tmp_path / "audit.log"))


def test_registry_audit_and_no_secrets(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    reg = Registry(tmp_path / "registry.db", audit)
    a = reg.add("pb-0001", label="chambre 2")
    b = reg.add("pb-0002")
    assert a.key != b.key and len(a.key) == 32
    assert a.key.hex() not in repr(a)
    reg.revoke("pb-0001", "board lost")
    with pytest.raises(RegistryError):
        reg.add("PB 1")
    actions = [e["action"] for e in audit.entries()]
    assert actions == ["device.add", "device.add", "device.revoke"]
    text = (tmp_path / "audit.log").read_text()
    assert a.key.hex() not in text and b.key.hex() not in text
    assert (tmp_path / "audit.log").stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError):
        audit.record("x", key=b"secret")


def test_what_the_status_page_reads_back(tmp_path: Path) -> None:
    # Each backend's oldest waiting frame, each device's last frame, and the alerts raised and cleared:
    # what the status page tells and what a restarted agent recalls.
    s = Store(tmp_path / "store.db", ["mqtt", "fhir"], commit_interval_s=0)
    s.start()
    try:
        asyncio.run(_ingest_all(s, [_item(i) for i in range(10)] + [_item(i, dev="pb-b") for i in range(3)]))
        db = s.reader()
        asyncio.run(s.delivered("mqtt", [r.id for r in Store.fetch_outbox(db, "mqtt", 1000)]))
        oldest = Store.oldest_waiting(db, ["mqtt", "fhir"])
        assert list(oldest) == ["fhir"]  # mqtt has nothing waiting
        assert oldest["fhir"] == db.execute("SELECT MIN(received_at) FROM frames").fetchone()[0]
        last_a = db.execute("SELECT received_at FROM frames WHERE device_id='pb-a' AND seq=9").fetchone()[0]
        assert Store.last_received(db, "pb-a") == last_a
        assert Store.last_received(db, "pb-none") is None
        for seq, state in ((1, "raised"), (2, "cleared"), (3, "raised")):
            doc = {"type": "alert", "device_id": "pb-a", "alert": "board_silent", "state": state, "value": 130.0}
            asyncio.run(s.ingest(Ingest("pb-a", -3, seq, store_mod.KIND_ALERT, b"", None,
                                        priority=store_mod.PRIORITY_ALERT, info=doc)))
        assert [d["state"] for d in Store.recent_alerts(db, 10)] == ["raised", "cleared", "raised"]
        assert [d["state"] for d in Store.recent_alerts(db, 2)] == ["cleared", "raised"]  # the latest, in order
        assert Store.last_received(db, "pb-a") == last_a  # the hub's own records are not the board's frames
    finally:
        s.close()


def test_a_store_of_schema_3_is_taken_on_its_frames_read_as_stored(tmp_path: Path) -> None:
    # Schema 3 kept a frame's header as JSON (info) and its samples as int16 steps: such rows are
    # forwarded as they are, new ones are packed (schema 4), and an agent of schema 3 is refused the store.
    import json
    import struct

    import numpy as np

    from agent.record import FrameRecord

    path = tmp_path / "store.db"
    s = Store(path, ["b"], commit_interval_s=0)
    s.open()
    s.close()
    db = sqlite3.connect(path)
    header = {"rate_hz": 512, "scale": [1, 2], "ppg_drive": None, "flags": 0, "fifo_lost_samples": 0,
              "frames_dropped_by_board": 0, "jitter_us": 5, "channels": 1, "samples": "steps16", "first": [1000]}
    db.execute("INSERT INTO frames(id, device_id, epoch, seq, kind, stream, priority, received_at, t0_ms, t0_utc_ms, "
               "first_index, count, raw, info, samples) VALUES(1, 'pb-a', 1, 0, 1, 1, 0, 1.0, 0, NULL, 0, 4, "
               "x'd1', ?, ?)", (json.dumps(header), struct.pack("<3h", 1, -2, 3)))
    db.execute("INSERT INTO outbox VALUES('b', 1, 0)")
    db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    db.commit()
    db.close()
    s = Store(path, ["b"], commit_interval_s=0)
    s.start()
    try:
        f = FrameRecord("pb-a", 1, 1, 1, 512, 1000, 4, 4, 1, 2, None, 0, 0, 0, 5,
                        (np.array([7, 8, 9, 10], dtype=np.int32),), None, 2.0, b"\xd2")
        asyncio.run(s.ingest(Ingest.frame(f, (1, 1, 3, None))))
        db = s.reader()
        try:
            rows = Store.fetch_outbox(db, "b", 10)
            schema = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
        finally:
            db.close()
    finally:
        s.close()
    assert schema == str(store_mod.SCHEMA_VERSION) == "4"
    frames = [r.frame for r in rows]
    assert [fr.channels[0].tolist() for fr in frames if fr is not None] == [[1000, 1001, 999, 1002], [7, 8, 9, 10]]
    assert rows[1].info is None  # packed: header and samples in one column


def test_an_audit_record_the_disk_cuts_short_leaves_no_half_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a disk with room for part of a record: os.write wrote what fitted and returned its count, unchecked,
    # so half a JSON line stayed in the log (entries() then failed on it, and on every record after it)
    import errno

    from agent import audit as audit_module
    from agent.audit import AuditError

    audit = AuditLog(tmp_path / "audit.log")
    audit.record("device.add", "pb-0001")
    before = (tmp_path / "audit.log").read_bytes()
    real_write = os.write

    def room_for_20_bytes(fd: int, data: bytes) -> int:  # the fault: what a nearly full disk does
        if len(data) <= 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[:20])

    monkeypatch.setattr(audit_module.os, "write", room_for_20_bytes)
    with pytest.raises(AuditError, match=r"audit log .* cannot be written \(No space left on device\)"):
        audit.record("device.revoke", "pb-0001", reason="board lost")
    monkeypatch.undo()
    assert (tmp_path / "audit.log").read_bytes() == before
    audit.record("device.revoke", "pb-0001", reason="board lost")
    assert [e["action"] for e in audit.entries()] == ["device.add", "device.revoke"]


def test_a_key_file_made_beforehand_by_someone_else_is_replaced_not_written_into(tmp_path: Path) -> None:
    # write_private opened an existing file with O_TRUNC and wrote the key into it: a file another user
    # had made there beforehand (mode 0666, theirs) got the key, and stayed theirs to read or chmod back
    # (the key was also in a file readable by others between the write and the chmod)
    from agent.registry import write_private

    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("making a file another user owns needs root; CI runs as root")
        pytest.skip("making a file another user owns needs root")
    path = tmp_path / "pb-0001.key"
    path.write_bytes(b"")
    os.chown(path, 65534, 65534)  # nobody's
    os.chmod(path, 0o666)
    other_name = tmp_path / "their-link"
    os.link(path, other_name)  # what its owner keeps a hold of
    write_private(path, b"00" * 32 + b"\n")
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o600), st
    assert path.read_bytes() == b"00" * 32 + b"\n" and other_name.read_bytes() == b""
    write_private(path, b"11" * 32 + b"\n")  # and again, over its own file
    assert path.read_bytes() == b"11" * 32 + b"\n" and path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pb-0001.key", "their-link"]  # no temporary left
    fifo = tmp_path / "a-pipe"
    os.mkfifo(fifo)  # as /dev/stdout would be: not replaced by a file, not written to
    with pytest.raises(OSError, match="not a regular file"):
        write_private(fifo, b"22" * 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-pipe", "pb-0001.key", "their-link"]
