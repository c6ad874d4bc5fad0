# The MQTT 3.1.1 publisher's packets (agent/forwarders/mqtt_codec.py) against bytes
# written out by hand from the OASIS standard's sections, and its reader of a
# broker's answers fed whole and a byte at a time, and fuzzed: it raises nothing
# but BrokerProtocolError, whatever it is fed.
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.forwarders import mqtt_codec as codec


def test_connect_is_the_standards_bytes() -> None:
    # 3.1: fixed header 0x10, remaining length 22; "MQTT", level 4, flags 0xC2 (user name,
    # password, clean session), keepalive 30; client id "hub", user "u", password "pw".
    assert codec.connect_packet("hub", 30, True, "u", "pw") == (
        b"\x10\x16" b"\x00\x04MQTT" b"\x04" b"\xc2" b"\x00\x1e" b"\x00\x03hub" b"\x00\x01u" b"\x00\x02pw")
    assert codec.connect_packet("hub", 30, False) == b"\x10\x0f\x00\x04MQTT\x04\x00\x00\x1e\x00\x03hub"
    with pytest.raises(ValueError, match="password goes with a user name"):
        codec.connect_packet("hub", 30, True, None, "pw")


def test_a_publish_head_is_the_standards_bytes() -> None:
    # 3.3: 0x32 (PUBLISH, QoS 1), remaining length 2 + 3 + 2 + 200 = 207 = 0xCF 0x01 (two bytes), topic
    # "a/b", packet id 0x1234; then the payload, as it is.
    topic = codec.check_topic("a/b")
    assert topic == b"\x00\x03a/b"
    assert codec.publish_head(topic, 0x1234, 200) == b"\x32\xcf\x01\x00\x03a/b\x12\x34"
    assert codec.publish_head(topic, 1, 0) == b"\x32\x07\x00\x03a/b\x00\x01"
    with pytest.raises(ValueError):
        codec.publish_head(topic, 0, 1)  # packet id 0 is not allowed (2.3.1)
    with pytest.raises(ValueError):
        codec.publish_head(topic, 1, codec.MAX_REMAINING_LENGTH)
    for bad in ("", "a/+", "a/#", "a\0b"):
        with pytest.raises(ValueError):
            codec.check_topic(bad)


ANSWERS = (b"\x20\x02\x00\x00"  # CONNACK, accepted
           b"\x40\x02\x00\x01" b"\x40\x02\xff\xfe"  # PUBACK 1, PUBACK 65534
           b"\xd0\x00"  # PINGRESP
           b"\x20\x02\x01\x05")  # CONNACK, session present, not authorized
EXPECTED = [("connack", 0), ("puback", 1), ("puback", 65534), ("pingresp", 0), ("connack", 5)]


def test_answers_read_whole_and_a_byte_at_a_time() -> None:
    assert codec.Answers().feed(ANSWERS) == EXPECTED
    reader = codec.Answers()
    got = []
    for i in range(len(ANSWERS)):
        got += reader.feed(ANSWERS[i:i + 1])
    assert got == EXPECTED


@pytest.mark.parametrize("wire,what", [
    (b"\x30\x05", "packet type 3"),  # a PUBLISH: a publisher subscribed to nothing
    (b"\x41\x02\x00\x01", "packet type 4 (flags 1)"),  # PUBACK with reserved flags set
    (b"\x40\x03", "3 bytes, not 2"),  # a PUBACK of the wrong length: refused before it is buffered
    (b"\x40\xff\xff\xff\x7f", "255 bytes"),  # a 256 MB length a broker cannot make us allocate
    (b"\x20\x02\x02\x00", "reserved bits"),  # CONNACK flags beyond session present
])
def test_what_a_broker_may_not_answer_is_refused_naming_it(wire: bytes, what: str) -> None:
    with pytest.raises(codec.BrokerProtocolError, match=what.replace("(", r"\(").replace(")", r"\)")):
        codec.Answers().feed(wire)


@settings(max_examples=500, print_blob=True)
@given(st.lists(st.binary(max_size=12), max_size=8))
def test_the_reader_raises_only_its_error_and_holds_at_most_a_packet(pieces: list[bytes]) -> None:
    reader = codec.Answers()
    for piece in pieces:
        try:
            for kind, value in reader.feed(piece):
                assert kind in ("connack", "puback", "pingresp") and 0 <= value <= 0xFFFF
        except codec.BrokerProtocolError:
            return
        assert len(reader._partial) < 4
