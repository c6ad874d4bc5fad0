"""Bad options to `pulsebridge-dev demo|sim` are refused before anything starts, naming the option."""
from pathlib import Path

import pytest

from agent.dev import cli

# Each with a short --seconds: before the checks a run started and had to end by itself.
CASES = [
    (["demo", "--seconds", "1", "--spo2", "200"], "--spo2"),  # a red/IR ratio below 0: no finger gives it
    (["demo", "--seconds", "1", "--spo2", "10"], "--spo2"),
    (["demo", "--seconds", "-1"], "--seconds"),  # ran 0 s and reported success with nothing streamed
    (["sim", "--seconds", "0"], "--seconds"),
    (["demo", "--seconds", "1", "--dir", "somewhere"], "--dir"),  # ignored: the boards' flash in a temp dir
    (["demo", "--seconds", "1", "--link", "ble", "--air-capture", "/nonexistent-dir/air.jsonl"],
     "--air-capture"),  # a FileNotFoundError traceback
    # NaN passed the range check: the boards were disconnected at once and for ever, the demo read
    # "reconnecting" until it was stopped
    (["demo", "--seconds", "1", "--link", "ble", "--disconnect-every", "nan"], "--disconnect-every"),
    # the benchmark started and ended in a JSONDecodeError traceback (the firmware said nothing)
    (["bench", "firmware", "--minutes", "-1"], "--minutes"),
    (["bench", "firmware", "--minutes", "nan"], "--minutes"),
    (["bench", "firmware", "--minutes", "0.1", "--heap", "-5"], "--heap"),
    # tracebacks: FileExistsError, NotADirectoryError, FileNotFoundError, cryptography's ValueError
    (["sim", "--seconds", "1", "--capture", "a-file"], "--capture"),
    (["sim", "--seconds", "1", "--dir", "a-file/boards"], "--dir"),
    (["release", "keygen", "--out", "no-such-dir/vendor.pem"], "--out"),
    (["release", "sign", "--out", "fw.bundle", "--key", "no-such-key.pem", "--version", "1"], "--key"),
    (["release", "sign", "--out", "fw.bundle", "--key", "a-file", "--version", "1"], "--key"),
]


@pytest.mark.parametrize(("args", "says"), CASES)
def test_a_bad_option_is_named_before_anything_starts(args: list[str], says: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory, not a key")
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert isinstance(e.value.code, str) and says in e.value.code, e.value.code
    assert "Traceback" not in capsys.readouterr().err


def test_release_keygen_never_overwrites_a_vendor_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # keygen over an existing file replaced the vendor's private key: every board provisioned with its
    # public key could no longer be updated
    import hashlib

    key = tmp_path / "vendor.pem"
    assert cli.main(["release", "keygen", "--out", str(key)]) == 0
    # It names the key id a board's refusal (unknown_key) names, and the public key provisioning takes.
    said = capsys.readouterr().out
    pub = said.split("public key ")[1].split()[0]
    assert "key id %s" % hashlib.sha256(bytes.fromhex(pub)).digest()[:8].hex() in said, said
    assert "--vendor-key %s" % pub in said, said
    before = key.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["release", "keygen", "--out", str(key)])
    assert isinstance(e.value.code, str) and "--out" in e.value.code and "already" in e.value.code, e.value.code
    assert key.read_bytes() == before


def test_ctrl_c_before_the_demo_starts_is_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Ctrl-C in the demo's first second (its imports) ended in a KeyboardInterrupt traceback; the fault
    # is injected where that second is spent, before the demo's own handler
    def ctrl_c(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_options", ctrl_c)
    try:
        status = cli.main(["demo"])
    except KeyboardInterrupt:  # not let through to pytest, which would stop the whole run
        pytest.fail("Ctrl-C went through pulsebridge-dev as a KeyboardInterrupt")
    assert status == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
