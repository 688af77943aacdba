"""Type stubs for ``fastmqtt._codec`` (compiled) — also the contract that the
pure-Python reference ``fastmqtt._codec_py`` implements name for name.

Conventions shared by every packet class:

* Instances are immutable; fields are read-only attributes with the names below.
* ``==`` compares every field (``properties`` compare as mappings); ``repr`` shows them.
* ``properties`` is a mapping ``{PropertyId: value}`` (keys compare equal to the
  plain ints). A packet without properties holds ``EMPTY_PROPERTIES`` (a shared
  read-only mapping equal to ``{}``); constructors accept ``None`` for that.
  Value types follow ``enums.PROPERTY_TYPES``: int, str, bytes; multi-valued
  properties (``USER_PROPERTY``, ``SUBSCRIPTION_IDENTIFIER``) are tuples —
  ``((name, value), ...)`` and ``(id, ...)``. Encoders accept lists for those too.
* Sequence fields (``subscriptions``, ``reason_codes``, ``topic_filters``) are tuples;
  constructors accept any iterable.
* ``packet_type`` is a class attribute (``enums.PacketType``).
* Encoding for protocol 4 (3.1.1) or 3 (3.1) drops properties and v5-only fields
  (reason codes of PUBACK/PUBREC/PUBREL/PUBCOMP/DISCONNECT/UNSUBACK); CONNACK's
  v5 reason code is mapped to a 3.1.1 return code; AUTH cannot be encoded.
* Every violation of the wire format or the specification, in decoding *and*
  encoding, raises ``fastmqtt.errors.MalformedPacket`` (``reason_code`` 0x81,
  0x82, 0x84, 0x8F, 0x90, 0x95, ...) and nothing else.
* Because packets and their fields are immutable, the compiled decoder may hand
  out the *same* object for equal values in different packets (short strings,
  whole property mappings): compare with ``==``, never with ``is``. Compiled
  packet objects are not tracked by the cyclic garbage collector; do not put a
  mutable container that refers back to a packet into one of its fields.
"""

from typing import Any, Iterable, Mapping, Sequence, Union

Properties = Mapping[int, Any]
Packet = Union[
    "Connect", "Connack", "Publish", "Puback", "Pubrec", "Pubrel", "Pubcomp",
    "Subscribe", "Suback", "Unsubscribe", "Unsuback", "Pingreq", "Pingresp",
    "Disconnect", "Auth",
]

class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties  # will properties (WILL_DELAY_INTERVAL, MESSAGE_EXPIRY_INTERVAL, ...)
    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 properties: Properties | None = None) -> None: ...

class Connect:
    packet_type: int  # 1
    client_id: str
    clean_start: bool  # "Clean Session" in 3.1.1
    keep_alive: int
    username: str | None
    password: bytes | None
    will: Will | None
    properties: Properties
    protocol_level: int  # 3, 4 or 5 once decoded; 0 = take it from encode()'s version
    def __init__(self, client_id: str = "", clean_start: bool = True, keep_alive: int = 60,
                 username: str | None = None, password: bytes | None = None,
                 will: Will | None = None, properties: Properties | None = None,
                 protocol_level: int = 0) -> None: ...

class Connack:
    packet_type: int  # 2
    session_present: bool
    reason_code: int  # v5 reason code; 3.1.1 return codes are mapped both ways
    properties: Properties
    def __init__(self, session_present: bool = False, reason_code: int = 0,
                 properties: Properties | None = None) -> None: ...

class Publish:
    packet_type: int  # 3
    topic: str  # may be "" in v5 when a TOPIC_ALIAS property is present
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int  # 0 for QoS 0, 1..65535 otherwise
    properties: Properties
    def __init__(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                 dup: bool = False, packet_id: int = 0,
                 properties: Properties | None = None) -> None: ...

class Puback:
    packet_type: int  # 4
    packet_id: int
    reason_code: int
    properties: Properties
    def __init__(self, packet_id: int, reason_code: int = 0,
                 properties: Properties | None = None) -> None: ...

