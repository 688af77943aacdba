"""Property-based tests of both codecs (the ``codec`` fixture).

* round trip: ``decode(encode(p, v), v) == normalise(p, v)`` for every packet type
  and every allowed property combination, in MQTT 5.0 and 3.1.1;
* any chunking of a stream of packets gives the same packets;
* random bytes and mutated valid encodings raise MalformedPacket and nothing
  else, never hang (sizes are bounded), and whatever decodes re-encodes to
  something that decodes to the same packet.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec_strategies import normalise, packet_lists, packets, properties
from fastmqtt.enums import PROPERTY_PACKETS, WILL, PacketType
from fastmqtt.errors import MalformedPacket

# An exception a compiled function swallows ("Exception ignored in ...") is a
# bug even when the result looks right: fail the test instead of warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


# The codec fixture is a module, the same for every example: sharing it is safe.
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# AUTH exists only in MQTT 5.0; its refusal in 3.1.1 is in test_codec_errors.
_TYPE_VERSIONS = [(t, v) for v in (5, 4) for t in PacketType
                  if not (v == 4 and t == PacketType.AUTH)]


@pytest.mark.parametrize(("ptype", "version"), _TYPE_VERSIONS,
                         ids=[f"{t.name}-v{v}" for t, v in _TYPE_VERSIONS])
@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_round_trip_each_type(codec, version, ptype, data):
    packet = data.draw(packets(codec, version, [ptype]))
    encoded = codec.encode(packet, version)
    assert codec.decode(encoded, version) == normalise(codec, packet, version)
    # Encoding is deterministic and a decoded packet re-encodes to the same bytes.
    assert codec.encode(codec.decode(encoded, version), version) == encoded


@SETTINGS
@given(data=st.data())
def test_round_trip_version_3(codec, data):
    """3.1 is 3.1.1 on the wire, apart from CONNECT's protocol name."""
    packet = data.draw(packets(codec, 3))
    encoded = codec.encode(packet, 3)
    assert codec.decode(encoded, 3) == normalise(codec, packet, 3)
    assert codec.decode(encoded, 4) == normalise(codec, packet, 3)


@pytest.mark.parametrize("ptype", [t for t in PacketType if any(
    t in where for where in PROPERTY_PACKETS.values())] + [WILL],
    ids=lambda t: getattr(t, "name", "WILL"))
@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_every_property_combination(codec, ptype, data):
    """All properties allowed in a packet type survive a v5 round trip."""
    props = data.draw(properties(ptype))
    c = codec
    if ptype == WILL:
        packet = c.Connect("c", will=c.Will("w", b"x", 1, False, props), protocol_level=5)
    elif ptype == PacketType.CONNECT:
        packet = c.Connect("c", properties=props, protocol_level=5)
    elif ptype == PacketType.CONNACK:
        packet = c.Connack(False, 0, props)
    elif ptype == PacketType.PUBLISH:
        packet = c.Publish("t/1", b"p", 1, packet_id=9, properties=props)
    elif ptype in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL,
                   PacketType.PUBCOMP):
        packet = getattr(c, ptype.name.capitalize())(5, 0, props)
    elif ptype == PacketType.SUBSCRIBE:
        packet = c.Subscribe(5, [c.Subscription("a/#", 1)], props)
    elif ptype == PacketType.SUBACK:
        packet = c.Suback(5, [1], props)
    elif ptype == PacketType.UNSUBSCRIBE:
        packet = c.Unsubscribe(5, ["a/+"], props)
    elif ptype == PacketType.UNSUBACK:
        packet = c.Unsuback(5, [0], props)
    elif ptype == PacketType.DISCONNECT:
        packet = c.Disconnect(0, props)
    else:
        packet = c.Auth(0x18, props)
    decoded = c.decode(c.encode(packet, 5), 5)
    assert decoded == packet
    got = decoded.will.properties if ptype == WILL else decoded.properties
    assert dict(got) == props
    assert all(type(k) is not int for k in got)  # keys are PropertyId members


@pytest.mark.parametrize("version", [5, 4])
@settings(SETTINGS, max_examples=120)
@given(data=st.data())
def test_any_chunking_gives_the_same_packets(codec, version, data):
    stream = data.draw(packet_lists(codec, version, first_connect=True))
    encoded = b"".join(codec.encode(p, version) for p in stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=12)))
    decoder = codec.Decoder(None)  # server side: learns the version from the CONNECT
    got = []
    start = 0
    for cut in cuts + [len(encoded)]:
        got += decoder.feed(encoded[start:cut])
        start = cut
    assert got == [normalise(codec, p, version) for p in stream]
    assert decoder.buffered == 0
    assert decoder.version == version


@pytest.mark.parametrize("version", [5, 4])
@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_malformed(codec, version, data):
    for learner in (None, version):
        decoder = codec.Decoder(learner)
        try:
            decoder.feed(data)
        except MalformedPacket:
            pass
    try:
        packet = codec.decode(data, version)
    except MalformedPacket:
        return
    assert codec.decode(codec.encode(packet, version), version) == packet


def _mutate(draw, encoded: bytes) -> bytes:
    data = bytearray(encoded)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            data.append(draw(st.integers(0, 255)))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data.insert(i, draw(st.integers(0, 255)))
        elif op == "delete":
            del data[i]
        else:
            del data[i:]
    return bytes(data)


