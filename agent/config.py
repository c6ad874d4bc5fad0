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
    type = "mqtt"                  # mqtt | webhook | fhir
    url = "mqtts://broker.example:8883"
    ca_file = "/etc/pulsebridge/ca.pem"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_CONFIG = Path("/etc/pulsebridge/agent.toml")
BACKEND_TYPES = ("mqtt", "webhook", "fhir")


class ConfigError(Exception):
    def __init__(self, message: str, field_name: str = "") -> None:
        super().__init__(message)
        self.field = field_name


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
    name: str
    type: str
    url: str
    insecure: bool = False  # plaintext or unverified TLS: only when asked, with a warning
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    topic_prefix: str = "pulsebridge"
    format: str = "json"  # webhook: json | cbor
    batch: int = 50
    timeout_s: float = 10.0
    # After new frames, wait this long for more before sending: fewer, fuller
    # batches at low load (forwarding latency, not the boards' acks).
    linger_s: float = 0.2


@dataclass
class AgentConfig:
    hub_id: str = "hub"
    data_dir: Path = Path("/var/lib/pulsebridge")
    log_dir: Path = Path("/var/log/pulsebridge")
    run_dir: Path = Path("/run/pulsebridge")
    retention_days: float = 7.0
    disk_quota_mb: float = 512.0
    log_format: str = "text"
    time_sync_every_s: float = 60.0
    # The status page: served only with a password file (no default credentials).
    status_page_listen: str = "0.0.0.0:8080"
    status_page_password_file: Path | None = None
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


