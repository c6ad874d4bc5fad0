# Signed firmware update bundles (SPEC.md, "Firmware updates"): the format
# and the board's checks, sans-I/O, for both interpreters.
#
#   bundle = header | file bytes, concatenated in the manifest's order
#   header = CBOR {0: 1, 1: manifest (bstr, CBOR), 2: signature (bstr 64)}
#   signature = Ed25519(vendor key, SHA-256(SIGNING_CONTEXT | manifest))
#   manifest = {0: 1, 1: version (uint, strictly rising), 2: name (text),
#               3: min_version (uint: the board's floor once installed),
#               4: target (text), 5: key_id (8 B), 6: [[path, size, sha256], ...],
#               ? 7: next_keys [32 B, ...] (vendor key rotation)}
#
# A board reads the header (bounded), checks the manifest (check_manifest)
# and its signature (signature_steps, in slices: protocols/ed25519.py), then
# streams each file into its spare directory, hashing it (hashlib SHA-256),
# and compares with the manifest before it switches. The release tool
# (agent/dev/release.py) makes bundles with `cryptography`.

import hashlib

from protocols import cbor, ed25519
from protocols._compat import TYPE_CHECKING, const

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

FORMAT = const(1)
SIGNING_CONTEXT = b"pulsebridge/1 firmware bundle"
MAX_HEADER = const(8192)  # 64 file entries of a 64-character path, and two next keys
MAX_FILES = const(64)
MAX_PATH = const(64)
MAX_FILE = const(262144)  # the largest module a board's flash directory holds
KEY_ID_SIZE = const(8)
_FILES_BETWEEN = const(8)  # file entries checked between two calls of parse_manifest's `between`
_PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_./"
# What a bundle may never write: the board's keys, configuration and epoch.
_PROTECTED = "pulsebridge/"


class BundleError(Exception):
    # A bundle refused; reason: malformed, truncated, unknown_key,
    # bad_signature, wrong_target, downgrade, below_floor, hash_mismatch.
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def key_id(public_key: bytes) -> bytes:
    return hashlib.sha256(bytes(public_key)).digest()[:KEY_ID_SIZE]


def signed_digest(manifest: bytes) -> bytes:
    # What the vendor key signs: 32 bytes, so the signature check hashes one
    # SHA-512 block on the board. Hashed in two updates, not concatenated: a
    # board's heap, fragmented after hours of streaming, may hold no block the
    # size of the manifest again once its header is read (a simulated BLE
    # board refused good bundles as no_memory for want of 2.6 kB here).
    h = hashlib.sha256(SIGNING_CONTEXT)
    h.update(manifest)
    return h.digest()


class Manifest:
    def __init__(self, version: int, name: str, min_version: int, target: str, key_id: bytes,
                 files: "list[tuple[str, int, bytes]]", next_keys: "list[bytes]") -> None:
        self.version = version
        self.name = name
        self.min_version = min_version
        self.target = target
        self.key_id = key_id
        self.files = files
        self.next_keys = next_keys

    def size(self) -> int:
        return sum(f[1] for f in self.files)


def header_size(prefix: "bytes | bytearray | memoryview") -> int:
    # The header's size from its first 7 bytes, as the release tool writes it
    # ({0: 1, 1: manifest, 2: signature}, in that order, shortest lengths),
    # so a board reads no more than it (its manifest: ~60 bytes a file);
    # MAX_HEADER for any other form (read_header then decides).
    if len(prefix) >= 7 and prefix[0] == 0xA3 and prefix[1] == 0 and prefix[2] == 1 and prefix[3] == 1:
        if prefix[4] == 0x58:
            n = 6 + prefix[5]
        elif prefix[4] == 0x59:
            n = 7 + (prefix[5] << 8 | prefix[6])
        else:
            return MAX_HEADER
        return min(MAX_HEADER, n + 3 + ed25519.SIGNATURE_SIZE)  # 02 58 40 + the signature
    return MAX_HEADER


def read_header(data: "bytes | bytearray | memoryview") -> "tuple[bytes, bytes, int]":
    # (manifest bytes, signature, where the files start) from a bundle's first
    # bytes (at least the whole header). Raises BundleError.
    if len(data) < 1:
        raise BundleError("an empty bundle", "truncated")
    try:
        item, end = cbor.decode_prefix(data if len(data) <= MAX_HEADER else memoryview(data)[:MAX_HEADER], 0)
    except MemoryError:
        raise  # the board's, not the bundle's: it tries again (app/ota.py)
    except Exception:  # the decoder raises RemoteProtocolError; a cut header is one too
        raise BundleError("the bundle's header is cut or not CBOR", "truncated") from None
    if not isinstance(item, dict) or set(item) != {0, 1, 2} or item[0] != FORMAT:
        raise BundleError("not a pulsebridge bundle of format %d" % FORMAT, "malformed")
    manifest, signature = item[1], item[2]
    if not isinstance(manifest, bytes) or not isinstance(signature, bytes):
        raise BundleError("manifest and signature are byte strings", "malformed")
    if len(signature) != ed25519.SIGNATURE_SIZE:
        raise BundleError("unsigned: the signature is %d bytes, not 64" % len(signature), "bad_signature")
    return manifest, signature, end


