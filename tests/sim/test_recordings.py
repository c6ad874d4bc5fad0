# The recordings the simulated sensors play ship with the project: a fresh
# clone with nothing beside it finds them (issue 14: `./run demo` on a fresh
# clone stopped with "PhysioNet recordings not found").
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.dev.sim import waveforms
from tests.conftest import ROOT


def test_a_fresh_clone_plays_its_own_recordings(tmp_path: Path) -> None:
    # A clone of the committed tree, alone in an empty folder: no shared/
    # beside it, no PULSEBRIDGE_DATA. It reads both records with wfdb.
    proc = subprocess.run(["git", "ls-files", "agent/dev/sim/recordings"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    if not proc.stdout.strip():
        pytest.fail("agent/dev/sim/recordings is not committed")
    clone = tmp_path / "alone" / "pulsebridge"
    clone.parent.mkdir()
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    probe = ("import wfdb\nfrom agent.dev.sim import waveforms as w\nd = w.data_dir()\n"
             "e = wfdb.rdrecord(str(d / w.ECG_RECORD), channel_names=['MLII'], sampto=3600)\n"
             "p = wfdb.rdrecord(str(d / w.PPG_RECORD), channel_names=['PLETH'], sampto=2500)\n"
             "print(d, e.fs, p.fs, len(e.p_signal), len(p.p_signal))\n")
    env = {k: v for k, v in os.environ.items() if k != waveforms.DATA_ENV}
    out = subprocess.run([sys.executable, "-c", probe], cwd=clone, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    folder, ecg_hz, ppg_hz, n_ecg, n_ppg = out.stdout.split()
    assert Path(folder).is_relative_to(clone), folder
    assert (int(ecg_hz), int(ppg_hz), int(n_ecg), int(n_ppg)) == (360, 250, 3600, 2500)


def test_a_data_folder_without_the_records_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(waveforms.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        waveforms.data_dir()
    assert str(tmp_path) in str(err.value) and "ecg/100.hea" in str(err.value)
