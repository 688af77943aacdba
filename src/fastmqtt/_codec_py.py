"""Pure-Python reference implementation of the MQTT 5.0 / 3.1.1 codec.

It implements the contract in ``_codec.pyi`` name for name, and exists for three
reasons: it is the test oracle the compiled ``_codec`` is checked against, the
baseline the benchmarks compare with, and the fallback when
FASTMQTT_NO_EXTENSIONS=1. So it is written to be read, not to be fast.

Theory of operation
-------------------
Every MQTT packet is a fixed header (one byte: type in the high nibble, flags in
the low nibble; then the Remaining Length as a variable byte integer of at most
four bytes) followed by ``Remaining Length`` bytes of body. Decoding therefore
works in two stages:

1. :class:`Decoder` (or :func:`decode`) finds the packet boundary from the fixed
   header alone. That is where ``max_packet_size`` is enforced: before the body
   is buffered, so a peer cannot make us hold a 256 MB packet.
2. ``_DECODERS[type]`` parses the body with a :class:`_Reader`, which checks
   every length against the end of the packet (or of the property block) before
   reading, so a lying length raises MalformedPacket instead of reading past.

The protocol version matters for the body layout (3.1.1 has no properties and
fewer reason codes), so the decoder carries it; a server-side decoder learns it
from the CONNECT, which is self-describing (protocol name and level).

Encoding builds each body as bytes, validating the same rules the decoder
enforces, so the library cannot emit something a conforming peer must reject.

Errors are always ``MalformedPacket(message, reason_code)``: 0x81 for the byte
layout, 0x82 where the specification says "Protocol Error", 0x84 for an unknown
protocol, 0x8F/0x90 for a bad topic filter/name and 0x95 for a packet too large.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable, Mapping

from .enums import (
    BOOLEAN_PROPERTIES,
    CONNACK_V5_TO_V311,
    CONNACK_V311_TO_V5,
    EMPTY_PROPERTIES,
    MAX_PACKET_SIZE,
    MAX_REMAINING_LENGTH,
    MULTI_PROPERTIES,
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
from .errors import MalformedPacket

__all__ = [
    "Will", "Connect", "Connack", "Publish", "Puback", "Pubrec", "Pubrel", "Pubcomp",
    "Subscription", "Subscribe", "Suback", "Unsubscribe", "Unsuback", "Pingreq",
    "Pingresp", "Disconnect", "Auth", "encode", "decode", "PublishTemplate", "Decoder",
]

MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
UNSUPPORTED_PROTOCOL_VERSION = 0x84
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95

_USER_PROPERTY = PropertyId.USER_PROPERTY
_SUBSCRIPTION_IDENTIFIER = PropertyId.SUBSCRIPTION_IDENTIFIER
_TOPIC_ALIAS = PropertyId.TOPIC_ALIAS
_PROPERTY_IDS = {int(p): p for p in PropertyId}

# Accepted (protocol name, level) pairs of a CONNECT.
_PROTOCOLS = {("MQTT", 5), ("MQTT", 4), ("MQIsdp", 3)}
_PROTOCOL_NAME = {5: "MQTT", 4: "MQTT", 3: "MQIsdp"}


def _error(message: str, reason_code: int = MALFORMED) -> MalformedPacket:
    return MalformedPacket(message, reason_code)


# ---------------------------------------------------------------------------
# Packet classes
# ---------------------------------------------------------------------------


def _normalise_properties(properties: Mapping[int, Any] | None) -> Mapping[int, Any]:
    """Constructor-side view of a properties mapping: PropertyId keys, tuples for
    multi-valued properties, read-only. Values are not validated here (encode
    does that), and anything odd is kept as given so encode can refuse it."""
    if properties is None or properties is EMPTY_PROPERTIES:
        return EMPTY_PROPERTIES
    try:
        items = list(properties.items())
    except AttributeError:
        return properties  # not a mapping: encode() reports it
    if not items:
        return EMPTY_PROPERTIES
    result = {}
    for key, value in items:
        key = _PROPERTY_IDS.get(key, key) if isinstance(key, int) else key
        if key == _USER_PROPERTY and isinstance(value, (list, tuple)):
            try:
                value = tuple(tuple(pair) for pair in value)
            except TypeError:
                pass
        elif key == _SUBSCRIPTION_IDENTIFIER:
            if isinstance(value, int):
                value = (value,)
            elif isinstance(value, list):
                value = tuple(value)
        result[key] = value
    return MappingProxyType(result)


class _Packet:
    """Immutable record: fields set once in ``__init__``, compared all together."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        for name in self._fields:
            if getattr(self, name) != getattr(other, name):
                return False
        return True

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # properties are a mapping: not hashable

    def __repr__(self):
        parts = []
        for name in self._fields:
            value = getattr(self, name)
            if name == "properties":
                value = dict(value)
            parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self):
        # A read-only properties view cannot be pickled; its dict can, and the
        # constructor wraps it again.
        return (type(self), tuple(
            dict(value) if name == "properties" else value
            for name, value in ((n, getattr(self, n)) for n in self._fields)))


_set = object.__setattr__


class Will(_Packet):
    """The will message of a CONNECT: published by the server if the client
    goes away without a DISCONNECT (normal disconnection).

    Args:
        topic: topic name the will is published to.
        payload: will message bytes.
        qos: 0, 1 or 2 [MQTT-3.1.2-12].
        retain: publish the will as a retained message.
        properties: will properties (WILL_DELAY_INTERVAL, MESSAGE_EXPIRY_INTERVAL,
            CONTENT_TYPE, ...); MQTT 5.0 only.
    """

    __slots__ = ("topic", "payload", "qos", "retain", "properties")
    _fields = __slots__

    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "topic", topic)
        _set(self, "payload", payload)
        _set(self, "qos", qos)
        _set(self, "retain", retain)
        _set(self, "properties", _normalise_properties(properties))


class Connect(_Packet):
    """CONNECT (3.1): the first packet a client sends.

    Args:
        client_id: client identifier; "" asks the server to assign one.
        clean_start: Clean Start (5.0) / Clean Session (3.1.1).
        keep_alive: seconds, 0..65535 (0 disables keep alive).
        username: user name, or None for no user name flag.
        password: password bytes, or None; 3.1.1 needs a user name with it
            [MQTT-3.1.2-22].
        will: the will message, or None.
        properties: CONNECT properties (MQTT 5.0 only).
        protocol_level: 3, 4 or 5; 0 takes the version given to ``encode``.
    """

    __slots__ = ("client_id", "clean_start", "keep_alive", "username", "password", "will",
                 "properties", "protocol_level")
    _fields = __slots__
    packet_type = PacketType.CONNECT

    def __init__(self, client_id: str = "", clean_start: bool = True, keep_alive: int = 60,
                 username: str | None = None, password: bytes | None = None,
                 will: Will | None = None, properties: Mapping[int, Any] | None = None,
                 protocol_level: int = 0) -> None:
        _set(self, "client_id", client_id)
        _set(self, "clean_start", clean_start)
        _set(self, "keep_alive", keep_alive)
        _set(self, "username", username)
        _set(self, "password", password)
        _set(self, "will", will)
        _set(self, "properties", _normalise_properties(properties))
        _set(self, "protocol_level", protocol_level)


