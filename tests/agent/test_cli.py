# The operator's commands, run as an operator runs them.
import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.audit import AuditLog
from agent.cli import build_parser
from agent.config import AgentConfig
from agent.status_server import read_status
from agent.store import Ingest, Store
from agent.supervisor import Agent
from tests.agent import harness
from tests.agent.test_store_faults import fill, small_filesystem
from tests.conftest import ROOT
from tests.waiting import async_wait_for, wait_for


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_devices_add_list_revoke_and_erase(tmp_path: Path, hub_config: AgentConfig) -> None:
    c = hub_config
    cfg = c.source
    key_file = tmp_path / "pb-cli01.key"
    r = _cli("devices", "--config", str(cfg), "add", "pb-cli01", "--label", "chambre 1", "--key-out", str(key_file))
    assert r.returncode == 0, r.stderr
    assert len(bytes.fromhex(key_file.read_text().strip())) == 32
    assert key_file.stat().st_mode & 0o077 == 0
    assert "pb-cli01" in _cli("devices", "--config", str(cfg), "list").stdout
    exported = tmp_path / "keys.json"
    assert _cli("devices", "--config", str(cfg), "export", "--out", str(exported)).returncode == 0
    assert json.loads(exported.read_text()) == {"pb-cli01": key_file.read_text().strip()}
    assert exported.stat().st_mode & 0o077 == 0
    bad = _cli("devices", "--config", str(cfg), "add", "Not Valid")
    assert bad.returncode == 1 and "device id" in bad.stderr
    assert _cli("devices", "--config", str(cfg), "revoke", "pb-cli01", "--reason", "lost").returncode == 0
    assert "revoked" in _cli("devices", "--config", str(cfg), "list").stdout
    # some stored data for the device, then erasure
    s = Store(c.store_path, [])
    s.start()
    asyncio.run(s.ingest(Ingest("pb-cli01", 1, 0, 1, b"frame", (1, 0, 1))))
    s.close()
    r = _cli("erase", "--config", str(cfg), "--device", "pb-cli01")
    assert r.returncode == 0 and "erased 1 frames" in r.stdout, r.stdout + r.stderr
    assert "pb-cli01" not in _cli("devices", "--config", str(cfg), "list").stdout
    actions = [e["action"] for e in AuditLog(c.audit_path).entries()]
    assert actions == ["device.add", "device.export_keys", "device.revoke", "device.remove", "device.erase"]
    # a mistyped id is not "erased": nothing held of it, said so, exit 1
    r = _cli("erase", "--config", str(cfg), "--device", "pb-cli0l")
    assert r.returncode == 1 and "nothing erased" in r.stderr and "erased 0" not in r.stdout, r.stdout + r.stderr
    # an id with a newline is refused before anything is touched (it forged a second line of the printout)
    r = _cli("erase", "--config", str(cfg), "--device", "pb-cli01\nerased 99 frames")
    assert r.returncode == 1 and "device id must be" in r.stderr and not r.stdout, r.stdout + r.stderr
    assert len(AuditLog(c.audit_path).entries()) == 6


def test_devices_add_and_revoke_without_an_id_say_so(hub_config: AgentConfig) -> None:
    # `devices add` with no id gave a TypeError traceback; `revoke` said "no device None"
    cfg = str(hub_config.source)
    for action in ("add", "revoke"):
        r = _cli("devices", "--config", cfg, action)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "devices %s needs a device id" % action in r.stderr and "None" not in r.stderr, r.stderr
    assert _cli("devices", "--config", cfg, "list").stdout == ""


def test_the_help_of_devices_names_and_describes_every_action() -> None:
    # `pulsebridge --help` said "list, add or revoke boards" and `devices --help` only listed the
    # choices' names: export was nowhere described. The actions are read from the usage's choices.
    own = _cli("devices", "--help")
    assert own.returncode == 0, own.stderr
    choices = re.search(r"\{([a-z,-]+)\}", own.stdout)
    assert choices is not None, own.stdout
    actions = choices.group(1).split(",")
    assert "export" in actions, actions
    for action in actions:  # a line of its own saying what it does, not just its name among the choices
        assert re.search(r"^ +%s +\w" % action, own.stdout, re.M), (action, own.stdout)
    top = _cli("--help")
    line = next(ln for ln in top.stdout.splitlines() if ln.strip().startswith("devices "))
    assert all(re.search(r"\b%s\b" % a, line) for a in actions), line


def test_agent_refuses_to_start_with_a_readable_registry(tmp_path: Path, hub_config: AgentConfig) -> None:
    cfg = hub_config.source
    assert _cli("devices", "--config", str(cfg), "add", "pb-cli02").returncode == 0
    os.chmod(tmp_path / "data" / "registry.db", 0o644)
    r = _cli("agent", "--config", str(cfg))
    assert r.returncode == 2 and "readable by others" in r.stderr and "chmod 600" in r.stderr



def test_an_unsafe_or_damaged_registry_is_named_by_every_command_not_a_traceback(
        tmp_path: Path, hub_config: AgentConfig) -> None:
    # a registry readable by others stopped the agent with a clear line, but `devices list`, `ota push` and
    # `erase` ended in a RegistryError traceback; a registry that is not a database (a bad copy, a card's
    # damage) ended every command, the agent too, in sqlite3.DatabaseError's traceback
    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-cli03").returncode == 0
    registry = tmp_path / "data" / "registry.db"
    bundle = tmp_path / "fw.bundle"
    bundle.write_bytes(b"not a bundle")
    commands = (("devices", "list"), ("ota", "push", "--device", "pb-cli03", str(bundle)),
                ("erase", "--device", "pb-cli03"), ("agent",))
    os.chmod(registry, 0o644)
    for args in commands:
        r = _cli(*args, "--config", cfg)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        assert "readable by others" in r.stderr and "chmod 600" in r.stderr, (args, r.stderr)
    registry.write_bytes(b"this is no SQLite database, only a file of that name" * 100)
    os.chmod(registry, 0o600)
    for args in commands:
        r = _cli(*args, "--config", cfg)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        assert str(registry) in r.stderr and "not a database" in r.stderr, (args, r.stderr)

