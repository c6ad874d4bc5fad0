"""Firmware updates, the hub's side (SPEC.md, Firmware updates: install).

`pulsebridge ota push --device ID BUNDLE` checks the bundle's form (the hub
cannot check its signature for the board: only the board holds the keys it
trusts) and spools it as RUN_DIR/ota/<device>.bin (0600). The running
agent's session with that board, whatever its link, sends it in chunks,
paced by the board: a window beyond the first byte the board last said it
needs (it says so at every chunk), so a board at a chip's
speed, which takes ~0.1 s to read and write one, gets them as fast as it
takes them and its acks are never queued behind more than a window. Chunks
the board does not answer within a retransmission timeout (measured from
its answers, as TCP does: RFC 6298) go again from where it stood, the
timeout doubled each time up to RTO_MAX_S. A cut link, a restarted agent or
a rebooted board resume where the board stands. Each state the board
reports is written to RUN_DIR/ota/<device>.json, which the push command and
the status follow; the spooled bundle is removed once the board confirmed,
refused or rolled it back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.audit import AuditLog
from agent.errors import PulsebridgeError
from protocols import bundle, hub, hub_link, messages

# Chunks in flight beyond what the board has said it holds: as many as the
# link's downlink buffer takes with room left for acks (ACK_ROOM_BYTES), at
# most WINDOW_CHUNKS: 8 on a serial line (2.6 kB of its 4 kB: at 16, a board
# at ESP32 speed read them too slowly and the hub's writes timed out; 8 is
# ~1 s of the board's reading at an ESP32's speed ahead of its acks), 1 over
# BLE (the board's control characteristic holds 512 bytes between two reads:
# a window of 8 was cut to its first chunk, and the push crawled on timeouts).
WINDOW_CHUNKS = 8
ACK_ROOM_BYTES = 160  # an ack line (~130 characters) written meanwhile
RTO_MIN_S = 1.0  # retransmission timeout: the least, and the first before any answer is measured
RTO_MAX_S = 30.0  # ... and the most, after doublings (a board busy checking, a slow link)
VERIFY_POLL_S = 5.0  # a board checking or installing is asked where it stands this often (one chunk)
IDLE_POLL_S = 1.0  # how often a session looks for a spooled bundle for its board
# States after which the board takes no more chunks of this bundle.
FINAL = ("confirmed", "rolled_back")
# The board rebooted into it: only its own report (confirmed, rolled back) is awaited.
ON_TRIAL = ("installed", "on_trial")


def spool_dir(run_dir: Path) -> Path:
    return run_dir / "ota"


class PushError(PulsebridgeError):
    """The bundle cannot be pushed (named reason)."""


def check(data: bytes) -> bundle.Manifest:
    """A bundle's manifest, once its form (header, manifest, size) is checked, not its signature.
    Raises PushError."""
    if len(data) > messages.MAX_BUNDLE:
        raise PushError("the bundle is %d bytes, above the %d a board takes" % (len(data), messages.MAX_BUNDLE))
    try:
        manifest, _, at = bundle.read_header(data)
        m = bundle.parse_manifest(manifest)
    except bundle.BundleError as e:
        raise PushError("not a signed bundle (%s): %s" % (e.reason, e)) from None
    if at + m.size() != len(data):
        raise PushError("the bundle is %d bytes, its header and files say %d" % (len(data), at + m.size()))
    return m


def spool(run_dir: Path, device_id: str, data: bytes,
          record: Callable[[bundle.Manifest], None] | None = None) -> bundle.Manifest:
    """Spools a bundle for the agent to send, once check() passes it: written under a temporary name,
    then record(manifest) (the push's audit record), then put in place; if any of it fails nothing is
    left (a partial bundle on a full /run took what room was left). Raises PushError, OSError, and
    what record raises."""
    m = check(data)
    d = spool_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = d / (device_id + ".bin.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if record is not None:
            record(m)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write's error names no file: this one
            e.filename = str(tmp)
        raise
    (d / (device_id + ".json")).unlink(missing_ok=True)
    tmp.replace(d / (device_id + ".bin"))
    return m


def push(run_dir: Path, audit_path: Path, device_id: str, data: bytes, actor: str | None = None) -> bundle.Manifest:
    """`pulsebridge ota push`: spools the bundle (spool()) for the running agent to send and records
    the push in the audit log (who pushed what: its version, name and SHA-256): the bundle is put in
    place only once its push is recorded, and recorded only once it is written. Raises PushError,
    OSError, AuditError (nothing spooled)."""
    return spool(run_dir, device_id, data, lambda m: AuditLog(audit_path).record(
        "firmware.push", device_id, actor=actor, version=m.version, name=m.name,
        sha256=hashlib.sha256(data).hexdigest()))


def read_state(run_dir: Path, device_id: str) -> dict[str, object] | None:
    try:
        value = json.loads((spool_dir(run_dir) / (device_id + ".json")).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def progress(update: dict[str, Any] | None) -> dict[str, Any] | None:
    """A board's update state (the status's "update") as the operator sees it:
    {"phase": receiving|verifying|installed|confirmed|refused|rolled_back,
    "pct": bytes received in % (receiving), "version": the bundle's name,
    "reason": the refusal's, "key_id": the bundle's signing key id (16 hex digits, "" if not known)};
    None if there is none to show."""
    if not update or not update.get("state"):
        return None
    state = str(update["state"])
    phase, _, reason = state.partition(":")
    if phase == "on_trial":
        phase = "installed"
    out: dict[str, Any] = {"phase": phase, "pct": None, "version": update.get("version") or "", "reason": reason,
                           "key_id": str(update.get("key_id") or "")}
    total = update.get("total")
    if phase == "receiving" and total:
        out["pct"] = min(99, int(100 * int(update.get("offset") or 0) / int(total)))
    return out


# Why a board refused an update (SPEC.md, "What a board refuses"), and what a technician does about it.
REFUSALS = {
    "truncated": "the bundle reached it cut short: push it again",
    "malformed": "not a bundle it can read (a bad manifest, or a path outside the firmware): sign it again "
                 "with pulsebridge-dev release sign",
    "bad_signature": "its signature does not verify (unsigned, or altered after signing): sign it again",
    "unknown_key": "signed by a key the board does not hold: a board takes only the vendor keys it was "
                   "provisioned with (provision --vendor-key HEX; without one it takes no update)",
    "wrong_target": "made for another board type (pulsebridge-dev release sign --target)",
    "downgrade": "its version is not above the one the board runs (a release number only rises)",
    "below_floor": "its version is below the lowest this board may run now (an earlier release's "
                   "--min-version)",
    "hash_mismatch": "a file's SHA-256 is not its manifest's (altered after signing): sign it again",
    "no_memory": "the board had no room in its heap to check it; it streams on: push it again later",
    "on_trial": "the board runs a version on trial, and takes no other before that one is confirmed (a "
                "minute of acknowledged streaming): push it again then",
}


def refusal(state: str, key_id: str = "") -> str:
    """A "refused:REASON" state in a technician's words (the reason alone if it is not known here);
    key_id: the bundle's signing key id (hex), named for an unknown key with what to do about it."""
    reason = state.partition(":")[2]
    if reason == "unknown_key" and key_id:
        return ("unknown_key: signed by a key the board does not hold (key id %s): a board takes only the "
                "vendor keys it was provisioned with. Sign the release with one of those (pulsebridge-dev release "
                "sign --key), or provision the board again with this key's public half (provision --vendor-key "
                "HEX, as pulsebridge-dev release keygen printed it, key id %s)" % (key_id, key_id))
    return "%s: %s" % (reason, REFUSALS[reason]) if reason in REFUSALS else reason


