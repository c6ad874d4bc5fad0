# Provisioning for real against a blank simulated board: bare MicroPython
# on a pty, driven through its raw REPL as a technician's tool drives a board.
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.audit import AuditLog
from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard
from agent.registry import Registry
from tests.conftest import ROOT


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)


def _hub_and_blank_board(tmp_path: Path, micropython: str, cache: Path) -> tuple[Path, SimulatedBoard]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nhub_id = "hub-p"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
        tmp_path / "data", tmp_path / "log", tmp_path / "run"))
    board = SimulatedBoard(boards.BoardSpec("unused"), tmp_path / "board", cache, micropython,
                           blank=True)
    board.start()
    return cfg, board


@pytest.mark.micropython
def test_provision_a_blank_board_then_refuse_to_rekey_silently(micropython: str, sim_cache: Path,
                                                               tmp_path: Path) -> None:
    cfg, board = _hub_and_blank_board(tmp_path, micropython, sim_cache)
    try:
        dry = _cli("provision", "--config", str(cfg), "--port", board.port, "--dry-run")
        assert dry.returncode == 0 and "nothing is written" in dry.stdout
        assert not (tmp_path / "board" / "pulsebridge").exists()
        flash = tmp_path / "board" / "pulsebridge"
        flash.mkdir()  # phones paired while the board served someone else
        (flash / "bonds.bin").write_bytes(b"PBB1" + bytes(9))

        handed = tmp_path / "for-backend"
        handed.mkdir()
        r = _cli("provision", "--config", str(cfg), "--port", board.port, "--device-id", "pb-prov01",
                 "--label", "chambre 3", "--self-test-seconds", "5", "--origin-key-out", str(handed),
                 "--vendor-key", "11" * 32, "--vendor-key", "22" * 32)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "PASS pb-prov01" in r.stdout and "label: PB1:pb-prov01:" in r.stdout
        assert "█" in r.stdout and "the board is streaming now" in r.stdout  # the label as a QR code; what runs
        assert "MAX30003 INFO 0x5" in r.stdout and "MAX30102 PART_ID 0x15" in r.stdout
        assert not (flash / "bonds.bin").exists()  # a new patient's board pairs afresh
        reg = Registry(tmp_path / "data" / "registry.db", AuditLog(tmp_path / "log" / "audit.log"))
        dev = reg.get("pb-prov01")
        assert dev is not None and dev.label == "chambre 3"
        assert dev.unique_id == board.spec.unique_id  # the chip's id, read over the raw REPL
        assert "id %s" % board.spec.unique_id.hex() in r.stdout
        assert (flash / "device.key").read_bytes() == dev.key  # the same fresh key on both sides
        assert not (flash / "device.key.new").exists()
        # The origin key: on the board and in the operator's file (0600), nowhere in the hub's data.
        # the vendor's public keys, whose signed bundles alone the board will install
        assert (flash / "vendor.keys").read_bytes() == b"\x11" * 32 + b"\x22" * 32
        origin_file = handed / "pb-prov01.origin.json"
        assert origin_file.stat().st_mode & 0o777 == 0o600
        origin_key = bytes.fromhex(json.loads(origin_file.read_text())["origin_key"])
        assert (flash / "origin.key").read_bytes() == origin_key != dev.key
        for f in (tmp_path / "data").rglob("*"):
            if f.is_file():
                assert origin_key not in f.read_bytes() and origin_key.hex().encode() not in f.read_bytes(), f
        # The firmware in slot a, where an update expects the running version; boot.py and main.py at the
        # flash root (boot.py chooses the slot); the board streamed from it (the self-test verified frames).
        root = tmp_path / "board"
        assert (root / "a" / "app" / "main.mpy").exists() and (root / "a" / "protocols" / "cose.mpy").exists()
        assert (root / "boot.py").exists() and (root / "main.py").exists()
        assert not (root / "app").exists() and not (root / "a" / "main.py").exists()
        assert not (flash / "boot.ok").exists()  # slot a, the factory one, by default
        key_before = dev.key
        reg.close()

        again = _cli("provision", "--config", str(cfg), "--port", board.port, "--device-id", "pb-prov01")
        assert again.returncode == 1 and "already provisioned as pb-prov01" in again.stdout, again.stdout
        # --yes alone does not re-key an id this hub has registered: it might be another board's.
        again = _cli("provision", "--config", str(cfg), "--port", board.port, "--yes")
        assert again.returncode == 1 and "says it is pb-prov01, which this hub has registered" in again.stdout
        assert "--device-id pb-prov01" in again.stdout and "Traceback" not in again.stdout + again.stderr
        reg = Registry(tmp_path / "data" / "registry.db", AuditLog(tmp_path / "log" / "audit.log"))
        dev = reg.get("pb-prov01")
        assert dev is not None and dev.key == key_before == (flash / "device.key").read_bytes()
        actions = [e["action"] for e in reg.audit.entries()]
        reg.close()
        assert actions.count("device.provision") == 1
        assert "key" not in (tmp_path / "log" / "audit.log").read_text().lower().replace("device.rekey", "")
    finally:
        board.stop()


