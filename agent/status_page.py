"""The hub's status page: one card per sensor (named by its room label),
its last values against the alert thresholds, live ECG and pulse wave,
delivery to the care team, alerts at the top; French and English.

Served by the agent on the local network only (clients outside loopback,
private and link-local addresses are refused) and behind authentication
(HTTP Basic, the password read from a file readable by the service only;
no password file, no page: there are no default credentials). The page
polls two small JSON endpoints once a second and draws on canvases, so it
reads well on a phone; its script and style are served files (the CSP
allows no inline script or style).

What the page says is derived here, in `view`, from facts with their
times (a sensor's last frame, a backend's failing since, the oldest frame
waiting for it); the page's script adds what only it can know: that the
hub stopped answering its polls.

A client on the local network is held to bounds: wrong passwords make it
wait, then lock it out (logged, counted); a request's headers must arrive
within HEADER_TIMEOUT_S; each client, and all together, hold at most so
many connections (`ConnectionLimits`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.errors import PulsebridgeError
from agent.ota import progress as ota_progress
from agent.store import StoreError, check_private

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], float]

# A sensor heard less than this long ago is live (a board sends a frame about every second).
FRESH_S = 30.0
# A backend failing this long, or whose oldest waiting frame is this old, is not delivering
# (shorter blips are retried unseen: a backoff of a few seconds is normal).
DELIVERY_FAILING_S = 60.0
DELIVERY_LATE_S = 180.0

# ---- bounds for the clients of the page -------------------------------------------------

# All clients together: far below the process's open-file limit (1024 on many systems).
MAX_CONNECTIONS = 128
# A browser opens at most 6 connections to one host; more from one address is not a page.
MAX_CONNECTIONS_PER_CLIENT = 16
# A request's headers (a few hundred bytes) must arrive within this, from its first byte or from the
# connection's opening; a half-sent request is cut.
HEADER_TIMEOUT_S = 10.0
# A kept-alive connection with no request for this long is closed (the page polls every second).
IDLE_TIMEOUT_S = 15.0
# Wrong passwords a client may send freely; after that each one makes it wait twice as long, up to
# LOCKOUT_CAP_S: a guessing run gets a few dozen tries an hour instead of thousands a second.
FREE_FAILURES = 5
LOCKOUT_BASE_S = 2.0
LOCKOUT_CAP_S = 900.0
# Clients remembered for their failures; the oldest unlocked ones are forgotten beyond this.
MAX_CLIENTS_TRACKED = 4096
# An IPv6 host chooses its own addresses in its network's /64 (privacy extensions make new ones at
# will): for the limits above, an IPv6 client is its /64, as an IPv4 client is its address. Hosts
# sharing a /64 (a home network's, or link-local fe80::/64) share one count: one of them guessing
# makes the others wait too, for the same lockout (IPv4 is not affected).
CLIENT_PREFIX_V6 = 64
# Connections refused or cut are logged at most this often, as a count (a flood must not flood the log).
LIMITS_LOG_EVERY_S = 60.0

STATIC_FILES = {"page.js": "application/javascript", "page.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-store",
    "Server": "pulsebridge",  # no version banner
}


def client_of(address: str) -> str:
    """The client an address counts as for the page's limits: an IPv4 address itself (also when
    mapped into IPv6: "::ffff:192.0.2.7" is "192.0.2.7"); an IPv6 address, its /64
    ("2001:db8:1:2::/64"), without a zone index; what is not an IP address, as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, CLIENT_PREFIX_V6), strict=False))
    return str(ip)


def _local(addr: str | None) -> bool:
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return False
    return bool(ip.is_loopback or ip.is_private or ip.is_link_local)


# Shorter passwords fall to a guessing run on the local network within hours.
MIN_PASSWORD_CHARS = 12
# A password file is one line; anything larger is not one.
MAX_PASSWORD_FILE_BYTES = 4096


