"""The independent FHIR R4 server (tests/agent/medplum_server.mjs: Medplum's
FHIR router over its in-memory repository) as a child process on loopback.

`./run tests` installs the pinned npm packages into .node-fhir/; without them
(or without node) the test is skipped on a developer machine and fails in CI.
Outages are real: down() closes the listening socket (connections refused)
and up() opens it again on the same port, the stored resources kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, ROOT

MODULES = ROOT / ".node-fhir" / "node_modules"
SERVER = Path(__file__).with_name("medplum_server.mjs")
# A command line answered within this bound (a dump of a few thousand resources included).
REPLY_TIMEOUT_S = 60.0


def require_medplum() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (MODULES / "@medplum" / "fhir-router" / "package.json").exists():
        missing = "@medplum/fhir-router is not installed in %s" % MODULES.parent
    if missing:
        msg = missing + " (./run tests installs it)"
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    assert node is not None
    return node


class MedplumServer:
    def __init__(self, cert: Path, key: Path, log: Path) -> None:
        node = require_medplum()
        major = int(subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
                    .stdout.strip().lstrip("v").split(".")[0])
        # Node 20 and 21 have WebSocket (which @medplum/core expects) only behind this flag.
        flags = ["--experimental-websocket"] if major < 22 else []
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([node, *flags, str(SERVER), str(MODULES), str(cert), str(key)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=dict(os.environ, NODE_NO_WARNINGS="1"))
        self._lock = threading.Lock()
        self.port = int(self._read()["port"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)  # type: ignore
        reader.start()
        reader.join(REPLY_TIMEOUT_S)
        if not out or not out[0]:
            raise AssertionError("the FHIR server did not answer (exit status %s)" % self.proc.poll())
        return json.loads(out[0])  # type: ignore[no-any-return]

    def command(self, **cmd: Any) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            return self._read()

    def down(self) -> None:
        assert self.command(cmd="down") == {"ok": "down"}

    def up(self) -> None:
        assert self.command(cmd="up")["port"] == self.port

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        return list(self.command(cmd="dump", type=resource_type)["resources"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
