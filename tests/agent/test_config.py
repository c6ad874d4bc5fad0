import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import config
from tests.conftest import ROOT
from tests.waiting import async_wait_for


def test_example_config_parses() -> None:
    cfg = config.load(ROOT / "agent" / "deploy" / "agent.toml")
    assert cfg.hub_id == "hub-0001" and [b.type for b in cfg.backends] == ["mqtt", "fhir"]
    assert cfg.serial[0].usb_vid == 0x303A and cfg.store_path == Path("/var/lib/pulsebridge/store.db")
    assert cfg.alert_rules == [{"name": "spo2_low", "signal": "spo2", "low": 90.0, "hysteresis": 2.0,
                                "min_duration_s": 30.0}]
    assert cfg.ble is not None and cfg.ble.adapter == "hci0" and cfg.ble.air == ""


@pytest.mark.parametrize("toml, field", [
    ('[agent]\nretention_days = "seven"', "agent.retention_days"),
    ('[agent]\nhub = "x"', "agent.hub"),
    ('[[serial]]\nbaudrate = 9600', "serial[0]"),
    ('[ble]\nmax_connections = 0', "ble.max_connections"),
    ('[ble]\nadaptor = "hci0"', "ble.adaptor"),
    ('[[backend]]\nname = "a"\ntype = "smtp"\nurl = "x"', "backend[0].type"),
    ('[[alert]]\nname = "x"\nsignal = "temperature"\nlow = 1', "alert[0].signal"),
    ('[[backend]]\nname = "a"\ntype = "webhook"\nurl = "http://host/x"', "backend[0].url"),
    ('[[backend]]\nname = "a"\ntype = "fhir"\nurl = "https://h/f"\ntoken = "s3cret"', "backend[0]"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\n[[backend]]\nname = "a"\ntype = "mqtt"\n'
     'url = "mqtts://h"', "backend[1].name"),
])


def test_bad_settings_are_named(toml: str, field: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads(toml))
    assert e.value.field == field, str(e.value)


def test_plaintext_only_when_asked() -> None:
    cfg = config.parse(tomllib.loads('[[backend]]\nname = "a"\ntype = "webhook"\nurl = "http://h/x"\n'
                                     'insecure = true'))
    assert cfg.backends[0].insecure


FHIR = '[[backend]]\nname = "a"\ntype = "fhir"\nurl = "https://h/f"\n'
WEBHOOK = '[[backend]]\nname = "a"\ntype = "webhook"\nurl = "https://h/f"\n'