class PasswordFileError(PulsebridgeError):
    """The status page's password file cannot be used; .missing tells absent from unsafe."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def read_password(path: Path) -> str:
    """The status page's password from path (one line, mode 0600, the service's own, at least
    MIN_PASSWORD_CHARS characters); PasswordFileError says why not."""
    try:
        check_private(path, "status page password file")
        if path.stat().st_size > MAX_PASSWORD_FILE_BYTES:
            raise PasswordFileError("status page password file %s is larger than %d bytes: not a password file"
                                    % (path, MAX_PASSWORD_FILE_BYTES))
        password = path.read_text().strip()
    except FileNotFoundError:
        raise PasswordFileError("no status page password file at %s" % path, missing=True) from None
    except StoreError as e:
        raise PasswordFileError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise PasswordFileError("status page password file %s cannot be read: %s" % (path, why)) from None
    if len(password) < MIN_PASSWORD_CHARS or "\n" in password:
        raise PasswordFileError("status page password in %s must be one line of at least %d characters (it has %d)"
                                % (path, MIN_PASSWORD_CHARS, len(password)))
    return password


@dataclass
class _Client:
    failures: int = 0
    locked_until: float = 0.0


@dataclass
class PasswordGuard:
    """Wrong passwords per client (client_of: an IPv4 address, an IPv6 /64): FREE_FAILURES free,
    then a lockout doubling from LOCKOUT_BASE_S up to LOCKOUT_CAP_S (the right password too is
    refused while it lasts).
    A success forgets the client's failures. Counted for the status: failures, lockouts."""

    clock: Clock = time.monotonic
    failures: int = 0
    lockouts: int = 0
    refused_locked: int = 0
    _clients: dict[str, _Client] = field(default_factory=dict)

    def wait_s(self, client: str) -> float:
        """Seconds the client must still wait before its password is looked at (0: none)."""
        c = self._clients.get(client)
        return max(0.0, c.locked_until - self.clock()) if c is not None else 0.0

    def failed(self, client: str) -> float:
        """A wrong password from client; returns the lockout it starts (s, 0 for none)."""
        self.failures += 1
        c = self._clients.pop(client, None) or _Client()
        self._clients[client] = c  # most recent last: the oldest are forgotten first
        c.failures += 1
        lock_s = 0.0
        if c.failures > FREE_FAILURES:
            lock_s = min(LOCKOUT_CAP_S, LOCKOUT_BASE_S * 2 ** (c.failures - FREE_FAILURES - 1))
            c.locked_until = self.clock() + lock_s
            self.lockouts += 1
            log.warning("status page: %d wrong passwords from %s; its next try waits %.0f s", c.failures,
                        client, lock_s)
        elif c.failures == FREE_FAILURES:
            log.warning("status page: %d wrong passwords from %s", c.failures, client)
        self._forget_oldest()
        return lock_s

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)

    def _forget_oldest(self) -> None:
        now = self.clock()
        for k in list(self._clients):
            if len(self._clients) <= MAX_CLIENTS_TRACKED:
                break
            if self._clients[k].locked_until <= now:
                del self._clients[k]

    def locked_now(self) -> int:
        now = self.clock()
        return sum(1 for c in self._clients.values() if c.locked_until > now)


@dataclass
class ConnectionLimits:
    """Open connections per client (client_of: an IPv4 address, an IPv6 /64) and in all, and how many
    were refused or cut."""

    max_total: int = MAX_CONNECTIONS
    max_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    header_timeout_s: float = HEADER_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    open: dict[str, int] = field(default_factory=dict)
    total: int = 0
    refused: int = 0
    timed_out: int = 0
    malformed: int = 0  # requests the HTTP parser refused (answered 400)
    clock: Clock = time.monotonic
    _logged: tuple[float, int, int, int] | None = None  # when, refused, timed_out, malformed at the last log line

    def admit(self, client: str) -> bool:
        if self.total >= self.max_total or self.open.get(client, 0) >= self.max_per_client:
            self.refused += 1
            self.tell(client)
            return False
        self.open[client] = self.open.get(client, 0) + 1
        self.total += 1
        return True

    def tell(self, client: str) -> None:
        """Logs the connections refused and cut and the malformed requests since the last line, at most
        every LIMITS_LOG_EVERY_S."""
        now = self.clock()
        at, refused, timed_out, malformed = self._logged or (now - LIMITS_LOG_EVERY_S, 0, 0, 0)
        if now - at < LIMITS_LOG_EVERY_S:
            return
        self._logged = (now, self.refused, self.timed_out, self.malformed)
        log.warning("status page: %d connections refused over the limits (%d per address, %d in all), %d cut "
                    "for half-sent requests and %d malformed requests answered 400 since the last report; the "
                    "latest from %s", self.refused - refused, self.max_per_client, self.max_total,
                    self.timed_out - timed_out, self.malformed - malformed, client)

    def release(self, client: str) -> None:
        self.total -= 1
        n = self.open.pop(client, 1) - 1
        if n:
            self.open[client] = n


