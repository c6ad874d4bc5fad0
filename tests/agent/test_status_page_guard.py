# The status page under attack from the local network: password guessing,
# half-sent requests, many open connections, and what its responses allow a
# browser to run. The real server (aiohttp behind agent.status_page) on
# loopback; other clients come from other loopback addresses (127.0.0.2...).
import asyncio
import base64
import contextlib
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import cli
from agent import config as agent_config
from agent.registry import write_private
from agent.status_page import (
    FREE_FAILURES,
    LOCKOUT_BASE_S,
    LOCKOUT_CAP_S,
    MAX_CONNECTIONS_PER_CLIENT,
    ConnectionLimits,
    StatusPage,
)
from agent.supervisor import Agent
from tests.agent import harness
from tests.waiting import async_wait_for

PASSWORD = "correct horse battery"


def _auth(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(b"hub:" + password.encode()).decode()}


async def _facts() -> dict[str, Any]:
    return {"now": time.time(), "boards": [], "sensors": [], "backends": [], "rejects": {}, "store": {"state": "ok"},
            "vitals": {"active_alerts": []}, "last_vitals": {}, "alert_rules": []}


class FakeClock:
    """Monotonic seconds moved by the test: lockouts expire without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _session(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True))


def test_wrong_passwords_make_a_client_wait_then_lock_it_out(caplog: pytest.LogCaptureFixture) -> None:
    # Before: 6,000 guesses a second on one connection, and the right password still accepted
    # after 3,000 failures.
    clock = FakeClock()

    async def scenario() -> dict[str, Any]:
        page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD, clock=clock)
        port = await page.start("127.0.0.1", 0)
        url = "http://127.0.0.1:%d/api/status" % port
        seen: dict[str, Any] = {"statuses": []}
        try:
            async with _session("127.0.0.1") as attacker, _session("127.0.0.2") as owner:
                for i in range(FREE_FAILURES + 1):
                    async with attacker.get(url, headers=_auth("guess%d" % i)) as r:
                        seen["statuses"].append(r.status)
                for i in range(200):  # a guessing run goes on: none is even looked at
                    async with attacker.get(url, headers=_auth("guess-more%d" % i)) as r:
                        seen["statuses"].append(r.status)
                async with attacker.get(url, headers=_auth(PASSWORD)) as r:
                    seen["right_while_locked"] = (r.status, r.headers.get("Retry-After"))
                async with owner.get(url, headers=_auth(PASSWORD)) as r:
                    seen["owner"] = r.status  # another client is not locked out
                seen["stats"] = page.stats()
                clock.now += LOCKOUT_BASE_S + 0.1  # the lockout ends
                async with attacker.get(url, headers=_auth(PASSWORD)) as r:
                    seen["right_after"] = r.status
                async with attacker.get(url, headers=_auth("wrong again")) as r:
                    seen["after_success"] = r.status  # a success forgot the failures
                seen["stats_after"] = page.stats()
        finally:
            await page.stop()
        return seen

    with caplog.at_level(logging.WARNING, logger="agent.status_page"):
        seen = asyncio.run(scenario())
    assert seen["statuses"][:FREE_FAILURES + 1] == [401] * (FREE_FAILURES + 1), seen
    assert set(seen["statuses"][FREE_FAILURES + 1:]) == {429}, seen
    assert seen["right_while_locked"] == (429, str(int(LOCKOUT_BASE_S) + 1)), seen
    assert seen["owner"] == 200
    stats = seen["stats"]
    assert stats["wrong_passwords"] == FREE_FAILURES + 1 and stats["lockouts"] == 1, stats
    assert stats["refused_while_locked"] == 201 and stats["locked_clients"] == 1, stats
    assert seen["right_after"] == 200 and seen["after_success"] == 401
    assert seen["stats_after"]["locked_clients"] == 0
    logged = [r.getMessage() for r in caplog.records]
    assert any("%d wrong passwords from 127.0.0.1" % (FREE_FAILURES + 1) in m and "waits 2 s" in m
               for m in logged), logged
    assert PASSWORD not in " ".join(logged) and "guess" not in " ".join(logged)


def test_lockouts_double_up_to_their_cap() -> None:
    from agent.status_page import PasswordGuard

    clock = FakeClock()
    guard = PasswordGuard(clock)
    waits = []
    for _ in range(FREE_FAILURES + 12):
        waits.append(guard.failed("10.0.0.9"))
        clock.now += guard.wait_s("10.0.0.9")  # each try after its wait
    assert waits[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert waits[FREE_FAILURES:FREE_FAILURES + 4] == [LOCKOUT_BASE_S * k for k in (1, 2, 4, 8)]
    assert waits[-1] == LOCKOUT_CAP_S and max(waits) == LOCKOUT_CAP_S


class FakePeer(asyncio.Transport):
    """A connection's transport as far as the page looks at it: the address at the other end, and
    whether it was aborted. A fake at the network's boundary: this machine gives a test one IPv6
    address (::1), not many of one /64 as a host with privacy extensions has."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.address, 50000, 0, 0) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def test_client_of_is_the_ipv4_address_or_the_ipv6_64() -> None:
    from agent.status_page import client_of

    assert client_of("192.168.1.20") == client_of("::ffff:192.168.1.20") == "192.168.1.20"
    assert client_of("2001:db8:1:2::1") == client_of("2001:db8:1:2:a:b:c:d") == "2001:db8:1:2::/64"
    assert client_of("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_of("fe80::1%eth0") == client_of("fe80::2") == "fe80::/64"
    assert client_of("") == "" and client_of("not an address") == "not an address"


def test_an_ipv6_client_rotating_its_address_in_its_64_gets_no_fresh_tries(
        caplog: pytest.LogCaptureFixture) -> None:
    # Before: the lockout was per exact address, so an IPv6 host taking a new address in its /64 for
    # each guess (privacy extensions make them at will) was never locked out; the connection cap was
    # per address too.
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from agent.status_page import _Guarded

    clock = FakeClock()
    page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD, clock=clock)

    async def served(request: web.Request) -> web.StreamResponse:
        return web.Response(text="the page")

    async def ask(address: str, password: str) -> int:
        request = make_mocked_request("GET", "/api/status", headers=_auth(password), transport=FakePeer(address))
        return (await page.guard(request, served)).status

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        seen["guesses"] = [await ask("2001:db8:1:2::%x" % (i + 1), "guess%d" % i) for i in range(FREE_FAILURES + 1)]
        seen["right_from_a_new_address"] = await ask("2001:db8:1:2:a:b:c:d", PASSWORD)
        seen["another_64"] = await ask("2001:db8:1:3::1", PASSWORD)
        seen["mapped"] = [await ask("::ffff:192.168.1.20", "guess") for _ in range(FREE_FAILURES + 1)]
        seen["same_v4"] = await ask("192.168.1.20", PASSWORD)
        limits = ConnectionLimits(max_per_client=2)
        peers = [FakePeer("2001:db8:1:2::%x" % (100 + i)) for i in range(3)] + [FakePeer("2001:db8:1:3::100")]
        for peer in peers:
            _Guarded(limits, asyncio.Protocol()).connection_made(peer)
        seen["aborted"] = [peer.aborted for peer in peers]
        return seen

    with caplog.at_level(logging.WARNING, logger="agent.status_page"):
        seen = asyncio.run(scenario())
    assert seen["guesses"] == [401] * (FREE_FAILURES + 1), seen
    assert seen["right_from_a_new_address"] == 429, seen  # the same /64: still locked out
    assert seen["another_64"] == 200, seen
    assert seen["mapped"][-1] == 401 and seen["same_v4"] == 429, seen  # ::ffff:a.b.c.d is a.b.c.d
    assert seen["aborted"] == [False, False, True, False], seen  # two connections for the /64, then refused
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "%d wrong passwords from 2001:db8:1:2::/64" % (FREE_FAILURES + 1) in logged, logged


