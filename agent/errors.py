"""The agent's one exception root, after bleak's `BleakError` and aiomqtt's `MqttError`.

Every error the agent raises on purpose is a `PulsebridgeError`, so a caller
(the CLI, the supervisor, a test) can catch the agent's failures apart from
bugs, and read what they are about from fields, not from message text:

- `backend`: the backend's configured name (a `[[backend]]` name);
- `device_id`: the board's device id;
- `row_ids`: the store's rows concerned (frames refused, quarantined);
- `http_status`: the status a backend answered, when it answered over HTTP.

A field the raiser does not know stays empty ("", (), None). The wire
format's own errors stay `protocols.errors.ProtocolError` (Local/Remote):
`protocols/` is shared with the board and knows nothing of the agent.

    PulsebridgeError
    ├── ConfigError          agent/config.py       .field, .path
    ├── StoreError           agent/store.py
    ├── RegistryError        agent/registry.py
    ├── TransportError       agent/transports/base.py  .link
    │   └── TransportClosed
    ├── DeliveryError        agent/forwarders/base.py
    │   └── RefusedError     .reason
    ├── PasswordFileError    agent/status_page.py  .missing
    ├── ProvisionError       agent/provision/provision.py  .step
    ├── ReplError            agent/provision/rawrepl.py  .port, .output
    ├── BuildError           agent/provision/build.py
    ├── InputError           agent/verify_origin.py
    ├── AuditError           agent/audit.py        .path
    └── LinkError            agent/mqtt_link.py    (the MQTT client process's records)
"""

from __future__ import annotations

from collections.abc import Iterable


class PulsebridgeError(Exception):
    """Root of the agent's errors. str(e) is the message; the fields say what it concerns."""

    def __init__(self, message: str, *, backend: str = "", device_id: str = "", row_ids: Iterable[int] = (),
                 http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.device_id = device_id
        self.row_ids: tuple[int, ...] = tuple(row_ids)
        self.http_status = http_status

    def fields(self) -> dict[str, object]:
        """The fields that are set, for a log line or a metric's labels."""
        out: dict[str, object] = {}
        if self.backend:
            out["backend"] = self.backend
        if self.device_id:
            out["device_id"] = self.device_id
        if self.row_ids:
            out["row_ids"] = list(self.row_ids)
        if self.http_status is not None:
            out["http_status"] = self.http_status
        return out
