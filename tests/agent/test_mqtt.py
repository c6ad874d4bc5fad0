# MQTT forwarding against a real Mosquitto, started here on a loopback port
# with TLS and client certificates made for the test.
import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import pytest

from agent import config as agent_config
from agent.forwarders.base import tls_context
from agent.forwarders.mqtt import MqttConfig, MqttForwarder
from agent.ingest import record_of
from agent.store import Ingest, Row, Store
from agent.supervisor import Agent
from protocols import cipher, cose, messages
from tests.agent import harness
from tests.waiting import async_wait_for, wait_for


def _start_broker(exe: str, tmp: Path, pki: harness.Pki, port: int = 0,
                  persistent: bool = False, extra: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """Mosquitto on loopback (port 0: a free one), TLS with client certificates;
    persistent: its sessions and queued messages kept in tmp across a restart; extra: more of its
    configuration's lines."""
    port = port or harness.free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        "listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nrequire_certificate true\n"
        "use_identity_as_username true\nallow_anonymous false\n%s\n"
        # Started as root, mosquitto would switch to its own user, who cannot
        # read our 0600 key: it stays who we are.
        "user %s\n%s" % (port, pki.ca_cert, pki.server_cert, pki.server_key,
                         "persistence true\npersistence_location %s/" % tmp if persistent else "persistence false",
                         getpass.getuser(), extra))
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: _listening(port), 30, "mosquitto listening")
    return proc, port


def _stop_broker(broker: subprocess.Popen[bytes]) -> None:
    broker.terminate()
    broker.wait(10)
    if broker.stderr:
        broker.stderr.close()


def _store_frames(store: Store, device_id: str, seqs: range, samples: int = 4) -> None:
    """ECG frames (4 samples unless said) of one board in the store, as ingest stores them, committed together."""
    key = bytes(range(32))
    up = cose.MacKey(key, device_id.encode(), cose.AAD_UPLINK)
    sealer, opener = cipher.SampleCipher(key, bytes(16)), cipher.SampleCipher(key)

    async def store_all() -> None:
        stored = []
        for s in seqs:
            values = [1, 2, 3, s] if samples == 4 else [(s * 7919 + 104729 * i) % 6001 - 3000 for i in range(samples)]
            raw = up.seal(messages.encoded(messages.SampleFrame(
                1, s, 1, s, s * samples, 512, samples, (1, 1), None, (0, 0, 0, 0), [values]), sealer=sealer))
            m = messages.decode_payload(cose.parse(raw).payload, messages.UPLINK_TYPES, decode_samples=False,
                                        opener=opener)
            assert isinstance(m, messages.SampleFrame)
            f = record_of(device_id, m, m.channels, raw, None)  # type: ignore[arg-type]
            stored.append(store.submit_ingest(Ingest.frame(f, (1, s, 1, None))))
        await asyncio.gather(*stored)

    asyncio.run(store_all())


def _outbox(store: Store, backend: str) -> int:
    db = store.reader()
    try:
        return int(Store.backlog(db).get(backend, 0))
    finally:
        db.close()


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
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert,
                        client_cert=pki.client_cert, client_key=pki.client_key, batch=50, linger_s=0)
    n = 200
    try:
        _store_frames(store, "pb-m1", range(n))  # the backlog: committed together

        async def scenario() -> MqttForwarder:
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
                    await asyncio.gather(*tasks, collector, return_exceptions=True)  # their stops done
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


def _children() -> set[int]:
    """The pids of this process's children (Linux /proc)."""
    out: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open("/proc/self/task/%s/children" % task) as f:
            out.update(int(p) for p in f.read().split())
    return out


def test_by_default_the_mqtt_client_runs_in_the_agent_and_starts_no_process(mosquitto: str, tmp_path: Path) -> None:
    # client = "in-process" by default: paho on the agent's loop, no process of its own
    # (~27 MB of RSS on a hub whose goal is 80 MB); "process" starts one per connection.
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["a", "b"])
    store.start()
    common = dict(url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert, client_cert=pki.client_cert,
                  client_key=pki.client_key, linger_s=0)
    try:
        _store_frames(store, "pb-d1", range(3))

        async def scenario(cfg: MqttConfig) -> set[int]:
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.forwarded == 3, 60, "3 frames forwarded",
                                     lambda: (fw.forwarded, fw.last_error))
                return _children() - {broker.pid}
            finally:
                await _stop(fw, task)

        default = MqttConfig(name="a", type="mqtt", **common)  # type: ignore[arg-type]
        assert default.client == "in-process"
        assert asyncio.run(scenario(default)) == set()
        assert len(asyncio.run(scenario(MqttConfig(name="b", type="mqtt", client="process",
                                                   **common)))) == 1  # type: ignore[arg-type]
    finally:
        store.close()
        _stop_broker(broker)


