"""The agent's configuration: one TOML file, checked field by field.

Paths follow the FHS by default (configuration in /etc/pulsebridge, data in
/var/lib/pulsebridge, the audit log in /var/log/pulsebridge, the status
socket in /run/pulsebridge) and can all be changed. Secrets (bearer tokens,
passwords, client keys) are never written in this file: it names files
holding them, which must be readable by the service user only.

Example:

    [agent]
    hub_id = "hub-0001"
    retention_days = 7
    disk_quota_mb = 512

    [[serial]]
    port = "/dev/ttyACM0"          # or: usb_vid = 0x303a, usb_pid = 0x1001

    [ble]                          # boards over Bluetooth LE: every registered board found advertising
    adapter = "hci0"

    [[backend]]
    name = "care-team"
    type = "mqtt"                  # a module of agent/forwarders/: mqtt | webhook | fhir
    url = "mqtts://broker.example:8883"
    ca_file = "/etc/pulsebridge/ca.pem"

Each backend type is one module of agent/forwarders/ with its own settings
(its BackendConfig subclass); the settings every backend has are here.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from agent.errors import PulsebridgeError
from agent.store import COMMIT_INTERVAL_S

DEFAULT_CONFIG = Path("/etc/pulsebridge/agent.toml")


class ConfigError(PulsebridgeError):
    """A setting the agent refuses: .field names it ("backend[0].batch"), .path the file."""

    def __init__(self, message: str, field_name: str = "", path: Path | None = None) -> None:
        super().__init__(message)
        self.field = field_name
        self.path = path

    def __str__(self) -> str:
        return "%s: %s" % (self.path, self.message) if self.path else self.message


@dataclass
class SerialConfig:
    port: str | None = None
    usb_vid: int | None = None
    usb_pid: int | None = None
    baudrate: int = 115200


@dataclass
class BleConfig:
    adapter: str = "hci0"
    # The software radio's central socket (simulated boards): used instead
    # of the adapter when set.
    air: str = ""
    max_connections: int = 7
    connect_timeout_s: float = 15.0


@dataclass
class BackendConfig:
    """The settings every backend has. A backend module subclasses it with its
    own settings (read by take_own) and URL schemes (SCHEMES)."""

    # URL schemes: (secure, plaintext); plaintext only with insecure = true.
    SCHEMES: ClassVar[tuple[str, str]] = ("https", "http")

    name: str
    type: str
    url: str
    insecure: bool = False  # plaintext or unverified TLS: only when asked, with a warning
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    batch: int = 50
    timeout_s: float = 10.0
    # After new frames, wait this long for more before sending: fewer, fuller
    # batches at low load (forwarding latency, not the boards' acks).
    linger_s: float = 0.2

    def take_own(self, table: Table) -> None:
        """Reads this backend's own settings from its table (what take_own leaves is refused as unknown)."""


