"""Hypothesis strategies for MQTT packets, reusable by any test.

Every strategy takes the codec *module* (``fastmqtt._codec`` or
``fastmqtt._codec_py``, e.g. the ``codec`` fixture) because each implementation
has its own packet classes, and a protocol ``version`` (5 or 4; 3 behaves as 4
except for CONNECT).

* ``packets(codec, version)`` draws any packet that ``codec.encode(p, version)``
  must accept. For version 4 it still draws MQTT 5.0 properties and reason codes
  where encoding for 3.1.1 drops them, so dropping is exercised too; use
  ``normalise(codec, p, version)`` for what decoding those bytes gives back.
* ``properties(packet_type, ...)`` draws every allowed combination of properties
  for a packet type (or ``enums.WILL``), following ``enums.PROPERTY_PACKETS``.
* ``topic_names()`` / ``topic_filters()`` draw valid names and filters, with
  ``$``-topics, empty levels, wildcards and shared subscriptions.

Sizes are kept small so that a few hundred examples run in about a second.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fastmqtt.enums import (
    BOOLEAN_PROPERTIES,
    CONNACK_V5_TO_V311,
    CONNACK_V311_TO_V5,
    NONZERO_PROPERTIES,
    PROPERTY_PACKETS,
    PROPERTY_TYPES,
    V311_SUBACK_CODES,
    VALID_REASON_CODES,
    WILL,
    PacketType,
    PropertyId,
    PropType,
)

__all__ = [
    "utf8_text", "topic_levels", "topic_names", "topic_filters", "property_value",
    "properties", "packets", "packet_lists", "normalise", "PACKET_STRATEGIES",
]

#: Characters allowed in an MQTT UTF-8 string: anything but surrogates and U+0000.
_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def utf8_text(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings MQTT allows in a UTF-8 Encoded String (1.5.4), multi-byte included."""
    return st.text(_CHARS, min_size=min_size, max_size=max_size)


_LEVEL_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#/")


def topic_levels(min_size: int = 0, max_size: int = 6) -> st.SearchStrategy[str]:
    """One topic level: no '/', no wildcards, possibly empty."""
    return st.one_of(
        st.sampled_from(["a", "b", "sport", "tennis", "$SYS", "", "chat", "ws1", "dm"]),
        st.text(_LEVEL_CHARS, min_size=min_size, max_size=max_size),
    )


def topic_names(max_levels: int = 5) -> st.SearchStrategy[str]:
    """Valid topic names: non-empty, no wildcards [MQTT-3.3.2-2]."""
    return (
        st.lists(topic_levels(), min_size=1, max_size=max_levels)
        .map("/".join)
        .filter(bool)
    )


@st.composite
def _plain_filters(draw, max_levels: int = 5) -> str:
    levels = draw(st.lists(st.one_of(topic_levels(), st.just("+")), min_size=1,
                           max_size=max_levels))
    if draw(st.booleans()):
        levels.append("#")
    result = "/".join(levels)
    return result or "#"


@st.composite
def topic_filters(draw, shared: bool | None = None) -> str:
    """Valid topic filters; ``shared`` True/False forces or forbids ``$share/``."""
    base = draw(_plain_filters())
    if shared is None:
        shared = draw(st.integers(0, 4)) == 0
    if shared:
        name = draw(st.text(_LEVEL_CHARS, min_size=1, max_size=6))
        return f"$share/{name}/{base}"
    if base.startswith("$share/"):
        return "x" + base
    return base


def property_value(prop: PropertyId, packet: int) -> st.SearchStrategy:
    """Values of one property as a decoder returns them (tuples for multi)."""
    kind = PROPERTY_TYPES[prop]
    low = 1 if prop in NONZERO_PROPERTIES else 0
    if prop == PropertyId.USER_PROPERTY:
        return st.lists(st.tuples(utf8_text(), utf8_text()), min_size=1, max_size=3).map(tuple)
    if prop == PropertyId.SUBSCRIPTION_IDENTIFIER:
        ids = st.integers(1, 268_435_455)
        if packet == PacketType.PUBLISH:
            return st.lists(ids, min_size=1, max_size=3).map(tuple)
        return ids.map(lambda i: (i,))
    if kind == PropType.BYTE:
        return st.integers(0, 1) if prop in BOOLEAN_PROPERTIES else st.integers(0, 255)
    if kind == PropType.TWO_BYTE_INT:
        return st.integers(low, 0xFFFF)
    if kind == PropType.FOUR_BYTE_INT:
        return st.integers(low, 0xFFFFFFFF)
    if prop == PropertyId.RESPONSE_TOPIC:
        return topic_names()  # a topic name: no wildcards [MQTT-3.3.2-14]
    if kind == PropType.UTF8_STRING:
        return utf8_text()
    if kind == PropType.BINARY:
        return st.binary(max_size=16)
    raise AssertionError(prop)


