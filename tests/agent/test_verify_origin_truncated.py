# `pulsebridge verify-origin` on inputs cut short (a recorder killed
# mid-write, a copy cut off): everything up to the last whole record is
# verified, the cut tail is reported as such, with its own exit status
# (3: not "verified" 0, not "not proven" 1). Before, a cut capture was
# refused whole ("not CBOR at byte ...", exit 2) and nothing in it checked.
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import verify_origin
from agent.forwarders.fhir import COSE_EXTENSION
from protocols import origin_verify
from tests.conftest import ROOT
from tests.protocols.test_origin import KID, ORIGIN_KEY, channels, frame, ind_checkpoint, ind_digest, ind_message

DEVICE = KID.decode()


def board_messages(n_frames: int = 10, every: int = 4, end_with_checkpoint: bool = False) -> list[bytes]:
    # What a board sends, in its order: frames at seqs 1.., a checkpoint
    # after each `every` (taking the next seq); optionally one for the rest.
    out: list[bytes] = []
    pending: list[tuple[int, bytes]] = []
    seq = 1
    index = 0
    for i in range(n_frames):
        f = frame(seq)
        out.append(f)
        pending.append((seq, ind_digest(f)))
        seq += 1
        if len(pending) == every or (end_with_checkpoint and i == n_frames - 1):
            out.append(ind_message(seq, ind_checkpoint(index, pending)))
            index += 1
            pending = []
            seq += 1
    return out


def is_checkpoint(raw: bytes) -> bool:
    return bool(cbor2.loads(cbor2.loads(raw).value[2])[0] == 10)


def document(raw: bytes) -> dict[str, Any]:
    if is_checkpoint(raw):
        return {"type": "origin_checkpoint", "cose": base64.b64encode(raw).decode()}
    return {"type": "samples", "cose": base64.b64encode(raw).decode(), "channels": {"ecg": channels(raw)[0]}}


def observation(raw: bytes) -> dict[str, Any]:
    obs: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                           "extension": [{"url": COSE_EXTENSION, "valueBase64Binary": base64.b64encode(raw).decode()}]}
    if not is_checkpoint(raw):
        obs["valueSampledData"] = {"data": " ".join(str(v) for v in channels(raw)[0])}
    return obs


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "origin_keys.json"
    p.write_text(json.dumps({DEVICE: ORIGIN_KEY.hex()}))
    return p


def check_cut(tmp_path: Path, key: Path, data: bytes, cut: int, last_start: int, name: str) -> origin_verify.Report:
    # data cut at `cut` (inside its last record, which starts at last_start):
    # the whole records before are verified, the tail is reported cut.
    p = tmp_path / name
    p.write_bytes(data[:cut])
    rep = verify_origin.verify([p], [key])
    assert rep.status == origin_verify.TRUNCATED, (cut, rep.as_dict())
    assert not rep.ok and rep.complete_part_holds
    assert rep.count(origin_verify.ALTERED) == rep.count(origin_verify.UNPROVEN) == 0
    assert not rep.missing and not rep.problems
    [t] = rep.truncated
    assert t.where == str(p) and t.at_byte <= last_start and t.at_byte + t.bytes_not_checked == cut
    return rep


def test_raw_capture_cut_at_every_byte_of_its_last_record(tmp_path: Path, key_file: Path) -> None:
    msgs = board_messages(10, 4)  # ... checkpoint (seq 10), frames 11, 12: the last one pending
    data = b"".join(msgs)
    last_start = len(data) - len(msgs[-1])
    whole = verify_origin.verify([_write(tmp_path / "whole.cbor", data)], [key_file])
    assert whole.status == origin_verify.VERIFIED and whole.count(origin_verify.PROVEN) == 8
    for cut in range(last_start + 1, len(data)):
        rep = check_cut(tmp_path, key_file, data, cut, last_start, "capture.cbor")
        [t] = rep.truncated
        assert t.at_byte == last_start and t.records_checked == len(msgs) - 1
        assert "inside COSE message %d" % len(msgs) in t.reason
        # nothing complete lost: 8 proven, frame 11 waiting; frame 12 was the cut record
        assert rep.count(origin_verify.PROVEN) == 8 and rep.count(origin_verify.PENDING) == 1


def test_raw_capture_cut_inside_its_last_checkpoint(tmp_path: Path, key_file: Path) -> None:
    # The frames the cut checkpoint listed wait for a checkpoint: not forged, not missing.
    msgs = board_messages(8, 4)
    assert is_checkpoint(msgs[-1])
    data = b"".join(msgs)
    last_start = len(data) - len(msgs[-1])
    for cut in range(last_start + 1, len(data)):
        rep = check_cut(tmp_path, key_file, data, cut, last_start, "capture.cbor")
        assert rep.count(origin_verify.PROVEN) == 4 and rep.count(origin_verify.PENDING) == 4


