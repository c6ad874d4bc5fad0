# One decoder, one schema (issue 12 §4): the same authentic but malformed
# payloads go through every decoding path of the hub (the protocol reference,
# ingest, the documents every forwarder builds, FHIR's bundle, the vitals'
# sample decoder), and all of them agree: what ingest acknowledges, every
# forwarder can forward; what any of them refuses, ingest refuses.
import asyncio
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.audit import AuditLog
from agent.forwarders import fhir
from agent.forwarders.base import document
from agent.ingest import Ingestor
from agent.registry import Registry
from agent.store import Store
from protocols import cbor, cipher, cose, hub, messages, samples
from protocols.errors import ProtocolError

DEV = "pb-diff"
KEY = bytes(range(32))
SALT = bytes(range(16, 32))
EPOCH = 1


def _head(major: int, value: int, width: int) -> bytes:
    # A CBOR head whose argument takes width (1, 2, 4, 8) bytes, shortest or not.
    fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[width]
    return bytes([(major << 5) | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + struct.pack(fmt, value)


def _shortest(major: int, value: int) -> bytes:
    for width, ai in ((0, None), (1, 24), (2, 25), (4, 26), (8, 27)):
        if ai is None and value < 24:
            return bytes([(major << 5) | value])
        if ai is not None and value < 1 << (8 * width):
            return _head(major, value, width)
    raise ValueError(value)


def _u(v: int) -> bytes:
    return _shortest(0, v)


def _bstr(b: bytes) -> bytes:
    return _shortest(2, len(b)) + b


def _sealed_channels(seq: int, channels: list[bytes]) -> list[bytes]:
    sealer = cipher.SampleCipher(KEY, SALT)
    out, offset = [], 0
    for ch in channels:
        buf = bytearray(ch)
        sealer.apply(buf, 0, len(buf), EPOCH, seq, offset)
        offset += len(buf)
        out.append(bytes(buf))
    return out


def _frame_fields(frame_seq: int, **over: bytes) -> list[tuple[bytes, bytes]]:
    """A valid ECG sample frame as (encoded key, encoded value) pairs; over replaces values by key name."""
    clear = bytearray(16)
    n = samples.encode_into([10, 12, 9, 7], 4, clear, 0)
    seq = frame_seq
    chans = b"".join(_bstr(c) for c in _sealed_channels(seq, [bytes(clear[:n])]))
    fields = {
        "type": (0, _u(1)), "version": (1, _u(messages.VERSION)), "epoch": (2, _u(EPOCH)), "seq": (3, _u(seq)),
        "stream": (4, _u(1)), "t0_ms": (5, _u(1000 + seq)), "first_index": (6, _u(seq * 4)), "rate_hz": (7, _u(512)),
        "count": (8, _u(4)), "scale": (9, b"\x82" + _u(1) + _u(1)), "status": (11, b"\x84\x00\x00\x00\x00"),
        "encoding": (12, _u(1)), "samples": (13, b"\x81" + chans), "cipher": (14, cbor.encoded(cipher.ALG_A256CTR)),
        "salt": (15, _bstr(SALT)),
    }
    return [(_u(k), over.get(name, v)) for name, (k, v) in fields.items()]


def _payload(pairs: list[tuple[bytes, bytes]], map_head: bytes | None = None, tail: bytes = b"") -> bytes:
    head = map_head if map_head is not None else _shortest(5, len(pairs))
    return head + b"".join(k + v for k, v in pairs) + tail


def _samples_field(seq: int, clear_channel: bytes) -> bytes:
    return b"\x81" + _bstr(_sealed_channels(seq, [clear_channel])[0])


def malformed_payloads(first_seq: int) -> list[tuple[str, int, bytes]]:
    """(what, seq, payload): authentic once sealed; each breaks SPEC.md one way (a few are valid, as controls)."""
    out: list[tuple[str, int, bytes]] = []
    seq = first_seq

    def add(what: str, make: Any) -> None:
        nonlocal seq
        out.append((what, seq, make(seq)))
        seq += 1

    add("valid", lambda s: _payload(_frame_fields(s)))
    add("valid, unknown extension key 64", lambda s: _payload(_frame_fields(s) + [(_u(64), _u(7))]))
    add("seq not in shortest form", lambda s: _payload(_frame_fields(s, seq=_head(0, s, 4))))
    add("type not in shortest form", lambda s: _payload(_frame_fields(s, type=_head(0, 1, 1))))
    add("map head not in shortest form", lambda s: _payload(_frame_fields(s), map_head=_head(5, 15, 1)))
    add("duplicate key seq (the last one differs)",
        lambda s: _payload(_frame_fields(s) + [(_u(3), _u(s + 1000))], map_head=_shortest(5, 16)))
    add("indefinite-length map", lambda s: _payload(_frame_fields(s), map_head=b"\xbf", tail=b"\xff"))
    add("indefinite-length samples array", lambda s: _payload(_frame_fields(
        s, samples=b"\x9f" + _samples_field(s, samples_clear())[1:] + b"\xff")))
    add("indefinite-length byte string", lambda s: _payload(_frame_fields(
        s, salt=b"\x5f" + _bstr(SALT[:8]) + _bstr(SALT[8:]) + b"\xff")))
    add("tagged t0_ms", lambda s: _payload(_frame_fields(s, t0_ms=b"\xc1" + _u(1000))))
    add("tagged map", lambda s: b"\xd8\x18" + _payload(_frame_fields(s)))
    add("float t0_ms", lambda s: _payload(_frame_fields(s, t0_ms=b"\xfb" + struct.pack(">d", 1000.0))))
    add("t0_ms 2^63", lambda s: _payload(_frame_fields(s, t0_ms=_u(2**63))))
    add("first_index 2^64 - 1", lambda s: _payload(_frame_fields(s, first_index=_u(2**64 - 1))))
    add("t0_ms 2^53 (one past the bound)", lambda s: _payload(_frame_fields(s, t0_ms=_u(2**53))))
    add("valid, t0_ms 2^53 - 1", lambda s: _payload(_frame_fields(s, t0_ms=_u(2**53 - 1))))
    add("sample varint not in shortest form", lambda s: _payload(_frame_fields(
        s, samples=_samples_field(s, b"\x14\x84\x00\x05\x03"))))
    add("sample beyond int32", lambda s: _payload(_frame_fields(
        s, samples=_samples_field(s, b"\x80\x80\x80\x80\x10\x01\x01\x01"))))
    add("sample data one varint short", lambda s: _payload(_frame_fields(
        s, samples=_samples_field(s, b"\x14\x04\x05"))))
    add("trailing byte after the map", lambda s: _payload(_frame_fields(s), tail=b"\x00"))
    add("negative scale", lambda s: _payload(_frame_fields(s, scale=b"\x82\x20\x01")))
    return out


def samples_clear() -> bytes:
    clear = bytearray(16)
    return bytes(clear[:samples.encode_into([10, 12, 9, 7], 4, clear, 0)])


def reference_accepts(payload: bytes) -> bool:
    """protocols/ alone: the strict decoder and the reference sample decoder."""
    try:
        m = messages.decode_payload(payload, messages.UPLINK_TYPES, opener=cipher.SampleCipher(KEY))
    except ProtocolError:
        return False
    assert isinstance(m, messages.SampleFrame)
    return True


class Hub:
    def __init__(self, tmp: Path) -> None:
        self.registry = Registry(tmp / "registry.db", AuditLog(tmp / "audit.log"))
        self.registry.add(DEV, key=KEY, actor="test", patient_ref="Patient/p1")
        self.store = Store(tmp / "store.db", ["b"])
        self.store.start()
        self.reader = self.store.reader()

    def close(self) -> None:
        self.reader.close()
        self.store.close()
        self.registry.close()

    def ingest(self, payloads: list[bytes]) -> list[tuple[bool | None, int | None]]:
        """For each sealed payload: did ingest accept it (True), refuse it as
        malformed (False) or judge it on its seq alone (None: a replay or
        duplicate, its samples unread), and the seq it acknowledged as a new
        stored frame (None: none), once stored."""
        up = cose.MacKey(KEY, DEV.encode(), cose.AAD_UPLINK)

        async def go() -> list[tuple[bool | None, int | None]]:
            ing = Ingestor(self.store, self.registry)
            outs = [ing.submit(up.seal(p), "test") for p in payloads]
            for o in outs:
                if o.stored is not None:
                    await o.stored
            res: list[tuple[bool | None, int | None]] = []
            for o in outs:
                r = o.received
                new = r.verdict == hub.ACCEPTED and bool(o.acks)
                verdict = True if new else False if r.reason.startswith("malformed") else None
                res.append((verdict, r.message.seq if new else None))  # type: ignore[union-attr]
            return res
            return res

        return asyncio.run(go())

    def forward_all(self) -> dict[int, list[str]]:
        """Every stored frame through every forwarder's document building; seq -> the paths that failed."""
        failed: dict[int, list[str]] = {}
        for row in Store.fetch_outbox(self.reader, "b", 100000):
            bad = failed.setdefault(row.seq, [])
            try:
                doc = document(row, "hub", "Patient/p1")
            except ProtocolError:
                bad.append("document")
                continue
            frame = row.frame
            for name, build in (("mqtt/webhook json", lambda d: json.dumps(d, allow_nan=False)),
                                ("webhook cbor", cbor2.dumps),
                                ("fhir", lambda d, f=frame: json.dumps(fhir.bundle([(d, f)], "hub"), allow_nan=False))):
                try:
                    build(doc)
                except (ValueError, TypeError, OverflowError, ProtocolError):
                    bad.append(name)
            # What the vitals read: the record ingest stored.
            if frame is None or [len(ch) for ch in frame.channels] != [doc["count"]] * len(doc["channels"]):
                bad.append("vitals")
        return failed


def test_every_decoding_path_agrees_on_malformed_authentic_payloads(tmp_path: Path) -> None:
    cases = malformed_payloads(1)
    h = Hub(tmp_path)
    try:
        verdicts = h.ingest([p for _, _, p in cases])
        forwarded = h.forward_all()
    finally:
        h.close()
    disagree = []
    for (what, seq, payload), (decoded, stored) in zip(cases, verdicts):
        ref = reference_accepts(payload)
        acked = stored is not None
        if decoded != ref or acked != ref or (acked and forwarded.get(seq)) or (acked and seq not in forwarded):
            disagree.append("%s: reference %s, ingest acked %s, forwarders failed %s" % (
                what, ref, acked, forwarded.get(seq)))
        assert ref == what.startswith("valid"), what  # the cases are what they say
    assert not disagree, "\n".join(disagree)


@pytest.mark.parametrize("seed", [int.from_bytes(os.urandom(4), "big")])
def test_mutated_authentic_payloads_agree(tmp_path: Path, seed: int) -> None:
    # Random byte changes inside a valid payload, sealed again (so authentic).
    print("seed", seed)
    rng = random.Random(seed)
    cases = []
    for i in range(300):
        seq = i + 1
        p = bytearray(_payload(_frame_fields(seq)))
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            pos = rng.randrange(len(p))
            if op < 0.6:
                p[pos] = rng.randrange(256)
            elif op < 0.8:
                p.insert(pos, rng.randrange(256))
            else:
                del p[pos]
        cases.append((seq, bytes(p)))
    h = Hub(tmp_path)
    try:
        verdicts = h.ingest([p for _, p in cases])
        forwarded = h.forward_all()
    finally:
        h.close()
    judged = [(payload, decoded) for (_, payload), (decoded, _) in zip(cases, verdicts) if decoded is not None]
    assert len(judged) > len(cases) // 2  # most mutants keep a fresh seq: the comparison has something to compare
    for payload, decoded in judged:
        ref = reference_accepts(payload)
        assert decoded == ref, "seed %d: payload %s: reference %s, ingest %s" % (seed, payload.hex(), ref, decoded)
    acked = {stored for _, stored in verdicts if stored is not None}
    assert acked == set(forwarded), "seed %d: acknowledged and stored differ" % seed  # acked means stored
    for seq, bad in forwarded.items():
        assert not bad, "seed %d: stored frame seq %d failed %s" % (seed, seq, bad)
