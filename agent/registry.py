"""The device registry: known boards, their keys, their state.

SQLite, mode 0600, owned by the service user. A key is 32 random bytes made
here (secrets.token_bytes), never derived from anything about the board.
Every change is written to the audit log.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import sqlite3
import stat
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.audit import AuditLog
from agent.errors import PulsebridgeError
from agent.store import StoreError, check_private, disk_full_hint, read_as_it_stands, wal_holds_commits
from protocols.messages import MAX_UNIQUE_ID

KEY_BYTES = 32
DEVICE_ID = re.compile(r"[a-z0-9-]{1,16}")


def valid_device_id(device_id: str) -> bool:
    """1 to 16 of a-z, 0-9, '-', matched whole (a trailing newline is not allowed)."""
    return DEVICE_ID.fullmatch(device_id) is not None

# A label names a sensor on the status page's card and in `devices list`; a patient reference is an
# id in the care team's records (FHIR: Patient/123, system|value). Longer is a paste gone wrong.
MAX_LABEL_CHARS = 64
MAX_PATIENT_REF_CHARS = 256


def text_problem(what: str, text: str, max_chars: int) -> str | None:
    """What is wrong with a label or a patient reference, or None: at most max_chars characters, no
    control character (a newline forged a line of `devices list`, an escape sequence drove its terminal)."""
    if len(text) > max_chars:
        return "%s must be at most %d characters (it has %d)" % (what, max_chars, len(text))
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        return "%s must hold no control character (it has %r)" % (what, bad)
    return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices(
    device_id TEXT PRIMARY KEY, key BLOB NOT NULL, state TEXT NOT NULL CHECK(state IN ('active', 'revoked')),
    label TEXT NOT NULL DEFAULT '', patient_ref TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, key_changed_at REAL NOT NULL, revoked_at REAL, revoke_reason TEXT,
    next_key BLOB, unique_id BLOB);
"""


def row_problem(r: tuple[object, ...]) -> str | None:
    """What makes a row of devices (device_id, key, state, label, patient_ref, created_at, revoked_at,
    revoke_reason, next_key, unique_id) hold no device, or None. Only a hand edit makes one: SQLite
    keeps what it is given whatever a column's type (a key typed as hex text, an id with an escape)."""
    device_id, key, state, label, patient_ref, created_at, revoked_at, reason, next_key, unique_id = r
    if not isinstance(device_id, str) or not valid_device_id(device_id):
        return "its device id is not 1 to 16 of a-z, 0-9, '-'"
    for what, v, optional in (("key", key, False), ("next_key", next_key, True)):
        if not (isinstance(v, bytes) and len(v) == KEY_BYTES) and not (optional and v is None):
            return "its %s is not %d bytes (%s)" % (what, KEY_BYTES, "text" if isinstance(v, str) else
                                                    "%d bytes" % len(v) if isinstance(v, bytes) else type(v).__name__)
    if unique_id is not None and not (isinstance(unique_id, bytes) and 0 < len(unique_id) <= MAX_UNIQUE_ID):
        return "its unique_id is not 1 to %d bytes" % MAX_UNIQUE_ID
    if state not in ("active", "revoked"):
        return "its state is not active or revoked"
    for what, v, limit in (("label", label, MAX_LABEL_CHARS), ("patient_ref", patient_ref, MAX_PATIENT_REF_CHARS)):
        if not isinstance(v, str) or text_problem(what, v, limit):
            return "its %s is not text of at most %d characters without control characters" % (what, limit)
    if reason is not None and not isinstance(reason, str):
        return "its revoke_reason is not text"
    for what, v in (("created_at", created_at), ("revoked_at", revoked_at)):
        if not isinstance(v, (int, float)) and not (what == "revoked_at" and v is None):
            return "its %s is not a time in seconds" % what
    return None


class RegistryError(PulsebridgeError):
    """The registry refused a change or cannot be used; .device_id the board concerned, if one."""

    def __init__(self, message: str, device_id: str = "") -> None:
        super().__init__(message, device_id=device_id)


