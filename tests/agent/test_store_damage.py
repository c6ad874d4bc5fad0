# A damaged store is survived and reported (issue 12 §8): a damaged page, a
# damaged or truncated WAL (as after a power cut on a poor SD card). What can
# be read is recovered, the rest is counted, and every hole the hub can see
# in a board's stream becomes a gap record to every backend.
import asyncio
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent import store as store_mod
from agent.store import Ingest, Store

DEV = "pb-a"
COUNT = 512


def _frame(seq: int, epoch: int = 1) -> Ingest:
    # A board's ECG stream: contiguous sample indices, one seq per frame.
    return Ingest(DEV, epoch, seq, 1, os.urandom(1500), (epoch, seq, 1), stream=1, t0_ms=seq * 1000,
                  first_index=seq * COUNT, count=COUNT, samples=os.urandom(4 * COUNT))


def _ingest(s: Store, seqs: range, per_commit: int = 10) -> None:
    async def go() -> None:
        for first in range(seqs.start, seqs.stop, per_commit):
            await asyncio.gather(*(s.ingest(_frame(q)) for q in range(first, min(first + per_commit, seqs.stop))))

    asyncio.run(go())


def _gaps(s: Store, backend: str) -> list[dict[str, Any]]:
    db = s.reader()
    try:
        return [r.info for r in Store.fetch_outbox(db, backend, 100000) if r.kind == store_mod.KIND_GAP and r.info]
    finally:
        db.close()


def _stored_seqs(s: Store) -> set[int]:
    db = s.reader()
    try:
        return {r[0] for r in db.execute("SELECT seq FROM frames WHERE kind=1 AND device_id=?", (DEV,))}
    finally:
        db.close()


def _seqs_in(gaps: list[dict[str, Any]]) -> set[int]:
    return {q for g in gaps for a, b in g["seq_ranges"] for q in range(a, b + 1)}


