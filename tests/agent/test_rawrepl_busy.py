# Provisioning opens a board's port that another process may still hold
# (the hub agent looks at a newly plugged port for up to 10 s): it waits for
# it, says so once, and names the holder's likely identity if it never frees.
import os
import threading
import time
from collections.abc import Iterator

import pytest

from agent.provision.rawrepl import RawRepl, ReplError
from agent.transports.serial import open_port
from tests.waiting import wait_for


@pytest.fixture
def pty_port() -> Iterator[str]:
    controller, board = os.openpty()
    try:
        yield os.ttyname(board)
    finally:
        os.close(controller)
        os.close(board)


def test_a_held_port_is_waited_for_then_opened(pty_port: str) -> None:
    holder = open_port(pty_port, 115200, timeout_s=0.05)  # as the agent holds it: exclusively
    said: list[str] = []
    opened: list[RawRepl] = []
    t = threading.Thread(target=lambda: opened.append(RawRepl(pty_port, busy_wait_s=60, on_busy=said.append)))
    t.start()
    wait_for(lambda: said, 30, "provisioning to say the port is in use")
    assert pty_port in said[0] and "in use" in said[0]
    assert not opened  # still waiting while it is held
    holder.close()
    t.join(timeout=30)
    assert opened and opened[0].port.is_open
    assert len(said) == 1  # said once, not at every try
    opened[0].port.close()


def test_a_port_never_freed_is_a_clear_error(pty_port: str) -> None:
    holder = open_port(pty_port, 115200, timeout_s=0.05)
    try:
        with pytest.raises(ReplError) as err:
            RawRepl(pty_port, busy_wait_s=0.6)
        assert pty_port in str(err.value) and "hub agent" in str(err.value)
    finally:
        holder.close()


def test_a_missing_port_fails_at_once(tmp_path: os.PathLike[str]) -> None:
    t0 = time.monotonic()
    with pytest.raises(ReplError) as err:
        RawRepl(os.path.join(tmp_path, "ttyUSB9"), busy_wait_s=60)
    assert "ttyUSB9" in str(err.value) and time.monotonic() - t0 < 30  # not waited for: nothing holds it