class _CountMalformed(logging.Filter):
    """On the page's aiohttp server logger: a request its parser refused (a header line over 8190
    bytes, a control character in a header: answered 400) is counted in the limits and told with
    them, not logged at ERROR with its traceback (anyone on the network could fill the log so).
    Any other error (a handler's bug: a 500) is logged as aiohttp logs it."""

    def __init__(self, limits: ConnectionLimits) -> None:
        super().__init__()
        self.limits = limits

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or exc.code != 400:
            return True
        self.limits.malformed += 1
        self.limits.tell(client_of(str(record.args[0])) if isinstance(record.args, tuple) and record.args else "")
        return False


def _server_logger(limits: ConnectionLimits) -> logging.Logger:
    """aiohttp's server logger for one page: a child of this module's log, with _CountMalformed (a
    logger of its own, not the shared "aiohttp.server", so each page counts into its own limits)."""
    logger = logging.Logger(log.name + ".http")
    logger.parent = log
    logger.addFilter(_CountMalformed(limits))
    return logger


class _Guarded(asyncio.Protocol):
    """Stands before aiohttp's protocol for one connection: refuses it beyond the limits, and cuts
    it when a request's headers (up to the blank line) take longer than header_timeout_s from the
    connection's opening or from the request's first byte. Requests with a body are not served here."""

    def __init__(self, limits: ConnectionLimits, inner: asyncio.Protocol) -> None:
        self.limits = limits
        self.inner = inner
        self.client = ""
        self.admitted = False
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.client = client_of(str(peer[0])) if peer else ""
        if not self.limits.admit(self.client):
            transport.abort()
            return
        self.admitted = True
        self.transport = transport
        self._arm()
        self.inner.connection_made(transport)

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.limits.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self.limits.timed_out += 1
        self.limits.tell(self.client)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        self._arm()  # a request begins, or goes on
        buf = self._tail + data
        end = buf.rfind(b"\r\n\r\n")
        if end >= 0:
            self._disarm()
            if end + 4 < len(buf):  # the next request began already
                self._arm()
        self._tail = buf[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self._disarm()
        self.limits.release(self.client)
        self.inner.connection_lost(exc)


# ---- what the page says ----------------------------------------------------------------------


def _rules(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The alert thresholds by vital kind (pulse rate held to the heart rate's)."""
    out: dict[str, dict[str, Any]] = {}
    for r in snapshot.get("alert_rules", []):
        if r["signal"] in ("spo2", "heart_rate"):
            out[r["signal"]] = {"low": r.get("low"), "high": r.get("high")}
    if "heart_rate" in out:
        out["pulse_rate"] = out["heart_rate"]
    return out


def view(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What the status page shows, from the agent's snapshot (Agent.snapshot()).

    Returns {"now": hub time (UTC s), "level": "ok" | "attention" | "alert",
    "delivery": "ok" | "none" (no backend configured) | "failing",
    "notices": [{"level": "alert" | "attention" | "info", "key": text key, "args": {...}}], alerts first,
    "sensors": [{"device_id", "label", "state": "live" | "silent" | "waiting", "heard_at", "link",
                 "vitals": {kind: {"value", "unit", "at", "quality", "disagrees" (the board's heart rate and
                                   pulse rate disagree), "low", "high", "out": "low"|"high"|None}}}],
    "details": lines for a technician}. Times are UTC seconds on the hub's clock; the page turns
    them into ages against "now" and its own time since the poll.
    Green ("ok") only when every registered sensor was heard within FRESH_S, there is at least one,
    no alert is active, and each backend delivers (or none is configured, said as an info notice)."""
    now = float(snapshot["now"])
    rules = _rules(snapshot)
    store_fault = (snapshot.get("store") or {}).get("state") == "fault"
    links = {b["device_id"]: b for b in snapshot.get("boards", []) if b.get("device_id")}
    last_vitals = snapshot.get("last_vitals", {})
    active = {(a[0], a[1]) for a in snapshot.get("vitals", {}).get("active_alerts", [])}
    notices: list[dict[str, Any]] = []
    sensors = []
    labels: dict[str, str] = {}
    for s in snapshot.get("sensors", []):
        dev, heard = s["device_id"], s.get("heard_at")
        label = s.get("label") or dev
        labels[dev] = label
        link = links.get(dev, {})
        link_state = link.get("state")
        if link_state in ("connected", "stalled") and store_fault:
            link_state = "held"  # its frames arrive, or would, but the store cannot write them
        # Not live either when its link says nothing comes through (stalled, unplugged, reconnecting,
        # out of range), or its frames cannot be stored, however recent its last frame.
        receiving = link_state in (None, "connected", "connecting")
        live = now - heard <= FRESH_S and receiving and (dev, "board_silent") not in active if heard else False
        state = "waiting" if heard is None else "live" if live else "silent"
        vitals = {}
        for kind, v in last_vitals.get(dev, {}).items():
            r = rules.get(kind, {})
            # as shown: 130.4 is not "130, above 130"; a perfusion index (%) is mostly under 5, so a tenth
            value = round(v["value"], 1) if kind == "perfusion_index" else round(v["value"])
            out = ("low" if r.get("low") is not None and value < r["low"] else
                   "high" if r.get("high") is not None and value > r["high"] else None)
            vitals[kind] = {"value": value, "unit": "%" if kind in ("spo2", "perfusion_index") else "/min",
                            "at": v.get("at"), "quality": v.get("quality"), "disagrees": bool(v.get("disagrees")),
                            "low": r.get("low"), "high": r.get("high"), "out": out}
        sensors.append({"device_id": dev, "label": label, "state": state, "heard_at": heard, "link": link_state,
                        "vitals": vitals})
        if (dev, "board_silent") in active:
            notices.append({"level": "alert", "key": "alert_board_silent",
                            "args": {"label": label, "since_at": heard}})
        elif state == "silent":
            notices.append({"level": "attention", "key": "sensor_silent",
                            "args": {"label": label, "since_at": heard, "link": link_state}})
        elif state == "waiting":
            notices.append({"level": "attention", "key": "sensor_waiting", "args": {"label": label,
                                                                                   "link": link_state}})
        if link.get("identity"):  # its key is on another chip than the one provisioned
            notices.append({"level": "attention", "key": "sensor_not_the_one_set_up", "args": {"label": label}})
    for dev, rule in sorted(active):
        if rule == "board_silent":
            continue
        label = labels.get(dev, dev)
        kind = {"spo2_low": "spo2", "heart_rate_out_of_range": "heart_rate"}.get(rule)
        args: dict[str, Any] = {"label": label, "rule": rule}
        if kind is not None:
            r = rules.get(kind, {})
            args.update(low=r.get("low"), high=r.get("high"),
                        value=last_vitals.get(dev, {}).get(kind, {}).get("value"))
        notices.append({"level": "alert", "key": "alert_" + rule, "args": args})
    if snapshot.get("registry_damaged"):  # a sensor set up on this hub whose entry cannot be read: refused
        notices.append({"level": "attention", "key": "sensor_unusable", "args": {}})
    elif not snapshot.get("sensors"):
        notices.append({"level": "attention", "key": "no_sensor", "args": {}})
    delivery = "none" if not snapshot.get("backends") else "ok"
    for b in snapshot.get("backends", []):
        failing_since, oldest = b.get("failing_since"), b.get("oldest_waiting_at")
        since = None
        if failing_since is not None and now - failing_since > DELIVERY_FAILING_S:
            since = failing_since
        if oldest is not None and now - oldest > DELIVERY_LATE_S:
            since = oldest if since is None else min(since, oldest)
        refused_since = b.get("refused_since")
        if refused_since is not None and now - refused_since > DELIVERY_FAILING_S:
            delivery = "failing"  # it answers, and refuses: nothing waits for it, and nothing reaches it
            notices.append({"level": "attention", "key": "delivery_refused",
                            "args": {"name": b["name"], "since_at": refused_since}})
        elif since is not None:
            delivery = "failing"
            notices.append({"level": "attention", "key": "delivery_failing",
                            "args": {"name": b["name"], "since_at": since, "waiting": b.get("backlog", 0),
                                     "delivered_at": b.get("last_delivered_at")}})
    if delivery == "none":
        notices.append({"level": "info", "key": "no_backend", "args": {}})
    if snapshot.get("ble_adapter") and snapshot["ble_adapter"].get("state") == "down":
        notices.append({"level": "attention", "key": "bt_down", "args": {}})
    if snapshot.get("systemd") and not snapshot["systemd"].get("alive", True):
        notices.append({"level": "attention", "key": "stuck", "args": {}})
    store = snapshot.get("store") or {}
    if store.get("state") == "fault":
        notices.append({"level": "attention", "key": "store_fault", "args": {"since_at": store.get("fault_since")}})
    elif store.get("short_of_space"):
        notices.append({"level": "attention", "key": "store_short", "args": {}})
    if store.get("recovery"):
        notices.append({"level": "info", "key": "store_recovered", "args": {}})
    order = {"alert": 0, "attention": 1, "info": 2}
    notices.sort(key=lambda n: order[n["level"]])
    levels = {n["level"] for n in notices}
    level = "alert" if "alert" in levels else "attention" if "attention" in levels else "ok"
    return {"now": now, "level": level, "delivery": delivery, "notices": notices, "sensors": sensors,
            "details": _details(snapshot)}


def _details(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """Facts for a technician, as text keys with arguments: each link, each backend, refused
    messages, restarted tasks."""
    out: list[dict[str, Any]] = []
    store_fault = (snapshot.get("store") or {}).get("state") == "fault"
    for b in snapshot.get("boards", []):
        state = "held" if store_fault and b["state"] in ("connected", "stalled") else b["state"]
        out.append({"key": "d_link", "args": {"where": b.get("port") or b.get("link") or "", "state": state,
                                              "device_id": b.get("device_id") or "",
                                              "firmware": b.get("firmware") or "",
                                              "update": ota_progress(b.get("update")),
                                              "retry_in_s": b.get("retry_in_s"),
                                              "set_aside": (b.get("discarded") or {}).get("overflow", 0)}})
    for f in snapshot.get("backends", []):
        out.append({"key": "d_backend", "args": {"name": f["name"], "waiting": f.get("backlog", 0),
                                                 "sent": f.get("forwarded", 0), "error": f.get("last_error", "")}})
    refused = sum(snapshot.get("rejects", {}).values())
    if refused:
        out.append({"key": "d_refused", "args": {"n": refused}})
    for name, t in sorted((snapshot.get("tasks") or {}).items()):
        if t.get("restarts"):
            out.append({"key": "d_task", "args": {"name": name, "n": t["restarts"]}})
    return out


class StatusPage:
    """The page's HTTP server. snapshot: a coroutine function giving Agent.snapshot() (the agent's
    status_snapshot, which reads the store off the loop); waveform(device_id, stream) -> {"values": [...]};
    clock: monotonic seconds (lockouts)."""

    def __init__(self, snapshot: Callable[[], Awaitable[dict[str, Any]]],
                 waveform: Callable[[str, str], dict[str, Any]], password: str, user: str = "hub",
                 clock: Clock = time.monotonic, limits: ConnectionLimits | None = None) -> None:
        self.password = password
        self.user = user
        self.snapshot = snapshot
        self.waveform = waveform
        self.passwords = PasswordGuard(clock)
        self.limits = limits or ConnectionLimits()
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        files = resources.files("agent") / "status_static"
        self.files = {name: (files / name).read_bytes() for name in (*STATIC_FILES, "index.html")}

    def stats(self) -> dict[str, int]:
        """Counters for the status: wrong passwords, lockouts, connections open, refused, cut."""
        return {"wrong_passwords": self.passwords.failures, "lockouts": self.passwords.lockouts,
                "locked_clients": self.passwords.locked_now(), "refused_while_locked": self.passwords.refused_locked,
                "connections": self.limits.total, "connections_refused": self.limits.refused,
                "connections_timed_out": self.limits.timed_out, "malformed_requests": self.limits.malformed}

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _local(request.remote):
            return web.Response(status=403, text="local network only")
        client = client_of(request.remote or "")
        wait_s = self.passwords.wait_s(client)
        if wait_s > 0:
            self.passwords.refused_locked += 1
            return web.Response(status=429, headers={"Retry-After": str(int(wait_s) + 1)},
                                text="too many wrong passwords: try again in %d s" % (int(wait_s) + 1))
        auth = request.headers.get("Authorization", "")
        ok = False
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:], validate=True).decode().partition(":")
                ok = hmac.compare_digest(user.encode(), self.user.encode()) and hmac.compare_digest(
                    pw.encode(), self.password.encode())
            except (ValueError, UnicodeDecodeError):
                ok = False
        if not ok:
            if auth:  # a browser's first request carries none: not a wrong password
                self.passwords.failed(client)
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="pulsebridge hub"'},
                                text="authentication required")
        self.passwords.succeeded(client)
        return await handler(request)

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.files["index.html"], content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name], content_type=STATIC_FILES[name], charset="utf-8")

    async def api_text(self, request: web.Request) -> web.Response:
        return web.json_response(TEXT)

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(view(await self.snapshot()))

    async def api_wave(self, request: web.Request) -> web.Response:
        return web.json_response(self.waveform(request.query.get("device", ""), request.query.get("stream", "ecg")))

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: any free port); returns the port."""
        app = web.Application(middlewares=[self.guard])
        app.on_response_prepare.append(self._headers)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/text", self.api_text)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/wave", self.api_wave)
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.limits.idle_timeout_s,
                                    logger=_server_logger(self.limits))
        await self.runner.setup()
        inner = self.runner.server
        assert inner is not None
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Guarded(self.limits, inner()), host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()


# The page's words, French and English: plain, calm, read as a patient or a family would.
# {label} is a sensor's room label; {age} a duration, {time} a time of day (the page fills them).
TEXT = {
    "fr": {
        "title": "Passerelle de télésurveillance", "lang": "English",
        "head_ok_sent": "Tout fonctionne : les mesures arrivent et partent vers l'équipe soignante",
        "head_ok_kept": "Tout fonctionne : les mesures arrivent et sont gardées sur la passerelle",
        "head_attention": "Quelque chose est à vérifier", "head_alert": "Une alerte demande votre attention",
        "head_hub_lost": "La passerelle ne répond pas",
        "hub_lost": "Pas de réponse de la passerelle depuis {time} (il y a {age}). Les valeurs affichées ne sont "
                    "plus à jour. Vérifiez que la passerelle est branchée et allumée.",
        "hub_never": "La passerelle n'a pas encore répondu. Vérifiez qu'elle est branchée et allumée.",
        "alert_spo2_low": "{label} : oxygène bas, {value}\u00a0% (alerte en dessous de {low}\u00a0%).",
        "alert_heart_rate_out_of_range": "{label} : rythme cardiaque inhabituel, {value} par minute (attendu entre "
                                         "{low} et {high}).",
        "alert_lead_off": "{label} : une électrode s'est décollée de la peau. Remettez-la en place.",
        "alert_board_silent": "{label} : aucune mesure depuis {time} (il y a {age}). Vérifiez que le capteur est "
                              "allumé et près de la passerelle.",
        "alert_other": "{label} : alerte ({rule}).",
        "sensor_silent": "{label} : aucune mesure depuis {age}.", "sensor_waiting": "{label} : en attente de sa "
                                                                                     "première mesure.",
        "sensor_not_the_one_set_up": "{label} : ce capteur n'est pas celui qui a été installé (sa clé a été "
                                     "copiée sur un autre). Faites-le vérifier par le technicien.",
        "hint_stalled": "Il est branché, mais rien ne passe : la passerelle réessaie.",
        "hint_searching": "Il ne semble pas branché.", "hint_backoff": "La passerelle s'y reconnecte.",
        "hint_connecting": "La passerelle s'y connecte.",
        "hint_held": "La passerelle ne peut pas enregistrer ses mesures.",
        "hint_out_of_range": "Il est trop loin : rapprochez-le de la passerelle.",
        "no_sensor": "Aucun capteur n'est encore installé sur cette passerelle.",
        "sensor_unusable": "Un capteur installé sur cette passerelle ne peut pas être utilisé : ses mesures ne "
                           "sont pas reçues. Faites vérifier la passerelle par le technicien.",
        "delivery_failing": "Les mesures ne parviennent plus au service « {name} » depuis {time} (il y a {age}). "
                            "{waiting} attendent sur la passerelle, gardées en sécurité jusqu'à ce qu'il réponde.",
        "delivery_refused": "Le service « {name} » refuse les mesures depuis {time} (il y a {age}) : elles ne lui "
                            "parviennent pas. Faites vérifier la passerelle par le technicien.",
        "no_backend": "Les mesures restent sur la passerelle : aucun envoi vers une équipe soignante n'est prévu.",
        "bt_down": "Le Bluetooth de la passerelle ne répond pas : débranchez-la puis rebranchez-la.",
        "stuck": "La passerelle ne répond plus bien : elle va redémarrer d'elle-même.",
        "store_fault": "La passerelle ne peut pas enregistrer les mesures pour l'instant (sa carte mémoire est "
                       "peut-être pleine) : elles attendent sur les capteurs. Faites vérifier la passerelle par le "
                       "technicien.",
        "store_recovered": "Le stockage de la passerelle était endommagé ; il a été reconstruit.",
        "store_short": "La passerelle manque de place : elle doit effacer les plus anciennes mesures pas encore "
                       "envoyées. Faites vérifier la passerelle par le technicien.",
        "live": "En direct — dernière mesure il y a {age}", "silent": "Aucune mesure depuis {time} (il y a {age})",
        "waiting": "En attente de sa première mesure", "not_live": "Valeurs de {time}, pas en direct",
        "hr": "Rythme cardiaque", "spo2": "Oxygène dans le sang", "pr": "Pouls", "per_min": "par min",
        "out_low": "⚠ bas : alerte en dessous de {limit}", "out_high": "⚠ haut : alerte au-dessus de {limit}",
        "q_good": "signal bon", "q_fair": "signal moyen", "q_poor": "signal faible",
        "q_disagree": "pouls et fréquence cardiaque en désaccord : valeur incertaine",
        "ecg": "Tracé du cœur (ECG)", "ppg": "Onde de pouls (capteur au doigt)",
        "ecg_alt": "Tracé du cœur des 4 dernières secondes", "ppg_alt": "Onde de pouls des 4 dernières secondes",
        "wave_none": "pas de tracé en direct", "wave_rate": "{value} battements par minute",
        "details": "Détails pour un technicien",
        "d_link": "{where} : {state}", "d_device": "capteur {device}", "d_retry": "nouvel essai dans {n} s",
        "d_firmware": "micrologiciel {firmware}",
        "d_up_receiving": "Mise à jour en cours : {pct} %",
        "d_up_verifying": "Mise à jour en cours : vérification et installation",
        "d_up_installed": "Mise à jour {version} installée, à l'essai pendant une minute",
        "d_up_confirmed": "Mise à jour {version} installée",
        "d_up_refused": "Mise à jour {version} refusée par le capteur ({reason}) : il garde sa version",
        "d_up_rolled_back": "Mise à jour {version} annulée : le capteur est revenu à sa version précédente",
        "d_set_aside": "{n} messages mis de côté (le capteur les renverra)",
        "d_backend": "Envoi vers « {name} » : {waiting} en attente, {sent} envoyées",
        "d_refused": "{n} messages refusés (pas d'un capteur enregistré, ou abîmés)",
        "d_task": "Tâche interne {name} redémarrée {n} fois",
        "st_connected": "connecté", "st_searching": "rien de branché", "st_stalled": "branché, rien ne passe",
        "st_held": "connecté, ses mesures attendent : la passerelle ne peut pas les enregistrer",
        "st_backoff": "reconnexion", "st_connecting": "connexion en cours", "st_out_of_range": "hors de portée",
        "st_released": "appareil qui n'est pas un capteur enregistré : laissé libre",
        "u_s": "{n}\u00a0s", "u_min": "{n}\u00a0min", "u_h": "{n}\u00a0h {m}\u00a0min", "u_d": "{n}\u00a0jours",
    },
    "en": {
        "title": "Home monitoring hub", "lang": "Français",
        "head_ok_sent": "Everything is working: readings arrive and reach the care team",
        "head_ok_kept": "Everything is working: readings arrive and are kept on this hub",
        "head_attention": "Something needs a look", "head_alert": "An alert needs your attention",
        "head_hub_lost": "The hub is not answering",
        "hub_lost": "No answer from the hub since {time} ({age} ago). The values shown are not live. Check that "
                    "the hub is plugged in and switched on.",
        "hub_never": "The hub has not answered yet. Check that it is plugged in and switched on.",
        "alert_spo2_low": "{label}: low oxygen, {value}\u00a0% (alert below {low}\u00a0%).",
        "alert_heart_rate_out_of_range": "{label}: unusual heart rate, {value} per minute (expected between {low} "
                                         "and {high}).",
        "alert_lead_off": "{label}: an electrode has come off the skin. Put it back in place.",
        "alert_board_silent": "{label}: no reading since {time} ({age} ago). Check that the sensor is switched on "
                              "and close to the hub.",
        "alert_other": "{label}: alert ({rule}).",
        "sensor_silent": "{label}: no reading for {age}.", "sensor_waiting": "{label}: waiting for its first "
                                                                            "reading.",
        "sensor_not_the_one_set_up": "{label}: this is not the sensor that was set up (its key was copied onto "
                                     "another one). Have the technician check it.",
        "hint_stalled": "It is plugged in, but nothing comes through: the hub keeps trying.",
        "hint_searching": "It does not seem to be plugged in.", "hint_backoff": "The hub is reconnecting to it.",
        "hint_connecting": "The hub is connecting to it.",
        "hint_held": "The hub cannot store its readings.",
        "hint_out_of_range": "It is out of range: bring it closer to the hub.",
        "no_sensor": "No sensor is set up on this hub yet.",
        "sensor_unusable": "A sensor set up on this hub cannot be used: its readings are not received. Have the "
                           "technician check the hub.",
        "delivery_failing": "Readings have not reached “{name}” since {time} ({age} ago). {waiting} are waiting "
                            "on the hub, kept safely until it answers.",
        "delivery_refused": "“{name}” has refused the readings since {time} ({age} ago): they do not reach it. "
                            "Have the technician check the hub.",
        "no_backend": "Readings stay on this hub: sending them to a care team is not set up.",
        "bt_down": "The hub's Bluetooth is not answering: unplug the hub, then plug it back in.",
        "stuck": "The hub is not responding well: it will restart by itself.",
        "store_fault": "The hub cannot store readings right now (its memory card may be full): they wait on the "
                       "sensors. Have the technician check the hub.",
        "store_recovered": "The hub's storage was damaged; it has been rebuilt.",
        "store_short": "The hub is running out of space: it has to delete the oldest readings not yet sent. Have "
                       "the technician check the hub.",
        "live": "Live — last reading {age} ago", "silent": "No reading since {time} ({age} ago)",
        "waiting": "Waiting for its first reading", "not_live": "Values from {time}, not live",
        "hr": "Heart rate", "spo2": "Oxygen in the blood", "pr": "Pulse", "per_min": "per min",
        "out_low": "⚠ low: alert below {limit}", "out_high": "⚠ high: alert above {limit}",
        "q_good": "good signal", "q_fair": "fair signal", "q_poor": "weak signal",
        "q_disagree": "pulse and heart rate disagree: value uncertain",
        "ecg": "Heart trace (ECG)", "ppg": "Pulse wave (finger sensor)",
        "ecg_alt": "Heart trace of the last 4 seconds", "ppg_alt": "Pulse wave of the last 4 seconds",
        "wave_none": "no live trace", "wave_rate": "{value} beats per minute",
        "details": "Details for a technician",
        "d_link": "{where}: {state}", "d_device": "sensor {device}", "d_retry": "next try in {n} s",
        "d_firmware": "firmware {firmware}",
        "d_up_receiving": "Updating: {pct} %",
        "d_up_verifying": "Updating: checking and installing",
        "d_up_installed": "Update {version} installed, on trial for a minute",
        "d_up_confirmed": "Update {version} installed",
        "d_up_refused": "Update {version} refused by the sensor ({reason}): it keeps its version",
        "d_up_rolled_back": "Update {version} undone: the sensor went back to its previous version",
        "d_set_aside": "{n} messages set aside (the sensor sends them again)",
        "d_backend": "Sending to “{name}”: {waiting} waiting, {sent} sent",
        "d_refused": "{n} messages refused (not from a registered sensor, or damaged)",
        "d_task": "Internal task {name} restarted {n} times",
        "st_connected": "connected", "st_searching": "nothing plugged in", "st_stalled": "plugged in, nothing comes "
                                                                                        "through",
        "st_held": "connected, its readings wait: the hub cannot store them",
        "st_backoff": "reconnecting", "st_connecting": "connecting", "st_out_of_range": "out of range",
        "st_released": "a device that is not a registered sensor: left alone",
        "u_s": "{n}\u00a0s", "u_min": "{n}\u00a0min", "u_h": "{n}\u00a0h {m}\u00a0min", "u_d": "{n}\u00a0days",
    },
}
