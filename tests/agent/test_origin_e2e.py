# Origin proof end to end: a simulated board (the real firmware) streams
# through the agent to a real Mosquitto; what the subscriber received is
# proven by `pulsebridge verify-origin` with the origin key alone (as MQTT
# documents, and as the FHIR Bundles the FHIR forwarder would make of
# them), and a document a hub altered or dropped is caught.
import asyncio
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from agent.forwarders import fhir
from agent.forwarders.base import document, tls_context
from agent.registry import write_private
from agent.store import KIND_FRAME, KIND_ORIGIN, Store
from agent.supervisor import Agent
from tests.agent import harness
from tests.agent.test_mqtt import _start_broker, _stop_broker
from tests.conftest import ROOT
from tests.waiting import async_wait_for


def _verify(tmp: Path, docs: object, key: Path, name: str) -> tuple[int, dict[str, object]]:
    path = tmp / name
    if isinstance(docs, list) and name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:
        path.write_text(json.dumps(docs))
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--json", "--key", str(key), str(path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


@pytest.mark.slow
@pytest.mark.micropython
def test_mqtt_documents_are_proven_and_a_hubs_tampering_is_caught(make_hub: Callable[..., harness.Hub],
                                                                   mosquitto: str, pki: harness.Pki,
                                                                   tmp_path: Path) -> None:
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    backend = ('[[backend]]\nname = "broker"\ntype = "mqtt"\nurl = "mqtts://localhost:%d"\nca_file = "%s"\n'
               'client_cert = "%s"\nclient_key = "%s"\n' % (port, pki.ca_cert, pki.client_cert, pki.client_key))
    # The same documents in CBOR (typed arrays, the COSE as bytes) under another topic prefix.
    backend += ('[[backend]]\nname = "broker-cbor"\ntype = "mqtt"\nurl = "mqtts://localhost:%d"\nca_file = "%s"\n'
                'client_cert = "%s"\nclient_key = "%s"\ntopic_prefix = "pbcbor"\npayload = "cbor"\n'
                % (port, pki.ca_cert, pki.client_cert, pki.client_key))
    # A FHIR server that never answers: its outbox keeps every row, from which the
    # Bundles the FHIR forwarder sends are made below.
    backend += ('[[backend]]\nname = "fhir"\ntype = "fhir"\nurl = "https://127.0.0.1:%d/fhir"\nca_file = "%s"\n'
                % (harness.free_port(), pki.ca_cert))
    hub = make_hub(1, backends=backend)
    hub.defer(lambda: _stop_broker(broker))
    sims, cfg = hub.sims, hub.cfg
    docs: list[dict[str, object]] = []
    cbor_payloads: list[bytes] = []

    async def scenario() -> None:
        async with aiomqtt.Client("localhost", port, tls_context=tls_context(cfg.backends[0]),
                                  identifier="test-origin") as c:
            await c.subscribe("pulsebridge/#", qos=1)
            await c.subscribe("pbcbor/#", qos=1)
            async with harness.running(Agent(cfg)):

                async def collect() -> None:
                    async for msg in c.messages:
                        if str(msg.topic).startswith("pbcbor/"):
                            cbor_payloads.append(bytes(msg.payload))  # type: ignore[arg-type]
                        else:
                            docs.append(json.loads(bytes(msg.payload)))  # type: ignore[arg-type]

                collector = asyncio.create_task(collect())
                # A checkpoint every 10 s of the board's clock: two of them.
                await async_wait_for(lambda: sum(d["type"] == "origin_checkpoint" for d in docs) >= 2, 120,
                                     "two origin checkpoints on the broker",
                                     lambda: [d["type"] for d in docs][-10:])
            collector.cancel()

    asyncio.run(scenario())
    key = tmp_path / "origin.key.json"
    origin_key = sims[0].spec.origin_key
    assert origin_key is not None
    write_private(key, json.dumps({"device_id": sims[0].device_id, "origin_key": origin_key.hex()}).encode())
    # The hub never held the origin key: it is nowhere in its data directory.
    for f in (tmp_path / "data").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert origin_key not in data and origin_key.hex().encode() not in data, f
    received = [d for d in docs if d["type"] in ("samples", "origin_checkpoint")]
    rc, rep = _verify(tmp_path, received, key, "docs.jsonl")
    assert rc == 0 and rep["ok"], rep
    assert isinstance(rep["proven"], int) and rep["proven"] >= 10, rep
    # The CBOR payloads, as a backend would keep them (concatenated).
    cbor_file = tmp_path / "docs.cbor"
    cbor_file.write_bytes(b"".join(cbor_payloads))
    p = subprocess.run([sys.executable, "-m", "agent.cli", "verify-origin", "--json", "--key", str(key),
                        str(cbor_file)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    rep_cbor = json.loads(p.stdout)
    assert p.returncode == 0 and isinstance(rep_cbor["proven"], int) and rep_cbor["proven"] >= 10, (p.stderr, rep_cbor)
    # What the hub stored, as the FHIR forwarder's Bundles (samples compared from valueSampledData).
    db = Store(cfg.store_path, ["broker", "fhir"]).reader()
    try:
        rows = [r for r in Store.fetch_outbox(db, "fhir", 100000) if r.kind in (KIND_FRAME, KIND_ORIGIN)]
    finally:
        db.close()
    assert sum(r.kind == KIND_ORIGIN for r in rows) >= 2
    bundle = fhir.bundle([(document(r, "test-hub"), r.frame) for r in rows], "test-hub")
    rc, rep_fhir = _verify(tmp_path, bundle, key, "bundle.json")
    assert rc == 0 and isinstance(rep_fhir["proven"], int) and rep_fhir["proven"] >= rep["proven"], rep_fhir
    # A hub that changes one decoded sample, or drops a frame (insertions: tests/protocols/test_origin.py).
    proven_frames = sorted((d for d in received if d["type"] == "samples"), key=lambda d: int(str(d["seq"])))
    victim = proven_frames[2]
    altered = copy.deepcopy(received)
    for d in altered:
        if d.get("idempotency_key") == victim["idempotency_key"]:
            chans = d["channels"]
            assert isinstance(chans, dict)
            first = next(iter(chans))
            chans[first][7] += 100
    rc, rep = _verify(tmp_path, altered, key, "altered.jsonl")
    assert rc == 1 and [a["seq"] for a in rep["altered"]] == [victim["seq"]], rep  # type: ignore[index]
    dropped = [d for d in received if d.get("idempotency_key") != victim["idempotency_key"]]
    rc, rep = _verify(tmp_path, dropped, key, "dropped.jsonl")
    assert rc == 1 and [{k: g[k] for k in ("device_id", "epoch", "seq_ranges")} for g in rep["missing"]] == [
        {"device_id": sims[0].device_id, "epoch": victim["epoch"], "seq_ranges": [[victim["seq"], victim["seq"]]]}], rep
    [span] = rep["missing"][0]["spans"]  # type: ignore[index]
    assert span["after"]["seq"] < victim["seq"] < span["before"]["seq"] and span["span_ms"] is not None, span
