# Storage faults (issue 12): a full disk on a real small file system, a frame
# the store refuses among other boards' frames, a frame at the uint64 edge.
import asyncio
import contextlib
import errno
import os
import secrets
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import store as store_mod
from agent.audit import AuditLog
from agent.ingest import Ingestor
from agent.registry import Registry
from agent.status_server import read_status
from agent.store import Ingest, Store, StoreError
from protocols import cipher, cose, messages
from tests.conftest import IN_CI


def _item(seq: int, dev: str = "pb-a", raw_size: int = 2000, t0_ms: int | None = None) -> Ingest:
    return Ingest(dev, 1, seq, 1, os.urandom(raw_size), (1, seq, 1), stream=1,
                  t0_ms=seq * 1000 if t0_ms is None else t0_ms, first_index=seq * 512, count=512)


@contextlib.contextmanager
def small_filesystem(where: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of size_kb mounted at where: a disk that really fills up."""
    if os.geteuid() != 0:
        msg = "mounting a small tmpfs needs root"
        if IN_CI:
            pytest.fail(msg + "; CI runs as root")
        pytest.skip(msg)
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dk,mode=0700" % size_kb, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(path: Path) -> None:
    """Writes path until its file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_disk_full_holds_acks_then_ingest_resumes_by_itself(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "card", 4096) as card:
        # Only the fault here, not the free-space policy.
        s = Store(card / "store.db", ["b"], min_free_bytes=0, commit_interval_s=0)
        s.start()

        async def go() -> None:
            await asyncio.gather(*(s.ingest(_item(i)) for i in range(20)))
            fill(card / "filler")
            futs = [s.submit_ingest(_item(i)) for i in range(20, 420)]
            # The disk is full: the store holds the batch and says so; nobody is acked.
            async with asyncio.timeout(30):
                while s.fault is None:
                    await asyncio.sleep(0.02)
            assert "full" in s.fault, s.fault
            assert s.status()["state"] == "fault"
            assert not all(f.done() for f in futs)
            assert not any(f.done() and f.exception() is not None for f in futs)
            (card / "filler").unlink()  # space is back: ingest resumes with no one's help
            async with asyncio.timeout(60):
                await asyncio.gather(*futs)

        try:
            asyncio.run(go())
            assert s.fault is None and s.status()["state"] == "ok"
            assert s.stats.commit_failures > 0 and s.stats.faults_recovered >= 1
            db = s.reader()
            assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 420  # every acked frame stored
            db.close()
            assert s.integrity_check() == "ok"
        finally:
            s.close()


def test_a_store_on_a_full_card_is_read_as_it_stands_holds_every_write_and_opens_by_itself(tmp_path: Path) -> None:
    # A store closed cleanly (no WAL left), then the card full: it could not be opened at all
    # ("disk I/O error": no room for the -shm file). Now it is read as it stands, every write is held
    # (nothing acknowledged), and the writer opens it for writing once there is room; the look-ups'
    # reader then sees what is committed after.
    with small_filesystem(tmp_path / "card", 2048) as card:
        s = Store(card / "store.db", ["b"], min_free_bytes=0, commit_interval_s=0)
        s.start()
        asyncio.run(s.ingest(_item(0)))
        s.close()
        fill(card / "filler")
        with pytest.raises((StoreError, sqlite3.OperationalError)):
            Store(card / "store.db", ["b"]).open()  # as every command but the agent opens it: refused
        s = Store(card / "store.db", ["b"], min_free_bytes=0, commit_interval_s=0)
        s.open(read_only_if_unwritable=True)
        try:
            assert s.read_only and s.fault and "disk is full" in s.fault and s.status()["state"] == "fault"
            assert s.held_raw("pb-a", 1, 0) is not None and s.load_windows() == {"pb-a": (1, 0, 1, None)}
            s.start()

            async def go() -> None:
                fut = s.submit_ingest(_item(1, raw_size=100))
                tried = s.stats.commit_failures
                async with asyncio.timeout(30):  # the writer tries again with its job waiting
                    while s.stats.commit_failures < tried + 2:
                        await asyncio.sleep(0.02)
                assert not fut.done() and s.read_only  # held, not failed, while the card is full
                (card / "filler").unlink()
                async with asyncio.timeout(60):
                    await fut

            asyncio.run(go())
            assert s.writable and s.fault is None and s.stats.faults_recovered == 1
            assert s.held_raw("pb-a", 1, 1) is not None  # a live reader now, not the file as it stood
            db = s.reader()
            assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 2
            db.close()
        finally:
            s.close()


def test_store_makes_room_before_the_file_system_is_full(tmp_path: Path) -> None:
    # No quota to speak of: only the file system's free space (statvfs) limits the store.
    with small_filesystem(tmp_path / "card", 6144) as card:
        s = Store(card / "store.db", ["b"], quota_bytes=1 << 30, min_free_bytes=1 << 20, wal_limit_bytes=512 << 10,
                  commit_interval_s=0)
        s.start()
        try:
            async def go() -> None:
                for first in range(0, 3000, 20):  # ~6 MB of frames through a 6 MB file system
                    await asyncio.gather(*(s.ingest(_item(i)) for i in range(first, first + 20)))

            s.gap_settle_s = 0
            asyncio.run(go())
            asyncio.run(s.run(s.scan_gaps))  # what the store dropped is not reported twice
            assert s.stats.commit_failures == 0  # never full
            db = s.reader()
            counters = Store.counters(db)
            assert counters.get("free_space_dropped", 0) > 0
            kept = {r[0] for r in db.execute("SELECT seq FROM frames WHERE kind=1")}
            gaps = [r.info for r in Store.fetch_outbox(db, "b", 10000) if r.kind == store_mod.KIND_GAP]
            lost = {seq for g in gaps if g for a, b in g["seq_ranges"] for seq in range(a, b + 1)}
            assert lost and lost == set(range(3000)) - kept  # each frame dropped is in a gap record
            assert {g["reason"] for g in gaps if g} == {"disk_free"}
            db.close()
        finally:
            s.close()


def test_a_card_short_of_space_loses_nothing_a_live_backend_takes(tmp_path: Path) -> None:
    # 12 MB free: less than the free-space policy's reserve (8 MB) and the WAL
    # (4 MB). A backend one batch behind, as a live one is. Before: every frame
    # was deleted before delivery (1000 of 1000), with "store ok" in the status.
    with small_filesystem(tmp_path / "card", 12288) as card:
        s = Store(card / "store.db", ["b"], commit_interval_s=0)
        s.start()
        db = s.reader()
        try:
            pending: set[int] = set()
            for first in range(0, 1000, 10):
                asyncio.run(_ingest_all(s, [_item(i) for i in range(first, first + 10)]))
                rows = Store.fetch_outbox(db, "b", 1000)
                asyncio.run(s.delivered("b", [r.id for r in rows if r.id in pending]))
                pending = {r.id for r in rows}
            counters = Store.counters(db)
            assert counters.get("free_space_dropped", 0) > 0  # short of space: delivered frames made way
            assert s.stats.dropped_undelivered == 0 and s.status()["short_of_space"] is None
            assert not [r for r in Store.fetch_outbox(db, "b", 1000) if r.kind == store_mod.KIND_GAP]
            assert len(Store.fetch_outbox(db, "b", 1000)) == 10  # only the last batch still waits
        finally:
            db.close()
            s.close()


async def _ingest_all(s: Store, items: list[Ingest]) -> None:
    await asyncio.gather(*(s.ingest(i) for i in items))


def test_a_frame_the_store_refuses_is_quarantined_alone(tmp_path: Path) -> None:
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    gate = threading.Event()
    try:
        async def go() -> list[Any]:
            # Hold the writer so that every frame below lands in one group commit.
            held = asyncio.ensure_future(s.run(lambda db: gate.wait(10)))
            await asyncio.sleep(0)
            items = [_item(i, dev) for i in range(10) for dev in ("pb-a", "pb-b", "pb-c")]
            items.insert(13, _item(10, "pb-x", t0_ms=2**64 - 1))  # SQLite stores signed 64 bits
            futs = [s.submit_ingest(i) for i in items]
            gate.set()
            await held
            return list(await asyncio.gather(*futs, return_exceptions=True))

        results = asyncio.run(go())
        assert results.count(store_mod.QUARANTINED) == 1
        assert results[13] == store_mod.QUARANTINED
        assert all(r is None for i, r in enumerate(results) if i != 13)  # every other board's frame stored
        db = s.reader()
        assert db.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 30
        (reason, dev, raw), = db.execute("SELECT reason, device_id, raw FROM quarantine").fetchall()
        assert (reason, dev, len(raw)) == ("store_refused:OverflowError", "pb-x", 2000)
        assert s.load_windows()["pb-x"] == (1, 10, 1, None)  # held as seen: its resend is a duplicate
        assert s.stats.refused == 1 and s.status()["refused"] == 1
    finally:
        s.close()


def test_uint64_edge_frame_among_other_boards_frames(tmp_path: Path) -> None:
    # An authentic frame whose t0_ms SQLite cannot hold, sent among two other
    # boards' frames: refused alone (reason range), the others acked and stored.
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    keys = {d: secrets.token_bytes(32) for d in ("pb-a", "pb-b", "pb-x")}
    for d, k in keys.items():
        reg.add(d, key=k, actor="test")
    s = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    s.start()
    try:
        def frame(dev: str, seq: int, t0_ms: int) -> bytes:
            f = messages.SampleFrame(1, seq, messages.STREAM_ECG_MAX30003, t0_ms, seq * 4, 512, 4, (1, 1), None,
                                     (0, 0, 0, 0), [[1, 2, 3, 4]])
            k = keys[dev]
            return cose.MacKey(k, dev.encode(), cose.AAD_UPLINK).seal(
                messages.encoded(f, sealer=cipher.SampleCipher(k, bytes(16))))

        async def go() -> list[Any]:
            ing = Ingestor(s, reg)
            outs = []
            for seq in range(5):
                outs.append(ing.submit(frame("pb-a", seq, 1000 + seq), "a"))
                if seq == 2:
                    outs.append(ing.submit(frame("pb-x", 0, 2**64 - 1), "x"))
                    outs.append(ing.submit(frame("pb-x", 1, 2**63), "x"))
                outs.append(ing.submit(frame("pb-b", seq, 1000 + seq), "b"))
            await asyncio.gather(*(o.stored for o in outs if o.stored is not None))
            return outs

        outs = asyncio.run(go())
        verdicts = [(o.received.device_id, o.received.reason, bool(o.acks)) for o in outs]
        assert verdicts.count(("pb-x", "malformed:range", False)) == 2
        assert sum(1 for d, _, acked in verdicts if d != "pb-x" and acked) == 10
        db = s.reader()
        assert db.execute("SELECT COUNT(*) FROM frames WHERE device_id != 'pb-x'").fetchone()[0] == 10
        assert db.execute("SELECT COUNT(*) FROM quarantine WHERE device_id='pb-x'").fetchone()[0] == 2
        db.close()
    finally:
        s.close()
        reg.close()


@pytest.mark.micropython
@pytest.mark.slow
def test_disk_full_with_the_real_agent_and_boards(make_hub: Callable[..., Any], tmp_path: Path) -> None:
    # The agent's data directory on a 24 MB tmpfs, two simulated boards, an
    # HTTPS backend. The card fills up (another writer), then space returns.
    from agent.supervisor import Agent
    from tests.agent import harness
    from tests.agent.test_links import _figures, _until

    with small_filesystem(tmp_path / "card", 24 * 1024) as card:
        hub = make_hub(2, webhook=True, data_dir=card)
        sims = hub.sims

        async def scenario() -> dict[str, Any]:
            async with harness.running(Agent(hub.cfg)) as agent:
                await _until(lambda: all(len(harness.acked(s)) >= 3 for s in sims), 60,
                             lambda: agent.snapshot()["boards"])
                await asyncio.to_thread(fill, card / "filler")
                await _until(lambda: agent.snapshot()["store"]["state"] == "fault", 60,
                             lambda: agent.snapshot()["store"])
                during = agent.snapshot()["store"]
                held_acks = [len(harness.acked(s)) for s in sims]
                await _until(lambda: agent.store.stats.commit_failures >= 5, 60, lambda: agent.snapshot()["store"])
                stuck = [len(harness.acked(s)) for s in sims]
                (card / "filler").unlink()  # space is back
                await _until(lambda: agent.snapshot()["store"]["state"] == "ok"
                             and all(len(harness.acked(s)) > n + 3 for s, n in zip(sims, stuck)), 60,
                             lambda: (agent.snapshot()["store"], agent.snapshot()["boards"]))
                await harness.finish(agent, sims, 60)
            return {"during": during, "held": held_acks, "stuck": stuck}

        seen = asyncio.run(scenario())
        acked, delivered, lost = _figures(hub)
        print("disk full then space back: acknowledged %d, delivered %d, lost %d; acks while full %s -> %s" % (
            acked, delivered, lost, seen["held"], seen["stuck"]))
        assert "full" in seen["during"]["fault"]
        assert lost == 0 and acked > 0


@pytest.mark.micropython
@pytest.mark.slow
def test_status_page_and_cli_tell_a_full_disk(make_hub: Callable[..., Any], tmp_path: Path) -> None:
    # The truth in both places while the card is full: the page (French and English) and `pulsebridge status`.
    import contextlib
    import io

    from playwright.async_api import async_playwright

    from agent import cli
    from agent.registry import write_private
    from agent.supervisor import Agent
    from tests.agent import harness
    from tests.agent.test_links import _until
    from tests.agent.test_status_page import LAUNCH_ARGS, _chromium, _has_class, _until_page

    chromium = _chromium()
    with small_filesystem(tmp_path / "card", 24 * 1024) as card:
        pw_file = tmp_path / "status.password"
        write_private(pw_file, b"correct horse battery\n")
        port = harness.free_port()
        hub = make_hub(1, data_dir=card, settings=(
            'status_page_listen = "127.0.0.1:%d"\nstatus_page_password_file = "%s"\n' % (port, pw_file)))
        sims, config = hub.sims, hub.config_path

        async def scenario() -> dict[str, str]:
            async with harness.running(Agent(hub.cfg)) as agent:
                await _until(lambda: len(harness.acked(sims[0])) >= 2, 60, lambda: agent.snapshot()["boards"])
                await asyncio.to_thread(fill, card / "filler")
                await _until(lambda: agent.snapshot()["store"]["state"] == "fault", 60,
                             lambda: agent.snapshot()["store"])
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
                        await _until_page(page, lambda pg: _has_class(pg, "level-attention"), 30,
                                          "the page telling the full card")
                        found[locale] = (await page.text_content("#status")) or ""
                        await ctx.close()
                    await browser.close()
                (card / "filler").unlink()
                await _until(lambda: agent.snapshot()["store"]["state"] == "ok", 60, lambda: agent.snapshot()["store"])
            return found

        found = asyncio.run(scenario())
        assert "carte mémoire est peut-être pleine" in found["fr-FR"], found["fr-FR"]
        assert "memory card may be full" in found["en-GB"], found["en-GB"]
        assert "store FAULT for" in found["cli"] and "disk is full" in found["cli"], found["cli"]


@pytest.mark.micropython
@pytest.mark.slow
def test_an_agent_restarted_on_a_full_card_serves_says_so_and_resumes_by_itself(
        make_hub: Callable[..., Any], tmp_path: Path) -> None:
    # A clean stop (the WAL and its -shm file removed), then the card fills and the agent starts
    # again, as after a power cut on a full card. Before: it could not open its registry (no room
    # for the -shm file every WAL reader maps: "disk I/O error") and did not run at all.
    from agent import status_text
    from agent.supervisor import Agent
    from tests.agent import harness
    from tests.agent.test_links import _figures, _until

    with small_filesystem(tmp_path / "card", 8 * 1024) as card:
        hub = make_hub(1, webhook=True, data_dir=card)
        sim = hub.board

        async def first_run() -> None:
            async with harness.running(Agent(hub.cfg)) as agent:
                await _until(lambda: len(harness.acked(sim)) >= 3, 60, lambda: agent.snapshot()["boards"])

        asyncio.run(first_run())
        assert not any(Path(str(card / name) + "-shm").exists() for name in ("store.db", "registry.db"))
        fill(card / "filler")

        async def on_the_full_card() -> dict[str, Any]:
            async with harness.running(Agent(hub.cfg)) as agent:
                snap = await read_status(hub.cfg.status_socket)  # what `pulsebridge status` prints from
                assert agent.store.read_only and snap["store"]["state"] == "fault", snap["store"]
                held = len(harness.acked(sim))
                # the board is read (its frames verified and held) while nothing is acknowledged
                await _until(lambda: harness.board_state(agent, sim.device_id).get("frames", 0) >= 3, 60,
                             lambda: agent.snapshot()["boards"])
                board = harness.board_state(agent, sim.device_id)
                words = status_text.board_state(board, snap["store"])
                assert len(harness.acked(sim)) == held
                (card / "filler").unlink()  # space is back: no one's help needed
                await _until(lambda: agent.store.writable and agent.snapshot()["store"]["state"] == "ok"
                             and len(harness.acked(sim)) > held + 3, 60,
                             lambda: (agent.snapshot()["store"], agent.snapshot()["boards"]))
                await harness.finish(agent, hub.sims, 60)
            return {"store": snap["store"], "words": words}

        seen = asyncio.run(on_the_full_card())
        lines = status_text.store_lines(seen["store"], time.time())
        assert "store FAULT for" in lines[0] and "disk is full" in lines[0], lines
        assert seen["words"] == status_text.HELD_WORDS, seen["words"]
        acked, delivered, lost = _figures(hub)
        assert lost == 0 and acked > 0, (acked, delivered, lost)


@pytest.mark.micropython
@pytest.mark.slow
def test_a_store_fault_keeps_the_boards_sessions_open_and_reading(
        make_hub: Callable[..., Any], tmp_path: Path) -> None:
    # A store fault is not a stalled board. Before: the session ended "stalled" ("a frame waited
    # N s to be stored and acknowledged") every stall_s and was reopened, and while its pipeline
    # was full the hub stopped reading the board's port. Now the session stays open and reads on,
    # frames beyond the pipeline heard but left on the board, and it resumes once space is back.
    from agent import status_text
    from agent.cli import _board_line
    from agent.supervisor import Agent
    from tests.agent import harness
    from tests.agent.test_links import _figures, _until

    stall_s = 2.0  # the watchdog's bound, short for the test (20 s in service)
    with small_filesystem(tmp_path / "card", 24 * 1024) as card:
        hub = make_hub(1, webhook=True, data_dir=card)
        sim = hub.board

        async def scenario() -> dict[str, Any]:
            agent = Agent(hub.cfg)
            agent.links.stall_s = stall_s
            async with harness.running(agent):
                await _until(lambda: len(harness.acked(sim)) >= 3, 60, lambda: agent.snapshot()["boards"])
                before = harness.board_state(agent, sim.device_id)
                await asyncio.to_thread(fill, card / "filler")
                await _until(lambda: agent.snapshot()["store"]["state"] == "fault", 60,
                             lambda: agent.snapshot()["store"])
                held = len(harness.acked(sim))
                # past a full pipeline the port is still read; the fault outlasts the stall bound 4 times
                await _until(lambda: harness.board_state(agent, sim.device_id).get("held_back", 0) >= 5
                             and time.time() - (agent.snapshot()["store"]["fault_since"] or 0) > 4 * stall_s, 120,
                             lambda: (agent.snapshot()["store"], agent.snapshot()["boards"]))
                snap = agent.snapshot()
                during = harness.board_state(agent, sim.device_id)
                acked_during = len(harness.acked(sim))
                (card / "filler").unlink()  # space is back
                await _until(lambda: agent.snapshot()["store"]["state"] == "ok"
                             and len(harness.acked(sim)) > held + 3, 60,
                             lambda: (agent.snapshot()["store"], agent.snapshot()["boards"]))
                await harness.finish(agent, hub.sims, 60)
            return {"before": before, "during": during, "store": snap["store"], "held": held,
                    "acked_during": acked_during, "link_ends": snap["link_ends"]}

        seen = asyncio.run(scenario())
        during = seen["during"]
        assert "stalled" not in seen["link_ends"] and during["connects"] == seen["before"]["connects"], seen
        assert status_text.board_state(during, seen["store"]) == status_text.HELD_WORDS, during
        assert "frames left on the board while the store could take no more" in _board_line(during, seen["store"])
        assert seen["acked_during"] == seen["held"], seen  # nothing acknowledged that was not stored
        acked, delivered, lost = _figures(hub)
        assert lost == 0 and acked > 0, (acked, delivered, lost)


@pytest.mark.micropython
@pytest.mark.slow
def test_a_board_whose_outbox_overflows_during_a_store_fault_is_shown_dropping(
        make_hub: Callable[..., Any], tmp_path: Path) -> None:
    # The board's outbox is bounded (its RAM): a store fault that outlasts it makes the board drop
    # its oldest frames, counted in every frame it sends. The hub shows the count while the fault
    # lasts (frames heard, not taken, still carry it); before, it was in no status at all.
    from agent.cli import _board_line
    from agent.supervisor import Agent
    from tests.agent import harness
    from tests.agent.test_links import _until

    with small_filesystem(tmp_path / "card", 24 * 1024) as card:
        # a ring of 8 kB, a few seconds of frames: it overflows soon once nothing is acknowledged
        hub = make_hub(1, webhook=True, data_dir=card, extra={"outbox_bytes": 8192})
        sim = hub.board

        async def scenario() -> dict[str, Any]:
            async with harness.running(Agent(hub.cfg)) as agent:
                await _until(lambda: len(harness.acked(sim)) >= 3, 60, lambda: agent.snapshot()["boards"])
                await asyncio.to_thread(fill, card / "filler")
                await _until(lambda: harness.board_state(agent, sim.device_id).get("board_dropped", 0) > 0, 120,
                             lambda: (agent.snapshot()["store"], agent.snapshot()["boards"]))
                snap = agent.snapshot()
                (card / "filler").unlink()
                await _until(lambda: agent.snapshot()["store"]["state"] == "ok", 60, lambda: agent.snapshot()["store"])
                await harness.finish(agent, hub.sims, 60)
            return snap

        snap = asyncio.run(scenario())
        assert snap["store"]["state"] == "fault", snap["store"]
        board = harness.board_state_in(snap, sim.device_id)
        assert "frames dropped by the board unacknowledged" in _board_line(board, snap["store"]), board
