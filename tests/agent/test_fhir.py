# FHIR forwarding: transaction Bundles that validate with a FHIR model
# library, and conditional creates that make a resend harmless (the
# project's own server, for its fault injection); against an independent
# server (Medplum's FHIR router), an outage then recovery with nothing
# dangling, and a frame refused for good quarantined, not retried forever.
import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.forwarders import fhir
from agent.store import Store
from agent.supervisor import Agent
from tests.agent import harness
from tests.agent.fhir_server import FhirTestServer
from tests.agent.medplum import MedplumServer
from tests.waiting import async_wait_for


@pytest.fixture
def medplum(pki: harness.Pki, tmp_path: Path) -> Iterator[MedplumServer]:
    """An independent FHIR server (Medplum's router) with the test's certificate, stopped after the test."""
    server = MedplumServer(pki.server_cert, pki.server_key, tmp_path / "medplum.log")
    yield server
    server.stop()


@pytest.mark.micropython
def test_bundles_validate_and_a_resend_never_duplicates(make_hub: Callable[..., harness.Hub]) -> None:
    hub = make_hub(1)
    pki, sims = hub.pki, hub.sims
    server = FhirTestServer()

    async def scenario() -> Agent:
        port = await server.start(pki.server_cert, pki.server_key)
        server.fail_after_commit = 2  # two batches stored, then "crashed": they will come again
        backend = ('[[backend]]\nname = "ehr"\ntype = "fhir"\nurl = "https://127.0.0.1:%d/fhir"\n'
                   'ca_file = "%s"\nbatch = 5\n' % (port, pki.ca_cert))
        async with harness.running(Agent(hub.configure(backend))) as agent:
            # Heart rate and SpO2 at the server, after the two batches it took and then "lost".
            await async_wait_for(lambda: ({"8867-4", "59408-5"} <= _vital_codes(server)
                                          and agent.forwarders[0].failures >= 2), 120,
                                 "heart rate and SpO2 at the server after two failed batches",
                                 lambda: (_vital_codes(server), agent.snapshot()["backends"]))
            await asyncio.to_thread(sims[0].stop)
            await async_wait_for(lambda: agent.snapshot()["backends"][0]["backlog"] == 0, 60,
                                 "the backlog drained", lambda: agent.snapshot()["backends"])
        await server.stop()
        return agent

    agent = asyncio.run(scenario())
    assert server.invalid == []
    db = Store(agent.cfg.store_path, ["ehr"]).reader()
    counts = {"%s:%d:%d" % r[:3]: r[3] for r in db.execute(
        "SELECT device_id, epoch, seq, count FROM frames WHERE kind=1")}
    stored = set(counts)
    all_obs = server.resources["Observation"]
    observations = {k: o for k, o in all_obs.items()  # the frames: waveforms, not vitals
                    if "valueSampledData" in o or ("component" in o and "valueQuantity" not in o)}
    keys = {k.split("|", 1)[1] for k in observations}
    vitals = [o for o in all_obs.values() if "valueQuantity" in o]
    codes = {c["code"] for o in vitals for c in o["code"]["coding"]}
    assert {"8867-4", "147842", "59408-5", "150456"} <= codes, codes  # heart rate and SpO2, LOINC and MDC
    hr = [o["valueQuantity"]["value"] for o in vitals if o["code"]["coding"][0]["code"] == "8867-4"]
    assert all(110 < v < 145 for v in hr), hr  # record a103l's patient: about 127 beats a minute
    assert all(o["derivedFrom"][0]["identifier"]["system"] == fhir.FRAME_SYSTEM for o in vitals)
    assert len(stored) >= 8 and keys == stored  # each frame once, despite the resends
    assert set(server.resources["Device"]) == {fhir.HUB_SYSTEM + "|test-hub", fhir.DEVICE_SYSTEM + "|pb-t01"}
    assert agent.forwarders[0].failures >= 2
    ecg = [o for o in observations.values() if o["code"]["coding"][0]["code"] == "131330"]
    ppg = [o for o in observations.values() if o["code"]["coding"][0]["code"] == "150452"]
    assert ecg and ppg
    for key, o in observations.items():  # every sample of each frame, at its period (a frame after a
        if o in ecg:                      # FIFO overflow on a loaded machine holds fewer than 512)
            sd = o["valueSampledData"]
            assert sd["period"] == round(1000 / 512, 6) and len(sd["data"].split()) == counts[key.split("|", 1)[1]]
    assert [c["code"]["text"].split()[0] for c in ppg[0]["component"]] == ["red", "infrared"]


