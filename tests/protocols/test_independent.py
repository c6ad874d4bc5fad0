# Our codec against implementations that are not ours: cbor2 and the
# standard library's hmac for COSE_Mac0, pycddl for the schema.
import hashlib
import hmac

import cbor2
import pycddl
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from protocols import cipher, cose, messages, samples
from tests.protocols import cddl
from tests.protocols.strategies import frames, keys, kids
from tests.shared.test_vectors import ACK, FRAME


def independent_verify(data: bytes, key: bytes, aad: bytes) -> bytes:
    tagged = cbor2.loads(data)
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 17
    protected, unprotected, payload, tag = tagged.value
    assert unprotected == {}
    assert cbor2.loads(protected)[1] == 5
    expected = hmac.new(key, cbor2.dumps(["MAC0", protected, aad, payload]), hashlib.sha256).digest()
    assert hmac.compare_digest(expected, tag)
    return payload


def test_golden_vectors_valid_against_cddl() -> None:
    cddl.validate_message(FRAME, "up")
    cddl.validate_message(ACK, "down")


def test_epoch_resync_verifies_with_hmac_decodes_with_cbor2_and_fits_the_cddl() -> None:
    key, kid = bytes(range(32)), b"pb-3fa2c1d0"
    sealed = cose.MacKey(key, kid, cose.AAD_DOWNLINK).seal(messages.encoded(messages.EpochResync(1, 5)))
    assert cbor2.loads(independent_verify(sealed, key, cose.AAD_DOWNLINK)) == {0: 9, 1: 2, 2: 1, 3: 5}
    cddl.validate_message(sealed, "down")


def test_cddl_check_can_fail() -> None:
    protected, unprotected, payload, tag = cbor2.loads(FRAME).value
    fields = cbor2.loads(payload)
    fields[4] = 9  # no such stream
    bad = cbor2.dumps(cbor2.CBORTag(17, [protected, unprotected, cbor2.dumps(fields), tag]))
    with pytest.raises(pycddl.ValidationError):
        cddl.validate_message(bad, "up")


@given(frames(), keys(), kids())
def test_frames_verify_with_hmac_and_decode_with_cbor2(frame: messages.SampleFrame, key: bytes, kid: bytes) -> None:
    salt = bytes(range(16))
    sealed = cose.MacKey(key, kid, cose.AAD_UPLINK).seal(messages.encoded(frame, sealer=cipher.SampleCipher(key, salt)))
    payload = independent_verify(sealed, key, cose.AAD_UPLINK)
    m = cbor2.loads(payload)
    assert (m[0], m[2], m[3], m[4], m[8], m[14], m[15]) == (1, frame.epoch, frame.seq, frame.stream, frame.count,
                                                            -65532, salt)
    cddl.validate_message(sealed, "up")
    # The samples decrypt with cryptography's own HKDF (the frame's boot salt as salt) and AES-CTR.
    enc_key = HKDF(hashes.SHA256(), 32, m[15], b"pulsebridge/1 A256CTR samples").derive(key)
    iv = frame.epoch.to_bytes(4, "big") + frame.seq.to_bytes(4, "big") + bytes(8)
    clear = Cipher(algorithms.AES(enc_key), modes.CTR(iv)).decryptor().update(b"".join(m[13]))
    pos = 0
    for ch, sealed_ch in zip(frame.channels, m[13]):
        assert samples.decode(clear[pos:pos + len(sealed_ch)], frame.count) == list(ch)
        pos += len(sealed_ch)


@given(st.integers(0, 2**64 - 1), st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 2**32)), min_size=1,
                                          max_size=16), keys(), kids())
def test_acks_verify_independently(epoch: int, pairs: list[tuple[int, int]], key: bytes, kid: bytes) -> None:
    ranges = [(min(a, b), max(a, b)) for a, b in pairs]
    sealed = cose.MacKey(key, kid, cose.AAD_DOWNLINK).seal(messages.encoded(messages.Ack(epoch, ranges)))
    payload = independent_verify(sealed, key, cose.AAD_DOWNLINK)
    assert cbor2.loads(payload) == {0: 2, 1: 2, 2: epoch, 3: [list(r) for r in ranges]}
    cddl.validate_message(sealed, "down")


@given(st.dictionaries(st.integers(0, 200), st.integers(0, 2**40), max_size=20))
def test_cbor2_encodings_decode_the_same(d: dict[int, int]) -> None:
    from protocols import cbor
    assert cbor.decode(cbor2.dumps(d, canonical=True)) == d
