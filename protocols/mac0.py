# Reading a tagged COSE_Mac0 off the wire (cose.parse): its shape checked,
# nothing in it trusted yet (MacKey.verify does that). Apart from
# protocols/cose.py because a board reads its acks and time requests in
# place (app/acks.py) and needs this only for a rarer downlink message: it
# is loaded then and leaves the board's RAM again (app/main.py,
# forget_decoding).

from protocols import cbor
from protocols.cose import (
    ALG_HMAC_256_256,
    COSE_MAC0_TAG,
    MAX_KID,
    MAX_PAYLOAD,
    TAG_SIZE,
    Mac0,
    _protected_for,
)
from protocols.errors import RemoteProtocolError


def parse(data: "bytes | bytearray | memoryview") -> Mac0:
    # Checks the shape of a tagged COSE_Mac0 without trusting anything in it.
    end = len(data)
    major, value, pos = cbor.read_head(data, 0, end)
    if major != 6 or value != COSE_MAC0_TAG:
        raise RemoteProtocolError("not a tagged COSE_Mac0 (tag 17)", "not_cose")
    major, value, pos = cbor.read_head(data, pos, end)
    if major != 4 or value != 4:
        raise RemoteProtocolError("COSE_Mac0 must be an array of 4", "not_cose")
    protected, pos = _bstr(data, pos, end, 64, "protected header")
    hdr = cbor.decode(protected)
    if not isinstance(hdr, dict) or len(hdr) != 2 or hdr.get(1) != ALG_HMAC_256_256:
        raise RemoteProtocolError("protected header must be exactly {1: 5, 4: kid}", "alg")
    kid = hdr.get(4)
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= MAX_KID:
        raise RemoteProtocolError("kid must be a byte string of 1 to %d bytes" % MAX_KID, "kid")
    if protected != _protected_for(kid):
        raise RemoteProtocolError("protected header not in deterministic form", "non_canonical")
    major, value, pos = cbor.read_head(data, pos, end)
    if major != 5 or value != 0:
        raise RemoteProtocolError("unprotected header must be empty", "unprotected")
    payload, pos = _bstr(data, pos, end, MAX_PAYLOAD, "payload")
    tag, pos = _bstr(data, pos, end, TAG_SIZE, "tag")
    if len(tag) != TAG_SIZE:
        raise RemoteProtocolError("tag must be %d bytes" % TAG_SIZE, "tag_size")
    if pos != end:
        raise RemoteProtocolError("%d trailing bytes after COSE_Mac0" % (end - pos), "trailing")
    return Mac0(kid, payload, tag)


def _bstr(data: "bytes | bytearray | memoryview", pos: int, end: int, limit: int, what: str) -> "tuple[bytes, int]":
    major, n, pos = cbor.read_head(data, pos, end)
    if major != 2:
        raise RemoteProtocolError("COSE_Mac0 %s must be a byte string" % what, "not_cose")
    if n > limit:
        raise RemoteProtocolError("COSE_Mac0 %s of %d bytes exceeds %d" % (what, n, limit), "too_long")
    if n > end - pos:
        raise RemoteProtocolError("COSE_Mac0 %s truncated" % what, "truncated")
    return bytes(data[pos:pos + n]), pos + n