def test_a_large_batch_leaves_the_event_loop_to_other_work_while_it_is_published(mosquitto: str,
                                                                                  tmp_path: Path) -> None:
    # The client on the agent's loop: a batch of 200 is published PACKETS_PER_TURN at a time,
    # the loop's other work (a board's ack) running between (at once, the batch held the loop
    # 50-90 ms in a backlog's drain). Another task, seeing how many are published each time it
    # runs, sees a batch part-published.
    from agent import mqtt_process

    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    n = 200
    published = [0]
    seen: set[int] = set()
    try:
        _store_frames(store, "pb-s1", range(n))

        async def scenario() -> MqttForwarder:
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert,
                             client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0, batch=n)
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            opened = mqtt_process.Connection.open

            async def open_(self: mqtt_process.Connection, *args: object, **kwargs: object) -> None:
                publish = self.client.publish

                def counted(*a: object, **kw: object) -> object:
                    published[0] += 1
                    return publish(*a, **kw)  # type: ignore[arg-type]

                self.client.publish = counted  # type: ignore[method-assign]
                await opened(self, *args, **kwargs)  # type: ignore[arg-type]

            mqtt_process.Connection.open = open_  # type: ignore[method-assign]

            async def watch() -> None:
                while True:
                    seen.add(published[0])
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.forwarded == n, 60, "the batch forwarded",
                                     lambda: (fw.forwarded, fw.last_error))
            finally:
                mqtt_process.Connection.open = opened  # type: ignore[method-assign]
                watcher.cancel()
                await _stop(fw, task)
            return fw

        fw = asyncio.run(scenario())
    finally:
        store.close()
        _stop_broker(broker)
    assert fw.failures == 0 and published[0] == n, (fw.failures, published)
    part = sorted(k for k in seen if 0 < k < n)
    assert part and all(k % mqtt_process.PACKETS_PER_TURN == 0 for k in part), sorted(seen)


def test_documents_per_message_sends_a_topics_documents_in_arrays_in_stored_order(mosquitto: str,
                                                                                   tmp_path: Path) -> None:
    # documents_per_message = 3: each PUBLISH's payload is an array (JSON, or CBOR) of up to 3
    # documents of its topic; a topic's arrays, read in order, are its frames in stored order.
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["j", "c"])
    store.start()
    common = dict(url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert, client_cert=pki.client_cert,
                  client_key=pki.client_key, batch=50, linger_s=0, documents_per_message=3)
    cfgs = [MqttConfig(name="j", type="mqtt", topic_prefix="j", **common),  # type: ignore[arg-type]
            MqttConfig(name="c", type="mqtt", topic_prefix="c", payload="cbor", **common)]  # type: ignore[arg-type]
    received: list[tuple[str, object]] = []
    try:
        _store_frames(store, "pb-a1", range(7))
        _store_frames(store, "pb-a2", range(2))

        async def scenario() -> None:
            async with aiomqtt.Client("localhost", port, tls_context=tls_context(cfgs[0]), identifier="sub") as c:
                await c.subscribe("#", qos=1)
                fws = [MqttForwarder(cfg, store, "test-hub", asyncio.Event()) for cfg in cfgs]
                tasks = [asyncio.create_task(fw.run()) for fw in fws]

                async def collect() -> None:
                    async for msg in c.messages:
                        payload = bytes(msg.payload)  # type: ignore[arg-type]
                        name = str(msg.topic)
                        received.append((name, json.loads(payload) if name.startswith("j/") else cbor2.loads(payload)))

                collector = asyncio.create_task(collect())
                try:
                    await async_wait_for(lambda: all(fw.forwarded == 9 for fw in fws), 60, "9 frames each",
                                         lambda: [(fw.forwarded, fw.last_error) for fw in fws])
                    await async_wait_for(lambda: len(received) == 8, 30, "4 messages each", lambda: received)
                finally:
                    for t in [*tasks, collector]:
                        t.cancel()
                    await asyncio.gather(*tasks, collector, return_exceptions=True)
                    for fw in fws:
                        await fw.close()

        asyncio.run(scenario())
    finally:
        store.close()
        _stop_broker(broker)
    by_topic: dict[str, list[list[str]]] = {}
    for name, payload in received:
        assert isinstance(payload, list), (name, payload)
        by_topic.setdefault(name, []).append([d["idempotency_key"] for d in payload])
        assert all(d["device_id"] == name.split("/")[2] for d in payload)
    for prefix in ("j", "c"):
        assert by_topic["%s/test-hub/pb-a1/ecg" % prefix] == [["pb-a1:1:%d" % s for s in seqs]
                                                             for seqs in ((0, 1, 2), (3, 4, 5), (6,))]
        assert by_topic["%s/test-hub/pb-a2/ecg" % prefix] == [["pb-a2:1:0", "pb-a2:1:1"]]
    (cbor_doc, *_), = [p for n, p in received if n == "c/test-hub/pb-a2/ecg"]
    assert isinstance(cbor_doc["channels"]["ecg"], cbor2.CBORTag)  # the typed arrays, as one document's