def write_private(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Writes a secret to path, readable by its writer only from the moment it exists: into a new file
    (mode 0600, made here) renamed over path, never into a file already there (another user's, made
    beforehand, would have got the key and stayed theirs; a mode 0644 one held it until a chmod).
    data: the bytes, or chunks of them (written as they come: an export of weeks of frames is not held
    in memory). Raises OSError, also for a path that is there and no regular file (a link, a device:
    /dev/stdout would have been replaced), or what iterating data raises; nothing is left behind then."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EEXIST, "not a regular file (a secret goes to a file of its own)", str(path))
    tmp = path.with_name(".%s.%s.tmp" % (path.name, secrets.token_hex(4)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Device:
    device_id: str
    key: bytes
    state: str
    label: str
    patient_ref: str
    created_at: float
    revoked_at: float | None
    revoke_reason: str | None
    next_key: bytes | None = None  # during a key rotation: accepted alongside key
    # The chip's unique id read at provisioning (machine.unique_id()); None: not known (added by hand,
    # or provisioned before it was recorded). A status from another chip is shown as a fault.
    unique_id: bytes | None = None

    def __repr__(self) -> str:  # never print a key
        return "Device(%s, %s, %r)" % (self.device_id, self.state, self.label)


class Registry:
    """read_only_if_unwritable: a registry that cannot be opened because its card cannot be written
    (full, failing) is opened for reading only, as it stands (the agent's start: a hub must come back
    after a power cut on a full card), `read_only` saying why; otherwise that raises RegistryError."""

    def __init__(self, path: Path, audit: AuditLog, read_only_if_unwritable: bool = False) -> None:
        self.path = path
        self.audit = audit
        self.read_only: str | None = None
        self.damaged: list[str] = []  # rows the last all() or read_all() could not use, each said why
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            check_private(self.path, "device registry")
        except StoreError as e:
            raise RegistryError(str(e)) from None
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.OperationalError as e:  # a full or failing card: the registry itself may be sound
            self._db.close()
            if read_only_if_unwritable and not wal_holds_commits(self.path):
                self._db = self._read_as_it_stands(e)
                return
            raise RegistryError("device registry %s cannot be opened (%s)%s" % (
                self.path, e, disk_full_hint(self.path.parent) or ": is its disk failing?")) from None
        except sqlite3.DatabaseError as e:  # a bad copy, a damaged card: its traceback named no file
            self._db.close()
            raise RegistryError("device registry %s cannot be used (%s): restore it from a backup, or move it "
                                "aside and add or provision the boards again" % (self.path, e)) from None
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
        if "next_key" not in cols:  # a registry from before key rotation existed
            self._db.execute("ALTER TABLE devices ADD COLUMN next_key BLOB")
        if "unique_id" not in cols:  # a registry from before chip ids were recorded
            self._db.execute("ALTER TABLE devices ADD COLUMN unique_id BLOB")

    def _read_as_it_stands(self, e: sqlite3.OperationalError) -> sqlite3.Connection:
        try:
            db = read_as_it_stands(self.path)
            self._all(db)  # every column read there (a registry older than them is upgraded only by a write)
        except sqlite3.DatabaseError as e2:
            raise RegistryError("device registry %s cannot be opened (%s), nor read as it stands (%s)" % (
                self.path, e, e2)) from None
        self.read_only = "device registry %s opened for reading only (%s)%s" % (
            self.path, e, disk_full_hint(self.path.parent) or ": is its disk failing?")
        return db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        """One change and its audit record, in one transaction: the change is committed only once its
        record is written (a full log disk changed the registry with no record of who did it, and the
        command said it had failed). Raises AuditError (nothing changed) if the record cannot be."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _row(self, r: tuple[object, ...]) -> Device:
        """The row's Device; RegistryError naming the row (its id quoted) for one that holds none."""
        problem = row_problem(r)
        if problem is not None:
            named = r[0] if isinstance(r[0], str) and valid_device_id(r[0]) else ""
            raise RegistryError("device registry %s: the row of %r cannot be used (%s; edited by hand?): its "
                                "board's frames are refused; %s, then provision the board again" % (
                                    self.path, r[0], problem, "pulsebridge erase --device %s removes it" % named
                                    if named else "delete that row with sqlite3"), named)
        return Device(str(r[0]), bytes(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]),  # type: ignore
                      None if r[6] is None else float(r[6]), None if r[7] is None else str(r[7]),  # type: ignore
                      None if r[8] is None else bytes(r[8]), None if r[9] is None else bytes(r[9]))  # type: ignore

    def get(self, device_id: str) -> Device | None:
        r = self._db.execute("SELECT device_id, key, state, label, patient_ref, created_at, revoked_at, "
                             "revoke_reason, next_key, unique_id FROM devices WHERE device_id=?",
                             (device_id,)).fetchone()
        return self._row(r) if r else None

    def all(self) -> list[Device]:
        return self._all(self._db)

    def read_all(self) -> list[Device]:
        """all(), over a read connection of its own: callable from any thread (the agent
        reads the registry this way off its event loop; this object's own connection
        stays with the thread that uses it)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA query_only=ON")
            return self._all(db)
        except sqlite3.OperationalError:  # a card too full to make the -shm file a WAL reader maps
            if wal_holds_commits(self.path):
                raise
        finally:
            db.close()
        db = read_as_it_stands(self.path)
        try:
            return self._all(db)
        finally:
            db.close()

    def _all(self, db: sqlite3.Connection) -> list[Device]:
        """The devices of the rows that hold one; the others' RegistryError messages go to self.damaged
        (a row edited by hand must not stop the agent from reading the rest, nor any command)."""
        devices, damaged = [], []
        for r in db.execute("SELECT device_id, key, state, label, patient_ref, created_at, revoked_at, "
                            "revoke_reason, next_key, unique_id FROM devices ORDER BY device_id"):
            try:
                devices.append(self._row(r))
            except RegistryError as e:
                damaged.append(str(e))
        self.damaged = damaged
        return devices

    def add(self, device_id: str, label: str = "", patient_ref: str = "", key: bytes | None = None,
            actor: str | None = None, unique_id: bytes | None = None) -> Device:
        """Registers an active device (key: made here if None; unique_id: its chip's, as provisioning
        read it). Raises RegistryError for a malformed id or key, or an id already registered."""
        if not valid_device_id(device_id):
            raise RegistryError("device id must be 1 to 16 of a-z, 0-9, '-': %r" % device_id, device_id)
        for what, text, limit in (("a label", label, MAX_LABEL_CHARS),
                                   ("a patient reference", patient_ref, MAX_PATIENT_REF_CHARS)):
            problem = text_problem(what, text, limit)
            if problem:
                raise RegistryError(problem, device_id)
        dev = self.get(device_id)
        if dev is not None:
            raise RegistryError("device %s is already registered (%s)%s" % (
                device_id, dev.state, ": to use the id again, provision a board with --device-id %s (a new key), or "
                "run pulsebridge erase --device %s first (what the hub holds of it goes too)" % (device_id, device_id)
                if dev.state == "revoked" else ""), device_id)
        if key is None:
            key = secrets.token_bytes(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise RegistryError("a device key is %d bytes" % KEY_BYTES, device_id)
        if unique_id is not None and not 0 < len(unique_id) <= MAX_UNIQUE_ID:
            raise RegistryError("a chip's unique id is 1 to %d bytes" % MAX_UNIQUE_ID, device_id)
        now = time.time()
        with self._change():
            self._db.execute("INSERT INTO devices(device_id, key, state, label, patient_ref, created_at, "
                             "key_changed_at, unique_id) VALUES(?,?,?,?,?,?,?,?)",
                             (device_id, key, "active", label, patient_ref, now, now, unique_id))
            self.audit.record("device.add", device_id, actor, label=label,
                              **({"unique_id": unique_id.hex()} if unique_id else {}))
        dev = self.get(device_id)
        assert dev is not None
        return dev

    def revoke(self, device_id: str, reason: str, actor: str | None = None) -> None:
        dev = self.get(device_id)
        if dev is None:
            raise RegistryError("no device %s" % device_id, device_id)
        if dev.state == "revoked":
            raise RegistryError("device %s is already revoked" % device_id, device_id)
        with self._change():
            self._db.execute("UPDATE devices SET state='revoked', revoked_at=?, revoke_reason=? WHERE device_id=?",
                             (time.time(), reason, device_id))
            self.audit.record("device.revoke", device_id, actor, reason=reason)

    def begin_rotation(self, device_id: str, actor: str | None = None) -> bytes:
        """A new key, accepted alongside the current one until complete_rotation():
        no window in which the board's frames are refused, whichever key it uses."""
        dev = self.get(device_id)
        if dev is None or dev.state != "active":
            raise RegistryError("no active device %s" % device_id, device_id)
        key = secrets.token_bytes(KEY_BYTES)
        with self._change():
            self._db.execute("UPDATE devices SET next_key=? WHERE device_id=?", (key, device_id))
            self.audit.record("key.rotate.begin", device_id, actor)
        return key

    def complete_rotation(self, device_id: str, actor: str | None = None) -> None:
        dev = self.get(device_id)
        if dev is None or dev.next_key is None:
            raise RegistryError("no key rotation under way for %s" % device_id, device_id)
        with self._change():
            self._db.execute("UPDATE devices SET key=next_key, next_key=NULL, key_changed_at=? WHERE device_id=?",
                             (time.time(), device_id))
            self.audit.record("key.rotate.complete", device_id, actor)

    def abort_rotation(self, device_id: str, actor: str | None = None) -> None:
        with self._change():
            self._db.execute("UPDATE devices SET next_key=NULL WHERE device_id=?", (device_id,))
            self.audit.record("key.rotate.abort", device_id, actor)

    def row(self, device_id: str) -> tuple[object, ...] | None:
        """The device's whole row as stored (key included), for restore_row()."""
        r = self._db.execute("SELECT * FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return tuple(r) if r else None

    def restore_row(self, device_id: str, row: tuple[object, ...] | None) -> None:
        """Puts the device back as row() gave it (None: not registered), in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM devices WHERE device_id=?", (device_id,))
            if row is not None:
                self._db.execute("INSERT INTO devices VALUES(%s)" % ",".join("?" * len(row)), row)
        except sqlite3.Error as e:
            self._db.execute("ROLLBACK")
            raise RegistryError("could not restore %s: %s" % (device_id, e), device_id) from None
        self._db.execute("COMMIT")

    def remove(self, device_id: str, actor: str | None = None) -> None:
        with self._change():
            self._db.execute("DELETE FROM devices WHERE device_id=?", (device_id,))
            self.audit.record("device.remove", device_id, actor)
