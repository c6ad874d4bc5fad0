"""HTTPS FHIR R4: each batch as a transaction Bundle.

- An Observation per sample frame, its waveform in valueSampledData (ECG),
  or in two components, red and infrared (PPG), coded with ISO/IEEE 11073
  MDC codes as the HL7 Personal Health Device IG does.
- A Device for the board and one for the hub, created once (conditional
  create on their identifiers) and referenced by every Observation.
- Observation.identifier is the idempotency key (urn:pulsebridge:frame |
  <device>:<epoch>:<seq>) and the create is conditional on it
  (If-None-Exist), so a resent batch never duplicates an Observation.
- Observation.subject is the patient given at provisioning (see subject()).
- Gap records become Observations with a data-absent reason.

References that cannot dangle. A vital names the frames it was derived
from (derivedFrom). Those frames travel in their own rows of the outbox:
vitals go first (higher priority), so a frame can be in a later bundle; it
can also never arrive at all (dropped by the disk quota, refused by the
server). FHIR R4's transaction rules (http.html#trules) say a conditional
reference ("Observation?identifier=...") that matches no resource, or
several, fails the whole transaction: a vital sent before its frames was
refused (412) at every retry, and the outbox never drained. Ordering the
outbox would not cure it (a quota drop or a refusal leaves the frame out
for good), nor would putting the frames in the vital's bundle (they may be
gone). So derivedFrom is a logical reference (references.html#logical:
Reference.identifier, with type): the frame's identifier, which a server
records but never resolves, so it cannot fail a transaction; a reader finds
the frame by that identifier (Observation?identifier=urn:pulsebridge:frame|
<key>) once it is there, and a gap record says when it never will be. The
only references the server resolves are to entries of the same Bundle
(the Devices, by fullUrl, created or matched there) and the patient's
literal reference given at provisioning, which must exist on the server.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.forwarders.base import REASON_CHARS, RefusedError
from agent.forwarders.http import HttpConfig, HttpForwarder
from agent.record import FrameRecord, iso_ms
from agent.store import Row

MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
FRAME_SYSTEM = "urn:pulsebridge:frame"
DEVICE_SYSTEM = "urn:pulsebridge:device"
HUB_SYSTEM = "urn:pulsebridge:hub"
# The patient's identifier system when provisioning gave a bare identifier.
PATIENT_SYSTEM = "urn:pulsebridge:patient"
# The board's message as it came (base64 COSE_Mac0), on every frame's and
# origin checkpoint's Observation: what `pulsebridge verify-origin` checks.
COSE_EXTENSION = "urn:pulsebridge:extension:cose"
_LITERAL = re.compile(r"^(Patient|Group)/[A-Za-z0-9\-.]{1,64}$")
# MDC codes (ISO/IEEE 11073-10101) for the waveforms.
CODES = {
    "ecg": ("131330", "MDC_ECG_ELEC_POTL_II", "ECG lead II"),
    "ecg-ad8232": ("131328", "MDC_ECG_ELEC_POTL", "ECG"),
    "ppg": ("150452", "MDC_PULS_OXIM_PLETH", "Plethysmogram"),
}
LOINC = "http://loinc.org"
# Derived vitals: LOINC and MDC codes (HL7 Personal Health Device IG).
VITAL_CODES = {
    "heart_rate": [(LOINC, "8867-4", "Heart rate"), (MDC, "147842", "MDC_ECG_HEART_RATE")],
    "spo2": [(LOINC, "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
             (MDC, "150456", "MDC_PULS_OXIM_SAT_O2")],
    "pulse_rate": [(LOINC, "8889-8", "Heart rate by Pulse oximetry"), (MDC, "149530", "MDC_PULS_OXIM_PULS_RATE")],
    "perfusion_index": [(MDC, "150488", "MDC_PULS_OXIM_PERF_REL")],
}
# What a vital's Observation says of its doubt (issue 15 §5), as the HL7 Point-of-Care and
# Personal Health Device IGs do:
# - the method (Observation.method, text: how the hub computed it);
# - the signal quality, 0-1, as a component (its own code and value, so a reader can filter on
#   it; a note, as before, is free text no query reaches);
# - a relative SpO2's expected error (%), as a component too (EXPECTED_ERROR_CODE);
# - a value in doubt (quality under QUESTIONABLE_BELOW, or the board's ECG heart rate and PPG
#   pulse rate disagreeing) is flagged in Observation.interpretation with the measurement-status
#   code "questionable" (ISO/IEEE 11073-10201's measurement status, which those IGs carry in
#   interpretation), and the other sensor's rate rides along as a component: shown as doubt,
#   not as an alert;
# - dataAbsentReason is for a value that is absent: the hub does not send an Observation for an
#   estimate it withheld (that would be one empty Observation every few seconds per board);
#   frames lost are told by gap records, which carry dataAbsentReason (below).
MEASUREMENT_STATUS = "http://terminology.hl7.org/CodeSystem/measurement-status"
QUESTIONABLE_BELOW = 0.6
QUALITY_CODE = {"text": "signal quality (0-1)"}
# PPG-derived values: the pulsatile quality of ISO/IEEE 11073-10101 (MDC_SAT_O2_QUAL).
PPG_QUALITY_CODE = {"coding": [{"system": MDC, "code": "150320", "display": "MDC_SAT_O2_QUAL"}],
                    "text": "signal quality (0-1)"}
# A relative SpO2's expected error (agent/vitals/spo2_relative.py: the |error| its calibration
# expects, %), as a component beside the quality, in UCUM "%". Not the core uncertainty extension
# (http://hl7.org/fhir/StructureDefinition/iso21090-uncertainty on valueQuantity): that one is a
# standard deviation, and an expected |error| is one only under an assumed error distribution;
# no LOINC or MDC code names this figure, so the code is text, as QUALITY_CODE's.
EXPECTED_ERROR_CODE = {"text": "expected absolute error (%)"}
# The most of a transaction-response the hub reads: a base for an OperationOutcome, plus per entry
# its response (status, location, etag, lastModified, and the outcome some servers add, under
# 1 KiB each), plus twice the Bundle sent: the hub asks for "Prefer: return=minimal" (R4
# http.html#ops), but a server may send each resource back as stored (Medplum does), with its
# meta. 64 KiB + 4 KiB an entry + 2 x the request: for the default batch of 50 vitals, some 400 KiB.
ANSWER_BASE_BYTES = 64 * 1024
ANSWER_ENTRY_BYTES = 4 * 1024
ANSWER_PER_SENT_BYTE = 2
_NS = uuid.UUID("6f1e4c52-6b5e-4f57-9a0d-3f8f1b7a2c11")


def _doubt(doc: dict[str, Any]) -> dict[str, Any]:
    """Method, quality component, and (for a value in doubt) interpretation and the other
    sensor's rate, of a vital document (engine.py's quality, method, cross_check)."""
    out: dict[str, Any] = {}
    if doc.get("method"):
        out["method"] = {"text": doc["method"]}
    quality = float(doc["quality"])
    code = QUALITY_CODE if doc["kind"] == "heart_rate" else PPG_QUALITY_CODE
    components = [{"code": code, "valueQuantity": {"value": quality, "unit": "1", "system": UCUM, "code": "1"}}]
    if doc.get("expected_error_pct") is not None:
        error_pct = float(doc["expected_error_pct"])
        components.append({"code": EXPECTED_ERROR_CODE,
                           "valueQuantity": {"value": error_pct, "unit": "%", "system": UCUM, "code": "%"}})
    why = []
    check = doc.get("cross_check")
    if isinstance(check, dict):
        other = str(check.get("with", ""))
        components.append({"code": {"coding": [{"system": s, "code": c, "display": d}
                                               for s, c, d in VITAL_CODES.get(other, [])],
                                    "text": "%s from the board's other sensor" % other.replace("_", " ")},
                           "valueQuantity": {"value": check["other_value"], "unit": "/min", "system": UCUM,
                                             "code": "/min"}})
        if not check.get("agrees", True):
            why.append("disagrees with the %s by %s /min" % (other.replace("_", " "), check["difference_per_min"]))
    if quality < QUESTIONABLE_BELOW:
        why.append("signal quality %.2f" % quality)
    out["component"] = components
    if why:
        out["interpretation"] = [{"coding": [{"system": MEASUREMENT_STATUS, "code": "questionable",
                                              "display": "Questionable"}], "text": "; ".join(why)}]
    return out


def _urn(kind: str, value: str) -> str:
    return "urn:uuid:%s" % uuid.uuid5(_NS, kind + ":" + value)


def _device_entry(system: str, value: str, name: str, kind: str) -> dict[str, Any]:
    return {
        "fullUrl": _urn(kind, value),
        "resource": {"resourceType": "Device", "identifier": [{"system": system, "value": value}],
                     "deviceName": [{"name": name, "type": "user-friendly-name"}], "status": "active"},
        "request": {"method": "POST", "url": "Device", "ifNoneExist": "identifier=%s|%s" % (system, value)},
    }


def _sampled(values: npt.NDArray[np.int32], f: FrameRecord) -> dict[str, Any]:
    return {
        "origin": {"value": 0, "unit": f.unit, "system": UCUM, "code": f.unit},
        "period": round(1000.0 / f.rate_hz, 6),
        "factor": round(f.scale_num / f.scale_den, 9),
        "dimensions": 1,
        "data": " ".join(map(str, values.tolist())),
    }


def subject(patient_ref: str) -> dict[str, Any]:
    """Observation.subject from the patient reference given at provisioning: a literal
    reference ("Patient/123", which the server must hold) as it is; "system|value" or a bare
    value (under PATIENT_SYSTEM) as a logical reference to a Patient by identifier."""
    if _LITERAL.match(patient_ref):
        return {"reference": patient_ref}
    system, sep, value = patient_ref.partition("|")
    if not sep:
        system, value = PATIENT_SYSTEM, patient_ref
    return {"type": "Patient", "identifier": {"system": system, "value": value}}


# Sequence ranges spelt out in a gap's note; the rest are counted (the MQTT and webhook
# documents carry them all).
GAP_RANGES_SHOWN = 20


def gap_text(doc: dict[str, Any]) -> str:
    """A gap record in words: how many frames, of which boot (epoch), which sequence numbers, why."""
    dropped = doc.get("frames_dropped")
    text = "%s frames lost at the hub" % (dropped if isinstance(dropped, int) else "some")
    if isinstance(doc.get("epoch"), int):
        text += ", boot epoch %d" % doc["epoch"]
    ranges = [r for r in doc.get("seq_ranges") or [] if isinstance(r, list) and len(r) == 2]
    if ranges:
        shown = ", ".join(str(a) if a == b else "%s-%s" % (a, b) for a, b in ranges[:GAP_RANGES_SHOWN])
        more = len(ranges) - GAP_RANGES_SHOWN
        text += ", seq %s%s" % (shown, " and %d more ranges" % more if more > 0 else "")
    return text + " (%s)" % doc.get("reason", "unknown")


def observation(doc: dict[str, Any], hub_id: str, frame: FrameRecord | None = None) -> dict[str, Any]:
    """The Observation of a document; a sample frame's needs its record (frame), whose
    samples and times it reads as they are."""
    key = doc["idempotency_key"]
    device = doc["device_id"]
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": FRAME_SYSTEM, "value": key}],
        "status": "final",
        "device": {"reference": _urn("device", device)},
        "issued": doc["received_at"],
    }
    if doc.get("subject"):
        obs["subject"] = subject(doc["subject"])
    if doc["type"] == "vital":
        obs["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                        "code": "vital-signs"}]}]
        obs["code"] = {"coding": [{"system": sys_, "code": c, "display": d} for sys_, c, d in VITAL_CODES[doc["kind"]]]}
        obs["effectiveDateTime"] = doc["at"]
        obs["valueQuantity"] = {"value": doc["value"], "unit": doc["unit"], "system": UCUM, "code": doc["unit"]}
        # Logical references: never resolved by the server, so never dangling (module docstring).
        obs["derivedFrom"] = [{"type": "Observation", "identifier": {"system": FRAME_SYSTEM, "value": k}}
                              for k in doc["source_frames"]]
        obs.update(_doubt(doc))
        return obs
    if doc["type"] == "alert":
        obs["code"] = {"text": "pulsebridge alert: %s" % doc["alert"]}
        obs["effectiveDateTime"] = doc["at"]
        obs["valueString"] = doc["state"]
        return obs
    if doc["type"] == "origin_checkpoint":
        obs["code"] = {"text": "pulsebridge origin checkpoint"}
        obs["extension"] = [{"url": COSE_EXTENSION, "valueBase64Binary": doc["cose"]}]
        return obs
    if doc["type"] == "gap":
        obs["code"] = {"text": "pulsebridge data gap"}
        obs["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                               "code": "error"}]}
        obs["note"] = [{"text": gap_text(doc)}]
        return obs
    if frame is None:
        raise ValueError("the Observation of sample frame %s needs its record" % key)
    code, mdc_name, text = CODES.get(frame.stream_name, ("0", "unknown", frame.stream_name))
    obs["code"] = {"coding": [{"system": MDC, "code": code, "display": mdc_name}], "text": text}
    # The first sample's time (board clock mapped to UTC, or by arrival
    # before the first time sync: doc["time_source"]), and the window's end.
    start, _ = frame.start_utc_s()
    obs["effectivePeriod"] = {"start": iso_ms(start), "end": iso_ms(start + frame.duration_s)}
    obs["extension"] = [{"url": COSE_EXTENSION, "valueBase64Binary": base64.b64encode(frame.raw).decode()}]
    chans = dict(zip(frame.channel_names, frame.channels))
    if frame.stream_name == "ppg":
        obs["component"] = [
            {"code": {"text": "red (660 nm) photocurrent"}, "valueSampledData": _sampled(chans["red"], frame)},
            {"code": {"text": "infrared (880 nm) photocurrent"}, "valueSampledData": _sampled(chans["ir"], frame)},
        ]
    else:
        obs["valueSampledData"] = _sampled(frame.channels[0], frame)
    return obs


def bundle(items: list[tuple[dict[str, Any], FrameRecord | None]], hub_id: str) -> dict[str, Any]:
    """The transaction Bundle of documents, each with its frame's record (None: not a sample frame)."""
    entries = [_device_entry(HUB_SYSTEM, hub_id, "pulsebridge hub %s" % hub_id, "hub")]
    for dev in sorted({d["device_id"] for d, _ in items}):
        entries.append(_device_entry(DEVICE_SYSTEM, dev, "pulsebridge board %s" % dev, "device"))
    for d, frame in items:
        obs = observation(d, hub_id, frame)
        entries.append({"fullUrl": _urn("frame", d["idempotency_key"]), "resource": obs,
                        "request": {"method": "POST", "url": "Observation",
                                    "ifNoneExist": "identifier=%s|%s" % (FRAME_SYSTEM, d["idempotency_key"])}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def answer_max_bytes(entries: int, sent_bytes: int) -> int:
    """The most of the answer to a transaction Bundle of entries, sent_bytes long, the hub reads."""
    return ANSWER_BASE_BYTES + ANSWER_ENTRY_BYTES * entries + ANSWER_PER_SENT_BYTE * sent_bytes


class FhirConfig(HttpConfig):
    """A FHIR R4 server's settings: those of every HTTPS backend."""


class FhirForwarder(HttpForwarder):
    async def deliver(self, rows: list[Row]) -> None:
        body = bundle([(self.document(r), r.frame) for r in rows], self.hub_id)
        sent = json.dumps(body).encode()
        text = await self.post(self.cfg.url.rstrip("/"), sent,
                               {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
                                "Prefer": "return=minimal"},
                               answer_max_bytes=answer_max_bytes(len(body["entry"]), len(sent)))
        reply = json.loads(text)
        # A transaction is all or nothing (R4 http.html#transaction): a 2xx answer with an entry
        # that failed is a server at odds with the rules; that batch is not taken as delivered.
        for entry in reply.get("entry", []):
            status = str(entry.get("response", {}).get("status", ""))
            if not status.startswith("2"):
                code = int(status[:3]) if status[:3].isdigit() else 400
                raise RefusedError(code, "transaction entry answered %r" % status[:40], backend=self.name)

    def refusal_reason(self, text: str) -> str:
        """The OperationOutcome's diagnostics (or details), else the answer's text."""
        try:
            issues = json.loads(text).get("issue", [])
            said = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
                             + (" at %s" % ",".join(i["expression"]) if i.get("expression") else "")
                             for i in issues if isinstance(i, dict))
        except (ValueError, AttributeError):
            said = ""
        return said[:REASON_CHARS] or super().refusal_reason(text)


CONFIG = FhirConfig
FORWARDER = FhirForwarder
