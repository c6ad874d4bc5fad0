# The demo's firmware updates (issue 16): `pulsebridge-dev demo` on its
# defaults (a serial board and a BLE board) pushes signed releases through
# the agent's own path: the serial board rolls a broken release back by
# itself and then installs the good one, the BLE board installs the good
# one; every acknowledged frame is at the backend, and the summary's sums
# hold across the boards' reboots.
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import ota
from agent.config import AgentConfig
from agent.dev import demo, demo_ota, release
from agent.supervisor import Agent
from protocols import messages
from tests.conftest import ROOT

# The demo stops by itself once the updates have ended; this bounds it (the BLE board takes
# ~90 s to receive the 118 kB bundle here, one chunk in flight; a loaded machine is slower).
DEMO_BOUND_S = 480


@pytest.mark.slow
@pytest.mark.micropython
def test_the_demo_updates_a_serial_and_a_ble_board_and_rolls_a_broken_release_back(micropython: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.dev.cli", "demo", "--json", "--stop-after-updates",
                           "--seconds", str(DEMO_BOUND_S)], cwd=ROOT, capture_output=True, text=True,
                          timeout=DEMO_BOUND_S + 180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    print(json.dumps(r["updates"], indent=1))
    pushes = {(u["device_id"], u["release"]): u for u in r["updates"]["pushes"]}
    serial_dev, ble_dev = (b["device_id"] for b in r["boards"])
    assert [b["link"] for b in r["boards"]] == ["serial", "ble"]
    broken = pushes[(serial_dev, demo_ota.BROKEN_NAME)]
    assert broken["outcome"] == "rolled_back", broken
    assert broken["firmware_after"] and broken["firmware_after"] != demo_ota.BROKEN_NAME
    good_serial = pushes[(serial_dev, demo_ota.GOOD_NAME)]
    assert good_serial["outcome"] == "installed" and good_serial["firmware_after"] == demo_ota.GOOD_NAME, good_serial
    assert good_serial["first_frame_of_new_boot_s"] is not None and good_serial["pause_ms"] is not None
    sig = r["updates"]["signature_check"]
    assert sig["target"] == "esp32" and sig["signature_chip_us"] > sig["signature_host_us"] > 0, sig
    # Nothing acknowledged was lost across the reboots: every stored frame at the backend, the sums whole.
    assert r["frames_lost"] == 0 and r["store_integrity"] == "ok" and r["backend_invalid"] == 0
    assert r["frames_forwarded"] == r["frames_acknowledged"]
    assert r["frames_generated"] == (r["frames_stored_of_generated"] + r["frames_still_on_boards"]
                                     + r["frames_dropped_by_boards"] + r["frames_lost_at_resets"])
    serial_board = r["boards"][0]
    assert serial_board["boots"] >= 3  # the first, the broken release's trial (failed at start), the rollback's...
    good_ble = pushes[(ble_dev, demo_ota.GOOD_NAME)]
    assert good_ble["outcome"] == "installed" and good_ble["firmware_after"] == demo_ota.GOOD_NAME, good_ble
    assert r["boards"][1]["boots"] >= 2


def _spec(dev: str, link: str) -> object:
    from agent.dev.sim import boards

    return boards.BoardSpec(dev, link=link)


def test_frames_built_in_a_boot_a_reset_ended_and_never_stored_count_as_lost() -> None:
    # A board whose first boot (epoch 4) built 10 frames and was reset by an update with 2 of them
    # unstored, then its second (epoch 5) built 6, 1 still on it at the stop.
    specs = [_spec("pb-a", "serial")]
    consoles = ["...pulsebridge: stopped after 6 frames built, 1 awaiting an ack, 0 dropped, boot epoch 5\r\n>>> "]
    ended_boots = [["\x00\x01pulsebridge: stopped after 10 frames built, 2 awaiting an ack, 0 dropped, boot epoch 4"
                    "\r\npulsebridge: rebooting (simulated board)\r\n",
                    "pulsebridge: the version on trial in slot b failed at start: watchdog reset\r\n"]]
    snap = {"store": {"ingested": 13, "state": "ok"}, "backends": [{"name": "local", "backlog": 0}], "rejects": {},
            "now": 0.0}
    backend = {"frames": 13, "invalid": 0}
    r = demo._result(specs, consoles, snap, backend, "ok", 10.0, {"pb-a": 13}, {}, ended_boots,
                     {("pb-a", 4): 8, ("pb-a", 5): 5})
    b = r["boards"][0]
    assert (b["frames_built"], b["boots"], b["frames_lost_at_resets"], b["frames_still_on_board"]) == (16, 3, 2, 1)
    assert r["frames_lost"] == 2 and r["frames_lost_at_resets"] == 2
    assert r["frames_generated"] == 16 == (r["frames_stored_of_generated"] + r["frames_still_on_boards"]
                                           + r["frames_dropped_by_boards"] + r["frames_lost_at_resets"])
    text = "\n".join(demo.summary_lines(r))
    assert "16 frames built by the boards = 13 stored by the hub + 1 still on the boards + 0 dropped by the " \
           "boards + 2 lost at their resets" in text, text
    assert "2 lost (dropped by the boards" in text


def test_the_summary_says_a_board_kept_its_update_once_it_confirmed_it(tmp_path: Path) -> None:
    # The demo stopped following a push once the board streamed on the new version, a minute before
    # the board confirms it: a 5-minute run's summary said "on trial" of updates kept minutes before,
    # and the states heard ended at "installed".
    cfg = AgentConfig(hub_id="test-hub", data_dir=tmp_path / "data", log_dir=tmp_path / "log",
                      run_dir=tmp_path / "run")
    dev = "pb-kept1"
    data = release.make_bundle({"app/main.py": b"# 200\n" * 50}, demo_ota.GOOD_VERSION, demo_ota.GOOD_NAME, 0,
                               demo_ota.TARGET, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    good = demo_ota.Release(demo_ota.GOOD_NAME, demo_ota.GOOD_VERSION, data, False)
    plan = demo_ota.UpdatePlan(Agent(cfg), [], good, good)
    # Pushed, and ended as the demo ends one: the board streams on the new version, on trial.
    ota.push(cfg.run_dir, cfg.audit_path, dev, data, actor=demo_ota.ACTOR)
    p = demo_ota.Push(dev, "serial", good, pushed_at=0.0, pushed_wall=time.time(), before="pulsebridge-fw 0.1.0")
    plan.queues, plan.pushes = {dev: [p]}, [p]
    session = ota.Pusher(cfg.run_dir, send=None, board=lambda: (dev, 1), hub_=None)  # type: ignore[arg-type]
    session.name, session.version, session.total = good.name, good.version, len(data)  # as its run() read them
    for state in ("receiving", "verifying", "installed"):
        assert session.on_state(dev, messages.UpdateState(1, 1, len(data), state))
    plan.step()
    p.outcome, p.after, p.ended_s, p.new_boot_s = "installed", good.name, 30.0, 29.0
    on_trial = " ".join(demo_ota.summary_lines({"pushes": plan.results({})}))
    assert "still on trial at the stop" in on_trial, on_trial
    # A minute on, the board says it keeps it.
    assert session.on_state(dev, messages.UpdateState(2, 5, demo_ota.GOOD_VERSION, "confirmed"))
    plan.step()
    assert list(p.states_s) == ["receiving", "verifying", "installed", "confirmed"], p.states_s
    kept = " ".join(demo_ota.summary_lines({"pushes": plan.results({})}))
    assert "kept: confirmed by the board after a minute of acknowledged streaming" in kept, kept
    assert "on trial" not in kept, kept
