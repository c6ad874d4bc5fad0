"""The hub's durable store: SQLite in WAL mode, one writer thread.

A frame is acknowledged to its board only once it is committed here, with
the device's replay window updated in the same transaction. Many frames
share a commit (group commit, as databases do it): an idle writer commits a
frame as soon as it arrives; the frames that arrive while a commit (its
fsync) is under way make up the next one, so under load batches grow by
themselves. A board frame that comes less than commit_interval_s after the
previous commit began waits out the rest of it, with whatever else comes:
commits are capped at 1/commit_interval_s a second whatever the load, which
bounds what the card is written per second. Small writes nobody waits on
to answer a board (forwarders' marks, the hub's vitals) ride with the next
board frame's commit while frames come (JOIN_WAIT_S). The writer then wakes every
waiter. Each backend has its own
outbox; a row leaves it only when that backend has acknowledged the frame.

Disk quota policy (explicit, per priority): when the database passes its
quota, the oldest raw waveform frames (priority RAW) are deleted first,
even if not yet forwarded; derived vitals and alerts (priority VITALS and
ALERT) are deleted only if raw waveforms alone cannot bring it back under
the quota. Every deletion is counted, and each backend that had not yet
received the deleted frames gets a gap record (forwarded like a frame,
ahead of waveforms) saying which device lost how many frames and when.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from agent.errors import PulsebridgeError
from agent.record import FrameRecord, stored_fifo_lost

log = logging.getLogger(__name__)

# 3: sample frames stored decoded (header in info, JSON; samples as int16 steps or int32);
# 4: their header and samples packed in samples (agent/record.py), info NULL (3's rows still read).
SCHEMA_VERSION = 4

# Priorities: higher is forwarded first and deleted last.
PRIORITY_RAW = 0
PRIORITY_GAP = 5
PRIORITY_VITALS = 8
PRIORITY_ALERT = 10

KIND_FRAME = 1  # a board's sample frame (messages.T_SAMPLES): info holds its header, samples its samples
KIND_ORIGIN = 10  # a board's origin checkpoint (messages.T_ORIGIN), stored and forwarded as it came
KIND_GAP = 100  # a gap record, stored as a frame row with no COSE bytes
KIND_VITAL = 101  # a vital derived on the hub (info holds it)
KIND_ALERT = 102  # an alert raised or cleared on the hub

# Transactions hold at most this many ingests: bounds the time a commit
# takes and so the latency of the acks waiting for it.
MAX_BATCH = 512
# Frame ids an outbox read may leave out: a forwarder's batch in flight and the one whose
# delivery is being committed, each at most config's backend.batch bound (1000); well under
# SQLite's bound on a statement's parameters (32766).
MAX_EXCLUDED = 2000
# Commits of board frames begin at most this often (a frame that comes sooner after
# the previous commit waits out the rest, with whatever else comes meanwhile). Each
# commit rewrites the pages it touches (indexes, outbox, replay window) whole, some
# 11 kB on the card whatever it holds, plus some 2.6 kB per frame (`./run bench
# agent` prints the figures): frames committed one by one cost the card 4.4x what 20
# a commit do. 15 ms: at 20 boards x 2 streams (frames 25 ms apart) no frame waits
# for the interval, so an ack waits for its own commit only (issue 13: p99 20 ms);
# under heavier load it caps commits at some 66 a second (100 boards: half the bytes
# of no cap). A card's life over latency: raise it (agent.toml commit_interval_ms;
# 500 ms: 2 commits/s, 3.2 kB a frame, acks after 0.25-0.5 s). README, Benchmarks.
COMMIT_INTERVAL_S = 0.015
# Small writes nobody waits on to answer a board (a forwarder's marks of what its backend
# took, the hub's vitals and alerts, rejects) ride with the next board frame's commit while
# board frames come (one was committed within BOARDS_FLOWING_S), waiting for it at most
# JOIN_WAIT_S: one commit (its fsync, its pages rewritten) for both. At 20 boards x 2
# streams (frames 25 ms apart) that is 5-6 commits a second fewer (bench agent --part
# realistic). A write of more than JOIN_ROWS rows (a backlog's drain) never waits.
JOIN_WAIT_S = 0.05
BOARDS_FLOWING_S = 0.1
JOIN_ROWS = 64
# Frames inserted by one statement (the rest of a batch one by one): 14 values a row
# stay below the 999 variables an older SQLite allows a statement.
INSERT_ROWS = 64
_INSERT_FRAMES = ("INSERT OR IGNORE INTO frames(device_id, epoch, seq, kind, stream, priority, received_at, t0_ms, "
                  "t0_utc_ms, first_index, count, raw, info, samples) VALUES ")
_INSERT_FRAMES_MANY = _INSERT_FRAMES + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"] * INSERT_ROWS)
_INSERT_FRAMES += "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
# Pages of a new store: a commit writes every page it touches whole, and
# most of ours touch a few bytes of an index or outbox page.
PAGE_SIZE = 1024
# Rejected messages kept for forensics (oldest go first).
QUARANTINE_ROWS = 1000
# A quarantined message is kept whole: SPEC.md bounds a link message at 4224 B.
QUARANTINE_RAW_BYTES = 4224
# A commit that failed for want of storage is retried after this, doubling
# up to the cap: quick to resume once space returns, a few log lines an hour
# at worst while it does not.
COMMIT_RETRY_FIRST_S = 0.05
COMMIT_RETRY_CAP_S = 5.0
# The WAL is truncated back to this after each checkpoint (journal_size_limit;
# SQLite checkpoints at 1000 pages, 4 MB): the quota counts the WAL at this
# size, or at its real size when a long reader made it grow further.
WAL_LIMIT_BYTES = 4 * 1024 * 1024
# How long the writer waits for readers to let the WAL be truncated.
WAL_TRUNCATE_WAIT_MS = 50
# How long a connection waits for a lock before failing (sqlite3's timeout).
BUSY_TIMEOUT_MS = 30_000
# The store leaves at least this much of its file system free (statvfs),
# counting what its WAL and checkpoints will still take: room for the logs,
# the registry and the rest of the system.
MIN_FREE_BYTES = 8 * 1024 * 1024
# When the file system runs short, the live pages are held this far below
# the file's size, so that the next batches fit in pages freed for them.
FREE_SPACE_ROOM_BYTES = 1024 * 1024
# ... made this much at a time (after each commit): what is deleted is
# written to the WAL first, and the WAL's room is what is short.
FREE_SPACE_STEP_BYTES = 128 * 1024
# The status says the store is short of space for this long after it last
# deleted a frame not yet delivered (the loss stays counted in the log and the gap records).
SHORT_OF_SPACE_SHOWN_S = 600.0
# Frames not yet delivered make way for free space only while the store's
# live pages exceed this: below it, deleting them gives the file system
# nothing it would notice, and on a card with less than MIN_FREE_BYTES +
# WAL_LIMIT_BYTES free a backend one batch behind lost every frame (1000 of
# 1000 on a 12 MB card). What the store may then take from MIN_FREE_BYTES
# is bounded: this plus its WAL, 5 MB of the 8. Delivered frames still go.
FREE_SPACE_KEEP_UNDELIVERED_BYTES = 1024 * 1024
# The integrity check at start (PRAGMA quick_check) is given this long; a
# store too large to check in time is opened unchecked, and the log says so.
INTEGRITY_CHECK_S = 20.0
# A stream is checked for holes once its frames are this old: a board
# resends what was not acknowledged well within it, filling a hole that was
# only a frame in flight.
GAP_SETTLE_S = 120.0
# How often the writer looks for holes in the boards' streams.
GAP_SCAN_EVERY_S = 30.0
# The quota, the file system's free space and the WAL's size are checked after a commit
# (some 5 PRAGMAs, a statvfs and 2 stats: a fifth of a lone frame's commit) once this long
# has passed since the last check, or at once if what was committed since might have used
# up the room that check left (ROOM_* bound it). Whoever else fills the card is seen within it.
HOUSEKEEP_EVERY_S = 1.0
# A bound on what a commit can add to the store's pages, and as much again to its WAL:
# each row's content twice over (overflow pages half used, a page split copying it), a
# page a row and a page for each backend's outbox entry (the indexes' leaves, split at
# worst), and 32 pages for the interior pages of the trees it touches.
ROOM_CONTENT_FACTOR = 2
ROOM_ROW_BYTES = PAGE_SIZE
ROOM_COMMIT_BYTES = 32 * PAGE_SIZE
# What a stored job's future holds when the store refused the frame and kept
# it in quarantine instead: it is acknowledged (durably kept, counted,
# reported) so that it cannot stall its board; it is not forwarded.
QUARANTINED = "quarantined"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replay(
    device_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, top INTEGER NOT NULL, bitmap INTEGER NOT NULL, salt BLOB);
CREATE TABLE IF NOT EXISTS frames(
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
    kind INTEGER NOT NULL, stream INTEGER, priority INTEGER NOT NULL,
    received_at REAL NOT NULL, t0_ms INTEGER, t0_utc_ms INTEGER, first_index INTEGER, count INTEGER,
    raw BLOB, info TEXT, plain BLOB, samples BLOB,
    UNIQUE(device_id, epoch, seq));
CREATE INDEX IF NOT EXISTS frames_age ON frames(priority, id);
CREATE TABLE IF NOT EXISTS outbox(
    backend TEXT NOT NULL, frame_id INTEGER NOT NULL, priority INTEGER NOT NULL,
    PRIMARY KEY(backend, frame_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_order ON outbox(backend, priority DESC, frame_id);
CREATE TABLE IF NOT EXISTS quarantine(
    id INTEGER PRIMARY KEY, at REAL NOT NULL, link TEXT, device_id TEXT, reason TEXT NOT NULL, raw BLOB);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stream_marks(
    device_id TEXT NOT NULL, epoch INTEGER NOT NULL, stream INTEGER NOT NULL,
    next_index INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    PRIMARY KEY(device_id, epoch, stream));
"""


