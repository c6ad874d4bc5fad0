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
            await asyncio.sleep(7)
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
        stored = {"%s:%d:%d" % r for r in db.execute("SELECT device_id, epoch, seq FROM frames")}
        observations = server.resources["Observation"]
        keys = {k.split("|", 1)[1] for k in observations}
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