async def _half_sent(port: int, source: str, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(data)
    await writer.drain()
    return reader, writer


def test_half_sent_requests_and_silent_connections_are_cut() -> None:
    # Before: never timed out. A complete request on the same server is answered as usual.
    async def scenario() -> dict[str, Any]:
        limits = ConnectionLimits(header_timeout_s=0.5)
        page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD, limits=limits)
        port = await page.start("127.0.0.1", 0)
        try:
            half = await _half_sent(port, "127.0.0.1", b"GET /api/status HTTP/1.1\r\nHost: hub\r\nAuthor")
            silent = await _half_sent(port, "127.0.0.1", b"")
            async with _session("127.0.0.2") as owner:
                async with owner.get("http://127.0.0.1:%d/" % port, headers=_auth(PASSWORD)) as r:
                    answered = r.status
            ends = []
            for reader, writer in (half, silent):
                async with asyncio.timeout(30):
                    ends.append(await reader.read())  # b"": the server closed it
                writer.close()
            await async_wait_for(lambda: limits.total == 0, 10, "every connection closed", lambda: limits)
            return {"answered": answered, "ends": ends, "timed_out": limits.timed_out}
        finally:
            await page.stop()

    seen = asyncio.run(scenario())
    assert seen["answered"] == 200
    assert seen["ends"] == [b"", b""] and seen["timed_out"] == 2, seen


