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
]


@pytest.mark.parametrize(("args", "says"), CASES)
def test_a_bad_option_is_named_before_anything_starts(args: list[str], says: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert isinstance(e.value.code, str) and says in e.value.code, e.value.code
    assert "Traceback" not in capsys.readouterr().err
