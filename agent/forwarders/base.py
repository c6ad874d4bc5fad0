"""What every forwarder shares: the outbox loop, retry, TLS, documents."""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import enum
import functools
import logging
import random
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import orjson

from agent.config import BackendConfig
from agent.errors import PulsebridgeError
from agent.record import FrameRecord, iso_ms, iso_s
from agent.store import KIND_ALERT, KIND_GAP, KIND_ORIGIN, KIND_VITAL, Row, Store, StoreError, check_private
from protocols import messages  # flags: constants, not the codec
from protocols.errors import ProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)



class DeliveryError(PulsebridgeError):
    """The backend did not take the batch; it will be retried. .backend names it, .row_ids the
    batch's rows, .http_status what it answered, when the raiser knows them."""


class RefusedError(DeliveryError):
    """The backend refused the batch for what it holds (a permanent 4xx: invalid, a reference it
    cannot resolve, too large): sent again as it is, it would be refused again. .http_status is the
    HTTP status, .reason the backend's own words (bounded, for the log and the quarantine)."""

    def __init__(self, http_status: int, reason: str, *, backend: str = "", row_ids: Iterable[int] = ()) -> None:
        super().__init__("HTTP %d: %s" % (http_status, reason), backend=backend, row_ids=row_ids,
                         http_status=http_status)
        self.reason = reason


# What a backend may say about one frame in a refusal, as kept and logged.
REASON_CHARS = 300


class State(enum.Enum):
    IDLE = "idle"
    SENDING = "sending"
    BACKOFF = "backoff"