def _frame_keys(agent: Agent) -> set[str]:
    db = Store(agent.cfg.store_path, [b.name for b in agent.cfg.backends]).reader()
    try:
        return {"%s:%d:%d" % r for r in db.execute("SELECT device_id, epoch, seq FROM frames WHERE kind=1")}
    finally:
        db.close()


def _identifier(o: dict[str, object]) -> str:
    return o["identifier"][0]["value"]  # type: ignore[index,no-any-return]


def _create_patient(server: MedplumServer, pki: harness.Pki) -> str:
    import json
    import ssl
    import urllib.request

    req = urllib.request.Request("https://127.0.0.1:%d/fhir/Patient" % server.port, method="POST",
                                 data=json.dumps({"resourceType": "Patient", "active": True}).encode(),
                                 headers={"Content-Type": "application/fhir+json"})
    with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=30) as r:
        return "Patient/%s" % json.loads(r.read())["id"]


def _vital_codes(server: FhirTestServer) -> set[str]:
    """The codes of the vitals Observations the server holds."""
    return {c["code"] for o in server.resources["Observation"].values() if "valueQuantity" in o
            for c in o["code"]["coding"]}


@pytest.mark.slow
@pytest.mark.micropython
def test_outage_then_recovery_against_an_independent_server(make_hub: Callable[..., harness.Hub],
                                                            medplum: MedplumServer, pki: harness.Pki) -> None:
    """The FHIR server goes away while a board streams, then comes back. Vitals made meanwhile
    are sent ahead of the frames they were derived from (they have the outbox's priority); the
    backlog must drain completely, every frame once, every vital's derivedFrom naming a frame
    that is there, every Observation with the patient as subject, nothing refused or lost."""
    server = medplum
    patient = _create_patient(server, pki)
    # Small batches, so the backlog at recovery spans several bundles: the vitals in the first
    # ones, the frames they cite in later ones.
    hub = make_hub(1, patients=[patient], backends=(
        '[[backend]]\nname = "ehr"\ntype = "fhir"\nurl = "https://127.0.0.1:%d/fhir"\nca_file = "%s"\n'
        'batch = 4\n' % (server.port, pki.ca_cert)))
    sims, cfg = hub.sims, hub.cfg
    figures: dict[str, int] = {}

    async def scenario() -> Agent:
        async with harness.running(Agent(cfg)) as agent:
            fw = agent.forwarders[0]
            await async_wait_for(lambda: fw.forwarded >= 5, 90, "a first delivery")
            await asyncio.to_thread(server.down)
            vitals_before = agent.vitals_runner.made
            await async_wait_for(lambda: fw.failures >= 2 and agent.vitals_runner.made >= vitals_before + 2, 120,
                                 "vitals made during the outage")
            await async_wait_for(lambda: agent.snapshot()["backends"][0]["backlog"] > 3 * fw.cfg.batch, 60,
                                 "a backlog")
            figures["backlog_at_recovery"] = agent.snapshot()["backends"][0]["backlog"]
            await asyncio.to_thread(server.up)
            await asyncio.to_thread(sims[0].stop)
            await harness.drained(agent, 180)
            figures["refused"] = agent.snapshot()["backends"][0]["refused"]
        return agent

    agent = asyncio.run(scenario())
    acked = {"%s:%d:%d" % k for k in harness.acked(sims[0])}
    stored = _frame_keys(agent)
    observations = server.resources("Observation")
    keys = [_identifier(o) for o in observations]
    # A board's origin checkpoints (one at least: the last, made as the board stops) are named like
    # its frames; they are told apart by their code.
    checkpoints = {_identifier(o) for o in observations
                   if o["code"].get("text") == "pulsebridge origin checkpoint"}
    frames = {k for k in keys if k.count(":") == 2 and not k.startswith(("vital:", "alert:", "gap:"))} - checkpoints
    vitals = [o for o in observations if "derivedFrom" in o]
    print("FHIR outage: acked %d, stored %d, delivered %d frames + %d vitals, backlog at recovery %d, "
          "lost %d" % (len(acked), len(stored), len(frames), len(vitals), figures["backlog_at_recovery"],
                       len(acked - frames - checkpoints)))
    assert len(keys) == len(set(keys))  # each once
    # Every acknowledged message delivered, nothing lost: a frame is in the store and at the server;
    # an origin checkpoint (acknowledged too, the last one as the board stops) is at the server.
    assert acked and acked <= stored | checkpoints and frames == stored
    assert figures["backlog_at_recovery"] > 0 and figures["refused"] == 0
    assert vitals and agent.forwarders[0].failures >= 2
    for v in vitals:  # nothing dangling: each source frame is on the server
        sources = {d["identifier"]["value"] for d in v["derivedFrom"]}
        assert sources <= frames, sources - frames
    assert all(o.get("subject") == {"reference": patient} for o in observations)
    devices = server.resources("Device")
    assert len(devices) == 2  # the hub and the board, created once, matched ever after
    board = next(d["id"] for d in devices if d["identifier"][0]["system"] == fhir.DEVICE_SYSTEM)
    assert all(o["device"]["reference"] == "Device/" + board for o in observations)


