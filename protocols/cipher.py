# Confidentiality of samples: AES-256 in counter mode (COSE algorithm
# A256CTR, -65532, RFC 9459), encrypt-then-MAC with the COSE_Mac0 around
# the payload.
#
# - Key: HKDF-Expand (RFC 5869) of the device key, info
#   "pulsebridge/1 A256CTR samples", 32 bytes: one HMAC-SHA256 block. The
#   device key is 32 uniformly random bytes, so it serves as the PRK as is;
#   the MAC uses the device key itself, over inputs that start with the
#   CBOR array head 0x84, never with this info string.
# - Counter block (16 bytes): boot epoch (4, big-endian), sequence number
#   (4, big-endian), 4 zero bytes, block counter (4, big-endian, from 0).
#   A board never uses an (epoch, seq) twice under one key: the epoch goes
#   up at every boot (flash), seq at every message; a new key comes with
#   provisioning or rotation. So no counter block is ever reused, and none
#   is sent: like OSCORE's nonce, it is rebuilt from the authenticated
#   header fields.
# - What is encrypted: the sample bytes of every channel, as one keystream
#   over the channels in order. The frame's header (stream, times, counts,
#   status) stays in clear, covered by the MAC.
#
# MicroPython's cryptolib has AES-ECB on every port (CTR only on ports that
# enable it), so the board builds CTR from ECB blocks, with buffers made
# once: encrypting a frame allocates nothing. CPython uses `cryptography`.

import hashlib

from protocols._compat import TYPE_CHECKING, const
from protocols.errors import LocalProtocolError

if TYPE_CHECKING:
    from typing import Any

ALG_A256CTR = const(-65532)
KEY_INFO = b"pulsebridge/1 A256CTR samples"
_BLOCK = const(16)


def _ecb(key: bytes) -> "Any":
    # MicroPython: an AES-ECB object. CPython: None (`cryptography` is used).
    try:
        import cryptolib  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return cryptolib.aes(key, 1)  # mode 1: ECB


def derive_key(device_key: bytes) -> bytes:
    # HKDF-Expand(PRK=device_key, info=KEY_INFO, L=32) = HMAC(PRK, info | 0x01)
    if len(device_key) != 32:
        raise LocalProtocolError("a device key is 32 bytes, got %d" % len(device_key), "key_size")
    ipad = bytearray(64)
    opad = bytearray(64)
    for i in range(64):
        k = device_key[i] if i < 32 else 0
        ipad[i] = k ^ 0x36
        opad[i] = k ^ 0x5C
    h = hashlib.sha256(ipad)
    h.update(KEY_INFO + b"\x01")
    o = hashlib.sha256(opad)
    o.update(h.digest())
    return o.digest()


# CPython: the block counters of any frame (4096 bytes at most: 256 blocks), made at first use.
_COUNTERS: "list[bytes]" = []


class SampleCipher:
    # apply() encrypts or decrypts (the same in CTR) bytes in place.
    def __init__(self, device_key: bytes) -> None:
        key = derive_key(device_key)
        self._key = key
        self._ctr = bytearray(_BLOCK)
        self._ks = bytearray(_BLOCK)
        self._aes: "Any" = _ecb(key)
        self._ecb_cpython: "Any" = None

    def _block(self, epoch: int, seq: int, counter: int) -> None:
        c = self._ctr
        for i in range(4):
            c[3 - i] = (epoch >> (8 * i)) & 0xFF
            c[7 - i] = (seq >> (8 * i)) & 0xFF
            c[8 + i] = 0
            c[15 - i] = (counter >> (8 * i)) & 0xFF

    def apply(self, buf: "bytearray | memoryview", start: int, end: int, epoch: int, seq: int,
              offset: int = 0) -> None:
        # XORs buf[start:end] with the keystream of (epoch, seq) from byte
        # `offset` on (the channels of a frame follow one another).
        if not (0 <= epoch <= 0xFFFFFFFF and 0 <= seq <= 0xFFFFFFFF):
            raise LocalProtocolError("epoch and seq must fit 32 bits for the counter block", "range")
        if end <= start:
            return
        if self._aes is None:
            self._apply_cpython(buf, start, end, epoch, seq, offset)
            return
        aes = self._aes
        ks = self._ks
        ctr = self._ctr
        block = offset >> 4
        k = offset & 15
        self._block(epoch, seq, block)
        aes.encrypt(ctr, ks)
        for i in range(start, end):
            if k == _BLOCK:
                block += 1  # only the block counter (bytes 12-15) changes
                ctr[15] = block & 0xFF
                ctr[14] = (block >> 8) & 0xFF
                ctr[13] = (block >> 16) & 0xFF
                aes.encrypt(ctr, ks)
                k = 0
            buf[i] ^= ks[k]
            k += 1

    def _apply_cpython(self, buf: "bytearray | memoryview", start: int, end: int, epoch: int, seq: int,
                       offset: int) -> None:
        # The keystream of all the blocks in one call of a cached ECB encryptor.
        if self._ecb_cpython is None:
            from cryptography.hazmat.primitives.ciphers import (  # type: ignore[import-not-found, unused-ignore]
                Cipher,
                algorithms,
                modes,
            )

            self._ecb_cpython = Cipher(algorithms.AES(self._key), modes.ECB()).encryptor()
            if not _COUNTERS:
                _COUNTERS.extend(b.to_bytes(4, "big") for b in range(256))
        first, skip = offset >> 4, offset & 15
        n = end - start
        last = (offset + n - 1) >> 4
        prefix = epoch.to_bytes(4, "big") + seq.to_bytes(4, "big") + bytes(4)
        blocks = b"".join([prefix + _COUNTERS[b] for b in range(first, last + 1)]) if last < 256 else \
            b"".join([prefix + b.to_bytes(4, "big") for b in range(first, last + 1)])
        stream = self._ecb_cpython.update(blocks)[skip:skip + n]
        data = int.from_bytes(bytes(buf[start:end]), "big") ^ int.from_bytes(stream, "big")
        buf[start:end] = data.to_bytes(n, "big")