def describe(update: dict[str, Any] | None) -> str:
    """The update's state in a few English words (`pulsebridge status`); "" if none."""
    p = progress(update)
    if p is None:
        return ""
    version = " " + p["version"] if p["version"] else ""
    phase = p["phase"]
    if phase == "receiving":
        return "updating%s: %s received" % (version, "?" if p["pct"] is None else "%d %%" % p["pct"])
    if phase == "verifying":
        return "updating%s: checking the signature and installing" % version
    if phase == "installed":
        return "update%s installed, on trial until it has streamed for a minute" % version
    if phase == "confirmed":
        return "update%s installed and confirmed" % version
    if phase == "refused":
        reason = p["reason"]
        if reason == "unknown_key" and p["key_id"]:
            reason += ": it does not hold the key %s that signed it" % p["key_id"]
        return "update%s refused by the board (%s): it runs its previous version" % (version, reason)
    if phase == "rolled_back":
        return "update%s rolled back: the board runs its previous version" % version
    return "update%s: %s" % (version, update["state"] if update else "")


def _seen(record: dict[str, Any], state: str) -> dict[str, float]:
    """The record's "seen" ({state: when first heard, Unix time}) with state added."""
    seen = dict(record.get("seen") or {})
    seen.setdefault(state, time.time())
    return seen


def final(state: str) -> bool:
    """True for a state after which the board takes no more of this bundle."""
    return state in FINAL or state.startswith("refused") or state.startswith("rolled_back")