class Relay:
    """A TCP relay between the forwarder and the broker, where the network's faults
    are injected: the bytes pass unchanged (TLS end to end). hold(): what the broker
    sends (its PUBACKs) is kept back until flow(); lose(): it is thrown away, on the
    connections open now; up_rate_bps: a slow uplink (bytes/s, 0: as fast as it goes).
    up_bytes counts what the client sent."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.port = 0
        self.up_bytes = 0
        self.up_rate_bps = 0
        self.connections = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._losing: set[int] = set()  # connections whose broker bytes are lost
        self._open: set[int] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def lose(self) -> None:
        self._losing |= self._open

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        me = self.connections
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            client_w.close()
            return
        self._open.add(me)

        async def up() -> None:
            while data := await client_r.read(65536):
                # Slow: 1 kB at a time, at the rate's pace (what was read before the rate was set too).
                for at in range(0, len(data), 1024 if self.up_rate_bps else len(data)):
                    piece = data[at:at + 1024] if self.up_rate_bps else data
                    self.up_bytes += len(piece)
                    broker_w.write(piece)
                    await broker_w.drain()
                    if self.up_rate_bps:
                        await asyncio.sleep(len(piece) / self.up_rate_bps)

        async def down() -> None:
            while data := await broker_r.read(65536):
                await self._flowing.wait()
                if me in self._losing:
                    continue
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._open.discard(me)
            for t in tasks:
                t.cancel()
            for w in (client_w, broker_w):
                w.close()


def _via(relay: Relay, pki: harness.Pki, batch: int, timeout_s: float, client: str = MqttConfig.client,
         documents_per_message: int = 1) -> MqttConfig:
    return MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % relay.port, ca_file=pki.ca_cert,
                      client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0, batch=batch,
                      timeout_s=timeout_s, client=client, documents_per_message=documents_per_message)


async def _stop(fw: MqttForwarder, task: "asyncio.Task[None]") -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await fw.close()


@contextlib.contextmanager
def _broker_with_a_store(mosquitto: str, tmp_path: Path, device_id: str) -> Iterator[tuple[harness.Pki, int, Store]]:
    """A broker (TLS, the test's PKI, on the port yielded) and a store whose outbox holds one frame
    of device_id for it ("broker"); both closed at the end."""
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, device_id, range(1))
        yield pki, port, store
    finally:
        store.close()
        _stop_broker(broker)


@contextlib.asynccontextmanager
async def _connected_through_a_relay(port: int, pki: harness.Pki, store: Store, backoff_cap_s: float | None = None,
                                     **via: Any) -> AsyncIterator[tuple[MqttForwarder, Relay]]:
    """A forwarder to the broker at port through a Relay (where faults are injected), _via(**via),
    once it has forwarded the store's first frame (connected); it and the relay stopped at the end."""
    relay = Relay(port)
    await relay.start()
    fw = MqttForwarder(_via(relay, pki, **via), store, "test-hub", asyncio.Event())
    if backoff_cap_s is not None:
        fw.backoff.cap_s = backoff_cap_s
    task = asyncio.create_task(fw.run())
    try:
        await async_wait_for(lambda: fw.forwarded == 1, 60, "the first frame forwarded (connected)",
                             lambda: (fw.forwarded, fw.last_error))
        yield fw, relay
    finally:
        await _stop(fw, task)
        await relay.close()


def test_a_batch_goes_out_whole_before_its_pubacks(mosquitto: str, tmp_path: Path) -> None:
    # One round trip per batch: with the broker's PUBACKs held back, every message of
    # the batch of 300 reaches the wire (aiomqtt sent 64, then waited for PUBACKs),
    # and none of its rows leaves the outbox before its PUBACK.
    n = 300
    with _broker_with_a_store(mosquitto, tmp_path, "pb-r1") as (pki, port, store):

        async def scenario() -> None:
            async with _connected_through_a_relay(port, pki, store, batch=n, timeout_s=60) as (fw, relay):
                relay.hold()
                before = relay.up_bytes
                await asyncio.to_thread(_store_frames, store, "pb-r1", range(1, n + 1))
                db = store.reader()
                try:
                    payloads = sum(len(fw.message(r)[1]) for r in Store.fetch_outbox(db, "broker", n))
                finally:
                    db.close()
                await async_wait_for(lambda: relay.up_bytes - before >= payloads, 60,
                                     "the %d payloads' %d bytes on the wire before any PUBACK" % (n, payloads),
                                     lambda: relay.up_bytes - before)
                assert fw.forwarded == 1 and await asyncio.to_thread(_outbox, store, "broker") == n
                relay.flow()
                await async_wait_for(lambda: fw.forwarded == n + 1, 60, "the batch forwarded once PUBACKed",
                                     lambda: (fw.forwarded, fw.last_error))
                assert fw.failures == 0, fw.last_error
                assert relay.connections == 1

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 0


@pytest.mark.parametrize("client, documents_per_message", [("in-process", 1), ("process", 1), ("in-process", 5)])
def test_lost_pubacks_leave_the_rows_to_be_sent_again(mosquitto: str, tmp_path: Path, client: str,
                                                      documents_per_message: int) -> None:
    # The broker's answers are lost on the way (the broker has the messages): with no
    # PUBACK for timeout_s the batch fails, none of its rows is marked forwarded, and
    # they are published again on a new connection, where they are PUBACKed. Whether the
    # client runs on the agent's loop or in its own process, a document a message or several.
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    n = 40
    received: set[str] = set()
    try:
        _store_frames(store, "pb-r2", range(1))

        async def scenario() -> None:
            relay = Relay(port)
            await relay.start()
            fw = MqttForwarder(_via(relay, pki, batch=n, timeout_s=1, client=client,
                                    documents_per_message=documents_per_message), store, "test-hub", asyncio.Event())
            tls = tls_context(fw.cfg)
            async with aiomqtt.Client("localhost", port, tls_context=tls, identifier="sub") as sub:
                await sub.subscribe("pulsebridge/#", qos=1)

                async def collect() -> None:
                    async for msg in sub.messages:
                        doc = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
                        received.update(d["idempotency_key"] for d in (doc if documents_per_message > 1 else [doc]))

                collector = asyncio.create_task(collect())
                task = asyncio.create_task(fw.run())
                try:
                    await async_wait_for(lambda: fw.forwarded == 1, 60, "the first frame forwarded (connected)",
                                         lambda: (fw.forwarded, fw.last_error))
                    relay.lose()
                    await asyncio.to_thread(_store_frames, store, "pb-r2", range(1, n + 1))
                    await async_wait_for(lambda: fw.failures >= 1, 60, "the batch given up for want of PUBACKs",
                                         lambda: (fw.forwarded, fw.last_error))
                    assert "no PUBACK" in fw.last_error, fw.last_error
                    # The broker had them all; the hub marked none of them forwarded.
                    await async_wait_for(lambda: len(received) == n + 1, 60, "the subscriber got the batch",
                                         lambda: len(received))
                    assert fw.forwarded == 1 and await asyncio.to_thread(_outbox, store, "broker") == n
                    await async_wait_for(lambda: fw.forwarded == n + 1, 60, "the batch sent again and PUBACKed",
                                         lambda: (fw.forwarded, fw.failures, fw.last_error))
                    assert relay.connections >= 2
                finally:
                    await _stop(fw, task)
                    await relay.close()
                    collector.cancel()

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 0
    finally:
        store.close()
        _stop_broker(broker)


@pytest.mark.slow
def test_a_broker_restart_mid_batch_loses_nothing(mosquitto: str, tmp_path: Path) -> None:
    # A batch is on the broker, its PUBACKs on their way, when the broker restarts: the
    # batch fails at once (the connection is gone), the forwarder reconnects once the
    # broker is back, and the whole backlog arrives (the subscriber's persistent session
    # keeps what the broker took; what the broker took twice comes twice, same key).
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki, persistent=True)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    n = 600
    received: list[str] = []
    try:
        _store_frames(store, "pb-r3", range(1))

        async def scenario() -> None:
            nonlocal broker
            relay = Relay(port)
            await relay.start()
            fw = MqttForwarder(_via(relay, pki, batch=200, timeout_s=30), store, "test-hub", asyncio.Event())
            fw.backoff.cap_s = 1.0
            tls = tls_context(fw.cfg)
            subscribed = asyncio.Event()

            async def collect() -> None:  # reconnects across the restart, its session kept by the broker
                while True:
                    try:
                        async with aiomqtt.Client("localhost", port, tls_context=tls, identifier="sub",
                                                  clean_session=False) as sub:
                            await sub.subscribe("pulsebridge/#", qos=1)
                            subscribed.set()
                            async for msg in sub.messages:
                                received.append(json.loads(bytes(msg.payload))["idempotency_key"])
                    except aiomqtt.MqttError:
                        await asyncio.sleep(0.2)

            collector = asyncio.create_task(collect())
            await asyncio.wait_for(subscribed.wait(), 30)
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.forwarded == 1, 60, "the first frame forwarded (connected)",
                                     lambda: (fw.forwarded, fw.last_error))
                relay.hold()
                await asyncio.to_thread(_store_frames, store, "pb-r3", range(1, n))
                # The first batch is on the broker (the subscriber has it), its PUBACKs held back. Its size is
                # what was committed when the forwarder read (up to 200): the frames' commits may straddle it.
                await async_wait_for(lambda: len(set(received)) >= 2, 60, "the first batch at the subscriber",
                                     lambda: len(set(received)))
                assert fw.forwarded == 1
                relay.lose()  # the PUBACKs the broker sent go with it
                await asyncio.to_thread(_stop_broker, broker)
                relay.flow()
                await async_wait_for(lambda: fw.failures >= 1, 30, "the batch failed with its connection",
                                     lambda: (fw.forwarded, fw.last_error))
                assert fw.forwarded == 1 and await asyncio.to_thread(_outbox, store, "broker") == n - 1
                broker, _ = await asyncio.to_thread(_start_broker, mosquitto, tmp_path, pki, port, True)
                await async_wait_for(lambda: fw.forwarded == n, 60, "the backlog forwarded after the restart",
                                     lambda: (fw.forwarded, fw.failures, fw.last_error))
                keys = {"pb-r3:1:%d" % s for s in range(n)}
                await async_wait_for(lambda: set(received) == keys, 60, "every frame at the subscriber",
                                     lambda: sorted(keys - set(received))[:5])
            finally:
                await _stop(fw, task)
                await relay.close()
                collector.cancel()

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 0
    finally:
        store.close()
        _stop_broker(broker)