class Connack(_Packet):
    """CONNACK (3.2): the server's answer to CONNECT."""

    __slots__ = ("session_present", "reason_code", "properties")
    _fields = __slots__
    packet_type = PacketType.CONNACK

    def __init__(self, session_present: bool = False, reason_code: int = 0,
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "session_present", session_present)
        _set(self, "reason_code", reason_code)
        _set(self, "properties", _normalise_properties(properties))


class Publish(_Packet):
    """PUBLISH (3.3): an application message.

    Args:
        topic: topic name without wildcards [MQTT-3.3.2-2]; "" only in MQTT 5.0
            with a TOPIC_ALIAS property.
        payload: message bytes.
        qos: 0, 1 or 2.
        retain: the RETAIN flag.
        dup: the DUP flag (a redelivery); only with QoS 1 or 2 [MQTT-3.3.1-2].
        packet_id: 1..65535 for QoS 1 and 2, 0 for QoS 0.
        properties: PUBLISH properties (MQTT 5.0 only).
    """

    __slots__ = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")
    _fields = __slots__
    packet_type = PacketType.PUBLISH

    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 dup: bool = False, packet_id: int = 0,
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "topic", topic)
        _set(self, "payload", payload)
        _set(self, "qos", qos)
        _set(self, "retain", retain)
        _set(self, "dup", dup)
        _set(self, "packet_id", packet_id)
        _set(self, "properties", _normalise_properties(properties))


class _PubAckBase(_Packet):
    __slots__ = ("packet_id", "reason_code", "properties")
    _fields = __slots__

    def __init__(self, packet_id: int, reason_code: int = 0,
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "reason_code", reason_code)
        _set(self, "properties", _normalise_properties(properties))


class Puback(_PubAckBase):
    """PUBACK (3.4): acknowledges a QoS 1 PUBLISH."""

    __slots__ = ()
    packet_type = PacketType.PUBACK


class Pubrec(_PubAckBase):
    """PUBREC (3.5): first acknowledgement of a QoS 2 PUBLISH."""

    __slots__ = ()
    packet_type = PacketType.PUBREC


class Pubrel(_PubAckBase):
    """PUBREL (3.6): the sender releases a QoS 2 packet id."""

    __slots__ = ()
    packet_type = PacketType.PUBREL


class Pubcomp(_PubAckBase):
    """PUBCOMP (3.7): completes a QoS 2 exchange."""

    __slots__ = ()
    packet_type = PacketType.PUBCOMP


class Subscription(_Packet):
    """One topic filter of a SUBSCRIBE with its subscription options (3.8.3.1).

    Args:
        topic_filter: the filter, possibly ``$share/{name}/{filter}``.
        qos: maximum QoS, 0..2.
        no_local: don't receive own messages (5.0; not on a shared
            subscription [MQTT-3.8.3-4]).
        retain_as_published: keep the RETAIN flag of forwarded messages (5.0).
        retain_handling: 0 send retained, 1 only on a new subscription, 2 never (5.0).
    """

    __slots__ = ("topic_filter", "qos", "no_local", "retain_as_published", "retain_handling")
    _fields = __slots__

    def __init__(self, topic_filter: str, qos: int = 0, no_local: bool = False,
                 retain_as_published: bool = False, retain_handling: int = 0) -> None:
        _set(self, "topic_filter", topic_filter)
        _set(self, "qos", qos)
        _set(self, "no_local", no_local)
        _set(self, "retain_as_published", retain_as_published)
        _set(self, "retain_handling", retain_handling)

    def __hash__(self):
        return hash(tuple(getattr(self, name) for name in self._fields))


class Subscribe(_Packet):
    """SUBSCRIBE (3.8)."""

    __slots__ = ("packet_id", "subscriptions", "properties")
    _fields = __slots__
    packet_type = PacketType.SUBSCRIBE

    def __init__(self, packet_id: int, subscriptions: Iterable[Subscription],
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "subscriptions", tuple(subscriptions))
        _set(self, "properties", _normalise_properties(properties))


class Suback(_Packet):
    """SUBACK (3.9): one reason code per subscription, in order."""

    __slots__ = ("packet_id", "reason_codes", "properties")
    _fields = __slots__
    packet_type = PacketType.SUBACK

    def __init__(self, packet_id: int, reason_codes: Iterable[int],
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "reason_codes", tuple(reason_codes))
        _set(self, "properties", _normalise_properties(properties))


class Unsubscribe(_Packet):
    """UNSUBSCRIBE (3.10)."""

    __slots__ = ("packet_id", "topic_filters", "properties")
    _fields = __slots__
    packet_type = PacketType.UNSUBSCRIBE

    def __init__(self, packet_id: int, topic_filters: Iterable[str],
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "topic_filters", tuple(topic_filters))
        _set(self, "properties", _normalise_properties(properties))


class Unsuback(_Packet):
    """UNSUBACK (3.11): reason codes exist in MQTT 5.0 only."""

    __slots__ = ("packet_id", "reason_codes", "properties")
    _fields = __slots__
    packet_type = PacketType.UNSUBACK

    def __init__(self, packet_id: int, reason_codes: Iterable[int] = (),
                 properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "packet_id", packet_id)
        _set(self, "reason_codes", tuple(reason_codes))
        _set(self, "properties", _normalise_properties(properties))


class Pingreq(_Packet):
    """PINGREQ (3.12)."""

    __slots__ = ()
    packet_type = PacketType.PINGREQ


class Pingresp(_Packet):
    """PINGRESP (3.13)."""

    __slots__ = ()
    packet_type = PacketType.PINGRESP


class Disconnect(_Packet):
    """DISCONNECT (3.14)."""

    __slots__ = ("reason_code", "properties")
    _fields = __slots__
    packet_type = PacketType.DISCONNECT

    def __init__(self, reason_code: int = 0, properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "reason_code", reason_code)
        _set(self, "properties", _normalise_properties(properties))


class Auth(_Packet):
    """AUTH (3.15), MQTT 5.0 only: enhanced authentication exchange."""

    __slots__ = ("reason_code", "properties")
    _fields = __slots__
    packet_type = PacketType.AUTH

    def __init__(self, reason_code: int = 0, properties: Mapping[int, Any] | None = None) -> None:
        _set(self, "reason_code", reason_code)
        _set(self, "properties", _normalise_properties(properties))


