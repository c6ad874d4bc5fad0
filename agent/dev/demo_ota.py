"""The demo's firmware updates (`pulsebridge-dev demo`, issue 16).

A vendor key is made for the run (Ed25519, in this process's memory only:
never a key shipped with the project, never on the hub); its public key is
written to every board at "provisioning" (BoardSpec.vendor_keys). Two
releases are signed with it: a good one (this tree's firmware, as
`pulsebridge-dev release sign` makes it) and a broken one (a version whose
code fails at start). Once a board streams, the demo pushes them through
the agent's own path (agent/ota.py's push(), what `pulsebridge ota push`
runs: spooled, audited, sent by the board's session over its link):

- the first board takes the broken release, rolls it back by itself (its
  trial boot fails at start; boot.py goes back to the confirmed slot), then
  takes the good one;
- the second board takes the good one.

With the demo's default links (`--link mixed`) the first board is on
serial and the second on BLE. Each push is followed from the hub's update
state (RUN_DIR/ota/<device>.json), the firmware the board's hello names and
the frames the hub stores from each boot, until it has ended: the new
version streaming (frames stored from the boot that runs it), the previous
one streaming again after a rollback, or a refusal.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import ota
from agent.dev import release
from agent.dev.sim import boards
from agent.dev.sim.runner import SimulatedBoard, find_micropython
from agent.provision import build
from agent.provision.build import FIRMWARE_DIR
from agent.supervisor import Agent

GOOD_VERSION = 200
GOOD_NAME = "pulsebridge-fw 0.2.0"
BROKEN_VERSION = 300
BROKEN_NAME = "pulsebridge-fw 0.3.0-broken"
TARGET = "esp32"
# Frames stored from a boot before the board counts as streaming on it: before a push, and
# after one (on the new version, or on the previous one after a rollback).
STREAMING_FRAMES = 3
ACTOR = "demo"  # who pushed, in the audit log
# The signature check's benchmark (firmware_mpy/sim/bench_ota.py) is given this long.
SIGNATURE_BENCH_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Release:
    name: str
    version: int
    data: bytes = field(repr=False)
    broken: bool  # made to fail at start: a rollback is its expected end


def make_releases(key: Ed25519PrivateKey, compiled: Path) -> tuple[Release, Release]:
    """(good, broken), signed with key: the good one is the compiled firmware's slot files; the broken
    one a version whose app package raises at import (it fails at start, as a bad release would)."""
    files = {p: s.read_bytes() for p, s in build.slot_files(compiled).items()}
    good = release.make_bundle(files, GOOD_VERSION, GOOD_NAME, 0, TARGET, key)
    broken_files = {"app/__init__.py": b"raise RuntimeError('pulsebridge-fw 0.3.0-broken fails at start')\n",
                    "app/main.py": b"# the broken release's main\n"}
    broken = release.make_bundle(broken_files, BROKEN_VERSION, BROKEN_NAME, 0, TARGET, key)
    return Release(GOOD_NAME, GOOD_VERSION, good, False), Release(BROKEN_NAME, BROKEN_VERSION, broken, True)


@dataclass
class Push:
    """One release pushed to one board, followed to its end. Times in s after the push (wall clock)."""

    device_id: str
    link: str
    release: Release
    pushed_at: float | None = None  # time.monotonic()
    pushed_wall: float = 0.0  # time.time() then
    epoch_at_push: int = 0  # the board's newest boot epoch (with frames stored) when pushed
    # The firmware its hello named when pushed ("": none heard; a serial board's boot hello goes before
    # the hub opens its port, and is lost)
    before: str = ""
    after: str = ""  # ... when the push ended
    states_s: dict[str, float] = field(default_factory=dict)  # each update state the hub heard, first seen
    new_boot_s: float | None = None  # the first frame stored from a boot after the push
    outcome: str = ""  # "" until it ended: installed | rolled_back | refused:REASON | failed:WHY
    ended_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "link": self.link, "release": self.release.name,
                "version": self.release.version, "broken": self.release.broken,
                "bundle_bytes": len(self.release.data), "pushed": self.pushed_at is not None,
                "firmware_before": self.before, "firmware_after": self.after, "states_s": dict(self.states_s),
                "first_frame_of_new_boot_s": self.new_boot_s, "outcome": self.outcome or None,
                "ended_s": self.ended_s}


class UpdatePlan:
    """The pushes of a demo run, driven by step() (about every second)."""

    def __init__(self, agent: Agent, sims: list[SimulatedBoard], good: Release, broken: Release) -> None:
        self.agent = agent
        self.sims = sims
        self.queues: dict[str, list[Push]] = {}
        if sims:
            a = sims[0].spec
            self.queues[a.device_id] = [Push(a.device_id, a.link, broken), Push(a.device_id, a.link, good)]
        if len(sims) > 1:
            b = sims[1].spec
            self.queues[b.device_id] = [Push(b.device_id, b.link, good)]
        self.pushes = [p for q in self.queues.values() for p in q]

    def done(self) -> bool:
        return all(p.outcome for p in self.pushes)

    def _boots(self, device_id: str) -> dict[int, int]:
        """Frames stored from each boot epoch of the board."""
        return {e: n for (d, e), n in self.agent.frames_stored_by_epoch.items() if d == device_id}

    def _firmware(self, device_id: str) -> str:
        for b in self.agent.snapshot()["boards"]:
            if b["device_id"] == device_id:
                return str(b["firmware"] or "")
        return ""

    def step(self) -> None:
        for dev, queue in self.queues.items():
            p = next((p for p in queue if not p.outcome), None)
            if p is not None:
                self._follow(dev, p)
            elif queue and queue[-1].outcome == "installed":
                self._heard(dev, queue[-1])  # the end of its trial (confirmed) comes a minute on

    def _follow(self, dev: str, p: Push) -> None:
        boots = self._boots(dev)
        now = time.monotonic()
        if p.pushed_at is None:
            newest = max(boots, default=None)
            if newest is None or boots[newest] < STREAMING_FRAMES:
                return  # not streaming yet
            try:
                ota.push(self.agent.cfg.run_dir, self.agent.cfg.audit_path, dev, p.release.data, actor=ACTOR)
            except (OSError, ota.PushError) as e:
                p.outcome, p.ended_s = "failed:%s" % e, 0.0
                return
            p.pushed_at, p.pushed_wall, p.epoch_at_push, p.before = now, time.time(), newest, self._firmware(dev)
            return
        t = round(now - p.pushed_at, 1)
        state = self._heard(dev, p)
        later = {e: n for e, n in boots.items() if e > p.epoch_at_push}
        if later and p.new_boot_s is None:
            p.new_boot_s = t
        firmware = self._firmware(dev)
        streaming_again = any(n >= STREAMING_FRAMES for n in later.values())
        if state.startswith("refused"):
            p.outcome = state
        elif streaming_again and firmware == p.release.name:
            p.outcome = "installed"
        elif streaming_again and state == "rolled_back" and firmware and firmware != p.release.name:
            p.outcome = "rolled_back"
        if p.outcome:
            p.after, p.ended_s = firmware, t

    def _heard(self, dev: str, p: Push) -> str:
        """The state the hub last recorded of the board's update (p's), and each it heard in
        p.states_s (seconds after the push, when first heard)."""
        record = ota.read_state(self.agent.cfg.run_dir, dev) or {}
        seen = record.get("seen")
        if isinstance(seen, dict):
            p.states_s = {str(k): round(max(0.0, float(v) - p.pushed_wall), 1) for k, v in seen.items()}
        return str(record.get("state", ""))

    def results(self, pauses: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Each push's figures (Push.as_dict), with the board's longest pause in streaming over the run
        (bench_ota.stream_report's pause_ms and pause_where, from the hub's store)."""
        out = []
        for p in self.pushes:
            d = p.as_dict()
            d.update(pauses.get(p.device_id, {}))
            out.append(d)
        return out


