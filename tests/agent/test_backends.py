# One registry of backends: a backend type is one module of agent/forwarders/
# with its own settings class; a new one (here, a Kafka backend written into
# a directory of its own for the test) needs nothing else.
import asyncio
import sys
import tomllib
from pathlib import Path

import pytest

from agent import config, forwarders
from agent.forwarders.mqtt import MqttConfig, MqttForwarder

KAFKA = '''
from dataclasses import dataclass
from typing import ClassVar

from agent.config import BackendConfig, Table
from agent.forwarders.base import Forwarder


@dataclass
class KafkaConfig(BackendConfig):
    SCHEMES: ClassVar[tuple[str, str]] = ("kafkas", "kafka")
    topic: str = "pulsebridge"
    acks: str = "all"

    def take_own(self, table: Table) -> None:
        self.topic = table.text("topic", self.topic) or ""
        self.acks = table.choice("acks", ("all", "1"), self.acks)


class KafkaForwarder(Forwarder):
    async def deliver(self, rows):
        raise NotImplementedError


CONFIG = KafkaConfig
FORWARDER = KafkaForwarder
'''


def test_the_backends_are_the_modules_of_the_package() -> None:
    assert forwarders.types() == ["fhir", "mqtt", "webhook"]
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads('[[backend]]\nname = "a"\ntype = "smtp"\nurl = "x"'))
    assert e.value.field == "backend[0].type" and "fhir, mqtt, webhook" in str(e.value)


def test_each_backend_reads_its_own_settings_only() -> None:
    cfg = config.parse(tomllib.loads('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\nusername = "u"\n'
                                     'topic_prefix = "site/1"\nbatch = 20\ndocuments_per_message = 25\n'
                                     'client = "process"'))
    (b,) = cfg.backends
    assert isinstance(b, MqttConfig) and (b.username, b.topic_prefix, b.batch, b.documents_per_message, b.client) == (
        "u", "site/1", 20, 25, "process")
    assert isinstance(forwarders.make(b, None, "hub", asyncio.Event()), MqttForwarder)  # type: ignore[arg-type]
    with pytest.raises(config.ConfigError) as e:  # an MQTT setting on a webhook is no setting of it
        config.parse(tomllib.loads('[[backend]]\nname = "a"\ntype = "webhook"\nurl = "https://h"\n'
                                   'topic_prefix = "x"'))
    assert e.value.field == "backend[0].topic_prefix"


def test_an_mqtt_backend_sends_500_frames_per_round_trip_unless_told() -> None:
    # A PUBLISH per frame: the batch bounds only what is in flight; with the webhooks' 50,
    # a backlog drained 5x slower (a round trip and a commit per 50 frames).
    cfg = config.parse(tomllib.loads('[[backend]]\nname = "m"\ntype = "mqtt"\nurl = "mqtts://h"\n'
                                     '[[backend]]\nname = "w"\ntype = "webhook"\nurl = "https://h"\n'))
    assert [b.batch for b in cfg.backends] == [500, 50]


def test_a_new_backend_is_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kafka.py").write_text(KAFKA)
    monkeypatch.setattr(forwarders, "__path__", [*forwarders.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "agent.forwarders.kafka", raising=False)
    cfg = config.parse(tomllib.loads('[[backend]]\nname = "k"\ntype = "kafka"\nurl = "kafkas://broker:9093"\n'
                                     'topic = "vitals"\nacks = "1"\nlinger_s = 0.05'))
    (b,) = cfg.backends
    assert (type(b).__name__, b.topic, b.acks, b.linger_s) == ("KafkaConfig", "vitals", "1", 0.05)  # type: ignore[attr-defined]
    fw = forwarders.make(b, None, "hub", asyncio.Event())  # type: ignore[arg-type]
    assert type(fw).__name__ == "KafkaForwarder" and fw.cfg is b
    with pytest.raises(config.ConfigError) as e:  # its own URL schemes, checked like every backend's
        config.parse(tomllib.loads('[[backend]]\nname = "k"\ntype = "kafka"\nurl = "kafka://broker"'))
    assert e.value.field == "backend[0].url"
    monkeypatch.delitem(sys.modules, "agent.forwarders.kafka", raising=False)
