# MQTT forwarding against a real Mosquitto, started here on a loopback port
# with TLS and client certificates made for the test.
import asyncio
import contextlib
import getpass
import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import cbor2
import pytest

from agent import config as agent_config
from agent.forwarders.base import tls_context
from agent.forwarders.mqtt import MqttConfig, MqttForwarder
from agent.ingest import record_of
from agent.store import Ingest, Store
from agent.supervisor import Agent
from protocols import cipher, cose, messages
from tests.agent import harness
from tests.waiting import async_wait_for, wait_for


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
    wait_for(lambda: _listening(port), 30, "mosquitto listening")
    return proc, port


def _stop_broker(broker: subprocess.Popen[bytes]) -> None:
    broker.terminate()
    broker.wait(10)
    if broker.stderr:
        broker.stderr.close()


def _stored(cfg: agent_config.AgentConfig) -> set[str]:
    """The idempotency keys of the sample frames in the agent's store."""
    db = Store(cfg.store_path, ["broker"]).reader()
    try:
        return {"%s:%d:%d" % r for r in db.execute("SELECT device_id, epoch, seq FROM frames WHERE kind=1")}
    finally:
        db.close()


def _keys(received: list[tuple[str, dict[str, object]]]) -> set[object]:
    """The idempotency keys of the documents received."""
    return {d["idempotency_key"] for _t, d in received}


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.micropython
def test_frames_arrive_on_documented_topics_with_idempotency_keys(make_hub: Callable[..., harness.Hub],
                                                                  mosquitto: str, pki: harness.Pki,
                                                                  tmp_path: Path) -> None:
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    hub = make_hub(2, patients=["Patient/p-1"], backends=(  # board 2 provisioned without a patient
        '[[backend]]\nname = "broker"\ntype = "mqtt"\nurl = "mqtts://localhost:%d"\nca_file = "%s"\n'
        'client_cert = "%s"\nclient_key = "%s"\n' % (port, pki.ca_cert, pki.client_cert, pki.client_key)))
    hub.defer(lambda: _stop_broker(broker))
    sims, cfg = hub.sims, hub.cfg
    received: list[tuple[str, dict[str, object]]] = []

    async def scenario() -> None:
        sub_cfg = cfg.backends[0]
        async with aiomqtt.Client("localhost", port, tls_context=tls_context(sub_cfg), identifier="test-sub") as c:
            await c.subscribe("pulsebridge/#", qos=1)
            async with harness.running(Agent(cfg)) as agent:

                async def collect() -> None:
                    async for msg in c.messages:
                        received.append((str(msg.topic), json.loads(bytes(msg.payload))))  # type: ignore[arg-type]

                collector = asyncio.create_task(collect())

                def published() -> dict[tuple[str, str], int]:
                    out: dict[tuple[str, str], int] = {}
                    for _topic, doc in received:
                        if doc["type"] == "samples":
                            k = (str(doc["device_id"]), str(doc["stream"]))
                            out[k] = out.get(k, 0) + 1
                    return out

                # Each board's two streams published, twenty frames in all.
                await async_wait_for(lambda: len(published()) == 4 and sum(published().values()) >= 20, 90,
                                     "20 sample frames of both boards' ECG and PPG on the broker", published)
                await asyncio.to_thread(lambda: [s.stop() for s in sims])
                # Nothing more can arrive once both links are closed; then all of it is forwarded.
                await async_wait_for(lambda: all(b["state"] != "connected" for b in agent.snapshot()["boards"]), 30,
                                     "both boards' links closed", lambda: agent.snapshot()["boards"])
                await async_wait_for(lambda: agent.snapshot()["backends"][0]["backlog"] == 0, 60,
                                     "the broker's backlog drained", lambda: agent.snapshot()["backends"])
                await async_wait_for(lambda: _stored(cfg) <= _keys(received), 30,
                                     "every stored frame received by the subscriber",
                                     lambda: sorted(_stored(cfg) - _keys(received))[:5])
            collector.cancel()

    asyncio.run(scenario())
    stored = _stored(cfg)
    assert len(stored) >= 20
    keys = set()
    leaves = set()
    for topic, doc in received:
        dev, leaf = topic.split("/")[2:]
        leaves.add(leaf)
        assert topic.startswith("pulsebridge/test-hub/") and dev == doc["device_id"]
        # the patient given at provisioning, on every document, vitals and alerts included
        assert doc["subject"] == ("Patient/p-1" if dev == sims[0].device_id else None), doc
        if doc["type"] != "samples":  # the hub's own vitals and alerts; the boards' origin checkpoints
            assert leaf == {"vital": "vitals", "alert": "alerts", "origin_checkpoint": "origin"}[str(doc["type"])]
            continue
        assert leaf == doc["stream"]
        assert doc["idempotency_key"] == "%s:%d:%d" % (doc["device_id"], doc["epoch"], doc["seq"])
        assert doc["cose"] and doc["channels"]
        keys.add(doc["idempotency_key"])
    assert stored <= keys, sorted(stored - keys)[:5]  # every stored frame was published and PUBACKed
    assert {"ecg", "ppg"} <= leaves and leaves <= {"ecg", "ppg", "vitals", "alerts", "origin"}


