# What a forwarded vital says of its doubt in FHIR: method, quality as a component, and a value
# in doubt flagged questionable in interpretation (with the other sensor's rate beside it).
# Documents made by the vitals engine from real recordings; Bundles validated by fhir.resources.
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from agent.forwarders import fhir
from agent.vitals.engine import VitalsEngine
from tests.agent.test_vitals_engine import _a103l_frames, _ecg_frames, _stream


def _forwarded(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # As the forwarders' document() hands a stored vital on.
    return [dict(d, idempotency_key="vital:%s:%d" % (d["device_id"], i), hub_id="hub-1",
                 received_at="2027-01-15T08:00:00Z", subject=None)
            for i, d in enumerate(docs) if d["type"] == "vital"]


def _observations(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    body = fhir.bundle([(d, None) for d in docs], "hub-1")
    Bundle.model_validate(body)
    return [e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "Observation"]


def _quality(obs: dict[str, Any]) -> float:
    [q] = [c for c in obs["component"] if c["code"]["text"] == "signal quality (0-1)"]
    return float(q["valueQuantity"]["value"])


def test_every_vital_carries_its_method_and_quality_and_agreeing_sensors_are_not_in_doubt() -> None:
    ecg, ppg = _a103l_frames(40)
    docs = _forwarded(_stream(VitalsEngine(), "pb-f1", ecg, ppg))
    obs = _observations(docs)
    assert len(obs) == len(docs) and {d["kind"] for d in docs} == {"heart_rate", "spo2", "pulse_rate",
                                                                   "perfusion_index"}
    for o, d in zip(obs, docs):
        assert o["method"]["text"] == d["method"]
        assert _quality(o) == d["quality"]
        assert "interpretation" not in o, o.get("interpretation")
        assert "note" not in o


def test_sensors_that_disagree_are_flagged_questionable_with_the_other_rate() -> None:
    _, ppg = _a103l_frames(40)
    docs = _forwarded(_stream(VitalsEngine(), "pb-f2", _ecg_frames(40), ppg))
    rates = [(o, d) for o, d in zip(_observations(docs), docs) if d["kind"] in ("heart_rate", "pulse_rate")
             and "cross_check" in d]
    assert {d["kind"] for _, d in rates} == {"heart_rate", "pulse_rate"}
    for o, d in rates:
        [status] = o["interpretation"][0]["coding"]
        assert (status["system"], status["code"]) == (fhir.MEASUREMENT_STATUS, "questionable")
        assert "disagrees" in o["interpretation"][0]["text"]
        other = [c for c in o["component"] if "other sensor" in c["code"]["text"]]
        assert other and other[0]["valueQuantity"]["value"] == d["cross_check"]["other_value"]


def test_a_relative_spo2_carries_its_expected_error_as_in_the_mqtt_and_webhook_documents() -> None:
    # SpO2 relative to the placement (expected error 2 %, as in test_vitals_engine): each of its
    # Observations carries the document's expected_error_pct as a component in UCUM %; an absolute
    # SpO2 (no such figure) carries none.
    from agent.vitals.spo2_relative import QUALITY_FIGURES, RelativeCalibration

    n = len(QUALITY_FIGURES)
    cal = RelativeCalibration(97.0, (0.0, 40.0, 0.0), (0.0,) * n, (1.0,) * n, (0.0,) * n + (2.0,), 4.0, 88.0)
    _, ppg = _a103l_frames(75)
    docs = _forwarded(_stream(VitalsEngine(relative_calibration={"max30102": cal}), "pb-f3", [], ppg))
    pairs = [(o, d) for o, d in zip(_observations(docs), docs) if d["kind"] == "spo2"]
    assert pairs
    for o, d in pairs:
        [err] = [c for c in o["component"] if c["code"] == fhir.EXPECTED_ERROR_CODE]
        assert d["expected_error_pct"] == 2.0
        assert err["valueQuantity"] == {"value": 2.0, "unit": "%", "system": fhir.UCUM, "code": "%"}
    _, ppg = _a103l_frames(20)
    absolute = [d for d in _forwarded(_stream(VitalsEngine(), "pb-f4", [], ppg)) if d["kind"] == "spo2"]
    assert absolute and all(d.get("expected_error_pct") is None for d in absolute)
    for o in _observations(absolute):
        assert [c["code"] for c in o["component"]] == [fhir.PPG_QUALITY_CODE]
