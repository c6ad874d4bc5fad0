# Firmware updates on a board under the real MicroPython (cases in
# ota_board_cases.py): the vendor signs here, with cryptography, as the
# release tool does; the board receives, checks, installs, switches, confirms
# or rolls back.
import subprocess
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.dev import release
from agent.dev.sim import boards
from protocols import bundle
from tests.conftest import ROOT

VENDOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _bundles(out: Path) -> None:
    out.mkdir()
    main_py = b"# release 200\n" + b"x = 1\n" * 700  # a few kB: some 30 chunks
    files = {"app/main.py": main_py, "app/__init__.py": b"", "main.py": b"import app.main\n"}
    (out / "main.py").write_bytes(main_py)

    def make(key: Ed25519PrivateKey = VENDOR, target: str = "esp32") -> bytes:
        return release.make_bundle(files, 200, "pulsebridge-fw 200", 100, target, key)

    good = make()
    (out / "good.bin").write_bytes(good)
    tampered = bytearray(good)
    tampered[-40] ^= 1
    (out / "tampered.bin").write_bytes(bytes(tampered))
    header = cbor2.loads(good)
    end = len(cbor2.dumps(header))
    (out / "unsigned.bin").write_bytes(cbor2.dumps({0: 1, 1: header[1], 2: b""}) + good[end:])
    (out / "forged.bin").write_bytes(
        cbor2.dumps({0: 1, 1: header[1], 2: OTHER.sign(bundle.signed_digest(header[1]))}) + good[end:])
    (out / "other_key.bin").write_bytes(make(OTHER))
    # ~100 kB (some 640 chunks), as a release is: refused from its header, long before its end.
    large = dict(files, **{"app/big.py": b"# padding\n" * 10000})
    (out / "other_key_large.bin").write_bytes(release.make_bundle(large, 200, "pulsebridge-fw 200", 100, "esp32",
                                                                  OTHER))
    (out / "good_large.bin").write_bytes(release.make_bundle(large, 200, "pulsebridge-fw 200", 100, "esp32", VENDOR))
    (out / "wrong_target.bin").write_bytes(make(target="esp32s3"))
    # Its size not its header's and files': bytes after its files, or its last file cut.
    (out / "trailing.bin").write_bytes(good + b"\x00" * 40)
    (out / "cut.bin").write_bytes(good[:-40])
    # A release's worth of files (the firmware has ~40): a manifest of ~2.7 kB.
    many = {"app/m%02d.py" % i: b"x = %d\n" % i for i in range(60)}
    (out / "many_files.bin").write_bytes(release.make_bundle(many, 200, "pulsebridge-fw 200", 100, "esp32", VENDOR))


@pytest.mark.micropython
@pytest.mark.slow
def test_ota_on_the_board(micropython: str, tmp_path: Path) -> None:
    boards.prepare(boards.BoardSpec("pb-test01"), tmp_path, tmp_path / "waves")
    (tmp_path / "pulsebridge" / "vendor.keys").write_bytes(release.public_key(VENDOR))
    _bundles(tmp_path / "bundles")
    env = boards.micropython_env()
    env["MICROPYPATH"] += ":" + str(ROOT)
    proc = subprocess.run([micropython, "-X", "heapsize=16M", str(ROOT / "tests" / "shared" / "mpy_runner.py"),
                           "tests.firmware.ota_board_cases"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout and "19 passed" in proc.stdout