def test_provision_refuses_bad_options_before_touching_the_board(tmp_path: Path, hub_config: AgentConfig) -> None:
    # --origin-key-out in a directory that does not exist failed at the key step, after the firmware's
    # install (15 s on a simulated board); --flash-offset zz said "invalid <lambda> value"
    cfg = str(hub_config.source)
    missing = tmp_path / "no-such-dir"
    r = _cli("provision", "--config", cfg, "--port", str(tmp_path / "no-such-port"), "--origin-key-out", str(missing))
    assert r.returncode == 2 and "--origin-key-out %s is not a directory" % missing in r.stderr, r.stderr
    r = _cli("provision", "--config", cfg, "--port", str(tmp_path / "no-such-port"), "--flash-offset", "zz")
    assert r.returncode == 2 and "invalid address value: 'zz'" in r.stderr, r.stderr


def test_ota_push_with_no_agent_running_says_so(tmp_path: Path, hub_config: AgentConfig) -> None:
    # with no agent running, the push was spooled, followed for --wait-s, then said "the agent goes on
    # sending it": there was no agent, and nothing was sent
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.dev import release

    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-ota01").returncode == 0
    bundle = tmp_path / "fw.bundle"
    bundle.write_bytes(release.make_bundle({"main.py": b"pass\n"}, 2, "pulsebridge-fw 2", 0, "esp32",
                                           Ed25519PrivateKey.generate()))
    r = _cli("ota", "push", "--config", cfg, "--device", "pb-ota01", str(bundle), "--wait-s", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no agent is running" in r.stderr and "goes on sending" not in r.stderr, r.stderr


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--label", "Chambre 2\npb-evil           active   forged", "control character"),
    ("--label", "\x1b[2J", "control character"),  # an escape sequence: it cleared the operator's terminal
    ("--label", "x" * 100_000, "at most 64 characters"),
    ("--patient", "Patient/1\r\n", "control character")])
def test_a_label_or_patient_that_would_forge_or_flood_a_listing_is_refused(
        tmp_path: Path, hub_config: AgentConfig, option: str, value: str, says: str) -> None:
    # `devices add` and `provision` took any text: a newline forged a line of `devices list`, an escape
    # drove the terminal, 100 kB went to every card of the status page; provision refused nothing early
    cfg = str(hub_config.source)
    r = _cli("devices", "--config", cfg, "add", "pb-lab01", option, value)
    assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _cli("devices", "--config", cfg, "list").stdout == ""
    r = _cli("provision", "--config", cfg, "--port", str(tmp_path / "no-such-port"), option, value)
    assert r.returncode == 2 and says in r.stderr and option in r.stderr, r.stderr
    ok = _cli("devices", "--config", cfg, "add", "pb-lab02", "--label", "Chambre de Zoé 🛏", "--patient", "Patient/7")
    assert ok.returncode == 0, ok.stderr


def test_a_key_file_that_cannot_be_written_registers_nothing(tmp_path: Path, hub_config: AgentConfig) -> None:
    # `devices add ID --key-out` into a missing directory registered the board, then failed to write its
    # key: a board registered under a key nobody had ("already registered" when run again); the error
    # blamed "a path set in agent.toml"
    cfg = str(hub_config.source)
    missing = tmp_path / "no-such-dir" / "pb-key01.key"
    r = _cli("devices", "--config", cfg, "add", "pb-key01", "--key-out", str(missing))
    assert r.returncode == 1 and "--key-out %s" % missing in r.stderr and "does not exist" in r.stderr, r.stderr
    assert "agent.toml" not in r.stderr and _cli("devices", "--config", cfg, "list").stdout == ""
    r = _cli("devices", "--config", cfg, "export", "--out", str(tmp_path))
    assert r.returncode == 1 and "--out %s: is a directory" % tmp_path in r.stderr, r.stderr
    key_file = tmp_path / "pb-key01.key"
    assert _cli("devices", "--config", cfg, "add", "pb-key01", "--key-out", str(key_file)).returncode == 0
    assert len(bytes.fromhex(key_file.read_text().strip())) == 32


def test_a_full_data_disk_is_said_by_every_command_and_nothing_is_lost(tmp_path: Path) -> None:
    # the data directory (and the logs) on a card with no byte left: `devices add`, `erase` and the
    # agent ended in tracebacks (sqlite3.OperationalError: database or disk is full; OSError ENOSPC
    # writing the agent's lock), and the registry's first error told the operator to move a sound
    # registry aside. The agent then would not start at all ("cannot be opened (disk I/O error)"):
    # it now serves, and `pulsebridge status` says why nothing is stored.
    with small_filesystem(tmp_path / "card", 256) as card:
        cfg = tmp_path / "agent.toml"
        cfg.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
            card, card / "log", tmp_path / "run"))
        assert _cli("devices", "--config", str(cfg), "add", "pb-full1").returncode == 0

        def agent_run(on_the_way: Callable[[], None]) -> str:
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(cfg)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                wait_for(lambda: (tmp_path / "run" / "status.sock").exists() or agent.poll() is not None,
                         harness.AGENT_START_S, "the agent serving its status socket")
                assert agent.poll() is None, agent.communicate()[1]
                on_the_way()
            finally:
                agent.terminate()
                err = agent.communicate(timeout=60)[1]
            assert agent.returncode == 0 and "Traceback" not in err, err
            return err

        agent_run(lambda: None)  # the hub has run: its store is made
        fill(card / "filler")
        for args in (("devices", "add", "pb-full2"), ("erase", "--device", "pb-full1")):
            r = _cli(*args, "--config", str(cfg))
            assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
            assert "full" in r.stderr and str(card) in r.stderr and "aside" not in r.stderr, (args, r.stderr)

        def status_says_why() -> None:
            shown = _cli("status", "--config", str(cfg))
            assert shown.returncode == 0 and "store FAULT for" in shown.stdout, shown.stdout + shown.stderr
            assert "disk is full" in shown.stdout, shown.stdout

        agent_run(status_says_why)
        (card / "filler").unlink()
        listed = _cli("devices", "--config", str(cfg), "list")
        assert listed.returncode == 0 and "pb-full1" in listed.stdout, listed.stdout + listed.stderr


