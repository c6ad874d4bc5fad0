# Validation against protocols/frame.cddl with pycddl (the Rust cddl crate),
# an implementation independent of ours.
#
# That crate mis-indexes `.cbor` controls inside arrays (it applies the
# control of one member to the next), so a COSE_Mac0 is checked in two
# steps: its outer shape with the `.cbor` controls taken out, then the
# protected header and the payload, each against its own rule.
from pathlib import Path

import cbor2
import pycddl

SOURCE = (Path(__file__).resolve().parents[2] / "protocols" / "frame.cddl").read_text()


def _schema(rule: str, src: str = SOURCE) -> pycddl.Schema:
    return pycddl.Schema("start = %s\n%s" % (rule, src))


_OUTER = _schema("cose-mac0", SOURCE.replace("bstr .cbor protected-header", "bstr").replace(
    "bstr .cbor payload", "bstr"))
_PROTECTED = _schema("protected-header")
_UPLINK = _schema("uplink")
_DOWNLINK = _schema("downlink")


def validate_message(data: bytes, direction: str) -> None:
    # Raises pycddl.ValidationError if data is not a valid message.
    _OUTER.validate_cbor(data)
    protected, _, payload, _ = cbor2.loads(data).value
    _PROTECTED.validate_cbor(protected)
    (_UPLINK if direction == "up" else _DOWNLINK).validate_cbor(payload)
