"""`pulsebridge verify-origin`: what a backend received, checked against the
boards' origin checkpoints (protocols/origin.py) with the origin keys only.

Inputs, each a file: a capture of raw COSE messages as the boards sent them,
concatenated (`pulsebridge sim --capture`, or a backend keeping the raw
COSE); JSON from the forwarders: one document, a list of them, JSON Lines
(MQTT, webhook), or FHIR Bundles / Observations (the COSE in their
`urn:pulsebridge:extension:cose` extension); or the CBOR documents of the
`cbor` payloads (MQTT messages or webhook batches, concatenated; samples
as RFC 8746 int32 typed arrays). The decoded samples of a
document are compared with the board's own, decrypted with the boot key its
checkpoint carries.
"""

from __future__ import annotations

import array
import base64
import binascii
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2

from agent.errors import PulsebridgeError
from agent.forwarders.fhir import COSE_EXTENSION
from agent.forwarders.mqtt import TAG_INT32_LE
from agent.logs import escape
from protocols import cbor
from protocols import origin_verify as origin
from protocols.errors import ProtocolError

# A capture or document file larger than this is refused (read whole into memory).
MAX_INPUT_BYTES = 1 << 30
# A key file larger than this is refused: an origin key is ~100 bytes of JSON, a simulator's
# origin_keys.json one line per board (a slip such as --key /dev/zero must not read on without end).
MAX_KEY_FILE_BYTES = 1 << 20
KEY_BYTES = 32


class InputError(PulsebridgeError):
    """An input or key file that cannot be read; says which and why."""