def _take(table: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if name not in table:
        return default
    v = table.pop(name)
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ConfigError("%s.%s must be %s, not %r" % (where, name, _kind_name(kind), v), "%s.%s" % (where, name))
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _path(v: str | None) -> Path | None:
    return Path(v) if v else None


def _leftovers(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError("unknown setting %s.%s" % (where, sorted(table)[0]), "%s.%s" % (where, sorted(table)[0]))


def parse(data: dict[str, Any], source: Path | None = None) -> AgentConfig:
    data = dict(data)
    cfg = AgentConfig(source=source)
    agent = dict(_take(data, "agent", dict, "", {}))
    cfg.hub_id = _take(agent, "hub_id", str, "agent", cfg.hub_id)
    for name in ("data_dir", "log_dir", "run_dir"):
        v = _take(agent, name, str, "agent")
        if v:
            setattr(cfg, name, Path(v))
    cfg.retention_days = float(_take(agent, "retention_days", (int, float), "agent", cfg.retention_days))
    cfg.disk_quota_mb = float(_take(agent, "disk_quota_mb", (int, float), "agent", cfg.disk_quota_mb))
    cfg.time_sync_every_s = float(_take(agent, "time_sync_every_s", (int, float), "agent", cfg.time_sync_every_s))
    cfg.log_format = _take(agent, "log_format", str, "agent", cfg.log_format)
    cfg.status_page_listen = _take(agent, "status_page_listen", str, "agent", cfg.status_page_listen)
    spf = _take(agent, "status_page_password_file", str, "agent")
    cfg.status_page_password_file = Path(spf) if spf else None
    if cfg.log_format not in ("text", "json"):
        raise ConfigError("agent.log_format must be text or json", "agent.log_format")
    if cfg.retention_days < 0 or cfg.disk_quota_mb <= 0:
        raise ConfigError("agent.retention_days must be >= 0 and agent.disk_quota_mb > 0", "agent")
    _leftovers(agent, "agent")
    for i, s in enumerate(_take(data, "serial", list, "", [])):
        where = "serial[%d]" % i
        s = dict(s)
        sc = SerialConfig(port=_take(s, "port", str, where), usb_vid=_take(s, "usb_vid", int, where),
                          usb_pid=_take(s, "usb_pid", int, where),
                          baudrate=_take(s, "baudrate", int, where, 115200))
        if not sc.port and sc.usb_vid is None:
            raise ConfigError("%s needs port, or usb_vid (and usb_pid)" % where, where)
        _leftovers(s, where)
        cfg.serial.append(sc)
    ble = _take(data, "ble", dict, "")
    if ble is not None:
        ble = dict(ble)
        cfg.ble = BleConfig(adapter=_take(ble, "adapter", str, "ble", "hci0"), air=_take(ble, "air", str, "ble", ""),
                            max_connections=_take(ble, "max_connections", int, "ble", 7),
                            connect_timeout_s=float(_take(ble, "connect_timeout_s", (int, float), "ble", 15.0)))
        if not 1 <= cfg.ble.max_connections <= 20:
            raise ConfigError("ble.max_connections must be 1..20", "ble.max_connections")
        _leftovers(ble, "ble")
    names = set()
    for i, b in enumerate(_take(data, "backend", list, "", [])):
        where = "backend[%d]" % i
        b = dict(b)
        bc = BackendConfig(name=_take(b, "name", str, where, ""), type=_take(b, "type", str, where, ""),
                           url=_take(b, "url", str, where, ""))
        if bc.type not in BACKEND_TYPES:
            raise ConfigError("%s.type must be one of %s" % (where, ", ".join(BACKEND_TYPES)), where + ".type")
        if not bc.name or bc.name in names:
            raise ConfigError("%s.name must be set and unique" % where, where + ".name")
        names.add(bc.name)
        bc.insecure = _take(b, "insecure", bool, where, False)
        for p in ("ca_file", "client_cert", "client_key", "bearer_token_file", "password_file"):
            setattr(bc, p, _path(_take(b, p, str, where)))
        bc.username = _take(b, "username", str, where)
        bc.topic_prefix = _take(b, "topic_prefix", str, where, bc.topic_prefix)
        bc.format = _take(b, "format", str, where, bc.format)
        bc.batch = _take(b, "batch", int, where, bc.batch)
        bc.timeout_s = float(_take(b, "timeout_s", (int, float), where, bc.timeout_s))
        bc.linger_s = float(_take(b, "linger_s", (int, float), where, bc.linger_s))
        if "token" in b or "password" in b:
            raise ConfigError("%s: put secrets in files (bearer_token_file, password_file), not in the config"
                              % where, where)
        _leftovers(b, where)
        _check_url(bc, where)
        cfg.backends.append(bc)
    for i, a in enumerate(_take(data, "alert", list, "", [])):
        where = "alert[%d]" % i
        a = dict(a)
        rule = {"name": _take(a, "name", str, where, ""), "signal": _take(a, "signal", str, where, "")}
        if not rule["name"] or rule["signal"] not in ("spo2", "heart_rate", "lead_off", "silence_s"):
            raise ConfigError("%s needs a name and a signal among spo2, heart_rate, lead_off, silence_s" % where,
                              where)
        for k in ("low", "high", "hysteresis", "min_duration_s"):
            v = _take(a, k, (int, float), where)
            if v is not None:
                rule[k] = float(v)
        if "low" not in rule and "high" not in rule:
            raise ConfigError("%s needs low, high or both" % where, where)
        _leftovers(a, where)
        cfg.alert_rules.append(rule)
    _leftovers(data, "")
    return cfg


def _check_url(bc: BackendConfig, where: str) -> None:
    u = urlparse(bc.url)
    secure = {"mqtt": "mqtts", "webhook": "https", "fhir": "https"}[bc.type]
    plain = {"mqtt": "mqtt", "webhook": "http", "fhir": "http"}[bc.type]
    if u.scheme not in (secure, plain) or not u.hostname:
        raise ConfigError("%s.url must be %s://host... (got %r)" % (where, secure, bc.url), where + ".url")
    if u.scheme == plain and not bc.insecure:
        raise ConfigError("%s.url is plaintext %s://: use %s://, or set insecure = true knowingly"
                          % (where, plain, secure), where + ".url")


def load(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("no configuration file at %s" % path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("%s is not valid TOML: %s" % (path, e)) from None
    return parse(data, path)
