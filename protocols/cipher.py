# Confidentiality of samples: AES-256 in counter mode (COSE algorithm
# A256CTR, -65532, RFC 9459), encrypt-then-MAC with the COSE_Mac0 around
# the payload.
#
# - Key, one per boot: HKDF (RFC 5869, SHA-256) with the board's boot salt
#   as salt, the device key as input keying material and info
#   "pulsebridge/1 A256CTR samples", 32 bytes. The boot salt is 16 random
#   bytes the board draws at every boot and sends in every sample frame
#   (key 15). The MAC uses the device key itself, as an HMAC key over inputs
#   that start with the CBOR array head 0x84; here the device key is only
#   ever HMAC *input* (HKDF-Extract), so the two uses never meet.
# - Counter block (16 bytes): boot epoch (4, big-endian), sequence number
#   (4, big-endian), 4 zero bytes, block counter (4, big-endian, from 0).
#   Under one boot's key, (epoch, seq) never repeats: seq goes up at every
#   message. Across boots the key differs even if the epoch file is lost,
#   rolled back or the flash restored from an image (the epoch then
#   repeats): two boots share a key only if they drew the same 128-bit salt.
#   So no counter block is ever reused under one key. None is sent: like
#   OSCORE's nonce, it is rebuilt from the authenticated header fields.
# - What is encrypted: the sample bytes of every channel, as one keystream
#   over the channels in order. The frame's header (stream, times, counts,
#   status) stays in clear, covered by the MAC.
#
# MicroPython's cryptolib has AES-ECB on every port (CTR only on ports that
# enable it), so the board builds CTR from ECB blocks, with buffers made
# once: encrypting a frame allocates nothing. CPython uses `cryptography`
# (protocols/_ctr_cpython.py, which a board never loads).

import hashlib

from protocols._compat import TYPE_CHECKING, const
from protocols.errors import LocalProtocolError

if TYPE_CHECKING:
    from typing import Any

    from protocols import _ctr_cpython as _host

    cryptolib: Any = None
else:
    try:
        import cryptolib  # MicroPython: AES-ECB

        _host = None
    except ImportError:  # CPython
        cryptolib = None
        from protocols import _ctr_cpython as _host
try:
    from protocols import _viper  # MicroPython: the XOR loop as native code
except ImportError:  # CPython, or a port without the viper emitter
    _viper = None  # type: ignore[assignment]
# The viper XOR itself, called with no module attribute between (one word
# less of its caller's frame: SampleCipher.xor keeps within the VM's 11).
_ctr_xor = None if _viper is None else _viper.ctr_xor

ALG_A256CTR = const(-65532)
KEY_INFO = b"pulsebridge/1 A256CTR samples"
BOOT_SALT_SIZE = const(16)  # 128 random bits: a repeat between two boots is negligible
_BLOCK = const(16)


def _ecb(key: bytes) -> "Any":
    # MicroPython: an AES-ECB object. CPython: None (`cryptography` is used).
    if cryptolib is None:
        return None
    return cryptolib.aes(key, 1)  # mode 1: ECB


def _hmac_sha256(key: bytes, data: bytes) -> bytes:
    # RFC 2104 with a key of at most 64 bytes (MicroPython has no hmac).
    ipad = bytearray(64)
    opad = bytearray(64)
    for i in range(64):
        k = key[i] if i < len(key) else 0
        ipad[i] = k ^ 0x36
        opad[i] = k ^ 0x5C
    h = hashlib.sha256(ipad)
    h.update(data)
    o = hashlib.sha256(opad)
    o.update(h.digest())
    return o.digest()


def derive_key(device_key: bytes, boot_salt: bytes) -> bytes:
    # HKDF(salt=boot_salt, IKM=device_key, info=KEY_INFO, L=32):
    # PRK = HMAC(boot_salt, device_key); OKM = HMAC(PRK, info | 0x01).
    if len(device_key) != 32:
        raise LocalProtocolError("a device key is 32 bytes, got %d" % len(device_key), "key_size")
    if len(boot_salt) != BOOT_SALT_SIZE:
        raise LocalProtocolError("a boot salt is %d bytes, got %d" % (BOOT_SALT_SIZE, len(boot_salt)), "salt_size")
    prk = _hmac_sha256(bytes(boot_salt), bytes(device_key))
    return _hmac_sha256(prk, KEY_INFO + b"\x01")