# Each setting out of its range or enum, with the field the error must name.
@pytest.mark.parametrize("toml, field", [
    (FHIR + "batch = 0", "backend[0].batch"),
    (FHIR + "batch = -5", "backend[0].batch"),
    (FHIR + "batch = 100000", "backend[0].batch"),
    (FHIR + "batch = 5.5", "backend[0].batch"),
    (FHIR + "batch = true", "backend[0].batch"),
    (FHIR + "timeout_s = -1", "backend[0].timeout_s"),
    (FHIR + "timeout_s = 0", "backend[0].timeout_s"),
    (FHIR + "timeout_s = nan", "backend[0].timeout_s"),
    (FHIR + "linger_s = -0.1", "backend[0].linger_s"),
    (FHIR + "linger_s = inf", "backend[0].linger_s"),
    (WEBHOOK + 'format = "xml"', "backend[0].format"),
    (WEBHOOK + 'format = "JSON"', "backend[0].format"),
    (FHIR + 'format = "cbor"', "backend[0].format"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\ntopic_prefix = "a/#"', "backend[0].topic_prefix"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\ndocuments_per_message = 0',
     "backend[0].documents_per_message"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\ndocuments_per_message = 101',
     "backend[0].documents_per_message"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\ndocuments_per_message = 2.5',
     "backend[0].documents_per_message"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\ndocuments_per_message = true',
     "backend[0].documents_per_message"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\nclient = "thread"', "backend[0].client"),
    ('[[backend]]\nname = "a b"\ntype = "mqtt"\nurl = "mqtts://h"', "backend[0].name"),
    ('[[backend]]\nname = "a"\ntype = "fhir"\nurl = "https://h:99999/f"', "backend[0].url"),
    ('[agent]\nretention_days = -1', "agent.retention_days"),
    ('[agent]\ndisk_quota_mb = 0', "agent.disk_quota_mb"),
    ('[agent]\ntime_sync_every_s = -60', "agent.time_sync_every_s"),
    ('[agent]\nlog_format = "xml"', "agent.log_format"),
    ('[agent]\nhub_id = "hub/1"', "agent.hub_id"),
    ('[agent]\ndata_dir = "relative/dir"', "agent.data_dir"),
    ('[agent]\nstatus_page_listen = "0.0.0.0"', "agent.status_page_listen"),
    ('[agent]\nstatus_page_listen = "0.0.0.0:70000"', "agent.status_page_listen"),
    ('[[serial]]\nport = "/dev/ttyACM0"\nbaudrate = 0', "serial[0].baudrate"),
    ('[[serial]]\nusb_vid = 0x10000', "serial[0].usb_vid"),
    ('[[serial]]\nusb_vid = 0x303a\nusb_pid = -1', "serial[0].usb_pid"),
    ('serial = [1]', "serial[0]"),
    ('[ble]\nconnect_timeout_s = -1', "ble.connect_timeout_s"),
    ('[ble]\nmax_connections = 21', "ble.max_connections"),
    ('[[alert]]\nname = "x"\nsignal = "spo2"\nlow = 90\nmin_duration_s = -1', "alert[0].min_duration_s"),
    ('[[alert]]\nname = "x"\nsignal = "heart_rate"\nlow = 130\nhigh = 40', "alert[0].low"),
    ('[[alert]]\nname = "x"\nsignal = "spo2"\nlow = 90\nhysteresis = -2', "alert[0].hysteresis"),
])


def test_out_of_range_and_unknown_values_are_refused_by_name(toml: str, field: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert e.value.field == field, str(e.value)
    assert e.value.path == path and str(e.value).startswith(str(path) + ": ")
    assert field.split(".")[-1].split("[")[0] in str(e.value)


def test_bounds_themselves_are_accepted() -> None:
    cfg = config.parse(tomllib.loads(FHIR + "batch = 1\ntimeout_s = 0.1\nlinger_s = 0\n[agent]\nretention_days = 0"))
    assert cfg.backends[0].batch == 1 and cfg.backends[0].timeout_s == 0.1 and cfg.retention_days == 0
    cfg = config.parse(tomllib.loads(WEBHOOK + 'format = "cbor"\nbatch = 1000'))
    assert cfg.backends[0].format == "cbor" and cfg.backends[0].batch == 1000


def test_unreadable_and_invalid_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent\n")
    with pytest.raises(config.ConfigError, match="^%s: not valid TOML" % path):
        config.load(path)
    path.write_bytes(b"\xff\xfe[agent]")
    with pytest.raises(config.ConfigError, match="^%s: cannot read" % path):
        config.load(path)
    # arrays or inline tables nested thousands deep: tomllib's RecursionError was a traceback
    for deep in ("x = " + "[" * 100_000 + "]" * 100_000, "x = " + "{a=" * 5000 + "1" + "}" * 5000):
        path.write_text(deep + "\n")
        with pytest.raises(config.ConfigError, match="^%s: not valid TOML: nested too deeply" % path):
            config.load(path)


def test_cli_refuses_a_bad_config_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "agent.toml"
    path.write_text(FHIR + "batch = 0\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "%s: backend[0].batch must be between 1 and 1000, not 0" % path in r.stderr, r.stderr


@pytest.mark.micropython
def test_status_page_password_file_never_stops_the_boards(make_hub: Callable[..., Any], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Missing: no page and a warning; world-readable or short: no page and an error. The board
    is served in each case (frames stored), and the status tells why there is no page."""
    import asyncio
    import logging

    from agent.registry import write_private
    from agent.supervisor import Agent
    from tests.agent import harness

    pw = tmp_path / "status.password"
    cases = {
        "missing": (lambda: None, logging.WARNING, "no status page password file at %s" % pw),
        "readable by others": (lambda: (write_private(pw, b"correct horse battery staple\n"), pw.chmod(0o644)),
                               logging.ERROR, "readable by others"),
        "short": (lambda: (pw.chmod(0o600), write_private(pw, b"hunter2\n")), logging.ERROR, "at least 12"),
    }
    cfg = make_hub(1, settings=(
        'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (harness.free_port(), pw))).cfg
    for case, (prepare, level, says) in cases.items():
        prepare()
        caplog.clear()

        async def scenario() -> tuple[int, dict[str, object]]:
            async with harness.running(Agent(cfg)) as agent:
                before = agent.store.stats.ingested
                await async_wait_for(lambda: agent.store.stats.ingested >= before + 3, 60,
                                     "the board's frames stored", lambda: agent.snapshot()["boards"])
                return agent.store.stats.ingested - before, agent.snapshot()

        stored, snap = asyncio.run(scenario())
        assert stored >= 3, case
        assert str(snap["status_page"]).startswith("off: ") and says in str(snap["status_page"]), (case, snap)
        assert any(r.levelno == level and says in r.getMessage() for r in caplog.records), case


def test_a_status_page_password_file_fixed_while_the_agent_runs_brings_the_page_up(tmp_path: Path) -> None:
    """The status says 'run chmod 600 ...': done, the page starts with no restart (it stayed off, the status
    still naming the mode already fixed)."""
    import asyncio
    import base64

    import aiohttp

    from agent.registry import write_private
    from agent.supervisor import Agent
    from tests.agent import harness

    pw = tmp_path / "status.password"
    write_private(pw, b"hunter2\n")
    pw.chmod(0o644)
    port = harness.free_port()
    cfg = config.load(harness.write_config(tmp_path, [], "", extra=(
        'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (port, pw))))

    async def scenario() -> None:
        agent = Agent(cfg)
        agent.status.password_recheck_s = 0.2

        def page() -> str:
            return str(agent.snapshot()["status_page"])

        async with harness.running(agent):
            await async_wait_for(lambda: "readable by others" in page(), 30, "readable by others", page)
            pw.chmod(0o600)  # as the status says; still too short
            await async_wait_for(lambda: "at least 12" in page(), 30, "the short password named", page)
            write_private(pw, b"correct horse battery staple\n")
            await async_wait_for(lambda: page() == "on", 30, "the page on", page)
            async with aiohttp.ClientSession() as s:
                auth = {"Authorization": "Basic " + base64.b64encode(b"hub:correct horse battery staple").decode()}
                async with s.get("http://127.0.0.1:%d/" % port, headers=auth) as r:
                    assert r.status == 200
                async with s.get("http://127.0.0.1:%d/" % port) as r:
                    assert r.status == 401

    asyncio.run(scenario())


def test_the_start_line_says_the_page_is_on_only_once_it_listens(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """An operator reads the start line: with an unsafe password file it said 'status page on' (then an error
    said off); it says 'starting' until the page listens, and the page's address is logged when it does."""
    import asyncio
    import logging

    from agent.registry import write_private
    from agent.supervisor import Agent
    from tests.agent import harness

    pw = tmp_path / "status.password"
    write_private(pw, b"correct horse battery staple\n")
    pw.chmod(0o644)
    port = harness.free_port()
    cfg = config.load(harness.write_config(tmp_path, [], "", extra=(
        'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (port, pw))))
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        agent = Agent(cfg)
        agent.status.password_recheck_s = 0.2

        def page() -> str:
            return str(agent.snapshot()["status_page"])

        async with harness.running(agent):
            await async_wait_for(lambda: "readable by others" in page(), 30, "readable by others", page)
            pw.chmod(0o600)
            await async_wait_for(lambda: page() == "on", 30, "the page on", page)

    asyncio.run(scenario())
    start = [r.getMessage() for r in caplog.records if " starting (config " in r.getMessage()]
    assert len(start) == 1 and "status page starting" in start[0] and "status page on" not in start[0], start
    assert any("status page on http://127.0.0.1:%d/" % port in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("toml, says", [
    # the kinds were Python's ("must be dict", "int or float"), and a top-level table read ".agent"
    ("agent = [1]", "agent must be a table ([agent]), not [1]"),
    ('[backend]\nname = "x"', "backend must be an array of tables ([[backend]]), not {'name': 'x'}"),
    ('[agent]\nretention_days = "7"', "agent.retention_days must be a number, not '7'"),
    ("[[serial]]\nusb_vid = 1.5", "serial[0].usb_vid must be an integer, not 1.5"),
    ('[agent]\nhub_id = 7', "agent.hub_id must be a string, not 7"),
    (FHIR + 'insecure = "yes"', "backend[0].insecure must be true or false, not 'yes'"),
])
def test_a_setting_of_the_wrong_kind_is_named_in_toml_s_words(toml: str, says: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads(toml))
    assert str(e.value) == says


@pytest.mark.parametrize("url", ["https://user:s3cret@h/f", "https://s3cret@h/f", "mqtts://u:s3cret@broker:8883"])
def test_credentials_in_a_backend_url_are_refused_without_echoing_them(url: str) -> None:
    # a URL's user:password was taken, and the URL is in the backend's errors ("HTTP 503 from <url>"),
    # logged and shown by `pulsebridge status`: the password with them
    kind = "mqtt" if url.startswith("mqtt") else "fhir"
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads('[[backend]]\nname = "a"\ntype = "%s"\nurl = "%s"\n' % (kind, url)))
    assert e.value.field == "backend[0].url" and "credentials" in str(e.value), str(e.value)
    assert "s3cret" not in str(e.value)


def test_a_directory_given_as_the_configuration_is_named_in_words(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(tmp_path)
    assert str(e.value) == "%s: cannot read the configuration: it is a directory, not a file" % tmp_path


def test_a_missing_configuration_says_how_to_name_or_make_one(tmp_path: Path) -> None:
    # a new user running `pulsebridge devices list` read only "no configuration file at
    # /etc/pulsebridge/agent.toml": nothing said --config exists, nor where an example is
    with pytest.raises(config.ConfigError) as e:
        config.load(tmp_path / "agent.toml")
    assert str(e.value).startswith("no configuration file at %s (--config FILE names another; " % (
        tmp_path / "agent.toml")) and "agent/deploy/agent.toml" in str(e.value), str(e.value)
    assert (ROOT / "agent" / "deploy" / "agent.toml").is_file()


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("[::]:8080", "::", 8080), ("[::1]:9464", "::1", 9464), ("0.0.0.0:8080", "0.0.0.0", 8080),
    (":8080", "", 8080), ("hub.local:80", "hub.local", 80)])
def test_a_listen_address_splits_into_its_host_and_port(listen: str, host: str, port: int) -> None:
    # status_page_listen = "[::]:8080" (the usual way to write an IPv6 address and port) was accepted, then
    # the page did not start: "cannot listen on [::]:8080: [Errno -2] Name or service not known"
    assert config.listen_address(listen) == (host, port)
    cfg = config.parse(tomllib.loads('[agent]\nstatus_page_listen = "%s"\n' % listen))
    assert cfg.status_page_listen == listen


@pytest.mark.parametrize("listen", ["::1:8080", "[::1]8080", "[::1]:", "[nope]:80", "host:99999", "8080"])
def test_a_listen_address_that_is_not_one_is_refused_by_name(listen: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads('[agent]\nstatus_page_listen = "%s"\n' % listen))
    assert e.value.field == "agent.status_page_listen" and "HOST:PORT" in str(e.value), str(e.value)


def test_the_status_page_listens_on_an_ipv6_address(tmp_path: Path) -> None:
    import asyncio

    from agent.registry import write_private
    from agent.supervisor import Agent
    from tests.agent import harness

    pw = tmp_path / "status.password"
    write_private(pw, b"correct horse battery\n")
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nhub_id = "test-hub"\ndata_dir = "%s"\nlog_dir = "%s"\nrun_dir = "%s"\n'
                    'status_page_listen = "[::1]:0"\nstatus_page_password_file = "%s"\n' % (
                        tmp_path / "data", tmp_path / "log", tmp_path / "run", pw))
    cfg = config.load(path)

    async def scenario() -> tuple[str, int]:
        async with harness.running(Agent(cfg)) as agent:
            await async_wait_for(lambda: agent.status.page_state != "starting", 30, "the page started or not",
                                 lambda: agent.status.page_state)
            return agent.status.page_state, agent.status.page_port

    state, port = asyncio.run(scenario())
    assert state == "on" and port > 0, state
