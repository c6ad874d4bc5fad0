"""The audit log: who did what, when. JSON lines, appended and fsynced.

It records provisioning, key changes, revocations, erasures, configuration
changes and service starts. It never holds health data nor secrets: device
ids, actions, actors, reasons and counts only.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

FORBIDDEN_FIELDS = {"key", "raw", "samples", "payload", "token", "password"}


def current_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "uid:%d" % os.geteuid()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, action: str, target: str = "", actor: str | None = None, **details: Any) -> None:
        bad = FORBIDDEN_FIELDS.intersection(details)
        if bad:
            raise ValueError("audit records hold no secrets nor health data: %s" % ", ".join(sorted(bad)))
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "actor": actor or current_actor(),
                 "action": action, "target": target}
        entry.update(details)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