def test_wrong_port_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndata_dir = "%s"\nlog_dir = "%s"\n' % (tmp_path / "d", tmp_path / "l"))
    r = _cli("provision", "--config", str(cfg), "--port", "/dev/does-not-exist")
    assert r.returncode == 1 and "cannot open /dev/does-not-exist" in r.stdout
    r = _cli("provision", "--config", str(cfg), "--port", "/dev/does-not-exist", "--flash", str(tmp_path / "no.bin"))
    assert r.returncode == 1 and "no MicroPython image at" in r.stdout
    assert not (tmp_path / "d" / "registry.db").exists()  # nothing registered
    r = _cli("provision", "--config", str(cfg), "--port", "/dev/does-not-exist", "--vendor-key", "ab" * 31)
    assert r.returncode == 2 and "32-byte Ed25519 public key" in r.stderr  # a vendor key cut short


@pytest.mark.micropython
def test_key_rotation_leaves_no_window(micropython: str, sim_cache: Path, tmp_path: Path) -> None:
    from protocols import cipher, cose, hub, messages

    cfg, board = _hub_and_blank_board(tmp_path, micropython, sim_cache)
    try:
        assert _cli("provision", "--config", str(cfg), "--port", board.port, "--device-id", "pb-rot01",
                    "--self-test-seconds", "4", "--origin-key-out", str(tmp_path)).returncode == 0
        reg = Registry(tmp_path / "data" / "registry.db", AuditLog(tmp_path / "log" / "audit.log"))
        old = reg.get("pb-rot01")
        assert old is not None
        # During a rotation the hub accepts frames under either key.
        new = reg.begin_rotation("pb-rot01")
        dev = reg.get("pb-rot01")
        assert dev is not None and dev.next_key == new
        h = hub.Hub()
        h.add_device("pb-rot01", dev.key, dev.next_key)
        for i, k in enumerate((old.key, new)):
            f = messages.SampleFrame(1, i, 1, 0, 0, 512, 1, (1, 1), None, (0, 0, 0, 0), [[i]])
            payload = messages.encoded(f, sealer=cipher.SampleCipher(k, bytes(16)))
            r = h.receive(cose.MacKey(k, b"pb-rot01", cose.AAD_UPLINK).seal(payload))
            assert r.verdict == hub.ACCEPTED and h.key_in_use("pb-rot01") == i
        reg.abort_rotation("pb-rot01")
        reg.close()

        r = _cli("rotate-key", "--config", str(cfg), "--port", board.port, "--self-test-seconds", "4")
        assert r.returncode == 0 and "re-keyed" in r.stdout, r.stdout + r.stderr
        reg = Registry(tmp_path / "data" / "registry.db", AuditLog(tmp_path / "log" / "audit.log"))
        dev = reg.get("pb-rot01")
        assert dev is not None and dev.next_key is None and dev.key != old.key
        assert dev.key == (tmp_path / "board" / "pulsebridge" / "device.key").read_bytes()
        actions = [e["action"] for e in reg.audit.entries()]
        reg.close()
        assert actions[-2:] == ["key.rotate.begin", "key.rotate.complete"]
    finally:
        board.stop()