def properties(packet: int, exclude=()) -> st.SearchStrategy[dict]:
    """Any combination of the properties allowed in ``packet`` (a PacketType or
    ``enums.WILL``), each at most once (multi-valued ones as tuples)."""
    allowed = sorted(p for p, where in PROPERTY_PACKETS.items()
                     if packet in where and p not in exclude)
    return st.fixed_dictionaries(
        {}, optional={PropertyId(p): property_value(PropertyId(p), packet) for p in allowed}
    ).filter(_auth_data_has_method)


def _auth_data_has_method(props: dict) -> bool:
    # "It is a Protocol Error to include Authentication Data if there is no
    # Authentication Method" (3.1.2.11.10, 3.2.2.3.18, 3.15.2.2.3).
    return (PropertyId.AUTHENTICATION_DATA not in props
            or PropertyId.AUTHENTICATION_METHOD in props)


def _props_or_empty(packet: int, version: int, exclude=()):
    # For 3.1.1 draw properties too (encode must drop them) but half of the
    # time none at all.
    return st.one_of(st.just({}), properties(packet, exclude))


@st.composite
def _connect(draw, codec, version: int):
    level = draw(st.sampled_from([0, version] if version == 5 else [0, 4, 3]))
    v5 = (level or version) == 5
    will = None
    if draw(st.booleans()):
        will = codec.Will(
            draw(topic_names()), draw(st.binary(max_size=20)), draw(st.integers(0, 2)),
            draw(st.booleans()), draw(_props_or_empty(WILL, version)),
        )
    username = draw(st.one_of(st.none(), utf8_text()))
    password = draw(st.one_of(st.none(), st.binary(max_size=12)))
    if not v5 and username is None:
        password = None  # [MQTT-3.1.2-22]
    return codec.Connect(
        draw(utf8_text(max_size=23)), draw(st.booleans()), draw(st.integers(0, 0xFFFF)),
        username, password, will, draw(_props_or_empty(PacketType.CONNECT, version)), level,
    )


@st.composite
def _connack(draw, codec, version: int):
    codes = VALID_REASON_CODES[PacketType.CONNACK]
    if version != 5:
        codes = [c for c in codes if c in CONNACK_V5_TO_V311]
    code = draw(st.sampled_from(sorted(codes)))
    return codec.Connack(draw(st.booleans()), code,
                         draw(_props_or_empty(PacketType.CONNACK, version)))


@st.composite
def _publish(draw, codec, version: int):
    qos = draw(st.integers(0, 2))
    props = draw(_props_or_empty(PacketType.PUBLISH, version))
    topic = draw(topic_names())
    if version == 5 and PropertyId.TOPIC_ALIAS in props and draw(st.booleans()):
        topic = ""  # the topic travels in the alias (3.3.2.3.4)
    return codec.Publish(
        topic, draw(st.binary(max_size=40)), qos, draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(st.integers(1, 0xFFFF)) if qos else 0, props,
    )


def _ack(cls_name: str, ptype: PacketType):
    @st.composite
    def strategy(draw, codec, version: int):
        code = draw(st.sampled_from(sorted(VALID_REASON_CODES[ptype])))
        return getattr(codec, cls_name)(draw(st.integers(1, 0xFFFF)), code,
                                        draw(_props_or_empty(ptype, version)))
    return strategy


@st.composite
def _subscription(draw, codec, version: int):
    topic_filter = draw(topic_filters())
    no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")  # [MQTT-3.8.3-4]
    return codec.Subscription(topic_filter, draw(st.integers(0, 2)), no_local,
                              draw(st.booleans()), draw(st.integers(0, 2)))


@st.composite
def _subscribe(draw, codec, version: int):
    subs = draw(st.lists(_subscription(codec, version), min_size=1, max_size=4))
    return codec.Subscribe(draw(st.integers(1, 0xFFFF)), subs,
                           draw(_props_or_empty(PacketType.SUBSCRIBE, version)))


@st.composite
def _suback(draw, codec, version: int):
    valid = VALID_REASON_CODES[PacketType.SUBACK] if version == 5 else V311_SUBACK_CODES
    codes = draw(st.lists(st.sampled_from(sorted(valid)), min_size=1, max_size=5))
    return codec.Suback(draw(st.integers(1, 0xFFFF)), codes,
                        draw(_props_or_empty(PacketType.SUBACK, version)))


@st.composite
def _unsubscribe(draw, codec, version: int):
    filters = draw(st.lists(topic_filters(), min_size=1, max_size=4))
    return codec.Unsubscribe(draw(st.integers(1, 0xFFFF)), filters,
                             draw(_props_or_empty(PacketType.UNSUBSCRIBE, version)))


