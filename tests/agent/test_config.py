import tomllib
from pathlib import Path

import pytest

from agent import config
from tests.conftest import ROOT


def test_example_config_parses() -> None:
    cfg = config.load(ROOT / "agent" / "deploy" / "agent.toml")
    assert cfg.hub_id == "hub-0001" and [b.type for b in cfg.backends] == ["mqtt", "fhir"]
    assert cfg.serial[0].usb_vid == 0x303A and cfg.store_path == Path("/var/lib/pulsebridge/store.db")
    assert cfg.alert_rules == [{"name": "spo2_low", "signal": "spo2", "low": 90.0, "hysteresis": 2.0,
                                "min_duration_s": 30.0}]
    assert cfg.ble is not None and cfg.ble.adapter == "hci0" and cfg.ble.air == ""


@pytest.mark.parametrize("toml, field", [
    ('[agent]\nretention_days = "seven"', "agent.retention_days"),
    ('[agent]\nhub = "x"', "agent.hub"),
    ('[[serial]]\nbaudrate = 9600', "serial[0]"),
    ('[ble]\nmax_connections = 0', "ble.max_connections"),
    ('[ble]\nadaptor = "hci0"', "ble.adaptor"),
    ('[[backend]]\nname = "a"\ntype = "smtp"\nurl = "x"', "backend[0].type"),
    ('[[alert]]\nname = "x"\nsignal = "temperature"\nlow = 1', "alert[0]"),
    ('[[backend]]\nname = "a"\ntype = "webhook"\nurl = "http://host/x"', "backend[0].url"),
    ('[[backend]]\nname = "a"\ntype = "fhir"\nurl = "https://h/f"\ntoken = "s3cret"', "backend[0]"),
    ('[[backend]]\nname = "a"\ntype = "mqtt"\nurl = "mqtts://h"\n[[backend]]\nname = "a"\ntype = "mqtt"\n'
     'url = "mqtts://h"', "backend[1].name"),
])
def test_bad_settings_are_named(toml: str, field: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads(toml))
    assert e.value.field == field, str(e.value)


def test_plaintext_only_when_asked() -> None:
    cfg = config.parse(tomllib.loads('[[backend]]\nname = "a"\ntype = "webhook"\nurl = "http://h/x"\n'
                                     'insecure = true'))
    assert cfg.backends[0].insecure
