# FHIR forwarding: transaction Bundles that validate with a FHIR model
# library, and conditional creates that make a resend harmless.
import asyncio
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.forwarders import fhir
from agent.store import Store
from agent.supervisor import Agent
from tests.agent import harness
from tests.agent.fhir_server import FhirTestServer


@pytest.mark.micropython
def test_bundles_validate_and_a_resend_never_duplicates(micropython: str, tmp_path: Path) -> None:
    pki = harness.pki_for(tmp_path)
    sims = harness.start_boards(tmp_path, 1, micropython)
    server = FhirTestServer()
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims)

        async def scenario() -> Agent:
            port = await server.start(pki.server_cert, pki.server_key)
            server.fail_after_commit = 2  # two batches stored, then "crashed": they will come again
            backend = ('[[backend]]\nname = "ehr"\ntype = "fhir"\nurl = "https://127.0.0.1:%d/fhir"\n'
                       'ca_file = "%s"\nbatch = 5\n' % (port, pki.ca_cert))
            cfg = agent_config.load(harness.write_config(tmp_path, sims, backend))
            agent = Agent(cfg)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            await asyncio.sleep(12)
            await asyncio.to_thread(sims[0].stop)
            for _ in range(300):
                if agent.snapshot()["backends"][0]["backlog"] == 0:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await task
            await server.stop()
            return agent

        agent = asyncio.run(scenario())
        assert server.invalid == []
        db = Store(agent.cfg.store_path, ["ehr"]).reader()
        stored = {"%s:%d:%d" % r for r in db.execute("SELECT device_id, epoch, seq FROM frames WHERE kind=1")}
        all_obs = server.resources["Observation"]
        observations = {k: o for k, o in all_obs.items() if "valueSampledData" in o or "component" in o}
        keys = {k.split("|", 1)[1] for k in observations}
        vitals = [o for o in all_obs.values() if "valueQuantity" in o]
        codes = {c["code"] for o in vitals for c in o["code"]["coding"]}
        assert {"8867-4", "147842", "59408-5", "150456"} <= codes, codes  # heart rate and SpO2, LOINC and MDC
        hr = [o["valueQuantity"]["value"] for o in vitals if o["code"]["coding"][0]["code"] == "8867-4"]
        assert all(50 < v < 110 for v in hr), hr  # MIT-BIH 100 beats at about 75/min
        assert all(o["derivedFrom"][0]["reference"].startswith("Observation?identifier=urn:pulsebridge:frame|")
                   for o in vitals)
        assert len(stored) >= 8 and keys == stored  # each frame once, despite the resends
        assert set(server.resources["Device"]) == {fhir.HUB_SYSTEM + "|test-hub", fhir.DEVICE_SYSTEM + "|pb-t01"}
        assert agent.forwarders[0].failures >= 2
        ecg = [o for o in observations.values() if o["code"]["coding"][0]["code"] == "131330"]
        ppg = [o for o in observations.values() if o["code"]["coding"][0]["code"] == "150452"]
        assert ecg and ppg
        sd = ecg[0]["valueSampledData"]
        assert sd["period"] == round(1000 / 512, 6) and len(sd["data"].split()) == 512
        assert [c["code"]["text"].split()[0] for c in ppg[0]["component"]] == ["red", "infrared"]
    finally:
        sims[0].stop()