class SampleCipher:
    # apply() encrypts or decrypts (the same in CTR) bytes in place.
    # boot_salt: the salt this side seals with (a board: BOOT_SALT_SIZE random
    # bytes drawn at boot, never stored); None for a cipher that only opens
    # frames, each under the salt it carries (the hub). The key of the last
    # salt used is kept: a board sends one salt per boot.
    def __init__(self, device_key: bytes, boot_salt: "bytes | None" = None) -> None:
        if len(device_key) != 32:
            raise LocalProtocolError("a device key is 32 bytes, got %d" % len(device_key), "key_size")
        self._device_key = bytes(device_key)
        self.boot_salt = None if boot_salt is None else bytes(boot_salt)
        self._salt: "bytes | None" = None
        self._key = b""
        self._ctr = bytearray(_BLOCK)
        self._ks = bytearray(_BLOCK)
        self._aes: "Any" = None
        self._aes_cpython: "Any" = None
        self._epoch = 0  # the message begun (begin())
        self._seq = 0
        if self.boot_salt is not None:
            self._use(self.boot_salt)

    @classmethod
    def for_boot_key(cls, boot_key: bytes, boot_salt: bytes) -> "SampleCipher":
        # A cipher that opens (or seals) one boot's frames with that boot's
        # sample key alone, without the device key: a backend given the key
        # by an origin checkpoint (protocols/origin.py). Any other salt is refused.
        if len(boot_key) != 32:
            raise LocalProtocolError("a boot sample key is 32 bytes, got %d" % len(boot_key), "key_size")
        c = cls(bytes(32), None)
        c._device_key = b""
        c.boot_salt = bytes(boot_salt)
        c._salt = bytes(boot_salt)
        c._key = bytes(boot_key)
        c._aes = _ecb(c._key)
        return c

    def _use(self, salt: bytes) -> None:
        if salt == self._salt:
            return
        if not self._device_key:
            raise LocalProtocolError("this cipher holds one boot's key only, not that of this salt", "salt")
        key = derive_key(self._device_key, salt)
        self._key = key
        self._aes = _ecb(key)
        self._aes_cpython = None
        self._salt = bytes(salt)

    def _block(self, epoch: int, seq: int, counter: int) -> None:
        c = self._ctr
        for i in range(4):
            c[3 - i] = (epoch >> (8 * i)) & 0xFF
            c[7 - i] = (seq >> (8 * i)) & 0xFF
            c[8 + i] = 0
            c[15 - i] = (counter >> (8 * i)) & 0xFF

    # A board seals each frame's channels with begin() then xor() per
    # channel: each keeps within the VM's 11 words of frame (locals and
    # stack), so neither takes its frame from the heap (README, "call
    # frames"); apply() does both at once.
    def begin(self, epoch: int, seq: int, boot_salt: "bytes | None" = None) -> None:
        # Starts the keystream of message (epoch, seq) under the key of
        # boot_salt (default: this cipher's own), for xor().
        if not (0 <= epoch <= 0xFFFFFFFF and 0 <= seq <= 0xFFFFFFFF):
            raise LocalProtocolError("epoch and seq must fit 32 bits for the counter block", "range")
        salt = self.boot_salt if boot_salt is None else boot_salt
        if salt is None:
            raise LocalProtocolError("this cipher only opens frames: a boot salt is needed", "salt")
        self._use(salt)
        self._epoch = epoch
        self._seq = seq
        if self._aes is not None:
            self._block(epoch, seq, 0)

    def xor(self, buf: "bytearray | memoryview", start: int, end: int, offset: int) -> None:
        # XORs buf[start:end] with the keystream of the message begun, from
        # its byte `offset` on (the channels of a frame follow one another).
        if self._aes is None:
            self._apply_cpython(buf, start, end, offset)
        elif _ctr_xor is not None:
            _ctr_xor(buf, start, end, offset, self)
        else:
            self._xor_plain(buf, start, end, offset)

    def _xor_plain(self, buf: "bytearray | memoryview", start: int, end: int, offset: int) -> None:
        # xor() with AES-ECB blocks, where no viper emitter is (its loop as _viper.ctr_xor's).
        aes = self._aes
        ks = self._ks
        ctr = self._ctr
        block = offset >> 4
        k = offset & 15
        for i in range(4):
            ctr[15 - i] = (block >> (8 * i)) & 0xFF
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

    def apply(self, buf: "bytearray | memoryview", start: int, end: int, epoch: int, seq: int,
              offset: int = 0, boot_salt: "bytes | None" = None) -> None:
        # XORs buf[start:end] with the keystream of (epoch, seq) from byte
        # `offset` on, under the key of boot_salt (default: this cipher's own).
        self.begin(epoch, seq, boot_salt)
        if end > start:
            self.xor(buf, start, end, offset)

    def opened(self, data: "bytes", epoch: int, seq: int, boot_salt: "bytes | None" = None) -> bytes:
        # data XORed with the keystream of (epoch, seq) from its first byte, as new
        # bytes (a hub opening a frame's channels, in order, in one call); the
        # same checks as apply().
        if _host is not None and 0 <= epoch <= 0xFFFFFFFF and 0 <= seq <= 0xFFFFFFFF \
                and (boot_salt is not None or self.boot_salt is not None):  # CPython, arguments apply() takes
            self._use(self.boot_salt if boot_salt is None else boot_salt)  # type: ignore[arg-type]
            return _host.opened(self._ecb_cpython(), data, epoch, seq)
        buf = bytearray(data)
        self.apply(buf, 0, len(buf), epoch, seq, 0, boot_salt)
        return bytes(buf)

    def _apply_cpython(self, buf: "bytearray | memoryview", start: int, end: int, offset: int) -> None:
        _host.xor_into(self._ecb_cpython(), buf, start, end, self._epoch, self._seq, offset)

    def _ecb_cpython(self) -> "Any":
        # The key's ECB encryptor of `cryptography`, made once a key.
        if self._aes_cpython is None:
            self._aes_cpython = _host.encryptor(self._key)
        return self._aes_cpython
