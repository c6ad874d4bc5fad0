"""Verifies captured frames with pycose, an independent COSE implementation.

Runs in its own virtual environment (pycose 1.1.0 needs cbor2 < 6: its
upstream issue 141), so it imports nothing from pulsebridge. Usage:
    python pycose_verify.py CAPTURE_DIR
Reads CAPTURE_DIR/keys.json and every CAPTURE_DIR/<device-id>.cbor (COSE
messages concatenated), verifies each with pycose and prints one JSON line:
per device, the number of messages verified and the payload types seen.
Exits 1 if any message fails.
"""

import io
import json
import sys
from pathlib import Path

import cbor2
from pycose.headers import KID
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

AAD = b"pulsebridge/1 board-to-hub"


def main(directory: Path) -> int:
    keys = json.loads((directory / "keys.json").read_text())
    report = {}
    failed = 0
    for device_id, key_hex in sorted(keys.items()):
        key = SymmetricKey(k=bytes.fromhex(key_hex))
        data = (directory / (device_id + ".cbor")).read_bytes()
        stream = io.BytesIO(data)
        ok = 0
        kinds = {}
        while stream.tell() < len(data):
            start = stream.tell()
            cbor2.load(stream)  # one item: find where the next message starts
            raw = data[start:stream.tell()]
            msg = Mac0Message.decode(raw)
            msg.key = key
            msg.external_aad = AAD
            kid = msg.phdr.get(KID)
            if msg.verify_tag() and kid == device_id.encode():
                ok += 1
                kind = cbor2.loads(msg.payload)[0]
                kinds[kind] = kinds.get(kind, 0) + 1
            else:
                failed += 1
        report[device_id] = {"verified": ok, "types": kinds}
    report["failed"] = failed
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