def test_a_data_dir_that_cannot_be_made_is_named_not_a_traceback(tmp_path: Path, hub_config: AgentConfig) -> None:
    # data_dir under a regular file (a typo, a card not mounted): `agent` and `devices list` ended in a
    # NotADirectoryError traceback; each now names the path and what is wrong with it
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    text = hub_config.source.read_text()
    assert str(hub_config.data_dir) in text
    cfg = tmp_path / "typo.toml"
    cfg.write_text(text.replace(str(hub_config.data_dir), str(blocker / "data")))
    for args, status in ((("agent",), 2), (("devices", "list"), 1), (("erase", "--device", "pb-x"), 1)):
        r = _cli(*args, "--config", str(cfg))
        assert r.returncode == status and "Traceback" not in r.stderr, (args, r.stderr)
        assert str(blocker) in r.stderr and "Not a directory" in r.stderr, (args, r.stderr)


def test_status_reads_the_running_agent(hub_config: AgentConfig) -> None:
    cfg = hub_config

    async def scenario() -> dict[str, object]:
        async with harness.running(Agent(cfg)):
            snap = await read_status(cfg.status_socket)
            assert cfg.status_socket.stat().st_mode & 0o077 == 0  # only the service user may ask
            shown = await asyncio.to_thread(_cli, "status", "--config", str(cfg.source))
            assert shown.returncode == 0 and "hub test-hub" in shown.stdout and "alerts: none" in shown.stdout, shown
            # read by a pipe that leaves at once (| head -0): no traceback (there was one)
            cut = await asyncio.to_thread(lambda: subprocess.run(
                "%s -m agent.cli status --config %s | head -c 0" % (sys.executable, cfg.source), shell=True,
                cwd=ROOT, capture_output=True, text=True, timeout=60))
            assert "Traceback" not in cut.stderr and "BrokenPipe" not in cut.stderr, cut.stderr
        return snap

    snap = asyncio.run(scenario())
    assert snap["hub_id"] == "test-hub" and snap["boards"] == [] and snap["rejects"] == {}
    # a stopped agent leaves no socket behind ("Connection refused" read as a hung agent)
    assert not cfg.status_socket.exists()
    gone = _cli("status", "--config", str(cfg.source))
    assert gone.returncode == 1 and "no agent is running" in gone.stderr, gone.stderr
    json.dumps(snap)


def test_a_second_agent_on_the_same_data_refuses_to_start(hub_config: AgentConfig) -> None:
    # Before, a second agent (started by hand beside the service) ran: it took
    # the status socket over (pulsebridge status then told of it, a board
    # "reconnecting: cannot lock the port" while the first agent served it),
    # and both fought over the ports and one MQTT client id.
    cfg = hub_config

    async def scenario() -> None:
        async with harness.running(Agent(cfg)):
            before = await read_status(cfg.status_socket)
            second = await asyncio.to_thread(_cli, "agent", "--config", str(cfg.source))  # 60 s bound: it must end
            assert second.returncode == 2, second
            assert "another pulsebridge agent (pid %d) is running on %s" % (os.getpid(), cfg.data_dir) in second.stderr
            after = await read_status(cfg.status_socket)  # still the first one answering
            assert after["uptime_s"] >= before["uptime_s"]
        done = asyncio.Event()
        done.set()
        await Agent(cfg).run(done)  # stopped, the first lets the next one start

    asyncio.run(scenario())


def test_a_new_backend_does_not_recreate_the_store(tmp_path: Path) -> None:
    p = tmp_path / "store.db"
    s = Store(p, ["a"])
    s.start()
    asyncio.run(s.ingest(Ingest("pb-x", 1, 0, 1, b"f0", (1, 0, 1))))
    s.close()
    s = Store(p, ["a", "b"])
    s.start()
    asyncio.run(s.ingest(Ingest("pb-x", 1, 1, 1, b"f1", (1, 1, 3))))
    db = s.reader()
    assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 2
    assert Store.backlog(db) == {"a": 2, "b": 1}  # the new backend starts from new frames
    s.close()


def test_an_agent_on_a_damaged_store_starts_serves_and_says_so(hub_config: AgentConfig) -> None:
    cfg = hub_config
    s = Store(cfg.store_path, ["a"], commit_interval_s=0)
    s.start()
    asyncio.run(s.ingest(Ingest("pb-x", 1, 0, 1, b"f0", (1, 0, 1))))
    s.close()
    with open(cfg.store_path, "r+b") as f:
        f.write(os.urandom(100))  # a damaged header: before, every start exited 1

    async def scenario() -> tuple[dict[str, Any], str]:
        async with harness.running(Agent(cfg)):
            snap = await read_status(cfg.status_socket)
            shown = await asyncio.to_thread(_cli, "status", "--config", str(cfg.source))
        return snap, shown.stdout

    snap, shown = asyncio.run(scenario())
    rec = snap["store"]["recovery"]
    assert rec and Path(rec["kept"]).exists()
    assert "store recovered at" in shown and rec["kept"] in shown, shown
    assert "store ok:" in shown


@pytest.mark.micropython
@pytest.mark.slow
def test_erase_while_the_agent_serves_the_board(make_hub: Callable[..., harness.Hub]) -> None:
    # Before, the running agent kept the erased device's key: its next frames
    # were verified, stored (41 within 20 s) and forwarded, its replay window
    # written again, and its vitals and waveform still on the status page.
    hub = make_hub(1)
    cfg, dev = hub.cfg, hub.board.device_id

    async def scenario() -> None:
        async with harness.running(Agent(cfg)) as agent:
            await async_wait_for(lambda: dev in agent.snapshot()["last_vitals"], 60, "the board's vitals",
                                 lambda: agent.snapshot()["boards"])
            r = await asyncio.to_thread(_cli, "erase", "--config", str(cfg.source), "--device", dev)
            assert r.returncode == 0 and "erased" in r.stdout, r.stdout + r.stderr
            await async_wait_for(lambda: agent.ingestor.rejects["unknown_device"] >= 3, 60,
                                 "its next frames refused", lambda: dict(agent.ingestor.rejects))
            db = agent.store.reader()
            try:
                held = db.execute("SELECT COUNT(*) FROM frames WHERE device_id=?", (dev,)).fetchone()[0]
                windows = db.execute("SELECT COUNT(*) FROM replay WHERE device_id=?", (dev,)).fetchone()[0]
            finally:
                db.close()
            assert (held, windows) == (0, 0)
            snap = agent.snapshot()
            assert dev not in snap["last_vitals"] and dev not in agent.vitals.last_seen
            assert not [k for k in agent.vitals_runner.waves if k[0] == dev]

    asyncio.run(scenario())