def test_a_batch_on_a_slow_uplink_is_not_given_up_while_it_moves(mosquitto: str, tmp_path: Path) -> None:
    # A batch that takes longer than 3 x timeout_s to cross a slow uplink, its PUBACKs
    # coming all along: it is delivered at the first try (a bound on the whole delivery
    # gave it up again and again, and a backlog never drained).
    n = 200
    with _broker_with_a_store(mosquitto, tmp_path, "pb-r4") as (pki, port, store):

        async def scenario() -> None:
            async with _connected_through_a_relay(port, pki, store, batch=n, timeout_s=1.0) as (fw, relay):
                await asyncio.to_thread(_store_frames, store, "pb-r4", range(1, n + 1))
                db = store.reader()
                try:
                    payloads = sum(len(fw.message(r)[1]) for r in Store.fetch_outbox(db, "broker", n))
                finally:
                    db.close()
                relay.up_rate_bps = payloads // 5  # the batch takes 5 s or more: 5 x timeout_s
                before = relay.connections
                await async_wait_for(lambda: fw.forwarded == n + 1 or fw.failures, 120,
                                     "the batch delivered, or given up", lambda: (fw.forwarded, fw.last_error))
                assert fw.failures == 0 and fw.forwarded == n + 1, fw.last_error
                assert relay.connections == before

        asyncio.run(scenario())