def _json(text: bytes | str) -> Any:
    """json.loads, whose RecursionError (a document nested tens of thousands deep) is a ValueError like
    any other malformed input's (it was a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def load_keys(paths: list[Path]) -> dict[str, bytes]:
    """Origin keys from files: {"<device id>": "<hex>", ...} (a simulator's origin_keys.json) or
    {"device_id": ..., "origin_key": "<hex>"} (what provisioning hands the operator)."""
    keys: dict[str, bytes] = {}
    for p in paths:
        try:
            with p.open("rb") as f:
                text = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as e:
            raise InputError("%s: not a readable key file: %s" % (p, e.strerror or e)) from None
        if len(text) > MAX_KEY_FILE_BYTES:
            raise InputError("%s: larger than %d bytes: not a key file" % (p, MAX_KEY_FILE_BYTES))
        try:
            data = _json(text)
        except ValueError as e:
            raise InputError("%s: not a readable JSON key file (%s)" % (p, e)) from None
        if not isinstance(data, dict):
            raise InputError("%s: a key file holds a JSON object" % p)
        pairs = [(data.get("device_id"), data.get("origin_key"))] if "origin_key" in data else list(data.items())
        for dev, hexkey in pairs:
            try:
                key = bytes.fromhex(str(hexkey))
            except ValueError:
                key = b""
            if not isinstance(dev, str) or len(key) != KEY_BYTES:
                raise InputError("%s: the origin key of %r is not %d bytes of hex" % (p, dev, KEY_BYTES))
            keys[dev] = key
    return keys


Message = tuple[bytes, list[list[int]] | None, str]  # (raw COSE, samples a document claims or None, where)


class _Cut:
    # Inside one input: its last record starts at at_byte and is incomplete.
    def __init__(self, at_byte: int, reason: str) -> None:
        self.at_byte = at_byte
        self.reason = reason
        self.input_bytes = 0  # the input's size, set by _read_input


def _raw_messages(data: bytes, where: str) -> Iterator[Message | _Cut]:
    pos = 0
    n = 0
    while pos < len(data):
        try:
            _item, end = cbor.decode_prefix(data, pos, (17,))
        except ProtocolError as e:
            if e.reason == "truncated":  # a CBOR item is prefix-free: only a cut leaves one incomplete at the end
                cut = _Cut(pos, "the file ends inside COSE message %d (%s)" % (n + 1, e))
                cut.input_bytes = len(data)
                yield cut
                return
            raise InputError("%s: not CBOR at byte %d (%s)" % (where, pos, e)) from None
        n += 1
        yield data[pos:end], None, "%s#%d" % (where, n)
        pos = end


def _b64(text: Any, where: str) -> bytes:
    if isinstance(text, bytes):  # a CBOR document holds the COSE as bytes
        return text
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("%s: 'cose' is not base64" % where) from None


def _ints(text: Any) -> list[int]:
    return [int(v) for v in str(text).split()]


def _from_json(obj: Any, where: str) -> Iterator[Message]:
    if isinstance(obj, list):
        for i, o in enumerate(obj):
            yield from _from_json(o, "%s[%d]" % (where, i))
        return
    if not isinstance(obj, dict):
        return
    if obj.get("resourceType") == "Bundle":
        for i, e in enumerate(obj.get("entry") or []):
            if isinstance(e, dict):
                yield from _from_json(e.get("resource"), "%s entry %d" % (where, i))
        return
    if obj.get("resourceType") == "Observation":
        raw = next((x.get("valueBase64Binary") for x in obj.get("extension") or []
                    if isinstance(x, dict) and x.get("url") == COSE_EXTENSION), None)
        if raw is None:
            return  # a vital, an alert, a gap: made by the hub, outside the proof
        chans: list[list[int]] | None = None
        try:
            if "valueSampledData" in obj:
                chans = [_ints(obj["valueSampledData"]["data"])]
            elif obj.get("component"):
                chans = [_ints(c["valueSampledData"]["data"]) for c in obj["component"]]
        except (KeyError, TypeError, ValueError):
            raise InputError("%s: an Observation's sampled data is not a list of integers" % where) from None
        yield _b64(raw, where), chans, where
        return
    kind = obj.get("type")
    if kind == "samples" and "cose" in obj:
        ch = obj.get("channels")
        chans = [_channel(v, where) for v in ch.values()] if isinstance(ch, dict) else None
        yield _b64(obj["cose"], where), chans, where
    elif kind == "origin_checkpoint" and "cose" in obj:
        yield _b64(obj["cose"], where), None, where


def _channel(v: Any, where: str) -> list[int]:
    # A document's channel: a JSON list, or an RFC 8746 typed array (tag 78: int32, little-endian).
    if isinstance(v, cbor2.CBORTag):
        if v.tag != TAG_INT32_LE or not isinstance(v.value, bytes) or len(v.value) % 4:
            raise InputError("%s: a channel is a typed array of tag %d" % (where, TAG_INT32_LE))
        a = array.array("i", v.value)
        if sys.byteorder == "big":
            a.byteswap()
        return a.tolist()
    return list(v)


def _cbor_documents(data: bytes, where: str) -> tuple[list[Any], _Cut | None] | None:
    # The CBOR documents in data (each a map with a "type", or an array of
    # them) and, if the file ends inside one, where; or None if it is not
    # such a file (a raw COSE capture: tagged COSE_Mac0 items).
    fp = io.BytesIO(data)
    dec = cbor2.CBORDecoder(fp)
    out: list[Any] = []
    n = 0
    start = 0
    try:
        while start < len(data):
            item = dec.decode()
            n += 1
            docs = item if isinstance(item, list) else [item]
            if not all(isinstance(d, dict) and "type" in d for d in docs):
                return None if n == 1 else _fail(where, n)
            out.extend(docs)
            start = fp.tell()
    except cbor2.CBORDecodeEOF as e:  # whether a document or a COSE message: cut short
        return out, _Cut(start, "the file ends inside CBOR item %d (%s)" % (n + 1, e))
    except cbor2.CBORDecodeError:
        return None if n == 0 else _fail(where, n + 1)
    return out, None


def _fail(where: str, n: int) -> Any:
    raise InputError("%s: CBOR item %d is not a pulsebridge document" % (where, n))


# A JSON string, a string running to the end of the text, or a bracket.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|"|[\[\]{}]', re.S)


def _json_cut(data: bytes) -> tuple[bytes, int] | None:
    # For one JSON text that ends inside a string or an open array or object
    # (its brackets matching until then): (its whole records, the open
    # brackets closed again after them, b"" if none; the byte where the
    # records not whole start). Records are the elements of the top-level
    # array and of a FHIR Bundle's "entry": an Observation is never closed
    # early (a component cut off would read as altered samples). None if
    # data is not a JSON text cut short.
    stack: list[tuple[bytes, bool]] = []  # closing bracket, whether its elements are records
    last_string = b""
    keep_at = 0
    keep_closers = b""
    for m in _JSON_TOKEN.finditer(data):
        t = m.group()
        if t[:1] == b'"':
            if len(t) == 1:
                break  # a string the cut ended
            last_string = t
        elif t in (b"[", b"{"):
            stack.append((b"]", not stack or last_string == b'"entry"') if t == b"[" else (b"}", False))
        elif not stack or stack.pop()[0] != t:
            return None  # brackets that do not match: malformed, not cut
        elif not stack:
            return None  # the document ended: not cut
        elif stack[-1][1]:
            keep_at = m.end()
            keep_closers = b"".join(c for c, _ in reversed(stack))
    if not stack:
        return None
    return (data[:keep_at] + keep_closers if keep_at else b""), keep_at


def _json_documents(data: bytes, where: str) -> tuple[list[Any], _Cut | None]:
    # One JSON document, or JSON Lines; either may end cut short.
    try:
        return [_json(data)], None
    except ValueError:
        pass
    whole = _json_cut(data)
    if whole is not None:
        return _salvaged(whole, 0, where)
    docs: list[Any] = []
    pos = 0
    for line in data.split(b"\n"):
        at = pos
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            docs.append(_json(line))
            continue
        except ValueError as e:
            err = e
        cut = _json_cut(line) if not data[pos:].strip() else None  # only the last record can be cut short
        if cut is None:
            raise InputError("%s: neither JSON nor JSON Lines (line at byte %d: %s)" % (where, at, err)) from None
        more, tail = _salvaged(cut, at, where)
        return docs + more, tail
    return docs, None


def _salvaged(cut: tuple[bytes, int], base: int, where: str) -> tuple[list[Any], _Cut]:
    text, keep_at = cut
    try:
        docs = [_json(text)] if text else []
    except ValueError as e:
        raise InputError("%s: not JSON before it was cut short at byte %d (%s)" % (where, base + keep_at, e)) from None
    return docs, _Cut(base + keep_at, "the file ends inside a JSON record")


def read_inputs(paths: list[Path]) -> Iterator[Message | origin.Truncated]:
    """(raw COSE, decoded samples a document claims or None, where it came from) for each message, and an
    origin_verify.Truncated after the last whole record of an input that ends inside one (a capture cut mid-record).
    Raises InputError for a file that cannot be read or parsed, or that holds nothing at all (an empty capture must
    not read as "OK: 0 frames")."""
    for p in paths:
        n = 0
        cut = False
        for item in _read_input(p):
            if isinstance(item, _Cut):
                cut = True
                yield origin.Truncated(str(p), item.at_byte, item.input_bytes - item.at_byte, n, item.reason)
                continue
            n += 1
            yield item
        if not n and not cut:
            raise InputError("%s: no frame or document in it: nothing to verify (an empty or wrong file?)" % p)


def _read_input(p: Path) -> Iterator[Message | _Cut]:
    try:
        if p.stat().st_size > MAX_INPUT_BYTES:  # a file too large, refused unread
            raise InputError("%s: larger than %d bytes" % (p, MAX_INPUT_BYTES))
        with p.open("rb") as f:  # a pipe or a device has no size to check first: read up to the bound
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise InputError("%s: %s" % (p, e.strerror or e)) from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError("%s: larger than %d bytes" % (p, MAX_INPUT_BYTES))
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        docs, cut = _json_documents(data, p.name)
        for d in docs:
            yield from _from_json(d, p.name)
    else:
        found = _cbor_documents(data, p.name)
        if found is None:
            yield from _raw_messages(data, p.name)
            return
        cbor_docs, cut = found
        for i, d in enumerate(cbor_docs):
            yield from _from_json(d, "%s[%d]" % (p.name, i))
    if cut is not None:
        cut.input_bytes = len(data)
        yield cut


def verify(inputs: list[Path], key_files: list[Path]) -> origin.Report:
    v = origin.Verifier(load_keys(key_files))
    for item in read_inputs(inputs):
        if isinstance(item, origin.Truncated):
            v.add_truncated(item)
        else:
            v.add(*item)
    return v.report()


def _when(span: dict[str, Any]) -> str:
    # Where a gap lies on the board's clock, from the frames received around it.
    after, before = span["after"], span["before"]
    if after is None and before is None:
        return ": no frame of this boot received around it"
    parts = []
    if after is not None:
        parts.append("after seq %d (board time %.3f-%.3f s)" % (after["seq"], after["board_t0_ms"] / 1000,
                                                                 after["board_end_ms"] / 1000))
    if before is not None:
        parts.append("before seq %d (board time %.3f-%.3f s)" % (before["seq"], before["board_t0_ms"] / 1000,
                                                                  before["board_end_ms"] / 1000))
    text = ": " + ", ".join(parts)
    if span["span_ms"] is not None:
        text += ", about %.3f s of board time" % (max(0, span["span_ms"]) / 1000)
    return text


_HEADLINE = {origin.VERIFIED: "OK", origin.NOT_PROVEN: "NOT PROVEN",
             origin.TRUNCATED: "TRUNCATED (all before the cut holds)"}
# Exit statuses of `pulsebridge verify-origin`.
EXIT_STATUS = {origin.VERIFIED: 0, origin.NOT_PROVEN: 1, origin.TRUNCATED: 3}
EXIT_INPUT_ERROR = 2


def text(rep: origin.Report) -> str:
    lines = ["%s: %d frames, %d proven, %d waiting for a checkpoint, %d altered, %d unproven"
             % (_HEADLINE[rep.status], len(rep.frames), rep.count(origin.PROVEN), rep.count(origin.PENDING),
                rep.count(origin.ALTERED), rep.count(origin.UNPROVEN))]
    for f in rep.frames:
        if f.verdict in (origin.ALTERED, origin.UNPROVEN):
            lines.append("  %s %s epoch %d seq %d: %s" % (f.verdict.upper(), f.device_id, f.epoch, f.seq, f.why))
    for g in rep.gaps():
        for span in g["spans"]:  # type: ignore[attr-defined]
            a, b = span["seqs"]
            lines.append("  MISSING %s epoch %s seq %s (listed by the board, not received)%s"
                         % (g["device_id"], g["epoch"], str(a) if a == b else "%d-%d" % (a, b), _when(span)))
    for dev, epoch, index in rep.missing_checkpoints:
        lines.append("  MISSING CHECKPOINT %s epoch %d index %d" % (dev, epoch, index))
    for p in rep.problems:
        lines.append("  PROBLEM " + p)
    if rep.problems_not_listed:
        lines.append("  ... and %d more problems, not listed" % rep.problems_not_listed)
    for t in rep.truncated:
        lines.append("  TRUNCATED %s: %d bytes from byte %d not checked (%s); the %d records before were checked"
                     % (t.where, t.bytes_not_checked, t.at_byte, t.reason, t.records_checked))
    # What the input names (a device id is a frame's kid, made by a hub that may be compromised) must
    # not drive the operator's terminal nor forge a line of the report, an "OK" one least of all.
    return "\n".join(escape(line) for line in lines)