@pytest.mark.slow
@pytest.mark.micropython
def test_a_permanent_refusal_is_quarantined_not_retried_forever(make_hub: Callable[..., harness.Hub],
                                                                 medplum: MedplumServer, pki: harness.Pki) -> None:
    """Board 2 was provisioned with a patient the FHIR server does not hold: each of its
    Observations is refused (400). They are found one by one, quarantined with the server's
    reason and counted; board 1's frames, in the same batches, are all delivered."""
    server = medplum
    patient = _create_patient(server, pki)
    hub = make_hub(2, patients=[patient, "Patient/not-on-this-server"], backends=(
        '[[backend]]\nname = "ehr"\ntype = "fhir"\nurl = "https://127.0.0.1:%d/fhir"\nca_file = "%s"\n'
        'batch = 16\n' % (server.port, pki.ca_cert)))
    sims, cfg = hub.sims, hub.cfg

    async def scenario() -> tuple[Agent, dict[str, Any]]:
        async with harness.running(Agent(cfg)) as agent:
            fw = agent.forwarders[0]
            await async_wait_for(lambda: fw.forwarded >= 5 and agent.snapshot()["backends"][0]["refused"] >= 5, 120,
                                 "deliveries and refusals")
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sims))
            await harness.drained(agent, 180)
            snap = agent.snapshot()["backends"][0]  # what status tells, while the agent runs
        return agent, snap

    agent, snap = asyncio.run(scenario())
    stored = _frame_keys(agent)
    on_server = {_identifier(o) for o in server.resources("Observation")}
    good = {k for k in stored if k.startswith(sims[0].device_id + ":")}
    bad = {k for k in stored if k.startswith(sims[1].device_id + ":")}
    assert good and bad and good <= on_server and not any(sims[1].device_id in k for k in on_server)
    db = Store(agent.cfg.store_path, ["ehr"]).reader()
    quarantined = db.execute("SELECT device_id, reason FROM quarantine WHERE link='backend:ehr'").fetchall()
    refused = Store.counters(db).get("refused:ehr", 0)
    left = db.execute("SELECT COUNT(*) FROM frames WHERE device_id=?", (sims[1].device_id,)).fetchone()[0]
    db.close()
    print("FHIR refusal: board 1 %d frames delivered, board 2 %d frames + vitals refused and quarantined"
          % (len(good), refused))
    assert refused == len(quarantined) >= len(bad)  # its vitals and alerts too
    assert {d for d, _ in quarantined} == {sims[1].device_id}
    assert all("Patient/not-on-this-server" in r and "HTTP 400" in r for _, r in quarantined), quarantined[:2]
    assert left >= len(bad)  # refused frames stay in the store (retention), only the outbox let go
    # What status told once the backlog had drained: every refusal until then (the count is read in
    # the same transaction as the backlog). A vital the runner made from the boards' last frames may
    # still have come, and been refused, before the agent stopped.
    assert len(bad) <= snap["refused"] <= refused


