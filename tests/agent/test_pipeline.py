# The whole pipeline with real components: boards (firmware under
# micropython on ptys), the agent (in-process or a process we kill), and
# the embedded HTTPS backend that checks every frame end to end.
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.store import Store
from tests.agent import harness
from tests.conftest import ROOT
from tests.waiting import wait_for


@pytest.mark.micropython
def test_demo_30s_loses_nothing(micropython: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.dev.cli", "demo", "--seconds", "30", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["frames_lost"] == 0 and r["store_integrity"] == "ok" and r["backend_invalid"] == 0
    # Both boards streamed (how much in 30 s depends on the machine's load, so not counted).
    assert len(r["boards"]) == 2 and all(b["frames_built"] >= 2 for b in r["boards"]), r["boards"]
    assert r["frames_acknowledged"] >= 4
    assert r["frames_forwarded"] == r["frames_acknowledged"]
    assert r["frames_generated"] >= r["frames_acknowledged"]
    assert r["frames_generated"] - r["frames_acknowledged"] <= r["frames_unacked_at_stop"]


@pytest.mark.micropython
@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_acknowledged(make_hub: Callable[..., harness.Hub],
                                                             tmp_path: Path) -> None:
    rng = random.Random(20261122)
    print("seed 20261122")
    hub = make_hub(2, webhook=True)
    sims, backend, cfg = hub.sims, hub.backend, hub.config_path

    def acks() -> int:
        return sum(len(harness.acked(sim)) for sim in sims)

    for _cycle in range(20):
        before = acks()
        agent = harness.agent_process(cfg)
        # Killed at a random moment once ingest is under way (its first ack
        # on the wire), however long the agent took to start.
        wait_for(lambda b=before: acks() > b, 60, "the agent acknowledging frames", acks, poll_s=0.05)
        time.sleep(rng.uniform(0, 1.5))  # the random moment: the scenario's shape
        harness.kill9(agent)
    agent = harness.agent_process(cfg)
    hub.defer(lambda: agent.poll() is not None or harness.kill9(agent))  # whatever happens below
    before = acks()
    wait_for(lambda: acks() >= before + 4, 60, "the last agent acknowledging frames", acks)
    for sim in sims:
        sim.stop()
    acked = hub.acked()

    def all_delivered() -> bool:
        return {"%s:%d:%d" % a for a in acked} <= backend.keys()

    wait_for(all_delivered, 90, "every acknowledged frame at the backend",
             lambda: sorted({"%s:%d:%d" % a for a in acked} - backend.keys())[:5])
    agent.send_signal(signal.SIGTERM)
    agent.wait(20)
    store = Store(tmp_path / "data" / "store.db", ["local"])
    assert store.integrity_check() == "ok"
    summary = backend.summary()
    assert summary["invalid"] == 0
    print("acknowledged %d, at the backend %d (duplicates dropped by key: %d)" % (
        len(acked), summary["frames"], summary["duplicates"]))