def test_ota_push_reads_no_more_than_a_bundle_can_be(tmp_path: Path, hub_config: AgentConfig) -> None:
    # `ota push` read the whole file before looking at its size: /dev/zero, a pipe that does not end or a
    # multi-GB file given by mistake filled the hub's memory (or hung). Here a pipe that sends 1 MB more than
    # a bundle may be, then stays open: the command must refuse it without waiting for its end.
    from protocols import messages

    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-ota02").returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "ota", "push", "--config", cfg, "--device", "pb-ota02",
                          "/dev/stdin", "--wait-s", "0"], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    assert p.stdin is not None
    try:
        try:
            p.stdin.write(b"\0" * (messages.MAX_BUNDLE + 1_000_000))
            p.stdin.flush()
        except BrokenPipeError:
            pass  # it stopped reading once it had more than a bundle: what is wanted
        wait_for(lambda: p.poll() is not None, timeout_s=30.0, what="ota push to end")
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 2, err.decode()
    assert b"larger than the %d bytes a board takes" % messages.MAX_BUNDLE in err and b"Traceback" not in err, err
    assert not (tmp_path / "run" / "ota" / "pb-ota02.bin").exists()


@pytest.mark.parametrize("wait_s", ["nan", "inf", "-1"])
def test_ota_push_refuses_a_wait_that_is_not_a_finite_duration(
        tmp_path: Path, hub_config: AgentConfig, wait_s: str) -> None:
    # --wait-s nan followed nothing and then said "not confirmed within nan s"; inf followed for ever
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.dev import release

    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-ota03").returncode == 0
    bundle = tmp_path / "fw.bundle"
    bundle.write_bytes(release.make_bundle({"main.py": b"pass\n"}, 2, "pulsebridge-fw 2", 0, "esp32",
                                           Ed25519PrivateKey.generate()))
    r = _cli("ota", "push", "--config", cfg, "--device", "pb-ota03", str(bundle), "--wait-s", wait_s)
    assert r.returncode == 2 and "--wait-s" in r.stderr and "finite number of seconds" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "ota" / "pb-ota03.bin").exists()


def test_ota_push_names_a_device_id_with_control_characters_without_printing_them(
        tmp_path: Path, hub_config: AgentConfig) -> None:
    # `ota push --device` echoed the id raw in its refusal: an escape sequence drove the operator's
    # terminal, a newline forged a line of its output (erase already refused such ids)
    bundle = tmp_path / "fw.bundle"
    bundle.write_bytes(b"not a bundle")
    for device in ("\x1b[2J", "pb-x\npulsebridge: pb-x spooled"):
        r = _cli("ota", "push", "--config", str(hub_config.source), "--device", device, str(bundle))
        assert r.returncode == 2 and "device id must be" in r.stderr, r.stderr
        assert "\x1b" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_devices_names_a_device_id_with_control_characters_without_printing_them(hub_config: AgentConfig) -> None:
    # `devices revoke` printed the registry's "no device <id>" with the id raw (the attacker pass of
    # the fifth session): an escape sequence drove the operator's terminal, a newline forged a line
    for action in ("revoke", "add", "export"):
        for device in ("\x1b[2J", "pb-x\npb-x revoked: its frames are refused from now on"):
            r = _cli("devices", action, device, "--config", str(hub_config.source))
            assert r.returncode == 1 and "device id must be" in r.stderr, (action, r.stderr)
            assert "\x1b" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("problem", ["missing", "directory", "under_a_file"])
def test_ota_push_names_a_bundle_it_cannot_read_in_plain_words(
        tmp_path: Path, hub_config: AgentConfig, problem: str) -> None:
    # a bundle path that was not there printed Python's raw "[Errno 2] No such file or directory: '...'",
    # the path given twice: the operator's words are the path and what is wrong with it
    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-ota04").returncode == 0
    bundle = tmp_path / "fw.bundle"
    if problem == "directory":
        bundle.mkdir()
    elif problem == "under_a_file":
        (tmp_path / "fw").write_bytes(b"x")
        bundle = tmp_path / "fw" / "fw.bundle"
    r = _cli("ota", "push", "--config", cfg, "--device", "pb-ota04", str(bundle))
    says = {"missing": "no such file", "directory": "is a directory, not a file",
            "under_a_file": "cannot be read: not a directory"}[problem]
    assert r.returncode == 2 and "Errno" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == "pulsebridge: ota push: bundle %s: %s\n" % (bundle, says), r.stderr
    assert not (tmp_path / "run" / "ota" / "pb-ota04.bin").exists()


def _edit_registry_by_hand(registry: Path, device_id: str, key: object, label: object = "") -> None:
    """A row as sqlite3 on the command line would write it: SQLite keeps any value in any column."""
    import sqlite3
    import time

    db = sqlite3.connect(registry)
    with db:
        db.execute("INSERT INTO devices(device_id, key, state, label, created_at, key_changed_at) "
                   "VALUES(?,?,'active',?,?,?)", (device_id, key, label, time.time(), time.time()))
    db.close()


def test_a_registry_row_edited_by_hand_is_named_and_can_be_erased(tmp_path: Path, hub_config: AgentConfig) -> None:
    # a key typed as hex text (`UPDATE devices SET key='00ab...'`) ended `devices list`, `erase` and every
    # command reading the registry in "TypeError: string argument without an encoding"; erase could not
    # remove the row it choked on; a label with an escape sequence drove the operator's terminal
    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-good").returncode == 0
    registry = tmp_path / "data" / "registry.db"
    _edit_registry_by_hand(registry, "pb-hex", "00" * 32)
    _edit_registry_by_hand(registry, "pb-short", b"\x01" * 16)
    _edit_registry_by_hand(registry, "pb-esc", b"\x02" * 32, label="\x1b[2J")
    r = _cli("devices", "--config", cfg, "list")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "\x1b" not in r.stdout + r.stderr, r
    assert r.stdout.split() == ["pb-good", "active"], r.stdout
    for device, why in (("pb-hex", "its key is not 32 bytes (text)"), ("pb-short", "its key is not 32 bytes (16 "
                                                                                    "bytes)"),
                        ("pb-esc", "its label is not text of at most 64 characters without control characters")):
        assert "the row of '%s' cannot be used (%s; edited by hand?)" % (device, why) in r.stderr, r.stderr
    assert "pulsebridge erase --device %s" % "pb-hex" in r.stderr, r.stderr
    for device in ("pb-hex", "pb-short", "pb-esc"):
        e = _cli("erase", "--config", cfg, "--device", device)
        assert e.returncode == 0 and "every record of %s" % device in e.stdout, e
    r = _cli("devices", "--config", cfg, "list")
    assert r.returncode == 0 and r.stdout.split() == ["pb-good", "active"] and not r.stderr, r