class Pusher:
    """One session's side of an update: run() until the session ends."""

    def __init__(self, run_dir: Path, send: Callable[[bytes], Awaitable[None]],
                 board: Callable[[], tuple[str | None, int | None]], hub_: hub.Hub,
                 downlink_buffer_bytes: int = 4096) -> None:
        # downlink_buffer_bytes: what the link holds ahead of the board's reading (Transport's).
        self.dir = spool_dir(run_dir)
        self.downlink_buffer_bytes = downlink_buffer_bytes
        self.window = 1  # chunks in flight, set from the first chunk's size on the line
        self.send = send
        self.board = board  # (device id, boot epoch) as the session knows them
        self.hub = hub_
        self.offset = 0  # the first byte the board last said it needs
        self.next_offset = 0  # the next chunk to send
        self.state = ""
        self.heard = asyncio.Event()
        self.srtt_s: float | None = None  # smoothed round trip, chunk sent -> the board's answer covering it
        self.rttvar_s = 0.0
        self.rto_s = RTO_MIN_S
        self.sent_at: dict[int, float] = {}  # chunk offset -> when sent
        self.timed_from = 0  # chunks below this went more than once: not timed (Karn)
        self.total: int | None = None  # the spooled bundle's size
        self.name = ""  # its version's name (manifest)
        self.version = 0  # ... and number
        self.key_id = ""  # ... and the id of the key that signed it (hex)
        # The update as last recorded for the board (its state, and the bundle's name and size as the
        # session that pushed it read them: one opened after the board rebooted has not read the bundle).
        self.recorded: dict[str, object] = {}

    def on_state(self, device_id: str, m: messages.UpdateState) -> bool:
        """The board's report of where its update stands. Returns False for one that is not of the
        spooled bundle (ignored): an outcome (confirmed, rolled back) whose offset, the version of
        the release it is about (0 from a board that does not say), is not the bundle's is the board
        saying again that of an earlier update (it does for a minute); taken for this one, it ended
        the push (the bundle unspooled) as it began."""
        state = m.state
        prev = read_state(self.dir.parent, device_id) or {}  # (this session may not have loaded the bundle yet)
        if not final(state) and final(str(prev.get("state", ""))) and not (self.dir / (device_id + ".bin")).exists():
            # An answer to a chunk sent before the board's refusal (or outcome) was heard, e.g. a board
            # that refused a bundle from its header alone while the rest of a window came: no push is on,
            # and the refusal the push command and the status show stays.
            return False
        if state == "refused:on_trial" and (self.state or prev.get("state")) in ("verifying",) + ON_TRIAL:
            state = "on_trial"  # this bundle, installed and rebooted into before its "installed" was heard
        if state in FINAL:
            version = self.version or int(str(prev.get("release_version") or 0)) or self._spooled_version(device_id)
            if m.offset and version and m.offset != version:
                return False
        else:
            self._measure(m.offset)
            self.offset = m.offset
            if self.next_offset < m.offset:
                self.next_offset = m.offset  # it holds more (from before a cut): on from there
        self.state = state
        self.heard.set()
        total = self.total if self.total is not None else prev.get("total")
        key_id = self.key_id or str(prev.get("key_id") or "")
        if not key_id and state.startswith("refused"):  # (named to the technician: "unknown_key")
            spooled = self._spooled(device_id)
            key_id = spooled.key_id.hex() if spooled is not None else ""
        self._record(device_id, {"device_id": device_id, "offset": m.offset, "state": state, "epoch": m.epoch,
                                 "at": time.time(), "total": total,
                                 "version": self.name or prev.get("version"),
                                 "release_version": self.version or prev.get("release_version"),
                                 "key_id": key_id,
                                 "trial_seen": bool(prev.get("trial_seen")) and state in ON_TRIAL,
                                 "seen": _seen(prev, state)})
        return True

    def on_hello(self, device_id: str, firmware: str) -> str | None:
        """A boot's hello (the release it runs). A board that runs the new version is on trial with it
        (its own "installed" may have been lost); once it has, a boot that runs another was rolled
        back, whether or not its own report of it reached the hub (a report sent while no session read
        the link is lost: frames are sent again, reports not). Returns the state it concludes, if any."""
        prev = read_state(self.dir.parent, device_id) or {}
        state, name = str(prev.get("state", "")), str(prev.get("version") or "")
        if state not in ("verifying",) + ON_TRIAL or not name:
            return None
        if firmware == name:
            if prev.get("trial_seen"):
                return None
            prev.update(state="on_trial" if state == "verifying" else state, trial_seen=True)
        elif prev.get("trial_seen"):
            prev.update(state="rolled_back", trial_seen=False, at=time.time())
        else:
            return None
        prev["seen"] = _seen(prev, str(prev["state"]))
        if self.total == prev.get("total"):
            self.state = str(prev["state"])
        self._record(device_id, prev)
        return str(prev["state"])

    def _spooled_version(self, device_id: str) -> int:
        """The spooled bundle's version (its manifest's), 0 if there is none to read."""
        m = self._spooled(device_id)
        return m.version if m is not None else 0

    def _spooled(self, device_id: str) -> bundle.Manifest | None:
        """The spooled bundle's manifest, None if there is none to read."""
        try:
            with open(self.dir / ("%s.bin" % device_id), "rb") as f:
                head = f.read(bundle.MAX_HEADER)
            return bundle.parse_manifest(bundle.read_header(head)[0])
        except (OSError, bundle.BundleError):
            return None

    def shown(self, offset: int) -> dict[str, object]:
        """The board's update as the status shows it (BoardStats.update): {"state", "offset", "total",
        "version": the bundle's name, "" if not known}, from the last record of it."""
        r = self.recorded
        return {"state": self.state or r.get("state"), "offset": offset, "total": self.total or r.get("total"),
                "version": self.name or str(r.get("version") or "")}

    def _record(self, device_id: str, record: dict[str, object]) -> None:
        self.recorded = record
        d = self.dir
        try:
            if final(str(record.get("state", ""))):
                (d / (device_id + ".bin")).unlink(missing_ok=True)
            tmp = d / (device_id + ".json.tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(d / (device_id + ".json"))
        except OSError:
            pass  # the spool is gone: the push command is told nothing more

    def _measure(self, offset: int) -> None:
        # RFC 6298 on the newest chunk this answer covers that went once only.
        covered = [o for o in self.sent_at if o < offset]
        if not covered:
            return
        rtt = time.monotonic() - self.sent_at[max(covered)]
        for o in covered:
            del self.sent_at[o]
        if self.srtt_s is None:
            self.srtt_s, self.rttvar_s = rtt, rtt / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt
        self.rto_s = min(RTO_MAX_S, max(RTO_MIN_S, self.srtt_s + 4 * self.rttvar_s))

    async def _wait(self, timeout_s: float) -> bool:
        self.heard.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self.heard.wait()
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        data: bytes | None = None
        mtime = 0.0
        chunk = messages.MAX_UPDATE_CHUNK
        while True:
            dev, epoch = self.board()
            path = self.dir / ("%s.bin" % dev)
            try:
                st = path.stat() if dev else None
            except OSError:
                st = None
            if st is None or epoch is None or dev is None:
                data = None
                await asyncio.sleep(IDLE_POLL_S)
                continue
            if data is None or st.st_mtime != mtime:
                try:
                    data, mtime = path.read_bytes(), st.st_mtime
                except OSError:  # removed or unreadable meanwhile: looked at again
                    data = None
                    await asyncio.sleep(IDLE_POLL_S)
                    continue
                # The board says where it stands at the first chunk; a state this bundle reached in an
                # earlier session (checking, installed: the board may be on trial with it) is kept.
                self.offset = self.next_offset = self.timed_from = 0
                prev = read_state(self.dir.parent, dev) or {}
                self.state = str(prev.get("state", "")) if prev.get("total") == len(data) else ""
                if self.state not in ("verifying",) + ON_TRIAL:
                    self.state = ""
                self.sent_at.clear()
                self.total = len(data)
                line = len(hub_link.downlink_line(self.hub.update_chunk(dev, epoch, 0, data)))
                self.window = max(1, min(WINDOW_CHUNKS, (self.downlink_buffer_bytes - ACK_ROOM_BYTES) // line))
                try:
                    m = bundle.parse_manifest(bundle.read_header(data)[0])
                    self.name, self.version, self.key_id = m.name, m.version, m.key_id.hex()
                except bundle.BundleError:
                    self.name, self.version, self.key_id = "", 0, ""  # (spool() checked it: only a file changed)
            if self.state in ON_TRIAL or final(self.state):
                await self._wait(VERIFY_POLL_S)  # it reports confirmed or rolled back by itself
                continue
            if self.state == "verifying" or self.offset >= len(data):
                if not await self._wait(VERIFY_POLL_S):  # checking, installing, rebooting: asked again
                    await self.send(self.hub.update_chunk(dev, epoch, (len(data) - 1) // chunk * chunk, data))
                continue
            while self.next_offset < len(data) and self.next_offset < self.offset + self.window * chunk:
                off = self.next_offset
                if off >= self.timed_from:
                    self.sent_at[off] = time.monotonic()
                await self.send(self.hub.update_chunk(dev, epoch, off, data))
                self.next_offset = off + chunk
            if await self._wait(self.rto_s):
                continue
            # Nothing heard within the timeout: again from where the board stood, the timeout
            # doubled; what goes again is not timed (Karn).
            self.timed_from = self.next_offset
            self.next_offset = self.offset
            self.sent_at.clear()
            self.rto_s = min(RTO_MAX_S, 2 * self.rto_s)