def test_a_damaged_page_is_recovered_counted_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "store.db"
    s = Store(path, ["b1", "b2"], commit_interval_s=0)
    s.start()
    _ingest(s, range(600))
    s.close()  # checkpointed: everything is in store.db
    size = path.stat().st_size
    page = 4096
    victim = (size // page) * 2 // 5  # a page in the middle of the frames
    with open(path, "r+b") as f:
        f.seek(victim * page)
        f.write(os.urandom(page))
    with caplog.at_level(logging.CRITICAL, logger="agent.store"):
        s = Store(path, ["b1", "b2"], commit_interval_s=0)
        s.gap_settle_s = 0
        s.start()  # no exception: the agent starts and serves boards
    try:
        rec = s.recovery
        assert rec is not None and rec["unreadable_ranges"] >= 1
        assert any("STORE DAMAGED" in r.message for r in caplog.records)
        assert any("STORE RECOVERED" in r.message for r in caplog.records)
        kept = Path(rec["kept"])
        assert kept.exists() and kept.name.startswith("store.db.damaged-")  # kept under the retention policy
        assert s.status()["recovery"] == rec
        assert s.integrity_check() == "ok"
        held = _stored_seqs(s)
        assert 300 < len(held) < 600 and rec["rows_recovered"]["frames"] == len(held)
        db = s.reader()
        assert Store.backlog(db) == {"b1": len(held), "b2": len(held)}  # every recovered frame forwarded again
        db.close()
        assert s.load_windows()[DEV][:2] == (1, max(held))  # a replayed old frame is still refused
        # The board goes on (it dropped what was acked); the holes become gap records to every backend.
        _ingest(s, range(600, 610))
        asyncio.run(s.run(s.scan_gaps))
        for backend in ("b1", "b2"):
            gaps = _gaps(s, backend)
            assert gaps and all(g["reason"] == "stream_gap" and g["device_id"] == DEV and g["epoch"] == 1
                                for g in gaps)
            lost = set(range(600)) - held
            assert _seqs_in(gaps) == lost
            assert sum(g["samples_lost"] for g in gaps) == len(lost) * COUNT
        assert s.status()["gaps_found"] == len(_gaps(s, "b1"))
        # Purged once the retention period has passed.
        asyncio.run(s.run(lambda db: s.purge(db, -1)))
        assert not kept.exists()
    finally:
        s.close()


def test_a_store_whose_header_is_damaged_starts_empty_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    s = Store(path, ["b"], commit_interval_s=0)
    s.start()
    _ingest(s, range(50))
    s.close()
    with open(path, "r+b") as f:
        f.write(os.urandom(100))  # the header and the schema's first bytes
    s = Store(path, ["b"], commit_interval_s=0)
    s.start()
    try:
        assert s.recovery is not None and s.integrity_check() == "ok"
        _ingest(s, range(50, 60))  # boards are served
        assert _stored_seqs(s) >= set(range(50, 60))
    finally:
        s.close()


@pytest.mark.parametrize("damage", ["truncated", "damaged frame"])
def test_a_truncated_or_damaged_wal_becomes_a_gap_record(tmp_path: Path, damage: str) -> None:
    live = tmp_path / "live"
    live.mkdir()
    # No checkpoint: every commit stays in the WAL.
    s = Store(live / "store.db", ["b1", "b2"], wal_limit_bytes=256 << 20, commit_interval_s=0)
    s.start()
    try:
        _ingest(s, range(300))
        # A power cut now: the files as they are on the card.
        card = tmp_path / "card"
        card.mkdir()
        for suffix in ("", "-wal"):
            shutil.copy(str(live / "store.db") + suffix, str(card / "store.db") + suffix)
    finally:
        s.close()
    wal = card / "store.db-wal"
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            f.write(os.urandom(64))
    s = Store(card / "store.db", ["b1", "b2"], commit_interval_s=0)
    s.gap_settle_s = 0
    s.start()
    try:
        held = _stored_seqs(s)
        assert 0 < len(held) < 300 and held == set(range(len(held)))  # SQLite kept the commits before the damage
        assert s.load_windows()[DEV][:2] == (1, len(held) - 1)  # the window went back with them
        # The board had all 300 acknowledged and dropped them; it goes on from 300.
        _ingest(s, range(300, 320))
        asyncio.run(s.run(s.scan_gaps))
        for backend in ("b1", "b2"):
            gaps = _gaps(s, backend)
            assert len(gaps) == 1, gaps
            g = gaps[0]
            assert (g["device_id"], g["epoch"], g["stream"], g["reason"]) == (DEV, 1, "ecg", "stream_gap")
            assert g["seq_ranges"] == [[len(held), 299]]
            assert g["sample_index_range"] == [len(held) * COUNT, 300 * COUNT]
        assert s.integrity_check() == "ok"
        asyncio.run(s.run(s.scan_gaps))
        assert len(_gaps(s, "b1")) == 1  # reported once
    finally:
        s.close()


def test_a_backlog_resent_out_of_order_is_not_a_gap(tmp_path: Path) -> None:
    # A board that reconnects sends its backlog out of seq order over a few
    # seconds: seq 5 arrives (a later id) 3 s after seq 6 and 7. Scanned when
    # seq 6 had settled and seq 5 not yet, the stream showed a hole (512
    # samples "not held", a gap record to every backend) for a frame the hub held.
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    try:
        for seq in (0, 1, 2, 3, 4, 6, 7, 5):
            asyncio.run(s.ingest(_frame(seq)))
        t = time.time()

        def arrived(db: sqlite3.Connection) -> None:
            db.execute("UPDATE frames SET received_at = ? WHERE seq != 5", (t - 200,))
            db.execute("UPDATE frames SET received_at = ? WHERE seq = 5", (t - 197,))

        asyncio.run(s.run(arrived))
        s.gap_settle_s = 198.5  # seq 6 and 7 settled, seq 5 not yet
        assert asyncio.run(s.run(s.scan_gaps)) == 0 and _gaps(s, "b") == []
        s.gap_settle_s = 0  # seq 5 settled too: still no hole
        assert asyncio.run(s.run(s.scan_gaps)) == 0 and _gaps(s, "b") == []
        asyncio.run(s.ingest(_frame(9)))  # a real hole: seq 8 never comes
        assert asyncio.run(s.run(s.scan_gaps)) == 1
        assert [(g["sample_index_range"], g["seq_ranges"]) for g in _gaps(s, "b")] == [([8 * COUNT, 9 * COUNT],
                                                                                        [[8, 8]])]
    finally:
        s.close()


def test_fifo_overflow_is_not_a_hub_gap(tmp_path: Path) -> None:
    # Samples the sensor lost are the board's to report (fifo_overflows), not a gap at the hub.
    import numpy as np

    from agent.record import FrameRecord

    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.gap_settle_s = 0
    s.start()
    try:
        def frame(seq: int, first: int, fifo_lost: int) -> Ingest:
            f = FrameRecord(DEV, 1, seq, 1, 512, seq * 10, first, 4, 1, 1, None, 4, fifo_lost, 0, 0,
                            (np.arange(4, dtype=np.int32),), None, time.time(), b"frame %d" % seq)
            return Ingest.frame(f, (1, seq, 1, None))

        async def go() -> None:
            for it in (frame(0, 0, 0), frame(1, 4, 0), frame(2, 10, 2), frame(4, 20, 0)):
                await s.ingest(it)
            await s.run(s.scan_gaps)

        asyncio.run(go())
        gaps = _gaps(s, "b")
        assert [g["sample_index_range"] for g in gaps] == [[14, 20]]  # 8..10 the sensor lost; 14..20 the hub
        assert gaps[0]["seq_ranges"] == [[3, 3]]
    finally:
        s.close()


def test_integrity_check_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    _ingest(s, range(100))
    s.close()
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.integrity_check_s = 0  # a card too slow to check in time: opened unchecked, and the log says so
    with caplog.at_level(logging.WARNING, logger="agent.store"):
        s.open()
    s.close()
    assert any("not finished within" in r.message for r in caplog.records)
    assert sqlite3.connect(tmp_path / "store.db").execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 100
