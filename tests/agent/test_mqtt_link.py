# The records the agent and its MQTT client's process exchange (agent/mqtt_link.py): a batch
# comes back as it went, and bytes that are not a batch are a LinkError, never another error.
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import mqtt_link
from agent.mqtt_link import LinkError

messages_st = st.lists(st.tuples(st.text(max_size=40), st.binary(max_size=300)), max_size=30)


@given(messages_st)
@settings(max_examples=300, print_blob=True)
def test_a_batch_comes_back_as_it_went(messages: list[tuple[str, bytes]]) -> None:
    assert mqtt_link.batch_messages(mqtt_link.batch_body(messages)) == messages


def test_a_batch_is_pinned_byte_for_byte() -> None:
    # Written out by hand: count, topic lengths (u16), payload lengths (u32), topics, payloads.
    body = mqtt_link.batch_body([("a/b", b"xy"), ("c", b"")])
    assert body == (b"\x00\x00\x00\x02" b"\x00\x03\x00\x01" b"\x00\x00\x00\x02\x00\x00\x00\x00" b"a/bc" b"xy")
    assert mqtt_link.record(mqtt_link.ACKED) == b"A\x00\x00\x00\x00"


@given(st.binary(max_size=200))
@settings(max_examples=1000, print_blob=True)
def test_bytes_that_are_no_batch_are_a_link_error(data: bytes) -> None:
    try:
        mqtt_link.batch_messages(data)
    except LinkError:
        pass


@pytest.mark.parametrize("body, why", [
    (b"", "has no count"),
    (struct.pack(">I", 1000), "a batch of 1000 messages has 4 bytes"),
    (mqtt_link.batch_body([("t", b"payload")])[:-1], "do not add up"),
    (mqtt_link.batch_body([("t", b"payload")]) + b"!", "do not add up"),
    (struct.pack(">IHI", 1, 1, 0) + b"\xff", "not UTF-8"),
])
def test_a_broken_batch_says_what_is_wrong(body: bytes, why: str) -> None:
    with pytest.raises(LinkError, match=why):
        mqtt_link.batch_messages(body)
