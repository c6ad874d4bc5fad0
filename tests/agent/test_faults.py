# Fault injection on the whole pipeline (real boards, agent, HTTPS backend):
# a backend down then back, a board link cut mid-frame, a board rebooting,
# garbage, forged and replayed frames on the line, the disk quota reached.
# Afterwards every acknowledged frame is at the backend, once per key.
import asyncio
import calendar
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent import config as agent_config
from agent.store import Store
from agent.supervisor import Agent
from protocols import cipher, cose, link, messages
from tests.agent import harness


async def _drain(agent: Agent, timeout_s: float) -> None:
    for _ in range(int(timeout_s * 10)):
        if all(b["backlog"] == 0 for b in agent.snapshot()["backends"]):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("backlog not drained: %s" % agent.snapshot()["backends"])


@pytest.mark.micropython
def test_outage_cut_reboot_and_injected_frames(micropython: str, tmp_path: Path) -> None:
    sims = harness.start_boards(tmp_path, 2, micropython)
    pki = harness.pki_for(tmp_path)
    backend = harness.ThreadedBackend(tmp_path, {s.device_id: s.spec.key for s in sims}, pki)
    b1, b2 = sims
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        cfg = agent_config.load(harness.write_config(tmp_path, sims, harness.webhook(pki, backend.port)))

        async def scenario() -> Agent:
            agent = Agent(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await asyncio.sleep(3)
            old_epoch_frames = harness.uplink_messages(b2)
            await asyncio.to_thread(backend.down)  # the care team's server goes away
            await asyncio.sleep(1)
            b1.cable_connected = False  # a cut, most likely in the middle of a frame
            await asyncio.sleep(2.5)
            b1.cable_connected = True
            b2.inject(os.urandom(300) + b"\x00" + os.urandom(50))  # line noise
            forged = cose.MacKey(bytes(32), b2.device_id.encode(), cose.AAD_UPLINK)
            fake = messages.SampleFrame(1, 10**6, 1, 0, 0, 512, 1, (1, 1), None, (0, 0, 0, 0), [[0]])
            sealed = forged.seal(messages.encoded(fake, sealer=cipher.SampleCipher(bytes(32), bytes(16))))
            b2.inject(link.StreamFramer().frame(sealed))
            b2.inject(link.StreamFramer().frame(old_epoch_frames[-1]))  # replayed, same boot: a duplicate
            await asyncio.to_thread(b2.stop)  # the board reboots: new boot epoch
            await asyncio.to_thread(b2.start)

            def b2_back() -> bool:
                b = agent.snapshot()["boards"][1]
                return bool(b["state"] == "connected" and b["connects"] == 2 and b["frames"])

            for _ in range(100):
                if b2_back():
                    break
                await asyncio.sleep(0.1)
            assert b2_back(), agent.snapshot()["boards"]
            b2.inject(link.StreamFramer().frame(old_epoch_frames[-2]))  # replayed from the previous boot
            await asyncio.to_thread(backend.up)
            await asyncio.sleep(3)
            await asyncio.to_thread(lambda: [s.stop() for s in sims])
            await _drain(agent, 30)
            stop.set()
            await task
            return agent

        agent = asyncio.run(scenario())
        acked = harness.acked(b1) | harness.acked(b2)
        keys = backend.keys()
        missing = {"%s:%d:%d" % a for a in acked} - keys
        assert not missing, sorted(missing)[:5]
        rejects = agent.ingestor.rejects
        assert rejects["bad_mac"] == 1 and rejects["replay:old_epoch"] == 1, (rejects, agent.snapshot()["boards"])
        summary = backend.summary()
        assert summary["invalid"] == 0
        docs = backend.call(harness._async(lambda: [json.loads(r[0]) for r in backend.backend.db.execute(
            "SELECT body FROM received WHERE type='samples'")]))
        synced = [d for d in docs if d["time_source"] == "board-clock"]
        # Frames sent before a boot's first time sync are placed by arrival; from
        # the sync on, every frame of that boot is on the board's clock, across
        # the cut (the clock map outlives the session). How many came before
        # the sync depends on how busy the machine is, so not counted here.
        boots: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for d in docs:
            boots.setdefault((d["device_id"], d["epoch"]), []).append(d)
        for boot, frames in boots.items():
            sources = [d["time_source"] for d in sorted(frames, key=lambda d: d["seq"])]
            first = sources.index("board-clock") if "board-clock" in sources else len(sources)
            assert all(s == "board-clock" for s in sources[first:]), (boot, sources)
        assert {dev for (dev, _e) in boots} == {d["device_id"] for d in synced}  # every board was synced
        for d in synced:
            t0 = calendar.timegm(time.strptime(d["t0_utc"][:19], "%Y-%m-%dT%H:%M:%S"))
            received = calendar.timegm(
                time.strptime(d["received_at"], "%Y-%m-%dT%H:%M:%SZ"))
            assert -2 <= received - t0 <= 30, (d["t0_utc"], d["received_at"])  # sampled before it arrived
        epochs = {e for (_d, e, _s) in harness.acked(b2)}
        assert len(epochs) == 2  # frames from both boots of board 2 were acknowledged
        assert agent.forwarders[0].failures >= 1
        assert Store(cfg.store_path, ["local"]).integrity_check() == "ok"
        db = Store(cfg.store_path, ["local"]).reader()
        reasons = {r[0] for r in db.execute("SELECT reason FROM quarantine")}
        assert {"bad_mac", "replay:old_epoch"} <= reasons  # kept for forensics
    finally:
        backend.close()
        for s in sims:
            s.stop()


@pytest.mark.micropython
def test_disk_quota_drops_oldest_waveforms_and_forwards_gap_records(micropython: str, tmp_path: Path) -> None:
    sims = harness.start_boards(tmp_path, 2, micropython)
    pki = harness.pki_for(tmp_path)
    backend = harness.ThreadedBackend(tmp_path, {s.device_id: s.spec.key for s in sims}, pki)
    try:
        backend.down()
        harness.register(tmp_path / "data", tmp_path / "log", sims)
        cfg = agent_config.load(harness.write_config(tmp_path, sims, harness.webhook(pki, backend.port),
                                                     extra="disk_quota_mb = 0.04"))

        async def scenario() -> Agent:
            agent = Agent(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await asyncio.sleep(14)
            await asyncio.to_thread(lambda: [s.stop() for s in sims])
            await asyncio.to_thread(backend.up)
            await _drain(agent, 30)
            stop.set()
            await task
            return agent

        asyncio.run(scenario())
        db = Store(cfg.store_path, ["local"]).reader()
        dropped = Store.counters(db).get("quota_dropped", 0)
        assert dropped > 0
        summary = backend.summary()
        assert summary["gap_records"] >= 1 and summary["invalid"] == 0
        gaps = [doc for doc in backend.call(harness._async(lambda: [
            json.loads(r[0]) for r in backend.backend.db.execute(
                "SELECT body FROM received WHERE type='gap'")]))]
        assert sum(g["frames_dropped"] for g in gaps) == dropped  # every dropped frame is accounted for
        acked = harness.acked(sims[0]) | harness.acked(sims[1])
        assert summary["frames"] + dropped >= len(acked)
    finally:
        backend.close()
        for s in sims:
            s.stop()