def test_subject_forms_and_documents_carry_it(tmp_path: Path) -> None:
    from agent.audit import AuditLog
    from agent.forwarders.base import Subjects, document
    from agent.registry import Registry
    from agent.store import KIND_VITAL, Row

    assert fhir.subject("Patient/123") == {"reference": "Patient/123"}
    assert fhir.subject("urn:oid:1.2.250|4455") == {"type": "Patient", "identifier": {
        "system": "urn:oid:1.2.250", "value": "4455"}}
    assert fhir.subject("chambre-2") == {"type": "Patient", "identifier": {
        "system": fhir.PATIENT_SYSTEM, "value": "chambre-2"}}
    reg = Registry(tmp_path / "registry.db", AuditLog(tmp_path / "audit.log"))
    dev = reg.add("pb-1", patient_ref="Patient/7")
    reg.add("pb-2")
    subjects = Subjects(reg)
    assert subjects.of("pb-1", dev.created_at + 1) == "Patient/7"
    assert subjects.of("pb-1", dev.created_at - 1) is None  # stored before this provisioning: not claimed
    assert subjects.of("pb-2", dev.created_at + 1) is None and subjects.of("pb-9", 0) is None
    row = Row(1, "pb-1", -2, 1, KIND_VITAL, None, 8, dev.created_at + 1, b"", {"type": "vital", "device_id": "pb-1"})
    assert document(row, "hub", subjects.of(row.device_id, row.received_at))["subject"] == "Patient/7"
    reg.close()


def test_later_is_retried_never_is_quarantined(tmp_path: Path) -> None:
    """Fault injection on the project's server: 401, 404, 429, 503 are "later" (the hub's settings
    or the server's state): retried, nothing quarantined. A 422 about one vital, in a batch of
    eight, is narrowed down to that vital, which alone is quarantined with the server's words."""
    from agent.forwarders.fhir import FhirConfig
    from agent.store import KIND_VITAL, PRIORITY_VITALS, Ingest

    pki = harness.pki_for(tmp_path)
    server = FhirTestServer()
    store = Store(tmp_path / "store.db", ["ehr"])
    store.open()
    store.start()

    async def scenario() -> fhir.FhirForwarder:
        port = await server.start(pki.server_cert, pki.server_key)
        for seq in range(1, 9):
            await store.ingest(Ingest("pb-v1", -2, seq, KIND_VITAL, b"", None, priority=PRIORITY_VITALS, info={
                "type": "vital", "kind": "heart_rate", "device_id": "pb-v1", "value": 70.0 + seq, "unit": "/min",
                "at": "2026-11-30T10:00:%02d.000Z" % seq, "quality": 0.9, "source_frames": ["pb-v1:1:%d" % seq]}))
        server.answers = [401, 404, 429, 503]
        server.refuse_identifier = "vital:pb-v1:5"
        cfg = FhirConfig(name="ehr", type="fhir", url="https://127.0.0.1:%d/fhir" % port, ca_file=pki.ca_cert,
                            batch=8, linger_s=0)
        fw = fhir.FhirForwarder(cfg, store, "hub", asyncio.Event())
        fw.backoff.base_s = fw.backoff.cap_s = 0.05
        task = asyncio.create_task(fw.run())
        reader = store.reader()
        try:
            await async_wait_for(lambda: fw.forwarded == 7 and not Store.backlog(reader), 60,
                                 "every vital delivered or refused")
        finally:
            reader.close()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await server.stop()
        return fw

    try:
        fw = asyncio.run(scenario())
        assert fw.failures == 4 and fw.forwarded == 7
        assert fw.batch_limit == 8  # back to full batches once the refused vital was found
        delivered = {k.split("|", 1)[1] for k in server.resources["Observation"]}
        assert delivered == {"vital:pb-v1:%d" % s for s in range(1, 9)} - {"vital:pb-v1:5"}
        db = store.reader()
        rows = db.execute("SELECT link, device_id, reason FROM quarantine").fetchall()
        assert Store.backlog(db) == {} and Store.counters(db)["refused:ehr"] == 1
        db.close()
        assert rows == [("backend:ehr", "pb-v1", rows[0][2])] and "will never take vital:pb-v1:5" in rows[0][2]
        assert "HTTP 422" in rows[0][2]
    finally:
        store.close()