def test_an_idle_connection_is_kept_alive_by_pings(mosquitto: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The broker drops a client it hears nothing from for 1.5 x its keepalive: an idle
    # forwarder sends PINGREQs (here keepalive 1 s, looked at every 0.2 s), so the
    # connection it opened is the one its next batch goes on.
    from agent.forwarders import mqtt

    monkeypatch.setattr(mqtt, "KEEPALIVE_S", 1)
    monkeypatch.setattr(mqtt, "MISC_PERIOD_S", 0.2)
    with _broker_with_a_store(mosquitto, tmp_path, "pb-k1") as (pki, port, store):

        async def scenario() -> None:
            async with _connected_through_a_relay(port, pki, store, batch=10, timeout_s=10) as (fw, relay):
                connection = fw._connection
                before = relay.up_bytes
                # Each PINGREQ is a TLS record of its own (2 bytes of MQTT, some 20 of TLS): 4 of them
                # span well over the broker's 1.5 s allowance.
                await async_wait_for(lambda: relay.up_bytes - before >= 4 * 20, 30, "PINGREQs on the idle link",
                                     lambda: relay.up_bytes - before)
                await asyncio.to_thread(_store_frames, store, "pb-k1", range(1, 3))
                await async_wait_for(lambda: fw.forwarded == 3, 60, "the next frames forwarded",
                                     lambda: (fw.forwarded, fw.last_error))
                assert fw._connection is connection and relay.connections == 1 and fw.failures == 0, fw.last_error

        asyncio.run(scenario())


def test_a_link_that_stops_answering_pings_is_closed_and_reopened(mosquitto: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # An idle link whose broker no longer answers (its bytes lost on the way) must not look
    # alive: with no PINGRESP for the keepalive the connection is closed, and the next batch
    # goes on a new one.
    from agent.forwarders import mqtt

    monkeypatch.setattr(mqtt, "KEEPALIVE_S", 1)
    monkeypatch.setattr(mqtt, "MISC_PERIOD_S", 0.2)
    with _broker_with_a_store(mosquitto, tmp_path, "pb-k2") as (pki, port, store):

        async def scenario() -> None:
            async with _connected_through_a_relay(port, pki, store, batch=10, timeout_s=10) as (fw, relay):
                connection = fw._connection
                assert connection is not None
                relay.lose()
                await async_wait_for(lambda: not connection.usable, 30, "the silent link closed",
                                     lambda: connection.down_reason)
                assert "no PINGRESP" in connection.down_reason, connection.down_reason
                await asyncio.to_thread(_store_frames, store, "pb-k2", range(1, 3))
                await async_wait_for(lambda: fw.forwarded == 3, 60, "the next frames forwarded on a new connection",
                                     lambda: (fw.forwarded, fw.last_error))
                assert relay.connections == 2

        asyncio.run(scenario())


def _first_error(cfg: MqttConfig, store: Store) -> str:
    """The forwarder's first delivery error (the scenario's own bound: 30 s)."""

    async def scenario() -> str:
        fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
        task = asyncio.create_task(fw.run())
        try:
            await async_wait_for(lambda: fw.last_error != "", 30, "a delivery error", lambda: fw.forwarded)
            return fw.last_error
        finally:
            await _stop(fw, task)

    return asyncio.run(scenario())


def test_plaintext_mqtt_to_a_tls_port_says_the_broker_expects_tls(mosquitto: str, tmp_path: Path) -> None:
    # mqtt:// on a broker's TLS port (8883) said only "no CONNACK ... in 10.0 s" (the broker had reset
    # the connection at once): nothing pointed at mqtts://
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-t1", range(1))
        error = _first_error(MqttConfig(name="broker", type="mqtt", url="mqtt://localhost:%d" % port, insecure=True,
                                        linger_s=0, timeout_s=30), store)
        assert "localhost:%d closed the connection without a CONNACK" % port in error, error
        assert "if it expects TLS (MQTT's TLS port is 8883), use mqtts://" in error, error
    finally:
        store.close()
        _stop_broker(broker)


def test_plaintext_mqtt_to_a_silent_port_names_tls_as_a_likely_cause(tmp_path: Path) -> None:
    # a TLS server that waits for the rest of what it takes for a handshake never answers a CONNECT
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads, answers nothing, until the client goes
        writer.close()

    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-t2", range(1))

        async def scenario() -> str:
            server = await asyncio.start_server(silent, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            try:
                cfg = MqttConfig(name="broker", type="mqtt", url="mqtt://127.0.0.1:%d" % port, insecure=True,
                                 linger_s=0, timeout_s=0.5)
                fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
                task = asyncio.create_task(fw.run())
                try:
                    await async_wait_for(lambda: fw.last_error != "", 30, "a delivery error", lambda: fw.forwarded)
                    return fw.last_error
                finally:
                    await _stop(fw, task)
            finally:
                server.close()

        error = asyncio.run(scenario())
        assert "no CONNACK from 127.0.0.1:" in error and "use mqtts://" in error, error
    finally:
        store.close()


def test_mqtts_to_a_plaintext_port_says_the_handshake_failed_there(mosquitto: str, tmp_path: Path) -> None:
    # the reverse: mqtts:// on a plaintext listener (1883) said only "Connection reset by peer"
    pki = harness.pki_for(tmp_path)
    port = harness.free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\nuser %s\n" % (port, getpass.getuser()))
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: _listening(port), 30, "mosquitto listening")
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-t3", range(1))
        error = _first_error(MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port,
                                        ca_file=pki.ca_cert, linger_s=0, timeout_s=30), store)
        assert "cannot connect to localhost:%d" % port in error, error
        assert "the TLS handshake failed: is it a plaintext MQTT port (1883)?" in error, error
    finally:
        store.close()
        _stop_broker(broker)


def test_the_plaintext_warning_is_logged_once_not_at_every_reconnect(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # with insecure = true, each connection attempt logged "uses plaintext mqtt://" again, a second line
    # beside each retry's: a broker down for an hour filled the log with the same warning
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-t4", range(1))

        async def scenario() -> int:
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtt://127.0.0.1:%d" % harness.free_port(),
                             insecure=True, linger_s=0, timeout_s=1)
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.failures >= 3, 30, "three failed connections", lambda: fw.last_error)
                return fw.failures
            finally:
                await _stop(fw, task)

        with caplog.at_level(logging.WARNING, logger="agent.forwarders"):
            failures = asyncio.run(scenario())
    finally:
        store.close()
    said = [r.getMessage() for r in caplog.records if "uses plaintext mqtt://" in r.getMessage()]
    assert failures >= 3 and len(said) == 1, said