def test_an_idle_kept_alive_connection_is_closed() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        limits = ConnectionLimits(idle_timeout_s=0.5)
        page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD, limits=limits)
        port = await page.start("127.0.0.1", 0)
        try:
            auth = _auth(PASSWORD)["Authorization"].encode()
            reader, writer = await _half_sent(port, "127.0.0.1", b"GET /api/status HTTP/1.1\r\nHost: hub\r\n"
                                              b"Authorization: " + auth + b"\r\n\r\n")
            async with asyncio.timeout(30):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                end = await reader.read()  # then nothing more is asked: closed by the server
            writer.close()
            return head.split(b"\r\n")[0], end
        finally:
            await page.stop()

    status, end = asyncio.run(scenario())
    assert status == b"HTTP/1.1 200 OK" and end == b""


def test_many_connections_from_one_client_leave_the_owner_and_pulsebridge_status_answering(tmp_path: Path) -> None:
    # Before: at 1,024 open files the owner's page and `pulsebridge status` stopped answering.
    # A real agent; one client opens 300 connections and sends half a request on each.
    pw_file = tmp_path / "status.password"
    write_private(pw_file, (PASSWORD + "\n").encode())
    port = harness.free_port()
    config = harness.write_config(tmp_path, [], "", extra=(
        'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (port, pw_file)))
    cfg = agent_config.load(config)

    async def scenario() -> dict[str, Any]:
        async with harness.running(Agent(cfg)) as agent:
            await async_wait_for(lambda: agent.status.page_port and agent.status.page is not None, 30, "the page up")
            assert agent.status.page is not None
            held = []
            for _ in range(300):
                with contextlib.suppress(OSError):
                    held.append(await _half_sent(port, "127.0.0.1", b"GET / HTTP/1.1\r\nHo"))
            limits = agent.status.page.limits
            await async_wait_for(lambda: limits.refused >= 300 - MAX_CONNECTIONS_PER_CLIENT, 30,
                                 "the excess refused", lambda: agent.status.page.stats() if agent.status.page else None)
            seen: dict[str, Any] = {"open_at_most": limits.total}
            async with _session("127.0.0.2") as owner:
                async with owner.get("http://127.0.0.1:%d/api/status" % port, headers=_auth(PASSWORD)) as r:
                    seen["owner"] = r.status
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                seen["cli"] = await asyncio.to_thread(cli.main, ["status", "--config", str(config)])
            seen["cli_text"] = out.getvalue()
            seen["stats"] = agent.status.page.stats()
            for _, w in held:
                w.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen["open_at_most"] <= MAX_CONNECTIONS_PER_CLIENT, seen
    assert seen["owner"] == 200 and seen["cli"] == 0, seen
    assert "test-hub" in seen["cli_text"], seen["cli_text"]
    assert re.search(r"status page: 0 wrong passwords, 0 lockouts \(0 clients locked now\), \d+ connections "
                     r"refused over the limits", seen["cli_text"]), seen["cli_text"]
    assert seen["stats"]["connections_refused"] >= 300 - MAX_CONNECTIONS_PER_CLIENT, seen


def test_a_flood_is_logged_as_counts_not_line_by_line(caplog: pytest.LogCaptureFixture) -> None:
    # Before: 20 MB of errors in 10 s at 1,024 open files.
    clock = FakeClock()
    limits = ConnectionLimits(max_total=8, max_per_client=2, clock=clock)
    with caplog.at_level(logging.WARNING, logger="agent.status_page"):
        assert limits.admit("10.0.0.5") and limits.admit("10.0.0.5")
        for _ in range(1000):
            assert not limits.admit("10.0.0.5")
        clock.now += 61
        assert limits.admit("10.0.0.6")  # another address is admitted
        assert not limits.admit("10.0.0.5")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("status page: 1 connections refused over the limits (2 per address, 8 in all)")
    assert lines[1].startswith("status page: 1000 connections refused"), lines
    assert limits.refused == 1001


def test_all_clients_together_are_capped() -> None:
    async def scenario() -> tuple[int, int]:
        limits = ConnectionLimits(max_total=8, max_per_client=4)
        page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD, limits=limits)
        port = await page.start("127.0.0.1", 0)
        held = []
        try:
            for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
                for _ in range(4):
                    held.append(await _half_sent(port, source, b"GET / HTTP/1.1\r\n"))
            await async_wait_for(lambda: limits.refused == 4, 10, "the 9th to 12th refused", lambda: limits)
            return limits.total, limits.refused
        finally:
            for _, w in held:
                w.close()
            await page.stop()

    assert asyncio.run(scenario()) == (8, 4)


def test_responses_allow_no_inline_script_and_show_no_version() -> None:
    async def scenario() -> dict[str, Any]:
        page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD)
        port = await page.start("127.0.0.1", 0)
        base = "http://127.0.0.1:%d/" % port
        seen: dict[str, Any] = {}
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(base) as r:
                    seen["401"] = (r.status, dict(r.headers))
                for path in ("", "static/page.js", "static/page.css", "api/status"):
                    async with s.get(base + path, headers=_auth(PASSWORD)) as r:
                        seen[path] = (r.status, dict(r.headers), await r.text())
                async with s.get(base + "static/../status_page.py", headers=_auth(PASSWORD)) as r:
                    seen["escape"] = r.status
        finally:
            await page.stop()
        return seen

    seen = asyncio.run(scenario())
    for key in ("401", "", "static/page.js", "api/status"):
        status, headers = seen[key][0], seen[key][1]
        csp = headers["Content-Security-Policy"]
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
        assert headers["Server"] == "pulsebridge", headers  # no "Python/3.x aiohttp/3.x"
        assert status in (200, 401)
    html = seen[""][2]
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), scripts
    assert "<style" not in html and " style=" not in html and "onclick" not in html
    assert seen["static/page.js"][1]["Content-Type"].startswith("application/javascript")
    assert seen["escape"] == 404


