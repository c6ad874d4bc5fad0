# What an operator sees: --version, start and stop in the log with what the
# agent found, journald-friendly lines, JSON logs that keep tracebacks,
# untrusted strings that cannot forge log lines, and the opt-in Prometheus
# endpoint with per-board, per-backend and per-reject-reason counters.
from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import config as agent_config
from agent import logs
from agent.metrics import MetricsServer
from protocols import cipher, cose, link, messages
from tests.agent import harness
from tests.conftest import ROOT
from tests.waiting import wait_for

FORGED_ID = "pb\n2026 INFO x"  # a device id with a newline, as a forged frame can claim


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_version() -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and re.fullmatch(r"pulsebridge \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout


def test_untrusted_strings_cannot_forge_lines(root_logging: None) -> None:
    out = io.StringIO()
    logs.setup("text", logging.INFO, out)
    logging.getLogger("agent.ingest").warning("rejected message from %s on %s: %s", FORGED_ID, "serial", "bad\x1b[2J")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "pb\\n2026 INFO x" in lines[0] and "bad\\x1b[2J" in lines[0] and "\x1b" not in lines[0]


def test_under_journald_no_timestamps_and_priorities(root_logging: None, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "journal", "w+") as journal:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino))
        logs.setup("text", logging.DEBUG, journal)  # type: ignore[arg-type]
        log = logging.getLogger("agent.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        try:
            raise ValueError("boom")
        except ValueError:
            log.error("e", exc_info=True)
        journal.flush()
        journal.seek(0)
        lines = journal.read().splitlines()
    assert [ln[:3] for ln in lines[:4]] == ["<7>", "<6>", "<4>", "<3>"], lines
    assert all(ln.startswith("<3>") for ln in lines[3:]) and "ValueError: boom" in lines[-1]  # one record, one level
    assert not any(re.search(r"\d{4}-\d\d-\d\d", ln) for ln in lines)  # journald stamps lines itself
    # Not the journal's stream (JOURNAL_STREAM inherited by a child writing elsewhere): timestamps as usual.
    out = io.StringIO()
    logs.setup("text", logging.INFO, out)
    logging.getLogger("agent.test").info("i")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO agent.test: i$", out.getvalue())


def test_json_logs_keep_tracebacks(root_logging: None) -> None:
    out = io.StringIO()
    logs.setup("json", logging.INFO, out)
    log = logging.getLogger("agent.test")
    try:
        {}["missing"]
    except KeyError:
        log.error("task %s crashed", "forward:mqtt", exc_info=True)
    log.warning("from %s", FORGED_ID)
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["level"] == "ERROR" and first["logger"] == "agent.test"
    assert first["message"] == "task forward:mqtt crashed"
    assert "Traceback (most recent call last)" in first["exc_info"] and "KeyError: 'missing'" in first["exc_info"]
    assert second["message"] == "from pb\\n2026 INFO x" and "at" in second


def test_metrics_section_is_opt_in_and_loopback(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nhub_id = "h"\n')
    assert agent_config.load(path).metrics_listen is None
    path.write_text('[agent]\nhub_id = "h"\n[metrics]\n')
    assert agent_config.load(path).metrics_listen == "127.0.0.1:9464"
    path.write_text('[agent]\nhub_id = "h"\n[metrics]\nlisten = "9464"\n')
    with pytest.raises(agent_config.ConfigError, match="metrics.listen must be HOST:PORT"):
        agent_config.load(path)
    path.write_text('[agent]\nhub_id = "h"\n[metrics]\nport = 9464\n')
    with pytest.raises(agent_config.ConfigError, match="metrics.port"):
        agent_config.load(path)


def test_metrics_text_format() -> None:
    import asyncio

    snap = {"frames_stored": {"pb-a": 3, "pb-b": 5}, "rejects": {"bad_mac": 2, "unknown_device": 1},
            "backends": [{"name": "mqtt", "forwarded": 7, "failures": 1, "refused": 0, "backlog": 4}],
            "boards": [{"state": "connected"}, {"state": "searching"}]}

    async def scrape() -> str:
        async def snapshot() -> dict[str, object]:
            return snap

        server = MetricsServer(snapshot)
        port = await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(_get, "http://127.0.0.1:%d/metrics" % port)
        finally:
            await server.stop()

    values = _samples(asyncio.run(scrape()))
    assert values[("pulsebridge_frames_stored_total", (("device_id", "pb-b"),))] == 5
    assert values[("pulsebridge_frames_rejected_total", (("reason", "bad_mac"),))] == 2
    assert values[("pulsebridge_backend_forwarded_total", (("backend", "mqtt"),))] == 7
    assert values[("pulsebridge_backend_failures_total", (("backend", "mqtt"),))] == 1
    assert values[("pulsebridge_backend_backlog", (("backend", "mqtt"),))] == 4
    assert values[("pulsebridge_boards_connected", ())] == 1


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.micropython
@pytest.mark.slow
def test_a_running_agent_logs_start_stop_escapes_forged_ids_and_serves_metrics(
        make_hub: Callable[..., harness.Hub], tmp_path: Path) -> None:
    port = harness.free_port()
    hub = make_hub(1, webhook=True, settings='\n[metrics]\nlisten = "127.0.0.1:%d"\n' % port)
    sims, cfg = hub.sims, hub.config_path
    agent = harness.agent_process(cfg)
    url = "http://127.0.0.1:%d/metrics" % port
    board = ("pulsebridge_frames_stored_total", (("device_id", sims[0].device_id),))
    forwarded = ("pulsebridge_backend_forwarded_total", (("backend", "local"),))

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        try:
            return _samples(_get(url))
        except OSError:
            return {}

    try:
        wait_for(lambda: scrape().get(board, 0) >= 2 and scrape().get(forwarded, 0) >= 1, 90,
                 "frames stored and forwarded, counted", scrape)
        forged = cose.MacKey(bytes(32), FORGED_ID.encode(), cose.AAD_UPLINK)
        fake = messages.SampleFrame(1, 10**6, 1, 0, 0, 512, 1, (1, 1), None, (0, 0, 0, 0), [[0]])
        sealed = forged.seal(messages.encoded(fake, sealer=cipher.SampleCipher(bytes(32), bytes(16))))
        sims[0].inject(link.StreamFramer().frame(sealed))
        rejected = wait_for(lambda: {k: v for k, v in scrape().items()
                                     if k[0] == "pulsebridge_frames_rejected_total"}, 60,
                            "the forged frame counted by its reason", scrape)
        assert sum(rejected.values()) >= 1
        assert not any(FORGED_ID in str(k) for k in scrape())  # a forged id never becomes a label
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    text = (tmp_path / "agent.log").read_text()
    start = next(ln for ln in text.splitlines() if "starting" in ln)
    assert str(cfg) in start and "1 boards registered (1 active)" in start and "local (webhook)" in start
    assert "metrics on 127.0.0.1:%d" % port in start
    assert any("stopped (config %s)" % cfg in ln for ln in text.splitlines())
    assert "pb\\n2026 INFO x" in text  # the forged id, escaped
    assert not any(ln.startswith("2026 INFO x") for ln in text.splitlines())  # no forged line


def test_ctrl_c_in_a_command_is_no_traceback(tmp_path: Path) -> None:
    import socket

    run = tmp_path / "run"
    run.mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nhub_id = "h"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n' % (
        tmp_path / "data", tmp_path / "log", run))
    with socket.socket(socket.AF_UNIX) as hung:  # an agent that accepts and never answers
        hung.bind(str(run / "status.sock"))
        hung.listen()
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "status", "--config", str(cfg)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn, _ = hung.accept()  # the command is waiting for its answer now
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        conn.close()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err + out, err