def test_a_broker_the_hub_cannot_verify_is_named_and_nothing_leaves_the_outbox(mosquitto: str,
                                                                               tmp_path: Path) -> None:
    # The broker's certificate is not from the CA the hub was given: the connection fails
    # in the MQTT client's process, its reason (TLS verification) reaches the forwarder's
    # last error, and every row stays in the outbox, retried.
    pki = harness.pki_for(tmp_path)
    other = harness.pki_for(tmp_path / "other")
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-t1", range(3))

        async def scenario() -> None:
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=other.ca_cert,
                             client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0, timeout_s=5)
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            fw.backoff.cap_s = 1.0
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.failures >= 2, 60, "two connections refused by TLS",
                                     lambda: (fw.forwarded, fw.last_error))
                assert "certificate verify failed" in fw.last_error, fw.last_error
                assert fw.forwarded == 0
            finally:
                await _stop(fw, task)

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 3
    finally:
        store.close()
        _stop_broker(broker)


def test_a_broker_down_is_named_and_its_backlog_goes_once_it_is_up(mosquitto: str, tmp_path: Path) -> None:
    # Nothing listens where the broker should be: each try fails, named (refused), no row
    # leaves the outbox; once the broker is up the backlog is delivered.
    pki = harness.pki_for(tmp_path)
    port = harness.free_port()
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    broker = None
    try:
        _store_frames(store, "pb-t2", range(5))

        async def scenario() -> None:
            nonlocal broker
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert,
                             client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0, timeout_s=5)
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            fw.backoff.cap_s = 1.0
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.failures >= 2, 60, "two tries refused",
                                     lambda: (fw.forwarded, fw.last_error))
                assert "refused" in fw.last_error.lower(), fw.last_error
                assert fw.forwarded == 0 and await asyncio.to_thread(_outbox, store, "broker") == 5
                broker, _ = await asyncio.to_thread(_start_broker, mosquitto, tmp_path, pki, port)
                await async_wait_for(lambda: fw.forwarded == 5, 60, "the backlog forwarded once the broker is up",
                                     lambda: (fw.forwarded, fw.last_error))
            finally:
                await _stop(fw, task)

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 0
    finally:
        store.close()
        if broker is not None:
            _stop_broker(broker)


