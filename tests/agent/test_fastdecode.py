# The numpy decoder against the reference (protocols/samples.py), which the
# golden vectors pin independently.
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
    assert fastdecode.decode(data, len(xs)) == samples.decode(data, len(xs)) == xs


@pytest.mark.parametrize("data, count", [(b"\x01\x02", 3), (b"\x01\x82", 2), (b"\xff\xff\xff\xff\xff\x01", 1)])
def test_refuses_wrong_counts_and_long_varints(data: bytes, count: int) -> None:
    with pytest.raises(RemoteProtocolError):
        fastdecode.decode(data, count)
