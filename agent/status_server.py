"""What the running agent tells: the status socket (`pulsebridge status`) and the status page.

Both serve the agent's snapshot, which reads the store's figures (backlog,
counters) on a thread of their own: a large backlog costs its COUNT on that
thread, never on the event loop that serves the boards.

The status socket is a Unix socket, mode 0600 (the service user's alone):
a client connects and reads one JSON line. A socket's address holds 107
bytes (sun_path); a run_dir deeper than that is reached through its
directory's descriptor (/proc/self/fd/N/status.sock, Linux), so the socket
works wherever run_dir is. The status page runs only with a
password file (agent/status_page.py); one missing or unsafe is looked at
again every PASSWORD_RECHECK_S, so making or fixing it brings the page up
with no restart, and the boards are served all the same meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, listen_address
from agent.status_page import PasswordFileError, StatusPage, read_password

log = logging.getLogger(__name__)

# A status page password file missing or unsafe is looked at again this often:
# made or fixed, the page starts with no restart.
PASSWORD_RECHECK_S = 10.0
# The most `pulsebridge status` reads from the status socket: a snapshot of a
# few hundred boards is tens of kB; whatever answers there is read no further.
STATUS_MAX_BYTES = 4 << 20

# The longest path a Unix socket's address holds (sockaddr_un.sun_path, less its NUL).
SUN_PATH_BYTES = 107

Snapshot = Callable[[], Awaitable[dict[str, Any]]]
Waveform = Callable[[str, str], dict[str, Any]]


class StatusServer:
    def __init__(self, cfg: AgentConfig, snapshot: Snapshot, waveform: Waveform) -> None:
        self.cfg = cfg
        self.snapshot = snapshot
        self.waveform = waveform
        self.page_port = 0  # where the page listens, once it does
        # "on" only once it listens: the agent's start line, written before, says "starting".
        self.page_state = "starting" if cfg.status_page_password_file else "off: no status_page_password_file"
        self.password_recheck_s = PASSWORD_RECHECK_S
        self.page: StatusPage | None = None  # once it serves

    async def serve_socket(self) -> None:
        path = self.cfg.status_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(json.dumps(await self.snapshot()).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

        old = os.umask(0o077)
        try:
            with socket_address(path) as address:
                server = await asyncio.start_unix_server(serve, path=address)
        finally:
            os.umask(old)
        try:
            async with server:
                await server.serve_forever()
        finally:  # a stopped agent leaves no socket: `pulsebridge status` then says there is none
            path.unlink(missing_ok=True)

    async def serve_page(self) -> None:
        """Serves the page until cancelled; returns (task done) when it cannot listen."""
        assert self.cfg.status_page_password_file is not None
        said = ""
        while True:
            try:
                password = read_password(self.cfg.status_page_password_file)
                break
            except PasswordFileError as e:  # no page, the boards are served all the same
                self.page_state = "off: %s" % e
                if str(e) != said:  # said once, and again when it changes
                    said = str(e)
                    if e.missing:
                        log.warning("status page off: %s (create it, mode 0600, to have the page)", e)
                    else:
                        log.error("status page off: %s", e)
            # Looked at again: a file made or fixed (as the message says) brings the page up, no restart.
            await asyncio.sleep(self.password_recheck_s)
        if said:
            log.info("status page password file %s is fine now: the page starts", self.cfg.status_page_password_file)
        host, port = listen_address(self.cfg.status_page_listen)  # checked when the configuration was read
        page = self.page = StatusPage(self.snapshot, self.waveform, password)
        try:
            self.page_port = await page.start(host or "0.0.0.0", port)
            self.page_state = "on"
            log.info("status page on http://%s:%d/ (user hub)", "[%s]" % host if ":" in host else host or "0.0.0.0",
                     self.page_port)
        except OSError as e:  # the address is taken or not ours: no page, boards served all the same
            self.page_state = "off: cannot listen on %s: %s" % (self.cfg.status_page_listen, e)
            log.error("status page %s", self.page_state)
            await page.stop()
            return
        try:
            await asyncio.Event().wait()
        finally:
            await page.stop()


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """The address to bind or connect a Unix socket at path: path itself when it fits
    SUN_PATH_BYTES, else the same file through a descriptor of its directory (Linux's
    /proc/self/fd/N/name), valid inside the block. OSError if the directory cannot be opened."""
    if len(os.fsencode(str(path))) <= SUN_PATH_BYTES:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield "/proc/self/fd/%d/%s" % (fd, path.name)
    finally:
        os.close(fd)


async def read_status(socket_path: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    """The running agent's snapshot, through its status socket.

    OSError or TimeoutError when it does not answer; ValueError when its answer
    is over STATUS_MAX_BYTES or is not a JSON object (what answers there is not
    the agent, or not whole)."""
    data = bytearray()
    async with asyncio.timeout(timeout_s):
        with socket_address(socket_path) as address:
            reader, writer = await asyncio.open_unix_connection(address)
        try:
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > STATUS_MAX_BYTES:
                    raise ValueError("its answer is over %d bytes, the most read from it" % STATUS_MAX_BYTES)
        finally:
            writer.close()
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError("its answer is JSON but not an object")
    return result
