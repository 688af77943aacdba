"""MQTT constants with the specification's names: packet types, reason codes, properties.

Both codecs (the compiled ``_codec`` and the pure-Python ``_codec_py``) read the
property table and the reason-code sets from here, so there is one statement of
what MQTT 5.0 allows where (OASIS MQTT 5.0, sections 2.2.2.2 and 2.4).
"""

from __future__ import annotations

from enum import IntEnum
from types import MappingProxyType

__all__ = [
    "PacketType",
    "ReasonCode",
    "PropertyId",
    "PropType",
    "PROPERTY_TYPES",
    "PROPERTY_PACKETS",
    "MULTI_PROPERTIES",
    "WILL",
    "VALID_REASON_CODES",
    "V311_SUBACK_CODES",
    "CONNACK_V5_TO_V311",
    "CONNACK_V311_TO_V5",
    "EMPTY_PROPERTIES",
    "MAX_REMAINING_LENGTH",
    "MAX_PACKET_SIZE",
]

#: Largest value of the Remaining Length field (four-byte variable byte integer).
MAX_REMAINING_LENGTH = 268_435_455
#: Largest whole packet: 1 fixed-header byte + 4 length bytes + the body.
MAX_PACKET_SIZE = MAX_REMAINING_LENGTH + 5

#: Shared read-only "no properties" mapping; decoders hand it out instead of
#: allocating an empty dict per packet. Compares equal to ``{}``.
EMPTY_PROPERTIES = MappingProxyType({})


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(IntEnum):
    """MQTT 5.0 reason codes (section 2.4). Aliases share a value."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class PropertyId(IntEnum):
    """MQTT 5.0 property identifiers (section 2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class PropType(IntEnum):
    """Wire data type of a property value (section 1.5)."""

    BYTE = 1  # value: int 0..255 (all byte properties here allow only 0/1, except MAXIMUM_QOS 0/1)
    TWO_BYTE_INT = 2  # int 0..65535
    FOUR_BYTE_INT = 3  # int 0..4294967295
    VARIABLE_BYTE_INT = 4  # int 1..268435455 (only SUBSCRIPTION_IDENTIFIER)
    UTF8_STRING = 5  # str
    BINARY = 6  # bytes
    UTF8_PAIR = 7  # (str, str) (only USER_PROPERTY)


P = PropertyId
T = PropType

PROPERTY_TYPES: dict[int, PropType] = {
    P.PAYLOAD_FORMAT_INDICATOR: T.BYTE,
    P.MESSAGE_EXPIRY_INTERVAL: T.FOUR_BYTE_INT,
    P.CONTENT_TYPE: T.UTF8_STRING,
    P.RESPONSE_TOPIC: T.UTF8_STRING,
    P.CORRELATION_DATA: T.BINARY,
    P.SUBSCRIPTION_IDENTIFIER: T.VARIABLE_BYTE_INT,
    P.SESSION_EXPIRY_INTERVAL: T.FOUR_BYTE_INT,
    P.ASSIGNED_CLIENT_IDENTIFIER: T.UTF8_STRING,
    P.SERVER_KEEP_ALIVE: T.TWO_BYTE_INT,
    P.AUTHENTICATION_METHOD: T.UTF8_STRING,
    P.AUTHENTICATION_DATA: T.BINARY,
    P.REQUEST_PROBLEM_INFORMATION: T.BYTE,
    P.WILL_DELAY_INTERVAL: T.FOUR_BYTE_INT,
    P.REQUEST_RESPONSE_INFORMATION: T.BYTE,
    P.RESPONSE_INFORMATION: T.UTF8_STRING,
    P.SERVER_REFERENCE: T.UTF8_STRING,
    P.REASON_STRING: T.UTF8_STRING,
    P.RECEIVE_MAXIMUM: T.TWO_BYTE_INT,
    P.TOPIC_ALIAS_MAXIMUM: T.TWO_BYTE_INT,
    P.TOPIC_ALIAS: T.TWO_BYTE_INT,
    P.MAXIMUM_QOS: T.BYTE,
    P.RETAIN_AVAILABLE: T.BYTE,
    P.USER_PROPERTY: T.UTF8_PAIR,
    P.MAXIMUM_PACKET_SIZE: T.FOUR_BYTE_INT,
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: T.BYTE,
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: T.BYTE,
    P.SHARED_SUBSCRIPTION_AVAILABLE: T.BYTE,
}

#: Pseudo packet type for the Will Properties inside CONNECT.
WILL = 0

_PT = PacketType
_ALL_WITH_PROPS = frozenset(
    [_PT.CONNECT, _PT.CONNACK, _PT.PUBLISH, WILL, _PT.PUBACK, _PT.PUBREC, _PT.PUBREL,
     _PT.PUBCOMP, _PT.SUBSCRIBE, _PT.SUBACK, _PT.UNSUBSCRIBE, _PT.UNSUBACK,
     _PT.DISCONNECT, _PT.AUTH]
)
_ACKS = frozenset([_PT.PUBACK, _PT.PUBREC, _PT.PUBREL, _PT.PUBCOMP])

#: Property id -> the packet types (and ``WILL``) it may appear in.
PROPERTY_PACKETS: dict[int, frozenset] = {
    P.PAYLOAD_FORMAT_INDICATOR: frozenset([_PT.PUBLISH, WILL]),
    P.MESSAGE_EXPIRY_INTERVAL: frozenset([_PT.PUBLISH, WILL]),
    P.CONTENT_TYPE: frozenset([_PT.PUBLISH, WILL]),
    P.RESPONSE_TOPIC: frozenset([_PT.PUBLISH, WILL]),
    P.CORRELATION_DATA: frozenset([_PT.PUBLISH, WILL]),
    P.SUBSCRIPTION_IDENTIFIER: frozenset([_PT.PUBLISH, _PT.SUBSCRIBE]),
    P.SESSION_EXPIRY_INTERVAL: frozenset([_PT.CONNECT, _PT.CONNACK, _PT.DISCONNECT]),
    P.ASSIGNED_CLIENT_IDENTIFIER: frozenset([_PT.CONNACK]),
    P.SERVER_KEEP_ALIVE: frozenset([_PT.CONNACK]),
    P.AUTHENTICATION_METHOD: frozenset([_PT.CONNECT, _PT.CONNACK, _PT.AUTH]),
    P.AUTHENTICATION_DATA: frozenset([_PT.CONNECT, _PT.CONNACK, _PT.AUTH]),
    P.REQUEST_PROBLEM_INFORMATION: frozenset([_PT.CONNECT]),
    P.WILL_DELAY_INTERVAL: frozenset([WILL]),
    P.REQUEST_RESPONSE_INFORMATION: frozenset([_PT.CONNECT]),
    P.RESPONSE_INFORMATION: frozenset([_PT.CONNACK]),
    P.SERVER_REFERENCE: frozenset([_PT.CONNACK, _PT.DISCONNECT]),
    P.REASON_STRING: frozenset([_PT.CONNACK, _PT.SUBACK, _PT.UNSUBACK, _PT.DISCONNECT, _PT.AUTH]) | _ACKS,
    P.RECEIVE_MAXIMUM: frozenset([_PT.CONNECT, _PT.CONNACK]),
    P.TOPIC_ALIAS_MAXIMUM: frozenset([_PT.CONNECT, _PT.CONNACK]),
    P.TOPIC_ALIAS: frozenset([_PT.PUBLISH]),
    P.MAXIMUM_QOS: frozenset([_PT.CONNACK]),
    P.RETAIN_AVAILABLE: frozenset([_PT.CONNACK]),
    P.USER_PROPERTY: _ALL_WITH_PROPS,
    P.MAXIMUM_PACKET_SIZE: frozenset([_PT.CONNECT, _PT.CONNACK]),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: frozenset([_PT.CONNACK]),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: frozenset([_PT.CONNACK]),
    P.SHARED_SUBSCRIPTION_AVAILABLE: frozenset([_PT.CONNACK]),
}

#: Properties that may appear more than once. Their value in a properties
#: mapping is always a tuple: of ``(name, value)`` str pairs for USER_PROPERTY,
#: of ints for SUBSCRIPTION_IDENTIFIER (at most one element in SUBSCRIBE,
#: several allowed in PUBLISH, [MQTT-3.3.4-4]).
MULTI_PROPERTIES = frozenset([P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER])

#: Byte properties whose only legal values are 0 and 1 (a different value is a
#: Protocol Error).
BOOLEAN_PROPERTIES = frozenset([
    P.PAYLOAD_FORMAT_INDICATOR, P.REQUEST_PROBLEM_INFORMATION,
    P.REQUEST_RESPONSE_INFORMATION, P.MAXIMUM_QOS, P.RETAIN_AVAILABLE,
    P.WILDCARD_SUBSCRIPTION_AVAILABLE, P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    P.SHARED_SUBSCRIPTION_AVAILABLE,
])

#: Integer properties for which 0 is a Protocol Error.
NONZERO_PROPERTIES = frozenset([
    P.RECEIVE_MAXIMUM, P.MAXIMUM_PACKET_SIZE, P.TOPIC_ALIAS, P.SUBSCRIPTION_IDENTIFIER,
])

_R = ReasonCode
#: Packet type -> reason codes that packet may carry in MQTT 5.0.
VALID_REASON_CODES: dict[int, frozenset] = {
    _PT.CONNACK: frozenset([
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C,
        0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]),
    _PT.PUBACK: frozenset([0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]),
    _PT.PUBREC: frozenset([0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]),
    _PT.PUBREL: frozenset([0x00, 0x92]),
    _PT.PUBCOMP: frozenset([0x00, 0x92]),
    _PT.SUBACK: frozenset([0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]),
    _PT.UNSUBACK: frozenset([0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]),
    _PT.DISCONNECT: frozenset([
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90,
        0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F,
        0xA0, 0xA1, 0xA2]),
    _PT.AUTH: frozenset([0x00, 0x18, 0x19]),
}

#: SUBACK return codes that exist in MQTT 3.1.1 (section 3.9.3).
V311_SUBACK_CODES = frozenset([0x00, 0x01, 0x02, 0x80])

#: MQTT 3.1.1 CONNACK return code -> MQTT 5.0 reason code (decoding).
CONNACK_V311_TO_V5: dict[int, int] = {0: 0x00, 1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}

#: MQTT 5.0 reason code -> MQTT 3.1.1 CONNACK return code (encoding). Codes with
#: no 3.1.1 counterpart map to the nearest one, as Mosquitto does.
CONNACK_V5_TO_V311: dict[int, int] = {
    0x00: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5,
    0x80: 3, 0x81: 3, 0x82: 3, 0x83: 3, 0x89: 3, 0x8A: 5, 0x8C: 4, 0x90: 3,
    0x95: 3, 0x97: 3, 0x99: 3, 0x9A: 3, 0x9B: 3, 0x9C: 3, 0x9D: 3, 0x9F: 3,
}

del P, T