def test_an_agent_with_a_registry_row_edited_by_hand_serves_the_rest_and_says_so(
        tmp_path: Path, hub_config: AgentConfig) -> None:
    # the agent did not start ("TypeError: string argument without an encoding"); one started before the
    # edit crashed its registry task at every reload, so a revocation made after it never took effect
    from agent.status_page import view

    cfg = hub_config
    assert _cli("devices", "--config", str(cfg.source), "add", "pb-good").returncode == 0
    assert _cli("devices", "--config", str(cfg.source), "add", "pb-next").returncode == 0
    _edit_registry_by_hand(tmp_path / "data" / "registry.db", "pb-hex", "00" * 32)

    async def scenario() -> dict[str, Any]:
        async with harness.running(Agent(cfg)) as agent:
            seen: dict[str, Any] = {"start": await read_status(cfg.status_socket)}
            revoked = await asyncio.to_thread(_cli, "devices", "--config", str(cfg.source), "revoke", "pb-next")
            assert revoked.returncode == 0, revoked
            await async_wait_for(lambda: [d.device_id for d in agent.registry_watch.active] == ["pb-good"], 30,
                                 "the revocation applied", lambda: agent.registry_watch.active)
            assert not agent.ingestor.hub.has_device("pb-hex") and not agent.ingestor.hub.has_device("pb-next")
            seen["after"] = await read_status(cfg.status_socket)
            seen["cli"] = await asyncio.to_thread(_cli, "status", "--config", str(cfg.source))
        return seen

    seen = asyncio.run(scenario())
    assert [s["device_id"] for s in seen["start"]["sensors"]] == ["pb-good", "pb-next"], seen["start"]
    for snap in (seen["start"], seen["after"]):
        assert len(snap["registry_damaged"]) == 1 and "the row of 'pb-hex' cannot be used" in \
            snap["registry_damaged"][0], snap["registry_damaged"]
        assert not any(t["restarts"] for t in snap["tasks"].values()), snap["tasks"]
        page = view(snap)
        assert page["level"] == "attention" and {"level": "attention", "key": "sensor_unusable", "args": {}} in \
            page["notices"], page["notices"]
    assert seen["cli"].returncode == 0 and "the row of 'pb-hex' cannot be used" in seen["cli"].stdout, seen["cli"]


def test_a_full_log_disk_changes_nothing_unrecorded_and_says_so(tmp_path: Path, hub_config: AgentConfig) -> None:
    # the audit log on a card of its own (/var/log) with no byte left: `devices add`, `revoke` and `erase`
    # made their change, then ended in "OSError: [Errno 28]"'s traceback, so the registry changed with no
    # record of who did it (and a second try said "already registered"); `devices export` wrote the keys
    # with no record of it, `ota push` spooled a bundle the agent then sent unrecorded
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.dev import release

    data_cfg = hub_config.source
    assert data_cfg is not None
    bundle = tmp_path / "fw.bundle"
    bundle.write_bytes(release.make_bundle({"main.py": b"pass\n"}, 2, "pulsebridge-fw 2", 0, "esp32",
                                           Ed25519PrivateKey.generate()))
    with small_filesystem(tmp_path / "logcard", 64) as card:
        cfg = tmp_path / "agent-logcard.toml"
        cfg.write_text(data_cfg.read_text().replace(str(tmp_path / "log"), str(card / "log")))
        assert _cli("devices", "--config", str(cfg), "add", "pb-kept").returncode == 0
        assert _cli("devices", "--config", str(cfg), "add", "pb-gone").returncode == 0
        audit = card / "log" / "audit.log"
        fill(card / "filler")
        fd = os.open(audit, os.O_WRONLY | os.O_APPEND)  # the audit log's own last block too
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"\n"):
                    pass
        finally:
            os.close(fd)
        before = audit.read_bytes()
        listed = _cli("devices", "--config", str(cfg), "list").stdout
        for args in (("devices", "add", "pb-new"), ("devices", "revoke", "pb-kept"),
                     ("devices", "export", "--out", str(tmp_path / "keys.json")),
                     ("erase", "--device", "pb-gone"),
                     ("ota", "push", "--device", "pb-kept", str(bundle), "--wait-s", "0")):
            r = _cli(*args, "--config", str(cfg))
            assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
            assert "audit log %s cannot be written (No space left on device)" % audit in r.stderr, (args, r.stderr)
        assert _cli("devices", "--config", str(cfg), "list").stdout == listed
        assert not (tmp_path / "keys.json").exists() and not (tmp_path / "run" / "ota" / "pb-kept.bin").exists()
        assert audit.read_bytes() == before  # no half record either
        (card / "filler").unlink()
        r = _cli("erase", "--device", "pb-gone", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert [e["action"] for e in AuditLog(audit).entries()][-2:] == ["device.remove", "device.erase"]


def test_a_port_that_is_not_there_is_said_in_words(tmp_path: Path, hub_config: AgentConfig) -> None:
    # provision and rotate-key said "cannot open P: [Errno 2] could not open port P: [Errno 2] No such file
    # or directory: 'P'" (the port three times, two errnos): a technician wants to know it is not there
    port = tmp_path / "ttyACM9"
    for args in (("provision", "--origin-key-out", str(tmp_path)), ("rotate-key",)):
        r = _cli(*args, "--port", str(port), "--config", str(hub_config.source))
        assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r
        assert "cannot open %s: no such port (is the board plugged in? ls /dev/serial/by-id/ names the boards " \
               "plugged in)" % port in r.stdout, r.stdout
        assert "Errno" not in r.stdout, r.stdout


def test_status_with_no_agent_running_says_so_in_words(hub_config: AgentConfig) -> None:
    # "the agent is not answering on ...status.sock ([Errno 2] No such file or directory)"
    r = _cli("status", "--config", str(hub_config.source))
    assert r.returncode == 1 and r.stderr == (
        "pulsebridge: no agent is running on %s (no status socket at %s): systemctl start pulsebridge-agent\n"
        % (hub_config.source, hub_config.status_socket)), r.stderr


@pytest.mark.parametrize("answer", [b"{" + b" " * (9 << 20), b"[1, 2]", b"\x1b[2Jnot json"],
                         ids=["endless", "not-an-object", "garbage"])
def test_status_reads_a_bounded_answer_and_names_a_wrong_one(hub_config: AgentConfig, answer: bytes) -> None:
    # read_status read its socket to the end: whatever answers there (not the agent, a cut answer) could make
    # `pulsebridge status` read without bound, or end in a json traceback
    import socket
    import threading

    hub_config.status_socket.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(hub_config.status_socket))
    server.listen(1)
    sent: list[int] = []

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            with contextlib.suppress(OSError):  # the reader hangs up once it has read its bound
                for i in range(0, len(answer), 1 << 16):
                    sent.append(conn.send(answer[i:i + (1 << 16)]))

    t = threading.Thread(target=answer_once, daemon=True)
    t.start()
    try:
        r = _cli("status", "--config", str(hub_config.source))
    finally:
        t.join(timeout=60)
        server.close()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("pulsebridge: what answers on %s is not the agent's status (" %
                               hub_config.status_socket), r.stderr
    if len(answer) > (4 << 20):
        assert "over 4194304 bytes" in r.stderr and sum(sent) < len(answer), (r.stderr, sum(sent))


