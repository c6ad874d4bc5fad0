"""The vendor's release tool (`pulsebridge-dev release`): an Ed25519 vendor
key, and signed firmware bundles (protocols/bundle.py, SPEC.md "Firmware
updates"). It runs on the release machine: the private key never goes to a
hub or a board; a board holds the public key, written at provisioning."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.registry import write_private
from protocols import bundle, cbor


def keygen(out: Path) -> bytes:
    """A new vendor key in out (PEM, PKCS#8, mode 0600); returns the public key (32 bytes)."""
    key = Ed25519PrivateKey.generate()
    write_private(out, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return public_key(key)


def public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("%s is not an Ed25519 private key" % path)
    return key


def make_bundle(files: dict[str, bytes], version: int, name: str, min_version: int, target: str,
                key: Ed25519PrivateKey, next_keys: list[bytes] | None = None) -> bytes:
    """The signed bundle of files ({board path: content}, in that order)."""
    manifest: dict[int, object] = {
        0: bundle.FORMAT, 1: version, 2: name, 3: min_version, 4: target, 5: bundle.key_id(public_key(key)),
        6: [[path, len(data), hashlib.sha256(data).digest()] for path, data in files.items()]}
    if next_keys:
        manifest[7] = list(next_keys)
    m = cbor.encoded(manifest, bundle.MAX_HEADER)
    bundle.parse_manifest(m)  # what a board would refuse is never signed
    header = cbor.encoded({0: bundle.FORMAT, 1: m, 2: key.sign(bundle.signed_digest(m))}, bundle.MAX_HEADER)
    return header + b"".join(files.values())