@pytest.mark.parametrize("version", [5, 4])
@SETTINGS
@given(data=st.data())
def test_mutated_encodings_raise_only_malformed(codec, version, data):
    """Near-valid input reaches the deep checks that random bytes rarely do."""
    packet = data.draw(packets(codec, version))
    mutated = _mutate(data.draw, codec.encode(packet, version))
    try:
        decoded = codec.decode(mutated, version)
    except MalformedPacket as exc:
        assert exc.reason_code in {0x81, 0x82, 0x84, 0x8F, 0x90, 0x95}
        return
    # Whatever the decoder accepts, the encoder can say again.
    assert codec.decode(codec.encode(decoded, version), version) == decoded


@pytest.mark.parametrize("version", [5, 4])
@SETTINGS
@given(data=st.data())
def test_stream_of_mutations_never_hangs(codec, version, data):
    """A stream decoder fed mutated packets either yields packets or raises
    MalformedPacket; the buffered bytes never exceed what was fed."""
    stream = data.draw(st.lists(packets(codec, version), min_size=1, max_size=4))
    blob = _mutate(data.draw, b"".join(codec.encode(p, version) for p in stream))
    decoder = codec.Decoder(version, max_packet_size=data.draw(st.sampled_from([64, 100_000])))
    try:
        for i in range(0, len(blob), 7):
            decoder.feed(blob[i:i + 7])
    except MalformedPacket:
        with pytest.raises(MalformedPacket):
            decoder.feed(b"\xc0\x00")
        return
    assert decoder.buffered <= len(blob)


@pytest.mark.parametrize("version", [5, 4])
@SETTINGS
@given(data=st.data())
def test_publish_template_matches_encode(codec, version, data):
    publish = data.draw(packets(codec, version, [PacketType.PUBLISH]))
    template = codec.PublishTemplate(publish, version)
    assert template.qos == publish.qos
    pid = data.draw(st.integers(1, 0xFFFF))
    if publish.qos == 0:
        assert template.data == codec.encode(publish, version)
        assert template.with_packet_id(pid) == template.data
        return
    dup = data.draw(st.booleans())
    expected = codec.Publish(publish.topic, publish.payload, publish.qos, publish.retain, dup,
                             pid, publish.properties)
    assert template.with_packet_id(pid, dup) == codec.encode(expected, version)


_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(65530, 65540),
    st.integers(268_435_450, 268_435_460), st.integers(2**32 - 2, 2**32 + 1),
    st.text(max_size=3), st.sampled_from(["a/+", "#", "$share/g/x", "\ud800", "a\x00"]),
    st.binary(max_size=3),
)
_ODD_PROPERTIES = st.one_of(
    st.none(), st.dictionaries(st.integers(0, 45), _ODD_VALUES, max_size=3),
    st.dictionaries(st.sampled_from([0x0B, 0x26]),
                    st.lists(st.one_of(_ODD_VALUES, st.tuples(_ODD_VALUES, _ODD_VALUES)),
                             max_size=3), max_size=2),
)


@st.composite
def _odd_packet(draw, codec):
    """A packet whose fields hold arbitrary, mostly wrong, values."""
    c = codec
    kind = draw(st.sampled_from(["Connect", "Connack", "Publish", "Puback", "Pubrel",
                                 "Subscribe", "Suback", "Unsubscribe", "Unsuback",
                                 "Disconnect", "Auth"]))
    v = lambda: draw(_ODD_VALUES)  # noqa: E731
    props = draw(_ODD_PROPERTIES)
    if kind == "Connect":
        will = None
        if draw(st.booleans()):
            will = c.Will(v(), v(), v(), v(), draw(_ODD_PROPERTIES))
        return c.Connect(v(), v(), v(), v(), v(), will, props, v())
    if kind == "Publish":
        return c.Publish(v(), v(), v(), v(), v(), v(), props)
    if kind == "Subscribe":
        subs = [c.Subscription(v(), v(), v(), v(), v()) for _ in range(draw(st.integers(0, 2)))]
        return c.Subscribe(v(), subs, props)
    if kind in ("Suback", "Unsuback"):
        return getattr(c, kind)(v(), [v() for _ in range(draw(st.integers(0, 2)))], props)
    if kind == "Unsubscribe":
        return c.Unsubscribe(v(), [v() for _ in range(draw(st.integers(0, 2)))], props)
    if kind in ("Puback", "Pubrel"):
        return getattr(c, kind)(v(), v(), props)
    if kind == "Connack":
        return c.Connack(v(), v(), props)
    return getattr(c, kind)(v(), props)


@pytest.mark.parametrize("version", [5, 4, 3])
@SETTINGS
@given(data=st.data())
def test_encode_of_odd_field_values_raises_only_malformed(codec, version, data):
    """Whatever the fields hold, encode either refuses with MalformedPacket or
    produces bytes that decode again. (A constructor may reject a value's type
    outright; that is the constructor's business, not encode's.)"""
    try:
        packet = data.draw(_odd_packet(codec))
    except (TypeError, ValueError, OverflowError):
        return
    try:
        encoded = codec.encode(packet, version)
    except MalformedPacket as exc:
        assert exc.reason_code in {0x81, 0x82, 0x84, 0x8F, 0x90, 0x95}
        return
    decoded = codec.decode(encoded, version)
    assert codec.encode(decoded, version) == encoded