def test_status_says_how_old_a_board_s_last_vitals_are() -> None:
    # `pulsebridge status` printed "vitals pb-x heart_rate 127.8, ..." a minute after the board was unplugged,
    # as it did while it streamed: nothing told a technician the figures were not live
    from datetime import datetime

    from agent.cli import _vitals_line

    at = datetime.fromisoformat("2026-12-01T11:39:53.282Z").timestamp()
    vitals = {"heart_rate": {"value": 127.8, "at": "2026-12-01T11:39:19.928Z"},
              "spo2": {"value": 97.1, "at": "2026-12-01T11:39:53.282Z"}}
    assert _vitals_line("pb-x", vitals, at + 37.2) == "vitals pb-x         heart_rate 127.8, spo2 97.1 (37 s ago)"
    assert _vitals_line("pb-x", {"spo2": {"value": 97.1}}, at) == "vitals pb-x         spo2 97.1"


def test_export_data_gives_everything_the_hub_holds_of_one_device_and_nothing_else(
        tmp_path: Path, hub_config: AgentConfig) -> None:
    # GDPR art. 15 and 20 (access, portability): the hub could erase a device's data (art. 17) but had no
    # way to hand it over; a technician had to read SQLite by hand
    from tests.agent.test_mqtt import _store_frames

    cfg = str(hub_config.source)
    assert _cli("devices", "--config", cfg, "add", "pb-e1", "--label", "Chambre 2", "--patient",
                "Patient/7").returncode == 0
    store = Store(hub_config.store_path, [])
    store.start()
    try:
        _store_frames(store, "pb-e1", range(3))
        _store_frames(store, "pb-e2", range(2))  # another patient's
    finally:
        store.close()
    out = tmp_path / "pb-e1.jsonl"
    r = _cli("export-data", "--config", cfg, "--device", "pb-e1", "--out", str(out))
    assert r.returncode == 0 and "4 records of pb-e1 written to %s (mode 0600)" % out in r.stdout, r
    assert out.stat().st_mode & 0o777 == 0o600
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert docs[0] == {"type": "device", "device_id": "pb-e1", "state": "active", "label": "Chambre 2",
                       "patient_ref": "Patient/7", "registered_at": docs[0]["registered_at"], "revoked_at": None}
    assert [d["idempotency_key"] for d in docs[1:]] == ["pb-e1:1:0", "pb-e1:1:1", "pb-e1:1:2"]
    assert {d["device_id"] for d in docs} == {"pb-e1"} and all(d["subject"] == "Patient/7" for d in docs[1:])
    assert "key" not in json.dumps(docs[0]) and b"pb-e2" not in out.read_bytes()
    assert [(e["action"], e["target"]) for e in AuditLog(hub_config.audit_path).entries()][-1] == (
        "device.export_data", "pb-e1")
    # a mistyped id writes nothing and says so; an id that would drive the terminal is refused
    nothing = tmp_path / "pb-zz.jsonl"
    r = _cli("export-data", "--config", cfg, "--device", "pb-zz", "--out", str(nothing))
    assert r.returncode == 1 and "holds nothing of pb-zz" in r.stderr and not nothing.exists(), r
    r = _cli("export-data", "--config", cfg, "--device", "\x1b[2J", "--out", str(nothing))
    assert r.returncode == 1 and "device id must be" in r.stderr and "\x1b" not in r.stderr, r


def test_ota_push_on_a_full_run_disk_leaves_no_partial_bundle_and_no_record(tmp_path: Path) -> None:
    # run_dir (a small tmpfs, /run) with room for part of a bundle: ota push left the partial
    # <device>.bin.tmp behind, taking what room was left, and its push was in the audit log all the same
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.dev import release

    bundle = tmp_path / "fw.bundle"
    bundle.write_bytes(release.make_bundle({"main.py": os.urandom(200_000)}, 2, "pulsebridge-fw 2", 0, "esp32",
                                           Ed25519PrivateKey.generate()))
    with small_filesystem(tmp_path / "runcard", 128) as run:
        cfg = tmp_path / "agent.toml"
        cfg.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
            tmp_path / "data", tmp_path / "log", run))
        assert _cli("devices", "--config", str(cfg), "add", "pb-ota05").returncode == 0
        r = _cli("ota", "push", "--config", str(cfg), "--device", "pb-ota05", str(bundle), "--wait-s", "0")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("pulsebridge: ota push: cannot use %s/ota/pb-ota05.bin.tmp: No space left on "
                                   "device (its disk is full)" % run), r.stderr
        assert not list((run / "ota").glob("*")), list((run / "ota").glob("*"))
        assert "firmware.push" not in [e["action"] for e in AuditLog(tmp_path / "log" / "audit.log").entries()]


