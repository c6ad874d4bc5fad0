# The hub's status page in a real headless browser (Debian's Chromium driven
# by Playwright) against a running agent with a simulated board; and what the
# page derives (agent.status_page.view) from the agent's facts, state by state.
import asyncio
import contextlib
import copy
import io
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.audit import AuditLog
from agent.registry import Registry, write_private
from agent.status_page import DELIVERY_FAILING_S, FRESH_S, TEXT, StatusPage, _details, view
from agent.supervisor import Agent
from tests.agent import harness
from tests.conftest import IN_CI
from tests.waiting import async_wait_for

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
PASSWORD = "correct horse battery"
# Phone and desktop.
VIEWPORTS = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 900}}


def _chromium() -> str:
    if not os.path.exists(CHROMIUM):
        msg = "Debian's chromium is not installed (./run tests installs it)"
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    return CHROMIUM


AXE = Path(__file__).resolve().parents[2] / ".node-axe" / "node_modules" / "axe-core" / "axe.min.js"


def _axe_source() -> str:
    if not AXE.exists():
        msg = "axe-core is not installed (./run tests installs it into .node-axe with npm)"
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    return AXE.read_text()


# axe-core's WCAG 2.x A and AA rules on the page as it is; its violations as "rule: targets".
_AXE_RUN = """async () => {
    const r = await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}});
    return r.violations.map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', ')); }"""


async def _axe(page: Any, source: str) -> list[str]:
    # Evaluated through the browser's debugging protocol, which the page's CSP does not govern.
    await page.evaluate(source)
    return list(await page.evaluate(_AXE_RUN))