# A device's replay window as stored: epoch, top, bitmap, and the boot salt
# of that epoch's sample frames (None: none seen yet). See protocols/replay.py.
Window = tuple[int, int, int, "bytes | None"]


class StoreError(PulsebridgeError):
    """The store cannot be used: wrong permissions, wrong schema, disk failure."""


@dataclass
class Ingest:
    """One authenticated uplink message to store (or, if duplicate, to re-ack)."""

    device_id: str
    epoch: int
    seq: int
    kind: int
    raw: bytes
    # The device's replay window after this message (None: hub-made); a
    # 3-tuple (epoch, top, bitmap) stands for a window with no salt.
    window: Window | tuple[int, int, int] | None
    stream: int | None = None
    t0_ms: int | None = None
    first_index: int | None = None
    count: int | None = None
    priority: int = PRIORITY_RAW
    duplicate: bool = False
    t0_utc_ms: int | None = None  # the first sample's time, from the board clock's mapping to UTC
    # Hub-made records (vitals, alerts): their content (already JSON when a str).
    info: dict[str, Any] | str | None = None
    # Sample frames: their record's header and samples decoded (FrameRecord.stored()), kept
    # beside the frame as it came (encrypted, MACed): forwarding needs neither a key nor the codec.
    samples: bytes | None = None
    received_at: float | None = None  # UTC s when it arrived (None: when committed)

    @classmethod
    def frame(cls, f: FrameRecord, window: Window | None, duplicate: bool = False) -> Ingest:
        """A board's sample frame, decoded, with its device's replay window once it is stored."""
        return cls(f.device_id, f.epoch, f.seq, KIND_FRAME, f.raw, window, f.stream, f.t0_ms, f.first_index,
                   f.count, duplicate=duplicate, t0_utc_ms=f.t0_utc_ms, samples=None if duplicate else f.stored(),
                   received_at=f.received_at)


_ROW_COLUMNS = ("f.id, f.device_id, f.epoch, f.seq, f.kind, f.stream, f.priority, f.received_at, f.raw, f.info, "
                "f.t0_utc_ms, f.samples, f.t0_ms, f.first_index, f.count")


def _row(r: Sequence[Any]) -> Row:
    """A Row from a SELECT of _ROW_COLUMNS."""
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]) if r[9] else None, r[10],
               r[11], r[12], r[13], r[14])


@dataclass
class Row:
    id: int
    device_id: str
    epoch: int
    seq: int
    kind: int
    stream: int | None
    priority: int
    received_at: float
    raw: bytes | None
    info: dict[str, Any] | None
    t0_utc_ms: int | None = None
    samples: bytes | None = None
    t0_ms: int | None = None
    first_index: int | None = None
    count: int | None = None

    @property
    def frame(self) -> FrameRecord | None:
        """The sample frame this row holds, decoded at ingest (None: not a sample
        frame, or one stored without its samples, which cannot be forwarded)."""
        if self.kind != KIND_FRAME or self.raw is None or self.samples is None:
            return None
        try:
            return FrameRecord.from_stored(self.device_id, self.epoch, self.seq, self.stream or 0, self.t0_ms or 0,
                                           self.t0_utc_ms, self.first_index or 0, self.count or 0, self.received_at,
                                           self.raw, self.info, self.samples)
        except (ValueError, KeyError, TypeError, IndexError):
            return None


@dataclass
class _Job:
    kind: str
    args: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass
class _Unit:
    """One write of a job, as the writer commits it: a job's one message, or one
    of an ingest group's (index: its place in the group)."""

    job: _Job
    kind: str
    args: Any
    index: int = 0


def _units(job: _Job) -> list[_Unit]:
    if job.kind == "ingests":
        return [_Unit(job, "ingest", it, i) for i, it in enumerate(job.args)]
    return [_Unit(job, job.kind, job.args)]


def _has_board_frame(units: list[_Unit]) -> bool:
    # A board's frame comes with its device's replay window; hub-made records and the rest do not.
    return any(u.kind == "ingest" and u.args.window is not None for u in units)


def _may_join(units: list[_Unit]) -> int:
    # The rows of units that may wait to ride with a board frame's commit (JOIN_WAIT_S); -1:
    # one may not (a board's frame or a duplicate, whose ack waits; a call, which someone awaits).
    rows = 0
    for u in units:
        if u.kind == "delivered":
            rows += len(u.args[1])
        elif u.kind == "reject" or (u.kind == "ingest" and u.args.kind in (KIND_VITAL, KIND_ALERT)):
            rows += 1
        else:
            return -1
    return rows


@dataclass
class StoreStats:
    commits: int = 0
    ingested: int = 0
    commit_failures: int = 0  # attempts that failed for want of storage (each retried)
    faults_recovered: int = 0
    refused: int = 0  # frames the store refused, kept in quarantine
    gaps_found: int = 0  # holes found in the boards' streams (each a gap record to every backend)
    # Frames the quota or the free-space policy deleted before every backend had them (each in a gap record).
    dropped_undelivered: int = 0
    last_drop_at: float | None = None  # when the last of them went, UTC s
    last_drop_reason: str = ""  # disk_quota | disk_free


