"""BLE cases: real boards with --ble ADDRESS (through BlueZ), else simulated
boards on the software radio. Each connects as the hub does (bleak, MTU,
subscribe, reassemble, verify, acknowledge) and counts every sample."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from bleak import BleakClient, BleakScanner

from agent.dev.sim.runner import SimulatedBoard
from agent.ingest import Volatile
from agent.session import BoardSession, BoardStats
from agent.transports.ble import BleTransport
from hil_tests.conftest import BleBench, assert_nothing_lost, unaccounted_loss
from protocols import hub
from tests.waiting import async_wait_for

SECONDS = 10.0


def _hub(bench: BleBench) -> hub.Hub:
    h = hub.Hub()
    for dev, key in bench.keys.items():
        h.add_device(dev, key)
    return h


async def _transport(bench: BleBench, address: str) -> BleTransport:
    dev = await BleakScanner.find_device_by_address(address, timeout=20, backend=bench.scanner_cls,
                                                    **bench.scanner_args)
    if dev is None:
        pytest.fail("%s is not advertising (is it provisioned for BLE, powered, in range?)" % address)
    t = BleTransport(dev, backend=bench.client_cls)
    await t.open()
    return t


async def _stream(bench: BleBench, address: str, h: hub.Hub, stats: BoardStats, seconds: float,
                  frames: int) -> BleTransport:
    """Streams for `seconds` at least (the case's length), until `frames` are verified
    and every hole in the samples is filled (what a board resends arrives later)."""
    t = await _transport(bench, address)
    task = asyncio.create_task(BoardSession(t, Volatile(h), stats).run())
    t0 = time.monotonic()
    try:
        await async_wait_for(lambda: (time.monotonic() - t0 >= seconds and stats.frames >= frames
                                      and unaccounted_loss(_sim(bench, stats), stats) == 0),
                             seconds + 120, "%d frames verified from %s, no hole" % (frames, address),
                             lambda: (stats.frames, stats.samples_missing(), stats.fifo_lost))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return t


def _sim(bench: BleBench, stats: BoardStats) -> SimulatedBoard | None:
    return next((s for s in bench.sims if s.device_id == stats.device_id), None)


def _values(stats: BoardStats) -> int:
    # Sample values received: a PPG sample is a red and an IR value.
    return sum(n * (2 if "ppg" in name else 1) for name, n in stats.samples_received().items())


def test_ble_connect_and_stream(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    stats = BoardStats("", "ble:" + ble_bench.addresses[0])
    t0 = time.monotonic()
    t = asyncio.run(_stream(ble_bench, ble_bench.addresses[0], _hub(ble_bench), stats, SECONDS, int(SECONDS * 0.6)))
    figures.update(board=stats.device_id, firmware=stats.firmware, mtu=t.mtu,
                   frames_per_s=round(stats.frames / (time.monotonic() - t0), 2),
                   att_bytes_per_sample_value=round(t.fragment_bytes / max(1, _values(stats)), 3))
    assert not stats.rejects, stats.rejects
    assert_nothing_lost(_sim(ble_bench, stats), stats)


def test_ble_reconnect_loses_nothing(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    h = _hub(ble_bench)
    stats = BoardStats("", "ble:" + ble_bench.addresses[0])

    async def run() -> float:
        await _stream(ble_bench, ble_bench.addresses[0], h, stats, SECONDS / 2, 3)  # closes: the hub leaves
        before = stats.frames
        t0 = time.monotonic()
        t = await _transport(ble_bench, ble_bench.addresses[0])
        task = asyncio.create_task(BoardSession(t, Volatile(h), stats).run())
        try:
            await async_wait_for(lambda: stats.frames > before, 60, "a frame after reconnecting")
            took = time.monotonic() - t0
            # What was in flight when the hub left comes again: the two connections leave no hole.
            await async_wait_for(lambda: unaccounted_loss(_sim(ble_bench, stats), stats) == 0, 60,
                                 "the hole filled", lambda: (stats.samples_missing(), stats.fifo_lost))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return took

    took = asyncio.run(run())
    figures.update(reconnect_to_first_frame_s=round(took, 2), frames=stats.frames)
    assert_nothing_lost(_sim(ble_bench, stats), stats)


def test_ble_several_boards_at_once(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    if len(ble_bench.addresses) < 2:
        pytest.skip("needs two or more boards: pass --ble ADDRESS once per board")
    h = _hub(ble_bench)
    stats = [BoardStats("", "ble:" + a) for a in ble_bench.addresses]

    async def run() -> None:
        await asyncio.gather(*(_stream(ble_bench, a, h, st, SECONDS, int(SECONDS * 0.6))
                               for a, st in zip(ble_bench.addresses, stats)))

    t0 = time.monotonic()
    asyncio.run(run())
    figures.update(boards=len(stats), frames_per_s=round(sum(s.frames for s in stats) / (time.monotonic() - t0), 2))
    for st in stats:
        assert_nothing_lost(_sim(ble_bench, st), st)


def test_ble_pairing_for_standard_apps(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    if ble_bench.kind != "hardware":
        pytest.skip("pairing (LE Secure Connections) needs a real board and BlueZ: pass --ble ADDRESS")

    async def run() -> bytes:
        got: asyncio.Queue[bytes] = asyncio.Queue()
        dev = await BleakScanner.find_device_by_address(ble_bench.addresses[0], timeout=20, **ble_bench.scanner_args)
        assert dev is not None
        async with BleakClient(dev, pair=True) as client:
            await client.start_notify("00002a37-0000-1000-8000-00805f9b34fb", lambda _c, d: got.put_nowait(bytes(d)))
            async with asyncio.timeout(30):
                return await got.get()

    hr = asyncio.run(run())
    figures.update(heart_rate_bpm=hr[1])
    assert hr[0] & 0x01 == 0 and 30 <= hr[1] <= 220
