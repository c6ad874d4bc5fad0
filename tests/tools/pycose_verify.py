"""Verifies captured frames with pycose, an independent COSE implementation.

Runs in its own virtual environment (pycose 1.1.0 needs cbor2 < 6: its
upstream issue 141), so it imports nothing from pulsebridge. Usage:
    python pycose_verify.py CAPTURE_DIR
Reads CAPTURE_DIR/keys.json and every CAPTURE_DIR/<device-id>.cbor (COSE
messages concatenated), verifies each with pycose and prints one JSON line:
per device, the number of messages verified, the payload types seen, the
sample frames whose samples decrypted (HKDF with the frame's boot salt and
AES-256-CTR, from `cryptography`, which pycose is built on) into exactly
`count` varints per channel, the boot salts seen, and how many sample frames
reused a counter block under one key (same salt, epoch and seq, other
ciphertext). Exits 1 if any message fails or any counter block is reused.
"""

import io
import json
import sys
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pycose.headers import KID
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

AAD = b"pulsebridge/1 board-to-hub"
KEY_INFO = b"pulsebridge/1 A256CTR samples"


def varints(data: bytes) -> int:
    # How many unsigned LEB128 values data holds; -1 if it ends inside one.
    n = 0
    more = False
    for b in data:
        more = bool(b & 0x80)
        if not more:
            n += 1
    return -1 if more else n


def decrypts(payload: dict, device_key: bytes) -> bool:
    key = HKDF(hashes.SHA256(), 32, payload[15], KEY_INFO).derive(device_key)
    iv = payload[2].to_bytes(4, "big") + payload[3].to_bytes(4, "big") + bytes(8)
    clear = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor().update(b"".join(payload[13]))
    pos = 0
    for ch in payload[13]:
        if varints(clear[pos:pos + len(ch)]) != payload[8]:
            return False
        pos += len(ch)
    return True


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
        decrypted = 0
        blocks = {}  # (boot salt, epoch, seq) -> ciphertext
        reused = 0
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
                payload = cbor2.loads(msg.payload)
                kind = payload[0]
                kinds[kind] = kinds.get(kind, 0) + 1
                if kind == 1:
                    decrypted += decrypts(payload, bytes.fromhex(key_hex))
                    block = (payload[15], payload[2], payload[3])
                    sealed = b"".join(payload[13])
                    if blocks.setdefault(block, sealed) != sealed:
                        reused += 1
            else:
                failed += 1
        salts = len({b[0] for b in blocks})
        report[device_id] = {"verified": ok, "types": kinds, "decrypted": decrypted, "boot_salts": salts,
                             "counter_blocks_reused": reused}
        failed += reused
    report["failed"] = failed
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