def check_private(path: Path, what: str) -> None:
    """Refuses a secret or health-data file that others can read."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError("%s %s is readable by others (mode %o): run chmod 600 %s" % (
            what, path, stat.S_IMODE(st.st_mode), path))
    if st.st_uid != os.geteuid():
        raise StoreError("%s %s belongs to uid %d, not to this service (uid %d)" % (
            what, path, st.st_uid, os.geteuid()))


# Less free than this on the data directory's disk: what SQLite calls "disk I/O error" or "database or
# disk is full" is most likely a full card (a WAL's first page and its index take some 40 kB).
_LOW_FREE_BYTES = 1 << 20


def disk_full_hint(directory: Path) -> str:
    """'': the disk holding directory has room (or cannot be asked); else words saying it is full."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    if free >= _LOW_FREE_BYTES:
        return ""
    return ": its disk is full (%d kB free on %s): free some space and try again" % (free // 1024, directory)


def wal_holds_commits(path: Path) -> bool:
    """True if the SQLite file at path has a -wal file that is not empty: commits that only a
    connection able to write the -shm file (the WAL's index) can read."""
    try:
        return os.path.getsize(str(path) + "-wal") > 0
    except FileNotFoundError:
        return False


def read_as_it_stands(path: Path) -> sqlite3.Connection:
    """A query-only connection to the SQLite file at path (WAL mode) that writes nothing, not even
    the -shm file every WAL reader maps: on a full card, making that file fails ("disk I/O error")
    and no ordinary connection can read. It reads the main file as it stands (SQLite's immutable=1):
    right only while the -wal file holds no commit (wal_holds_commits) and nobody checkpoints into
    the file, so only while nobody can write it."""
    db = sqlite3.connect("file:%s?mode=ro&immutable=1" % urllib.parse.quote(str(path)), uri=True,
                         isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA query_only=ON")
    return db


class Store:
    def __init__(self, path: Path, backends: list[str], quota_bytes: int = 0,
                 min_free_bytes: int = MIN_FREE_BYTES, wal_limit_bytes: int = WAL_LIMIT_BYTES,
                 commit_interval_s: float = COMMIT_INTERVAL_S) -> None:
        self.path = path
        self.backends = list(backends)
        self.quota_bytes = quota_bytes  # 0: no quota
        self.min_free_bytes = min_free_bytes  # 0: the file system's free space is not watched
        self.commit_interval_s = commit_interval_s  # 0: board frames never wait for the previous commit
        self._last_commit_at = float("-inf")  # time.monotonic() when the last commit began
        self._board_frame_at = float("-inf")  # ... the last commit that held a board frame
        # A small quota gets a WAL to match (an eighth of it), checkpointed as often.
        self.wal_limit_bytes = min(wal_limit_bytes, quota_bytes // 8) if quota_bytes else wal_limit_bytes
        self.stats = StoreStats()
        # The writer's jobs. A SimpleQueue (C, no Condition in Python): at a low rate each put and
        # each wake-up of the writer runs with cold caches, and Queue's Python locking cost some
        # 45 us of CPU a hand-off more (put 40 us, get 30 us, against 13 and 16).
        self._q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._closing = threading.Event()
        self.integrity_check_s = INTEGRITY_CHECK_S
        self.gap_settle_s = GAP_SETTLE_S
        self._gap_scan_at = 0.0
        # What the last check of the quota, free space and WAL left to the commits after it
        # (bytes; <= 0: check after the next commit), and when it was made (time.monotonic()).
        self._room_bytes = 0
        self._checked_at = float("-inf")
        # What the last start found and recovered, if the store was damaged (status, JSON-ready).
        self.recovery: dict[str, Any] | None = None
        # The storage fault commits are waiting on (None: none), and since when (UTC seconds).
        self.fault: str | None = None
        self.fault_since: float | None = None
        # Why the store is open for reading only (None: it is not): it could not be written at
        # start (open(read_only_if_unwritable=True)); the writer opens it for writing once it can.
        self.read_only: str | None = None
        # Called on the event loop once a commit's waiters are settled, in the same hand-off to the
        # loop (one wake-up of it a commit, not two); also once the store opens for writing after a fault.
        self.on_commit: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that submitted last (on_commit's)
        self._held_reader: sqlite3.Connection | None = None  # held_raw()'s, on any thread, one at a time
        self._held_lock = threading.Lock()

    # ---- opening -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            return self._set_up(db)
        except BaseException:
            db.close()
            raise

    def _set_up(self, db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute("PRAGMA page_size=%d" % PAGE_SIZE)  # takes effect only on a new, empty store
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (WAL fsynced) before anyone is told.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        # The WAL is checkpointed once it holds wal_limit_bytes, and truncated
        # back to that size: the quota can count it.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute("PRAGMA wal_autocheckpoint=%d" % max(1, self.wal_limit_bytes // page_size))
        db.execute("PRAGMA journal_size_limit=%d" % self.wal_limit_bytes)
        return db

    def open(self, read_only_if_unwritable: bool = False) -> None:
        """Opens the store, creating it (mode 0600) if need be. An existing
        store is checked first (PRAGMA quick_check, within INTEGRITY_CHECK_S);
        a damaged one is set aside and what can be read of it recovered into a
        fresh one (see _recover). Raises StoreError for a store that is not
        this service's to open (permissions, schema).

        read_only_if_unwritable: an existing store that cannot be opened
        because its card cannot be written (full: no room for the WAL's -shm
        file; failing) is opened for reading only if it can be read as it
        stands (its WAL empty, sound, of this schema): `read_only` and `fault`
        say why, readers read it, and once started the writer opens it for
        writing as soon as it can, holding every job until then (nothing is
        acknowledged that is not stored). Otherwise that raises, as it does
        without this."""
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if new:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        check_private(self.path, "store")
        try:
            self._open_writable(new)
        except (StoreError, sqlite3.OperationalError, OSError) as e:
            cause = e.__cause__ if isinstance(e, StoreError) and e.__cause__ is not None else e
            if new or not read_only_if_unwritable or not _storage_fault(cause) or not self._readable_as_it_stands():
                raise
            self.read_only = self.fault = "cannot be opened for writing (%s: %s)%s" % (
                type(cause).__name__, cause, disk_full_hint(self.path.parent) or ": is its disk failing?")
            self.fault_since = time.time()
            log.error("store %s: %s; opened for reading only, nothing new is stored nor acknowledged until it "
                      "can be written (retrying)", self.path, self.read_only)

    def _readable_as_it_stands(self) -> bool:
        # The store can be read with nothing written (read_as_it_stands): its WAL empty, the file
        # sound and of this schema (an older one is upgraded only by writing it).
        if wal_holds_commits(self.path):
            return False
        deadline = time.monotonic() + self.integrity_check_s
        try:
            db = read_as_it_stands(self.path)
            try:
                db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
                try:
                    if [str(r[0]) for r in db.execute("PRAGMA quick_check(1)")] != ["ok"]:
                        return False
                except sqlite3.OperationalError as e:  # not checked in time: opened unchecked, as _check does
                    if "interrupted" not in str(e):
                        raise
                db.set_progress_handler(None, 0)
                row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                return row is not None and row[0] == str(SCHEMA_VERSION) and _has_column(db, "replay", "salt")
            finally:
                db.close()
        except sqlite3.Error:
            return False

    def _open_writable(self, new: bool, check: bool = True) -> None:
        # check: False for a store checked already (read as it stood, _readable_as_it_stands).
        problem = None if new or not check else self._check()
        if problem is not None:
            self._db = self._recover(problem)
        else:
            db = self._connect()
            try:
                self._db = self._init(db)
            except BaseException:
                db.close()
                raise
        for suffix in ("-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)

    def _init(self, db: sqlite3.Connection) -> sqlite3.Connection:
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES('schema', ?), ('gap_scan_id', '0')", (str(SCHEMA_VERSION),))
        elif int(row[0]) == 2:
            # Schema 2 kept sample frames as they came (their samples decrypted, still
            # encoded): the agent decodes them once more at start (agent/ingest.py, upgrade_legacy).
            if not _has_column(db, "frames", "samples"):
                db.execute("ALTER TABLE frames ADD COLUMN samples BLOB")
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(row[0]) == 3:
            # Schema 3's records (JSON header) read as they are; new ones are packed. An agent
            # of schema 3 would not read the new ones: it refuses the store.
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            db.close()
            raise StoreError("store %s has schema %s, this agent speaks %d" % (self.path, row[0], SCHEMA_VERSION))
        # A store made before the stream check: its streams are checked from here on
        # (retention and the quota took their oldest frames long ago: not a loss to report).
        db.execute("INSERT OR IGNORE INTO meta SELECT 'gap_scan_id', COALESCE(MAX(id), 0) FROM frames")
        if "salt" not in [r[1] for r in db.execute("PRAGMA table_info(replay)")]:
            # A store made before boot salts: its windows learn their salt
            # from the next sample frame (protocols/replay.py).
            db.execute("ALTER TABLE replay ADD COLUMN salt BLOB")
        return db

    def _check(self) -> str | None:
        """What is wrong with the store, or None if it reads as sound (or could not be checked in time)."""
        deadline = time.monotonic() + self.integrity_check_s
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
                found = [str(r[0]) for r in db.execute("PRAGMA quick_check(20)").fetchall()]
                db.execute("SELECT value FROM meta WHERE key='schema'").fetchall()
            finally:
                db.close()
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                log.warning("store: integrity check of %s not finished within %.0f s: opened unchecked",
                            self.path, self.integrity_check_s)
                return None
            if "no such table" in str(e):
                return None  # a store never used yet: the schema is made next
            raise StoreError("store %s cannot be opened: %s" % (self.path, e)) from e
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            return str(e)
        return None if found == ["ok"] else "; ".join(found)

    def _recover(self, problem: str) -> sqlite3.Connection:
        """Sets the damaged store aside (kept, with its WAL, until the
        retention period has passed) and copies what can be read of it into a
        fresh one, table by table, one rowid range at a time, skipping the
        ranges that cannot be read (_copy_table). SQLite's own `.recover`
        would also find rows no longer reachable from a damaged tree, but it
        needs the sqlite_dbpage table, which Debian's sqlite3 (3.40) is built
        without (.recover fails with "SQL logic error"), and Python's sqlite3
        module has no recovery API; `iterdump` stops at the first error.
        Every recovered frame is queued
        again for every backend (they deduplicate by idempotency key; a lost
        outbox row would lose the frame). Replay windows are restored or, if
        lost, rebuilt from the frames. The holes left in the boards' streams
        become gap records (scan_gaps)."""
        t0 = time.monotonic()
        kept = self.path.with_name("%s.damaged-%s" % (self.path.name, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())))
        log.critical("STORE DAMAGED: %s (%s); it is kept as %s and what can be read of it is recovered into a "
                     "fresh store", self.path, problem, kept)
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(kept) + suffix))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        db = self._init(self._connect())
        counts, unreadable = self._salvage(kept, db)
        db.execute("BEGIN IMMEDIATE")
        # Every frame again to every backend; windows no older than the frames held;
        # every recovered frame scanned for holes again.
        db.execute("UPDATE meta SET value='0' WHERE key='gap_scan_id'")
        for backend in self.backends:
            db.execute("INSERT OR IGNORE INTO outbox(backend, frame_id, priority) SELECT ?, id, priority FROM frames",
                       (backend,))
        db.execute("INSERT INTO replay(device_id, epoch, top, bitmap) "
                   "SELECT device_id, epoch, MAX(seq), 1 FROM frames f WHERE kind=1 AND epoch = "
                   "(SELECT MAX(epoch) FROM frames g WHERE g.device_id = f.device_id AND g.kind=1) GROUP BY device_id "
                   "ON CONFLICT(device_id) DO UPDATE SET epoch=excluded.epoch, top=excluded.top, bitmap=1 WHERE "
                   "excluded.epoch > replay.epoch OR (excluded.epoch = replay.epoch AND excluded.top > replay.top)")
        _count(db, "store_recoveries")
        db.execute("COMMIT")
        self.recovery = {"at": time.time(), "problem": problem[:300], "kept": str(kept), "method": "row-by-row copy",
                         "rows_recovered": counts, "unreadable_ranges": unreadable,
                         "duration_s": round(time.monotonic() - t0, 2)}
        log.critical("STORE RECOVERED in %.1f s: %s rows recovered (%s); %d ranges could not be read; the "
                     "damaged store is kept as %s; holes in the boards' streams will be sent as gap records",
                     time.monotonic() - t0, sum(counts.values()),
                     ", ".join("%s %d" % kv for kv in counts.items()), unreadable, kept)
        return db

    @staticmethod
    def _salvage(source: Path, db: sqlite3.Connection) -> tuple[dict[str, int], int]:
        # Copies what can be read of each table of source into db; returns
        # rows copied per table and how many ranges could not be read.
        src = sqlite3.connect("file:%s?mode=ro" % source, uri=True, isolation_level=None)
        counts: dict[str, int] = {}
        unreadable = 0
        try:
            for table, cols in _SALVAGED.items():
                if table == "replay" and _has_column(src, "replay", "salt"):
                    cols += ", salt"  # a store made before boot salts has none (its windows learn it again)
                if table == "frames" and _has_column(src, "frames", "samples"):
                    cols += ", samples"  # a store of schema 2 has none: its frames are decoded again (legacy_frames)
                n, bad = _copy_table(src, db, table, cols)
                counts[table] = n
                unreadable += bad
        finally:
            src.close()
        return counts, unreadable

    def status(self) -> dict[str, Any]:
        """The store's state for `pulsebridge status` and the status page (JSON-ready).

        state: "ok", or "fault" while commits wait for storage (fault says
        why, fault_since when it began, UTC s; nothing is acknowledged meanwhile).
        short_of_space: the quota or the free space (reason: disk_quota,
        disk_free) made the store delete frames not yet delivered within the
        last SHORT_OF_SPACE_SHOWN_S; dropped_undelivered counts them since start."""
        st = self.stats
        short = st.last_drop_at is not None and time.time() - st.last_drop_at < SHORT_OF_SPACE_SHOWN_S
        return {"state": "fault" if self.fault is not None else "ok", "fault": self.fault,
                "short_of_space": st.last_drop_reason if short else None,
                "dropped_undelivered": st.dropped_undelivered, "last_drop_at": st.last_drop_at,
                "fault_since": self.fault_since, "commits": self.stats.commits, "ingested": self.stats.ingested,
                "commit_failures": self.stats.commit_failures, "faults_recovered": self.stats.faults_recovered,
                "refused": self.stats.refused, "gaps_found": self.stats.gaps_found, "recovery": self.recovery}

    @property
    def writable(self) -> bool:
        """False while the store is open for reading only (read_only says why)."""
        return self.read_only is None

    def reader(self) -> sqlite3.Connection:
        """A read connection for another thread (WAL: readers never block the writer). While the
        store is open for reading only, one that reads it as it stands: let it go soon (the
        writer may open the store for writing at any time)."""
        if self.read_only is not None:
            return read_as_it_stands(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute("PRAGMA query_only=ON")
        return db

    def held_raw(self, device_id: str, epoch: int, seq: int) -> bytes | None:
        """The COSE bytes of the frame held under (device_id, epoch, seq); None: none held.
        A frame held without its bytes (none such is stored today) answers b"".
        Blocking (SQLite): call it off the event loop (any thread; one at a time)."""
        with self._held_lock:
            if self._held_reader is None:
                self._held_reader = self.reader()
            row = self._held_reader.execute(
                "SELECT raw FROM frames WHERE device_id=? AND epoch=? AND seq=? AND kind=?",
                (device_id, epoch, seq, KIND_FRAME)).fetchone()
        return None if row is None else bytes(row[0] or b"")

    def legacy_frames(self, after_id: int, limit: int) -> list[tuple[int, bytes, bytes | None]]:
        """Sample frames a schema 2 store kept undecoded: (id, raw, plain), ids above after_id."""
        db = self.reader()
        try:
            return [(r[0], bytes(r[1]), None if r[2] is None else bytes(r[2])) for r in db.execute(
                "SELECT id, raw, plain FROM frames WHERE kind=? AND samples IS NULL AND raw IS NOT NULL AND id > ? "
                "ORDER BY id LIMIT ?", (KIND_FRAME, after_id, limit))]
        finally:
            db.close()

    def set_decoded(self, decoded: list[tuple[int, FrameRecord]]) -> None:
        """Stores the decoded form of legacy frames (by id), in one transaction; their old
        encoded samples go. For a store not yet started (the agent's start)."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("UPDATE frames SET info=NULL, samples=?, plain=NULL WHERE id=?",
                           [(f.stored(), fid) for fid, f in decoded])
            db.execute("COMMIT")
        finally:
            db.close()

    def erase_now(self, device_id: str) -> int:
        """erase_device() on a store opened but not started (pulsebridge erase). Returns frames erased."""
        if self._db is None or self._thread is not None:
            raise StoreError("erase_now needs the store opened and its writer not running (use run())")
        return self.erase_device(self._db, device_id)

    def integrity_check(self) -> str:
        db = self.reader()
        try:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            db.close()

    def load_windows(self) -> dict[str, Window]:
        """The replay windows committed, by device: (epoch, top, bitmap, salt). Over a read
        connection of its own (never the writer's): callable from any thread, blocking."""
        db = self.reader()
        try:
            return {r[0]: (r[1], r[2], r[3], r[4])
                    for r in db.execute("SELECT device_id, epoch, top, bitmap, salt FROM replay")}
        finally:
            db.close()

    # ---- the writer thread -------------------------------------------------------

    def start(self) -> None:
        if self._db is None and self.read_only is None:
            self.open()
        self._closing.clear()
        try:  # started on the loop that will use it: on_commit's until a job says otherwise
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._closing.set()
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None
        with self._held_lock:
            if self._held_reader is not None:
                self._held_reader.close()
                self._held_reader = None

    def _submit(self, kind: str, args: Any) -> asyncio.Future[Any]:
        loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._q.put(_Job(kind, args, loop, fut))
        return fut

    @staticmethod
    def _settle(settled: list[tuple[asyncio.Future[Any], BaseException | None, Any]],
                on_commit: Callable[[], None] | None = None) -> None:
        # On the loop: a commit's futures settled, then on_commit (one hand-off for both).
        for fut, exc, result in settled:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        if on_commit is not None:
            on_commit()

    async def ingest(self, item: Ingest) -> None:
        """Returns once the message is durably stored (or, duplicate, once the batch is)."""
        await self._submit("ingest", item)

    def submit_ingest(self, item: Ingest) -> asyncio.Future[Any]:
        """Queues the message; the future is done once it is committed (its result:
        None, or QUARANTINED)."""
        return self._submit("ingest", item)

    def submit_ingests(self, items: list[Ingest]) -> asyncio.Future[list[Any]]:
        """Queues messages (at most MAX_BATCH) as one job: one future, done once all
        are committed, in one transaction unless one is refused (then quarantined
        alone); its result has one entry per message, in order: None, or QUARANTINED."""
        return self._submit("ingests", items)

    def submit_reject(self, reason: str, link: str, device_id: str | None, raw: bytes) -> None:
        fut = self._submit("reject", (reason, link, device_id, raw))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning

    async def delivered(self, backend: str, frame_ids: list[int]) -> None:
        await self.submit_delivered(backend, frame_ids)

    def submit_delivered(self, backend: str, frame_ids: list[int]) -> asyncio.Future[Any]:
        """Queues the rows' leaving backend's outbox (queued at once, whatever becomes of the
        future); the future is done once that is committed."""
        return self._submit("delivered", (backend, frame_ids))

    async def reject(self, reason: str, link: str, device_id: str | None, raw: bytes) -> None:
        await self._submit("reject", (reason, link, device_id, raw))

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Runs fn(db) in the writer thread, in its own transaction."""
        return await self._submit("call", fn)

    def _writer(self) -> None:
        db = self._db if self._db is not None else self._open_once_writable()
        if db is None:  # closed before it could be written: whoever still waits is told
            self._fail_waiting(StoreError("store closed before it could be written: %s" % self.fault))
            return
        while True:
            try:
                job = self._q.get(timeout=GAP_SCAN_EVERY_S)
            except queue.Empty:  # idle: the streams are checked all the same
                self._housekeep(db)
                continue
            if job is None:
                return
            units = self._batch(job)
            writes = [u for u in units if u.kind != "call"]
            if writes:
                self._last_commit_at = time.monotonic()
                if _has_board_frame(writes):
                    self._board_frame_at = self._last_commit_at
            settled = self._commit(db, writes) if writes else []
            if writes and (self._room_bytes <= 0 or time.monotonic() - self._checked_at >= HOUSEKEEP_EVERY_S):
                self._housekeep(db)
            for u in units:
                if u.kind == "call":
                    try:
                        settled.append((u, None, u.args(db)))
                    except Exception as e:
                        _rollback(db)
                        settled.append((u, e, None))
            # One wake-up of each event loop per batch, not one per frame; on_commit rides with
            # the first (a second call_soon_threadsafe woke the loop a second time, now and then).
            by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
            for j, exc, result in _by_job(settled):
                by_loop.setdefault(j.loop, []).append((j.future, exc, result))
            on_commit = self.on_commit
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(self._settle, items, on_commit)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    continue
                on_commit = None

    def _open_once_writable(self) -> sqlite3.Connection | None:
        # Open for reading only (open()): tried again with the commits' capped backoff until it can
        # be written, every job held meanwhile; None if the store is closed first.
        delay_s = COMMIT_RETRY_FIRST_S
        attempts = 0
        while not self._closing.wait(delay_s):
            delay_s = min(COMMIT_RETRY_CAP_S, delay_s * 2)
            attempts += 1
            try:
                self._open_writable(False, check=False)
            except (StoreError, sqlite3.Error, OSError) as e:
                cause = e.__cause__ if isinstance(e, StoreError) and e.__cause__ is not None else e
                self.stats.commit_failures += 1  # nothing can be committed: every job waits
                self.fault = "cannot be opened for writing (%s: %s)%s" % (
                    type(cause).__name__, cause, disk_full_hint(self.path.parent) or ": is its disk failing?")
                if attempts & (attempts - 1) == 0:  # 1, 2, 4, 8...: a bounded log
                    log.error("store %s: still %s after %d attempts; %d jobs held", self.path, self.fault, attempts,
                              self._q.qsize())
                continue
            was, self.read_only = self.read_only, None  # readers made from now on are live ones
            with self._held_lock:  # the look-ups' reader read the file as it stood: a live one from now on
                if self._held_reader is not None:
                    self._held_reader.close()
                    self._held_reader = None
            log.warning("store %s: opened for writing after %.1f s open for reading only (%s)", self.path,
                        time.time() - (self.fault_since or 0), was)
            self._storage_recovered()
            loop, on_commit = self._loop, self.on_commit
            if loop is not None and on_commit is not None:  # the forwarders wait for it
                try:
                    loop.call_soon_threadsafe(on_commit)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass
            return self._db
        return None

    def _fail_waiting(self, err: BaseException) -> None:
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                failed: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = [(job.future, err, None)]
                try:
                    job.loop.call_soon_threadsafe(self._settle, failed)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass

    def _batch(self, job: _Job) -> list[_Unit]:
        """The next commit's units: job's, what queued behind it (what arrived during
        the last commit), and, if a board frame is among them and the last commit began
        less than commit_interval_s ago, what comes until then; at most about MAX_BATCH.
        Small writes nobody waits on wait for a board frame to ride with, while board
        frames come, at most JOIN_WAIT_S (_may_join). A close (None) is put back for the
        writer's loop to see."""
        units = _units(job)
        until = self._last_commit_at + self.commit_interval_s
        board_frame = _has_board_frame(units)
        now = time.monotonic()
        join_rows = _may_join(units) if now - self._board_frame_at < BOARDS_FLOWING_S else -1
        join_until = now + JOIN_WAIT_S
        while len(units) < MAX_BATCH:
            if board_frame:
                wait_s = until - time.monotonic()
            elif 0 <= join_rows <= JOIN_ROWS:
                wait_s = join_until - time.monotonic()
            else:
                wait_s = 0.0
            try:
                nxt = self._q.get(timeout=wait_s) if wait_s > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._q.put(None)
                break
            more = _units(nxt)
            board_frame = board_frame or _has_board_frame(more)
            if join_rows >= 0:
                joining = _may_join(more)
                join_rows = join_rows + joining if joining >= 0 else -1
            units += more
        return units

    def _housekeep(self, db: sqlite3.Connection) -> None:
        # After commits (HOUSEKEEP_EVERY_S, or once their room may be used up) and when idle:
        # the quota, the WAL's size, holes in the streams.
        try:
            self._room_bytes = 0  # a failed check is made again after the next commit
            self.enforce_quota(db)
            self._bound_wal(db)
            self._room_bytes, self._checked_at = self._room(db), time.monotonic()
            if time.monotonic() >= self._gap_scan_at:
                self._gap_scan_at = time.monotonic() + GAP_SCAN_EVERY_S
                self.scan_gaps(db)
        except Exception as e:  # what is committed stays so; this is tried again after the next commit
            _rollback(db)
            log.error("store: quota or stream check failed: %s", e)

    def _commit(self, db: sqlite3.Connection, jobs: list[_Unit]) -> list[tuple[_Unit, BaseException | None, Any]]:
        """Commits units of jobs in one transaction, whatever it takes.

        A storage fault (disk full, I/O error, locked) holds the batch and
        retries it with capped backoff until it is stored or the store
        closes: nobody is acknowledged meanwhile, and ingest resumes by itself
        once space returns. Anything else is the data's fault: the batch is
        split until the one job the store refuses stands alone, and that job
        alone is quarantined; every other job is committed."""
        delay_s = COMMIT_RETRY_FIRST_S
        while True:
            try:
                results = self._apply(db, jobs)
            except Exception as e:
                _rollback(db)
                if not _storage_fault(e):
                    if len(jobs) > 1:
                        half = len(jobs) // 2
                        return self._commit(db, jobs[:half]) + self._commit(db, jobs[half:])
                    return self._refuse(db, jobs[0], e)
                if self._closing.is_set():
                    err = StoreError("store closed while a commit was failing: %s" % e)
                    return [(j, err, None) for j in jobs]
                self._storage_failed(e, len(jobs))
                self._closing.wait(delay_s)
                delay_s = min(COMMIT_RETRY_CAP_S, delay_s * 2)
                continue
            self._storage_recovered()
            return [(j, None, r) for j, r in zip(jobs, results)]

    def _refuse(self, db: sqlite3.Connection, job: _Unit,
                e: Exception) -> list[tuple[_Unit, BaseException | None, Any]]:
        if job.kind != "ingest":
            log.error("store: %s refused: %s", job.kind, e)
            return [(job, StoreError("%s refused by the store: %s" % (job.kind, e)), None)]
        it: Ingest = job.args
        log.error("store: frame %s:%d:%d refused (%s: %s); quarantined on its own, the rest of its batch stored",
                  it.device_id, it.epoch, it.seq, type(e).__name__, e)
        self.stats.refused += 1
        return self._commit(db, [_Unit(job.job, "quarantine", (it, "store_refused:%s" % type(e).__name__),
                                       job.index)])

    def _storage_failed(self, e: Exception, held: int) -> None:
        self.stats.commit_failures += 1
        if self.fault is None:
            self.fault_since = time.time()
            log.error("store: commit failed (%s); %d messages held, none acknowledged; retrying with backoff", e, held)
        elif self.stats.commit_failures & (self.stats.commit_failures - 1) == 0:  # 1, 2, 4, 8...: a bounded log
            log.error("store: still failing after %d attempts (%s); %d messages held", self.stats.commit_failures,
                      e, held)
        self.fault = "%s: %s" % (type(e).__name__, e)

    def _storage_recovered(self) -> None:
        if self.fault is not None:
            log.warning("store: commits resumed after %.1f s (%s)", time.time() - (self.fault_since or 0), self.fault)
            self.stats.faults_recovered += 1
            self.fault, self.fault_since = None, None

    def _apply(self, db: sqlite3.Connection, batch: list[_Unit]) -> list[Any]:
        now = time.time()
        results: list[Any] = []
        db.execute("BEGIN IMMEDIATE")
        windows: dict[str, Window | tuple[int, int, int]] = {}
        rows = []
        quarantined = False
        # What this commit may add to the pages (ROOM_*): the checks' room shrinks by it.
        bound = ROOM_COMMIT_BYTES
        for job in batch:
            if job.kind == "ingest":
                it: Ingest = job.args
                if it.window is not None:
                    windows[it.device_id] = it.window
                if not it.duplicate:
                    info = it.info if isinstance(it.info, str) or it.info is None else json.dumps(it.info)
                    rows.append((it.device_id, it.epoch, it.seq, it.kind, it.stream, it.priority,
                                 now if it.received_at is None else it.received_at, it.t0_ms, it.t0_utc_ms,
                                 it.first_index, it.count, it.raw, info, it.samples))
                    bound += ROOM_CONTENT_FACTOR * (len(it.raw) + len(info or "") + len(it.samples or b"")) \
                        + ROOM_ROW_BYTES * (1 + len(self.backends))
                results.append(None)
            elif job.kind == "quarantine":  # a frame the store refused, kept whole and acknowledged
                it, reason = job.args
                if it.window is not None:
                    windows[it.device_id] = it.window
                db.execute("INSERT INTO quarantine(at, link, device_id, reason, raw) VALUES(?,?,?,?,?)",
                           (now, "store", it.device_id, reason, it.raw[:QUARANTINE_RAW_BYTES]))
                _count(db, reason)
                quarantined = True
                bound += ROOM_CONTENT_FACTOR * QUARANTINE_RAW_BYTES + 2 * ROOM_ROW_BYTES
                results.append(QUARANTINED)
            elif job.kind == "delivered":
                backend, ids = job.args
                db.executemany("DELETE FROM outbox WHERE backend=? AND frame_id=?", [(backend, i) for i in ids])
                bound += ROOM_ROW_BYTES * len(ids)  # frees pages; writes them to the WAL
                results.append(None)
            elif job.kind == "reject":
                reason, link, device_id, raw = job.args
                db.execute("INSERT INTO quarantine(at, link, device_id, reason, raw) VALUES(?,?,?,?,?)",
                           (now, link, device_id, reason, raw[:QUARANTINE_RAW_BYTES]))
                _count(db, "reject:" + reason)
                quarantined = True
                bound += ROOM_CONTENT_FACTOR * QUARANTINE_RAW_BYTES + 2 * ROOM_ROW_BYTES
                results.append(None)
            else:
                raise AssertionError(job.kind)
        self._insert_many(db, rows)
        ingested = sum(1 for r in rows if r[3] == KIND_FRAME)  # board frames (type 1), not hub-made records
        # Each device's replay window as it stands after the batch: one statement for them all.
        db.executemany("INSERT INTO replay(device_id, epoch, top, bitmap, salt) VALUES(?,?,?,?,?) "
                       "ON CONFLICT(device_id) DO UPDATE SET "
                       "epoch=excluded.epoch, top=excluded.top, bitmap=excluded.bitmap, salt=excluded.salt",
                       [(dev, w[0], w[1], _signed64(w[2]), w[3] if len(w) == 4 else None)
                        for dev, w in windows.items()])
        if quarantined:
            _trim_quarantine(db)
        self._room_bytes -= bound
        db.execute("COMMIT")
        self.stats.commits += 1
        self.stats.ingested += ingested
        return results

    def _insert_many(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
        # Frames in one statement, then their outbox rows in one more: the
        # frames of this transaction are those with an id above the old max.
        if not rows:
            return 0
        before = db.execute("SELECT COALESCE(MAX(id), 0) FROM frames").fetchone()[0]
        changes = db.total_changes
        # INSERT_ROWS rows a statement: sqlite3 lets go of the GIL and takes it back at each
        # statement step, and at each the event loop's thread had to hand it over.
        whole = len(rows) - len(rows) % INSERT_ROWS
        for i in range(0, whole, INSERT_ROWS):
            db.execute(_INSERT_FRAMES_MANY, list(chain.from_iterable(rows[i:i + INSERT_ROWS])))
        if whole < len(rows):
            db.executemany(_INSERT_FRAMES, rows[whole:])
        inserted = db.total_changes - changes
        for backend in self.backends:
            db.execute("INSERT INTO outbox(backend, frame_id, priority) SELECT ?, id, priority FROM frames "
                       "WHERE id > ?", (backend, before))
        return int(inserted)

    # ---- quota, retention, erasure ----------------------------------------------

    def db_bytes(self, db: sqlite3.Connection) -> int:
        """Bytes the store holds: its live pages, and its WAL at the size it may reach."""
        return self._live_bytes(db) + max(self._wal_bytes(), self.wal_limit_bytes)

    @staticmethod
    def _live_bytes(db: sqlite3.Connection) -> int:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _wal_bytes(self) -> int:
        try:
            return os.stat(str(self.path) + "-wal").st_size
        except FileNotFoundError:
            return 0

    def _bound_wal(self, db: sqlite3.Connection) -> None:
        # A large transaction grows the WAL past its limit; SQLite truncates it
        # only when it starts over. Checkpoint and truncate it now if no reader
        # holds it (a brief wait: never stall the writer behind a reader).
        if self._wal_bytes() <= 2 * self.wal_limit_bytes:
            return
        db.execute("PRAGMA busy_timeout=%d" % WAL_TRUNCATE_WAIT_MS)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.execute("PRAGMA busy_timeout=%d" % BUSY_TIMEOUT_MS)

    def free_bytes(self) -> int:
        """What the file system holding the store still offers this service, bytes."""
        st = os.statvfs(self.path.parent)
        return int(st.f_bavail * st.f_frsize)

    def _live_budget(self, db: sqlite3.Connection) -> tuple[int, str] | None:
        # The bytes live pages may take, and why; None: no limit applies.
        budgets = []
        if self.quota_bytes:
            budgets.append((self.quota_bytes - max(self._wal_bytes(), self.wal_limit_bytes), "disk_quota"))
        if self.min_free_bytes:
            # What the store will still take from the file system without
            # growing: its pages not yet checkpointed into the file, and the
            # WAL up to its limit. If that leaves less than min_free_bytes
            # (whoever filled the disk), the file stops growing: old frames
            # make way, and new ones reuse their pages.
            pages, size = (db.execute("PRAGMA %s" % p).fetchone()[0] for p in ("page_count", "page_size"))
            logical = pages * size
            growth = max(0, logical - self.path.stat().st_size) + max(0, self.wal_limit_bytes - self._wal_bytes())
            if self.free_bytes() - growth < self.min_free_bytes:
                # A step at a time: deleting takes WAL space too, the very thing short.
                target = logical - min(FREE_SPACE_ROOM_BYTES, logical // 4)
                budgets.append((max(target, self._live_bytes(db) - FREE_SPACE_STEP_BYTES), "disk_free"))
        return min(budgets) if budgets else None

    def _room(self, db: sqlite3.Connection) -> int:
        # Bytes commits may add (to the pages, and as much again to the WAL) before the quota,
        # the free space kept or the WAL's bound is reached: the least of the three.
        wal = self._wal_bytes()
        room = 2 * self.wal_limit_bytes - wal  # _bound_wal's threshold
        if self.quota_bytes:
            room = min(room, self.quota_bytes - max(wal, self.wal_limit_bytes) - self._live_bytes(db))
        if self.min_free_bytes:
            pages, size = (db.execute("PRAGMA %s" % p).fetchone()[0] for p in ("page_count", "page_size"))
            growth = max(0, pages * size - self.path.stat().st_size) + max(0, self.wal_limit_bytes - wal)
            room = min(room, self.free_bytes() - growth - self.min_free_bytes)
        return room // 2

    def enforce_quota(self, db: sqlite3.Connection) -> int:
        """Deletes the lowest-priority, oldest frames until the store fits the
        quota (WAL counted) and leaves the file system min_free_bytes; returns how many."""
        budget = self._live_budget(db)
        if budget is None or self._live_bytes(db) <= budget[0]:
            return 0
        limit, reason = budget
        dropped = 0
        lost: dict[tuple[str, str, int], list[int]] = {}
        db.execute("BEGIN IMMEDIATE")
        ends: dict[tuple[str, int, int], tuple[int, int]] = {}
        # Frames every backend already has go first (kept only for retention),
        # then the lowest priority, oldest: a frame still on its way is lost
        # only when nothing delivered is left to make room.
        delivered = ("SELECT id, device_id, epoch, seq, stream, first_index, count FROM frames f WHERE kind != ? "
                     "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.backend IN (%s) AND o.frame_id = f.id) "
                     "ORDER BY priority, id LIMIT 16" % ",".join("?" * len(self.backends)))
        any_frame = ("SELECT id, device_id, epoch, seq, stream, first_index, count FROM frames "
                     "WHERE kind != ? ORDER BY priority, id LIMIT 16")
        query, args = delivered, (KIND_GAP, *self.backends)
        while self._live_bytes(db) > limit:
            rows = db.execute(query, args).fetchall()
            if not rows and query is delivered:
                query, args = any_frame, (KIND_GAP,)
                if reason == "disk_free":
                    limit = max(limit, FREE_SPACE_KEEP_UNDELIVERED_BYTES)
                continue
            if not rows:
                break
            for fid, dev, epoch, seq, stream, first, count in rows:
                for (backend,) in db.execute("SELECT backend FROM outbox WHERE frame_id=?", (fid,)).fetchall():
                    lost.setdefault((backend, dev, epoch), []).append(seq)
                if stream is not None and first is not None and count:
                    ends[(dev, epoch, stream)] = max(ends.get((dev, epoch, stream), (0, 0)), (first + count, seq))
                db.execute("DELETE FROM outbox WHERE frame_id=?", (fid,))
                db.execute("DELETE FROM frames WHERE id=?", (fid,))
            dropped += len(rows)
        for (backend, dev, epoch), seqs in lost.items():
            self._gap(db, [backend], dev, epoch, seqs, reason)
        undelivered = len({(dev, epoch, seq) for (_, dev, epoch), seqs in lost.items() for seq in seqs})
        # What the quota dropped has its gap records: the stream check starts after it.
        db.executemany("INSERT INTO stream_marks VALUES(?,?,?,?,?) ON CONFLICT(device_id, epoch, stream) DO UPDATE "
                       "SET next_index=excluded.next_index, last_seq=excluded.last_seq "
                       "WHERE excluded.next_index > stream_marks.next_index",
                       [(d, e, st, end, seq) for (d, e, st), (end, seq) in ends.items()])
        _count(db, "quota_dropped" if reason == "disk_quota" else "free_space_dropped", dropped)
        db.execute("COMMIT")
        if undelivered:
            self.stats.dropped_undelivered += undelivered
            self.stats.last_drop_at, self.stats.last_drop_reason = time.time(), reason
            log.warning("store: %s: dropped %d oldest frames, %d of them not yet delivered: gap records queued for "
                        "%d backend(s)", reason, dropped, undelivered, len({b for b, _, _ in lost}))
        elif dropped:
            log.info("store: %s: dropped %d oldest frames, every backend had them", reason, dropped)
        return dropped

    def _gap(self, db: sqlite3.Connection, backends: list[str], device_id: str, epoch: int, seqs: list[int],
             reason: str) -> None:
        """Queues, for each of backends, a gap record: which of a device's
        frames (epoch, seq ranges) it will never receive, and why."""
        from protocols.hub import seq_ranges

        ranges = seq_ranges(seqs)
        self._gap_record(db, backends, {"type": "gap", "device_id": device_id, "epoch": epoch,
                                        "seq_ranges": [list(r) for r in ranges],
                                        "frames_dropped": sum(b - a + 1 for a, b in ranges), "reason": reason})

    @staticmethod
    def _gap_record(db: sqlite3.Connection, backends: list[str], info: dict[str, Any]) -> None:
        _count(db, "gap_seq")  # gap records are numbered once: a purge never reuses an idempotency key
        seq = db.execute("SELECT value FROM counters WHERE name='gap_seq'").fetchone()[0]
        cur = db.execute("INSERT INTO frames(device_id, epoch, seq, kind, priority, received_at, info) "
                         "VALUES(?,?,?,?,?,?,?)", (info["device_id"], -1, seq, KIND_GAP, PRIORITY_GAP, time.time(),
                                                   json.dumps(info)))
        db.executemany("INSERT INTO outbox(backend, frame_id, priority) VALUES(?,?,?)",
                       [(b, cur.lastrowid, PRIORITY_GAP) for b in backends])

    def scan_gaps(self, db: sqlite3.Connection) -> int:
        """Looks for holes in the boards' streams among the frames stored at
        least gap_settle_s ago and not yet scanned; each becomes a gap record
        to every backend. Returns how many were found.

        Samples of a stream are contiguous (SPEC.md): a frame's first_index is
        the previous frame's first_index + count, plus the samples the
        sensor's FIFO lost (fifo_overflows, which the board reports). Anything
        beyond that is frames the hub acknowledged and no longer holds (a
        damaged WAL, a store recovered from damage) or never received (the
        board dropped them, its outbox full). The
        record gives the device, epoch, stream, the sample index range lost
        and the range of seq numbers the lost frames had (between the frames
        on either side). A frame arriving after gap_settle_s into a hole
        already reported is stored and forwarded all the same."""
        from protocols import messages

        row = db.execute("SELECT value FROM meta WHERE key='gap_scan_id'").fetchone()
        after = int(row[0]) if row else 0
        # Every frame stored since, settled or not: a board resends its backlog
        # out of order, so a frame that fills a hole may have arrived (a later
        # id) after the frame past the hole had settled.
        cutoff = time.time() - self.gap_settle_s
        frames = db.execute(
            "SELECT id, device_id, epoch, stream, first_index, count, seq, received_at FROM frames "
            "WHERE id > ? AND kind = 1 ORDER BY id", (after,)).fetchall()
        if not frames:
            return 0
        by_stream: dict[tuple[str, int, int], list[tuple[int, int, int, float, int]]] = {}
        for fid, dev, epoch, stream, first, count, seq, received_at in frames:
            if stream is not None and first is not None and count:
                by_stream.setdefault((dev, epoch, stream), []).append((first, count, seq, received_at, fid))
        # The next scan starts before the first frame not walked (walking a frame again is harmless: the stream's
        # mark is past it).
        resume = frames[-1][0]
        found = 0
        db.execute("BEGIN IMMEDIATE")
        for (dev, epoch, stream), items in by_stream.items():
            mark = db.execute("SELECT next_index, last_seq FROM stream_marks WHERE device_id=? AND epoch=? AND "
                              "stream=?", (dev, epoch, stream)).fetchone()
            items.sort()
            # A stream starts at index 0 with its board's boot (SPEC.md): its first frames count too.
            expected, last_seq = mark if mark else (0, -1)
            for i, (first, count, seq, received_at, fid) in enumerate(items):
                if received_at >= cutoff:  # not settled: the stream is walked on from here next time
                    resume = min(resume, min(it[4] for it in items[i:]) - 1)
                    break
                if first > expected:
                    info, samples = db.execute("SELECT info, samples FROM frames WHERE id=?", (fid,)).fetchone()
                    try:
                        header = json.loads(info) if info else None
                    except ValueError:
                        header = None
                    fifo_lost = stored_fifo_lost(header, samples)
                    lost = first - fifo_lost - expected
                    if lost > 0:
                        found += 1
                        self._gap_record(db, self.backends, {
                            "type": "gap", "device_id": dev, "epoch": epoch,
                            "stream": messages.STREAM_NAMES.get(stream, str(stream)),
                            "seq_ranges": [[last_seq + 1, seq - 1]] if seq - 1 >= last_seq + 1 else [],
                            "sample_index_range": [expected, first - fifo_lost], "samples_lost": lost,
                            "frames_dropped": max(1, round(lost / count)), "reason": "stream_gap"})
                        log.error("store: %d samples of %s epoch %d stream %d (index %d to %d, seq %d to %d) are not "
                                  "held (lost at the hub, or dropped by the board): gap record queued", lost, dev,
                                  epoch, stream, expected, first - fifo_lost, last_seq + 1, seq - 1)
                if first + count > expected:
                    expected, last_seq = first + count, seq
            db.execute("INSERT INTO stream_marks VALUES(?,?,?,?,?) ON CONFLICT(device_id, epoch, stream) DO UPDATE "
                       "SET next_index=excluded.next_index, last_seq=excluded.last_seq",
                       (dev, epoch, stream, expected, last_seq))
        db.execute("INSERT INTO meta VALUES('gap_scan_id', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                   (str(resume),))
        if found:
            _count(db, "stream_gaps", found)
        db.execute("COMMIT")
        self.stats.gaps_found += found
        return found

    def purge(self, db: sqlite3.Connection, retention_s: float) -> int:
        """Deletes frames every backend has acknowledged, once retention_s has passed."""
        cutoff = time.time() - retention_s
        db.execute("BEGIN IMMEDIATE")
        n = db.execute("DELETE FROM frames WHERE received_at < ? AND NOT EXISTS "
                       "(SELECT 1 FROM outbox o WHERE o.frame_id = frames.id)", (cutoff,)).rowcount
        db.execute("DELETE FROM quarantine WHERE at < ?", (cutoff,))
        db.execute("COMMIT")
        for old in self.path.parent.glob(self.path.name + ".damaged-*"):  # kept after a recovery, until now
            try:
                if old.stat().st_ctime < cutoff:
                    old.unlink()
                    log.info("store: damaged store %s removed (retention)", old)
            except FileNotFoundError:
                pass
        return int(n)

    def erase_device(self, db: sqlite3.Connection, device_id: str) -> int:
        """Removes everything held for a device: frames, outbox rows, quarantine, replay state."""
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM outbox WHERE frame_id IN (SELECT id FROM frames WHERE device_id=?)", (device_id,))
        n = db.execute("DELETE FROM frames WHERE device_id=?", (device_id,)).rowcount
        db.execute("DELETE FROM quarantine WHERE device_id=?", (device_id,))
        db.execute("DELETE FROM replay WHERE device_id=?", (device_id,))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")  # the freed pages held health data: do not leave them in the file
        return int(n)

    @staticmethod
    def refuse_delivery(db: sqlite3.Connection, backend: str, frame_id: int, device_id: str, reason: str) -> None:
        """A backend refused this frame for good: it leaves that backend's outbox (the frame
        stays under the retention policy), a quarantine row says why, counter refused:<backend>."""
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM outbox WHERE backend=? AND frame_id=?", (backend, frame_id))
        db.execute("INSERT INTO quarantine(at, link, device_id, reason, raw) VALUES(?,?,?,?,NULL)",
                   (time.time(), "backend:" + backend, device_id, reason))
        _trim_quarantine(db)
        _count(db, "refused:" + backend)
        db.execute("COMMIT")

    # ---- reads (any thread, own connection) ----------------------------------------

    @staticmethod
    def fetch_outbox(db: sqlite3.Connection, backend: str, limit: int, exclude: Sequence[int] = ()) -> list[Row]:
        """The next rows (at most limit) waiting for backend, highest priority first, then oldest;
        exclude: frame ids to leave out (a batch in flight, or one whose delivery is being committed)."""
        if len(exclude) > MAX_EXCLUDED:
            raise ValueError("at most %d frame ids can be left out, not %d" % (MAX_EXCLUDED, len(exclude)))
        rows = db.execute(
            "SELECT %s FROM outbox o JOIN frames f ON f.id = o.frame_id WHERE o.backend=? %s"
            "ORDER BY o.priority DESC, o.frame_id LIMIT ?" % (_ROW_COLUMNS,
                "AND o.frame_id NOT IN (%s) " % ",".join("?" * len(exclude)) if exclude else ""),
            (backend, *exclude, limit)).fetchall()
        return [_row(r) for r in rows]

    @staticmethod
    def device_rows(db: sqlite3.Connection, device_id: str, batch: int = 500) -> Iterator[Row]:
        """Every row stored for the device (its frames and origin checkpoints, the hub's vitals, alerts
        and gap records about it), by epoch then seq (the hub's own records first: negative epochs),
        read batch rows at a time along the (device_id, epoch, seq) index: memory stays bounded."""
        after = (-(1 << 62), 0)
        while True:
            rows = [_row(r) for r in db.execute(
                "SELECT %s FROM frames f WHERE f.device_id=? AND (f.epoch, f.seq) > (?, ?) ORDER BY f.epoch, f.seq "
                "LIMIT ?" % _ROW_COLUMNS, (device_id, *after, batch))]
            yield from rows
            if len(rows) < batch:
                return
            after = (rows[-1].epoch, rows[-1].seq)

    @staticmethod
    def backlog(db: sqlite3.Connection) -> dict[str, int]:
        return {b: n for b, n in db.execute("SELECT backend, COUNT(*) FROM outbox GROUP BY backend")}

    @staticmethod
    def oldest_waiting(db: sqlite3.Connection, backends: list[str]) -> dict[str, float]:
        """Per backend named, when its oldest waiting frame was received (UTC s); backends with none
        left out. One index lookup each (the outbox's key is backend, frame id), whatever the backlog."""
        out = {}
        for backend in backends:
            r = db.execute("SELECT received_at FROM frames WHERE id=(SELECT MIN(frame_id) FROM outbox "
                           "WHERE backend=?)", (backend,)).fetchone()
            if r is not None:
                out[backend] = float(r[0])
        return out

    @staticmethod
    def last_received(db: sqlite3.Connection, device_id: str) -> float | None:
        """When the device's latest stored frame was received (UTC s), None if none is stored. Its
        frames' epochs are >= 0 (the hub's own vitals and alerts use negative ones): the index's
        last entry for the device is its latest frame."""
        r = db.execute("SELECT received_at FROM frames WHERE device_id=? AND epoch>=0 "
                       "ORDER BY epoch DESC, seq DESC LIMIT 1", (device_id,)).fetchone()
        return float(r[0]) if r is not None else None

    @staticmethod
    def recent_alerts(db: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
        """The last `limit` alert documents stored (raised and cleared), oldest first."""
        rows = db.execute("SELECT info FROM frames WHERE priority=? AND kind=? ORDER BY id DESC LIMIT ?",
                          (PRIORITY_ALERT, KIND_ALERT, limit)).fetchall()
        out = []
        for (info,) in reversed(rows):
            try:
                doc = json.loads(info)
            except (TypeError, ValueError):
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    @staticmethod
    def counters(db: sqlite3.Connection) -> dict[str, int]:
        return {k: v for k, v in db.execute("SELECT name, value FROM counters")}


# What recovery copies, table by table (outbox rows are rebuilt; the stream
# marks say how far each stream was found whole before the damage).
_SALVAGED = {
    "meta": "key, value",
    "replay": "device_id, epoch, top, bitmap",
    "counters": "name, value",
    "frames": "id, device_id, epoch, seq, kind, stream, priority, received_at, t0_ms, t0_utc_ms, first_index, "
              "count, raw, info, plain",  # + samples when the damaged store has them (schema 3 and later)
    "quarantine": "id, at, link, device_id, reason, raw",
    "stream_marks": "device_id, epoch, stream, next_index, last_seq",
}
# Rows read at a time when salvaging; and how far past the last readable row
# id recovery probes for more (ids are dense: far beyond, nothing is left).
_SALVAGE_CHUNK = 256
_SALVAGE_PROBES = 48


def _by_job(settled: list[tuple[_Unit, BaseException | None, Any]]) -> list[tuple[_Job, BaseException | None, Any]]:
    # Each job's outcome from its units', in the order of their first unit: a one-unit
    # job's own; an ingest group's, the list of its units' results in order (or the
    # first error, which fails it whole).
    out: list[tuple[_Job, BaseException | None, Any]] = []
    groups: dict[int, tuple[int, list[BaseException], list[Any]]] = {}
    for u, exc, result in settled:
        if u.job.kind != "ingests":
            out.append((u.job, exc, result))
            continue
        g = groups.get(id(u.job))
        if g is None:
            g = groups[id(u.job)] = (len(out), [], [None] * len(u.job.args))
            out.append((u.job, None, None))
        if exc is not None:
            g[1].append(exc)
        g[2][u.index] = result
    for at, errors, results in groups.values():
        out[at] = (out[at][0], errors[0] if errors else None, None if errors else results)
    return out


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    try:
        return column in [r[1] for r in db.execute("PRAGMA table_info(%s)" % table)]
    except sqlite3.DatabaseError:
        return False


def _copy_table(src: sqlite3.Connection, db: sqlite3.Connection, table: str, cols: str) -> tuple[int, int]:
    # Copies the rows of table that can be read, in rowid ranges; a range
    # that cannot be read is skipped (probing further ahead, doubling).
    marks = ",".join("?" * (cols.count(",") + 1))
    insert = "INSERT OR IGNORE INTO %s(%s) VALUES(%s)" % (table, cols, marks)
    try:
        src.execute("SELECT 1 FROM %s LIMIT 1" % table).fetchall()
    except sqlite3.DatabaseError:
        return 0, 1  # the table itself is gone (its schema or root page unreadable)
    copied, bad, after, step, probes = 0, 0, 0, 1, 0  # our rowids start at 1
    while probes < _SALVAGE_PROBES:
        try:
            rows = src.execute("SELECT rowid, %s FROM %s WHERE rowid > ? ORDER BY rowid LIMIT ?" % (cols, table),
                               (after, _SALVAGE_CHUNK)).fetchall()
        except sqlite3.DatabaseError:
            if step == 1:
                bad += 1
            after += step
            step *= 2
            probes += 1
            continue
        if not rows:
            break
        step, probes = 1, 0
        db.execute("BEGIN IMMEDIATE")
        db.executemany(insert, [r[1:] for r in rows])
        db.execute("COMMIT")
        copied += len(rows)
        after = rows[-1][0]
    return copied, bad


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _storage_fault(e: BaseException) -> bool:
    """True for a failure of the storage (retry it), False for one of the data (isolate it)."""
    if isinstance(e, (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
                      sqlite3.DataError)):
        return False
    return isinstance(e, (sqlite3.DatabaseError, OSError, MemoryError))


def _trim_quarantine(db: sqlite3.Connection) -> None:
    # After a quarantine row is added: the oldest go once QUARANTINE_ROWS are kept.
    db.execute("DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?", (QUARANTINE_ROWS,))


def _count(db: sqlite3.Connection, name: str, n: int = 1) -> None:
    db.execute("INSERT INTO counters VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
               (name, n))


def _signed64(v: int) -> int:
    # SQLite integers are signed 64-bit; the replay bitmap is unsigned.
    return v - (1 << 64) if v >= (1 << 63) else v


def unsigned64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v
