"""Firmware updates, the hub's side (SPEC.md, Firmware updates: install).

`pulsebridge ota push --device ID BUNDLE` checks the bundle's form (the hub
cannot check its signature for the board: only the board holds the keys it
trusts) and spools it as RUN_DIR/ota/<device>.bin (0600). The running
agent's session with that board, whatever its link, sends it in chunks: a
window of WINDOW_CHUNKS from the first byte the board says it still needs,
again after STATE_WAIT_S without an answer. A cut link, a restarted agent
or a rebooted board resume where the board stands. Each state the board
reports is written to RUN_DIR/ota/<device>.json, which the push command
follows; the spooled bundle is removed once the board confirmed or refused it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.errors import PulsebridgeError
from protocols import bundle, hub, messages

# Chunks sent before the board's answer is awaited (it answers every 8): 2.6 kB
# on a serial line, under the 4 kB a pty or USB CDC buffers; at 16, a board at
# ESP32 speed read them too slowly and the hub's writes timed out.
WINDOW_CHUNKS = 8
STATE_WAIT_S = 1.0  # an answer not heard by then: the window goes again from where the board stood
IDLE_POLL_S = 1.0  # how often a session looks for a spooled bundle for its board
FINAL = ("confirmed",)


def spool_dir(run_dir: Path) -> Path:
    return run_dir / "ota"


class PushError(PulsebridgeError):
    """The bundle cannot be pushed (named reason)."""


def spool(run_dir: Path, device_id: str, data: bytes) -> bundle.Manifest:
    """Spools a bundle for the agent to send: checks its form (header, manifest,
    size), not its signature. Raises PushError."""
    if len(data) > messages.MAX_BUNDLE:
        raise PushError("the bundle is %d bytes, above the %d a board takes" % (len(data), messages.MAX_BUNDLE))
    try:
        manifest, _, at = bundle.read_header(data)
        m = bundle.parse_manifest(manifest)
    except bundle.BundleError as e:
        raise PushError("not a signed bundle (%s): %s" % (e.reason, e)) from None
    if at + m.size() != len(data):
        raise PushError("the bundle is %d bytes, its header and files say %d" % (len(data), at + m.size()))
    d = spool_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = d / (device_id + ".bin.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    (d / (device_id + ".json")).unlink(missing_ok=True)
    tmp.replace(d / (device_id + ".bin"))
    return m


def read_state(run_dir: Path, device_id: str) -> dict[str, object] | None:
    try:
        value = json.loads((spool_dir(run_dir) / (device_id + ".json")).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Pusher:
    """One session's side of an update: run() until the session ends."""

    def __init__(self, run_dir: Path, send: Callable[[bytes], Awaitable[None]],
                 board: Callable[[], tuple[str | None, int | None]], hub_: hub.Hub) -> None:
        self.dir = spool_dir(run_dir)
        self.send = send
        self.board = board  # (device id, boot epoch) as the session knows them
        self.hub = hub_
        self.offset = 0
        self.state = ""
        self.heard = asyncio.Event()

    def on_state(self, device_id: str, m: messages.UpdateState) -> None:
        self.offset, self.state = m.offset, m.state
        self.heard.set()
        d = self.dir
        record = {"device_id": device_id, "offset": m.offset, "state": m.state, "epoch": m.epoch,
                  "at": time.time()}
        try:
            if m.state in FINAL or m.state.startswith("refused"):
                (d / (device_id + ".bin")).unlink(missing_ok=True)
            tmp = d / (device_id + ".json.tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(d / (device_id + ".json"))
        except OSError:
            pass  # the spool is gone: the push command is told nothing more

    async def run(self) -> None:
        data: bytes | None = None
        mtime = 0.0
        while True:
            dev, epoch = self.board()
            path = self.dir / ("%s.bin" % dev)
            try:
                st = path.stat() if dev else None
            except OSError:
                st = None
            if st is None or epoch is None:
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
                self.offset, self.state = 0, ""  # the board says where it stands at the first chunk
            if self.state in ("verifying", "installed") or self.offset >= len(data):
                self.heard.clear()  # the board checks, installs, reboots: its next state is awaited
                try:
                    async with asyncio.timeout(STATE_WAIT_S * 5):
                        await self.heard.wait()
                    continue
                except TimeoutError:
                    self.offset = min(self.offset, len(data) - 1)  # ask again where it stands
            off = self.offset
            self.heard.clear()
            for _ in range(WINDOW_CHUNKS):
                if off >= len(data):
                    break
                assert dev is not None
                await self.send(self.hub.update_chunk(dev, epoch, off, data))
                off += messages.MAX_UPDATE_CHUNK
            try:
                async with asyncio.timeout(STATE_WAIT_S):
                    await self.heard.wait()
            except TimeoutError:
                pass