def test_the_client_process_ending_mid_batch_loses_nothing(mosquitto: str, tmp_path: Path) -> None:
    # The MQTT client's process is killed while a batch awaits its PUBACKs: the batch fails
    # at once, none of its rows is marked forwarded, and a new connection (a new process)
    # delivers them all.
    n = 50
    with _broker_with_a_store(mosquitto, tmp_path, "pb-t3") as (pki, port, store):

        async def scenario() -> None:
            async with _connected_through_a_relay(port, pki, store, batch=n, timeout_s=60, client="process",
                                                  backoff_cap_s=1.0) as (fw, relay):
                connection = fw._connection
                assert connection is not None and connection.pid is not None
                relay.hold()
                before = relay.up_bytes
                await asyncio.to_thread(_store_frames, store, "pb-t3", range(1, n + 1))
                await async_wait_for(lambda: relay.up_bytes - before > n * 100, 60, "the batch on the wire",
                                     lambda: relay.up_bytes - before)
                os.kill(connection.pid, signal.SIGKILL)
                await async_wait_for(lambda: fw.failures >= 1, 30, "the batch failed with its process",
                                     lambda: (fw.forwarded, fw.last_error))
                assert "process ended" in fw.last_error, fw.last_error
                assert fw.forwarded == 1 and await asyncio.to_thread(_outbox, store, "broker") == n
                relay.flow()
                await async_wait_for(lambda: fw.forwarded == n + 1, 60, "the batch sent again on a new connection",
                                     lambda: (fw.forwarded, fw.last_error))
                assert fw._connection is not connection and relay.connections >= 2

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 0


def test_documents_are_made_off_the_event_loop_and_an_undecodable_frame_is_skipped(mosquitto: str,
                                                                                   tmp_path: Path) -> None:
    # Each batch's messages are made on the read's thread (MqttForwarder.prepare), each row's
    # once; a stored frame that cannot be decoded fails its prepared batch as it would have
    # failed deliver: it is skipped (counted undeliverable), the others delivered.
    import threading

    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    made_on: list[int] = []
    try:
        _store_frames(store, "pb-p1", range(2))

        async def scenario() -> tuple[MqttForwarder, int]:
            # A frame held without its samples (a store of schema 2 whose frame did not decode): never deliverable.
            await store.ingest(Ingest("pb-p1", 1, 2, 1, b"\xd1\x84not a frame", (1, 2, 3)))
            await asyncio.to_thread(_store_frames, store, "pb-p1", range(3, 5))
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert,
                             client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0, batch=10)
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            message = fw.message

            def spied(row: Row) -> tuple[str, bytes]:
                made_on.append(threading.get_ident())
                return message(row)

            fw.message = spied  # type: ignore[method-assign]
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.forwarded == 4 and fw.undeliverable == 1, 60,
                                     "4 frames forwarded, 1 skipped",
                                     lambda: (fw.forwarded, fw.undeliverable, fw.last_error))
            finally:
                await _stop(fw, task)
            return fw, threading.get_ident()

        fw, loop_thread = asyncio.run(scenario())
        assert made_on and loop_thread not in made_on
        # The first batch (5 rows) failed on its undecodable row when prepared; the 4 others were
        # read again and prepared as the next batch: no row's message was made twice more.
        assert len(made_on) <= 5 + 4, len(made_on)
        assert _outbox(store, "broker") == 0
    finally:
        store.close()
        _stop_broker(broker)


