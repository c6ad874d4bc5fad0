# The bench's reports people can use: each figure a JUnit property of its
# case, and a measurement too uncertain to judge is a skip that says so,
# with the figure, instead of a pass on noise.
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil_tests.judging import judge_within
from tests.conftest import ROOT


def test_an_uncertain_measurement_is_skipped_with_its_figure() -> None:
    with pytest.raises(pytest.skip.Exception, match=r"too uncertain to judge against \+/-100 ppm: 0 \+/- 9229 ppm"):
        judge_within("board clock drift", 0.0, 9229.0, 100.0, "ppm", "run longer")
    judge_within("board clock drift", 40.0, 12.0, 100.0, "ppm", "run longer")  # judged: within
    judge_within("board clock drift", 105.0, 12.0, 100.0, "ppm", "run longer")  # within, given its uncertainty
    with pytest.raises(AssertionError, match=r"out of \+/-100 ppm: 300 \+/- 12 ppm"):
        judge_within("board clock drift", 300.0, 12.0, 100.0, "ppm", "run longer")


@pytest.mark.micropython
@pytest.mark.slow
def test_the_drift_case_reports_its_figures_in_junit(tmp_path: Path) -> None:
    out = tmp_path / "hil"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "hil_tests/test_streaming.py",
                        "-k", "clock_drift", "--hil-report", str(out),
                        # The case's shortest stream: what is checked here is how its figures are reported
                        # (hil_tests' own run streams the default 20 s).
                        "--stream-seconds", "14"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    case = ET.parse(out / "junit.xml").getroot().find(".//testcase[@name='test_clock_drift_measured']")
    assert case is not None
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    m = re.fullmatch(r"(-?\d+) \+/- (\d+)", props.get("board clock drift ppm") or "")
    assert m, props
    assert float(props["round trip ms"] or "nan") > 0
    skipped = case.find("skipped")
    if int(m.group(2)) > 100:  # this machine measured too loosely to judge: said so, with the figure
        assert skipped is not None and m.group(0) + " ppm" in (skipped.get("message") or ""), ET.tostring(case)
    else:
        assert skipped is None and case.find("failure") is None, ET.tostring(case)
    report = (out / "report.md").read_text()
    assert "board clock drift ppm = " + m.group(0) in report


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "ten"])
def test_a_stream_length_that_is_no_duration_is_refused_before_anything_runs(tmp_path: Path, value: str) -> None:
    # --stream-seconds -5 (or nan) streamed the case's set-up, then failed it with "no samples received",
    # 40 s later, a bench's verdict on a typo
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "hil_tests", "--collect-only",
                        "--hil-report", str(tmp_path / "hil"), "--stream-seconds", value],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stdout + r.stderr  # pytest's usage error
    assert "--stream-seconds: a number of seconds above 0, not %r" % value in r.stderr, r.stderr