def test_the_audit_log_names_the_technician_behind_sudo(hub_config: AgentConfig) -> None:
    # the README's commands run as the service user (sudo -u pulsebridge pulsebridge devices revoke ...): every
    # record's actor was "pulsebridge", so the audit log could not say which technician added, revoked or erased
    env = dict(os.environ, SUDO_USER="alice", SUDO_UID="1001")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "devices", "add", "pb-sudo1", "--config",
                        str(hub_config.source)], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    entry = AuditLog(hub_config.audit_path).entries()[-1]
    assert entry["action"] == "device.add" and entry["sudo_user"] == "alice" and entry["sudo_uid"] == 1001, entry
    assert _cli("devices", "revoke", "pb-sudo1", "--config", str(hub_config.source)).returncode == 0
    if "SUDO_USER" not in os.environ:  # not run under sudo itself: no sudo user to record
        assert "sudo_user" not in AuditLog(hub_config.audit_path).entries()[-1]


def test_adding_a_revoked_id_again_says_how(hub_config: AgentConfig) -> None:
    # `devices add` of a revoked id said only "device pb-rev1 is already registered", as for an active one
    cfg = str(hub_config.source)
    assert _cli("devices", "add", "pb-rev1", "--config", cfg).returncode == 0
    r = _cli("devices", "add", "pb-rev1", "--config", cfg)
    assert r.returncode == 1 and r.stderr == "pulsebridge: device pb-rev1 is already registered (active)\n", r.stderr
    assert _cli("devices", "revoke", "pb-rev1", "--config", cfg).returncode == 0
    r = _cli("devices", "add", "pb-rev1", "--config", cfg)
    assert r.returncode == 1 and r.stderr == (
        "pulsebridge: device pb-rev1 is already registered (revoked): to use the id again, provision a board with "
        "--device-id pb-rev1 (a new key), or run pulsebridge erase --device pb-rev1 first (what the hub holds of it "
        "goes too)\n"), r.stderr


def test_a_file_that_is_no_serial_port_is_said_so(tmp_path: Path, hub_config: AgentConfig) -> None:
    # a [[serial]] port (or --port) naming a regular file: "Could not configure port: (25, 'Inappropriate ioctl
    # for device')", in the agent's status and in rotate-key's answer
    from agent.transports.base import TransportError
    from agent.transports.serial import SerialTransport

    regular = tmp_path / "ttyACM0.txt"
    regular.write_text("not a port\n")
    says = "cannot open %s: not a serial port (a board's port is a device: /dev/ttyACM0, /dev/serial/by-id/...)" \
        % regular
    with pytest.raises(TransportError) as e:
        asyncio.run(SerialTransport(str(regular)).open())
    assert str(e.value) == says
    r = _cli("rotate-key", "--port", str(regular), "--config", str(hub_config.source))
    assert r.returncode == 1 and says in r.stdout and "ioctl" not in r.stdout, r.stdout


@pytest.mark.parametrize("seconds", ["-3", "0.5", "nan", "inf", "1e9", "six"])
def test_a_self_test_length_that_cannot_pass_is_refused_before_the_board_is_touched(
        tmp_path: Path, hub_config: AgentConfig, seconds: str) -> None:
    # --self-test-seconds -3 or 0.5 was taken: the board got its firmware, key and registration, then failed
    # its self-test (fewer than 2 frames in so short a time) and all of it was put back; nan was taken too
    for command in (("provision", "--origin-key-out", str(tmp_path)), ("rotate-key",)):
        r = _cli(*command, "--port", str(tmp_path / "ttyACM0"), "--self-test-seconds", seconds, "--config",
                 str(hub_config.source))
        assert r.returncode == 2 and "argument --self-test-seconds: %r: give 3 to 600 seconds" % seconds in r.stderr, \
            r.stderr
        assert "cannot open" not in r.stdout + r.stderr  # refused before the port was looked at


def test_status_shows_a_backends_error_text_escaped(tmp_path: Path) -> None:
    # a backend's refusal reason (its answer's body, whitespace collapsed) went to `pulsebridge status`
    # raw: an ESC sequence in it drove the operator's terminal
    async def scenario() -> subprocess.CompletedProcess[str]:
        async with harness.refused_by_a_webhook(tmp_path, "bad\x1b[2J\x1b]0;owned\x07 \x9b31m", 1) as (path, agent):
            await async_wait_for(lambda: agent.snapshot()["backends"][0]["refused"] == 1, 60, "the frame refused",
                                 lambda: agent.snapshot()["backends"])
            return await asyncio.to_thread(_cli, "status", "--config", str(path))

    shown = asyncio.run(scenario())
    assert shown.returncode == 0, shown
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout and "\x9b" not in shown.stdout, repr(shown.stdout)
    assert "refused: HTTP 400: bad\\x1b[2J\\x1b]0;owned\\x07 \\x9b31m" in shown.stdout, shown.stdout