def test_an_unsafe_secret_file_is_one_clear_line_and_retried(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A client key readable by others: the backend says so (file, mode, the fix) and retries;
    no traceback, no crash; once the mode is fixed, it delivers."""
    import shutil

    from agent.forwarders.fhir import FhirConfig
    from agent.store import KIND_VITAL, PRIORITY_VITALS, Ingest

    pki = harness.pki_for(tmp_path)
    key = tmp_path / "hub.key"
    shutil.copy(pki.client_key, key)
    key.chmod(0o644)
    server = FhirTestServer()
    store = Store(tmp_path / "store.db", ["ehr"])
    store.open()
    store.start()

    async def scenario() -> fhir.FhirForwarder:
        port = await server.start(pki.server_cert, pki.server_key)
        await store.ingest(Ingest("pb-v1", -2, 1, KIND_VITAL, b"", None, priority=PRIORITY_VITALS, info={
            "type": "vital", "kind": "spo2", "device_id": "pb-v1", "value": 97.0, "unit": "%",
            "at": "2026-11-30T10:00:01.000Z", "quality": 0.9, "source_frames": ["pb-v1:1:1"]}))
        cfg = FhirConfig(name="ehr", type="fhir", url="https://127.0.0.1:%d/fhir" % port, ca_file=pki.ca_cert,
                            client_cert=pki.client_cert, client_key=key, linger_s=0)
        fw = fhir.FhirForwarder(cfg, store, "hub", asyncio.Event())
        fw.backoff.base_s = fw.backoff.cap_s = 0.05
        task = asyncio.create_task(fw.run())
        await async_wait_for(lambda: fw.failures >= 2, 30, "the refusal to use the key")
        assert "readable by others" in fw.last_error and "chmod 600 %s" % key in fw.last_error
        key.chmod(0o600)
        await async_wait_for(lambda: fw.forwarded == 1, 30, "delivery once the mode is fixed")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await server.stop()
        return fw

    try:
        asyncio.run(scenario())
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    finally:
        store.close()


def test_a_gap_record_says_which_frames() -> None:
    doc = {"type": "gap", "idempotency_key": "gap:pb-1:4", "hub_id": "h", "received_at": "2026-11-30T10:00:01Z",
           "device_id": "pb-1", "epoch": 3, "seq_ranges": [[10, 20], [25, 25]], "frames_dropped": 12,
           "reason": "disk_quota", "subject": "Patient/9"}
    obs = fhir.observation(doc, "h")
    assert obs["note"][0]["text"] == "12 frames lost at the hub, boot epoch 3, seq 10-20, 25 (disk_quota)"
    assert obs["dataAbsentReason"]["coding"][0]["code"] == "error" and obs["subject"] == {"reference": "Patient/9"}
    many = dict(doc, seq_ranges=[[i * 3, i * 3 + 1] for i in range(25)])
    assert fhir.observation(many, "h")["note"][0]["text"].endswith("and 5 more ranges (disk_quota)")