@st.composite
def _unsuback(draw, codec, version: int):
    codes = draw(st.lists(st.sampled_from(sorted(VALID_REASON_CODES[PacketType.UNSUBACK])),
                          min_size=1, max_size=5))
    return codec.Unsuback(draw(st.integers(1, 0xFFFF)), codes,
                          draw(_props_or_empty(PacketType.UNSUBACK, version)))


@st.composite
def _disconnect(draw, codec, version: int):
    code = draw(st.sampled_from(sorted(VALID_REASON_CODES[PacketType.DISCONNECT])))
    return codec.Disconnect(code, draw(_props_or_empty(PacketType.DISCONNECT, version)))


@st.composite
def _auth(draw, codec, version: int):
    code = draw(st.sampled_from(sorted(VALID_REASON_CODES[PacketType.AUTH])))
    return codec.Auth(code, draw(_props_or_empty(PacketType.AUTH, version)))


def _simple(cls_name: str):
    def strategy(codec, version: int):
        return st.builds(getattr(codec, cls_name))
    return strategy


#: PacketType -> strategy factory ``(codec, version) -> SearchStrategy``.
PACKET_STRATEGIES = {
    PacketType.CONNECT: _connect,
    PacketType.CONNACK: _connack,
    PacketType.PUBLISH: _publish,
    PacketType.PUBACK: _ack("Puback", PacketType.PUBACK),
    PacketType.PUBREC: _ack("Pubrec", PacketType.PUBREC),
    PacketType.PUBREL: _ack("Pubrel", PacketType.PUBREL),
    PacketType.PUBCOMP: _ack("Pubcomp", PacketType.PUBCOMP),
    PacketType.SUBSCRIBE: _subscribe,
    PacketType.SUBACK: _suback,
    PacketType.UNSUBSCRIBE: _unsubscribe,
    PacketType.UNSUBACK: _unsuback,
    PacketType.PINGREQ: _simple("Pingreq"),
    PacketType.PINGRESP: _simple("Pingresp"),
    PacketType.DISCONNECT: _disconnect,
    PacketType.AUTH: _auth,
}


def packets(codec, version: int = 5, types=None) -> st.SearchStrategy:
    """Any packet ``codec.encode(p, version)`` must accept (AUTH only for v5).

    Args:
        codec: the codec module whose classes to build.
        version: 5, 4 or 3.
        types: restrict to these PacketTypes.
    """
    wire = 5 if version == 5 else 4
    chosen = types or [t for t in PacketType if wire == 5 or t != PacketType.AUTH]
    return st.one_of([PACKET_STRATEGIES[t](codec, wire) for t in chosen])


@st.composite
def packet_lists(draw, codec, version: int = 5, first_connect: bool = False, max_size: int = 6):
    """A list of packets as they could follow each other on one connection
    (``first_connect``: starting with a CONNECT of that version)."""
    result = []
    if first_connect:
        level = version
        result.append(draw(_connect(codec, 5 if version == 5 else 4)
                           .filter(lambda p: (p.protocol_level or level) == level)))
    result += draw(st.lists(packets(codec, version), max_size=max_size))
    return result


def normalise(codec, packet, version: int):
    """What ``decode(encode(packet, version), version)`` must return.

    For 5 that is the packet itself, except that a CONNECT gets its protocol
    level filled in. For 4 and 3 the 3.1.1 wire format drops properties, the
    reason codes of the acks, DISCONNECT and UNSUBACK and the subscription
    options other than QoS, and maps CONNACK's code to a 3.1.1 return code and back.
    """
    c = codec
    if isinstance(packet, c.Connect):
        level = packet.protocol_level or version
        keep = level == 5
        will = packet.will
        if will is not None and not keep:
            will = c.Will(will.topic, will.payload, will.qos, will.retain, None)
        return c.Connect(packet.client_id, packet.clean_start, packet.keep_alive,
                         packet.username, packet.password, will,
                         packet.properties if keep else None, level)
    if version == 5:
        return packet
    if isinstance(packet, c.Connack):
        code = CONNACK_V311_TO_V5[CONNACK_V5_TO_V311[packet.reason_code]]
        return c.Connack(packet.session_present, code)
    if isinstance(packet, c.Publish):
        return c.Publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup,
                         packet.packet_id)
    for name in ("Puback", "Pubrec", "Pubrel", "Pubcomp"):
        if isinstance(packet, getattr(c, name)):
            return getattr(c, name)(packet.packet_id)
    if isinstance(packet, c.Subscribe):
        return c.Subscribe(packet.packet_id,
                           [c.Subscription(s.topic_filter, s.qos) for s in packet.subscriptions])
    if isinstance(packet, c.Suback):
        return c.Suback(packet.packet_id, packet.reason_codes)
    if isinstance(packet, c.Unsubscribe):
        return c.Unsubscribe(packet.packet_id, packet.topic_filters)
    if isinstance(packet, c.Unsuback):
        return c.Unsuback(packet.packet_id, ())
    if isinstance(packet, c.Disconnect):
        return c.Disconnect()
    return packet