def test_a_user_who_cannot_read_the_hubs_files_is_told_which_file_and_to_run_as_its_user(
        tmp_path: Path, hub_config: AgentConfig, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # `pulsebridge status` and `devices` run as a user who may not read the hub's files said
    # "[Errno 13] Permission denied" (status) or "a path set in agent.toml, or under one?" (devices):
    # now the file and `sudo -u pulsebridge pulsebridge <the same command>`. The PermissionError is
    # injected at the open (the suite runs as root, whom chmod does not stop): the status socket's
    # connect, the registry's stat, the configuration's read.
    import errno
    import pathlib

    from agent.cli import main

    cfg = str(hub_config.source)
    assert main(["devices", "--config", cfg, "add", "pb-perm1"]) == 0
    capsys.readouterr()
    denied: set[Path] = set()

    def denying(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self in denied:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        return call

    async def connect_denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")  # as connect(2) raises it: no file name

    monkeypatch.setattr(pathlib.Path, "stat", denying(pathlib.Path.stat))
    monkeypatch.setattr(pathlib.Path, "read_text", denying(pathlib.Path.read_text))
    monkeypatch.setattr(asyncio, "open_unix_connection", connect_denied)

    def said(argv: list[str]) -> str:
        try:
            assert main(argv) == 1
        except SystemExit as e:  # the configuration: read before anything else
            return str(e.code)
        return capsys.readouterr().err

    status, devices = ["status", "--config", cfg], ["devices", "--config", cfg]
    for argv, path in ((status, hub_config.status_socket), (devices + ["list"], hub_config.registry_path),
                       (devices + ["revoke", "pb-perm1"], hub_config.registry_path), (status, hub_config.source)):
        if path != hub_config.status_socket:
            denied.add(path)
        err = said(argv)
        assert "Errno" not in err and "cannot open %s: permission denied" % path in err, err
        assert "run sudo -u pulsebridge pulsebridge %s" % " ".join(argv) in err, err
    if os.geteuid() == 0:  # the hub's files owned by another user than the service's: that user is named
        import pwd

        denied.discard(hub_config.source)
        os.chown(hub_config.registry_path.parent, 65534, -1)
        err = said(devices + ["list"])
        assert "run sudo -u %s pulsebridge devices" % pwd.getpwuid(65534).pw_name in err, err


def _as_user(uid: int, argv: list[str]) -> tuple[int, str]:
    """`pulsebridge ARGV` (agent.cli.main) in a child process that has become uid (its group, no
    others): a real user's permissions, none injected. The command is run once as root first, which
    imports what it needs: the interpreter's own files may be out of that user's reach (a pyenv under
    /root). Returns its exit status and standard error."""
    import io
    import pwd
    import traceback

    gid = pwd.getpwuid(uid).pw_gid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            from agent.cli import main

            def run() -> tuple[int, str]:
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        code = main(argv)
                    except SystemExit as e:  # the configuration's errors
                        code, _ = 1, err.write(str(e.code))
                return code, err.getvalue()

            run()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code, said = run()
            os.write(w, ("%d\n%s" % (code, said)).encode())
        except BaseException:
            os.write(w, ("99\n%s" % traceback.format_exc()).encode())
        finally:
            os._exit(0)
    os.close(w)
    import select
    import signal

    out, end = b"", time.monotonic() + 60  # (a child that hangs is killed, the test failed)
    try:
        while time.monotonic() < end and select.select([r], [], [], max(0.0, end - time.monotonic()))[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    code, _, said = out.decode().partition("\n")
    assert code, "the command as another user said nothing within 60 s"
    return int(code), said


def test_a_real_user_who_cannot_read_the_hubs_files_is_told_which_file_and_whom_to_run_as() -> None:
    # The case above injects its PermissionErrors (the suite runs as root, whom chmod does not stop).
    # Here the commands run as a real user (nobody) whom the kernel refuses, on files of another
    # (a system user, daemon on Debian, standing for the service user): the socket's directory, the
    # data directory, the configuration, 0700 and 0600.
    import pwd
    import shlex
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("becoming another user (os.setuid) needs root; CI runs the suite as root")
    caller = pwd.getpwnam("nobody").pw_uid
    owner = min((u for u in pwd.getpwall() if u.pw_uid not in (0, caller)), key=lambda u: u.pw_uid)
    hub = Path(tempfile.mkdtemp(prefix="pb-perm-"))  # (tmp_path is 0700: the caller could not reach anything)
    try:
        hub.chmod(0o755)
        cfg_path = hub / "agent.toml"
        cfg_path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
            hub / "data", hub / "log", hub / "run"))
        cfg_path.chmod(0o644)
        from agent.cli import main
        from agent.config import load

        assert main(["devices", "--config", str(cfg_path), "add", "pb-perm2"]) == 0
        cfg = load(cfg_path)
        for d in (cfg.data_dir, cfg.run_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, owner.pw_uid, owner.pw_gid)
            d.chmod(0o700)
        status, devices = ["status", "--config", str(cfg_path)], ["devices", "--config", str(cfg_path), "list"]
        for argv, path in ((status, cfg.status_socket), (devices, cfg.registry_path)):
            code, err = _as_user(caller, argv)
            assert code == 1 and "Errno" not in err and "Traceback" not in err, (code, err)
            assert "cannot open %s: permission denied" % path in err, err
            assert "run sudo -u %s %s" % (owner.pw_name, shlex.join(["pulsebridge", *argv])) in err, err
        os.chown(cfg_path, owner.pw_uid, owner.pw_gid)
        cfg_path.chmod(0o600)
        code, err = _as_user(caller, status)
        assert code == 1 and "configuration error: cannot open %s: permission denied" % cfg_path in err, err
        assert "run sudo -u %s %s" % (owner.pw_name, shlex.join(["pulsebridge", *status])) in err, err
    finally:
        import shutil

        shutil.rmtree(hub)


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                              argparse.ArgumentParser]]:
    """Every command of parser (its sub-commands' too, ota push...): (its words, its parser)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_every_option_of_every_operator_command_says_what_it_is() -> None:
    # `--help` listed --config, --device, --port, --json, a bundle... bare: where the configuration is
    # read from unless named (/etc/pulsebridge/agent.toml) was in no help, nor what --device takes;
    # pulsebridge-dev's bench --json and release's keygen|sign neither.
    from agent.dev.cli import build_parser as build_dev_parser

    commands = list(_commands(build_parser()))
    assert {" ".join(words) for words, _ in commands} >= {"agent", "devices", "erase", "export-data", "status",
                                                         "provision", "rotate-key", "ota push", "verify-origin"}
    dev = list(_commands(build_dev_parser(), ("pulsebridge-dev",)))
    assert {" ".join(words) for words, _ in dev} >= {"pulsebridge-dev sim", "pulsebridge-dev demo",
                                                    "pulsebridge-dev bench", "pulsebridge-dev release"}
    bare = ["%s %s" % (" ".join(words), "/".join(a.option_strings) or a.dest)
            for words, parser in commands + dev for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
            and not (a.help or "").strip()]
    assert not bare, bare
    for words, parser in commands:
        if any(a.dest == "config" for a in parser._actions):
            assert "(default: /etc/pulsebridge/agent.toml)" in " ".join(parser.format_help().split()), words
    erase = " ".join(dict(commands)[("erase",)].format_help().split())  # (its lines as wrapped, joined)
    assert "without asking" in erase and "cannot be undone" in erase, erase
