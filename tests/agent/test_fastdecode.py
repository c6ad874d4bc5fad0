# The numpy decoder against the reference (protocols/samples.py), which the
# golden vectors pin independently.
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import fastdecode
from protocols import samples
from protocols.errors import RemoteProtocolError


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=600))
def test_same_values_as_the_reference(xs: list[int]) -> None:
    buf = bytearray(len(xs) * 5 + 8)
    n = samples.encode_into(xs, len(xs), buf, 0)
    data = bytes(buf[:n])
    assert fastdecode.decode(data, len(xs)).tolist() == samples.decode(data, len(xs)) == xs


@pytest.mark.parametrize("data, count", [(b"\x01\x02", 3), (b"\x01\x82", 2), (b"\xff\xff\xff\xff\xff\x01", 1)])
def test_refuses_wrong_counts_and_long_varints(data: bytes, count: int) -> None:
    with pytest.raises(RemoteProtocolError):
        fastdecode.decode(data, count)


@given(st.binary(max_size=40), st.integers(0, 12))
def test_refuses_exactly_what_the_reference_refuses(data: bytes, count: int) -> None:
    # Ingest checks frames with this decoder and forwarders read what it let
    # through: any bytes at all, both agree on refusing or on the values.
    try:
        expected = samples.decode(data, count)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            fastdecode.decode(data, count)
        return
    assert fastdecode.decode(data, count).tolist() == expected


@pytest.mark.parametrize("data, count", [
    (b"\x80\x00", 1),  # 0 written in two bytes
    (b"\x80\x80\x80\x80\x10", 1),  # zigzag 2^32: sample 2^31
    (b"\x80\x80\x80\x80\x08\x80\x80\x80\x80\x08", 2),  # each delta 2^30 fits, their sum does not
    (b"\x80", 0),
])
def test_refuses_what_the_reference_refuses(data: bytes, count: int) -> None:
    with pytest.raises(RemoteProtocolError):
        samples.decode(data, count)
    with pytest.raises(RemoteProtocolError):
        fastdecode.decode(data, count)


@given(st.integers(-(2**31), 2**31 - 1), st.lists(st.integers(-64, 63), max_size=600), st.integers(0, 3))
def test_one_byte_deltas_after_any_first_sample_decode_as_the_reference(first: int, deltas: list[int],
                                                                        cut: int) -> None:
    # The fast path (a first sample of any size, then deltas of one byte each), at the int32
    # edges too, and with the data cut short or the count wrong: as the reference says.
    xs = [first]
    for d in deltas:
        xs.append(xs[-1] + d)
    buf = bytearray(8 * len(xs) + 8)
    try:
        n = samples.encode_into(xs, len(xs), buf, 0)
    except Exception:
        return  # a sample the wire cannot carry (out of int32): nothing to decode
    data = bytes(buf[:max(0, n - cut)])
    for count in (len(xs), len(xs) - 1, len(xs) + 1):
        try:
            expected = samples.decode(data, count)
        except RemoteProtocolError:
            with pytest.raises(RemoteProtocolError):
                fastdecode.decode(data, count)
            continue
        assert fastdecode.decode(data, count).tolist() == expected


@given(st.integers(-(2**31), 2**31 - 1), st.lists(st.integers(-8192, 8191), max_size=600), st.integers(0, 3),
       st.sampled_from([b"", b"\x80", b"\x80\x00", b"\x81\x80\x01", b"\xff"]), st.integers(0, 600))
def test_deltas_of_one_or_two_bytes_decode_as_the_reference(first: int, deltas: list[int], cut: int,
                                                            splice: bytes, at: int) -> None:
    # The two-byte path (ECG's QRS steps take two bytes), with the data cut short, the count
    # wrong, or bytes spliced in (a lone continuation byte, a two-byte 0 not in shortest
    # form, a three-byte varint): as the reference says, and the steps it hands the store are
    # the samples' steps.
    xs = [first]
    for d in deltas:
        xs.append(xs[-1] + d)
    buf = bytearray(8 * len(xs) + 8)
    try:
        n = samples.encode_into(xs, len(xs), buf, 0)
    except Exception:
        return  # a sample the wire cannot carry (out of int32): nothing to decode
    data = bytes(buf[:max(0, n - cut)])
    data = data[:at] + splice + data[at:]
    for count in (len(xs), len(xs) - 1, len(xs) + 1):
        try:
            expected = samples.decode(data, count)
        except RemoteProtocolError:
            with pytest.raises(RemoteProtocolError):
                fastdecode.decode_with_steps(data, count)
            continue
        values, steps = fastdecode.decode_with_steps(data, count)
        assert values.tolist() == expected
        if steps is not None:
            first_sample, width, body = steps
            assert first_sample == expected[0]
            assert np.frombuffer(body, dtype="<i%d" % width).tolist() == np.diff(expected).tolist()
