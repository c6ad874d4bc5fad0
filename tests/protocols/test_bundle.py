# Signed firmware bundles (protocols/bundle.py, SPEC.md "Firmware updates"):
# made by the release tool (cryptography), checked as a board checks them;
# every bundle an attacker could hand a board is refused with its reason,
# on CPython and under MicroPython (the board's interpreter).
import os
import subprocess
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.dev import release
from protocols import bundle
from tests.conftest import ROOT

VENDOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KEYS = [release.public_key(VENDOR)]
FILES = {"app/main.mpy": b"M" * 3000, "protocols/origin.mpy": b"O" * 1200, "main.py": b"import app.main\n"}


def make(version: int = 200, min_version: int = 100, target: str = "esp32", key: Ed25519PrivateKey = VENDOR,
         files: "dict[str, bytes] | None" = None) -> bytes:
    return release.make_bundle(files or FILES, version, "pulsebridge-fw %d" % version, min_version, target, key)


def refused(data: bytes, running: int = 150, floor: int = 0, target: str = "esp32") -> str:
    with pytest.raises(bundle.BundleError) as e:
        bundle.check(data, KEYS, running, floor, target)
    return e.value.reason


def test_a_signed_bundle_is_accepted() -> None:
    m = bundle.check(make(), KEYS, 150, 100, "esp32")
    assert (m.version, m.min_version, m.target, m.size()) == (200, 100, "esp32", sum(map(len, FILES.values())))
    assert [f[0] for f in m.files] == list(FILES)


def test_a_board_reads_the_header_it_needs_and_no_more() -> None:
    # A board has no 8 kB in one piece to spare (BLE: 30 kB free, fragmented): it reads the header's
    # size from its first bytes. One file (a 1-byte manifest length), and up to 64 (a 2-byte one).
    for n in (1, 3, 20, 64):
        files = {"app/m%02d.mpy" % i: b"x" * (i + 1) for i in range(n)}
        data = make(files=files)
        _, _, end = bundle.read_header(data)
        assert bundle.header_size(data[:7]) == end, n
    assert bundle.header_size(b"\xa3\x01\x00") == bundle.MAX_HEADER  # not the release tool's form: the whole bound
    assert bundle.header_size(cbor2.dumps({1: b"m" * 300, 0: 1, 2: b"s" * 64})[:7]) == bundle.MAX_HEADER


def test_unsigned_wrongly_signed_or_resigned_bundles_are_refused() -> None:
    data = make()
    header, end = cbor2.loads(data), len(cbor2.dumps(cbor2.loads(data)))
    unsigned = cbor2.dumps({0: 1, 1: header[1], 2: b""}) + data[end:]
    assert refused(unsigned) == "bad_signature"
    assert refused(make(key=OTHER)) == "unknown_key"  # a key the board does not hold
    # the vendor's key id, another key's signature (a hub forging a release)
    forged = cbor2.dumps({0: 1, 1: header[1], 2: OTHER.sign(bundle.signed_digest(header[1]))}) + data[end:]
    assert refused(forged) == "bad_signature"
    # a signed manifest changed afterwards (a higher version, to pass the downgrade check)
    m = cbor2.loads(header[1])
    m[1] = 999
    changed = cbor2.dumps({0: 1, 1: cbor2.dumps(m), 2: header[2]}) + data[end:]
    assert refused(changed) == "bad_signature"


def test_truncated_anywhere_is_refused() -> None:
    data = make()
    for cut in (0, 1, 20, len(data) // 3, len(data) - 1):
        assert refused(data[:cut]) in ("truncated", "malformed"), cut
    assert refused(data[:-1]) == "truncated"


def test_a_file_changed_after_signing_is_refused() -> None:
    data = bytearray(make())
    data[-5] ^= 1
    assert refused(bytes(data)) == "hash_mismatch"


def test_downgrade_replay_floor_and_target() -> None:
    assert refused(make(version=150), running=150) == "downgrade"  # the running version again
    assert refused(make(version=120, min_version=0), running=150) == "downgrade"
    assert refused(make(version=160, min_version=0), running=100, floor=170) == "below_floor"
    assert refused(make(target="esp32s3")) == "wrong_target"


def test_a_bundle_cannot_write_the_boards_keys() -> None:
    with pytest.raises(bundle.BundleError):
        make(files={"pulsebridge/device.key": bytes(32)})
    for bad in ("../boot.py", "/main.py", "app/../pulsebridge/x", "App/main.py"):
        with pytest.raises(bundle.BundleError):
            make(files={bad: b"x"})


@pytest.mark.micropython
def test_the_board_interpreter_checks_and_refuses_the_same(micropython: str, tmp_path: Path) -> None:
    good = tmp_path / "good.pbb"
    good.write_bytes(make())
    bad = tmp_path / "bad.pbb"
    bad.write_bytes(make(key=OTHER)[:-1] + b"!")
    tampered = bytearray(make())
    tampered[-1] ^= 1
    (tmp_path / "tampered.pbb").write_bytes(bytes(tampered))
    data = make()
    header, end = cbor2.loads(data), len(cbor2.dumps(cbor2.loads(data)))
    (tmp_path / "forged.pbb").write_bytes(
        cbor2.dumps({0: 1, 1: header[1], 2: OTHER.sign(bundle.signed_digest(header[1]))}) + data[end:])
    script = tmp_path / "check.py"
    script.write_text(
        "from protocols import bundle\n"
        "KEYS = [%r]\n"
        "for name in ('good', 'bad', 'tampered', 'forged'):\n"
        "    with open('%s/' + name + '.pbb', 'rb') as f:\n"
        "        data = f.read()\n"
        "    try:\n"
        "        m = bundle.check(data, KEYS, 150, 100, 'esp32')\n"
        "        print(name, 'ok', m.version)\n"
        "    except bundle.BundleError as e:\n"
        "        print(name, 'refused', e.reason)\n" % (KEYS[0], tmp_path))
    p = subprocess.run([micropython, "-X", "heapsize=2M", str(script)], env=dict(os.environ, MICROPYPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert p.stdout.split("\n")[:4] == ["good ok 200", "bad refused unknown_key", "tampered refused hash_mismatch",
                                        "forged refused bad_signature"], p.stdout + p.stderr


def test_importing_the_signature_check_computes_no_modular_power(monkeypatch: pytest.MonkeyPatch) -> None:
    # A board imports protocols/ed25519.py when an update starts, in one piece between two sensor
    # drains: its curve constants are literals. Derived at import they were seven 255-bit modular
    # powers, 0.56 s of an ESP32's time (the ECG FIFO lasts 62 ms). A fresh copy of the module is
    # loaded with pow() counted; the one the rest of the suite uses is left alone.
    import builtins
    import importlib.util

    powers = []
    real_pow = builtins.pow

    def counted(*args: int) -> int:
        if len(args) == 3:
            powers.append(args)
        return real_pow(*args)

    monkeypatch.setattr(builtins, "pow", counted)
    spec = importlib.util.spec_from_file_location("ed25519_fresh", ROOT / "protocols" / "ed25519.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert powers == []
