# `pulsebridge verify-origin` on input files that hold nothing to verify.
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import verify_origin
from tests.conftest import ROOT


@pytest.mark.parametrize("content", [b"", b"[]", b"{\"documents\": []}\n"])
def test_an_input_with_no_frame_is_an_error_not_ok(tmp_path: Path, content: bytes) -> None:
    # an empty capture (a copy that failed, the wrong file) printed "OK: 0 frames" and exit 0
    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({"pb-sim01": "11" * 32}))
    empty = tmp_path / "received.cbor"
    empty.write_bytes(content)
    with pytest.raises(verify_origin.InputError, match="received.cbor: no frame"):
        verify_origin.verify([empty], [key])
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(key), str(empty)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no frame" in p.stderr and "OK" not in p.stdout, p.stdout + p.stderr


def test_a_file_of_junk_gives_a_bounded_report(tmp_path: Path) -> None:
    # 2 MB of zero bytes (each a CBOR item) printed 2 000 001 lines (179 MB) and took 800 MB of memory
    from protocols import origin_verify

    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({"pb-sim01": "11" * 32}))
    junk = tmp_path / "junk.cbor"
    n = origin_verify.MAX_PROBLEMS + 500
    junk.write_bytes(bytes(n))
    rep = verify_origin.verify([junk], [key])
    assert len(rep.problems) == origin_verify.MAX_PROBLEMS and rep.problems_not_listed == 500 and not rep.ok
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(key), str(junk)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = p.stdout.splitlines()
    assert p.returncode == 1 and len(lines) == 1 + origin_verify.MAX_PROBLEMS + 1, p.stderr
    assert lines[-1] == "  ... and 500 more problems, not listed"