@pytest.mark.parametrize("program, reason", [
    # A head announcing 4 GB: no record of the process's is near that.
    ("import sys, time; sys.stdout.buffer.write(b'Z\\xff\\xff\\xff\\xff'); sys.stdout.flush(); time.sleep(60)",
     "wrote a record of 4294967295 bytes"),
    # Started, never a word.
    ("import time; time.sleep(60)", "no CONNACK from 127.0.0.1:"),
    # Gone at once.
    ("pass", "process ended (exit status 0)"),
])
def test_a_client_process_that_breaks_its_word_is_ended_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  program: str, reason: str) -> None:
    # Stand-ins for the MQTT client's process (the interpreter given another program): whatever
    # it does, the delivery fails with a reason that says what, within the bounds, and the
    # process is not left behind.
    from agent.forwarders import mqtt

    monkeypatch.setattr(mqtt, "PROCESS_ARGS", ("-c", program))
    monkeypatch.setattr(mqtt, "START_BOUND_S", 1.0)
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-w1", range(1))

        async def scenario() -> tuple[str, list[int]]:
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtt://127.0.0.1:%d" % harness.free_port(),
                             insecure=True, linger_s=0, timeout_s=1, client="process")
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            pids: list[int] = []
            opened = mqtt.Connection.open

            async def open_(self: mqtt.Connection, settings: dict[str, object]) -> None:
                try:
                    await opened(self, settings)
                finally:
                    if self.pid is not None:
                        pids.append(self.pid)

            monkeypatch.setattr(mqtt.Connection, "open", open_)
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.failures >= 1, 30, "a failed delivery", lambda: fw.last_error)
                return fw.last_error, pids
            finally:
                await _stop(fw, task)

        error, pids = asyncio.run(scenario())
        assert reason in error, error
        assert _outbox(store, "broker") == 1  # nothing marked forwarded
        assert pids and not any(_running(p) for p in pids), pids
    finally:
        store.close()


def _running(pid: int) -> bool:
    # A process that exists and is not a zombie (its parent reaped it, or it is gone).
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_broker_that_takes_smaller_messages_than_a_batch_makes_is_named_with_the_setting(mosquitto: str,
                                                                                         tmp_path: Path) -> None:
    # documents_per_message = 50 makes messages of ~200 kB of ECG JSON; a broker that takes less (here
    # 128 kB, as AWS IoT Core) closes the connection at the first of them, at every retry: nothing was
    # ever forwarded, and the error said only "connection lost ...: disconnected (Unspecified error)".
    pki = harness.pki_for(tmp_path)
    broker, port = _start_broker(mosquitto, tmp_path, pki, extra="max_packet_size 131072\n")
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-big1", range(60), samples=512)

        async def scenario() -> None:
            cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://localhost:%d" % port, ca_file=pki.ca_cert,
                             client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0, batch=60,
                             timeout_s=5.0, documents_per_message=50)
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            fw.backoff.cap_s = 0.5
            task = asyncio.create_task(fw.run())
            try:
                await async_wait_for(lambda: fw.failures >= 2, 60, "the batch failed twice", lambda: fw.last_error)
                assert fw.forwarded == 0
                assert "largest message was" in fw.last_error and "documents_per_message = 50" in fw.last_error, \
                    fw.last_error
            finally:
                await _stop(fw, task)

        asyncio.run(scenario())
        assert _outbox(store, "broker") == 60  # nothing lost: every row waits
    finally:
        store.close()
        _stop_broker(broker)


@pytest.mark.parametrize("client", ["in-process", "process"])
def test_an_agent_stopped_while_a_broker_holds_its_tls_handshake_stops_at_once(tmp_path: Path, client: str) -> None:
    # paho's connect blocks (TCP, then the TLS handshake, each up to timeout_s) and ran on the loop's
    # default executor: an agent stopped while a broker held the handshake (took the connection, said
    # nothing) waited it out, as asyncio.run joins that executor's threads: 30 s here, up to 600 s with
    # timeout_s at its bound, past systemd's stop timeout.
    import socket
    import threading
    import time

    pki = harness.pki_for(tmp_path)
    held: list[socket.socket] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)
    accepted = threading.Event()

    def hold() -> None:  # takes the connection and answers nothing
        held.append(server.accept()[0])
        accepted.set()

    threading.Thread(target=hold, daemon=True).start()
    store = Store(tmp_path / "store.db", ["broker"])
    store.start()
    try:
        _store_frames(store, "pb-t5", range(1))
        cfg = MqttConfig(name="broker", type="mqtt", url="mqtts://127.0.0.1:%d" % server.getsockname()[1],
                         ca_file=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key, linger_s=0,
                         timeout_s=30.0, client=client)

        async def scenario() -> float:
            fw = MqttForwarder(cfg, store, "test-hub", asyncio.Event())
            task = asyncio.create_task(fw.run())
            await async_wait_for(accepted.is_set, 60, "the forwarder's connection taken, its handshake held")
            stop_at = time.monotonic()
            await _stop(fw, task)
            return stop_at

        stop_at = asyncio.run(scenario())  # returns as an agent's run ends, once its loop is shut down
        # Well within the handshake's 30 s (a bound for a loaded machine; it took 0.0 s here).
        assert time.monotonic() - stop_at < 10.0
    finally:
        store.close()
        server.close()
        for s in held:
            s.close()