def test_capture_whose_only_record_is_cut_reports_the_cut_not_an_empty_file(tmp_path: Path, key_file: Path) -> None:
    msg = board_messages(1, 4)[0]
    rep = check_cut(tmp_path, key_file, msg, len(msg) // 2, 0, "capture.cbor")
    assert not rep.frames and rep.truncated[0].records_checked == 0


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _json_lines(docs: list[dict[str, Any]]) -> tuple[bytes, int, int]:
    # (the export, where its last record starts, bytes after that record's end)
    head = b"".join(json.dumps(d).encode() + b"\n" for d in docs[:-1])
    return head + json.dumps(docs[-1]).encode() + b"\n", len(head), 1


def _json_list(docs: list[dict[str, Any]]) -> tuple[bytes, int, int]:
    # (the export, where its last record starts, bytes after that record's end)
    head = json.dumps(docs[:-1], indent=1)[:-2].encode() + b",\n "  # '[\n {...},\n {...}' then the last
    data = head + json.dumps(docs[-1], indent=1).encode() + b"\n]"
    assert json.loads(data) == docs
    return data, len(head), 2


def _fhir_bundle(docs: list[dict[str, Any]]) -> tuple[bytes, int, int]:
    # (the export, where its last record starts, bytes after that record's end)
    entries = [{"resource": d, "request": {"method": "POST", "url": "Observation"}} for d in docs]
    head = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries[:-1]})[:-2].encode() + b", "
    data = head + json.dumps(entries[-1]).encode() + b"]}"
    assert json.loads(data)["entry"] == entries
    return data, len(head), 2


def _cbor_docs(docs: list[dict[str, Any]]) -> tuple[bytes, int, int]:
    # (the export, where its last record starts, bytes after that record's end)
    items = [dict(d, cose=base64.b64decode(d["cose"])) for d in docs]
    head = b"".join(cbor2.dumps(d) for d in items[:-1])
    return head + cbor2.dumps(items[-1]), len(head), 0


FORMATS = {"received.jsonl": (_json_lines, document), "received.json": (_json_list, document),
           "bundle.json": (_fhir_bundle, observation), "received.cbor": (_cbor_docs, document)}


@pytest.mark.parametrize("name", sorted(FORMATS))
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])  # (the file is rewritten)
@given(where=st.floats(0.0, 1.0, exclude_max=True))
def test_exports_cut_inside_their_last_record(tmp_path: Path, key_file: Path, name: str, where: float) -> None:
    encode, as_doc = FORMATS[name]
    msgs = board_messages(10, 4)
    data, last_start, after = encode([as_doc(m) for m in msgs])
    last_end = len(data) - after
    cut = last_start + 1 + int(where * (last_end - last_start - 1))  # inside the last record
    rep = check_cut(tmp_path, key_file, data, cut, last_start, name)
    assert rep.count(origin_verify.PROVEN) == 8 and rep.count(origin_verify.PENDING) == 1, rep.as_dict()
    assert rep.truncated[0].records_checked == len(msgs) - 1


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_whole_exports_verify(tmp_path: Path, key_file: Path, name: str) -> None:
    encode, as_doc = FORMATS[name]
    data, _, _ = encode([as_doc(m) for m in board_messages(10, 4)])
    rep = verify_origin.verify([_write(tmp_path / name, data)], [key_file])
    assert rep.status == origin_verify.VERIFIED and rep.count(origin_verify.PROVEN) == 8 and not rep.truncated


def test_ppg_observation_cut_inside_its_components_is_not_closed_early(tmp_path: Path, key_file: Path) -> None:
    # A record's own lists are not records: a cut between two components must
    # not read as an Observation with one channel (that would say "altered").
    msgs = board_messages(5, 4)
    obs = [observation(m) for m in msgs]
    chans = obs[-1].pop("valueSampledData")
    obs[-1]["component"] = [{"valueSampledData": chans}, {"valueSampledData": chans}]
    data, last_start, _ = _fhir_bundle(obs)
    cut = data.index(b"}}, {", last_start) + 3
    check_cut(tmp_path, key_file, data, cut, last_start, "bundle.json")


def test_json_malformed_in_the_middle_is_still_an_input_error(tmp_path: Path, key_file: Path) -> None:
    docs = [json.dumps(document(m)) for m in board_messages(3, 4)]
    docs[1] = docs[1][:-5]  # a broken line that is not the last: not a cut, an error
    p = _write(tmp_path / "received.jsonl", "\n".join(docs).encode() + b"\n")
    with pytest.raises(verify_origin.InputError, match="line at byte"):
        verify_origin.verify([p], [key_file])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_exit_status_and_words_for_a_cut_capture(tmp_path: Path, key_file: Path) -> None:
    msgs = board_messages(10, 4)
    data = b"".join(msgs)
    cut_at = len(data) - len(msgs[-1]) // 2
    whole = _write(tmp_path / "whole.cbor", data)
    cut = _write(tmp_path / "cut.cbor", data[:cut_at])
    p = run_cli("--key", str(key_file), str(whole))
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stdout + p.stderr
    p = run_cli("--key", str(key_file), str(cut))
    assert p.returncode == 3, p.stdout + p.stderr
    assert p.stdout.startswith("TRUNCATED"), p.stdout
    assert "TRUNCATED %s: %d bytes from byte %d not checked" % (cut, cut_at - (len(data) - len(msgs[-1])),
                                                                len(data) - len(msgs[-1])) in p.stdout
    p = run_cli("--json", "--key", str(key_file), str(cut))
    rep = json.loads(p.stdout)
    assert p.returncode == 3 and rep["status"] == "truncated" and rep["ok"] is False and rep["proven"] == 8
    assert rep["truncated"][0]["records_checked"] == len(msgs) - 1
    # forged beats cut: a frame inserted before the cut is "not proven", exit 1
    forged = _write(tmp_path / "forged.cbor", b"".join(msgs[:2]) + frame(2, base=3) + b"".join(msgs[2:])[:-3])
    p = run_cli("--json", "--key", str(key_file), str(forged))
    rep = json.loads(p.stdout)
    assert p.returncode == 1 and rep["status"] == "not proven" and rep["truncated"], rep
