# COSE_Mac0 (RFC 9052 section 6.2) with HMAC 256/256 (alg 5), the only
# algorithm this protocol accepts.
#
#   COSE_Mac0 = #6.17([ protected: bstr .cbor {1: 5, 4: kid}, unprotected: {},
#                       payload: bstr, tag: bstr .size 32 ])
#   MAC input = ["MAC0", protected, external_aad, payload]
#
# alg and kid are both protected; the unprotected map must be empty, so no
# header can be changed without breaking the tag. The external_aad names the
# direction (board to hub, hub to board): a frame can never pass for an ack,
# nor an ack for a frame, even under the same key.

import array
import hashlib

from protocols import cbor
from protocols._compat import TYPE_CHECKING, const, equal_ct
from protocols.errors import AuthenticationError, LocalProtocolError

COSE_MAC0_TAG = const(17)
ALG_HMAC_256_256 = const(5)
TAG_SIZE = const(32)
# Keys are 32 random bytes: HMAC-SHA256's block is 64, its output 32.
KEY_SIZE = const(32)
# A device id (the kid) is short printable ASCII; the bound keeps the
# protected header small and lets a parser reject junk before any lookup.
MAX_KID = const(16)
# The largest payload a peer may send: a 1 s window of the fastest stream
# with worst-case sample encoding fits well inside it (see SPEC.md).
MAX_PAYLOAD = const(4096)

AAD_UPLINK = b"pulsebridge/1 board-to-hub"
AAD_DOWNLINK = b"pulsebridge/1 hub-to-board"

_BLOCK = const(64)

if TYPE_CHECKING:
    from typing import Any

try:
    from protocols import _sha256 as _viper  # MicroPython: SHA-256 into preallocated state, no garbage
except ImportError:  # CPython, or a port without the viper emitter: hashlib
    _viper = None  # type: ignore[assignment]



def protected_header(kid: bytes) -> bytes:
    if not 1 <= len(kid) <= MAX_KID:
        raise LocalProtocolError("kid must be 1 to %d bytes" % MAX_KID, "kid")
    # {1: alg, 4: kid}, keys in ascending order: the deterministic encoding,
    # written field by field (the generic encoder stays out of a board's RAM).
    w = cbor.Writer(bytearray(2 + 2 + 1 + cbor.BSTR_HEAD_MAX + MAX_KID))
    w.map(2)
    w.uint(1)
    w.uint(ALG_HMAC_256_256)
    w.uint(4)
    w.bstr(kid)
    return bytes(w.buf[:w.pos])


# CPython (MacKey.tag with hashlib's copy()): the payload's bstr head by its length, made
# once a length (at most MAX_PAYLOAD + 1 of them, a few bytes each).
_BSTR_HEADS: "dict[int, bytes]" = {}

_PROTECTED_CACHE: "dict[bytes, bytes]" = {}
_PROTECTED_CACHE_MAX = const(64)  # known kids; a flood of new ones only misses the cache


def _protected_for(kid: bytes) -> bytes:
    p = _PROTECTED_CACHE.get(kid)
    if p is None:
        p = protected_header(kid)
        if len(_PROTECTED_CACHE) < _PROTECTED_CACHE_MAX:
            _PROTECTED_CACHE[kid] = p
    return p


_SCRATCH: "list[Any]" = []


def _scratch() -> "tuple[Any, bytearray]":
    # (A board) the SHA-256 state and block buffer every MacKey hashes in, made once.
    if not _SCRATCH:
        _SCRATCH.append(array.array("I", bytes(32)))
        _SCRATCH.append(bytearray(_BLOCK))
    return _SCRATCH[0], _SCRATCH[1]