# Inked pixels on the status page's ECG canvas: the waveform is drawn.
_ECG_INK = """() => {
    const c = document.querySelector('canvas.ecg'); const d = c.getContext('2d')
      .getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""


# ---- what the page derives -------------------------------------------------------------------

RULES = [{"name": "spo2_low", "signal": "spo2", "low": 90.0, "high": None},
         {"name": "heart_rate_out_of_range", "signal": "heart_rate", "low": 40.0, "high": 130.0},
         {"name": "board_silent", "signal": "silence_s", "low": None, "high": 120.0}]


def _snapshot(now: float, heard_at: float | None = None, backends: list[dict[str, Any]] | None = None,
              spo2: float = 97.0, alerts: list[list[str]] | None = None, label: str = "Chambre") -> dict[str, Any]:
    # The facts an Agent.snapshot() carries, as the page reads them.
    return {"now": now, "boards": [{"device_id": "pb-t01", "state": "connected", "port": "/dev/ttyACM0"}],
            "sensors": [{"device_id": "pb-t01", "label": label, "heard_at": heard_at}],
            "alert_rules": RULES, "backends": backends or [], "rejects": {}, "tasks": {}, "store": {"state": "ok"},
            "last_vitals": {"pb-t01": {"spo2": {"value": spo2, "quality": 0.9, "at": "x"},
                                       "heart_rate": {"value": 72.0, "quality": 0.95, "at": "x"}}},
            "vitals": {"active_alerts": alerts or []}, "systemd": {"alive": True}, "ble_adapter": None}


def _delivering(now: float) -> dict[str, Any]:
    return {"name": "hopital", "backlog": 3, "forwarded": 900, "last_delivered_at": now - 1, "failing_since": None,
            "oldest_waiting_at": now - 1}


def test_green_only_when_readings_are_fresh_and_delivered() -> None:
    now = 1_800_000_000.0
    v = view(_snapshot(now, heard_at=now - 2, backends=[_delivering(now)]))
    assert (v["level"], v["delivery"], v["notices"]) == ("ok", "ok", [])
    assert v["sensors"][0]["label"] == "Chambre" and v["sensors"][0]["state"] == "live"


def test_no_backend_is_said_plainly_and_still_green() -> None:
    now = 1_800_000_000.0
    v = view(_snapshot(now, heard_at=now - 2))
    assert (v["level"], v["delivery"]) == ("ok", "none")
    assert [n["key"] for n in v["notices"]] == ["no_backend"] and v["notices"][0]["level"] == "info"


def test_each_vital_has_its_own_unit() -> None:
    # the perfusion index went out as "1 /min" (a percentage, rounded to a whole one: 0.4 % read 0)
    now = 1_800_000_000.0
    snap = _snapshot(now, heard_at=now - 2)
    snap["last_vitals"]["pb-t01"].update({"pulse_rate": {"value": 71.6, "quality": 0.9, "at": "x"},
                                          "perfusion_index": {"value": 0.43, "quality": 0.9, "at": "x"}})
    vitals = view(snap)["sensors"][0]["vitals"]
    assert {k: (v["value"], v["unit"]) for k, v in vitals.items()} == {
        "spo2": (97, "%"), "heart_rate": (72, "/min"), "pulse_rate": (72, "/min"), "perfusion_index": (0.4, "%")}


def test_nothing_flowing_is_not_green_and_names_the_sensor_by_its_label() -> None:
    # Before: a hub with nothing arriving and no backend said "Everything is working" in green.
    now = 1_800_000_000.0
    v = view(_snapshot(now, heard_at=now - FRESH_S - 5))
    assert v["level"] == "attention"
    assert v["notices"][0] == {"level": "attention", "key": "sensor_silent",
                               "args": {"label": "Chambre", "since_at": now - FRESH_S - 5, "link": "connected"}}
    never = view(_snapshot(now, heard_at=None, label=""))
    assert never["notices"][0]["key"] == "sensor_waiting"
    assert never["sensors"][0]["label"] == "pb-t01"  # no label set: its id, never "?"


def test_a_backend_not_delivering_says_since_when_and_how_much_waits() -> None:
    now = 1_800_000_000.0
    failing = dict(_delivering(now), backlog=3400, failing_since=now - DELIVERY_FAILING_S - 1,
                   oldest_waiting_at=now - 900, last_delivered_at=now - 905)
    v = view(_snapshot(now, heard_at=now - 1, backends=[failing]))
    assert (v["level"], v["delivery"]) == ("attention", "failing")
    assert v["notices"] == [{"level": "attention", "key": "delivery_failing", "args": {
        "name": "hopital", "since_at": now - 900, "waiting": 3400, "delivered_at": now - 905}}]
    # A short failure is retried unseen.
    brief = dict(_delivering(now), failing_since=now - 5)
    assert view(_snapshot(now, heard_at=now - 1, backends=[brief]))["level"] == "ok"


def test_alerts_come_first_with_the_value_and_its_threshold() -> None:
    now = 1_800_000_000.0
    v = view(_snapshot(now, heard_at=now - 1, spo2=85.0, alerts=[["pb-t01", "spo2_low"]],
                       backends=[dict(_delivering(now), failing_since=now - 600)]))
    assert v["level"] == "alert"
    assert v["notices"][0] == {"level": "alert", "key": "alert_spo2_low", "args": {
        "label": "Chambre", "rule": "spo2_low", "low": 90.0, "high": None, "value": 85.0}}
    assert v["notices"][1]["key"] == "delivery_failing"
    assert v["sensors"][0]["vitals"]["spo2"]["out"] == "low" and v["sensors"][0]["vitals"]["spo2"]["low"] == 90.0
    assert v["sensors"][0]["vitals"]["heart_rate"]["out"] is None
    fine = view(_snapshot(now, heard_at=now - 1, spo2=97.0))
    assert fine["sensors"][0]["vitals"]["spo2"]["out"] is None


def test_sensors_that_disagree_are_shown_as_doubt_not_as_an_alert() -> None:
    now = 1_800_000_000.0
    snap = _snapshot(now, heard_at=now - 2, backends=[_delivering(now)])
    snap["last_vitals"]["pb-t01"]["heart_rate"].update(quality=0.45, disagrees=True)
    snap["last_vitals"]["pb-t01"]["pulse_rate"] = {"value": 42.0, "quality": 0.4, "at": "x", "disagrees": True}
    v = view(snap)
    shown = v["sensors"][0]["vitals"]
    assert shown["heart_rate"]["disagrees"] and shown["pulse_rate"]["disagrees"] and not shown["spo2"]["disagrees"]
    assert (v["level"], v["notices"]) == ("ok", [])  # doubt, not an alert
    assert "q_disagree" in TEXT["fr"] and "q_disagree" in TEXT["en"]


def test_each_boards_firmware_version_is_told_to_the_technician() -> None:
    # As the board's last hello said it (kept across its link's sessions): an operator
    # checks an update by it, on the page's details and in pulsebridge status.
    from agent.cli import _board_line

    board = {"link": "serial:/dev/ttyACM0", "port": "/dev/ttyACM0", "state": "connected", "device_id": "pb-t01",
             "firmware": "pulsebridge-fw 0.1.0", "last_frame_at": None, "retry_in_s": None}
    details = _details({"boards": [board]})
    assert details[0]["key"] == "d_link" and details[0]["args"]["firmware"] == "pulsebridge-fw 0.1.0"
    assert "{firmware}" in TEXT["fr"]["d_firmware"] and "{firmware}" in TEXT["en"]["d_firmware"]
    assert _board_line(board).endswith(", firmware pulsebridge-fw 0.1.0")
    assert "firmware" not in _board_line(dict(board, firmware=""))  # not known yet: nothing said


def test_a_firmware_update_is_told_as_it_goes_and_how_it_ended() -> None:
    # The board's update state as the agent keeps it (agent/ota.py): a percentage while it is received,
    # then what became of it, in both languages on the page and in pulsebridge status.
    from agent.cli import _board_line

    board = {"link": "serial:/dev/ttyACM0", "port": "/dev/ttyACM0", "state": "connected", "device_id": "pb-t01",
             "firmware": "pulsebridge-fw 0.1.0", "last_frame_at": None, "retry_in_s": None}
    name = "pulsebridge-fw 200"
    cases = [("receiving", 47520, "Updating: 45 %", "Mise à jour en cours : 45 %",
              "updating %s: 45 %% received" % name),
             ("verifying", 105600, "checking", "vérification", "checking the signature"),
             ("installed", 105600, "installed, on trial", "à l'essai", "on trial"),
             ("confirmed", 0, "Update %s installed" % name, "Mise à jour %s installée" % name, "confirmed"),
             ("refused:bad_signature", 0, "refused by the sensor (bad_signature)", "refusée par le capteur",
              "refused by the board (bad_signature)"),
             ("rolled_back", 0, "went back to its previous version", "revenu à sa version précédente", "rolled back")]
    for state, offset, en, fr, line in cases:
        update = {"state": state, "offset": offset, "total": 105600, "version": name}
        args = _details({"boards": [dict(board, update=update)]})[0]["args"]["update"]
        fields = {k: "" if v is None else v for k, v in args.items()}
        texts = {lang: TEXT[lang]["d_up_" + args["phase"]].format(**fields) for lang in ("en", "fr")}
        assert en in texts["en"] and fr in texts["fr"], (state, texts)
        assert line in _board_line(dict(board, update=update)), state
    assert _details({"boards": [board]})[0]["args"]["update"] is None  # no update: nothing said
    assert "updat" not in _board_line(board)


def test_a_store_fault_shows_no_sensor_live_and_says_its_readings_wait() -> None:
    # Before: each sensor "Live" (its last frame, stored before the disk filled, under 30 s old) and
    # its link "connected" beneath the notice that the hub cannot store readings.
    now = 1_800_000_000.0
    snap = _snapshot(now, heard_at=now - 2, backends=[_delivering(now)])
    snap["store"] = {"state": "fault", "fault": "OperationalError: database or disk is full", "fault_since": now - 5}
    v = view(snap)
    assert v["level"] == "attention" and v["sensors"][0]["state"] == "silent", v
    assert v["sensors"][0]["link"] == "held"
    assert {"level": "attention", "key": "store_fault", "args": {"since_at": now - 5}} in v["notices"], v["notices"]
    assert {"level": "attention", "key": "sensor_silent",
            "args": {"label": "Chambre", "since_at": now - 2, "link": "held"}} in v["notices"], v["notices"]
    assert [d["args"]["state"] for d in v["details"] if d["key"] == "d_link"] == ["held"]
    assert TEXT["en"]["hint_held"] == "The hub cannot store its readings."
    assert TEXT["fr"]["st_held"].startswith("connecté, ses mesures attendent")
    snap["store"] = {"state": "ok"}
    assert view(snap)["sensors"][0]["state"] == "live"


def test_every_text_exists_in_both_languages_without_jargon() -> None:
    assert set(TEXT["fr"]) == set(TEXT["en"])
    words = " ".join(list(TEXT["fr"].values()) + list(TEXT["en"].values())).lower()
    for jargon in ("pleth", "frame", "trame", "backend", "sensor ?", "capteur ?"):
        assert jargon not in words, jargon


def test_a_full_card_is_the_technicians_to_fix_not_the_patients() -> None:
    # The page told a patient "free some space" ("libérez de la place") of a hub's memory card, which
    # no patient can do (a shell on the Raspberry Pi): the other notices of that kind send them to the
    # technician, these now too.
    for lang, technician in (("en", "technician"), ("fr", "technicien")):
        words = " ".join(TEXT[lang].values()).lower()
        assert "free some space" not in words and "libérez" not in words, lang
        for key in ("store_fault", "store_short"):
            assert technician in TEXT[lang][key], (lang, key, TEXT[lang][key])


def test_headlines_end_without_a_period_as_the_announcement_adds_one() -> None:
    # page.js announces "<headline>. <notices>": the green headlines ended with a period of their own,
    # so a screen reader was given "... kept on this hub.." (the other headlines had none)
    for lang, text in TEXT.items():
        for key, line in text.items():
            if key.startswith("head_"):
                assert not line.endswith("."), (lang, key, line)


# ---- in a browser ---------------------------------------------------------------------------


def _register(data_dir: Path, log_dir: Path, sims: list[Any], label: str) -> None:
    reg = Registry(data_dir / "registry.db", AuditLog(log_dir / "audit.log"))
    for sim in sims:
        reg.add(sim.device_id, label=label, key=sim.spec.key, actor="test")
    reg.close()


async def _open(browser: Any, url: str, locale: str, viewport: str) -> Any:
    ctx = await browser.new_context(locale=locale, viewport=VIEWPORTS[viewport],
                                    http_credentials={"username": "hub", "password": PASSWORD})
    page = await ctx.new_page()
    await page.goto(url)
    return page


async def _until_page(page: Any, predicate: Any, timeout_s: float, what: str) -> None:
    # Polled from here: the page's Content-Security-Policy forbids the eval that
    # wait_for_function's string predicates need.
    end = time.monotonic() + timeout_s
    while not await predicate(page):
        if time.monotonic() > end:
            raise AssertionError("page: %s not reached in %.0f s; it shows: %s" % (
                what, timeout_s, await page.text_content("body")))
        await page.wait_for_timeout(100)


async def _level(page: Any) -> str:
    return str(await page.get_attribute("#status", "class") or "")


async def _has_class(page: Any, cls: str) -> bool:
    return cls in await _level(page)


async def _ink_ok(page: Any) -> bool:
    return "level-ok" in await _level(page) and int(await page.evaluate(_ECG_INK)) > 200


@pytest.mark.micropython
@pytest.mark.slow
def test_status_page_states_in_chromium(make_hub: Callable[..., harness.Hub], tmp_path: Path) -> None:
    # Each state, phone and desktop, French and English, screenshot for a person to look at
    # (PULSEBRIDGE_SCREENSHOTS=dir keeps them): live (a real agent and board, no backend);
    # then from that agent's own snapshot, with the facts changed: a low SpO2 alert, a silent
    # sensor with a backend not delivering; and the hub no longer answering the open page.
    chromium = _chromium()
    axe = _axe_source()
    from playwright.async_api import async_playwright

    shots = Path(os.environ.get("PULSEBRIDGE_SCREENSHOTS", str(tmp_path / "shots")))
    shots.mkdir(parents=True, exist_ok=True)
    pw_file = tmp_path / "status.password"
    write_private(pw_file, (PASSWORD + "\n").encode())
    port = harness.free_port()
    hub = make_hub(1, label="Chambre de Marie", settings=(
        'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (port, pw_file)))
    cfg, dev = hub.cfg, hub.board.device_id
    found: dict[str, str] = {}
    violations: dict[str, list[str]] = {}

    async def shoot(page: Any, name: str) -> None:
        path = shots / ("status-%s.png" % name)
        await page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000
        # No-break spaces (before units, in numbers) read as spaces here.
        found[name] = ((await page.text_content("body")) or "").replace("\xa0", " ").replace("\u202f", " ")
        violations[name] = await _axe(page, axe)

    async def scenario() -> None:
        agent = Agent(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        last_vitals = agent.vitals_runner.last_vitals
        await async_wait_for(lambda: {"heart_rate", "spo2"} <= set(last_vitals.get(dev, {})), 120,
                             "the board's first heart rate and SpO2", lambda: agent.snapshot()["boards"])
        url = "http://127.0.0.1:%d/" % port
        async with aiohttp.ClientSession() as s:  # no password, no page
            async with s.get(url) as r:
                assert r.status == 401
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
            pages = {(loc, vp): await _open(browser, url, loc, vp)
                     for loc in ("fr-FR", "en-GB") for vp in VIEWPORTS}
            for (loc, vp), page in pages.items():
                await _until_page(page, _ink_ok, 60,
                                  "live and green, the ECG drawn")
                await shoot(page, "live-%s-%s" % (loc[:2], vp))
            snap = agent.snapshot()
            waves = {s: agent.vitals_runner.waveform(dev, s) for s in ("ecg", "ppg")}
            stop.set()
            await task

            # The same facts, changed: each state served by the page's own server and script.
            async def alert() -> dict[str, Any]:
                now = time.time()
                out = copy.deepcopy(snap)
                out["now"] = now
                out["sensors"][0]["heard_at"] = now - 1
                out["last_vitals"][dev]["spo2"]["value"] = 85.0
                out["vitals"]["active_alerts"] = [[dev, "spo2_low"]]
                return out

            async def silent() -> dict[str, Any]:
                now = time.time()
                out = copy.deepcopy(snap)
                out["now"] = now
                out["sensors"][0]["heard_at"] = now - 75
                out["boards"][0]["state"] = "stalled"
                out["backends"] = [{"name": "hopital", "type": "webhook", "state": "backoff", "backlog": 3400,
                                    "forwarded": 51234, "failures": 40, "refused": 0,
                                    "last_error": "ConnectionRefusedError", "last_delivered_at": now - 905,
                                    "failing_since": now - 900, "oldest_waiting_at": now - 900}]
                return out

            for name, facts in (("alert", alert), ("silent", silent)):
                page_server = StatusPage(facts, lambda d, s: waves.get(s, {"values": []}), PASSWORD)
                fake_port = await page_server.start("127.0.0.1", 0)
                furl = "http://127.0.0.1:%d/" % fake_port
                for (loc, vp), page in pages.items():
                    await page.goto(furl)
                    want = "level-alert" if name == "alert" else "level-attention"
                    await _until_page(page, lambda pg, w=want: _has_class(pg, w), 30, want)
                    if name == "silent":  # the technician's details open too
                        await page.click("summary")
                    await shoot(page, "%s-%s-%s" % (name, loc[:2], vp))
                    found[name + "-announced-" + loc[:2] + vp] = " / ".join([
                        (await page.text_content("#announce-alert")) or "",
                        (await page.text_content("#announce")) or ""])
                if name == "alert":
                    await page_server.stop()  # the hub stops answering the open pages
                    for (loc, vp), page in pages.items():
                        await _until_page(page, lambda pg: _has_class(pg, "level-lost"), 40, "hub not answering")
                        await shoot(page, "lost-%s-%s" % (loc[:2], vp))
                        await page.goto("about:blank")
                else:
                    await page_server.stop()
            await browser.close()

    asyncio.run(scenario())
    assert len(violations) == 16 and not any(violations.values()), violations  # WCAG A/AA, every state
    fr, en = found["live-fr-phone"], found["live-en-phone"]
    assert "Tout fonctionne : les mesures arrivent et sont gardées sur la passerelle." in fr, fr
    assert "Everything is working: readings arrive and are kept on this hub" in en, en
    assert "Chambre de Marie" in fr and "Rythme cardiaque" in fr and "Heart rate" in en
    assert "aucun envoi vers une équipe soignante" in fr and "sending them to a care team is not set up" in en
    assert dev not in fr.split("Détails")[0]  # named by its label; the id only in the technician's details
    fr, en = found["alert-fr-phone"], found["alert-en-phone"]
    assert "Chambre de Marie : oxygène bas, 85 % (alerte en dessous de 90 %)." in fr, fr
    assert "Chambre de Marie: low oxygen, 85 % (alert below 90 %)." in en, en
    assert "alerte en dessous de 90 %" in fr and "alert below 90 %" in en
    assert "oxygène bas, 85" in found["alert-announced-frphone"].split(" / ")[0], found  # role=alert
    assert "aucune mesure depuis" in found["silent-announced-frphone"].split(" / ")[1], found  # polite
    fr, en = found["silent-fr-phone"], found["silent-en-phone"]
    assert "Envoi vers « hopital » : 3 400 en attente, 51 234 envoyées" in fr, fr  # the details
    assert "Sending to “hopital”: 3,400 waiting, 51,234 sent — ConnectionRefusedError" in en, en
    assert "Chambre de Marie : aucune mesure depuis 1 min." in fr, fr
    assert "Il est branché, mais rien ne passe" in fr, fr
    assert "Readings have not reached “hopital” since" in en and "(15 min ago). 3,400 are waiting" in en, en
    assert "3 400 attendent sur la passerelle" in fr, fr
    fr, en = found["lost-fr-phone"], found["lost-en-phone"]
    assert "La passerelle ne répond pas" in fr and "Pas de réponse de la passerelle depuis" in fr, fr
    assert "The hub is not answering" in en and "The values shown are not live." in en, en
    assert "Values from" in en and "oxygène bas" not in fr, en


@pytest.mark.micropython
@pytest.mark.slow
def test_status_page_and_cli_tell_stalled_unplugged_and_restarted(make_hub: Callable[..., harness.Hub],
                                                                   tmp_path: Path) -> None:
    # A board whose firmware hangs (stalled), a configured port with nothing
    # plugged in, and a task that crashed once: the page (French and
    # English) and `pulsebridge status` say so, in plain words.
    chromium = _chromium()
    from playwright.async_api import async_playwright

    from agent import cli

    pw_file = tmp_path / "status.password"
    write_private(pw_file, b"correct horse battery\n")
    absent = tmp_path / "ttyACM9"
    port = harness.free_port()
    hub = make_hub(1, settings=(
        'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n\n[[serial]]\nport = "%s"\n'
        % (port, pw_file, absent)))
    board, config, cfg = hub.board, hub.config_path, hub.cfg

    async def scenario() -> dict[str, str]:
        agent = Agent(cfg)
        agent.links.stall_s, agent.links.identify_s = 2.0, 2.0
        housekeeping = agent.maintenance.run
        crashes = [1]

        async def flaky() -> None:  # fault injection: one crash
            if crashes:
                crashes.pop()
                raise RuntimeError("injected fault")
            await housekeeping()

        agent.maintenance.run = flaky  # type: ignore[method-assign]
        async with harness.running(agent):

            def state(dev: str) -> str:
                return next((b["state"] for b in agent.snapshot()["boards"] if b["device_id"] == dev), "")

            # Stopped once a frame of it is stored: then the page has a last reading to tell the age of.
            await async_wait_for(lambda: state(board.device_id) == "connected" and board.device_id in
                                 agent.vitals.last_seen, 60, "the board connected and a frame of it stored",
                                 lambda: agent.snapshot()["boards"])
            assert board.proc is not None
            os.killpg(board.proc.pid, signal.SIGSTOP)  # the firmware hangs, USB up
            await async_wait_for(
                lambda: state(board.device_id) == "stalled" and agent.tasks["housekeeping"].restarts == 1, 60,
                "the board stalled and housekeeping restarted once",
                lambda: (agent.snapshot()["boards"], agent.snapshot()["tasks"]))
            found: dict[str, str] = {}
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert await asyncio.to_thread(cli.main, ["status", "--config", str(config)]) == 0
            found["cli"] = out.getvalue()
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
                for locale in ("fr-FR", "en-GB"):
                    ctx = await browser.new_context(locale=locale, http_credentials={
                        "username": "hub", "password": "correct horse battery"})
                    page = await ctx.new_page()
                    await page.goto("http://127.0.0.1:%d/" % port)
                    # The hung board's link goes round stalled, reopened (connecting), stalled again: the
                    # page is read when it tells the stall.
                    hint = "rien ne passe" if locale == "fr-FR" else "nothing comes through"

                    async def told(pg: Any, hint: str = hint) -> bool:
                        return await _has_class(pg, "level-attention") and hint in (
                            (await pg.text_content("#notices")) or "")
                    await _until_page(page, told, 60, "the stalled board told")
                    found[locale] = ((await page.text_content("body")) or "").replace("\xa0", " ")
                    await ctx.close()
                await browser.close()
            os.killpg(board.proc.pid, signal.SIGCONT)
        return found

    found = asyncio.run(scenario())
    fr, en, text = found["fr-FR"], found["en-GB"], found["cli"]
    assert "Quelque chose est à vérifier" in fr and "Something needs a look" in en, (fr, en)
    assert "test board : aucune mesure depuis" in fr and "Il est branché, mais rien ne passe" in fr, fr
    assert "test board: no reading for" in en and "It is plugged in, but nothing comes through" in en, en
    assert "%s : rien de branché" % absent in fr and "%s: nothing plugged in" % absent in en, (fr, en)
    assert "Tâche interne housekeeping redémarrée 1 fois" in fr, fr
    assert "Internal task housekeeping restarted 1 times" in en, en
    assert "board pb-t01       stalled: nothing received" in text, text
    assert "not plugged in, on %s" % absent in text, text
    assert "task housekeeping restarted 1 times (last: RuntimeError: injected fault)" in text, text


@pytest.mark.micropython
@pytest.mark.slow
def test_a_silent_sensor_is_still_told_after_a_hub_restart(make_hub: Callable[..., harness.Hub]) -> None:
    # Before: after a restart the hub knew nothing of a sensor that stayed silent: no alert, and
    # the page never said it again. Now its last frame and the alert still raised are read back
    # from the store: the page tells it at once, by its label, and the alert is not raised twice.
    from agent.store import Store

    hub = make_hub(1, label="Salon", settings=(
        '\n[[alert]]\nname = "board_silent"\nsignal = "silence_s"\nhigh = 3\nmin_duration_s = 0\n'))
    sims, cfg, dev = hub.sims, hub.cfg, hub.board.device_id

    def alerts(agent: Agent) -> list[tuple[str, str]]:
        reader = agent.store.reader()
        try:
            return [(d["alert"], d["state"]) for d in Store.recent_alerts(reader, 100)]
        finally:
            reader.close()

    async def first_run() -> list[tuple[str, str]]:
        async with harness.running(Agent(cfg)) as agent:
            await async_wait_for(lambda: agent.vitals.last_seen.get(dev), 90, "a frame of the board stored",
                                 lambda: agent.snapshot()["boards"])
            await asyncio.to_thread(sims[0].stop)  # the sensor falls silent, and stays so
            await async_wait_for(lambda: (dev, "board_silent") in agent.vitals.alerts.active(), 60,
                                 "the silence alert raised", lambda: agent.vitals.alerts.active())
            await async_wait_for(lambda: ("board_silent", "raised") in alerts(agent), 30, "the alert stored",
                                 lambda: alerts(agent))
        return alerts(agent)

    async def after_restart() -> dict[str, Any]:
        async with harness.running(Agent(cfg)) as agent:
            await async_wait_for(lambda: agent.tasks, 30, "the agent's tasks started")
            seen: dict[str, Any] = {"view": view(agent.snapshot())}
            turns = agent.vitals_runner.turns
            # One silence check at least (every SILENCE_CHECK_S) with the sensor still silent.
            await async_wait_for(lambda: agent.vitals_runner.turns >= turns + 2, 60, "a silence check")
            seen["alerts"] = alerts(agent)
            seen["active"] = agent.vitals.alerts.active()
        return seen

    before = asyncio.run(first_run())
    assert before.count(("board_silent", "raised")) == 1, before
    seen = asyncio.run(after_restart())
    v = seen["view"]
    assert v["level"] == "alert", v
    assert v["notices"][0]["key"] == "alert_board_silent" and v["notices"][0]["args"]["label"] == "Salon", v
    assert v["sensors"][0]["state"] == "silent" and v["sensors"][0]["heard_at"] is not None, v
    assert seen["active"] == [(dev, "board_silent")], seen
    assert seen["alerts"] == before, seen  # not raised a second time


def test_a_backend_that_refuses_every_reading_is_not_everything_working(tmp_path: Path) -> None:
    # A backend that answers every batch 400 (a FHIR server rejecting the hub's resources, say): each frame
    # was narrowed down, quarantined and counted, the outbox drained, no failure was counted (a refusal is
    # not "later"), and the patient's page said "Everything is working: readings arrive and reach the care
    # team" while none reached it.
    from tests.waiting import async_wait_for

    async def scenario() -> dict[str, Any]:
        async with harness.refused_by_a_webhook(tmp_path, "Observation.subject: unknown Patient", 6,
                                                "batch = 4\n") as (_, agent):
            await async_wait_for(lambda: agent.snapshot()["backends"][0]["refused"] == 6, 60,
                                 "every frame refused", lambda: agent.snapshot()["backends"])
            return agent.snapshot()

    snap = asyncio.run(scenario())
    b = snap["backends"][0]
    assert b["backlog"] == 0 and b["failures"] == 0 and b["refused_since"] is not None, b
    snap["sensors"] = [{"device_id": "pb-t01", "label": "Chambre", "heard_at": snap["now"]}]
    later = dict(snap, now=b["refused_since"] + DELIVERY_FAILING_S + 1)
    later["sensors"] = [{"device_id": "pb-t01", "label": "Chambre", "heard_at": later["now"] - 1}]
    v = view(later)
    assert (v["level"], v["delivery"]) == ("attention", "failing"), v
    assert {"level": "attention", "key": "delivery_refused",
            "args": {"name": "hopital", "since_at": b["refused_since"]}} in v["notices"], v["notices"]
    assert "refus" in TEXT["fr"]["delivery_refused"] and "refus" in TEXT["en"]["delivery_refused"]
    # one refusal among deliveries is no failure: a delivery since clears it
    brief = dict(later, backends=[dict(b, refused_since=None)])
    assert view(brief)["delivery"] == "ok"