def test_malformed_requests_are_counted_not_logged_with_a_traceback_each(caplog: pytest.LogCaptureFixture) -> None:
    # Before: each request the HTTP parser refused (a header line over 8190 bytes, a header name with a
    # control character) logged "Error handling request" at ERROR with a 10-line traceback: anyone on
    # the local network, without the password, could write the hub's log at will.
    bad = [b"GET / HTTP/1.1\r\nHost: hub\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
           b"GET /api/" + b"%1b" * 3000 + b" HTTP/1.1\r\nHost: hub\r\n\r\n",
           b"GET / HTTP/1.1\r\nHo\x01st: hub\r\n\r\n"] * 10

    async def scenario() -> dict[str, Any]:
        limits = ConnectionLimits()
        page = StatusPage(_facts, lambda d, s: {"values": []}, PASSWORD, limits=limits)
        port = await page.start("127.0.0.1", 0)
        try:
            answers = []
            for request in bad:
                reader, writer = await _half_sent(port, "127.0.0.1", request)
                async with asyncio.timeout(30):
                    answers.append((await reader.read()).split(b"\r\n")[0])
                writer.close()
            async with _session("127.0.0.2") as owner:
                async with owner.get("http://127.0.0.1:%d/api/status" % port, headers=_auth(PASSWORD)) as r:
                    owner_status = r.status
            return {"answers": answers, "owner": owner_status, "stats": page.stats()}
        finally:
            await page.stop()

    with caplog.at_level(logging.DEBUG):
        seen = asyncio.run(scenario())
    assert [a.split(b" ", 1)[1] for a in seen["answers"]] == [b"400 Bad Request"] * len(bad), seen
    assert seen["owner"] == 200, seen
    assert seen["stats"]["malformed_requests"] == len(bad), seen
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in loud if r.exc_info], [r.getMessage() for r in loud]
    assert len(loud) == 1 and "1 malformed requests answered 400" in loud[0].getMessage(), \
        [r.getMessage() for r in loud]