class Pubrec(Puback): ...   # packet_type 5 (not a real subclass at runtime)
class Pubrel(Puback): ...   # packet_type 6
class Pubcomp(Puback): ...  # packet_type 7

class Subscription:
    """One topic filter of a SUBSCRIBE with its options (v5 3.8.3.1)."""
    topic_filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int  # 0, 1 or 2
    def __init__(self, topic_filter: str, qos: int = 0, no_local: bool = False,
                 retain_as_published: bool = False, retain_handling: int = 0) -> None: ...

class Subscribe:
    packet_type: int  # 8
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties
    def __init__(self, packet_id: int, subscriptions: Iterable[Subscription],
                 properties: Properties | None = None) -> None: ...

class Suback:
    packet_type: int  # 9
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties
    def __init__(self, packet_id: int, reason_codes: Iterable[int],
                 properties: Properties | None = None) -> None: ...

class Unsubscribe:
    packet_type: int  # 10
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties
    def __init__(self, packet_id: int, topic_filters: Iterable[str],
                 properties: Properties | None = None) -> None: ...

class Unsuback:
    packet_type: int  # 11
    packet_id: int
    reason_codes: tuple[int, ...]  # () when decoded from 3.1.1
    properties: Properties
    def __init__(self, packet_id: int, reason_codes: Iterable[int] = (),
                 properties: Properties | None = None) -> None: ...

class Pingreq:
    packet_type: int  # 12
    def __init__(self) -> None: ...

class Pingresp:
    packet_type: int  # 13
    def __init__(self) -> None: ...

class Disconnect:
    packet_type: int  # 14
    reason_code: int
    properties: Properties
    def __init__(self, reason_code: int = 0, properties: Properties | None = None) -> None: ...

class Auth:
    packet_type: int  # 15 (MQTT 5.0 only)
    reason_code: int
    properties: Properties
    def __init__(self, reason_code: int = 0, properties: Properties | None = None) -> None: ...

def encode(packet: Packet, version: int = 5) -> bytes:
    """Encode one packet for protocol level ``version`` (5, 4 or 3).

    CONNECT uses its own ``protocol_level`` when that is non-zero.
    Raises MalformedPacket if the packet breaks a rule a peer would enforce."""

def decode(data: bytes, version: int = 5) -> Packet:
    """Decode exactly one complete packet; raises MalformedPacket if ``data`` is
    incomplete, has trailing bytes or is invalid."""

def encode_stored(publish: Publish) -> bytes: ...
def encode_stored_fields(topic: str, payload: bytes, qos: int, retain: bool,
                         properties: Mapping[int, Any] | None = None) -> bytes: ...

class PublishTemplate:
    """A PUBLISH encoded once, re-emitted with a per-receiver packet id and DUP flag.

    ``data`` is the encoding with packet id 0 (QoS 0: the final bytes; QoS 1/2 ready
    to patch). ``with_packet_id`` copies it and patches the two id bytes and the DUP
    bit — no re-encoding."""
    data: bytes
    qos: int
    def __init__(self, publish: Publish, version: int = 5) -> None: ...
    def with_packet_id(self, packet_id: int, dup: bool = False) -> bytes: ...

class Decoder:
    """Streaming decoder: feed any chunking, get complete packets in order.

    ``version`` None means "learn it from the CONNECT" (server side): the first
    packet must then be a CONNECT [MQTT-3.1.0-1], else MalformedPacket(0x82).
    ``max_packet_size`` (whole packet, header included) is checked as soon as the
    fixed header is complete, before the body is buffered: MalformedPacket(0x95).
    After an error the decoder is broken: every later feed raises again.
    The MalformedPacket carries ``packets``: those completed in the same feed
    call before the bad one."""
    version: int | None
    max_packet_size: int
    def __init__(self, version: int | None = None, max_packet_size: int = ...) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]: ...
    @property
    def buffered(self) -> int:
        """Bytes held for a packet not yet complete."""