_NAMES = {t: t.name for t in PacketType}
_NAMES[WILL] = "CONNECT will"


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


class _Reader:
    """Cursor over one packet body. Every read checks the bytes are there."""

    __slots__ = ("data", "pos", "end", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.what = what

    def _need(self, n: int, field: str) -> int:
        pos = self.pos
        if pos + n > self.end:
            raise _error(f"{self.what} {field} overruns the packet (need {n} bytes, "
                         f"{self.end - pos} left)")
        self.pos = pos + n
        return pos

    def remaining(self) -> int:
        return self.end - self.pos

    def byte(self, field: str) -> int:
        return self.data[self._need(1, field)]

    def u16(self, field: str) -> int:
        pos = self._need(2, field)
        return (self.data[pos] << 8) | self.data[pos + 1]

    def u32(self, field: str) -> int:
        pos = self._need(4, field)
        return int.from_bytes(self.data[pos:pos + 4], "big")

    def varint(self, field: str) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            b = self.byte(field)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and shift:  # the value fitted in fewer bytes
                    raise _error(f"{self.what} {field}: variable byte integer not in its "
                                 "shortest form [MQTT-1.5.5-1]")
                return value
        raise _error(f"{self.what} {field}: variable byte integer longer than 4 bytes [MQTT-1.5.5-1]")

    def binary(self, field: str) -> bytes:
        n = self.u16(field + " length")
        pos = self._need(n, field)
        return self.data[pos:pos + n]

    def string(self, field: str) -> str:
        raw = self.binary(field)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _error(f"{self.what} {field} is not well-formed UTF-8 [MQTT-1.5.4-1]") from None
        if "\x00" in text:
            raise _error(f"{self.what} {field} contains U+0000 [MQTT-1.5.4-2]")
        return text

    def rest(self) -> bytes:
        data = self.data[self.pos:self.end]
        self.pos = self.end
        return data

    def done(self) -> None:
        if self.pos != self.end:
            raise _error(f"{self.what} has {self.end - self.pos} unexpected trailing bytes")


def _check_response_topic(what: str, topic: str) -> None:
    # A Response Topic is a topic name: no wildcard [MQTT-3.3.2-14] (a will's
    # too: it is published like a PUBLISH's).
    if "+" in topic or "#" in topic:
        raise _error(f"{what} RESPONSE_TOPIC {topic[:40]!r} contains a wildcard "
                     "[MQTT-3.3.2-14]", PROTOCOL_ERROR)


def _read_properties(r: _Reader, packet: int) -> Mapping[int, Any]:
    """Read a property block (length + properties) allowed in ``packet``
    (a PacketType or WILL), enforcing section 2.2.2.2 and the per-property rules."""
    what = r.what if packet != WILL else "CONNECT will"
    length = r.varint("property length")
    if length == 0:
        return EMPTY_PROPERTIES
    if length > r.remaining():
        raise _error(f"{what} property length {length} overruns the packet")
    outer_end = r.end
    r.end = r.pos + length
    props: dict = {}
    while r.pos < r.end:
        ident = r.varint("property identifier")
        prop = _PROPERTY_IDS.get(ident)
        if prop is None:
            raise _error(f"{what} unknown property identifier 0x{ident:02X}")
        if packet not in PROPERTY_PACKETS[prop]:
            raise _error(f"{what} property {prop.name} is not allowed in this packet (2.2.2.2)")
        kind = PROPERTY_TYPES[prop]
        name = prop.name
        if kind == PropType.BYTE:
            value = r.byte(name)
            if prop in BOOLEAN_PROPERTIES and value > 1:
                raise _error(f"{what} property {name} must be 0 or 1, got {value}", PROTOCOL_ERROR)
        elif kind == PropType.TWO_BYTE_INT:
            value = r.u16(name)
        elif kind == PropType.FOUR_BYTE_INT:
            value = r.u32(name)
        elif kind == PropType.VARIABLE_BYTE_INT:
            value = r.varint(name)
        elif kind == PropType.UTF8_STRING:
            value = r.string(name)
            if prop == PropertyId.RESPONSE_TOPIC:
                _check_response_topic(what, value)
        elif kind == PropType.BINARY:
            value = r.binary(name)
        else:  # UTF8_PAIR
            value = (r.string(name + " name"), r.string(name + " value"))
        if value == 0 and prop in NONZERO_PROPERTIES:
            raise _error(f"{what} property {name} must not be 0", PROTOCOL_ERROR)
        if prop in MULTI_PROPERTIES:
            values = props.get(prop)
            if values is None:
                props[prop] = [value]
            elif prop == _SUBSCRIPTION_IDENTIFIER and packet != PacketType.PUBLISH:
                raise _error(f"{what} property {name} included more than once", PROTOCOL_ERROR)
            else:
                values.append(value)
        elif prop in props:
            raise _error(f"{what} property {name} included more than once", PROTOCOL_ERROR)
        else:
            props[prop] = value
    if PropertyId.AUTHENTICATION_DATA in props and PropertyId.AUTHENTICATION_METHOD not in props:
        raise _error(f"{what} has AUTHENTICATION_DATA without AUTHENTICATION_METHOD "
                     "(3.1.2.11.10)", PROTOCOL_ERROR)
    r.end = outer_end
    for prop in MULTI_PROPERTIES:
        if prop in props:
            props[prop] = tuple(props[prop])
    return MappingProxyType(props)


def _packet_id(r: _Reader) -> int:
    pid = r.u16("packet identifier")
    if pid == 0:
        raise _error(f"{r.what} packet identifier is 0 [MQTT-2.2.1-3]", PROTOCOL_ERROR)
    return pid


def _check_reason(r: _Reader, packet: PacketType, code: int) -> int:
    if code not in VALID_REASON_CODES[packet]:
        raise _error(f"{r.what} reason code 0x{code:02X} is not valid for this packet",
                     PROTOCOL_ERROR)
    return code


def _decode_connect(r: _Reader, flags: int, version: int) -> Connect:
    name = r.string("protocol name")
    level = r.byte("protocol level")
    if (name, level) not in _PROTOCOLS:
        raise _error(f"CONNECT protocol name {name!r} level {level} is not supported "
                     "(MQTT 5, MQTT 4 or MQIsdp 3) [MQTT-3.1.2-2]", UNSUPPORTED_PROTOCOL_VERSION)
    v5 = level == 5
    cflags = r.byte("connect flags")
    if cflags & 0x01:
        raise _error("CONNECT reserved connect flag is set [MQTT-3.1.2-3]")
    has_will = bool(cflags & 0x04)
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = bool(cflags & 0x40)
    has_username = bool(cflags & 0x80)
    if not has_will:
        if will_qos:
            raise _error("CONNECT will QoS set without the will flag [MQTT-3.1.2-11]")
        if will_retain:
            raise _error("CONNECT will retain set without the will flag [MQTT-3.1.2-13]")
    elif will_qos == 3:
        raise _error("CONNECT will QoS is 3 [MQTT-3.1.2-12]")
    if has_password and not has_username and not v5:
        raise _error("CONNECT password flag set without user name flag [MQTT-3.1.2-22]")
    keep_alive = r.u16("keep alive")
    properties = _read_properties(r, PacketType.CONNECT) if v5 else EMPTY_PROPERTIES
    client_id = r.string("client identifier")
    will = None
    if has_will:
        will_props = _read_properties(r, WILL) if v5 else EMPTY_PROPERTIES
        will_topic = r.string("will topic")
        will_payload = r.binary("will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = r.string("user name") if has_username else None
    password = r.binary("password") if has_password else None
    r.done()
    return Connect(client_id, bool(cflags & 0x02), keep_alive, username, password, will,
                   properties, level)


def _decode_connack(r: _Reader, flags: int, version: int) -> Connack:
    ack_flags = r.byte("acknowledge flags")
    if ack_flags & 0xFE:
        raise _error("CONNACK reserved acknowledge flag bits are set [MQTT-3.2.2-1]")
    code = r.byte("reason code")
    if version == 5:
        _check_reason(r, PacketType.CONNACK, code)
        properties = _read_properties(r, PacketType.CONNACK)
    else:
        if code not in CONNACK_V311_TO_V5:
            raise _error(f"CONNACK return code {code} is reserved (3.2.2.3)")
        code = CONNACK_V311_TO_V5[code]
        properties = EMPTY_PROPERTIES
    r.done()
    return Connack(bool(ack_flags & 0x01), code, properties)


def _check_topic_name(what: str, topic: str, has_alias: bool, version: int) -> None:
    if not topic:
        if version == 5 and has_alias:
            return  # the topic comes from the Topic Alias (3.3.2.3.4)
        raise _error(f"{what} topic name is empty [MQTT-4.7.3-1]", TOPIC_NAME_INVALID)
    for wildcard in "+#":
        if wildcard in topic:
            raise _error(f"{what} topic name contains wildcard {wildcard!r} [MQTT-3.3.2-2]",
                         TOPIC_NAME_INVALID)


def _decode_publish(r: _Reader, flags: int, version: int) -> Publish:
    qos = (flags >> 1) & 0x03
    dup = bool(flags & 0x08)
    if qos == 3:
        raise _error("PUBLISH QoS is 3 [MQTT-3.3.1-4]")
    if dup and qos == 0:
        raise _error("PUBLISH DUP flag set on a QoS 0 message [MQTT-3.3.1-2]")
    topic = r.string("topic name")
    packet_id = _packet_id(r) if qos else 0
    properties = _read_properties(r, PacketType.PUBLISH) if version == 5 else EMPTY_PROPERTIES
    if properties.get(_TOPIC_ALIAS) == 0:
        raise _error("PUBLISH property TOPIC_ALIAS must not be 0", PROTOCOL_ERROR)
    _check_topic_name("PUBLISH", topic, _TOPIC_ALIAS in properties, version)
    return Publish(topic, r.rest(), qos, bool(flags & 0x01), dup, packet_id, properties)


def _make_ack_decoder(cls):
    ptype = cls.packet_type

    def decode_ack(r: _Reader, flags: int, version: int):
        packet_id = _packet_id(r)
        code = 0
        properties = EMPTY_PROPERTIES
        if version == 5:
            # Remaining length 2: reason 0 and no properties; 3: reason only (3.4.2.1).
            if r.remaining():
                code = _check_reason(r, ptype, r.byte("reason code"))
                if r.remaining():
                    properties = _read_properties(r, ptype)
        r.done()
        return cls(packet_id, code, properties)

    return decode_ack


def _decode_subscribe(r: _Reader, flags: int, version: int) -> Subscribe:
    packet_id = _packet_id(r)
    properties = _read_properties(r, PacketType.SUBSCRIBE) if version == 5 else EMPTY_PROPERTIES
    subscriptions = []
    while r.remaining():
        topic_filter = r.string("topic filter")
        options = r.byte("subscription options")
        qos = options & 0x03
        if version == 5:
            if options & 0xC0:
                raise _error("SUBSCRIBE reserved subscription option bits are set [MQTT-3.8.3-5]",
                             PROTOCOL_ERROR)
            if qos == 3:
                raise _error("SUBSCRIBE maximum QoS is 3 (3.8.3.1)", PROTOCOL_ERROR)
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:
                raise _error("SUBSCRIBE retain handling is 3 (3.8.3.1)", PROTOCOL_ERROR)
            no_local = bool(options & 0x04)
            rap = bool(options & 0x08)
        else:
            # 3.1.1: the upper 6 bits are reserved and QoS 3 is not allowed: the
            # packet is malformed [MQTT-3.8.3-4] (3.1.1 numbering).
            if options & 0xFC or qos == 3:
                raise _error("SUBSCRIBE reserved bits set or QoS 3 in requested QoS byte "
                             "[MQTT-3.8.3-4]")
            retain_handling = 0
            no_local = rap = False
        _check_filter("SUBSCRIBE", topic_filter)
        if no_local and topic_filter.startswith("$share/"):
            raise _error("SUBSCRIBE no local set on a shared subscription [MQTT-3.8.3-4]",
                         PROTOCOL_ERROR)
        subscriptions.append(Subscription(topic_filter, qos, no_local, rap, retain_handling))
    if not subscriptions:
        raise _error("SUBSCRIBE contains no topic filter [MQTT-3.8.3-3]", PROTOCOL_ERROR)
    return Subscribe(packet_id, subscriptions, properties)


def _check_filter(what: str, topic_filter: str) -> None:
    from .topics import validate_topic_filter

    try:
        validate_topic_filter(topic_filter)
    except MalformedPacket as exc:
        raise _error(f"{what} {exc}", TOPIC_FILTER_INVALID) from None


def _decode_suback(r: _Reader, flags: int, version: int) -> Suback:
    packet_id = _packet_id(r)
    properties = _read_properties(r, PacketType.SUBACK) if version == 5 else EMPTY_PROPERTIES
    codes = []
    valid = VALID_REASON_CODES[PacketType.SUBACK] if version == 5 else V311_SUBACK_CODES
    while r.remaining():
        code = r.byte("reason code")
        if code not in valid:
            raise _error(f"SUBACK reason code 0x{code:02X} is not valid for this packet",
                         PROTOCOL_ERROR)
        codes.append(code)
    return Suback(packet_id, codes, properties)


def _decode_unsubscribe(r: _Reader, flags: int, version: int) -> Unsubscribe:
    packet_id = _packet_id(r)
    properties = _read_properties(r, PacketType.UNSUBSCRIBE) if version == 5 else EMPTY_PROPERTIES
    filters = []
    while r.remaining():
        topic_filter = r.string("topic filter")
        _check_filter("UNSUBSCRIBE", topic_filter)
        filters.append(topic_filter)
    if not filters:
        raise _error("UNSUBSCRIBE contains no topic filter [MQTT-3.10.3-2]", PROTOCOL_ERROR)
    return Unsubscribe(packet_id, filters, properties)


def _decode_unsuback(r: _Reader, flags: int, version: int) -> Unsuback:
    packet_id = _packet_id(r)
    codes = []
    properties = EMPTY_PROPERTIES
    if version == 5:
        properties = _read_properties(r, PacketType.UNSUBACK)
        while r.remaining():
            codes.append(_check_reason(r, PacketType.UNSUBACK, r.byte("reason code")))
    r.done()
    return Unsuback(packet_id, codes, properties)


def _decode_pingreq(r: _Reader, flags: int, version: int) -> Pingreq:
    r.done()
    return Pingreq()


def _decode_pingresp(r: _Reader, flags: int, version: int) -> Pingresp:
    r.done()
    return Pingresp()


def _decode_disconnect(r: _Reader, flags: int, version: int) -> Disconnect:
    code = 0
    properties = EMPTY_PROPERTIES
    # Remaining length 0: reason 0x00 and no properties (3.14.2.1).
    if version == 5 and r.remaining():
        code = _check_reason(r, PacketType.DISCONNECT, r.byte("reason code"))
        if r.remaining():
            properties = _read_properties(r, PacketType.DISCONNECT)
    r.done()
    return Disconnect(code, properties)


def _decode_auth(r: _Reader, flags: int, version: int) -> Auth:
    if version != 5:
        raise _error("AUTH packet in MQTT 3.1.1 (it exists in MQTT 5.0 only)", PROTOCOL_ERROR)
    code = 0
    properties = EMPTY_PROPERTIES
    if r.remaining():
        code = _check_reason(r, PacketType.AUTH, r.byte("reason code"))
        if r.remaining():
            properties = _read_properties(r, PacketType.AUTH)
    r.done()
    return Auth(code, properties)


_DECODERS = {
    PacketType.CONNECT: _decode_connect,
    PacketType.CONNACK: _decode_connack,
    PacketType.PUBLISH: _decode_publish,
    PacketType.PUBACK: _make_ack_decoder(Puback),
    PacketType.PUBREC: _make_ack_decoder(Pubrec),
    PacketType.PUBREL: _make_ack_decoder(Pubrel),
    PacketType.PUBCOMP: _make_ack_decoder(Pubcomp),
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.SUBACK: _decode_suback,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.UNSUBACK: _decode_unsuback,
    PacketType.PINGREQ: _decode_pingreq,
    PacketType.PINGRESP: _decode_pingresp,
    PacketType.DISCONNECT: _decode_disconnect,
    PacketType.AUTH: _decode_auth,
}

# Fixed-header flag nibble required for every type but PUBLISH [MQTT-2.1.3-1].
_REQUIRED_FLAGS = {t: (0x02 if t in (PacketType.PUBREL, PacketType.SUBSCRIBE,
                                     PacketType.UNSUBSCRIBE) else 0x00) for t in PacketType}


def _check_first_byte(first: int) -> PacketType:
    ptype = first >> 4
    if ptype == 0:
        raise _error("packet type 0 is reserved (2.1.2)")
    ptype = PacketType(ptype)
    if ptype != PacketType.PUBLISH and first & 0x0F != _REQUIRED_FLAGS[ptype]:
        raise _error(f"{ptype.name} reserved fixed header flags are 0x{first & 0x0F:X}, "
                     f"must be 0x{_REQUIRED_FLAGS[ptype]:X} [MQTT-2.1.3-1]")
    return ptype


def _packet_name(first: int) -> str:
    """Name of the packet type in a first byte, for messages (type 0 included)."""
    return PacketType(first >> 4).name if first >> 4 else "packet type 0"


def _decode_body(first: int, body: bytes, version: int):
    ptype = _check_first_byte(first)
    return _DECODERS[ptype](_Reader(body, ptype.name), first & 0x0F, version)


def _wire_version(version) -> int:
    if version in (4, 3):
        return 4
    if version == 5:
        return 5
    raise _error(f"unsupported protocol version {version!r} (5, 4 or 3)",
                 UNSUPPORTED_PROTOCOL_VERSION)


def decode(data: bytes, version: int = 5):
    """Decode exactly one complete packet.

    Args:
        data: the whole packet, fixed header included.
        version: protocol level of the connection (5, 4 or 3). A CONNECT is
            decoded with its own protocol level whatever this says.

    Returns:
        The packet object.

    Raises:
        MalformedPacket: if ``data`` is incomplete, has trailing bytes or breaks
            a rule of the specification.
    """
    wire = _wire_version(version)
    data = bytes(data)
    if not data:
        raise _error("empty input: no fixed header")
    name = _packet_name(data[0])
    r = _Reader(data, name)
    r.byte("packet type")
    length = r.varint("remaining length")
    header = r.pos
    if len(data) - header < length:
        raise _error(f"{name} incomplete: remaining length {length}, "
                     f"{len(data) - header} bytes given")
    if len(data) - header > length:
        raise _error(f"{name} followed by {len(data) - header - length} trailing bytes")
    return _decode_body(data[0], data[header:], wire)


class Decoder:
    """Streaming decoder: feed any chunking of the byte stream, get complete
    packets in order.

    Args:
        version: protocol level (5, 4 or 3), or None to learn it from the first
            packet, which must then be a CONNECT [MQTT-3.1.0-1].
        max_packet_size: largest packet accepted (whole packet, fixed header
            included); checked as soon as the fixed header is complete.
    """

    def __init__(self, version: int | None = None, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        if version is not None:
            _wire_version(version)
        self.version = version
        self.max_packet_size = max_packet_size
        self._buffer = bytearray()
        self._broken: tuple[str, int] | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a packet not yet complete."""
        return len(self._buffer)

    def feed(self, data) -> list:
        """Add bytes from the stream and return the packets now complete.

        Args:
            data: any number of bytes (bytes, bytearray or memoryview).

        Returns:
            The complete packets, in stream order (possibly empty).

        Raises:
            MalformedPacket: on the first bad packet, with ``packets`` holding the
                packets completed before it in this call. The decoder is then
                broken and every later call raises again.
        """
        if self._broken is not None:
            message, code = self._broken
            raise _error(f"decoder is broken by an earlier error: {message}", code)
        buf = self._buffer
        buf += data
        packets: list = []
        pos = 0
        try:
            while True:
                size = self._next_size(buf, pos)
                if size is None or len(buf) - pos < size[0]:
                    break
                total, header = size
                first = buf[pos]
                body = bytes(buf[pos + header:pos + total])
                if self.version is None:
                    packet = _decode_body(first, body, 5)  # CONNECT uses its own level
                    self.version = packet.protocol_level
                else:
                    packet = _decode_body(first, body, _wire_version(self.version))
                packets.append(packet)
                pos += total
        except MalformedPacket as exc:
            exc.packets = packets
            self._broken = (str(exc), exc.reason_code)
            buf.clear()
            raise
        del buf[:pos]
        return packets

    def _next_size(self, buf: bytearray, pos: int):
        """(total size, header size) of the packet at ``pos``, or None while the
        fixed header is incomplete."""
        avail = len(buf) - pos
        if avail < 1:
            return None
        first = buf[pos]
        if self.version is None and first >> 4 != PacketType.CONNECT:
            raise _error(f"first packet must be CONNECT, got {_packet_name(first)} "
                         "[MQTT-3.1.0-1]", PROTOCOL_ERROR)
        _check_first_byte(first)
        length = 0
        for i in range(4):
            if avail < 2 + i:
                return None
            b = buf[pos + 1 + i]
            length |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if b == 0 and i:
                    raise _error(f"{_packet_name(first)} remaining length: variable byte "
                                 "integer not in its shortest form [MQTT-1.5.5-1]")
                break
        else:
            raise _error(f"{_packet_name(first)} remaining length: variable byte integer "
                         "longer than 4 bytes [MQTT-1.5.5-1]")
        header = 2 + i
        total = header + length
        if total > self.max_packet_size:
            raise _error(f"{_packet_name(first)} of {total} bytes exceeds the maximum packet size "
                         f"{self.max_packet_size}", PACKET_TOO_LARGE)
        return total, header


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _u16(value: int, what: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise _error(f"{what} must be an int 0..65535, got {value!r}")
    return value.to_bytes(2, "big")


def _enc_binary(value, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _error(f"{what} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > 0xFFFF:
        raise _error(f"{what} is longer than 65535 bytes (1.5.6)")
    return len(value).to_bytes(2, "big") + value


def _enc_string(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise _error(f"{what} must be a str, not {type(value).__name__}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise _error(f"{what} is not well-formed UTF-8 [MQTT-1.5.4-1]") from None
    if "\x00" in value:
        raise _error(f"{what} contains U+0000 [MQTT-1.5.4-2]")
    if len(raw) > 0xFFFF:
        raise _error(f"{what} is longer than 65535 bytes (1.5.4)")
    return len(raw).to_bytes(2, "big") + raw


def _is_int(value) -> bool:
    return isinstance(value, int)


def _enc_property_value(prop: PropertyId, value, what: str) -> bytes:
    kind = PROPERTY_TYPES[prop]
    name = f"{what} property {prop.name}"
    if kind in (PropType.BYTE, PropType.TWO_BYTE_INT, PropType.FOUR_BYTE_INT,
                PropType.VARIABLE_BYTE_INT):
        if not _is_int(value):
            raise _error(f"{name} must be an int, not {type(value).__name__}")
        if value == 0 and prop in NONZERO_PROPERTIES:
            raise _error(f"{name} must not be 0", PROTOCOL_ERROR)
    if kind == PropType.BYTE:
        if prop in BOOLEAN_PROPERTIES and value not in (0, 1):
            raise _error(f"{name} must be 0 or 1, got {value!r}", PROTOCOL_ERROR)
        if not 0 <= value <= 0xFF:
            raise _error(f"{name} must fit one byte, got {value!r}")
        return bytes((value,))
    if kind == PropType.TWO_BYTE_INT:
        if not 0 <= value <= 0xFFFF:
            raise _error(f"{name} must be 0..65535, got {value!r}")
        return value.to_bytes(2, "big")
    if kind == PropType.FOUR_BYTE_INT:
        if not 0 <= value <= 0xFFFFFFFF:
            raise _error(f"{name} must be 0..4294967295, got {value!r}")
        return value.to_bytes(4, "big")
    if kind == PropType.VARIABLE_BYTE_INT:
        if not 0 <= value <= MAX_REMAINING_LENGTH:
            raise _error(f"{name} must be 1..268435455, got {value!r}")
        return _varint(value)
    if kind == PropType.UTF8_STRING:
        return _enc_string(value, name)
    if kind == PropType.BINARY:
        return _enc_binary(value, name)
    # UTF8_PAIR
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _error(f"{name} must be a (name, value) pair of str, got {value!r}")
    return _enc_string(value[0], name + " name") + _enc_string(value[1], name + " value")


def _enc_properties(properties, packet: int) -> bytes:
    """The property block (length + properties) for ``packet`` (a PacketType or
    WILL), in ascending property id order so the bytes are deterministic."""
    what = _NAMES[packet]
    if properties is None or properties is EMPTY_PROPERTIES:
        return b"\x00"
    if not isinstance(properties, Mapping):
        raise _error(f"{what} properties must be a mapping, not {type(properties).__name__}")
    if not properties:
        return b"\x00"
    keyed = []
    for key, value in properties.items():
        prop = _PROPERTY_IDS.get(key) if _is_int(key) else None
        if prop is None:
            raise _error(f"{what} unknown property identifier {key!r}")
        if packet not in PROPERTY_PACKETS[prop]:
            raise _error(f"{what} property {prop.name} is not allowed in this packet (2.2.2.2)")
        keyed.append((int(prop), prop, value))
    if (PropertyId.AUTHENTICATION_DATA in properties
            and PropertyId.AUTHENTICATION_METHOD not in properties):
        raise _error(f"{what} has AUTHENTICATION_DATA without AUTHENTICATION_METHOD "
                     "(3.1.2.11.10)", PROTOCOL_ERROR)
    keyed.sort(key=lambda item: item[0])
    out = bytearray()
    for ident, prop, value in keyed:
        if prop in MULTI_PROPERTIES:
            if prop == _SUBSCRIPTION_IDENTIFIER and _is_int(value):
                values = (value,)
            elif isinstance(value, (list, tuple)):
                values = value
            else:
                raise _error(f"{what} property {prop.name} must be a list or tuple")
            if (prop == _SUBSCRIPTION_IDENTIFIER and packet != PacketType.PUBLISH
                    and len(values) > 1):
                raise _error(f"{what} property {prop.name} included more than once",
                             PROTOCOL_ERROR)
            for item in values:
                out.append(ident)
                out += _enc_property_value(prop, item, what)
        else:
            out.append(ident)
            out += _enc_property_value(prop, value, what)
            if prop == PropertyId.RESPONSE_TOPIC:  # a str: checked by the line above
                _check_response_topic(what, value)
    return _varint(len(out)) + bytes(out)


def _fixed(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING_LENGTH:
        raise _error(f"remaining length {len(body)} exceeds 268435455 (2.1.4)", PACKET_TOO_LARGE)
    return bytes((first,)) + _varint(len(body)) + body


def _enc_packet_id(packet_id, what: str) -> bytes:
    if not _is_int(packet_id) or not 1 <= packet_id <= 0xFFFF:
        raise _error(f"{what} packet identifier must be 1..65535, got {packet_id!r} "
                     "[MQTT-2.2.1-3]", PROTOCOL_ERROR)
    return packet_id.to_bytes(2, "big")


def _enc_reason(code, packet: PacketType) -> int:
    if not _is_int(code) or code not in VALID_REASON_CODES[packet]:
        raise _error(f"{packet.name} reason code {code!r} is not valid for this packet",
                     PROTOCOL_ERROR)
    return code


def _check_qos(qos, what: str, statement: str) -> int:
    if not _is_int(qos) or not 0 <= qos <= 2:
        raise _error(f"{what} QoS must be 0, 1 or 2, got {qos!r} {statement}")
    return qos


def _encode_connect(p: Connect, version: int) -> bytes:
    level = p.protocol_level or version
    if level not in _PROTOCOL_NAME:
        raise _error(f"CONNECT protocol level {level!r} is not supported (5, 4 or 3)",
                     UNSUPPORTED_PROTOCOL_VERSION)
    v5 = level == 5
    flags = 0x02 if p.clean_start else 0x00
    will = p.will
    if will is not None:
        if not isinstance(will, Will):
            raise _error(f"CONNECT will must be a Will, not {type(will).__name__}")
        flags |= 0x04 | (_check_qos(will.qos, "CONNECT will", "[MQTT-3.1.2-12]") << 3)
        if will.retain:
            flags |= 0x20
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if p.username is None and not v5:
            raise _error("CONNECT password without user name in MQTT 3.1.1 [MQTT-3.1.2-22]")
        flags |= 0x40
    body = bytearray()
    body += _enc_string(_PROTOCOL_NAME[level], "CONNECT protocol name")
    body.append(level)
    body.append(flags)
    body += _u16(p.keep_alive, "CONNECT keep alive")
    if v5:
        body += _enc_properties(p.properties, PacketType.CONNECT)
    body += _enc_string(p.client_id, "CONNECT client identifier")
    if will is not None:
        if v5:
            body += _enc_properties(will.properties, WILL)
        body += _enc_string(will.topic, "CONNECT will topic")
        body += _enc_binary(will.payload, "CONNECT will payload")
    if p.username is not None:
        body += _enc_string(p.username, "CONNECT user name")
    if p.password is not None:
        body += _enc_binary(p.password, "CONNECT password")
    return _fixed(0x10, bytes(body))


def _encode_connack(p: Connack, version: int) -> bytes:
    code = _enc_reason(p.reason_code, PacketType.CONNACK)
    flags = 0x01 if p.session_present else 0x00
    if version == 5:
        return _fixed(0x20, bytes((flags, code)) + _enc_properties(p.properties,
                                                                   PacketType.CONNACK))
    return _fixed(0x20, bytes((flags, CONNACK_V5_TO_V311[code])))


def _publish_parts(p: Publish, version: int, packet_id_bytes: bytes | None):
    """(first byte, topic part, id part, rest) of a PUBLISH; ``packet_id_bytes``
    overrides the id (PublishTemplate encodes with id 0)."""
    qos = _check_qos(p.qos, "PUBLISH", "[MQTT-3.3.1-4]")
    if p.dup and qos == 0:
        raise _error("PUBLISH DUP flag set on a QoS 0 message [MQTT-3.3.1-2]")
    if version == 5:
        props = _enc_properties(p.properties, PacketType.PUBLISH)
        has_alias = bool(p.properties) and _TOPIC_ALIAS in p.properties
    else:
        props = b""
        has_alias = False
    topic = _enc_string(p.topic, "PUBLISH topic name")
    _check_topic_name("PUBLISH", p.topic, has_alias, version)
    if not isinstance(p.payload, (bytes, bytearray, memoryview)):
        raise _error(f"PUBLISH payload must be bytes, not {type(p.payload).__name__}")
    if qos:
        pid = packet_id_bytes if packet_id_bytes is not None else _enc_packet_id(p.packet_id,
                                                                                  "PUBLISH")
    else:
        pid = b""
    first = 0x30 | (qos << 1) | (0x08 if p.dup else 0) | (0x01 if p.retain else 0)
    return first, topic, pid, props + bytes(p.payload)


def _encode_publish(p: Publish, version: int) -> bytes:
    first, topic, pid, rest = _publish_parts(p, version, None)
    return _fixed(first, topic + pid + rest)


def _make_ack_encoder(ptype: PacketType):
    first = (ptype << 4) | _REQUIRED_FLAGS[ptype]

    def encode_ack(p, version: int) -> bytes:
        pid = _enc_packet_id(p.packet_id, ptype.name)
        if version != 5:
            return _fixed(first, pid)
        code = _enc_reason(p.reason_code, ptype)
        props = _enc_properties(p.properties, ptype)
        if props == b"\x00":
            # Short forms (3.4.2.1): no properties -> no property length; also
            # reason 0 -> no reason code.
            return _fixed(first, pid if code == 0 else pid + bytes((code,)))
        return _fixed(first, pid + bytes((code,)) + props)

    return encode_ack


def _encode_subscribe(p: Subscribe, version: int) -> bytes:
    body = bytearray(_enc_packet_id(p.packet_id, "SUBSCRIBE"))
    if version == 5:
        body += _enc_properties(p.properties, PacketType.SUBSCRIBE)
    if not p.subscriptions:
        raise _error("SUBSCRIBE contains no topic filter [MQTT-3.8.3-3]", PROTOCOL_ERROR)
    for sub in p.subscriptions:
        if not isinstance(sub, Subscription):
            raise _error(f"SUBSCRIBE subscriptions must be Subscription, not {type(sub).__name__}")
        body += _enc_string(sub.topic_filter, "SUBSCRIBE topic filter")
        _check_filter("SUBSCRIBE", sub.topic_filter)
        qos = sub.qos
        if not _is_int(qos) or not 0 <= qos <= 2:
            raise _error(f"SUBSCRIBE maximum QoS must be 0, 1 or 2, got {qos!r} (3.8.3.1)",
                         PROTOCOL_ERROR)
        if version == 5:
            rh = sub.retain_handling
            if not _is_int(rh) or not 0 <= rh <= 2:
                raise _error(f"SUBSCRIBE retain handling must be 0, 1 or 2, got {rh!r} (3.8.3.1)",
                             PROTOCOL_ERROR)
            if sub.no_local and sub.topic_filter.startswith("$share/"):
                raise _error("SUBSCRIBE no local set on a shared subscription [MQTT-3.8.3-4]",
                             PROTOCOL_ERROR)
            options = (qos | (0x04 if sub.no_local else 0)
                       | (0x08 if sub.retain_as_published else 0) | (rh << 4))
        else:
            options = qos
        body.append(options)
    return _fixed(0x82, bytes(body))


def _encode_suback(p: Suback, version: int) -> bytes:
    body = bytearray(_enc_packet_id(p.packet_id, "SUBACK"))
    valid = VALID_REASON_CODES[PacketType.SUBACK] if version == 5 else V311_SUBACK_CODES
    if version == 5:
        body += _enc_properties(p.properties, PacketType.SUBACK)
    for code in p.reason_codes:
        if not _is_int(code) or code not in valid:
            raise _error(f"SUBACK reason code {code!r} is not valid for this packet"
                         + ("" if version == 5 else " in MQTT 3.1.1"), PROTOCOL_ERROR)
        body.append(code)
    return _fixed(0x90, bytes(body))


def _encode_unsubscribe(p: Unsubscribe, version: int) -> bytes:
    body = bytearray(_enc_packet_id(p.packet_id, "UNSUBSCRIBE"))
    if version == 5:
        body += _enc_properties(p.properties, PacketType.UNSUBSCRIBE)
    if not p.topic_filters:
        raise _error("UNSUBSCRIBE contains no topic filter [MQTT-3.10.3-2]", PROTOCOL_ERROR)
    for topic_filter in p.topic_filters:
        body += _enc_string(topic_filter, "UNSUBSCRIBE topic filter")
        _check_filter("UNSUBSCRIBE", topic_filter)
    return _fixed(0xA2, bytes(body))


def _encode_unsuback(p: Unsuback, version: int) -> bytes:
    body = bytearray(_enc_packet_id(p.packet_id, "UNSUBACK"))
    if version == 5:
        body += _enc_properties(p.properties, PacketType.UNSUBACK)
        for code in p.reason_codes:
            body.append(_enc_reason(code, PacketType.UNSUBACK))
    return _fixed(0xB0, bytes(body))


def _encode_pingreq(p: Pingreq, version: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p: Pingresp, version: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(p: Disconnect, version: int) -> bytes:
    if version != 5:
        return b"\xe0\x00"
    code = _enc_reason(p.reason_code, PacketType.DISCONNECT)
    props = _enc_properties(p.properties, PacketType.DISCONNECT)
    if props == b"\x00":
        return _fixed(0xE0, b"" if code == 0 else bytes((code,)))
    return _fixed(0xE0, bytes((code,)) + props)


def _encode_auth(p: Auth, version: int) -> bytes:
    if version != 5:
        raise _error("AUTH cannot be encoded for MQTT 3.1.1 (MQTT 5.0 only)", PROTOCOL_ERROR)
    code = _enc_reason(p.reason_code, PacketType.AUTH)
    props = _enc_properties(p.properties, PacketType.AUTH)
    if props == b"\x00" and code == 0:
        # 3.15.2: reason code and property length may be omitted together
        # (remaining length 0). Unlike DISCONNECT (3.14.2.2.1) and the acks
        # (3.4.2.2.1), AUTH has no clause letting the property length alone be
        # left out, so a non-zero reason is always followed by it.
        return b"\xf0\x00"
    return _fixed(0xF0, bytes((code,)) + props)


_ENCODERS = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _make_ack_encoder(PacketType.PUBACK),
    Pubrec: _make_ack_encoder(PacketType.PUBREC),
    Pubrel: _make_ack_encoder(PacketType.PUBREL),
    Pubcomp: _make_ack_encoder(PacketType.PUBCOMP),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: _encode_pingreq,
    Pingresp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet, version: int = 5) -> bytes:
    """Encode one packet.

    Args:
        packet: a packet object of this module.
        version: protocol level (5, 4 or 3). A CONNECT with a non-zero
            ``protocol_level`` uses that instead. For 4 and 3, properties and
            v5-only reason codes are dropped and CONNACK's reason code is mapped
            to a 3.1.1 return code.

    Returns:
        The packet's bytes, fixed header included.

    Raises:
        MalformedPacket: if the packet breaks a rule a conforming peer would
            enforce (wildcard topic name, QoS 3, packet id 0, property not
            allowed in the packet, string over 65535 bytes, ...).
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise _error(f"cannot encode {type(packet).__name__}: not a packet of this codec")
    wire = _wire_version(version)
    if encoder is _encode_connect:
        # CONNECT is the one packet where 3 (MQIsdp) and 4 (MQTT) differ.
        return _encode_connect(packet, version)
    return encoder(packet, wire)


class PublishTemplate:
    """A PUBLISH encoded once, re-emitted per receiver with its own packet id
    and DUP flag, without re-encoding (the broker's fan-out path).

    Args:
        publish: the message; its ``packet_id`` and ``dup`` are ignored.
        version: protocol level to encode for (5, 4 or 3).

    Raises:
        MalformedPacket: if the PUBLISH cannot be encoded.
    """

    __slots__ = ("data", "qos", "_id_offset")

    def __init__(self, publish: Publish, version: int = 5) -> None:
        if not isinstance(publish, Publish):
            raise _error(f"PublishTemplate needs a Publish, not {type(publish).__name__}")
        if publish.dup:
            publish = Publish(publish.topic, publish.payload, publish.qos, publish.retain,
                              False, publish.packet_id, publish.properties)
        wire = _wire_version(version)
        first, topic, pid, rest = _publish_parts(publish, wire, b"\x00\x00")
        data = _fixed(first, topic + pid + rest)
        self.data = data
        self.qos = publish.qos
        # The id follows the fixed header and the topic.
        self._id_offset = len(data) - len(rest) - len(pid)

    def with_packet_id(self, packet_id: int, dup: bool = False) -> bytes:
        """The PUBLISH bytes with ``packet_id`` and the DUP flag patched in.

        Args:
            packet_id: 1..65535 for QoS 1/2; ignored for QoS 0.
            dup: set DUP (a redelivery); not allowed for QoS 0 [MQTT-3.3.1-2].

        Returns:
            The encoded PUBLISH.

        Raises:
            MalformedPacket: packet id out of range (0x82) or DUP on QoS 0 (0x81).
        """
        if self.qos == 0:
            if dup:
                raise _error("PUBLISH DUP flag set on a QoS 0 message [MQTT-3.3.1-2]")
            return self.data
        out = bytearray(self.data)
        out[self._id_offset:self._id_offset + 2] = _enc_packet_id(packet_id, "PUBLISH")
        if dup:
            out[0] |= 0x08
        return bytes(out)

    def __repr__(self) -> str:
        return f"PublishTemplate(qos={self.qos}, data={self.data!r})"