class Table:
    """A table of the configuration being read, named by where ("backend[0]"): its
    settings are taken one by one, each checked; ConfigError names a bad one."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def text(self, name: str, default: str | None = None) -> str | None:
        return _take(self.data, name, str, self.where, default)  # type: ignore[no-any-return]

    def path(self, name: str) -> Path | None:
        return _path(_take(self.data, name, str, self.where))

    def choice(self, name: str, values: tuple[str, ...], default: str) -> str:
        return _enum(self.data, name, self.where, values, default)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        """An integer setting between low and high (both included)."""
        v = _take(self.data, name, int, self.where, default)
        if not low <= v <= high:
            raise self.error(name, "must be between %d and %d, not %r" % (low, high, v))
        return int(v)

    def error(self, name: str, message: str) -> ConfigError:
        """A ConfigError for setting name: "<where>.<name> <message>"."""
        return ConfigError("%s.%s %s" % (self.where, name, message), "%s.%s" % (self.where, name))


@dataclass
class AgentConfig:
    hub_id: str = "hub"
    data_dir: Path = Path("/var/lib/pulsebridge")
    log_dir: Path = Path("/var/log/pulsebridge")
    run_dir: Path = Path("/run/pulsebridge")
    retention_days: float = 7.0
    disk_quota_mb: float = 512.0
    # Commits of board frames begin at most this often: the ack's latency against the card's
    # writes (agent/store.py, COMMIT_INTERVAL_S, says what each costs).
    commit_interval_ms: float = COMMIT_INTERVAL_S * 1000
    log_format: str = "text"
    time_sync_every_s: float = 60.0
    # The status page: served only with a password file (no default credentials).
    status_page_listen: str = "0.0.0.0:8080"
    status_page_password_file: Path | None = None
    # The Prometheus endpoint ([metrics] listen = "HOST:PORT"): off unless configured; loopback by default.
    metrics_listen: str | None = None
    serial: list[SerialConfig] = field(default_factory=list)
    ble: BleConfig | None = None
    backends: list[BackendConfig] = field(default_factory=list)
    alert_rules: list[dict[str, Any]] = field(default_factory=list)  # [[alert]] tables; none: the defaults
    source: Path | None = None

    @property
    def store_path(self) -> Path:
        return self.data_dir / "store.db"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def audit_path(self) -> Path:
        return self.log_dir / "audit.log"

    @property
    def status_socket(self) -> Path:
        return self.run_dir / "status.sock"


# Ranges of the numeric settings: (low, high), both included. Each keeps a
# value from idling or flooding something (batch = 0 never sends; a zero
# timeout never connects) while leaving every sensible deployment room.
RANGES: dict[str, tuple[float, float]] = {
    "agent.retention_days": (0, 3650),  # 0: purge as soon as every backend has a frame
    # Down to 10 kB: the quota tests fill a tiny store in seconds; 0 would drop every frame.
    "agent.disk_quota_mb": (0.01, 1_000_000),
    # Boards resend what is not acknowledged within 3 s: a frame's commit must come well before.
    "agent.commit_interval_ms": (0, 1000),
    "agent.time_sync_every_s": (1, 86400),
    "serial.baudrate": (300, 4_000_000),
    "serial.usb_vid": (0, 0xFFFF),
    "serial.usb_pid": (0, 0xFFFF),
    "ble.max_connections": (1, 20),  # what BlueZ controllers hold; a Pi's comfortably 7
    "ble.connect_timeout_s": (1, 300),
    "backend.batch": (1, 1000),  # frames per request: bounds a request's size and its retry cost
    "backend.timeout_s": (0.1, 600),
    "backend.linger_s": (0, 60),
    "alert.low": (-100_000, 100_000),  # bpm, %, or seconds (silence_s)
    "alert.high": (-100_000, 100_000),
    "alert.hysteresis": (0, 100_000),
    "alert.min_duration_s": (0, 86400),
}
# The values of each enumerated setting.
LOG_FORMATS = ("text", "json")
ALERT_SIGNALS = ("spo2", "heart_rate", "lead_off", "silence_s")
# Identifiers that end up in MQTT topics and FHIR identifiers: no wildcards, separators or spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched whole (fullmatch)


def _take(table: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if name not in table:
        return default
    v = table.pop(name)
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        full = "%s.%s" % (where, name) if where else name
        raise ConfigError("%s must be %s, not %r" % (full, _kind_name(kind, name), v), full)
    return v


def _number(table: dict[str, Any], name: str, where: str, default: Any, integer: bool = False) -> Any:
    """A numeric setting, checked against RANGES (keyed by the table's kind, without its index)."""
    v = _take(table, name, int if integer else (int, float), where)
    if v is None:
        return default
    low, high = RANGES["%s.%s" % (where.split("[")[0], name)]
    if not (math.isfinite(v) and low <= v <= high):
        raise ConfigError("%s.%s must be between %s and %s, not %r" % (where, name, _fmt(low), _fmt(high), v),
                          "%s.%s" % (where, name))
    return v if integer else float(v)


def _fmt(v: float) -> str:
    return "%d" % v if v == int(v) else "%g" % v


def _enum(table: dict[str, Any], name: str, where: str, values: tuple[str, ...], default: str) -> str:
    v = _take(table, name, str, where, default)
    if v not in values:
        raise ConfigError("%s.%s must be one of %s, not %r" % (where, name, ", ".join(values), v),
                          "%s.%s" % (where, name))
    return str(v)


def _kind_name(kind: type | tuple[type, ...], name: str) -> str:
    """The kind of value a setting takes, in TOML's words (Python's "dict", "int or float" are not the file's)."""
    if isinstance(kind, tuple):
        return "a number"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a table ([%s])" % name, list: "an array of tables ([[%s]])" % name}.get(kind, kind.__name__)


def _path(v: str | None) -> Path | None:
    return Path(v) if v else None


def _leftovers(table: dict[str, Any], where: str) -> None:
    if table:
        first = sorted(table)[0]
        name = "%s.%s" % (where, first) if where else first
        raise ConfigError("unknown setting %s" % name, name)


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError("%s must be a table, not %r" % (where, v), where)
    return dict(v)


def parse(data: dict[str, Any], source: Path | None = None) -> AgentConfig:
    """The configuration in data (parsed TOML); ConfigError names the first bad field (and source)."""
    try:
        return _parse(data, source)
    except ConfigError as e:
        e.path = source
        raise


def _parse(data: dict[str, Any], source: Path | None) -> AgentConfig:
    data = dict(data)
    cfg = AgentConfig(source=source)
    agent = dict(_take(data, "agent", dict, "", {}))
    cfg.hub_id = _take(agent, "hub_id", str, "agent", cfg.hub_id)
    if not _NAME.fullmatch(cfg.hub_id):
        raise ConfigError("agent.hub_id must be 1 to 64 of A-Z a-z 0-9 . _ - (it names MQTT topics and FHIR "
                          "identifiers), not %r" % cfg.hub_id, "agent.hub_id")
    for name in ("data_dir", "log_dir", "run_dir"):
        v = _take(agent, name, str, "agent")
        if v is not None:
            if not v or not Path(v).is_absolute():
                raise ConfigError("agent.%s must be an absolute path, not %r" % (name, v), "agent." + name)
            setattr(cfg, name, Path(v))
    cfg.retention_days = _number(agent, "retention_days", "agent", cfg.retention_days)
    cfg.disk_quota_mb = _number(agent, "disk_quota_mb", "agent", cfg.disk_quota_mb)
    cfg.commit_interval_ms = _number(agent, "commit_interval_ms", "agent", cfg.commit_interval_ms)
    cfg.time_sync_every_s = _number(agent, "time_sync_every_s", "agent", cfg.time_sync_every_s)
    cfg.log_format = _enum(agent, "log_format", "agent", LOG_FORMATS, cfg.log_format)
    cfg.status_page_listen = _take(agent, "status_page_listen", str, "agent", cfg.status_page_listen)
    try:
        listen_address(cfg.status_page_listen)
    except ValueError:
        raise ConfigError("agent.status_page_listen must be HOST:PORT ([ADDRESS]:PORT for IPv6; port 0 to 65535), "
                          "not %r" % cfg.status_page_listen, "agent.status_page_listen") from None
    spf = _take(agent, "status_page_password_file", str, "agent")
    cfg.status_page_password_file = Path(spf) if spf else None
    _leftovers(agent, "agent")
    for i, s in enumerate(_take(data, "serial", list, "", [])):
        where = "serial[%d]" % i
        s = _table(s, where)
        sc = SerialConfig(port=_take(s, "port", str, where), usb_vid=_number(s, "usb_vid", where, None, True),
                          usb_pid=_number(s, "usb_pid", where, None, True),
                          baudrate=_number(s, "baudrate", where, 115200, True))
        if not sc.port and sc.usb_vid is None:
            raise ConfigError("%s needs port, or usb_vid (and usb_pid)" % where, where)
        _leftovers(s, where)
        cfg.serial.append(sc)
    metrics = _take(data, "metrics", dict, "")
    if metrics is not None:
        metrics = dict(metrics)
        cfg.metrics_listen = _take(metrics, "listen", str, "metrics", "127.0.0.1:9464")
        try:
            host, _ = listen_address(cfg.metrics_listen)
        except ValueError:
            host = ""
        if not host:
            raise ConfigError("metrics.listen must be HOST:PORT ([ADDRESS]:PORT for IPv6; port 0 to 65535), not %r"
                              % cfg.metrics_listen, "metrics.listen")
        _leftovers(metrics, "metrics")
    ble = _take(data, "ble", dict, "")
    if ble is not None:
        ble = dict(ble)
        cfg.ble = BleConfig(adapter=_take(ble, "adapter", str, "ble", "hci0"), air=_take(ble, "air", str, "ble", ""),
                            max_connections=_number(ble, "max_connections", "ble", 7, True),
                            connect_timeout_s=_number(ble, "connect_timeout_s", "ble", 15.0))
        _leftovers(ble, "ble")
    names = set()
    from agent import forwarders  # the backends' registry (it imports this module)

    for i, b in enumerate(_take(data, "backend", list, "", [])):
        where = "backend[%d]" % i
        b = _table(b, where)
        name = _take(b, "name", str, where, "")
        kind = _enum(b, "type", where, tuple(forwarders.types()), "")
        bc = forwarders.config_class(kind)(name=name, type=kind, url=_take(b, "url", str, where, ""))
        if not _NAME.fullmatch(bc.name) or bc.name in names:
            raise ConfigError("%s.name must be set (1 to 64 of A-Z a-z 0-9 . _ -) and unique, not %r"
                              % (where, bc.name), where + ".name")
        names.add(bc.name)
        if "token" in b or "password" in b:
            raise ConfigError("%s: put secrets in files (bearer_token_file, password_file), not in the config"
                              % where, where)
        bc.insecure = _take(b, "insecure", bool, where, False)
        for p in ("ca_file", "client_cert", "client_key"):
            setattr(bc, p, _path(_take(b, p, str, where)))
        bc.batch = _number(b, "batch", where, bc.batch, True)
        bc.timeout_s = _number(b, "timeout_s", where, bc.timeout_s)
        bc.linger_s = _number(b, "linger_s", where, bc.linger_s)
        bc.take_own(Table(b, where))
        _leftovers(b, where)
        _check_url(bc, where)
        cfg.backends.append(bc)
    for i, a in enumerate(_take(data, "alert", list, "", [])):
        where = "alert[%d]" % i
        a = _table(a, where)
        rule: dict[str, Any] = {"name": _take(a, "name", str, where, "")}
        if not rule["name"]:
            raise ConfigError("%s.name must be set" % where, where + ".name")
        rule["signal"] = _enum(a, "signal", where, ALERT_SIGNALS, "")
        for k in ("low", "high", "hysteresis", "min_duration_s"):
            v = _number(a, k, where, None)
            if v is not None:
                rule[k] = v
        if "low" not in rule and "high" not in rule:
            raise ConfigError("%s needs low, high or both" % where, where)
        if "low" in rule and "high" in rule and rule["low"] >= rule["high"]:
            raise ConfigError("%s.low must be below %s.high" % (where, where), where + ".low")
        _leftovers(a, where)
        cfg.alert_rules.append(rule)
    _leftovers(data, "")
    return cfg


def listen_address(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPV6]:PORT" as (host, port): host without brackets ("" for any address), port
    0 to 65535. Raises ValueError ("[::]:8080" was split at its last colon, and "[::]" named no host)."""
    import ipaddress

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("not HOST:PORT: %r" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError if not one
    elif ":" in host or "[" in host or "]" in host:  # an IPv6 address without its brackets, or a stray one
        raise ValueError("an IPv6 address goes in brackets: %r" % text)
    return host, int(port)


def _check_url(bc: BackendConfig, where: str) -> None:
    u = urlparse(bc.url)
    # Checked first, as the messages below quote the URL: a backend's errors name its URL, so a
    # password in it would be logged and shown by `pulsebridge status`.
    if "@" in u.netloc:
        raise ConfigError("%s.url must not carry credentials (user:password@): put secrets in files "
                          "(bearer_token_file; MQTT: username and password_file)" % where, where + ".url")
    try:
        _ = u.port  # raises ValueError on a port out of 0..65535
    except ValueError:
        raise ConfigError("%s.url has a bad port: %r" % (where, bc.url), where + ".url") from None
    secure, plain = bc.SCHEMES
    if u.scheme not in (secure, plain) or not u.hostname:
        raise ConfigError("%s.url must be %s://host... (got %r)" % (where, secure, bc.url), where + ".url")
    if u.scheme == plain and not bc.insecure:
        raise ConfigError("%s.url is plaintext %s://: use %s://, or set insecure = true knowingly"
                          % (where, plain, secure), where + ".url")


def load(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("no configuration file at %s (--config FILE names another; agent/deploy/agent.toml "
                          "is an example to install there: README, Installing the agent)" % path) from None
    except IsADirectoryError:
        raise ConfigError("cannot read the configuration: it is a directory, not a file", path=path) from None
    except PermissionError as e:  # the cause kept: the command line says which user can read it
        raise ConfigError("cannot read the configuration: permission denied", path=path) from e
    except OSError as e:
        raise ConfigError("cannot read the configuration: %s" % (e.strerror or e), path=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError("cannot read the configuration: %s" % e, path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("not valid TOML: %s" % e, path=path) from None
    except RecursionError:  # tomllib's answer to arrays or tables nested thousands deep: a traceback
        raise ConfigError("not valid TOML: nested too deeply", path=path) from None
    return parse(data, path)
