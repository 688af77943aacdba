"""The streaming Decoder: chunking, buffering, max_packet_size, version learning,
and what happens on and after an error."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmqtt.enums import MAX_PACKET_SIZE
from fastmqtt.errors import MalformedPacket

# An exception a compiled function swallows ("Exception ignored in ...") is a
# bug even when the result looks right: fail the test instead of warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")



def _session(c, version=5):
    """A plausible client-to-server stream for ``version``, CONNECT first."""
    return [
        c.Connect("dev-1", True, 30, "u", b"p", c.Will("st/dev-1", b"off", 1, True),
                  protocol_level=version),
        c.Subscribe(1, [c.Subscription("chat/ws/channel/+", 1)]),
        c.Publish("chat/ws/channel/1", b'{"type":"post"}' * 20, 1, packet_id=2),
        c.Publish("chat/ws/channel/1", b"typing", 0),
        c.Pubrel(3),
        c.Pingreq(),
        c.Unsubscribe(4, ["chat/ws/channel/+"]),
        c.Disconnect(),
    ]


def _bytes(c, packets, version):
    return b"".join(c.encode(p, version) for p in packets)


@pytest.mark.parametrize("version", [5, 4])
def test_one_byte_at_a_time(codec, version):
    packets = _session(codec, version)
    data = _bytes(codec, packets, version)
    decoder = codec.Decoder(version)
    got = []
    for i in range(len(data)):
        got += decoder.feed(data[i:i + 1])
        # Everything fed is either returned or held for the packet in progress.
        assert decoder.buffered <= i + 1
    assert got == packets
    assert decoder.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings(codec, seed):
    rng = random.Random(seed)
    version = rng.choice([5, 4])
    packets = _session(codec, version)
    data = _bytes(codec, packets, version)
    decoder = codec.Decoder(version)
    got = []
    pos = 0
    while pos < len(data):
        size = rng.randint(1, 64)
        chunk = data[pos:pos + size]
        # Any buffer type a socket library might hand over.
        chunk = rng.choice([bytes, bytearray, memoryview])(chunk)
        got += decoder.feed(chunk)
        pos += size
    assert got == packets


def test_many_packets_in_one_chunk(codec):
    packets = [codec.Publish(f"t/{i}", bytes([i % 256]) * (i % 50), i % 3,
                             packet_id=(i % 3 and i + 1) or 0) for i in range(500)]
    decoder = codec.Decoder(5)
    assert decoder.feed(_bytes(codec, packets, 5)) == packets
    assert decoder.buffered == 0


def test_partial_packet_is_kept_across_feeds(codec):
    publish = codec.Publish("a/b", b"x" * 300, 1, packet_id=7)
    data = codec.encode(publish)
    ping = codec.encode(codec.Pingreq())
    decoder = codec.Decoder(5)
    assert decoder.feed(ping + data[:1]) == [codec.Pingreq()]
    assert decoder.buffered == 1
    assert decoder.feed(data[1:3]) == []  # fixed header (2-byte length) complete
    assert decoder.buffered == 3
    assert decoder.feed(data[3:100]) == []
    assert decoder.buffered == 100
    assert decoder.feed(data[100:] + ping) == [publish, codec.Pingreq()]
    assert decoder.buffered == 0


def test_empty_feed_is_harmless(codec):
    decoder = codec.Decoder(5)
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\xc0") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00") == [codec.Pingreq()]


def test_max_packet_size_default(codec):
    assert codec.Decoder().max_packet_size == MAX_PACKET_SIZE
    assert codec.Decoder(5, 1000).max_packet_size == 1000


def test_max_packet_size_enforced_from_the_fixed_header(codec):
    """Only the fixed header of a 256 MB PUBLISH is sent: the decoder refuses it
    at once (0x95) instead of waiting for, or buffering, the body."""
    decoder = codec.Decoder(5, max_packet_size=1024)
    header = b"\x30\xff\xff\xff\x7f"  # PUBLISH, remaining length 268435455
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(header)
    assert info.value.reason_code == 0x95


def test_max_packet_size_counts_the_whole_packet(codec):
    """The limit is on header + body (MQTT 5.0 3.1.2.11.4), so a packet of
    exactly the limit passes and one byte more does not."""
    publish = codec.Publish("a", b"x" * 95)  # 2 + 3 + 1 + 95 = 101 bytes
    data = codec.encode(publish)
    assert len(data) == 101
    assert codec.Decoder(5, max_packet_size=101).feed(data) == [publish]
    with pytest.raises(MalformedPacket) as info:
        codec.Decoder(5, max_packet_size=100).feed(data[:2])
    assert info.value.reason_code == 0x95


def test_huge_length_with_default_limit_waits_for_the_body(codec):
    """Without a limit below it, the largest legal length is just incomplete."""
    decoder = codec.Decoder(5)
    assert decoder.feed(b"\x30\xff\xff\xff\x7f\x00\x01a") == []
    assert decoder.buffered == 8


def test_varint_longer_than_four_bytes_fails_before_more_data(codec):
    decoder = codec.Decoder(5)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(b"\x30\x80\x80\x80\x80")
    assert info.value.reason_code == 0x81
    assert "MQTT-1.5.5-1" in str(info.value)


@pytest.mark.parametrize("data", [
    b"\xc0\x80\x00",                       # PINGREQ, remaining length 0 in two bytes
    b"\x30\x84\x00\x00\x01a\x00",          # PUBLISH, 4 in two bytes
    b"\x30\x85\x80\x00\x00\x01a\x00x",     # 5 in three bytes
])
@pytest.mark.parametrize("version", [5, 4])
def test_remaining_length_not_in_shortest_form_MQTT_1_5_5_1(codec, data, version):
    # "The encoded value MUST use the minimum number of bytes necessary to
    # represent the value" [MQTT-1.5.5-1]: a last byte of 0 after others.
    # Streaming and one-shot decoding refuse it alike, before the body.
    for decode in (lambda: codec.Decoder(version).feed(data), lambda: codec.decode(data, version)):
        with pytest.raises(MalformedPacket) as info:
            decode()
        assert info.value.reason_code == 0x81
        assert "shortest form [MQTT-1.5.5-1]" in str(info.value)
    # The shortest form of the same lengths decodes.
    assert codec.Decoder(5).feed(b"\xc0\x00") != []


@pytest.mark.parametrize("field,body", [
    ("property length", b"\x00\x01a\x80\x00x"),
    ("SUBSCRIPTION_IDENTIFIER", b"\x00\x01a\x03\x0b\x81\x00x"),
])
def test_property_varint_not_in_shortest_form_MQTT_1_5_5_1(codec, field, body):
    data = b"\x30" + bytes([len(body)]) + body
    with pytest.raises(MalformedPacket) as info:
        codec.Decoder(5).feed(data)
    assert info.value.reason_code == 0x81
    assert f"{field}: variable byte integer not in its shortest form" in str(info.value)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 268_435_455 >> 7), st.integers(1, 3))
def test_every_padded_varint_is_refused_MQTT_1_5_5_1(codec, value, extra):
    # Any value padded with continuation bytes (0x80 ... 0x00) is refused;
    # the shortest form of it is the only one accepted.
    enc = bytearray()
    v = value
    while True:
        b = v & 0x7F
        v >>= 7
        enc.append(b | (0x80 if v else 0))
        if not v:
            break
    if len(enc) + extra > 4:
        extra = 4 - len(enc)
    if not extra:
        return
    enc[-1] |= 0x80
    padded = bytes(enc) + b"\x80" * (extra - 1) + b"\x00"
    with pytest.raises(MalformedPacket, match="shortest form"):
        codec.Decoder(5).feed(b"\x30" + padded)


@pytest.mark.parametrize("level", [5, 4, 3])
def test_version_learned_from_connect(codec, level):
    c = codec
    decoder = c.Decoder()
    assert decoder.version is None
    connect = c.Connect("x", protocol_level=level)
    [got] = decoder.feed(c.encode(connect))
    assert got.protocol_level == level
    assert decoder.version == level
    # What follows is decoded in the learned version: a 3.1.1 PUBLISH has no
    # property length, so the same bytes mean different things in 5 and 4.
    data = bytes.fromhex("30 04 00 01 61 00")
    [publish] = decoder.feed(data)
    if level == 5:
        assert publish.payload == b"" and publish.properties == {}
    else:
        assert publish.payload == b"\x00"


def test_version_learned_in_the_same_feed(codec):
    c = codec
    connect = c.Connect("x", protocol_level=4)
    sub = c.Subscribe(1, [c.Subscription("a/#", 1)])
    decoder = c.Decoder(None)
    got = decoder.feed(c.encode(connect) + c.encode(sub, 4))
    assert got == [connect, sub]
    assert decoder.version == 4


def test_first_packet_must_be_connect(codec):
    """[MQTT-3.1.0-1]: refused as soon as the first byte shows another type."""
    decoder = codec.Decoder()
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(b"\x30")
    assert info.value.reason_code == 0x82
    assert "MQTT-3.1.0-1" in str(info.value)


def test_auth_before_connect_is_refused(codec):
    decoder = codec.Decoder()
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(codec.encode(codec.Auth(0x18)))
    assert info.value.reason_code == 0x82


def test_client_side_decoder_takes_any_first_packet(codec):
    decoder = codec.Decoder(5)
    assert decoder.feed(codec.encode(codec.Connack(False, 0))) == [codec.Connack(False, 0)]
    assert decoder.version == 5


def test_error_carries_packets_completed_in_the_same_feed(codec):
    c = codec
    good = [c.Pingreq(), c.Puback(1), c.Publish("a", b"1")]
    bad = bytes.fromhex("30 04 00 01 2b 00")  # topic "+" [MQTT-3.3.2-2]
    decoder = c.Decoder(5)
    assert decoder.feed(c.encode(c.Pingresp())) == [c.Pingresp()]  # an earlier call
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(_bytes(c, good, 5) + bad + c.encode(c.Pingreq()))
    assert info.value.reason_code == 0x90
    assert info.value.packets == good


def test_error_in_the_first_packet_has_no_packets(codec):
    decoder = codec.Decoder(5)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(b"\x36\x03\x00\x01a")
    assert info.value.packets == []


def test_decoder_stays_broken_after_an_error(codec):
    c = codec
    decoder = c.Decoder(4)
    with pytest.raises(MalformedPacket) as first:
        decoder.feed(b"\xf0\x00")  # AUTH in 3.1.1
    assert first.value.reason_code == 0x82
    for _ in range(3):
        with pytest.raises(MalformedPacket) as later:
            decoder.feed(c.encode(c.Pingreq()))
        assert later.value.packets == []


def test_decoder_broken_after_max_packet_size(codec):
    decoder = codec.Decoder(5, max_packet_size=10)
    with pytest.raises(MalformedPacket):
        decoder.feed(b"\x30\x20")
    with pytest.raises(MalformedPacket):
        decoder.feed(b"\xc0\x00")


def test_decoded_packets_do_not_alias_the_input(codec):
    """A bytearray reused by the caller must not change packets already returned."""
    c = codec
    buf = bytearray(c.encode(c.Publish("a/b", b"payload", 1, packet_id=5)))
    decoder = c.Decoder(5)
    [packet] = decoder.feed(buf)
    buf[:] = b"\x00" * len(buf)
    assert packet.topic == "a/b" and packet.payload == b"payload"
    assert isinstance(packet.payload, bytes)
