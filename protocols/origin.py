# Origin proof (SPEC.md, "Origin proof"): what a backend needs to check,
# without trusting the hub, that each sample frame came from the board
# unaltered, and to see exactly which frames are missing.
#
# The board holds a second key, the origin key, written at provisioning and
# handed to the backend only (never to the hub). It keeps the 16-byte
# digest (SHA-256, truncated) of each sample frame's COSE payload as sent,
# and every few seconds sends an origin checkpoint: the list of (seq,
# digest) since the last one, its boot salt and its boot's sample key
# wrapped under the origin key, all in a COSE_Mac0 under the origin key.
# The hub stores and forwards it untouched (message type 10). The verifier
# here needs only the origin key: a frame whose digest a checkpoint lists
# is the board's; one altered, inserted or missing shows.
#
#   checkpoint = COSE_Mac0 under the origin key, external_aad AAD_ORIGIN,
#                kid the device id, payload:
#   {0: 1 (this format), 1: epoch, 2: index (0, 1, ... within one boot),
#    3: boot_salt (16 B), 4: wrapped boot key (32 B), 5: [seq, ...] (1..32,
#    ascending), 6: digests (16 B per seq, in order)}
#   digest(frame) = SHA-256(COSE payload of the frame)[:16]
#   wrapped = boot sample key XOR HMAC-SHA256(origin key, WRAP_INFO | boot_salt)
#
# The boot sample key lets the backend decrypt the frames' samples itself
# and compare them with the decoded values a hub's document claims (the hub
# holds that key anyway; the device key stays with the hub alone).
#
# This module is what a board needs (its checkpoints' encoding); opening a
# checkpoint and the frames' digests are the backend's (protocols/origin_verify.py).

from protocols import cbor, cipher
from protocols._compat import const

try:
    from protocols import _viper  # MicroPython: the digests copied by native code
except ImportError:  # CPython, or a port without the viper emitter
    _viper = None  # type: ignore[assignment]
from protocols.errors import LocalProtocolError

AAD_ORIGIN = b"pulsebridge/1 origin"
WRAP_INFO = b"pulsebridge/1 origin key-wrap"
FORMAT = const(1)
DIGEST_SIZE = const(16)  # 128 bits: finding a second frame with the same digest costs 2^128 hashes
# Frames one checkpoint lists: 16 s of one ECG and one PPG stream at 1 s
# windows; it keeps a checkpoint under 1 kB (fields.MAX_ORIGIN_CHECKPOINT).
MAX_ENTRIES = const(32)
KEY_SIZE = const(32)


def key_pad(origin_key: bytes, boot_salt: bytes) -> bytes:
    # The 32 bytes XORed with a boot's sample key in its checkpoints.
    if len(origin_key) != KEY_SIZE:
        raise LocalProtocolError("an origin key is %d bytes, got %d" % (KEY_SIZE, len(origin_key)), "key_size")
    return cipher._hmac_sha256(bytes(origin_key), WRAP_INFO + bytes(boot_salt))


def xor32(a: "bytes | bytearray", b: "bytes | bytearray") -> bytes:
    out = bytearray(KEY_SIZE)
    for i in range(KEY_SIZE):
        out[i] = a[i] ^ b[i]
    return bytes(out)


def encode_checkpoint(w: "cbor.Writer", epoch: int, index: int, boot_salt: bytes, wrapped_key: bytes,
                      seqs: "list[int] | object", digests: "bytes | bytearray", n: int) -> None:
    # The checkpoint's payload at w: seqs[:n] and digests[:n * DIGEST_SIZE]
    # (the board passes its preallocated array and bytearray: nothing
    # allocated). A board writes it in its two pieces, each call within the
    # VM's 11 words of frame (README, "call frames").
    encode_checkpoint_head(w, epoch, index, boot_salt, wrapped_key, n)
    encode_checkpoint_list(w, seqs, digests, n)


def encode_checkpoint_head(w: "cbor.Writer", epoch: int, index: int, boot_salt: bytes, wrapped_key: bytes,
                           n: int) -> None:
    # The checkpoint's payload up to its list of n frames (keys 0 to 4).
    if not 0 < n <= MAX_ENTRIES:
        raise LocalProtocolError("a checkpoint lists 1 to %d frames, not %d" % (MAX_ENTRIES, n), "range")
    w.map(7)
    w.uint(0)
    w.uint(FORMAT)
    w.uint(1)
    w.uint(epoch)
    w.uint(2)
    w.uint(index)
    w.uint(3)
    w.bstr(boot_salt)
    w.uint(4)
    w.bstr(wrapped_key)


def encode_checkpoint_list(w: "cbor.Writer", seqs: "list[int] | object", digests: "bytes | bytearray",
                           n: int) -> None:
    # The rest, after encode_checkpoint_head: seqs[:n] and digests[:n * DIGEST_SIZE] (keys 5 and 6).
    w.uint(5)
    w.array(n)
    for i in range(n):
        w.uint(seqs[i])  # type: ignore[index]
    w.uint(6)
    w.head(2, n * DIGEST_SIZE)
    if w.pos + n * DIGEST_SIZE > w.end:
        raise LocalProtocolError("CBOR output buffer full (%d bytes)" % len(w.buf), "buffer_full")
    _copy_digests(w, digests, n * DIGEST_SIZE)
    w.pos += n * DIGEST_SIZE


def _copy_digests(w: "cbor.Writer", digests: "bytes | bytearray", n: int) -> None:
    # digests[:n] at w.pos.
    if _viper is not None:  # (a byte loop: 20 digests took ~7 ms at an ESP32's speed)
        _viper.copy_into(w.buf, w.pos, digests, 0, n)
        return
    w.buf[w.pos:w.pos + n] = digests[:n]
