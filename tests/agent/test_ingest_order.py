# Store first, then the replay window (protocols/hub.py): a frame's (epoch,
# seq) is marked seen only once the store has committed it; while its commit
# waits (a storage fault), a copy of it is a duplicate in flight, stored
# once and acknowledged only after the original is stored.
import asyncio
import functools
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any
from unittest import mock

from agent.audit import AuditLog
from agent.ingest import Ingestor
from agent.registry import Registry
from agent.store import Store
from protocols import cipher, cose, hub, messages
from tests.waiting import async_wait_for

DEV = "pb-order"
KEY = bytes(range(32))


def _frame(seq: int, epoch: int = 1) -> bytes:
    f = messages.SampleFrame(epoch, seq, 1, seq * 10, seq * 4, 512, 4, (1, 1), None, (0, 0, 0, 0), [[1, 2, 3, 4]])
    sealer = cipher.SampleCipher(KEY, bytes(16))
    return cose.MacKey(KEY, DEV.encode(), cose.AAD_UPLINK).seal(messages.encoded(f, sealer=sealer))


def test_the_window_moves_only_once_the_store_commits(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    released = threading.Event()
    apply = Store._apply

    def failing_until_released(self: Store, db: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        if not released.is_set():  # an injected storage fault: the commit is retried until it passes
            raise sqlite3.OperationalError("disk I/O error")
        return apply(self, db, batch)

    async def scenario() -> None:
        ing = Ingestor(store, reg)
        stored_records: list[int] = []
        ing.on_stored = lambda f: stored_records.append(f.seq)
        with mock.patch.object(Store, "_apply", failing_until_released):
            first = ing.submit(_frame(0), "test")
            assert first.received.verdict == hub.ACCEPTED and first.stored is not None
            await async_wait_for(lambda: store.fault is not None, 30, "the commit failing")
            # Not stored: the replay window has not moved, in memory or on disk.
            assert ing.hub.window(DEV).state() == (-1, -1, 0, None)
            again = ing.submit(_frame(0), "test")  # the board resends it meanwhile
            assert again.received.verdict == hub.DUPLICATE and again.stored is not None
            assert not first.stored.done() and not again.stored.done()
            released.set()
            async with asyncio.timeout(30):
                await first.stored
                await again.stored
        assert ing.hub.window(DEV).state()[:3] == (1, 0, 1)
        assert store.load_windows()[DEV][:3] == (1, 0, 1)
        assert stored_records == [0]  # handed on once
        # Committed: a later copy is a duplicate of what is held.
        assert ing.submit(_frame(0), "test").received.verdict == hub.DUPLICATE

    try:
        asyncio.run(scenario())
        db = store.reader()
        try:
            assert db.execute("SELECT COUNT(*) FROM frames WHERE device_id=?", (DEV,)).fetchone()[0] == 1
        finally:
            db.close()
    finally:
        store.close()
        reg.close()


def test_a_reboot_while_a_frame_is_in_flight_keeps_the_newer_epoch(tmp_path: Path) -> None:
    # The board reboots (epoch 2) while its last frame of epoch 1 still waits
    # for its commit: the window ends at epoch 2 whatever order they settle in.
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()

    async def scenario() -> Ingestor:
        ing = Ingestor(store, reg)
        outs = [ing.submit(_frame(5, epoch=1), "test"), ing.submit(_frame(0, epoch=2), "test")]
        assert [o.received.verdict for o in outs] == [hub.ACCEPTED, hub.ACCEPTED]
        # An epoch 1 frame is now from an earlier boot than one in flight.
        assert ing.submit(_frame(6, epoch=1), "test").received.reason == "replay:old_epoch"
        async with asyncio.timeout(30):
            await asyncio.gather(*(o.stored for o in outs if o.stored is not None))
        return ing

    try:
        ing = asyncio.run(scenario())
        assert ing.hub.window(DEV).state()[:3] == (2, 0, 1)
        assert store.load_windows()[DEV][:3] == (2, 0, 1)
    finally:
        store.close()
        reg.close()


def test_a_session_acks_a_run_of_stored_frames_in_one_message_never_before_they_are_stored(tmp_path: Path) -> None:
    from agent.session import BoardSession, BoardStats
    from tests.agent.test_wire_v1 import FakeTransport

    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    released = threading.Event()
    holding = threading.Event()
    n = 20
    down = cose.MacKey(KEY, DEV.encode(), cose.AAD_DOWNLINK)

    def _acked(sent: list[bytes]) -> set[int]:
        return {s for a in sent for first, last in _open(down, a).ranges  # type: ignore[attr-defined]
                for s in range(first, last + 1)}

    async def scenario() -> list[messages.Message]:
        # The store's writer busy (a job that waits) while every frame is judged and queued.
        busy = asyncio.ensure_future(store.run(lambda db: (holding.set(), released.wait(30))))
        # (the writer must hold that job before the first frame comes: on a loaded machine the
        # future may not have queued it yet, and a first frame was then committed on its own)
        await async_wait_for(holding.is_set, 30, "the store's writer held busy")
        tr = FakeTransport([_frame(s) for s in range(n)])
        session = BoardSession(tr, Ingestor(store, reg), BoardStats("", tr.name))
        task = asyncio.create_task(session.run())
        try:
            await async_wait_for(lambda: session.stats.messages == n, 30, "every frame judged")
            await asyncio.sleep(0)
            assert tr.sent == [] and store.stats.commits == 0  # nothing acknowledged before it is stored
            released.set()
            await busy
            await async_wait_for(lambda: _acked(tr.sent) == set(range(n)), 30, "every frame acknowledged",
                                 lambda: sorted(_acked(tr.sent)))
        finally:
            released.set()
            task.cancel()
        return [_open(down, a) for a in tr.sent]

    try:
        acks = asyncio.run(scenario())
        commits = store.stats.commits
    finally:
        store.close()
        reg.close()
    # Stored in one commit, acknowledged in one message: seq 0 to 19 of epoch 1.
    assert commits == 1
    assert len(acks) == 1 and isinstance(acks[0], messages.Ack)
    assert (acks[0].epoch, acks[0].ranges) == (1, [(0, n - 1)])


def _open(key: cose.MacKey, raw: bytes) -> messages.Message:
    msg = cose.parse(raw)
    key.verify(msg)
    return messages.decode_payload(msg.payload, messages.DOWNLINK_TYPES)


def test_frames_judged_in_one_turn_share_one_store_job_done_once_their_windows_moved(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()

    async def scenario() -> None:
        ing = Ingestor(store, reg)
        outs = [ing.submit(_frame(s), "test") for s in range(10)]  # one turn of the loop
        futures = {id(o.stored) for o in outs}
        assert len(futures) == 1 and all(o.received.verdict == hub.ACCEPTED for o in outs)
        stored = outs[0].stored
        assert stored is not None
        windows: list[tuple[int, int, int, bytes | None]] = []
        stored.add_done_callback(lambda _: windows.append(ing.hub.window(DEV).state()))
        async with asyncio.timeout(30):
            await stored
        assert windows[0][:2] == (1, 9)  # every window moved before anyone is told (acks follow)

    try:
        asyncio.run(scenario())
        assert store.stats.commits == 1
    finally:
        store.close()
        reg.close()


class _TimedQueue(queue.SimpleQueue[Any]):
    """The writer's queue, noting each wait (how long it may last) and each take."""

    def __init__(self, log: list[tuple[str, float]]) -> None:
        super().__init__()
        self.log = log

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            self.log.append(("wait", timeout if timeout is not None else float("inf")))
        item = super().get(block, timeout)
        self.log.append(("took", 0.0))
        return item

    def get_nowait(self) -> Any:
        return self.get(False)  # SimpleQueue's own does not go through get()


def test_an_idle_writer_commits_a_lone_frame_without_waiting_for_company(tmp_path: Path) -> None:
    # Group commit: a writer that has not committed within the interval takes a frame and
    # only what is already queued (never waits on a timer for more) before committing it.
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    log: list[tuple[str, float]] = []
    store._q = _TimedQueue(log)
    apply = Store._apply

    def committing(self: Store, db: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        results = apply(self, db, batch)
        log.append(("commit", 0.0))  # on the writer's thread, in order with its waits
        return results

    store.start()
    try:
        async def scenario() -> None:
            out = Ingestor(store, reg).submit(_frame(0), "test")
            assert out.received.verdict == hub.ACCEPTED and out.stored is not None
            async with asyncio.timeout(30):
                await out.stored

        with mock.patch.object(Store, "_apply", committing):
            asyncio.run(scenario())
        store.close()
        commit = log.index(("commit", 0.0))
        took_frame = max(i for i in range(commit) if log[i][0] == "took")  # what the idle wait found
        waits_before_commit = [e for e in log[took_frame + 1:commit] if e[0] == "wait"]
        assert waits_before_commit == [], log
        assert store.stats.commits == 1
    finally:
        store.close()
        reg.close()


def test_frames_arriving_during_a_commit_make_up_the_next_one(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"])
    store.start()
    in_commit = threading.Event()
    released = threading.Event()
    batches: list[int] = []
    apply = Store._apply

    def held_commit(self: Store, db: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        batches.append(len(batch))
        in_commit.set()
        released.wait(30)  # the first commit's fsync, held while more frames arrive
        return apply(self, db, batch)

    try:
        async def scenario() -> None:
            ing = Ingestor(store, reg)
            with mock.patch.object(Store, "_apply", held_commit):
                first = ing.submit(_frame(0), "test")
                await async_wait_for(in_commit.is_set, 30, "the first frame's commit")
                later = [ing.submit(_frame(seq), "test") for seq in (1, 2, 3)]
                assert not first.stored.done()  # type: ignore[union-attr]
                released.set()
                async with asyncio.timeout(30):
                    await asyncio.gather(first.stored, *(o.stored for o in later))  # type: ignore[arg-type]

        asyncio.run(scenario())
        assert batches == [1, 3]  # the lone frame alone, then the three that queued behind it, together
        assert store.stats.commits == 2
        assert store.load_windows()[DEV][:3] == (1, 3, 0b1111)
    finally:
        store.close()
        reg.close()


def test_frames_within_the_commit_interval_wait_for_it_and_share_one_commit(tmp_path: Path) -> None:
    # Commits of board frames begin at most every commit_interval_s: a frame that comes sooner after
    # the previous commit waits out the rest of it, and what comes meanwhile shares its commit. A
    # hub-made record (a vital) does not wait for the interval (for a board frame to ride with, at
    # most JOIN_WAIT_S: none comes here). The interval is long here (60 s): only the store's close
    # ends the wait (what is held is then committed, never dropped).
    from agent.store import KIND_VITAL, PRIORITY_VITALS, Ingest

    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"], commit_interval_s=60)
    log: list[tuple[str, float]] = []
    store._q = _TimedQueue(log)
    batches: list[int] = []
    apply = Store._apply

    def recording(self: Store, db: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        batches.append(len(batch))
        return apply(self, db, batch)

    def took() -> int:
        return sum(1 for e in log if e[0] == "took")

    def holding(after: int) -> bool:  # the writer took one more job and waits out the interval (not 30 s idle)
        return took() > after and log[-1][0] == "wait" and 30.5 < log[-1][1] <= 60

    store.start()
    try:
        async def scenario() -> tuple[bool, list[int]]:
            ing = Ingestor(store, reg)
            with mock.patch.object(Store, "_apply", recording):
                first = ing.submit(_frame(0), "test")
                async with asyncio.timeout(30):  # an idle writer: at once, not after the interval
                    await first.stored  # type: ignore[misc]
                    await store.ingest(Ingest("pb-v1", -2, 1, KIND_VITAL, b"", None, priority=PRIORITY_VITALS,
                                              info={"type": "vital"}))
                later = []
                for seq in (1, 2, 3):  # one by one, each once the writer holds what came before
                    taken = took()
                    later.append(ing.submit(_frame(seq), "test"))
                    await async_wait_for(functools.partial(holding, taken), 30,
                                         "the writer holding frame %d for the interval" % seq, lambda: log[-3:])
                held = not any(o.stored.done() for o in later)  # type: ignore[union-attr]
                await asyncio.to_thread(store.close)
                async with asyncio.timeout(30):
                    await asyncio.gather(*(o.stored for o in later))  # type: ignore[arg-type]
            return held, batches

        held, batches = asyncio.run(scenario())
        assert held and batches == [1, 1, 3]  # the frame, the vital, then the three frames in one commit
        assert store.load_windows()[DEV][:3] == (1, 3, 0b1111)
    finally:
        store.close()
        reg.close()
def test_a_forwarder_s_mark_rides_with_the_next_board_frame_s_commit_while_frames_come(
        tmp_path: Path, monkeypatch: Any) -> None:
    # While board frames come, a small write nobody waits on to answer a board (a forwarder's mark of
    # what its backend took) waits for the next board frame and shares its commit: one fsync, not
    # two. JOIN_WAIT_S is long here (60 s): only the frame ends the wait. A large mark (a drain's)
    # does not wait. Before: the mark was committed alone, at once.
    from agent import store as store_mod

    monkeypatch.setattr(store_mod, "JOIN_WAIT_S", 60.0)
    monkeypatch.setattr(store_mod, "BOARDS_FLOWING_S", 60.0)
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    log: list[tuple[str, float]] = []
    store._q = _TimedQueue(log)
    batches: list[list[str]] = []
    apply = Store._apply

    def recording(self: Store, db: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        batches.append([u.kind for u in batch])
        return apply(self, db, batch)

    store.start()
    try:
        async def scenario() -> bool:
            ing = Ingestor(store, reg)
            with mock.patch.object(Store, "_apply", recording):
                first = ing.submit(_frame(0), "test")
                async with asyncio.timeout(30):
                    await first.stored  # type: ignore[misc]
                taken = sum(1 for e in log if e[0] == "took")
                mark = store.submit_delivered("b", [1])
                await async_wait_for(lambda: sum(1 for e in log if e[0] == "took") > taken and log[-1][0] == "wait"
                                     and 30.5 < log[-1][1] <= 60, 30, "the writer holding the mark", lambda: log[-3:])
                held = not mark.done()
                second = ing.submit(_frame(1), "test")
                async with asyncio.timeout(30):
                    await asyncio.gather(mark, second.stored)  # type: ignore[arg-type]
                    await store.submit_delivered("b", list(range(100, 100 + store_mod.JOIN_ROWS + 1)))
            return held

        held = asyncio.run(scenario())
        assert held
        assert batches == [["ingest"], ["delivered", "ingest"], ["delivered"]], batches
        assert store.stats.commits == 3
        assert store.load_windows()[DEV][:3] == (1, 1, 0b11)
    finally:
        store.close()
        reg.close()


def test_over_a_link_whose_acks_linger_frames_stored_meanwhile_share_one_ack(tmp_path: Path) -> None:
    # BLE (Transport.ack_linger_s): a board reads each downlink write as a new
    # object in its heap. Frames stored one by one within the linger after the
    # first are acknowledged in one message; without it the first frame's ack
    # went at once, alone.
    from agent.session import BoardSession, BoardStats
    from tests.agent.test_wire_v1 import FakeTransport

    class LingeringTransport(FakeTransport):
        ack_linger_s = 3.0

        def __init__(self) -> None:
            super().__init__([])
            self.more = asyncio.Queue[bytes]()

        async def receive(self) -> bytes:
            return await self.more.get()

    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    reg.add(DEV, key=KEY, actor="test")
    store = Store(tmp_path / "store.db", ["b"], commit_interval_s=0)
    store.start()
    down = cose.MacKey(KEY, DEV.encode(), cose.AAD_DOWNLINK)

    async def scenario() -> list[messages.Message]:
        tr = LingeringTransport()
        session = BoardSession(tr, Ingestor(store, reg), BoardStats("", tr.name))
        task = asyncio.create_task(session.run())
        try:
            for seq in range(3):  # each stored on its own before the next comes
                tr.more.put_nowait(_frame(seq))
                await async_wait_for(lambda n=seq + 1: store.stats.commits == n, 30, "frame %d stored" % seq)
            await async_wait_for(lambda: tr.sent, 30, "an ack")
        finally:
            task.cancel()
        return [_open(down, a) for a in tr.sent]

    try:
        acks = asyncio.run(scenario())
    finally:
        store.close()
        reg.close()
    assert len(acks) == 1 and isinstance(acks[0], messages.Ack), acks
    assert acks[0].ranges == [(0, 2)], acks[0].ranges
