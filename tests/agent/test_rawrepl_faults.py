# The raw-REPL client against boards that answer wrongly: every malformed
# answer is a clear ReplError (bounded in size and time), and provisioning
# reports it at the step it was in, without a traceback. The board here is a
# fake on a pty (named so), scripted to misbehave in ways a real MicroPython
# board does not on its own: a damaged or foreign firmware, line noise.
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.provision.provision import Provisioner
from agent.provision.rawrepl import MAX_REPLY_BYTES, RAW_BANNER, RawRepl, ReplError


class FakeMisbehavingBoard:
    """A REPL on a pty that follows the raw-REPL handshake, then answers code with answer(code)."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.controller, self.device = os.openpty()
        self.port = os.ttyname(self.device)
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self._answer_until_closed()
        except OSError:  # the test closed the pty while the fake was still answering
            pass

    def _answer_until_closed(self) -> None:
        buf = b""
        raw = False
        while not self.stop.is_set():
            data = os.read(self.controller, 4096)
            for byte in data:
                c = bytes([byte])
                if c in (b"\x03", b"\x02"):
                    buf, raw = b"", False
                    os.write(self.controller, b"\r\n>>> ")
                elif c == b"\x01":
                    buf, raw = b"", True
                    os.write(self.controller, b"\r\n" + RAW_BANNER)
                elif c == b"\x05" and raw:
                    buf = b"\x05"
                elif buf == b"\x05" and c == b"A":
                    buf = b"\x05A"
                elif buf == b"\x05A" and c == b"\x01":
                    buf = b""
                    os.write(self.controller, b"R\x00")  # no raw-paste: the plain raw REPL
                elif c == b"\x04" and raw:
                    code, buf = buf, b""
                    reply = self.answer(code)
                    for i in range(0, len(reply), 4096):
                        os.write(self.controller, reply[i:i + 4096])
                elif raw:
                    buf += c

    def close(self) -> None:
        # The device side first: the fake's blocked read then ends (EIO) and
        # its thread returns before the controller's descriptor is closed
        # under it (a closed number can be reused by another test's file).
        self.stop.set()
        os.close(self.device)
        self.thread.join(timeout=10)
        os.close(self.controller)


@pytest.fixture
def make_board() -> Iterator[Callable[[Callable[[bytes], bytes]], FakeMisbehavingBoard]]:
    made: list[FakeMisbehavingBoard] = []

    def make(answer: Callable[[bytes], bytes]) -> FakeMisbehavingBoard:
        made.append(FakeMisbehavingBoard(answer))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_an_endless_answer_is_cut(make_board: Callable[..., FakeMisbehavingBoard]) -> None:
    board = make_board(lambda code: b"OK" + b"x" * (MAX_REPLY_BYTES + 10_000))
    repl = RawRepl(board.port, timeout_s=20)
    try:
        with pytest.raises(ReplError, match="answered more than %d bytes" % MAX_REPLY_BYTES):
            repl.exec("print(1)")
    finally:
        repl.port.close()


def test_an_unfinished_answer_times_out_naming_what_is_missing(
        make_board: Callable[..., FakeMisbehavingBoard]) -> None:
    board = make_board(lambda code: b"OK1\r\n\x04")  # its output, then never the end of its error output
    repl = RawRepl(board.port, timeout_s=1.5)
    try:
        with pytest.raises(ReplError, match="no end of error output from"):
            repl.exec("print(1)")
    finally:
        repl.port.close()


def test_provisioning_names_the_step_of_a_malformed_answer(make_board: Callable[..., FakeMisbehavingBoard],
                                                          tmp_path: Path) -> None:
    board = make_board(lambda code: b"OK" + b"\xff\xfe garbage" + b"\x04\x04>")
    cfg = AgentConfig(data_dir=tmp_path / "data", log_dir=tmp_path / "log", run_dir=tmp_path / "run")
    said: list[str] = []
    res = Provisioner(cfg, board.port, said.append).run("pb-fake01")
    assert not res.ok and res.steps[-1][0] == "identify"
    assert any(s.startswith("FAILED at identify: the board's answer is not (platform") for s in said), said
    assert not (tmp_path / "data" / "registry.db").exists()  # stopped before the registry was touched
