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

from agent.ingest import Volatile
from agent.session import BoardSession, BoardStats
from agent.transports.ble import BleTransport
from hil_tests.conftest import BleBench
from protocols import hub

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


async def _stream(bench: BleBench, address: str, h: hub.Hub, stats: BoardStats, seconds: float) -> BleTransport:
    t = await _transport(bench, address)
    task = asyncio.create_task(BoardSession(t, Volatile(h), stats).run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return t


def _values(stats: BoardStats) -> int:
    # Sample values received: a PPG sample is a red and an IR value.
    return sum(n * (2 if "ppg" in name else 1) for name, n in stats.samples_received().items())


def test_ble_connect_and_stream(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    stats = BoardStats("", "ble:" + ble_bench.addresses[0])
    t = asyncio.run(_stream(ble_bench, ble_bench.addresses[0], _hub(ble_bench), stats, SECONDS))
    figures.update(board=stats.device_id, firmware=stats.firmware, mtu=t.mtu,
                   frames_per_s=round(stats.frames / SECONDS, 2),
                   att_bytes_per_sample_value=round(t.fragment_bytes / max(1, _values(stats)), 3))
    assert stats.frames >= SECONDS * 0.6, stats
    assert not stats.rejects, stats.rejects
    assert sum(stats.samples_missing().values()) == 0, stats.samples_missing()


def test_ble_reconnect_loses_nothing(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    h = _hub(ble_bench)
    stats = BoardStats("", "ble:" + ble_bench.addresses[0])

    async def run() -> float:
        await _stream(ble_bench, ble_bench.addresses[0], h, stats, SECONDS / 2)  # closes: the hub leaves
        before = stats.frames
        t0 = time.monotonic()
        t = await _transport(ble_bench, ble_bench.addresses[0])
        task = asyncio.create_task(BoardSession(t, Volatile(h), stats).run())
        while stats.frames == before and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        took = time.monotonic() - t0
        await asyncio.sleep(SECONDS / 2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return took

    took = asyncio.run(run())
    figures.update(reconnect_to_first_frame_s=round(took, 2), frames=stats.frames)
    assert took < 20
    # What was in flight when the hub left came again: the two connections leave no hole.
    assert sum(stats.samples_missing().values()) == 0, stats.samples_missing()


def test_ble_several_boards_at_once(ble_bench: BleBench, figures: dict[str, Any]) -> None:
    if len(ble_bench.addresses) < 2:
        pytest.skip("needs two or more boards: pass --ble ADDRESS once per board")
    h = _hub(ble_bench)
    stats = [BoardStats("", "ble:" + a) for a in ble_bench.addresses]

    async def run() -> None:
        await asyncio.gather(*(_stream(ble_bench, a, h, st, SECONDS) for a, st in zip(ble_bench.addresses, stats)))

    asyncio.run(run())
    figures.update(boards=len(stats), frames_per_s=round(sum(s.frames for s in stats) / SECONDS, 2))
    for st in stats:
        assert st.frames >= SECONDS * 0.6, st
        assert sum(st.samples_missing().values()) == 0, (st.device_id, st.samples_missing())


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