class Backoff:
    """Capped exponential backoff with full jitter (a random delay up to the cap
    of the current step), so hubs that lost the same backend do not retry in step."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 60.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(self.base_s / 2, min(self.cap_s, self.base_s * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


def idempotency_key(row: Row) -> str:
    if row.kind == KIND_GAP:
        return "gap:%s:%d" % (row.device_id, row.seq)
    if row.kind in (KIND_VITAL, KIND_ALERT):
        return "%s:%s:%d" % ("vital" if row.kind == KIND_VITAL else "alert", row.device_id, row.seq)
    return "%s:%d:%d" % (row.device_id, row.epoch, row.seq)


class Subjects:
    """The patient each board was provisioned for (registry.patient_ref), as the documents'
    "subject". A frame stored before its board's current registration (re-provisioned since,
    perhaps for another patient) gets None: unknown is never a wrong patient. The registry is
    read by refresh(), off the event loop, at most once per REFRESH_S (a forwarder awaits it
    before each delivery); of() answers from what was read (reading at once only if nothing
    was read yet: a caller outside the agent's loop)."""

    REFRESH_S = 5.0

    def __init__(self, registry: Any) -> None:
        self.registry = registry  # agent.registry.Registry (duck-typed: .read_all() -> devices)
        self._by_device: dict[str, tuple[str, float]] = {}
        self._read_at: float | None = None  # monotonic s; None: never read

    def _fill(self, devices: list[Any]) -> None:
        self._by_device = {d.device_id: (d.patient_ref, d.created_at) for d in devices}
        self._read_at = time.monotonic()

    async def refresh(self) -> None:
        """Re-reads the registry on a thread once what was read is REFRESH_S old."""
        if self._read_at is None or time.monotonic() - self._read_at > self.REFRESH_S:
            self._fill(await asyncio.to_thread(self.registry.read_all))

    def of(self, device_id: str, received_at: float) -> str | None:
        if self._read_at is None:
            self._fill(self.registry.read_all())
        ref, since = self._by_device.get(device_id, ("", 0.0))
        return ref if ref and received_at >= since else None


def document(row: Row, hub_id: str, subject: str | None = None, binary: bool = False,
             arrays: bool = False) -> dict[str, Any]:
    """The decoded form of a stored frame, with the original COSE bytes; subject is the
    patient reference given at provisioning (None: none known for this frame); binary,
    arrays: as frame_document() says."""
    received = iso_s(row.received_at)
    if row.kind == KIND_GAP:
        doc: dict[str, Any] = {"type": "gap", "idempotency_key": idempotency_key(row), "hub_id": hub_id,
                               "received_at": received}
        doc.update(row.info or {})
        doc["subject"] = subject
        return doc
    if row.kind in (KIND_VITAL, KIND_ALERT):
        doc = dict(row.info or {})
        doc.update(idempotency_key=idempotency_key(row), hub_id=hub_id, received_at=received)
        doc["subject"] = subject
        return doc
    if row.kind == KIND_ORIGIN and row.raw is not None:
        # The board's origin checkpoint, as it came: only the backend holds
        # the key its content is MACed under (pulsebridge verify-origin).
        return {"type": "origin_checkpoint", "idempotency_key": idempotency_key(row), "hub_id": hub_id,
                "device_id": row.device_id, "subject": subject, "epoch": row.epoch, "seq": row.seq,
                "received_at": received, "cose": row.raw if binary else base64.b64encode(row.raw).decode()}
    f = row.frame
    if f is None:
        raise RemoteProtocolError("stored frame %s has no samples to forward" % idempotency_key(row), "missing")
    return frame_document(f, hub_id, subject, received, binary, arrays)


def frame_document(f: FrameRecord, hub_id: str, subject: str | None, received_at: str | None = None,
                   binary: bool = False, arrays: bool = False) -> dict[str, Any]:
    """A sample frame's document. binary=False: JSON-ready (channels as lists of
    ints, the COSE bytes in base64); arrays=True: the same, but each channel its
    int32 array, for encode_json (which writes it as a list, without making one);
    binary=True: for CBOR (channels as int32 arrays, tagged typed arrays once
    encoded; the COSE bytes as bytes)."""
    t0_utc, source = f.start_utc_s()
    return {
        "type": "samples",
        "idempotency_key": f.key,
        "hub_id": hub_id,
        "device_id": f.device_id,
        "subject": subject,
        "epoch": f.epoch,
        "seq": f.seq,
        "stream": f.stream_name,
        "rate_hz": f.rate_hz,
        "t0_ms": f.t0_ms,
        "t0_utc": iso_ms(t0_utc),
        "time_source": source,
        "first_index": f.first_index,
        "count": f.count,
        "scale": {"num": f.scale_num, "den": f.scale_den, "unit": f.unit},
        "ppg_drive": None if f.ppg_drive is None else dict(zip(
            ("led_red_ua", "led_ir_ua", "adc_range_na", "pulse_width_us"), f.ppg_drive)),
        "status": {"lead_off": bool(f.flags & messages.FLAG_LEAD_OFF),
                   "saturated": bool(f.flags & messages.FLAG_SATURATED),
                   "fifo_overflow": bool(f.flags & messages.FLAG_FIFO_OVERFLOW),
                   "sensor_fault": bool(f.flags & messages.FLAG_SENSOR_FAULT),
                   "fifo_lost_samples": f.fifo_lost_samples, "frames_dropped_by_board": f.frames_dropped_by_board,
                   "jitter_us": f.jitter_us},
        "channels": dict(zip(f.channel_names, f.channels if binary else (
            # orjson writes native-order, contiguous int32 arrays itself (as stored, no copy made).
            np.ascontiguousarray(ch, dtype=np.int32) if arrays else ch.tolist() for ch in f.channels))),
        "received_at": received_at or iso_s(f.received_at),
        "cose": f.raw if binary else base64.b64encode(f.raw).decode(),
    }


def encode_json(doc: Any) -> bytes:
    """A document (or a list of them) as JSON in UTF-8, compact. Numpy arrays (the
    channels of documents made with arrays=True) are written as lists of numbers by
    orjson itself: a frame's samples cost no Python int each (json.dumps of a
    512-sample channel's list took most of a document's time)."""
    return orjson.dumps(doc, default=_as_list, option=orjson.OPT_SERIALIZE_NUMPY)


def _as_list(value: Any) -> Any:
    # What orjson leaves to us: an array it does not write itself (not C-contiguous, not native byte order).
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError("%s is not JSON serializable" % type(value).__name__)


def read_secret(path: Any, what: str) -> str:
    """The secret in path (a Path), stripped. Raises StoreError naming the file and what is wrong with it:
    unsafe (check_private), missing or unreadable (Python's "[Errno 2] No such file or directory: '...'"
    was the status's last error)."""
    try:
        check_private(path, what)
        return str(path.read_text().strip())
    except FileNotFoundError:
        raise StoreError("%s file %s: no such file" % (what, path)) from None
    except OSError as e:
        raise StoreError("%s file %s cannot be read: %s" % (what, path, e.strerror or e)) from None


def warn_if_insecure(cfg: BackendConfig) -> None:
    """Logs what insecure = true gives up (plaintext, or TLS without verification): once per start, by
    the forwarder, not at each connection (an MQTT backend down for an hour said it at every retry)."""
    scheme = urlparse(cfg.url).scheme
    if scheme in ("http", "mqtt"):
        log.warning("backend %s uses plaintext %s:// (insecure = true): health data crosses the network "
                    "unencrypted", cfg.name, scheme)
    elif cfg.insecure:
        log.warning("backend %s: TLS certificate verification is OFF (insecure = true)", cfg.name)


def tls_context(cfg: BackendConfig) -> ssl.SSLContext | None:
    """None for an explicitly insecure plaintext URL; otherwise a verifying context (warn_if_insecure
    says what insecure = true gives up)."""
    if urlparse(cfg.url).scheme in ("http", "mqtt"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (OSError, ssl.SSLError) as e:  # which file, and what is wrong with it ("[Errno 2]" named none)
        raise StoreError("ca_file %s: %s" % (cfg.ca_file, _tls_file_problem(e, "no CA certificate in it (PEM)"))
                         ) from None
    if cfg.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.client_cert:
        if cfg.client_key:
            check_private(cfg.client_key, "client key")
        try:
            ctx.load_cert_chain(str(cfg.client_cert), str(cfg.client_key) if cfg.client_key else None)
        except (OSError, ssl.SSLError) as e:  # "[SSL] PEM lib (_ssl.c:3905)" said nothing of which file
            raise StoreError("client_cert %s%s cannot be loaded with its key (%s)" % (
                cfg.client_cert, " (client_key %s)" % cfg.client_key if cfg.client_key else "",
                _tls_file_problem(e, "PEM certificate and private key?"))) from None
    return ctx


def _tls_file_problem(e: Exception, not_pem: str) -> str:
    """What is wrong with a TLS file, in words: missing, unreadable, or not what it should hold."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, ssl.SSLError):
        return not_pem
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


class Forwarder(abc.ABC):
    def __init__(self, cfg: BackendConfig, store: Store, hub_id: str, wake: asyncio.Event,
                 subjects: Subjects | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.store = store
        self.hub_id = hub_id
        self.wake = wake
        self.subjects = subjects
        self.state = State.IDLE
        self.backoff = Backoff()
        self.forwarded = 0
        self.failures = 0
        self.undeliverable = 0
        # Rows per request: cfg.batch, halved while the backend refuses whole batches, until
        # a batch passes (a server's size limit) or one row alone is refused (quarantined).
        self.batch_limit = cfg.batch
        self.last_error = ""
        # For the status page: when this backend last acknowledged rows, and since when it has
        # been failing (UTC s; None: it is not failing).
        self.last_delivered_at: float | None = None
        self.failing_since: float | None = None
        # Since when it has refused what it was sent with no delivery between (UTC s; None: it
        # delivered since its last refusal). A refusal is no failure (nothing is retried), so a
        # backend refusing every frame never had a failing_since while nothing reached it.
        self.refused_since: float | None = None
        warn_if_insecure(cfg)

    def secret_files(self) -> list[tuple[Path, str]]:
        """The secret files this backend reads when it delivers, as (path, what it holds)."""
        return []

    def check_secrets(self) -> None:
        """Reads each secret file once at start, so a missing or unsafe one is told at once (logged,
        and in the status as the backend's last error), not only when a first reading is sent."""
        for path, what in self.secret_files():
            try:
                read_secret(path, what)
            except (OSError, StoreError) as e:
                self.last_error = "%s: %s" % (what, e)
                log.warning("backend %s: its %s cannot be used (%s): nothing will be delivered to it until this "
                            "is fixed", self.name, what, e)
        try:  # its TLS files (CA, client certificate and key) too
            tls_context(self.cfg)
        except StoreError as e:
            self.last_error = "StoreError: %s" % e
            log.warning("backend %s: %s: nothing will be delivered to it until this is fixed", self.name, e)

    def document(self, row: Row, binary: bool = False, arrays: bool = False) -> dict[str, Any]:
        """A row's document with its subject (document() says what binary and arrays do)."""
        subject = self.subjects.of(row.device_id, row.received_at) if self.subjects is not None else None
        return document(row, self.hub_id, subject, binary, arrays)

    def _undecodable(self, rows: list[Row]) -> list[Row]:
        bad = []
        for r in rows:
            try:
                document(r, self.hub_id)
            except ProtocolError:
                bad.append(r)
        return bad

    async def _refused(self, rows: list[Row], e: RefusedError) -> None:
        """A permanent refusal: halve the batch to find the row it is about; a row refused on
        its own leaves this backend's outbox for the quarantine, with the reason, counted."""
        self.last_error = "refused: %s" % e
        if self.refused_since is None:
            self.refused_since = time.time()
        if len(rows) > 1:
            self.batch_limit = max(1, len(rows) // 2)
            log.warning("backend %s refused a batch of %d (%s); sending %d at a time to find what it refuses",
                        self.name, len(rows), e, self.batch_limit)
            return
        row = rows[0]
        reason = "refused by backend %s: %s" % (self.name, e)
        # Counted in the same transaction (refused:<backend>), which is what the status shows.
        await self.store.run(lambda db: Store.refuse_delivery(db, self.name, row.id, row.device_id, reason[:500]))
        self.batch_limit = self.cfg.batch
        log.error("backend %s refused %s for good: %s; quarantined, not retried", self.name, idempotency_key(row), e)

    def deliver_timeout_s(self) -> float | None:
        """The bound on one deliver(): timeout_s three times over (the connection, the request,
        its answer); None: deliver() bounds each of its own waits."""
        return self.cfg.timeout_s * 3

    def prepare(self, rows: list[Row]) -> None:
        """Called on the read's thread once a batch is read, before deliver(rows): a backend may
        make its documents there, off the event loop and while the batch before is delivered
        (it keeps them for deliver). It must not raise (a failure is deliver's to tell).
        Nothing by default."""
        return None

    @abc.abstractmethod
    async def deliver(self, rows: list[Row]) -> None:
        """Delivers rows; returns only once the backend has acknowledged all of them."""

    async def close(self) -> None:
        return None

    async def run(self) -> None:
        await asyncio.to_thread(self.check_secrets)
        while not self.store.writable:  # open for reading only (a full card at start): nothing could be
            self.wake.clear()           # marked delivered, and its readers read the file as it stood
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.wake.wait()  # set once the store opens for writing
        reader = self.store.reader()
        # Batches overlap: the next one is read while this one is delivered, and a delivered
        # batch's rows leave the outbox (its commit) while the next one is delivered. A read
        # ahead leaves out the rows in flight and those being marked; it is dropped if the
        # delivery fails (its rows are read again). Rows are counted forwarded once marked.
        ahead: asyncio.Future[list[Row]] | None = None
        marking: asyncio.Future[None] | None = None
        marking_ids: list[int] = []

        def fetch(limit: int, exclude: list[int]) -> list[Row]:
            rows = Store.fetch_outbox(reader, self.name, limit, exclude) if exclude else \
                Store.fetch_outbox(reader, self.name, limit)
            if rows:
                self.prepare(rows)
            return rows

        def read(exclude: list[int]) -> asyncio.Future[list[Row]]:
            # On a thread at once, and never cancelled (awaited through shield): a stop waits for it
            # (drop_ahead) before the reader is closed, for closing a SQLite connection while another
            # thread runs a statement on it crashes the process (a segfault in libsqlite3, seen at a
            # forwarder's stop). A read waits for a lock at most the store's busy timeout.
            return asyncio.get_running_loop().run_in_executor(None, fetch, self.batch_limit, exclude)

        async def drop_ahead() -> None:
            nonlocal ahead
            if ahead is not None:
                await asyncio.wait([ahead])  # its thread done with the reader; its rows not taken
                if not ahead.cancelled():
                    ahead.exception()
                ahead = None

        def marked(n: int, fut: asyncio.Future[None]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.forwarded += n

        async def idle() -> None:
            # Until a commit since the last read (wake: cleared before each read) or 1 s, then
            # linger_s more: the frames that come meanwhile go in one request, one commit.
            self.state = State.IDLE
            try:
                async with asyncio.timeout(1.0):
                    await self.wake.wait()
                await asyncio.sleep(self.cfg.linger_s)
            except TimeoutError:
                pass

        try:
            while True:
                if ahead is None:
                    self.wake.clear()  # a commit after it sets it again: nothing it holds is missed
                    ahead = read(marking_ids)
                rows = await asyncio.shield(ahead)
                ahead = None
                if not rows:
                    if marking is not None:  # what was delivered is marked before the forwarder idles
                        await asyncio.shield(marking)
                        marking, marking_ids = None, []
                    await idle()
                    continue
                self.state = State.SENDING
                ids = [r.id for r in rows]
                # Fewer rows than asked for: the outbox held no more when read, so nothing is read
                # ahead; once delivered, the forwarder idles until a commit (at a low rate, one
                # request and one read a linger_s, not a read and a request for each commit).
                short = len(rows) < self.batch_limit
                if not short:
                    self.wake.clear()
                    ahead = read(marking_ids + ids)
                try:
                    if self.subjects is not None:  # the documents' subjects, read off the loop
                        await self.subjects.refresh()
                    async with asyncio.timeout(self.deliver_timeout_s()):
                        await self.deliver(rows)
                except ProtocolError:
                    bad = self._undecodable(rows)
                    # Authentic but unreadable (a board bug): never deliverable, so it
                    # must not block the outbox. Counted, logged, left in the store.
                    await self.store.delivered(self.name, [r.id for r in bad])
                    self.undeliverable += len(bad)
                    log.error("backend %s: %d stored frames cannot be decoded (%s); skipped",
                              self.name, len(bad), ", ".join(idempotency_key(r) for r in bad[:3]))
                    await drop_ahead()
                    continue
                except RefusedError as e:
                    await self._refused(rows, e)  # handed to the store before anything else is awaited
                    await drop_ahead()
                    continue
                except Exception as e:
                    # Expected: the backend away or refusing, the network, TLS, a secret file that is
                    # missing or unsafe (StoreError says which and how to fix it): one line, no traceback.
                    if not isinstance(e, (DeliveryError, OSError, TimeoutError, ssl.SSLError, StoreError)):
                        log.exception("backend %s: unexpected failure", self.name)
                    self.failures += 1
                    if self.failing_since is None:
                        self.failing_since = time.time()
                    self.last_error = "%s: %s" % (type(e).__name__, e)
                    delay = self.backoff.next_delay()
                    log.warning("backend %s: %s; retry in %.1f s", self.name, self.last_error, delay)
                    self.state = State.BACKOFF
                    await drop_ahead()
                    await asyncio.sleep(delay)
                    continue
                if marking is not None:
                    await asyncio.shield(marking)  # one batch being marked at a time
                marking, marking_ids = self.store.submit_delivered(self.name, ids), ids
                marking.add_done_callback(functools.partial(marked, len(rows)))
                self.last_delivered_at, self.failing_since, self.refused_since = time.time(), None, None
                self.backoff.reset()
                if short:
                    await idle()
        finally:
            # Stopped (or failed): what was delivered is still marked (the writer's job goes on;
            # awaited so the stop does not leave it behind), and the read ahead ends before its
            # connection is closed (a connection closed under a running statement crashes SQLite).
            if marking is not None:
                await asyncio.wait([marking])
                if not marking.cancelled():
                    marking.exception()
            await drop_ahead()
            reader.close()
            await self.close()