def signature_check_at_chip_speed(r: Release, public_key: bytes, target: str = "esp32") -> dict[str, Any]:
    """The board's check of r's signature (protocols/ed25519.py in pure MicroPython, in slices) timed
    under the unix port and scaled to target's speed by the calibrated factor
    (firmware_mpy/sim/bench_ota.py): {"signature_chip_us", "whole_check_chip_us", "slices", ...}.
    Raises RuntimeError if the benchmark fails."""
    with tempfile.TemporaryDirectory(prefix="pulsebridge-demo-sig-") as tmp:
        path = Path(tmp) / "release.pbb"
        path.write_bytes(r.data)
        p = subprocess.run([find_micropython(), "-X", "heapsize=2M", str(FIRMWARE_DIR / "sim" / "bench_ota.py"),
                            target, str(path), public_key.hex()], env=boards.micropython_env(),
                           capture_output=True, text=True, timeout=SIGNATURE_BENCH_TIMEOUT_S)
    if p.returncode:
        raise RuntimeError("bench_ota under micropython failed: " + p.stderr[-2000:])
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def summary_lines(updates: dict[str, Any]) -> list[str]:
    """The updates' part of the demo's summary, for a person."""
    lines = ["  firmware updates, signed with a vendor key made for this run (its public key on each board):"]
    sig = updates.get("signature_check")
    for u in updates["pushes"]:
        head = "    %s over %s: %s (%d bytes%s)" % (u["device_id"], u["link"], u["release"], u["bundle_bytes"],
                                                     ", made to fail at start" if u["broken"] else "")
        if not u["pushed"]:
            lines.append(head + ": not pushed by the stop (the board was not streaming yet, or an "
                         "earlier push had not ended)")
            continue
        st = u["states_s"]
        steps = ", ".join("%s %.0f s" % (k, v) for k, v in st.items())
        outcome = u["outcome"]
        if outcome == "installed":
            end = ("installed: runs %s, first frame of its boot stored %.0f s after the push, streaming on it at "
                   "%.0f s (%s)" % (u["firmware_after"], u["first_frame_of_new_boot_s"] or 0, u["ended_s"],
                                    "kept: confirmed by the board after a minute of acknowledged streaming"
                                    if "confirmed" in st else "rolled back by the board on trial"
                                    if "rolled_back" in st else "still on trial at the stop: a board keeps a new "
                                    "version after a minute of acknowledged streaming"))
        elif outcome == "rolled_back":
            end = ("ROLLED BACK by the board itself: back on %s, streaming again %.0f s after the push"
                   % (u["firmware_after"], u["ended_s"]))
        elif outcome:
            end = "%s (runs %s)" % (outcome, u["firmware_after"] or "?")
        else:
            end = "still under way at the stop"
        lines.append(head + ": %s -> %s" % (u["firmware_before"] or "(its version not heard: its boot's hello went "
                                            "before the hub opened the port)", end))
        lines.append("        states after the push: %s" % (steps or "none heard"))
        if u.get("pause_ms") is not None:
            lines.append("        longest pause in this board's streaming over the run: %.2f s (%s)"
                         % (u["pause_ms"] / 1000, u.get("pause_where") or "none"))
    if sig is not None:
        if "error" in sig:
            lines.append("    signature check at %s speed: not measured (%s)" % (sig.get("target"), sig["error"]))
        else:
            lines.append("    the board's signature check (Ed25519, pure MicroPython, %d slices, one per loop "
                         "iteration) at %s speed: %.1f s; the whole bundle's check %.1f s"
                         % (sig["slices"], sig["target"], sig["signature_chip_us"] / 1e6,
                            sig["whole_check_chip_us"] / 1e6))
    return lines
