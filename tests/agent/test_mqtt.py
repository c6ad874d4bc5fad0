# MQTT forwarding against a real Mosquitto, started here on a loopback port
# with TLS and client certificates made for the test.
import asyncio
import getpass
import json
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

from agent import config as agent_config
from agent.forwarders.base import tls_context
from agent.store import Store
from agent.supervisor import Agent
from tests.agent import harness


def _start_broker(exe: str, tmp: Path, pki: harness.Pki) -> tuple[subprocess.Popen[bytes], int]:
    port = harness.free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        "listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nrequire_certificate true\n"
        "use_identity_as_username true\nallow_anonymous false\npersistence false\n"
        # Started as root, mosquitto would switch to its own user, who cannot
        # read our 0600 key: it stays who we are.
        "user %s\n" % (port, pki.ca_cert, pki.server_cert, pki.server_key, getpass.getuser()))
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    harness.wait_for(lambda: _listening(port), 10, "mosquitto listening")
    return proc, port


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.micropython
def test_frames_arrive_on_documented_topics_with_idempotency_keys(micropython: str, mosquitto: str,
                                                                  tmp_path: Path) -> None:
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    sims = harness.start_boards(tmp_path, 2, micropython)
    try:
        harness.register(tmp_path / "data", tmp_path / "log", sims[:1], patient_ref="Patient/p-1")
        harness.register(tmp_path / "data", tmp_path / "log", sims[1:])  # provisioned without a patient
        backend = ('[[backend]]\nname = "broker"\ntype = "mqtt"\nurl = "mqtts://localhost:%d"\nca_file = "%s"\n'
                   'client_cert = "%s"\nclient_key = "%s"\n' % (port, pki.ca_cert, pki.client_cert, pki.client_key))
        cfg = agent_config.load(harness.write_config(tmp_path, sims, backend))
        received: list[tuple[str, dict[str, object]]] = []

        async def scenario() -> None:
            sub_cfg = cfg.backends[0]
            async with aiomqtt.Client("localhost", port, tls_context=tls_context(sub_cfg), identifier="test-sub") as c:
                await c.subscribe("pulsebridge/#", qos=1)
                agent = Agent(cfg)
                stop = asyncio.Event()
                task = asyncio.create_task(agent.run(stop))

                async def collect() -> None:
                    async for msg in c.messages:
                        received.append((str(msg.topic), json.loads(bytes(msg.payload))))  # type: ignore[arg-type]

                collector = asyncio.create_task(collect())
                await asyncio.sleep(8)
                await asyncio.to_thread(lambda: [s.stop() for s in sims])
                for _ in range(100):
                    if agent.snapshot()["backends"][0]["backlog"] == 0:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                stop.set()
                await task
                collector.cancel()

        asyncio.run(scenario())
        store = Store(cfg.store_path, ["broker"])
        db = store.reader()
        stored = {"%s:%d:%d" % r for r in db.execute("SELECT device_id, epoch, seq FROM frames WHERE kind=1")}
        assert len(stored) >= 20
        keys = set()
        leaves = set()
        for topic, doc in received:
            dev, leaf = topic.split("/")[2:]
            leaves.add(leaf)
            assert topic.startswith("pulsebridge/test-hub/") and dev == doc["device_id"]
            # the patient given at provisioning, on every document, vitals and alerts included
            assert doc["subject"] == ("Patient/p-1" if dev == sims[0].device_id else None), doc
            if doc["type"] != "samples":  # the hub's own vitals and alerts
                assert leaf == {"vital": "vitals", "alert": "alerts"}[str(doc["type"])]
                continue
            assert leaf == doc["stream"]
            assert doc["idempotency_key"] == "%s:%d:%d" % (doc["device_id"], doc["epoch"], doc["seq"])
            assert doc["cose"] and doc["channels"]
            keys.add(doc["idempotency_key"])
        assert stored <= keys, sorted(stored - keys)[:5]  # every stored frame was published and PUBACKed
        assert {"ecg", "ppg"} <= leaves and leaves <= {"ecg", "ppg", "vitals", "alerts"}
    finally:
        for s in sims:
            s.stop()
        broker.terminate()
        broker.wait(10)
        if broker.stderr:
            broker.stderr.close()
        time.sleep(0)
