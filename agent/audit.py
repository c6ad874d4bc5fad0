"""The audit log: who did what, when. JSON lines, appended and fsynced.

It records provisioning, key changes, revocations, erasures, configuration
changes and service starts. It never holds health data nor secrets: device
ids, actions, actors, reasons and counts only.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

from agent.errors import PulsebridgeError

FORBIDDEN_FIELDS = {"key", "raw", "samples", "payload", "token", "password"}


def current_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "uid:%d" % os.geteuid()


def _sudo() -> dict[str, Any]:
    """Who ran the command through sudo, as sudo says (SUDO_USER, SUDO_UID): the README's commands run
    as the service user (sudo -u pulsebridge ...), so the actor alone named the service, never the
    technician. Empty outside sudo."""
    user, uid = os.environ.get("SUDO_USER", ""), os.environ.get("SUDO_UID", "")
    if not user:
        return {}
    return {"sudo_user": user[:64], **({"sudo_uid": int(uid)} if uid.isdigit() else {})}


class AuditError(PulsebridgeError):
    """A record could not be written (a full or failing log disk); .path the audit log."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


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
        entry.update(_sudo())
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            raise AuditError("audit log %s cannot be written (%s)" % (self.path, e.strerror or e), self.path) from None
        try:
            written = 0
            try:
                while written < len(line):  # a disk with room for part of it: the next write says why
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError as e:
                if written:  # no half record left: it would make the log unreadable from there
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
                raise AuditError("audit log %s cannot be written (%s)" % (self.path, e.strerror or e),
                                 self.path) from None
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