def test_draining_a_backlog_logs_no_warning_per_frame(mosquitto: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # A backlog of 200 frames forwarded in batches of 50 over TLS, QoS 1, to
    # the real broker: each batch's publishes are in flight together by
    # design, which is no reason for a warning (aiomqtt warned once per
    # publish beyond its 10 pending: 0.8 lines per frame).
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    key = bytes(range(32))
    up = cose.MacKey(key, b"pb-m1", cose.AAD_UPLINK)
    sealer, opener = cipher.SampleCipher(key, bytes(16)), cipher.SampleCipher(key)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert,
                        client_cert=pki.client_cert, client_key=pki.client_key, batch=50, linger_s=0)
    n = 200
    try:
        async def scenario() -> MqttForwarder:
            stored = []
            for s in range(n):
                raw = up.seal(messages.encoded(messages.SampleFrame(
                    1, s, 1, s, s * 4, 512, 4, (1, 1), None, (0, 0, 0, 0), [[1, 2, 3, 4]]), sealer=sealer))
                m = messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES, decode_samples=False,
                                            opener=opener)
                assert isinstance(m, messages.SampleFrame)
                f = record_of("pb-m1", m, m.channels, raw, None)  # type: ignore[arg-type]
                stored.append(store.submit_ingest(Ingest.frame(f, (1, s, 1, None))))
            await asyncio.gather(*stored)  # the backlog: committed together
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.forwarded >= n, 60, "the backlog forwarded",
                                     lambda: (fw.forwarded, fw.failures, fw.last_error))
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await fw.close()
            return fw

        with caplog.at_level(logging.INFO):
            fw = asyncio.run(scenario())
    finally:
        store.close()
        _stop_broker(broker)
    assert fw.forwarded == n and fw.failures == 0, (fw.forwarded, fw.failures, fw.last_error)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, "%d warnings for %d frames, the first: %s" % (len(warnings), n, warnings[0].getMessage())


def test_the_cbor_payload_carries_the_json_document_with_typed_arrays(mosquitto: str, tmp_path: Path) -> None:
    # payload = "cbor": the same document, each channel an RFC 8746 typed array (tag 78,
    # int32 little-endian), the COSE frame as bytes; read here by cbor2 and numpy only.
    import base64

    import numpy as np

    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    key = bytes(range(32))
    up = cose.MacKey(key, b"pb-m2", cose.AAD_UPLINK)
    sealer, opener = cipher.SampleCipher(key, bytes(16)), cipher.SampleCipher(key)
    store = Store(tmp_path / "store.db", ["j", "c"])
    store.start()
    common = dict(url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert, client_cert=pki.client_cert,
                  client_key=pki.client_key, batch=50, linger_s=0)
    cfgs = [MqttConfig(name="j", type="mqtt", topic_prefix="j", **common),  # type: ignore[arg-type]
            MqttConfig(name="c", type="mqtt", topic_prefix="c", payload="cbor", **common)]  # type: ignore[arg-type]
    ppg = [[90000, 90007, -5, 2**31 - 1], [140000, 139990, 0, -(2**31)]]  # red, ir: the int32 edges too
    received: dict[str, dict[str, dict[str, object]]] = {"j": {}, "c": {}}
    try:
        async def scenario() -> None:
            async with aiomqtt.Client("localhost", port, tls_context=tls_context(cfgs[0]), identifier="sub") as c:
                await c.subscribe("#", qos=1)
                for s in range(3):
                    raw = up.seal(messages.encoded(messages.SampleFrame(
                        1, s, messages.STREAM_PPG_MAX30102, s, s * 4, 100, 4, (1, 1), (1, 2, 3, 4), (0, 0, 0, 0),
                        ppg), sealer=sealer))
                    m = messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES, decode_samples=False,
                                                opener=opener)
                    assert isinstance(m, messages.SampleFrame)
                    await store.ingest(Ingest.frame(record_of("pb-m2", m, m.channels, raw, None),  # type: ignore[arg-type]
                                                    (1, s, 1, None)))
                fws = [MqttForwarder(cfg, store, "test-hub", asyncio.Event()) for cfg in cfgs]
                tasks = [asyncio.create_task(fw.run()) for fw in fws]

                async def collect() -> None:
                    async for msg in c.messages:
                        payload = bytes(msg.payload)  # type: ignore[arg-type]
                        prefix = str(msg.topic).split("/")[0]
                        doc = json.loads(payload) if prefix == "j" else cbor2.loads(payload)
                        received[prefix][doc["idempotency_key"]] = doc

                collector = asyncio.create_task(collect())
                try:
                    await async_wait_for(lambda: all(len(v) == 3 for v in received.values()), 60,
                                         "3 frames in each payload", lambda: {k: len(v) for k, v in received.items()})
                finally:
                    for t in [*tasks, collector]:
                        t.cancel()
                    for fw in fws:
                        await fw.close()

        asyncio.run(scenario())
    finally:
        store.close()
        _stop_broker(broker)
    for k, as_json in received["j"].items():
        as_cbor = dict(received["c"][k])
        channels = as_cbor.pop("channels")
        assert isinstance(channels, dict)
        for name, tagged in channels.items():
            assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 78
            channels[name] = np.frombuffer(tagged.value, dtype="<i4").tolist()
        assert channels == as_json["channels"] == {"red": ppg[0], "ir": ppg[1]}
        assert as_cbor.pop("cose") == base64.b64decode(str(as_json["cose"]))
        assert as_cbor == {f: v for f, v in as_json.items() if f not in ("channels", "cose")}