class MacKey:
    # An HMAC-SHA256 key with its pads precomputed; computes COSE_Mac0 tags
    # for one kid and one direction (external_aad).
    def __init__(self, key: bytes, kid: bytes, aad: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise LocalProtocolError("a device key is %d bytes, got %d" % (KEY_SIZE, len(key)), "key_size")
        ipad = bytearray(_BLOCK)
        opad = bytearray(_BLOCK)
        for i in range(_BLOCK):
            k = key[i] if i < len(key) else 0
            ipad[i] = k ^ 0x36
            opad[i] = k ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)
        self.kid = bytes(kid)
        self.protected = protected_header(kid)
        # ["MAC0", protected, external_aad, ... : everything but the payload.
        w = cbor.Writer(bytearray(96))
        w.array(4)
        w.text("MAC0")
        w.bstr(self.protected)
        w.bstr(aad)
        self._prefix = bytes(w.buf[:w.pos])
        # Where seal_written() wants the payload: after the COSE_Mac0's
        # head, protected and unprotected headers, and the payload's longest head.
        w.pos = 0
        w.tag(COSE_MAC0_TAG)
        w.array(4)
        w.bstr(self.protected)
        w.map(0)
        self.payload_offset = w.pos + cbor.BSTR_HEAD_MAX
        # CPython: HMAC's inner state after the padded key and the prefix, and its outer
        # state after the padded key, hashed once; each tag copies them (hashlib's copy()).
        # MicroPython's hashlib has no copy(): None, each tag hashes the pads again.
        self._inner: "Any" = None
        self._outer: "Any" = None
        if _viper is None:
            # The payload's bstr head, written for each tag.
            self._head = cbor.Writer(bytearray(9))
            self._head_view = memoryview(self._head.buf)
            inner = hashlib.sha256(self._ipad)
            if hasattr(inner, "copy"):
                inner.update(self._prefix)
                self._inner = inner
                self._outer = hashlib.sha256(self._opad)
            return
        # A board: HMAC's inner and outer states after the padded key's
        # block, computed once (the pads are then dropped); each tag then
        # hashes into _st and _blk, which every key shares (a board hashes
        # one message at a time), its bstr head in _hbuf, the tag into _out.
        self._st, self._blk = _scratch()
        self._out = bytearray(TAG_SIZE)
        self._hbuf = bytearray(9)
        self._ist = array.array("I", bytes(32))
        self._ost = array.array("I", bytes(32))
        for st, pad in ((self._ist, self._ipad), (self._ost, self._opad)):
            _viper.sha256_start(st)
            _viper.sha256_update(st, self._blk, 0, pad, 0, _BLOCK)
        self._ipad = self._opad = b""

    # A board tags four messages a second and checks two acks: _tag_into,
    # verify_at and seal_written (with _seal_tag) keep within the VM's 11
    # words of frame (locals and stack), so their frames are not taken from
    # the heap at every call (README, "call frames"); the hashing is
    # _sha256.hmac_into's, on this key's buffers.
    def _tag_into(self, payload: "bytes | bytearray | memoryview", start: int = 0,
                  n: int = -1) -> "bytes | bytearray":
        # The tag of payload[start:start+n] (n < 0: to its end), in a buffer
        # the next call overwrites (MicroPython: nothing allocated), or a new
        # bytes object (hashlib).
        if n < 0:
            n = len(payload) - start
        if _viper is None:
            return self.tag(memoryview(payload)[start:start + n])
        _viper.hmac_into(self, payload, start, n)
        return self._out

    def tag(self, payload: "bytes | bytearray | memoryview") -> bytes:
        if _viper is not None:
            return bytes(self._tag_into(payload))
        inner = self._inner
        if inner is not None:
            h = inner.copy()
            n = len(payload)
            head = _BSTR_HEADS.get(n)
            if head is None:
                w = self._head
                w.pos = 0
                w.head(2, n)
                head = bytes(self._head_view[:w.pos])
                if n <= MAX_PAYLOAD:
                    _BSTR_HEADS[n] = head
            h.update(head)
            h.update(payload)
            o = self._outer.copy()
            o.update(h.digest())
            return o.digest()
        w = self._head
        w.pos = 0
        w.head(2, len(payload))
        h = hashlib.sha256(self._ipad)
        h.update(self._prefix)
        h.update(self._head_view[:w.pos])
        h.update(payload)
        o = hashlib.sha256(self._opad)
        o.update(h.digest())
        return o.digest()

    def verify_at(self, data: "bytes | bytearray | memoryview", start: int, n: int, tag_at: int) -> bool:
        # Whether data[tag_at:tag_at+32] is the tag of the payload data[start:start+n]
        # (a board reading an ack in place; compared in constant time).
        if _viper is None:
            return _equal_at(self._tag_into(data, start, n), data, tag_at)
        self._tag_into(data, start, n)
        return _viper.equal_at(self._out, data, tag_at, TAG_SIZE) == 1  # type: ignore[no-any-return]

    def seal_into(self, w: "cbor.Writer", payload: "bytes | bytearray | memoryview") -> None:
        # Writes the tagged COSE_Mac0 carrying payload at w.
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD), "too_long")
        w.tag(COSE_MAC0_TAG)
        w.array(4)
        w.bstr(self.protected)
        w.map(0)
        w.bstr(payload)
        w.bstr(self._tag_into(payload))

    def seal_written(self, w: "cbor.Writer", start: int, base: int = 0) -> None:
        # Seals in place the payload the caller wrote at w.buf[start:w.pos],
        # start being base + payload_offset: the COSE_Mac0 then spans
        # w.buf[base:w.pos] (a board builds each frame where its outbox
        # keeps it, with no payload buffer between, nor a view of it).
        n = w.pos - start
        if start != base + self.payload_offset or n > MAX_PAYLOAD:
            raise LocalProtocolError("seal_written: a payload of at most %d bytes from payload_offset" % MAX_PAYLOAD,
                                     "misuse")
        w.pos = base
        w.tag(COSE_MAC0_TAG)
        w.array(4)
        w.bstr(self.protected)
        w.map(0)
        w.bstr_written(start, n)
        self._seal_tag(w, n)

    def _seal_tag(self, w: "cbor.Writer", n: int) -> None:
        # The tag of the n payload bytes just before w.pos, written after them.
        w.bstr(self._tag_into(w.buf, w.pos - n, n))

    def seal(self, payload: "bytes | bytearray | memoryview") -> bytes:
        w = cbor.Writer(bytearray(len(payload) + 96))
        self.seal_into(w, payload)
        return bytes(w.buf[:w.pos])

    def verify(self, msg: "Mac0") -> None:
        if msg.kid != self.kid:
            raise AuthenticationError("message kid does not match the key's", "kid_mismatch",
                                      device_id=_kid_text(msg.kid))
        if not equal_ct(self.tag(msg.payload), msg.tag):
            raise AuthenticationError("COSE_Mac0 tag does not verify", "bad_mac", device_id=_kid_text(msg.kid))


def _equal_at(tag: "bytes | bytearray", data: "bytes | bytearray | memoryview", at: int) -> bool:
    # Whether data[at:at+32] is tag, compared in constant time.
    return equal_ct(bytes(tag), bytes(memoryview(data)[at:at + TAG_SIZE]))


class Mac0:
    # A structurally valid, not yet verified COSE_Mac0.
    def __init__(self, kid: bytes, payload: bytes, tag: bytes) -> None:
        self.kid = kid
        self.payload = payload
        self.tag = tag


def _kid_text(kid: bytes) -> str:
    try:
        return str(kid, "ascii")
    except Exception:
        return repr(kid)


def parse(data: "bytes | bytearray | memoryview") -> Mac0:
    # Checks the shape of a tagged COSE_Mac0 without trusting anything in it
    # (protocols/mac0.py, imported at the first use: a board reads its acks
    # and time requests in place and needs it only for a rarer message).
    from protocols import mac0

    return mac0.parse(data)
