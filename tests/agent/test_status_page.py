# The hub's status page in a real headless browser (Debian's Chromium driven
# by Playwright) against a running agent with a simulated board.
import asyncio
import base64
import contextlib
import io
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from agent import config as agent_config
from agent.registry import write_private
from agent.supervisor import Agent
from tests.agent import harness
from tests.conftest import IN_CI
from tests.waiting import async_wait_for

CHROMIUM = "/usr/bin/chromium"


def _chromium() -> str:
    if not os.path.exists(CHROMIUM):
        msg = "Debian's chromium is not installed (./run tests installs it)"
        if IN_CI:
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    return CHROMIUM

# Inked pixels on the status page's ECG canvas: the waveform is drawn.
_ECG_INK = """() => {
    const c = document.querySelector('canvas.ecg'); const d = c.getContext('2d')
      .getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""


@pytest.mark.micropython
def test_status_page_live_in_chromium(micropython: str, tmp_path: Path) -> None:
    chromium = _chromium()
    from playwright.async_api import async_playwright

    sims = harness.start_boards(tmp_path, 1, micropython)
    pw_file = tmp_path / "status.password"
    write_private(pw_file, b"correct horse battery\n")
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        port = harness.free_port()
        cfg = agent_config.load(harness.write_config(tmp_path, sims, "", extra=(
            'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (port, pw_file))))

        async def scenario() -> dict[str, object]:
            agent = Agent(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await async_wait_for(lambda: "heart_rate" in agent.last_vitals.get("pb-t01", {}), 90,
                                 "the board's first heart rate", lambda: agent.snapshot()["boards"])
            url = "http://127.0.0.1:%d/" % port
            async with aiohttp.ClientSession() as s:  # no password, no page
                async with s.get(url) as r:
                    assert r.status == 401
                bad = {"Authorization": "Basic " + base64.b64encode(b"hub:wrong").decode()}
                async with s.get(url, headers=bad) as r:
                    assert r.status == 401
            found: dict[str, object] = {}
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chromium, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run"])
                for locale, ok_text in (("fr-FR", "Tout fonctionne."), ("en-GB", "Everything is working.")):
                    ctx = await browser.new_context(locale=locale, viewport={"width": 390, "height": 844},
                                                    http_credentials={"username": "hub",
                                                                      "password": "correct horse battery"})
                    page = await ctx.new_page()
                    await page.goto(url)
                    # Polled from here: the page's Content-Security-Policy forbids the
                    # eval that wait_for_function's string predicates need.
                    for _ in range(100):
                        if len((await page.text_content("#summary")) or "") > 2:
                            break
                        await page.wait_for_timeout(100)
                    # Live updates until the waveform is drawn: inked pixels on the ECG canvas.
                    end = time.monotonic() + 30
                    while await page.evaluate(_ECG_INK) <= 200 and time.monotonic() < end:
                        await page.wait_for_timeout(100)
                    found[locale] = await page.text_content("#summary")
                    found[locale + ":ok"] = ok_text
                    found[locale + ":body"] = await page.text_content("body")
                    # The waveform is drawn: count inked pixels on the ECG canvas.
                    found[locale + ":ink"] = await page.evaluate(_ECG_INK)
                    shot = Path(os.environ.get("PULSEBRIDGE_SCREENSHOTS", str(tmp_path))) / ("status-%s.png" % locale)
                    await page.screenshot(path=str(shot), full_page=True)
                    found[locale + ":shot"] = shot.stat().st_size
                    await ctx.close()
                await browser.close()
            stop.set()
            await task
            return found

        found = asyncio.run(scenario())
        for locale in ("fr-FR", "en-GB"):
            assert found[locale] == found[locale + ":ok"], found[locale]
            assert int(found[locale + ":ink"]) > 200, found  # type: ignore[call-overload]
            assert int(found[locale + ":shot"]) > 10_000  # type: ignore[call-overload]
        assert "pb-t01" in str(found["fr-FR:body"]) and "Fréquence cardiaque" in str(found["fr-FR:body"])
        assert "Heart rate" in str(found["en-GB:body"])
    finally:
        for s in sims:
            s.stop()


@pytest.mark.micropython
@pytest.mark.slow
def test_status_page_and_cli_tell_stalled_unplugged_and_restarted(micropython: str, tmp_path: Path) -> None:
    # A board whose firmware hangs (stalled), a configured port with nothing
    # plugged in, and a task that crashed once: the page (French and
    # English) and `pulsebridge status` say so, in plain words.
    chromium = _chromium()
    from playwright.async_api import async_playwright

    from agent import cli

    sims = harness.start_boards(tmp_path, 1, micropython)
    board = sims[0]
    pw_file = tmp_path / "status.password"
    write_private(pw_file, b"correct horse battery\n")
    absent = tmp_path / "ttyACM9"
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        port = harness.free_port()
        config = harness.write_config(tmp_path, sims, "", extra=(
            'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n\n[[serial]]\nport = "%s"\n'
            % (port, pw_file, absent)))
        cfg = agent_config.load(config)

        async def scenario() -> dict[str, str]:
            agent = Agent(cfg)
            agent.links.stall_s, agent.links.identify_s = 2.0, 2.0
            housekeeping = agent._housekeeping
            crashes = [1]

            async def flaky() -> None:  # fault injection: one crash
                if crashes:
                    crashes.pop()
                    raise RuntimeError("injected fault")
                await housekeeping()

            agent._housekeeping = flaky  # type: ignore[method-assign]
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))

            def state(dev: str) -> str:
                return next((b["state"] for b in agent.snapshot()["boards"] if b["device_id"] == dev), "")

            await async_wait_for(lambda: state(board.device_id) == "connected", 60, "the board connected",
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
                browser = await p.chromium.launch(executable_path=chromium, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run"])
                for locale in ("fr-FR", "en-GB"):
                    ctx = await browser.new_context(locale=locale, http_credentials={
                        "username": "hub", "password": "correct horse battery"})
                    page = await ctx.new_page()
                    await page.goto("http://127.0.0.1:%d/" % port)
                    for _ in range(100):
                        if "board1" in await page.content() and len((await page.text_content("#tasks")) or "") > 2:
                            break
                        await page.wait_for_timeout(100)
                    found[locale] = (await page.text_content("body")) or ""
                    await ctx.close()
                await browser.close()
            os.killpg(board.proc.pid, signal.SIGCONT)
            stop.set()
            await task
            return found

        found = asyncio.run(scenario())
        fr, en, text = found["fr-FR"], found["en-GB"], found["cli"]
        assert "À vérifier : 2" in fr and "Needs a look: 2" in en, (fr, en)
        assert "branché, mais plus rien ne nous parvient" in fr and "non branché" in fr, fr
        assert "plugged in, but nothing is coming through" in en and "not plugged in" in en, en
        assert "Tâche interne housekeeping redémarrée 1 fois" in fr, fr
        assert "Internal task housekeeping restarted 1 times" in en, en
        assert "board pb-t01       stalled: nothing received" in text, text
        assert "not plugged in, on %s" % absent in text, text
        assert "task housekeeping restarted 1 times (last: RuntimeError: injected fault)" in text, text
    finally:
        for s in sims:
            s.stop()