def parse_manifest(manifest: bytes, between: "Callable[[], None] | None" = None) -> Manifest:
    # between: called after the decode and every _FILES_BETWEEN file entries
    # (a board reads its sensors' FIFOs there: the whole takes ~70 ms of an
    # ESP32's time, more than its fastest FIFO lasts).
    try:
        m = cbor.decode(manifest)
    except MemoryError:
        raise
    except Exception:
        raise BundleError("the manifest is not CBOR", "malformed") from None
    if not isinstance(m, dict) or m.get(0) != FORMAT:
        raise BundleError("the manifest is not of format %d" % FORMAT, "malformed")
    for k in m:
        if not isinstance(k, int) or not 0 <= k <= 7:
            raise BundleError("unknown manifest key %r" % (k,), "malformed")
    version, name, floor, target, kid, files = m.get(1), m.get(2), m.get(3), m.get(4), m.get(5), m.get(6)
    if not (isinstance(version, int) and isinstance(floor, int) and 0 <= floor <= version < 2**32):
        raise BundleError("version and min_version: 0 <= min_version <= version < 2^32", "malformed")
    if not (isinstance(name, str) and len(name) <= 96 and isinstance(target, str) and 0 < len(target) <= 16):
        raise BundleError("name (up to 96 characters) and target (1 to 16)", "malformed")
    if not (isinstance(kid, bytes) and len(kid) == KEY_ID_SIZE):
        raise BundleError("key_id is %d bytes" % KEY_ID_SIZE, "malformed")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        raise BundleError("1 to %d files" % MAX_FILES, "malformed")
    out: "list[tuple[str, int, bytes]]" = []
    if between is not None:
        between()
    for f in files:
        if between is not None and len(out) % _FILES_BETWEEN == _FILES_BETWEEN - 1:
            between()
        if not (isinstance(f, list) and len(f) == 3):
            raise BundleError("a file entry is [path, size, sha256]", "malformed")
        path, size, digest = f
        if not (isinstance(path, str) and _path_ok(path)):
            raise BundleError("file path %r not allowed" % (path,), "malformed")
        if not (isinstance(size, int) and 0 <= size <= MAX_FILE and isinstance(digest, bytes) and len(digest) == 32):
            raise BundleError("file %s: size up to %d and a 32-byte SHA-256" % (path, MAX_FILE), "malformed")
        out.append((path, size, digest))
    nxt = m.get(7, [])
    if not (isinstance(nxt, list) and len(nxt) <= 2 and all(isinstance(k, bytes) and len(k) == 32 for k in nxt)):
        raise BundleError("next_keys: up to 2 keys of 32 bytes", "malformed")
    return Manifest(version, name, floor, target, kid, out, list(nxt))


def _path_ok(path: str) -> bool:
    if not 0 < len(path) <= MAX_PATH or ".." in path or path.startswith("/"):
        return False
    for c in path:
        if c not in _PATH_CHARS:
            return False
    return not path.startswith(_PROTECTED) and not path.startswith(".") and "//" not in path


def check_manifest(m: Manifest, vendor_keys: "list[bytes]", running_version: int, floor: int,
                   target: str) -> bytes:
    # The vendor key the manifest names, if the board may install it at all;
    # raises BundleError (wrong_target, downgrade, below_floor, unknown_key).
    if m.target != target:
        raise BundleError("bundle for %s, this board is %s" % (m.target, target), "wrong_target")
    if m.version <= running_version:
        raise BundleError("version %d is not above the running %d" % (m.version, running_version), "downgrade")
    if m.version < floor:
        raise BundleError("version %d is below this board's minimum %d" % (m.version, floor), "below_floor")
    for k in vendor_keys:
        if key_id(k) == m.key_id:
            return k
    raise BundleError("signed by a key this board does not hold", "unknown_key")


def signature_steps(manifest: bytes, signature: bytes, vendor_key: bytes) -> "Generator[None, None, None]":
    # A generator: the signature check in slices (protocols/ed25519.py);
    # raises BundleError(bad_signature).
    try:
        yield from ed25519.verify_steps(vendor_key, signed_digest(manifest), signature)
    except ed25519.SignatureError as e:
        raise BundleError(str(e), "bad_signature") from None


def check(data: bytes, vendor_keys: "list[bytes]", running_version: int, floor: int, target: str) -> Manifest:
    # A whole bundle in memory (the release tool, tests, a hub's pre-check):
    # every check a board makes. Raises BundleError.
    manifest, signature, at = read_header(data)
    m = parse_manifest(manifest)
    key = check_manifest(m, vendor_keys, running_version, floor, target)
    for _ in signature_steps(manifest, signature, key):
        pass
    for path, size, digest in m.files:
        if at + size > len(data):
            raise BundleError("the bundle ends inside %s" % path, "truncated")
        if hashlib.sha256(bytes(data[at:at + size])).digest() != digest:
            raise BundleError("%s does not match the manifest" % path, "hash_mismatch")
        at += size
    if at != len(data):
        raise BundleError("%d bytes after the last file" % (len(data) - at), "malformed")
    return m
