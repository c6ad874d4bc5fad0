# `pulsebridge verify-origin` on input files that hold nothing to verify.
import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import verify_origin
from tests.conftest import ROOT


@pytest.mark.parametrize("content", [b"", b"[]", b"{\"documents\": []}\n"])
def test_an_input_with_no_frame_is_an_error_not_ok(tmp_path: Path, content: bytes) -> None:
    # an empty capture (a copy that failed, the wrong file) printed "OK: 0 frames" and exit 0
    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({"pb-sim01": "11" * 32}))
    empty = tmp_path / "received.cbor"
    empty.write_bytes(content)
    with pytest.raises(verify_origin.InputError, match="received.cbor: no frame"):
        verify_origin.verify([empty], [key])
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(key), str(empty)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no frame" in p.stderr and "OK" not in p.stdout, p.stdout + p.stderr


def test_a_pipe_is_read_no_further_than_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a FIFO, or a device such as /dev/zero, has no size to check first: the whole stream was read
    # (/dev/zero: a MemoryError traceback once memory ran out)
    monkeypatch.setattr(verify_origin, "MAX_INPUT_BYTES", 1 << 20)
    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({"pb-sim01": "11" * 32}))
    fifo = tmp_path / "capture.cbor"
    os.mkfifo(fifo)

    def feed() -> None:  # 3 MB, more than the limit: the reader stops early, so a broken pipe is expected
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            for _ in range(48):
                f.write(bytes(65536))

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with pytest.raises(verify_origin.InputError, match="capture.cbor: larger than 1048576 bytes"):
        verify_origin.verify([fifo], [key])
    writer.join(timeout=30)


def test_a_file_of_junk_gives_a_bounded_report(tmp_path: Path) -> None:
    # 2 MB of zero bytes (each a CBOR item) printed 2 000 001 lines (179 MB) and took 800 MB of memory
    from protocols import origin_verify

    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({"pb-sim01": "11" * 32}))
    junk = tmp_path / "junk.cbor"
    n = origin_verify.MAX_PROBLEMS + 500
    junk.write_bytes(bytes(n))
    rep = verify_origin.verify([junk], [key])
    assert len(rep.problems) == origin_verify.MAX_PROBLEMS and rep.problems_not_listed == 500 and not rep.ok
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(key), str(junk)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = p.stdout.splitlines()
    assert p.returncode == 1 and len(lines) == 1 + origin_verify.MAX_PROBLEMS + 1, p.stderr
    assert lines[-1] == "  ... and 500 more problems, not listed"


def test_a_gap_is_named_by_its_seqs_and_board_time_in_text_and_json(tmp_path: Path) -> None:
    from tests.agent.test_verify_origin_truncated import board_messages
    from tests.protocols.test_origin import KID, ORIGIN_KEY

    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({KID.decode(): ORIGIN_KEY.hex()}))
    msgs = board_messages(8, 4)  # frames 1-4, checkpoint 5, frames 6-9, checkpoint 10
    capture = tmp_path / "capture.cbor"
    capture.write_bytes(b"".join(m for i, m in enumerate(msgs) if i not in (1, 2)))  # seqs 2 and 3 dropped
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(key), str(capture)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    # frame(seq) starts at board time seq * 125 ms, 125 ms long
    assert p.returncode == 1 and ("  MISSING %s epoch 3 seq 2-3 (listed by the board, not received): after seq 1 "
                                  "(board time 0.125-0.250 s), before seq 4 (board time 0.500-0.625 s), about 0.250 s "
                                  "of board time" % KID.decode()) in p.stdout.splitlines(), p.stdout
    rep = verify_origin.verify([capture], [key]).as_dict()
    assert rep["missing"] == [{"device_id": KID.decode(), "epoch": 3, "seq_ranges": [[2, 3]], "spans": [
        {"seqs": [2, 3], "after": {"seq": 1, "board_t0_ms": 125, "board_end_ms": 250},
         "before": {"seq": 4, "board_t0_ms": 500, "board_end_ms": 625}, "span_ms": 250}]}]


def test_a_key_file_that_cannot_be_read_is_named_in_words_and_read_no_further_than_a_bound(tmp_path: Path) -> None:
    # --key x said "x: not a readable JSON key file ([Errno 2] No such file or directory: 'x')"; --key
    # /dev/zero (a slip for another path) read until memory ran out: a key file was read whole
    capture = tmp_path / "capture.cbor"
    capture.write_bytes(b"\x00")
    missing = tmp_path / "nowhere.origin.json"
    for key, says in ((missing, "%s: not a readable key file: No such file or directory" % missing),
                      (tmp_path, "%s: not a readable key file: Is a directory" % tmp_path),
                      (Path("/dev/zero"), "/dev/zero: larger than %d bytes: not a key file"
                       % verify_origin.MAX_KEY_FILE_BYTES)):
        p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(key), str(capture)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr == "pulsebridge verify-origin: %s\n" % says, p.stderr


@pytest.mark.parametrize(("what", "text"), [
    ("input", "[" * 200_000 + "]" * 200_000), ("input", '{"a":' * 100_000 + "1" + "}" * 100_000),
    ("input", "[" * 200_000 + "]" * 200_000 + "\n[]\n"), ("key", '{"a":' * 100_000 + "1" + "}" * 100_000)])
def test_json_nested_without_end_is_an_input_error_not_a_traceback(tmp_path: Path, what: str, text: str) -> None:
    # a document (or a key file) nested 100,000 deep ended in "RecursionError: maximum recursion depth
    # exceeded while decoding a JSON array", a traceback where a bad input is exit status 2 and a line
    key = tmp_path / "origin_keys.json"
    key.write_text(json.dumps({"pb-sim01": "11" * 32}))
    bad = tmp_path / "deep.json"
    bad.write_text(text)
    args = ["--key", str(bad if what == "key" else key), str(key if what == "key" else bad)]
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "deep.json" in p.stderr and "nested too deeply" in p.stderr, p.stderr


def test_what_the_input_names_cannot_drive_or_forge_the_operators_terminal(tmp_path: Path) -> None:
    # verify-origin exists for input made by a hub that may be compromised: a frame whose kid (its device id)
    # held "\x1b[2J" cleared the operator's terminal, and a "\n" in it forged a line of the report
    from protocols import cipher, cose, messages

    key = bytes(range(32))
    up = cose.MacKey(key, "\x1b[2J\nOK: all\u202e".encode(), cose.AAD_UPLINK)
    raw = up.seal(messages.encoded(messages.SampleFrame(1, 0, 1, 0, 0, 512, 4, (1, 1), None, (0, 0, 0, 0),
                                                        [[1, 2, 3, 4]]), sealer=cipher.SampleCipher(key, bytes(16))))
    capture = tmp_path / "evil.cbor"
    capture.write_bytes(raw)
    keys = tmp_path / "origin_keys.json"
    keys.write_text(json.dumps({"pb-sim01": "11" * 32}))
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--key", str(keys), str(capture)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "\x1b" not in p.stdout and "\u202e" not in p.stdout, repr(p.stdout)
    lines = p.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("NOT PROVEN: 1 frames"), lines
    assert lines[1] == ("  UNPROVEN \\x1b[2J\\nOK: all\ufffd\ufffd\ufffd epoch 1 seq 0: no origin key for this "
                        "device"), lines
    # a kid is read as ASCII (other bytes: U+FFFD); what else a report quotes is escaped alike
    from agent.logs import escape

    assert escape("a\u202eb\x85c\x9b") == "a\\u202eb\\x85c\\x9b"
