# cython: language_level=3, embedsignature=True, cdivision=True
"""Compiled MQTT 5.0 / 3.1.1 codec: packet classes, encoder, streaming decoder.

It implements ``_codec.pyi`` name for name and behaves exactly like the
pure-Python reference ``_codec_py`` (same packets, same exception type and
reason codes); the conformance suite runs against both.

Theory of operation
-------------------
A packet is a fixed header (type nibble + flags nibble, then the Remaining
Length as a variable byte integer of at most four bytes, in its shortest
form [MQTT-1.5.5-1]) and
``Remaining Length`` bytes of body.

Decoding never copies a body and never creates an intermediate Python object:
the input buffer is taken once (bytes directly, anything else through the
buffer protocol) and a ``Reader`` -- a C pointer plus an end pointer -- walks
it. Each field read checks its length against ``end`` once; a property block
temporarily narrows ``end`` to the block so a lying property cannot read past
it. Only the objects that reach the caller are created: for a PUBLISH that is
the packet (from a freelist, filled through ``__new__`` with no ``__init__``),
the topic ``str`` (strict UTF-8 decode after a ``memchr`` for U+0000) and the
payload ``bytes``.

The streaming ``Decoder`` decodes straight from the caller's chunk whenever a
packet lies whole inside it. Only the tail of a chunk that ends mid-packet is
copied into a private ``PyMem`` buffer, which then never holds more than one
packet: the next chunk first tops that packet up (the fixed header tells its
exact size, checked against ``max_packet_size`` before any body byte is
stored), and decoding resumes from the chunk itself.

Two small caches remove allocations that chat traffic repeats: short ASCII
strings (topics, property strings, filters) and whole property blocks, keyed by
their raw bytes (and the packet type). Both return shared immutable objects,
are filled only with values that passed every check, and are direct-mapped
(a new value simply replaces an old one). Packet classes are ``no_gc`` and the
decoder untracks the tuples and dicts it builds, so queued packets cost the
cyclic collector nothing.

Encoding validates the same rules the decoder enforces, computes the exact
size first (properties are checked, sorted by id and recorded in C form in a
small "plan"), allocates the result ``bytes`` once and fills it.

Errors are only ever ``fastmqtt.errors.MalformedPacket(message, reason_code)``:
0x81 byte layout, 0x82 "Protocol Error", 0x84 protocol name/level, 0x8F/0x90
topic filter/name, 0x95 too large.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

from collections.abc import Mapping as _Mapping
from types import MappingProxyType as _MappingProxyType

from .enums import (
    BOOLEAN_PROPERTIES as _BOOLEAN_PROPERTIES,
    CONNACK_V5_TO_V311 as _CONNACK_V5_TO_V311,
    CONNACK_V311_TO_V5 as _CONNACK_V311_TO_V5,
    EMPTY_PROPERTIES as _EMPTY_PROPERTIES_py,
    MAX_PACKET_SIZE as _MAX_PACKET_SIZE,
    NONZERO_PROPERTIES as _NONZERO_PROPERTIES,
    PROPERTY_PACKETS as _PROPERTY_PACKETS,
    PROPERTY_TYPES as _PROPERTY_TYPES,
    V311_SUBACK_CODES as _V311_SUBACK_CODES,
    VALID_REASON_CODES as _VALID_REASON_CODES,
    PacketType,
    PropertyId,
)
from .errors import MalformedPacket as _MalformedPacket_py

__all__ = [
    "Will", "Connect", "Connack", "Publish", "Puback", "Pubrec", "Pubrel", "Pubcomp",
    "Subscription", "Subscribe", "Suback", "Unsubscribe", "Unsuback", "Pingreq",
    "Pingresp", "Disconnect", "Auth", "encode", "decode", "PublishTemplate", "Decoder",
]

cdef extern from "Python.h":
    # Declared without exception handling so the hot paths test for NULL and
    # convert the error themselves (no try/except frame per string).
    PyObject* _PyUnicode_DecodeUTF8 "PyUnicode_DecodeUTF8"(
        const char* s, Py_ssize_t size, const char* errors)
    const char* _PyUnicode_AsUTF8AndSize "PyUnicode_AsUTF8AndSize"(
        object s, Py_ssize_t* size)
    object PyDictProxy_New(object mapping)
    void PyErr_Clear()
    bint PyUnicode_Check(object o)
    bint PyLong_Check(object o)
    bint PyBytes_CheckExact(object o)
    bint PyUnicode_CheckExact(object o)
    void PyObject_GC_UnTrack(object o)

# Hot module globals as C-level references (no module dict lookup).
cdef object MalformedPacket = _MalformedPacket_py
cdef object EMPTY = _EMPTY_PROPERTIES_py
cdef object MappingProxyType = _MappingProxyType

# ----------------------------------------------------------------- constants

cdef enum:
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
    WILL = 0

cdef enum:
    T_BYTE = 1
    T_U16 = 2
    T_U32 = 3
    T_VBI = 4
    T_STR = 5
    T_BIN = 6
    T_PAIR = 7

cdef enum:
    P_RESPONSE_TOPIC = 0x08
    P_SUBID = 0x0B
    P_AUTH_METHOD = 0x15
    P_AUTH_DATA = 0x16
    P_TOPIC_ALIAS = 0x23
    P_USER = 0x26

cdef enum:
    RC_MALFORMED = 0x81
    RC_PROTOCOL = 0x82
    RC_VERSION = 0x84
    RC_FILTER = 0x8F
    RC_TOPIC = 0x90
    RC_TOO_LARGE = 0x95

cdef Py_ssize_t MAX_RL = 268435455

# Property tables, filled once from enums (the single statement of the rules).
cdef unsigned char _PTYPE[64]       # PropType, 0 = unknown id
cdef unsigned int _PALLOW[64]       # bit n set: allowed in packet type n (bit 0 = WILL)
cdef unsigned char _PBOOL[64]       # only 0/1 allowed (else Protocol Error)
cdef unsigned char _PNONZERO[64]    # 0 is a Protocol Error
cdef PyObject* _PKEY[256]           # PropertyId members (refs held by _PKEY_REFS)
cdef object _PKEY_REFS = []
cdef list _PNAME = [None] * 64      # property names for messages
cdef unsigned char _VALID_RC[16][256]
cdef unsigned char _V311_SUBACK[256]
cdef int _V5_TO_V311[256]           # -1 = no mapping
cdef int _V311_TO_V5[256]           # -1 = reserved return code
cdef tuple _PKT_NAMES = ("CONNECT will", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC",
                         "PUBREL", "PUBCOMP", "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE",
                         "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH")
cdef dict _PROPERTY_IDS = {int(p): p for p in PropertyId}


cdef void _init_tables() except *:
    cdef int i, pid
    for i in range(64):
        _PTYPE[i] = 0
        _PALLOW[i] = 0
        _PBOOL[i] = 0
        _PNONZERO[i] = 0
    for i in range(256):
        _PKEY[i] = NULL
        _V311_SUBACK[i] = 0
        _V5_TO_V311[i] = -1
        _V311_TO_V5[i] = -1
    for i in range(16):
        for pid in range(256):
            _VALID_RC[i][pid] = 0
    for prop, kind in _PROPERTY_TYPES.items():
        pid = int(prop)
        _PTYPE[pid] = int(kind)
        _PNAME[pid] = PropertyId(pid).name
        key = PropertyId(pid)
        _PKEY_REFS.append(key)
        _PKEY[pid] = <PyObject*>key
        for packet in _PROPERTY_PACKETS[prop]:
            _PALLOW[pid] |= 1u << int(packet)
    for prop in _BOOLEAN_PROPERTIES:
        _PBOOL[int(prop)] = 1
    for prop in _NONZERO_PROPERTIES:
        _PNONZERO[int(prop)] = 1
    for packet, codes in _VALID_REASON_CODES.items():
        for code in codes:
            _VALID_RC[int(packet)][int(code)] = 1
    for code in _V311_SUBACK_CODES:
        _V311_SUBACK[int(code)] = 1
    for a, b in _CONNACK_V5_TO_V311.items():
        _V5_TO_V311[int(a)] = int(b)
    for a, b in _CONNACK_V311_TO_V5.items():
        _V311_TO_V5[int(a)] = int(b)


_init_tables()


# ------------------------------------------------------------------- errors

cdef int _fail(str message, int reason_code=RC_MALFORMED) except -1:
    raise MalformedPacket(message, reason_code)


cdef inline str _pname(int ptype):
    return <str>_PKT_NAMES[ptype]


cdef int _wire_version(object version) except -1:
    """5 for MQTT 5.0, 4 for 3.1.1 and 3.1 (same body layout)."""
    if PyLong_Check(version):
        if version == 5:
            return 5
        if version == 4 or version == 3:
            return 4
    _fail(f"unsupported protocol version {version!r} (5, 4 or 3)", RC_VERSION)


cdef tuple _tuple_append(tuple t, object value):
    """A new tuple: ``t`` plus ``value`` (small tuples come from a freelist)."""
    cdef Py_ssize_t n = PyTuple_GET_SIZE(t), i
    cdef tuple out = PyTuple_New(n + 1)
    for i in range(n):
        item = <object>PyTuple_GET_ITEM(t, i)
        Py_INCREF(item)
        PyTuple_SET_ITEM(out, i, item)
    Py_INCREF(value)
    PyTuple_SET_ITEM(out, n, value)
    return out


cdef extern from "Python.h":
    void Py_SET_SIZE(object o, Py_ssize_t n)


cdef tuple _tuple_head(tuple t, Py_ssize_t n):
    """``t`` cut to its first ``n`` items, in place. ``t`` is new and only
    referenced by the caller, items ``n`` and up are NULL (never set), and
    nothing has seen or hashed it: shrinking ``ob_size`` is what
    ``_PyTuple_Resize`` does minus the realloc (the block stays 8 slots; the
    freelist then reuses it for a tuple of ``n``, which fits)."""
    if n < PyTuple_GET_SIZE(t):
        Py_SET_SIZE(t, n)
    return t


cdef inline object _atomic(object container):
    """``container`` untracked by the cyclic GC: it holds only atomic values
    (str, int) or objects that are themselves untracked packets/tuples."""
    PyObject_GC_UnTrack(container)
    return container



# ------------------------------------------------------ decoded property mapping

@cython.final
@cython.no_gc
cdef class _Properties:
    """The read-only properties mapping of a decoded packet.

    Behaves as ``types.MappingProxyType`` over a dict (it is registered as a
    ``collections.abc.Mapping`` and compares equal to dicts and other
    mappings), but is not a GC-tracked object: the private dict it wraps holds
    only PropertyId keys and ints, strs, bytes and tuples of those (untracked),
    and nothing can be added to it, so it can never be part of a reference
    cycle. A decoded packet with properties then adds nothing to the cyclic
    collector's work (a mappingproxy is tracked, and a batch of decoded packets
    paid for it in every young collection)."""

    cdef dict _d

    def __cinit__(self):
        self._d = {}

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __reversed__(self):
        return reversed(self._d)

    def __len__(self):
        return len(self._d)

    def __contains__(self, key):
        return key in self._d

    def get(self, key, default=None):
        return self._d.get(key, default)

    def keys(self):
        return self._d.keys()

    def values(self):
        return self._d.values()

    def items(self):
        return self._d.items()

    def copy(self):
        return self._d.copy()

    def __or__(self, other):
        if type(other) is _Properties:
            return self._d | (<_Properties>other)._d
        return self._d | other

    def __ror__(self, other):
        return other | self._d

    def __eq__(self, other):
        if type(other) is _Properties:
            return self._d == (<_Properties>other)._d
        if isinstance(other, dict):
            return self._d == other
        if isinstance(other, _Mapping):
            return self._d == dict(other.items())
        return NotImplemented

    def __ne__(self, other):
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    __hash__ = None

    def __repr__(self):
        return f"mappingproxy({self._d!r})"

    def __reduce__(self):
        return (_properties_from_dict, (dict(self._d),))


def _properties_from_dict(d):
    """Unpickle a ``_Properties`` (as a read-only view of ``d``)."""
    return _normalise_properties(d)


cdef inline _Properties _new_properties(dict d):
    cdef _Properties p = _Properties.__new__(_Properties)
    p._d = d
    return p


_Mapping.register(_Properties)

# ---------------------------------------------------------- property helpers

cdef object _normalise_properties(object properties):
    """Constructor-side view: PropertyId keys, tuples for multi-valued
    properties, read-only. Values are validated by encode, not here, and
    anything odd is kept as given so encode can refuse it."""
    if properties is None or properties is EMPTY:
        return EMPTY
    if type(properties) is _Properties:
        return properties  # decoded: already normalised and read-only
    try:
        items = list(properties.items())
    except AttributeError:
        return properties
    if not items:
        return EMPTY
    cdef dict result = {}
    for key, value in items:
        if PyLong_Check(key):
            key = _PROPERTY_IDS.get(key, key)
        if key == P_USER and isinstance(value, (list, tuple)):
            try:
                value = tuple([tuple(pair) for pair in value])
            except TypeError:
                pass
        elif key == P_SUBID:
            if PyLong_Check(value):
                value = (value,)
            elif isinstance(value, list):
                value = tuple(value)
        result[key] = value
    return PyDictProxy_New(result)


cdef inline object _props_arg(object properties):
    """Properties as a constructor argument for pickling (mappingproxy is not
    picklable)."""
    if properties is EMPTY:
        return None
    if isinstance(properties, MappingProxyType):
        return dict(properties)
    if type(properties) is _Properties:
        return dict((<_Properties>properties)._d)
    return properties


cdef inline str _props_repr(object properties):
    if isinstance(properties, MappingProxyType):
        return repr(dict(properties))
    if type(properties) is _Properties:
        return repr((<_Properties>properties)._d)
    return repr(properties)


# ------------------------------------------------------------ packet classes

# Packet objects carry only immutable data (str, bytes, ints, read-only
# mappings, tuples), so they cannot be part of a reference cycle. They are
# declared ``no_gc``: the cyclic collector neither tracks nor scans them, and the
# decoder also untracks the tuples it builds from atomic values (not the
# mapping views: mappingproxy's dealloc unlinks itself from the GC list
# unconditionally). A broker holding thousands of decoded packets in queues
# would otherwise pay for them in every young-generation collection (measured:
# a third of a batch decode went to gc_collect_main). The one way to leak is a
# programmer putting a mutable container that refers back to the packet into a
# constructor argument.

@cython.final
@cython.freelist(8)
@cython.no_gc
cdef class Will:
    """The will message of a CONNECT, published by the server when the client
    goes away without a normal DISCONNECT.

    Args:
        topic: will topic name.
        payload: will payload.
        qos: will QoS (0, 1, 2).
        retain: will retain flag.
        properties: will properties (WILL_DELAY_INTERVAL, MESSAGE_EXPIRY_INTERVAL, ...).
    """

    cdef readonly object topic
    cdef readonly object payload
    cdef readonly int qos
    cdef readonly bint retain
    cdef readonly object properties

    def __init__(self, topic, payload=b"", int qos=0, bint retain=False, properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = _normalise_properties(properties)

    def __eq__(self, other):
        if type(other) is not Will:
            return NotImplemented
        cdef Will o = <Will>other
        return (self.qos == o.qos and self.retain == o.retain and self.topic == o.topic
                and self.payload == o.payload and self.properties == o.properties)

    def __repr__(self):
        return (f"Will(topic={self.topic!r}, payload={self.payload!r}, qos={self.qos!r}, "
                f"retain={self.retain!r}, properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (Will, (self.topic, self.payload, self.qos, self.retain,
                       _props_arg(self.properties)))


@cython.final
@cython.no_gc
cdef class Connect:
    """CONNECT (3.1): the first packet a client sends.

    Args:
        client_id: client identifier (may be empty).
        clean_start: Clean Start (v5) / Clean Session (3.1.1).
        keep_alive: keep alive in seconds (0..65535).
        username: user name or None.
        password: password bytes or None.
        will: the will message or None.
        properties: CONNECT properties (v5).
        protocol_level: 3, 4 or 5; 0 takes the level from ``encode``'s version.
    """

    packet_type = PacketType.CONNECT
    cdef readonly object client_id
    cdef readonly bint clean_start
    cdef readonly int keep_alive
    cdef readonly object username
    cdef readonly object password
    cdef readonly object will
    cdef readonly object properties
    cdef readonly int protocol_level

    def __init__(self, client_id="", bint clean_start=True, int keep_alive=60,
                 username=None, password=None, will=None, properties=None,
                 int protocol_level=0):
        self.client_id = client_id
        self.clean_start = clean_start
        self.keep_alive = keep_alive
        self.username = username
        self.password = password
        self.will = will
        self.properties = _normalise_properties(properties)
        self.protocol_level = protocol_level

    def __eq__(self, other):
        if type(other) is not Connect:
            return NotImplemented
        cdef Connect o = <Connect>other
        return (self.clean_start == o.clean_start and self.keep_alive == o.keep_alive
                and self.protocol_level == o.protocol_level and self.client_id == o.client_id
                and self.username == o.username and self.password == o.password
                and self.will == o.will and self.properties == o.properties)

    def __repr__(self):
        return (f"Connect(client_id={self.client_id!r}, clean_start={self.clean_start!r}, "
                f"keep_alive={self.keep_alive!r}, username={self.username!r}, "
                f"password={self.password!r}, will={self.will!r}, "
                f"properties={_props_repr(self.properties)}, "
                f"protocol_level={self.protocol_level!r})")

    def __reduce__(self):
        return (Connect, (self.client_id, self.clean_start, self.keep_alive, self.username,
                          self.password, self.will, _props_arg(self.properties),
                          self.protocol_level))


@cython.final
@cython.no_gc
cdef class Connack:
    """CONNACK (3.2): the server's answer to CONNECT.

    Args:
        session_present: the server resumed a session.
        reason_code: MQTT 5.0 reason code (3.1.1 return codes are mapped both ways).
        properties: CONNACK properties (v5).
    """

    packet_type = PacketType.CONNACK
    cdef readonly bint session_present
    cdef readonly int reason_code
    cdef readonly object properties

    def __init__(self, bint session_present=False, int reason_code=0, properties=None):
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = _normalise_properties(properties)

    def __eq__(self, other):
        if type(other) is not Connack:
            return NotImplemented
        cdef Connack o = <Connack>other
        return (self.session_present == o.session_present and self.reason_code == o.reason_code
                and self.properties == o.properties)

    def __repr__(self):
        return (f"Connack(session_present={self.session_present!r}, "
                f"reason_code={self.reason_code!r}, properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (Connack, (self.session_present, self.reason_code, _props_arg(self.properties)))


@cython.final
@cython.freelist(64)
@cython.no_gc
cdef class Publish:
    """PUBLISH (3.3): an application message.

    Args:
        topic: topic name; may be "" in v5 when a TOPIC_ALIAS property is present.
        payload: application payload.
        qos: 0, 1 or 2.
        retain: retain flag.
        dup: DUP flag (redelivery; QoS > 0 only).
        packet_id: 1..65535 for QoS 1/2, 0 for QoS 0.
        properties: PUBLISH properties (v5).
    """

    packet_type = PacketType.PUBLISH
    cdef readonly object topic
    cdef readonly object payload
    cdef readonly int qos
    cdef readonly bint retain
    cdef readonly bint dup
    cdef readonly int packet_id
    cdef readonly object properties

    def __init__(self, topic, payload=b"", int qos=0, bint retain=False, bint dup=False,
                 int packet_id=0, properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = _normalise_properties(properties)

    def __eq__(self, other):
        if type(other) is not Publish:
            return NotImplemented
        cdef Publish o = <Publish>other
        return (self.qos == o.qos and self.retain == o.retain and self.dup == o.dup
                and self.packet_id == o.packet_id and self.topic == o.topic
                and self.payload == o.payload and self.properties == o.properties)

    def __repr__(self):
        return (f"Publish(topic={self.topic!r}, payload={self.payload!r}, qos={self.qos!r}, "
                f"retain={self.retain!r}, dup={self.dup!r}, packet_id={self.packet_id!r}, "
                f"properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (Publish, (self.topic, self.payload, self.qos, self.retain, self.dup,
                          self.packet_id, _props_arg(self.properties)))


@cython.freelist(32)
@cython.no_gc
cdef class _Ack:
    """Shared layout of PUBACK, PUBREC, PUBREL and PUBCOMP."""

    cdef readonly int packet_id
    cdef readonly int reason_code
    cdef readonly object properties

    def __init__(self, int packet_id, int reason_code=0, properties=None):
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = _normalise_properties(properties)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        cdef _Ack o = <_Ack>other
        return (self.packet_id == o.packet_id and self.reason_code == o.reason_code
                and self.properties == o.properties)

    def __repr__(self):
        return (f"{type(self).__name__}(packet_id={self.packet_id!r}, "
                f"reason_code={self.reason_code!r}, properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (type(self), (self.packet_id, self.reason_code, _props_arg(self.properties)))


@cython.final
cdef class Puback(_Ack):
    """PUBACK (3.4): acknowledges a QoS 1 PUBLISH.

    Args:
        packet_id: the PUBLISH's packet identifier.
        reason_code: v5 reason code (dropped in 3.1.1).
        properties: v5 properties.
    """
    packet_type = PacketType.PUBACK


@cython.final
cdef class Pubrec(_Ack):
    """PUBREC (3.5): first acknowledgement of a QoS 2 PUBLISH (same arguments as Puback)."""
    packet_type = PacketType.PUBREC


@cython.final
cdef class Pubrel(_Ack):
    """PUBREL (3.6): the sender releases a QoS 2 packet id (same arguments as Puback)."""
    packet_type = PacketType.PUBREL


@cython.final
cdef class Pubcomp(_Ack):
    """PUBCOMP (3.7): completes a QoS 2 exchange (same arguments as Puback)."""
    packet_type = PacketType.PUBCOMP


@cython.final
@cython.no_gc
cdef class Subscription:
    """One topic filter of a SUBSCRIBE with its options (v5 3.8.3.1).

    Args:
        topic_filter: the filter, e.g. ``chat/+/channel/#`` or ``$share/g/jobs/#``.
        qos: maximum QoS (0, 1, 2).
        no_local: do not receive own publications (v5; not on shared subscriptions).
        retain_as_published: keep the RETAIN flag on forwarded messages (v5).
        retain_handling: 0 send retained, 1 only on a new subscription, 2 never (v5).
    """

    cdef readonly object topic_filter
    cdef readonly int qos
    cdef readonly bint no_local
    cdef readonly bint retain_as_published
    cdef readonly int retain_handling

    def __init__(self, topic_filter, int qos=0, bint no_local=False,
                 bint retain_as_published=False, int retain_handling=0):
        self.topic_filter = topic_filter
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling

    def __eq__(self, other):
        if type(other) is not Subscription:
            return NotImplemented
        cdef Subscription o = <Subscription>other
        return (self.qos == o.qos and self.no_local == o.no_local
                and self.retain_as_published == o.retain_as_published
                and self.retain_handling == o.retain_handling
                and self.topic_filter == o.topic_filter)

    def __hash__(self):
        return hash((self.topic_filter, self.qos, self.no_local, self.retain_as_published,
                     self.retain_handling))

    def __repr__(self):
        return (f"Subscription(topic_filter={self.topic_filter!r}, qos={self.qos!r}, "
                f"no_local={self.no_local!r}, retain_as_published={self.retain_as_published!r}, "
                f"retain_handling={self.retain_handling!r})")

    def __reduce__(self):
        return (Subscription, (self.topic_filter, self.qos, self.no_local,
                               self.retain_as_published, self.retain_handling))


@cython.no_gc
cdef class _IdList:
    """Shared layout of SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK: a packet
    id, one tuple (each class names it), properties."""

    cdef readonly int packet_id
    cdef tuple _items
    cdef readonly object properties

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        cdef _IdList o = <_IdList>other
        return (self.packet_id == o.packet_id and self._items == o._items
                and self.properties == o.properties)

    def __repr__(self):
        return (f"{type(self).__name__}(packet_id={self.packet_id!r}, "
                f"{self._items_name}={self._items!r}, "
                f"properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (type(self), (self.packet_id, self._items, _props_arg(self.properties)))


@cython.final
cdef class Subscribe(_IdList):
    """SUBSCRIBE (3.8).

    Args:
        packet_id: 1..65535.
        subscriptions: Subscription objects (at least one to encode).
        properties: v5 properties (SUBSCRIPTION_IDENTIFIER, USER_PROPERTY).
    """

    packet_type = PacketType.SUBSCRIBE
    _items_name = "subscriptions"

    def __init__(self, int packet_id, subscriptions, properties=None):
        self.packet_id = packet_id
        self._items = tuple(subscriptions)
        self.properties = _normalise_properties(properties)

    @property
    def subscriptions(self):
        return self._items


@cython.final
cdef class Suback(_IdList):
    """SUBACK (3.9): one reason code per subscription, in order.

    Args:
        packet_id: the SUBSCRIBE's packet identifier.
        reason_codes: granted QoS or failure codes.
        properties: v5 properties.
    """

    packet_type = PacketType.SUBACK
    _items_name = "reason_codes"

    def __init__(self, int packet_id, reason_codes, properties=None):
        self.packet_id = packet_id
        self._items = tuple(reason_codes)
        self.properties = _normalise_properties(properties)

    @property
    def reason_codes(self):
        return self._items


@cython.final
cdef class Unsubscribe(_IdList):
    """UNSUBSCRIBE (3.10).

    Args:
        packet_id: 1..65535.
        topic_filters: the filters to remove (at least one to encode).
        properties: v5 properties.
    """

    packet_type = PacketType.UNSUBSCRIBE
    _items_name = "topic_filters"

    def __init__(self, int packet_id, topic_filters, properties=None):
        self.packet_id = packet_id
        self._items = tuple(topic_filters)
        self.properties = _normalise_properties(properties)

    @property
    def topic_filters(self):
        return self._items


@cython.final
cdef class Unsuback(_IdList):
    """UNSUBACK (3.11): reason codes exist in MQTT 5.0 only.

    Args:
        packet_id: the UNSUBSCRIBE's packet identifier.
        reason_codes: v5 reason codes (``()`` when decoded from 3.1.1).
        properties: v5 properties.
    """

    packet_type = PacketType.UNSUBACK
    _items_name = "reason_codes"

    def __init__(self, int packet_id, reason_codes=(), properties=None):
        self.packet_id = packet_id
        self._items = tuple(reason_codes)
        self.properties = _normalise_properties(properties)

    @property
    def reason_codes(self):
        return self._items


@cython.final
cdef class Pingreq:
    """PINGREQ (3.12)."""

    packet_type = PacketType.PINGREQ

    def __eq__(self, other):
        if type(other) is not Pingreq:
            return NotImplemented
        return True

    def __repr__(self):
        return "Pingreq()"

    def __reduce__(self):
        return (Pingreq, ())


@cython.final
cdef class Pingresp:
    """PINGRESP (3.13)."""

    packet_type = PacketType.PINGRESP

    def __eq__(self, other):
        if type(other) is not Pingresp:
            return NotImplemented
        return True

    def __repr__(self):
        return "Pingresp()"

    def __reduce__(self):
        return (Pingresp, ())


@cython.final
@cython.no_gc
cdef class Disconnect:
    """DISCONNECT (3.14).

    Args:
        reason_code: v5 reason code (dropped in 3.1.1).
        properties: v5 properties.
    """

    packet_type = PacketType.DISCONNECT
    cdef readonly int reason_code
    cdef readonly object properties

    def __init__(self, int reason_code=0, properties=None):
        self.reason_code = reason_code
        self.properties = _normalise_properties(properties)

    def __eq__(self, other):
        if type(other) is not Disconnect:
            return NotImplemented
        cdef Disconnect o = <Disconnect>other
        return self.reason_code == o.reason_code and self.properties == o.properties

    def __repr__(self):
        return (f"Disconnect(reason_code={self.reason_code!r}, "
                f"properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (Disconnect, (self.reason_code, _props_arg(self.properties)))


@cython.final
@cython.no_gc
cdef class Auth:
    """AUTH (3.15), MQTT 5.0 only: enhanced authentication exchange.

    Args:
        reason_code: 0x00, 0x18 or 0x19.
        properties: AUTHENTICATION_METHOD, AUTHENTICATION_DATA, ...
    """

    packet_type = PacketType.AUTH
    cdef readonly int reason_code
    cdef readonly object properties

    def __init__(self, int reason_code=0, properties=None):
        self.reason_code = reason_code
        self.properties = _normalise_properties(properties)

    def __eq__(self, other):
        if type(other) is not Auth:
            return NotImplemented
        cdef Auth o = <Auth>other
        return self.reason_code == o.reason_code and self.properties == o.properties

    def __repr__(self):
        return (f"Auth(reason_code={self.reason_code!r}, "
                f"properties={_props_repr(self.properties)})")

    def __reduce__(self):
        return (Auth, (self.reason_code, _props_arg(self.properties)))


# ================================================================== decoding

cdef struct Reader:
    const unsigned char* p
    const unsigned char* end
    int ptype


cdef int _overrun(Reader* r, str field, Py_ssize_t need) except -1:
    _fail(f"{_pname(r.ptype)} {field} overruns the packet (need {need} bytes, "
          f"{r.end - r.p} left)")


cdef inline int r_byte(Reader* r, str field) except -1:
    if r.p >= r.end:
        _overrun(r, field, 1)
    cdef int v = r.p[0]
    r.p += 1
    return v


cdef inline int r_u16(Reader* r, str field) except -1:
    if r.end - r.p < 2:
        _overrun(r, field, 2)
    cdef int v = (r.p[0] << 8) | r.p[1]
    r.p += 2
    return v


cdef inline long long r_u32(Reader* r, str field) except -1:
    if r.end - r.p < 4:
        _overrun(r, field, 4)
    cdef long long v = ((<long long>r.p[0] << 24) | (<long long>r.p[1] << 16)
                        | (<long long>r.p[2] << 8) | <long long>r.p[3])
    r.p += 4
    return v


cdef long long r_vbi(Reader* r, str field) except -1:
    cdef long long value = 0
    cdef int shift = 0
    cdef int b
    while shift < 28:
        b = r_byte(r, field)
        value |= (<long long>(b & 0x7F)) << shift
        if not (b & 0x80):
            if b == 0 and shift:
                _overlong(_pname(r.ptype), field)
            return value
        shift += 7
    _fail(f"{_pname(r.ptype)} {field}: variable byte integer longer than 4 bytes "
          "[MQTT-1.5.5-1]")


cdef int _overlong(str name, str field) except -1:
    # A last byte of 0 after others: the value fitted in fewer bytes.
    _fail(f"{name} {field}: variable byte integer not in its shortest form "
          "[MQTT-1.5.5-1]")


cdef object _utf8(const unsigned char* s, Py_ssize_t n, int ptype, str field):
    """A str from wire bytes: well-formed UTF-8 [MQTT-1.5.4-1] without U+0000
    [MQTT-1.5.4-2]. The strict decoder also refuses surrogates and overlongs."""
    cdef PyObject* u = _PyUnicode_DecodeUTF8(<const char*>s, n, NULL)
    if u == NULL:
        PyErr_Clear()
        _fail(f"{_pname(ptype)} {field} is not well-formed UTF-8 [MQTT-1.5.4-1]")
    result = <object>u
    Py_DECREF(result)  # drop the extra reference the cast added
    if n and memchr(s, 0, <size_t>n) != NULL:
        _fail(f"{_pname(ptype)} {field} contains U+0000 [MQTT-1.5.4-2]")
    return result


# Short-string cache. Chat traffic repeats the same short strings over and over:
# topic names, content types, user property names and values, topic filters.
# Decoding one of them costs a str allocation plus a UTF-8 pass; a hit in this
# direct-mapped table costs a hash and a memcmp and returns the same (immutable)
# str object, whose hash Python has then usually cached too, which makes the
# broker's dict lookups on it cheaper. Only ASCII strings are kept, so a hit is
# a byte comparison with the str's own buffer; an entry was validated (UTF-8,
# no U+0000) when it was decoded, and identical bytes are equally valid.
cdef enum:
    STR_CACHE_SLOTS = 1024     # power of two
    STR_CACHE_MAX = 96         # longest cached string in bytes

cdef PyObject* _str_cache[STR_CACHE_SLOTS]

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    void* PyUnicode_DATA(object o)
    void Py_XDECREF(PyObject* o)


cdef inline uint64_t _hash_bytes(const unsigned char* s, Py_ssize_t n) noexcept:
    # Multiply-xorshift over 8-byte words. The tail is read as the last 8 bytes
    # (overlapping) when there are 8 or more: a fixed-size load, no byte loop
    # through the stack (that stalled on store forwarding).
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n
    cdef uint64_t w = 0
    cdef const unsigned char* end = s + n
    cdef Py_ssize_t i
    if n < 8:
        for i in range(n):
            w |= (<uint64_t>s[i]) << (8 * i)
        h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
        return h ^ (h >> 32)
    while end - s > 8:
        memcpy(&w, s, 8)
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
        s += 8
    memcpy(&w, end - 8, 8)
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
    return h ^ (h >> 32)


cdef inline object _utf8_cached(const unsigned char* s, Py_ssize_t n, int ptype, str field):
    """``_utf8`` through the short-string cache."""
    if n > STR_CACHE_MAX or n == 0:
        return _utf8(s, n, ptype, field)
    cdef Py_ssize_t slot = <Py_ssize_t>(_hash_bytes(s, n) & (STR_CACHE_SLOTS - 1))
    cdef PyObject* hit = _str_cache[slot]
    if hit != NULL and PyUnicode_GET_LENGTH(<object>hit) == n \
            and memcmp(PyUnicode_DATA(<object>hit), s, <size_t>n) == 0:
        return <object>hit
    result = _utf8(s, n, ptype, field)
    if PyUnicode_IS_COMPACT_ASCII(result):
        Py_INCREF(result)
        Py_XDECREF(hit)
        _str_cache[slot] = <PyObject*>result
    return result


cdef inline object r_str(Reader* r, str field):
    # The field name is only turned into a message on the error path.
    if r.end - r.p < 2:
        _overrun(r, field + " length", 2)
    cdef Py_ssize_t n = (r.p[0] << 8) | r.p[1]
    r.p += 2
    if r.end - r.p < n:
        _overrun(r, field, n)
    cdef const unsigned char* s = r.p
    r.p += n
    return _utf8_cached(s, n, r.ptype, field)


cdef inline bytes r_bin(Reader* r, str field):
    if r.end - r.p < 2:
        _overrun(r, field + " length", 2)
    cdef Py_ssize_t n = (r.p[0] << 8) | r.p[1]
    r.p += 2
    if r.end - r.p < n:
        _overrun(r, field, n)
    cdef bytes b = PyBytes_FromStringAndSize(<const char*>r.p, n)
    r.p += n
    return b


cdef inline int r_done(Reader* r) except -1:
    if r.p != r.end:
        _fail(f"{_pname(r.ptype)} has {r.end - r.p} unexpected trailing bytes")
    return 0


# Property-block cache. A publisher usually sends the same properties with every
# message (content type, expiry, fixed user properties), and a CONNECT from a
# given client library always looks alike. A decoded properties mapping is
# immutable (a read-only view over a private dict of ints, strs, bytes and
# tuples), so packets whose property bytes are identical can share one. Keyed
# by the packet type (what is allowed differs) and the raw block; an entry is
# stored only after the block passed every check, and identical bytes in the
# same packet type pass them again.
cdef enum:
    PROP_CACHE_SLOTS = 256     # power of two
    PROP_CACHE_MAX = 256       # longest cached block in bytes

cdef PyObject* _pc_raw[PROP_CACHE_SLOTS]      # bytes of the block (owned)
cdef PyObject* _pc_map[PROP_CACHE_SLOTS]      # the mapping (owned)
cdef unsigned char _pc_type[PROP_CACHE_SLOTS]
cdef unsigned char _pc_alias[PROP_CACHE_SLOTS]
# Hash of the last block that missed in each slot: a block is only stored the
# second time it is seen, so a stream of one-off blocks costs a hash per
# packet and no copies.
cdef uint64_t _pc_seen[PROP_CACHE_SLOTS]


cdef object _read_props(Reader* r, int ptype, bint* has_alias=NULL):
    """Read a property block allowed in ``ptype`` (a packet type or WILL) and
    enforce section 2.2.2.2: known id, allowed in this packet, value type,
    repetition only for USER_PROPERTY (and SUBSCRIPTION_IDENTIFIER in PUBLISH).
    Sets ``has_alias`` when a TOPIC_ALIAS was read."""
    cdef long long length
    if r.p < r.end and r.p[0] < 0x80:
        length = r.p[0]
        r.p += 1
    else:
        length = r_vbi(r, "property length")
    if length == 0:
        return EMPTY
    if length > r.end - r.p:
        _fail(f"{_pname(ptype)} property length {length} overruns the packet")
    cdef const unsigned char* start = r.p
    cdef Py_ssize_t slot = -1
    cdef PyObject* cached
    cdef uint64_t h = 0
    if length <= PROP_CACHE_MAX:
        h = _hash_bytes(start, length) + <uint64_t>ptype * 0x9E3779B1ULL
        slot = <Py_ssize_t>(h & (PROP_CACHE_SLOTS - 1))
        cached = _pc_raw[slot]
        if (cached != NULL and _pc_type[slot] == ptype
                and PyBytes_GET_SIZE(<object>cached) == length
                and memcmp(PyBytes_AS_STRING(<object>cached), start, <size_t>length) == 0):
            r.p += length
            if has_alias != NULL:
                has_alias[0] = _pc_alias[slot]
            return <object>_pc_map[slot]
        if _pc_seen[slot] != h:
            _pc_seen[slot] = h
            slot = -1  # first sighting: do not store
    cdef const unsigned char* outer_end = r.end
    r.end = r.p + length
    cdef int saved = r.ptype
    r.ptype = ptype
    cdef dict props = {}
    # Multi-valued properties are collected here and stored once, as tuples.
    cdef list users = None
    cdef tuple user_tuple = None
    cdef Py_ssize_t nusers = 0
    cdef list subids = None
    cdef uint64_t seen = 0
    cdef long long ident, iv
    cdef int pid, kind
    cdef str name
    while r.p < r.end:
        if r.p[0] < 0x80:  # every id of MQTT 5.0 is one byte
            ident = r.p[0]
            r.p += 1
        else:
            ident = r_vbi(r, "property identifier")
        if ident >= 64 or _PTYPE[ident] == 0:
            _fail(f"{_pname(ptype)} unknown property identifier 0x{ident:02X}")
        pid = <int>ident
        if not (_PALLOW[pid] & (1u << ptype)):
            _fail(f"{_pname(ptype)} property {_PNAME[pid]} is not allowed in this packet "
                  "(2.2.2.2)")
        kind = _PTYPE[pid]
        name = <str>_PNAME[pid]
        if kind == T_PAIR:  # USER_PROPERTY, the only pair and the usual repeat
            value = _atomic((r_str(r, "USER_PROPERTY name"), r_str(r, "USER_PROPERTY value")))
            # Up to 8 pairs are gathered in a tuple sized 8 and cut to length
            # once at the end (one allocation); more switch to a list.
            if users is not None:
                users.append(value)
            elif user_tuple is None:
                user_tuple = PyTuple_New(8)
                Py_INCREF(value)
                PyTuple_SET_ITEM(user_tuple, 0, value)
                nusers = 1
            elif nusers < 8:
                Py_INCREF(value)
                PyTuple_SET_ITEM(user_tuple, nusers, value)
                nusers += 1
            else:
                users = list(user_tuple)
                users.append(value)
            continue
        if kind == T_STR:
            value = r_str(r, name)
            if pid == P_RESPONSE_TOPIC:
                _check_response_topic(<str>value, ptype)
        elif kind == T_U32:
            iv = r_u32(r, name)
            if iv == 0 and _PNONZERO[pid]:
                _fail(f"{_pname(ptype)} property {name} must not be 0", RC_PROTOCOL)
            value = iv
        elif kind == T_U16:
            iv = r_u16(r, name)
            if iv == 0 and _PNONZERO[pid]:
                _fail(f"{_pname(ptype)} property {name} must not be 0", RC_PROTOCOL)
            value = iv
        elif kind == T_BYTE:
            iv = r_byte(r, name)
            if _PBOOL[pid] and iv > 1:
                _fail(f"{_pname(ptype)} property {name} must be 0 or 1, got {iv}", RC_PROTOCOL)
            value = iv
        elif kind == T_BIN:
            value = r_bin(r, name)
        else:  # T_VBI: SUBSCRIPTION_IDENTIFIER
            iv = r_vbi(r, name)
            if iv == 0 and _PNONZERO[pid]:
                _fail(f"{_pname(ptype)} property {name} must not be 0", RC_PROTOCOL)
            if subids is None:
                subids = [iv]
            elif ptype != PUBLISH:
                _fail(f"{_pname(ptype)} property {name} included more than once", RC_PROTOCOL)
            else:
                subids.append(iv)
            continue
        if seen & ((<uint64_t>1) << pid):
            _fail(f"{_pname(ptype)} property {name} included more than once", RC_PROTOCOL)
        seen |= (<uint64_t>1) << pid
        props[<object>_PKEY[pid]] = value
    if (seen >> P_AUTH_DATA) & 1 and not (seen >> P_AUTH_METHOD) & 1:
        _fail(f"{_pname(ptype)} has AUTHENTICATION_DATA without AUTHENTICATION_METHOD "
              "(3.1.2.11.10)", RC_PROTOCOL)
    r.end = outer_end
    r.ptype = saved
    if subids is not None:
        props[<object>_PKEY[P_SUBID]] = _atomic(tuple(subids))
    if users is not None:
        props[<object>_PKEY[P_USER]] = _atomic(tuple(users))
    elif user_tuple is not None:
        props[<object>_PKEY[P_USER]] = _atomic(_tuple_head(user_tuple, nusers))
    cdef bint alias = (seen >> P_TOPIC_ALIAS) & 1
    if has_alias != NULL:
        has_alias[0] = alias
    # The dict holds PropertyId keys (instances of a heap type, so CPython
    # tracks the dict) and atomic values: it cannot be in a cycle. The
    # _Properties view around it is not a GC type either (see its docstring).
    PyObject_GC_UnTrack(props)
    result = _new_properties(props)
    if slot >= 0:
        raw = PyBytes_FromStringAndSize(<const char*>start, <Py_ssize_t>length)
        Py_INCREF(raw)
        Py_INCREF(result)
        Py_XDECREF(_pc_raw[slot])
        Py_XDECREF(_pc_map[slot])
        _pc_raw[slot] = <PyObject*>raw
        _pc_map[slot] = <PyObject*>result
        _pc_type[slot] = <unsigned char>ptype
        _pc_alias[slot] = alias
    return result


cdef inline int r_packet_id(Reader* r) except -1:
    cdef int pid = r_u16(r, "packet identifier")
    if pid == 0:
        _fail(f"{_pname(r.ptype)} packet identifier is 0 [MQTT-2.2.1-3]", RC_PROTOCOL)
    return pid


cdef inline int _check_rc(Reader* r, int code) except -1:
    if not _VALID_RC[r.ptype][code]:
        _fail(f"{_pname(r.ptype)} reason code 0x{code:02X} is not valid for this packet",
              RC_PROTOCOL)
    return code


cdef Connect _decode_connect(Reader* r):
    cdef int nlen = r_u16(r, "protocol name length")
    if r.end - r.p < nlen:
        _overrun(r, "protocol name", nlen)
    cdef const unsigned char* name = r.p
    r.p += nlen
    cdef bint known = ((nlen == 4 and memcmp(name, b"MQTT", 4) == 0)
                       or (nlen == 6 and memcmp(name, b"MQIsdp", 6) == 0))
    if not known:
        # Only an unknown name needs decoding (for the UTF-8 rules and the message).
        name_str = _utf8(name, nlen, CONNECT, "protocol name")
    else:
        name_str = "MQTT" if nlen == 4 else "MQIsdp"
    cdef int level = r_byte(r, "protocol level")
    if not ((nlen == 4 and known and (level == 4 or level == 5))
            or (nlen == 6 and known and level == 3)):
        _fail(f"CONNECT protocol name {name_str!r} level {level} is not supported "
              "(MQTT 5, MQTT 4 or MQIsdp 3) [MQTT-3.1.2-2]", RC_VERSION)
    cdef bint v5 = level == 5
    cdef int cflags = r_byte(r, "connect flags")
    if cflags & 0x01:
        _fail("CONNECT reserved connect flag is set [MQTT-3.1.2-3]")
    cdef bint has_will = (cflags & 0x04) != 0
    cdef int will_qos = (cflags >> 3) & 0x03
    cdef bint will_retain = (cflags & 0x20) != 0
    cdef bint has_password = (cflags & 0x40) != 0
    cdef bint has_username = (cflags & 0x80) != 0
    if not has_will:
        if will_qos:
            _fail("CONNECT will QoS set without the will flag [MQTT-3.1.2-11]")
        if will_retain:
            _fail("CONNECT will retain set without the will flag [MQTT-3.1.2-13]")
    elif will_qos == 3:
        _fail("CONNECT will QoS is 3 [MQTT-3.1.2-12]")
    if has_password and not has_username and not v5:
        _fail("CONNECT password flag set without user name flag [MQTT-3.1.2-22]")
    cdef int keep_alive = r_u16(r, "keep alive")
    properties = _read_props(r, CONNECT) if v5 else EMPTY
    client_id = r_str(r, "client identifier")
    will = None
    cdef Will w
    if has_will:
        will_props = _read_props(r, WILL) if v5 else EMPTY
        w = Will.__new__(Will)
        w.topic = r_str(r, "will topic")
        w.payload = r_bin(r, "will payload")
        w.qos = will_qos
        w.retain = will_retain
        w.properties = will_props
        will = w
    username = r_str(r, "user name") if has_username else None
    password = r_bin(r, "password") if has_password else None
    r_done(r)
    cdef Connect c = Connect.__new__(Connect)
    c.client_id = client_id
    c.clean_start = (cflags & 0x02) != 0
    c.keep_alive = keep_alive
    c.username = username
    c.password = password
    c.will = will
    c.properties = properties
    c.protocol_level = level
    return c


cdef Connack _decode_connack(Reader* r, bint v5):
    cdef int ack_flags = r_byte(r, "acknowledge flags")
    if ack_flags & 0xFE:
        _fail("CONNACK reserved acknowledge flag bits are set [MQTT-3.2.2-1]")
    cdef int code = r_byte(r, "reason code")
    if v5:
        _check_rc(r, code)
        properties = _read_props(r, CONNACK)
    else:
        if _V311_TO_V5[code] < 0:
            _fail(f"CONNACK return code {code} is reserved (3.2.2.3)")
        code = _V311_TO_V5[code]
        properties = EMPTY
    r_done(r)
    cdef Connack c = Connack.__new__(Connack)
    c.session_present = (ack_flags & 0x01) != 0
    c.reason_code = code
    c.properties = properties
    return c


cdef int _check_topic_name(const unsigned char* s, Py_ssize_t n, bint alias_ok) except -1:
    """Topic name rules for PUBLISH: non-empty unless a v5 Topic Alias stands in
    for it (3.3.2.3.4), no wildcard [MQTT-3.3.2-2]."""
    if n == 0:
        if alias_ok:
            return 0
        _fail("PUBLISH topic name is empty [MQTT-4.7.3-1]", RC_TOPIC)
    if memchr(s, b'+', <size_t>n) != NULL:
        _fail("PUBLISH topic name contains wildcard '+' [MQTT-3.3.2-2]", RC_TOPIC)
    if memchr(s, b'#', <size_t>n) != NULL:
        _fail("PUBLISH topic name contains wildcard '#' [MQTT-3.3.2-2]", RC_TOPIC)
    return 0


cdef Publish _decode_publish(Reader* r, int flags, bint v5):
    cdef int qos = (flags >> 1) & 0x03
    if qos == 3:
        _fail("PUBLISH QoS is 3 [MQTT-3.3.1-4]")
    if (flags & 0x08) and qos == 0:
        _fail("PUBLISH DUP flag set on a QoS 0 message [MQTT-3.3.1-2]")
    cdef int tlen = r_u16(r, "topic name length")
    if r.end - r.p < tlen:
        _overrun(r, "topic name", tlen)
    cdef const unsigned char* ts = r.p
    r.p += tlen
    topic = _utf8_cached(ts, tlen, PUBLISH, "topic name")
    cdef int packet_id = r_packet_id(r) if qos else 0
    cdef bint has_alias = False
    properties = _read_props(r, PUBLISH, &has_alias) if v5 else EMPTY
    _check_topic_name(ts, tlen, has_alias)
    cdef Publish p = Publish.__new__(Publish)
    p.topic = topic
    p.payload = PyBytes_FromStringAndSize(<const char*>r.p, r.end - r.p)
    r.p = r.end
    p.qos = qos
    p.retain = (flags & 0x01) != 0
    p.dup = (flags & 0x08) != 0
    p.packet_id = packet_id
    p.properties = properties
    return p


cdef _Ack _decode_ack(Reader* r, int ptype, bint v5):
    cdef int packet_id = r_packet_id(r)
    cdef int code = 0
    properties = EMPTY
    if v5 and r.p < r.end:
        # Remaining length 2: reason 0 and no properties; 3: reason only (3.4.2.1).
        code = _check_rc(r, r_byte(r, "reason code"))
        if r.p < r.end:
            properties = _read_props(r, ptype)
    r_done(r)
    cdef _Ack a
    if ptype == PUBACK:
        a = Puback.__new__(Puback)
    elif ptype == PUBREC:
        a = Pubrec.__new__(Pubrec)
    elif ptype == PUBREL:
        a = Pubrel.__new__(Pubrel)
    else:
        a = Pubcomp.__new__(Pubcomp)
    a.packet_id = packet_id
    a.reason_code = code
    a.properties = properties
    return a


cdef int _check_filter(const unsigned char* s, Py_ssize_t n, int ptype) except -1:
    """Topic filter rules (4.7.1, 4.8.2) on the UTF-8 bytes; returns 1 for a
    shared subscription ``$share/{name}/{filter}``, 0 otherwise.

    '#' must be a whole level and the last one [MQTT-4.7.1-1]; '+' must be a
    whole level [MQTT-4.7.1-2]; a ShareName is non-empty without wildcards
    [MQTT-4.8.2-1] and is followed by '/' and a non-empty filter [MQTT-4.8.2-2].
    """
    cdef str what = _pname(ptype)
    if n == 0:
        _fail(f"{what} topic filter is empty [MQTT-4.7.3-1]", RC_FILTER)
    cdef bint shared = False
    cdef Py_ssize_t i, start = 0
    if n >= 7 and memcmp(s, b"$share/", 7) == 0:
        shared = True
        i = 7
        while i < n and s[i] != b'/':
            if s[i] == b'+' or s[i] == b'#':
                _fail(f"{what} shared subscription ShareName contains a wildcard "
                      "[MQTT-4.8.2-1]", RC_FILTER)
            i += 1
        if i == 7:
            _fail(f"{what} shared subscription has an empty ShareName [MQTT-4.8.2-1]",
                  RC_FILTER)
        if i >= n - 1:
            _fail(f"{what} shared subscription has no topic filter after the ShareName "
                  "[MQTT-4.8.2-2]", RC_FILTER)
        start = i + 1
    # Wildcards are rare: find them with memchr instead of a byte loop. '+'
    # before the first '#' are checked first, as a level-by-level reading
    # would; a '+' after a '#' means that '#' is not last, which is reported.
    cdef const unsigned char* f = s + start
    cdef Py_ssize_t m = n - start
    cdef const unsigned char* hq = <const unsigned char*>memchr(f, b'#', <size_t>m)
    cdef Py_ssize_t hpos = hq - f if hq != NULL else m
    cdef const unsigned char* q = <const unsigned char*>memchr(f, b'+', <size_t>hpos)
    while q != NULL:
        i = q - f
        if (i > 0 and f[i - 1] != b'/') or (i < m - 1 and f[i + 1] != b'/'):
            _fail(f"{what} topic filter: '+' must occupy a whole level [MQTT-4.7.1-2]",
                  RC_FILTER)
        q = <const unsigned char*>memchr(q + 1, b'+', <size_t>(hpos - i - 1))
    if hq != NULL and (hpos != m - 1 or (hpos > 0 and f[hpos - 1] != b'/')):
        _fail(f"{what} topic filter: '#' must be the last level on its own "
              "[MQTT-4.7.1-1]", RC_FILTER)
    return shared


cdef Subscribe _decode_subscribe(Reader* r, bint v5):
    cdef int packet_id = r_packet_id(r)
    properties = _read_props(r, SUBSCRIBE) if v5 else EMPTY
    cdef list subs = []
    cdef int flen, options, qos, rh
    cdef bint no_local, rap, shared
    cdef const unsigned char* fs
    cdef Subscription sub
    while r.p < r.end:
        flen = r_u16(r, "topic filter length")
        if r.end - r.p < flen:
            _overrun(r, "topic filter", flen)
        fs = r.p
        r.p += flen
        topic_filter = _utf8_cached(fs, flen, SUBSCRIBE, "topic filter")
        options = r_byte(r, "subscription options")
        qos = options & 0x03
        if v5:
            if options & 0xC0:
                _fail("SUBSCRIBE reserved subscription option bits are set [MQTT-3.8.3-5]",
                      RC_PROTOCOL)
            if qos == 3:
                _fail("SUBSCRIBE maximum QoS is 3 (3.8.3.1)", RC_PROTOCOL)
            rh = (options >> 4) & 0x03
            if rh == 3:
                _fail("SUBSCRIBE retain handling is 3 (3.8.3.1)", RC_PROTOCOL)
            no_local = (options & 0x04) != 0
            rap = (options & 0x08) != 0
        else:
            # 3.1.1: upper 6 bits reserved, QoS 3 forbidden: malformed
            # [MQTT-3.8.3-4] (3.1.1 numbering).
            if options & 0xFC or qos == 3:
                _fail("SUBSCRIBE reserved bits set or QoS 3 in requested QoS byte "
                      "[MQTT-3.8.3-4]")
            rh = 0
            no_local = rap = False
        shared = _check_filter(fs, flen, SUBSCRIBE)
        if no_local and shared:
            _fail("SUBSCRIBE no local set on a shared subscription [MQTT-3.8.3-4]",
                  RC_PROTOCOL)
        sub = Subscription.__new__(Subscription)
        sub.topic_filter = topic_filter
        sub.qos = qos
        sub.no_local = no_local
        sub.retain_as_published = rap
        sub.retain_handling = rh
        subs.append(sub)
    if not subs:
        _fail("SUBSCRIBE contains no topic filter [MQTT-3.8.3-3]", RC_PROTOCOL)
    cdef Subscribe p = Subscribe.__new__(Subscribe)
    p.packet_id = packet_id
    p._items = _atomic(tuple(subs))
    p.properties = properties
    return p


cdef Suback _decode_suback(Reader* r, bint v5):
    cdef int packet_id = r_packet_id(r)
    properties = _read_props(r, SUBACK) if v5 else EMPTY
    cdef Py_ssize_t n = r.end - r.p, i
    cdef tuple codes = _int_tuple(r.p, n)
    cdef int code
    for i in range(n):
        code = r.p[i]
        if not (_VALID_RC[SUBACK][code] if v5 else _V311_SUBACK[code]):
            _fail(f"SUBACK reason code 0x{code:02X} is not valid for this packet", RC_PROTOCOL)
    r.p = r.end
    cdef Suback p = Suback.__new__(Suback)
    p.packet_id = packet_id
    p._items = codes
    p.properties = properties
    return p


cdef tuple _int_tuple(const unsigned char* s, Py_ssize_t n):
    cdef list out = [None] * n
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = <int>s[i]
    return _atomic(tuple(out))


cdef Unsubscribe _decode_unsubscribe(Reader* r, bint v5):
    cdef int packet_id = r_packet_id(r)
    properties = _read_props(r, UNSUBSCRIBE) if v5 else EMPTY
    cdef list filters = []
    cdef int flen
    cdef const unsigned char* fs
    while r.p < r.end:
        flen = r_u16(r, "topic filter length")
        if r.end - r.p < flen:
            _overrun(r, "topic filter", flen)
        fs = r.p
        r.p += flen
        topic_filter = _utf8_cached(fs, flen, UNSUBSCRIBE, "topic filter")
        _check_filter(fs, flen, UNSUBSCRIBE)
        filters.append(topic_filter)
    if not filters:
        _fail("UNSUBSCRIBE contains no topic filter [MQTT-3.10.3-2]", RC_PROTOCOL)
    cdef Unsubscribe p = Unsubscribe.__new__(Unsubscribe)
    p.packet_id = packet_id
    p._items = _atomic(tuple(filters))
    p.properties = properties
    return p


cdef Unsuback _decode_unsuback(Reader* r, bint v5):
    cdef int packet_id = r_packet_id(r)
    properties = EMPTY
    cdef tuple codes = ()
    cdef Py_ssize_t i
    if v5:
        properties = _read_props(r, UNSUBACK)
        for i in range(r.end - r.p):
            _check_rc(r, r.p[i])
        codes = _int_tuple(r.p, r.end - r.p)
        r.p = r.end
    r_done(r)
    cdef Unsuback p = Unsuback.__new__(Unsuback)
    p.packet_id = packet_id
    p._items = codes
    p.properties = properties
    return p


cdef object _decode_disconnect_auth(Reader* r, int ptype, bint v5):
    if ptype == AUTH and not v5:
        _fail("AUTH packet in MQTT 3.1.1 (it exists in MQTT 5.0 only)", RC_PROTOCOL)
    cdef int code = 0
    properties = EMPTY
    # Remaining length 0: reason 0x00 and no properties (3.14.2.1, 3.15.2.1).
    if v5 and r.p < r.end:
        code = _check_rc(r, r_byte(r, "reason code"))
        if r.p < r.end:
            properties = _read_props(r, ptype)
    r_done(r)
    cdef Disconnect d
    cdef Auth a
    if ptype == DISCONNECT:
        d = Disconnect.__new__(Disconnect)
        d.reason_code = code
        d.properties = properties
        return d
    a = Auth.__new__(Auth)
    a.reason_code = code
    a.properties = properties
    return a


cdef int _check_first_byte(int first) except -1:
    """Packet type and the reserved flag bits of the fixed header [MQTT-2.1.3-1]."""
    cdef int ptype = first >> 4
    cdef int flags = first & 0x0F
    if ptype == 0:
        _fail("packet type 0 is reserved (2.1.2)")
    if ptype == PUBLISH:
        return ptype
    cdef int required = 0x02 if (ptype == PUBREL or ptype == SUBSCRIBE
                                 or ptype == UNSUBSCRIBE) else 0x00
    if flags != required:
        _fail(f"{_pname(ptype)} reserved fixed header flags are 0x{flags:X}, "
              f"must be 0x{required:X} [MQTT-2.1.3-1]")
    return ptype


cdef object _decode_body(int first, const unsigned char* body, Py_ssize_t n, int version):
    """Decode one packet body; ``version`` is 5 or 4 (CONNECT uses its own)."""
    cdef int ptype = _check_first_byte(first)
    cdef Reader r
    r.p = body
    r.end = body + n
    r.ptype = ptype
    cdef bint v5 = version == 5
    if ptype == PUBLISH:
        return _decode_publish(&r, first & 0x0F, v5)
    if ptype >= PUBACK and ptype <= PUBCOMP:
        return _decode_ack(&r, ptype, v5)
    if ptype == PINGREQ or ptype == PINGRESP:
        r_done(&r)
        return Pingreq.__new__(Pingreq) if ptype == PINGREQ else Pingresp.__new__(Pingresp)
    if ptype == CONNECT:
        return _decode_connect(&r)
    if ptype == CONNACK:
        return _decode_connack(&r, v5)
    if ptype == SUBSCRIBE:
        return _decode_subscribe(&r, v5)
    if ptype == SUBACK:
        return _decode_suback(&r, v5)
    if ptype == UNSUBSCRIBE:
        return _decode_unsubscribe(&r, v5)
    if ptype == UNSUBACK:
        return _decode_unsuback(&r, v5)
    return _decode_disconnect_auth(&r, ptype, v5)


cdef str _first_name(int first):
    """Name of the packet type in a first byte, for messages (type 0 included)."""
    return _pname(first >> 4) if first >> 4 else "packet type 0"


cdef inline int _parse_length(const unsigned char* p, Py_ssize_t avail,
                              Py_ssize_t* rl, int* hlen) except -1:
    """Remaining Length of the packet at ``p``: 1 and sets ``rl``/``hlen`` when
    the fixed header is complete, 0 when more bytes are needed."""
    cdef Py_ssize_t value = 0
    cdef int i, b
    for i in range(1, 5):
        if i >= avail:
            return 0
        b = p[i]
        value |= (<Py_ssize_t>(b & 0x7F)) << (7 * (i - 1))
        if not (b & 0x80):
            if b == 0 and i > 1:
                _overlong(_first_name(p[0]), "remaining length")
            rl[0] = value
            hlen[0] = i + 1
            return 1
    _fail(f"{_first_name(p[0])} remaining length: variable byte integer longer than 4 bytes "
          "[MQTT-1.5.5-1]")


def decode(data, version=5):
    """Decode exactly one complete packet.

    Args:
        data: the whole packet, fixed header included (bytes-like).
        version: protocol level of the connection (5, 4 or 3). A CONNECT is
            decoded with its own protocol level whatever this says.

    Returns:
        The packet object.

    Raises:
        MalformedPacket: if ``data`` is incomplete, has trailing bytes or breaks
            a rule of the specification.
    """
    cdef int wire = _wire_version(version)
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef Py_ssize_t n, rl = 0
    cdef int hlen = 0
    cdef bint release = False
    if PyBytes_CheckExact(data):
        p = <const unsigned char*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except TypeError:
            _fail(f"cannot decode {type(data).__name__}: not a bytes-like object")
        release = True
        p = <const unsigned char*>view.buf
        n = view.len
    try:
        if n == 0:
            _fail("empty input: no fixed header")
        if not _parse_length(p, n, &rl, &hlen):
            _fail(f"{_first_name(p[0])} remaining length overruns the packet")
        if n - hlen < rl:
            _fail(f"{_first_name(p[0])} incomplete: remaining length {rl}, "
                  f"{n - hlen} bytes given")
        if n - hlen > rl:
            _fail(f"{_first_name(p[0])} followed by {n - hlen - rl} trailing bytes")
        return _decode_body(p[0], p + hlen, rl, wire)
    finally:
        if release:
            PyBuffer_Release(&view)


@cython.final
cdef class Decoder:
    """Streaming decoder: feed any chunking of the byte stream, get complete
    packets in order.

    Args:
        version: protocol level (5, 4 or 3), or None to learn it from the first
            packet, which must then be a CONNECT [MQTT-3.1.0-1].
        max_packet_size: largest packet accepted (whole packet, fixed header
            included); checked as soon as the fixed header is complete, before
            the body is buffered.

    Raises:
        MalformedPacket: (0x84) for an unsupported ``version``.
    """

    cdef int _version        # 0 = learn from the CONNECT
    cdef int _level          # the level as given/learned (3, 4, 5) for .version
    cdef public Py_ssize_t max_packet_size
    cdef unsigned char* _buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _len     # bytes of the pending (incomplete) packet
    cdef Py_ssize_t _need    # its total size once the fixed header is known, else -1
    cdef object _broken      # (message, reason_code) after an error

    def __cinit__(self):
        self._buf = NULL
        self._cap = 0
        self._len = 0
        self._need = -1
        self._broken = None

    def __dealloc__(self):
        if self._buf != NULL:
            PyMem_Free(self._buf)
            self._buf = NULL

    def __init__(self, version=None, max_packet_size=_MAX_PACKET_SIZE):
        self.version = version
        self.max_packet_size = max_packet_size

    @property
    def version(self):
        """Protocol level (3, 4, 5), or None until the CONNECT is seen."""
        return None if self._version == 0 else self._level

    @version.setter
    def version(self, value):
        if value is None:
            self._version = 0
            self._level = 0
        else:
            self._version = _wire_version(value)
            self._level = value

    @property
    def buffered(self):
        """Bytes held for a packet not yet complete."""
        return self._len

    cdef int _append(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t want
        cdef unsigned char* nb
        if self._len + n > self._cap:
            want = self._cap * 2
            if want < self._len + n:
                want = self._len + n
            if want < 256:
                want = 256
            nb = <unsigned char*>PyMem_Realloc(self._buf, want)
            if nb == NULL:
                raise MemoryError()
            self._buf = nb
            self._cap = want
        memcpy(self._buf + self._len, p, n)
        self._len += n
        return 0

    cdef int _check_header(self, int first, Py_ssize_t total) except -1:
        if total > self.max_packet_size:
            _fail(f"{_first_name(first)} of {total} bytes exceeds the maximum packet size "
                  f"{self.max_packet_size}", RC_TOO_LARGE)
        return 0

    cdef inline int _check_first(self, int first) except -1:
        if self._version == 0 and (first >> 4) != CONNECT:
            _fail(f"first packet must be CONNECT, got {_first_name(first)} [MQTT-3.1.0-1]",
                  RC_PROTOCOL)
        _check_first_byte(first)
        return 0

    cdef object _decode_one(self, const unsigned char* p, int hlen, Py_ssize_t rl):
        cdef Connect c
        if self._version == 0:
            c = <Connect>_decode_body(p[0], p + hlen, rl, 5)
            self._level = c.protocol_level
            self._version = 5 if c.protocol_level == 5 else 4
            return c
        return _decode_body(p[0], p + hlen, rl, self._version)

    def feed(self, data):
        """Add bytes from the stream and return the packets now complete.

        Args:
            data: any number of bytes (bytes, bytearray or memoryview).

        Returns:
            The complete packets, in stream order (possibly empty).

        Raises:
            MalformedPacket: on the first bad packet, with ``packets`` holding
                the packets completed before it in this call. The decoder is then
                broken and every later call raises again.
        """
        cdef Py_buffer view
        cdef list out
        if self._broken is not None:
            message, code = self._broken
            _fail(f"decoder is broken by an earlier error: {message}", code)
        if PyBytes_CheckExact(data):
            out = []
            self._feed(<const unsigned char*>PyBytes_AS_STRING(data),
                       PyBytes_GET_SIZE(data), out)
            return out
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            out = []
            self._feed(<const unsigned char*>view.buf, view.len, out)
            return out
        finally:
            PyBuffer_Release(&view)

    cdef int _feed(self, const unsigned char* p, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0, avail, rl, total, take
        cdef int hlen
        try:
            if self._len:
                pos = self._top_up(p, n, out)
                if self._len:
                    return 0
            # Whole packets are decoded straight from the caller's chunk.
            while pos < n:
                self._check_first(p[pos])
                if not _parse_length(p + pos, n - pos, &rl, &hlen):
                    break
                total = hlen + rl
                self._check_header(p[pos], total)
                if total > n - pos:
                    self._need = total
                    break
                out.append(self._decode_one(p + pos, hlen, rl))
                pos += total
            if pos < n:
                # Keep only the tail: one packet, incomplete.
                self._append(p + pos, n - pos)
        except MalformedPacket as exc:
            exc.packets = out
            self._broken = (str(exc), exc.reason_code)
            self._len = 0
            self._need = -1
            raise
        return 0

    cdef Py_ssize_t _top_up(self, const unsigned char* p, Py_ssize_t n, list out) except -1:
        """Complete the pending packet from the head of ``p``; returns the
        bytes of ``p`` consumed."""
        cdef Py_ssize_t consumed = 0, take, rl = 0, total, excess
        cdef int hlen = 0
        if self._need < 0:
            # The fixed header itself was cut: it is at most 5 bytes.
            take = 5 - self._len
            if take > n:
                take = n
            self._append(p, take)
            consumed = take
            if not _parse_length(self._buf, self._len, &rl, &hlen):
                return consumed
            total = hlen + rl
            self._check_header(self._buf[0], total)
            if total < self._len:
                excess = self._len - total
                self._len = total
                consumed -= excess
            self._need = total
        take = self._need - self._len
        if take > n - consumed:
            take = n - consumed
        if take:
            self._append(p + consumed, take)
            consumed += take
        if self._len == self._need:
            _parse_length(self._buf, self._len, &rl, &hlen)
            pkt = self._decode_one(self._buf, hlen, rl)
            self._len = 0
            self._need = -1
            out.append(pkt)
        return consumed


# ================================================================== encoding

cdef inline int _vbi_len(Py_ssize_t v) noexcept:
    if v < 128:
        return 1
    if v < 16384:
        return 2
    if v < 2097152:
        return 3
    return 4


cdef inline unsigned char* w_vbi(unsigned char* w, Py_ssize_t v) noexcept:
    while True:
        if v < 128:
            w[0] = <unsigned char>v
            return w + 1
        w[0] = <unsigned char>((v & 0x7F) | 0x80)
        w += 1
        v >>= 7


cdef inline unsigned char* w_u16(unsigned char* w, Py_ssize_t v) noexcept:
    w[0] = <unsigned char>(v >> 8)
    w[1] = <unsigned char>v
    return w + 2


cdef inline unsigned char* w_u32(unsigned char* w, long long v) noexcept:
    w[0] = <unsigned char>(v >> 24)
    w[1] = <unsigned char>(v >> 16)
    w[2] = <unsigned char>(v >> 8)
    w[3] = <unsigned char>v
    return w + 4


cdef inline unsigned char* w_raw(unsigned char* w, const char* s, Py_ssize_t n) noexcept:
    memcpy(w, s, n)
    return w + n


cdef inline unsigned char* w_lstr(unsigned char* w, const char* s, Py_ssize_t n) noexcept:
    w[0] = <unsigned char>(n >> 8)
    w[1] = <unsigned char>n
    memcpy(w + 2, s, n)
    return w + 2 + n


cdef struct Str:
    const char* s
    Py_ssize_t n


cdef inline bint _str_ok(object value, Str* out) noexcept:
    """Fast path of ``_str_view``: True when ``value`` is a str that may go on
    the wire as is (the UTF-8 of an ASCII str is its own buffer: no copy)."""
    if not PyUnicode_Check(value):
        return False
    cdef const char* s = _PyUnicode_AsUTF8AndSize(value, &out.n)
    if s == NULL:
        PyErr_Clear()
        return False
    if out.n > 0xFFFF or (out.n and memchr(s, 0, <size_t>out.n) != NULL):
        return False
    out.s = s
    return True


cdef int _str_error(object value, str what) except -1:
    """Raise the MalformedPacket explaining why ``_str_ok`` refused ``value``."""
    if not PyUnicode_Check(value):
        _fail(f"{what} must be a str, not {type(value).__name__}")
    cdef Py_ssize_t n
    cdef const char* s = _PyUnicode_AsUTF8AndSize(value, &n)
    if s == NULL:
        PyErr_Clear()
        _fail(f"{what} is not well-formed UTF-8 [MQTT-1.5.4-1]")
    if n and memchr(s, 0, <size_t>n) != NULL:
        _fail(f"{what} contains U+0000 [MQTT-1.5.4-2]")
    _fail(f"{what} is longer than 65535 bytes (1.5.4)")


cdef inline int _str_view(object value, Str* out, str what) except -1:
    """UTF-8 view of a str for the wire: well-formed [MQTT-1.5.4-1], no U+0000
    [MQTT-1.5.4-2], at most 65535 bytes (1.5.4)."""
    if not _str_ok(value, out):
        _str_error(value, what)
    return 0


cdef bytes _as_bytes(object value, str what, Py_ssize_t limit):
    """Binary data (bytes, bytearray, memoryview) as bytes of at most ``limit``."""
    cdef bytes b
    if PyBytes_CheckExact(value):
        b = <bytes>value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
    else:
        _fail(f"{what} must be bytes, not {type(value).__name__}")
    if PyBytes_GET_SIZE(b) > limit:
        _fail(f"{what} is longer than 65535 bytes (1.5.6)")
    return b


cdef extern from *:
    """
    /* The mapping a types.MappingProxyType wraps. Its layout (PyObject_HEAD then
       the mapping) has not changed since CPython 3.3; the caller checks the
       exact type first and that the mapping is a dict. */
    typedef struct { PyObject_HEAD PyObject *mapping; } fastmqtt_proxy_t;
    #define FASTMQTT_PROXY_MAPPING(o) (((fastmqtt_proxy_t *)(o))->mapping)
    """
    PyObject* FASTMQTT_PROXY_MAPPING(object o)

cdef extern from "Python.h":
    bint PyDict_CheckExact(object o)
    bint PyLong_CheckExact(object o)
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    int PyDict_Next(object d, Py_ssize_t* pos, PyObject** key, PyObject** value) noexcept
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1

cdef type _ProxyType = type(_EMPTY_PROPERTIES_py)


cdef enum:
    PLAN_ITEMS = 32         # property values a plan records in C form


cdef struct PropItem:
    unsigned char pid
    long long iv            # integer value
    const char* s1          # string / binary data (borrowed from the packet)
    Py_ssize_t n1
    const char* s2          # USER_PROPERTY value
    Py_ssize_t n2


cdef struct PropPlan:
    int n
    unsigned char ids[48]
    PyObject* vals[48]      # borrowed from the packet's properties dict
    Py_ssize_t size         # bytes of the property block after its length
    bint has_alias
    # Every value as validated, in write order, so writing needs no second
    # look at the Python objects; ``nitems`` -1 when they did not fit (or a
    # value had to be copied) and the writer falls back to the objects.
    int nitems
    PropItem items[PLAN_ITEMS]


cdef inline PropItem* _item(PropPlan* pl, int pid) noexcept:
    """The next item slot, or NULL once the plan gave up recording."""
    if pl.nitems < 0:
        return NULL
    if pl.nitems >= PLAN_ITEMS:
        pl.nitems = -1
        return NULL
    cdef PropItem* it = &pl.items[pl.nitems]
    pl.nitems += 1
    it.pid = <unsigned char>pid
    return it


cdef extern from *:
    """
    /* Value of an int (or int subclass) known to be in 0..2**30-1, else -1;
       no call, no allocation. */
    #if PY_VERSION_HEX >= 0x030C0000
    static inline long fastmqtt_small_int(PyObject *o) {
        if (!PyUnstable_Long_IsCompact((PyLongObject *)o)) return -1;
        Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
        return (v < 0 || v >= (1L << 30)) ? -1 : (long)v;
    }
    #else
    static inline long fastmqtt_small_int(PyObject *o) {
        Py_ssize_t size = Py_SIZE(o);
        if (size == 0) return 0;
        if (size == 1) return (long)((PyLongObject *)o)->ob_digit[0];
        return -1;
    }
    #endif
    """
    long fastmqtt_small_int(PyObject* o) noexcept


cdef inline bint _pair_fast(PyObject* pair, PropItem* it) noexcept:
    """A USER_PROPERTY (name, value) tuple/list of two exact, valid strs."""
    cdef PyObject* a
    cdef PyObject* b
    cdef Str sv
    if type(<object>pair) is tuple:
        if PyTuple_GET_SIZE(<object>pair) != 2:
            return False
        a = PyTuple_GET_ITEM(<object>pair, 0)
        b = PyTuple_GET_ITEM(<object>pair, 1)
    elif type(<object>pair) is list:
        if PyList_GET_SIZE(<object>pair) != 2:
            return False
        a = PyList_GET_ITEM(<object>pair, 0)
        b = PyList_GET_ITEM(<object>pair, 1)
    else:
        return False
    if not PyUnicode_CheckExact(<object>a) or not PyUnicode_CheckExact(<object>b):
        return False
    if not _str_ok(<object>a, &sv):
        return False
    it.s1 = sv.s
    it.n1 = sv.n
    if not _str_ok(<object>b, &sv):
        return False
    it.s2 = sv.s
    it.n2 = sv.n
    return True


cdef inline void _plan_add(PropPlan* pl, int pid, PyObject* v) noexcept:
    """Insert property ``pid`` into the plan, keeping ids ascending (the order
    they are written in); the caller checked there is room."""
    cdef int i = pl.n
    while i > 0 and pl.ids[i - 1] > pid:
        pl.ids[i] = pl.ids[i - 1]
        pl.vals[i] = pl.vals[i - 1]
        i -= 1
    pl.ids[i] = <unsigned char>pid
    pl.vals[i] = v
    pl.n += 1
    if pid == P_TOPIC_ALIAS:
        pl.has_alias = True


cdef bint _plan_fast(object mapping, int ptype, PropPlan* pl) noexcept:
    """``_plan_props`` for the usual case, with no Python API calls: keys are
    property ids, values exact ints/strs/bytes and USER_PROPERTY a tuple or
    list of (str, str). Fills ``pl`` (ids, values and items in ascending id
    order) and returns True; returns False, leaving ``pl`` to be reset, on
    anything else, and the general walk then decides (and words any error)."""
    cdef Py_ssize_t pos = 0, j, m
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* e
    cdef long pid, iv
    cdef int i, kind
    cdef PropItem* it
    cdef Str sv
    cdef Py_ssize_t size = 0
    while PyDict_Next(mapping, &pos, &k, &v):
        if not PyLong_Check(<object>k):
            return False
        pid = fastmqtt_small_int(k)
        if pid <= 0 or pid >= 64 or _PTYPE[pid] == 0 or not (_PALLOW[pid] & (1u << ptype)):
            return False
        if pl.n >= 48:
            return False
        _plan_add(pl, pid, v)
    for i in range(pl.n):
        pid = pl.ids[i]
        v = pl.vals[i]
        kind = _PTYPE[pid]
        if kind <= T_VBI:
            if not PyLong_CheckExact(<object>v):
                return False
            iv = fastmqtt_small_int(v)
            if iv < 0 or (iv == 0 and _PNONZERO[pid]):
                return False
            if kind == T_BYTE:
                if iv > (1 if _PBOOL[pid] else 0xFF):
                    return False
                size += 2
            elif kind == T_U16:
                if iv > 0xFFFF:
                    return False
                size += 3
            elif kind == T_U32:
                size += 5
            else:
                if iv > MAX_RL:
                    return False
                size += 1 + _vbi_len(iv)
            if pl.nitems >= PLAN_ITEMS:
                return False
            it = &pl.items[pl.nitems]
            pl.nitems += 1
            it.pid = <unsigned char>pid
            it.iv = iv
        elif kind == T_STR:
            if not PyUnicode_CheckExact(<object>v) or not _str_ok(<object>v, &sv):
                return False
            if pl.nitems >= PLAN_ITEMS:
                return False
            it = &pl.items[pl.nitems]
            pl.nitems += 1
            it.pid = <unsigned char>pid
            it.s1 = sv.s
            it.n1 = sv.n
            size += 3 + sv.n
        elif kind == T_BIN:
            if not PyBytes_CheckExact(<object>v) or PyBytes_GET_SIZE(<object>v) > 0xFFFF:
                return False
            if pl.nitems >= PLAN_ITEMS:
                return False
            it = &pl.items[pl.nitems]
            pl.nitems += 1
            it.pid = <unsigned char>pid
            it.s1 = PyBytes_AS_STRING(<object>v)
            it.n1 = PyBytes_GET_SIZE(<object>v)
            size += 3 + it.n1
        else:  # T_PAIR
            if type(<object>v) is tuple:
                m = PyTuple_GET_SIZE(<object>v)
            elif type(<object>v) is list:
                m = PyList_GET_SIZE(<object>v)
            else:
                return False
            if pl.nitems + m > PLAN_ITEMS:
                return False
            for j in range(m):
                if type(<object>v) is tuple:
                    e = PyTuple_GET_ITEM(<object>v, j)
                else:
                    e = PyList_GET_ITEM(<object>v, j)
                it = &pl.items[pl.nitems]
                pl.nitems += 1
                it.pid = <unsigned char>pid
                if not _pair_fast(e, it):
                    return False
                size += 5 + it.n1 + it.n2
    pl.size = size
    return True


cdef int _plan_props(object props, int ptype, PropPlan* pl) except -1:
    """Validate a properties mapping for ``ptype`` and measure its encoding.

    Ids are checked first (known, allowed here), then values in ascending id
    order, which is also the order they are written in."""
    pl.n = 0
    pl.size = 0
    pl.has_alias = False
    pl.nitems = 0
    if props is EMPTY or props is None:
        return 0
    cdef object mapping
    if type(props) is _Properties:
        mapping = (<_Properties>props)._d
    elif type(props) is not _ProxyType:
        # The constructor turned every mapping into a read-only view; anything
        # else was kept as given for this error.
        _fail(f"{_pname(ptype)} properties must be a mapping, not {type(props).__name__}")
    else:
        mapping = <object>FASTMQTT_PROXY_MAPPING(props)
    if not PyDict_CheckExact(mapping):
        _fail(f"{_pname(ptype)} properties must be a dict-backed mapping")
    if _plan_fast(mapping, ptype, pl):
        return _check_plan(pl, ptype)
    # Something the fast path does not take (a subclass, a large int, an
    # invalid value): the general walk below, which also words the errors.
    pl.n = 0
    pl.size = 0
    pl.has_alias = False
    pl.nitems = 0
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef int pid, i
    while PyDict_Next(mapping, &pos, &k, &v):
        pid = _prop_id(<object>k, ptype)
        if pl.n >= 48:  # unreachable: ids are unique and there are 27
            _fail(f"{_pname(ptype)} has too many properties")
        _plan_add(pl, pid, v)
    for i in range(pl.n):
        pl.size += _prop_size(pl.ids[i], <object>pl.vals[i], ptype, pl)
    return _check_plan(pl, ptype)


cdef int _check_response_topic(str topic, int ptype) except -1:
    """A Response Topic is a topic name: no wildcard [MQTT-3.3.2-14] (a
    will's too: it is published like a PUBLISH's)."""
    if '+' in topic or '#' in topic:
        _fail(f"{_pname(ptype)} RESPONSE_TOPIC {topic[:40]!r} contains a wildcard "
              "[MQTT-3.3.2-14]", RC_PROTOCOL)
    return 0


cdef int _check_plan(PropPlan* pl, int ptype) except -1:
    """The rules that look at more than one value or at a string's content:
    a Response Topic without wildcards [MQTT-3.3.2-14] (PUBLISH, will);
    Authentication Data only with an Authentication Method (3.1.2.11.10)."""
    cdef int i
    cdef bint method = False, data = False
    if ptype == PUBLISH or ptype == WILL:
        for i in range(pl.n):  # ids ascending: stop at the first past it
            if pl.ids[i] >= P_RESPONSE_TOPIC:
                if pl.ids[i] == P_RESPONSE_TOPIC and isinstance(<object>pl.vals[i], str):
                    _check_response_topic(<str>pl.vals[i], ptype)
                break
        return 0
    if ptype != CONNECT and ptype != CONNACK and ptype != AUTH:
        return 0
    for i in range(pl.n):
        if pl.ids[i] == P_AUTH_METHOD:
            method = True
        elif pl.ids[i] == P_AUTH_DATA:
            data = True
    if data and not method:
        _fail(f"{_pname(ptype)} has AUTHENTICATION_DATA without AUTHENTICATION_METHOD "
              "(3.1.2.11.10)", RC_PROTOCOL)
    return 0


cdef inline int _prop_id(object key, int ptype) except -1:
    """A known property id allowed in ``ptype`` (2.2.2.2), else MalformedPacket."""
    cdef int overflow = 0
    cdef long long pid = -1
    if PyLong_Check(key):
        pid = PyLong_AsLongLongAndOverflow(key, &overflow)
    if overflow or pid <= 0 or pid >= 64 or _PTYPE[pid] == 0:
        _fail(f"{_pname(ptype)} unknown property identifier {key!r}")
    if not (_PALLOW[pid] & (1u << ptype)):
        _fail(f"{_pname(ptype)} property {_PNAME[pid]} is not allowed in this packet (2.2.2.2)")
    return <int>pid


cdef Py_ssize_t _prop_size(int pid, object value, int ptype, PropPlan* pl) except -1:
    cdef Py_ssize_t size = 0, i, n
    if pid == P_USER or pid == P_SUBID:
        if pid == P_SUBID and PyLong_Check(value):
            return 1 + _value_size(pid, value, ptype, pl)
        if type(value) is tuple or type(value) is list or isinstance(value, (list, tuple)):
            n = len(value)
        else:
            _fail(f"{_pname(ptype)} property {_PNAME[pid]} must be a list or tuple")
        if pid == P_SUBID and ptype != PUBLISH and n > 1:
            _fail(f"{_pname(ptype)} property {_PNAME[pid]} included more than once",
                  RC_PROTOCOL)
        if type(value) is not tuple and type(value) is not list:
            # A subclass is read by iteration, as the reference does, and its
            # items may be temporaries: keep no pointers into them.
            pl.nitems = -1
            value = tuple(value)
            n = len(value)
        for i in range(n):
            size += 1 + _value_size(pid, value[i], ptype, pl)
        return size
    return 1 + _value_size(pid, value, ptype, pl)


cdef int _int_error(int pid, object value, int ptype) except -1:
    cdef str name = f"{_pname(ptype)} property {_PNAME[pid]}"
    cdef int kind = _PTYPE[pid]
    if not PyLong_Check(value):
        _fail(f"{name} must be an int, not {type(value).__name__}")
    if value == 0 and _PNONZERO[pid]:
        _fail(f"{name} must not be 0", RC_PROTOCOL)
    if kind == T_BYTE:
        if _PBOOL[pid] and not (value == 0 or value == 1):
            _fail(f"{name} must be 0 or 1, got {value!r}", RC_PROTOCOL)
        _fail(f"{name} must fit one byte, got {value!r}")
    if kind == T_U16:
        _fail(f"{name} must be 0..65535, got {value!r}")
    if kind == T_U32:
        _fail(f"{name} must be 0..4294967295, got {value!r}")
    _fail(f"{name} must be 1..268435455, got {value!r}")


cdef Py_ssize_t _value_size(int pid, object value, int ptype, PropPlan* pl) except -1:
    """Validate one property value, record it in ``pl`` and return its encoded
    size (without the id)."""
    cdef int kind = _PTYPE[pid]
    cdef Str sv
    cdef int overflow = 0
    cdef long long iv
    cdef PropItem* it = _item(pl, pid)
    if kind <= T_VBI:
        if not PyLong_Check(value):
            _int_error(pid, value, ptype)
        iv = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow or (iv == 0 and _PNONZERO[pid]) or iv < 0:
            _int_error(pid, value, ptype)
        if it != NULL:
            it.iv = iv
        if kind == T_BYTE:
            if iv > (1 if _PBOOL[pid] else 0xFF):
                _int_error(pid, value, ptype)
            return 1
        if kind == T_U16:
            if iv > 0xFFFF:
                _int_error(pid, value, ptype)
            return 2
        if kind == T_U32:
            if iv > 0xFFFFFFFF:
                _int_error(pid, value, ptype)
            return 4
        if iv > MAX_RL:
            _int_error(pid, value, ptype)
        return _vbi_len(<Py_ssize_t>iv)
    if kind == T_STR:
        if not _str_ok(value, &sv):
            _str_error(value, f"{_pname(ptype)} property {_PNAME[pid]}")
        if it != NULL:
            it.s1 = sv.s
            it.n1 = sv.n
        return 2 + sv.n
    if kind == T_BIN:
        if PyBytes_CheckExact(value) and PyBytes_GET_SIZE(value) <= 0xFFFF:
            if it != NULL:
                it.s1 = PyBytes_AS_STRING(value)
                it.n1 = PyBytes_GET_SIZE(value)
            return 2 + PyBytes_GET_SIZE(value)
        pl.nitems = -1  # converted copy: write from the object
        return 2 + PyBytes_GET_SIZE(_as_bytes(value, f"{_pname(ptype)} property "
                                                     f"{_PNAME[pid]}", 0xFFFF))
    # T_PAIR
    cdef Py_ssize_t size
    if not (type(value) is tuple or isinstance(value, (tuple, list))) or len(value) != 2:
        _fail(f"{_pname(ptype)} property {_PNAME[pid]} must be a (name, value) pair of str, "
              f"got {value!r}")
    if type(value) is not tuple and type(value) is not list:
        pl.nitems = -1  # see _prop_size: no pointers into possible temporaries
        it = NULL
    if not _str_ok(value[0], &sv):
        _str_error(value[0], f"{_pname(ptype)} property {_PNAME[pid]} name")
    size = 4 + sv.n
    if it != NULL:
        it.s1 = sv.s
        it.n1 = sv.n
    if not _str_ok(value[1], &sv):
        _str_error(value[1], f"{_pname(ptype)} property {_PNAME[pid]} value")
    if it != NULL:
        it.s2 = sv.s
        it.n2 = sv.n
    return size + sv.n


cdef unsigned char* _write_props(unsigned char* w, PropPlan* pl) except NULL:
    """Write the property block measured by ``_plan_props`` (values already valid)."""
    w = w_vbi(w, pl.size)
    cdef int i, pid, kind
    cdef PropItem* it
    if pl.nitems >= 0:
        for i in range(pl.nitems):
            it = &pl.items[i]
            w[0] = it.pid
            w += 1
            kind = _PTYPE[it.pid]
            if kind == T_BYTE:
                w[0] = <unsigned char>it.iv
                w += 1
            elif kind == T_U16:
                w = w_u16(w, <Py_ssize_t>it.iv)
            elif kind == T_U32:
                w = w_u32(w, it.iv)
            elif kind == T_VBI:
                w = w_vbi(w, <Py_ssize_t>it.iv)
            elif kind == T_PAIR:
                w = w_lstr(w, it.s1, it.n1)
                w = w_lstr(w, it.s2, it.n2)
            else:  # T_STR, T_BIN
                w = w_lstr(w, it.s1, it.n1)
        return w
    cdef Py_ssize_t j
    for i in range(pl.n):
        pid = pl.ids[i]
        value = <object>pl.vals[i]
        if (pid == P_USER or pid == P_SUBID) and not PyLong_Check(value):
            if type(value) is not tuple and type(value) is not list:
                value = tuple(value)  # as _prop_size read it
            for j in range(len(value)):
                w[0] = <unsigned char>pid
                w = _write_value(w + 1, pid, value[j])
        else:
            w[0] = <unsigned char>pid
            w = _write_value(w + 1, pid, value)
    return w


cdef inline unsigned char* _w_str(unsigned char* w, object value) noexcept:
    # Validated by _value_size: a str whose UTF-8 is cached (or is its buffer).
    cdef Py_ssize_t n
    cdef const char* s = _PyUnicode_AsUTF8AndSize(value, &n)
    return w_lstr(w, s, n)


cdef unsigned char* _write_value(unsigned char* w, int pid, object value) except NULL:
    cdef int kind = _PTYPE[pid]
    cdef bytes b
    if kind == T_BYTE:
        w[0] = <unsigned char>(<long long>value)
        return w + 1
    if kind == T_U16:
        return w_u16(w, <long long>value)
    if kind == T_U32:
        return w_u32(w, <long long>value)
    if kind == T_VBI:
        return w_vbi(w, <Py_ssize_t>value)
    if kind == T_STR:
        return _w_str(w, value)
    if kind == T_BIN:
        if PyBytes_CheckExact(value):
            return w_lstr(w, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        b = bytes(value)
        return w_lstr(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
    w = _w_str(w, value[0])
    return _w_str(w, value[1])


cdef inline Py_ssize_t _props_part(PropPlan* pl) noexcept:
    """Bytes of a property block including its length prefix."""
    return _vbi_len(pl.size) + pl.size


cdef inline bytes _alloc(int first, Py_ssize_t rl, unsigned char** w):
    """Result bytes for a packet with remaining length ``rl``; ``w`` is left
    after the fixed header."""
    if rl > MAX_RL:
        _fail(f"remaining length {rl} exceeds 268435455 (2.1.4)", RC_TOO_LARGE)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + _vbi_len(rl) + rl)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = <unsigned char>first
    w[0] = w_vbi(p + 1, rl)
    return out


cdef inline int _enc_packet_id(int packet_id, int ptype) except -1:
    if packet_id < 1 or packet_id > 0xFFFF:
        _fail(f"{_pname(ptype)} packet identifier must be 1..65535, got {packet_id!r} "
              "[MQTT-2.2.1-3]", RC_PROTOCOL)
    return packet_id


cdef inline int _enc_reason(int code, int ptype) except -1:
    if code < 0 or code > 255 or not _VALID_RC[ptype][code]:
        _fail(f"{_pname(ptype)} reason code {code!r} is not valid for this packet",
              RC_PROTOCOL)
    return code


cdef bytes _encode_connect(Connect p, int version):
    cdef int level = p.protocol_level
    if level == 0:
        level = version
    if level != 3 and level != 4 and level != 5:
        _fail(f"CONNECT protocol level {level!r} is not supported (5, 4 or 3)", RC_VERSION)
    cdef bint v5 = level == 5
    cdef int flags = 0x02 if p.clean_start else 0x00
    cdef Will will = None
    cdef PropPlan pl, wpl
    cdef Str cid, wtopic, user
    cdef bytes wpayload = None, password = None
    if p.will is not None:
        if type(p.will) is not Will:
            _fail(f"CONNECT will must be a Will, not {type(p.will).__name__}")
        will = <Will>p.will
        if will.qos < 0 or will.qos > 2:
            _fail(f"CONNECT will QoS must be 0, 1 or 2, got {will.qos!r} [MQTT-3.1.2-12]")
        flags |= 0x04 | (will.qos << 3)
        if will.retain:
            flags |= 0x20
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if p.username is None and not v5:
            _fail("CONNECT password without user name in MQTT 3.1.1 [MQTT-3.1.2-22]")
        flags |= 0x40
    if p.keep_alive < 0 or p.keep_alive > 0xFFFF:
        _fail(f"CONNECT keep alive must be an int 0..65535, got {p.keep_alive!r}")
    cdef Py_ssize_t rl = (6 if level == 4 or level == 5 else 8) + 1 + 1 + 2
    if v5:
        _plan_props(p.properties, CONNECT, &pl)
        rl += _props_part(&pl)
    _str_view(p.client_id, &cid, "CONNECT client identifier")
    rl += 2 + cid.n
    if will is not None:
        if v5:
            _plan_props(will.properties, WILL, &wpl)
            rl += _props_part(&wpl)
        _str_view(will.topic, &wtopic, "CONNECT will topic")
        wpayload = _as_bytes(will.payload, "CONNECT will payload", 0xFFFF)
        rl += 4 + wtopic.n + PyBytes_GET_SIZE(wpayload)
    if p.username is not None:
        _str_view(p.username, &user, "CONNECT user name")
        rl += 2 + user.n
    if p.password is not None:
        password = _as_bytes(p.password, "CONNECT password", 0xFFFF)
        rl += 2 + PyBytes_GET_SIZE(password)
    cdef unsigned char* w
    out = _alloc(0x10, rl, &w)
    if level == 3:
        w = w_lstr(w, b"MQIsdp", 6)
    else:
        w = w_lstr(w, b"MQTT", 4)
    w[0] = <unsigned char>level
    w[1] = <unsigned char>flags
    w = w_u16(w + 2, p.keep_alive)
    if v5:
        w = _write_props(w, &pl)
    w = w_lstr(w, cid.s, cid.n)
    if will is not None:
        if v5:
            w = _write_props(w, &wpl)
        w = w_lstr(w, wtopic.s, wtopic.n)
        w = w_lstr(w, PyBytes_AS_STRING(wpayload), PyBytes_GET_SIZE(wpayload))
    if p.username is not None:
        w = w_lstr(w, user.s, user.n)
    if password is not None:
        w = w_lstr(w, PyBytes_AS_STRING(password), PyBytes_GET_SIZE(password))
    return out


cdef bytes _encode_connack(Connack p, bint v5):
    cdef int code = _enc_reason(p.reason_code, CONNACK)
    cdef int flags = 0x01 if p.session_present else 0x00
    cdef PropPlan pl
    cdef unsigned char* w
    if v5:
        _plan_props(p.properties, CONNACK, &pl)
        out = _alloc(0x20, 2 + _props_part(&pl), &w)
        w[0] = <unsigned char>flags
        w[1] = <unsigned char>code
        _write_props(w + 2, &pl)
        return out
    if _V5_TO_V311[code] < 0:
        _fail(f"CONNACK reason code 0x{code:02X} has no MQTT 3.1.1 return code", RC_PROTOCOL)
    out = _alloc(0x20, 2, &w)
    w[0] = <unsigned char>flags
    w[1] = <unsigned char>_V5_TO_V311[code]
    return out


# The last topic name object validated by _encode_publish (compact ASCII, so its
# buffer is its UTF-8).
cdef object _last_topic = None


cdef inline void _remember_topic(object t) noexcept:
    global _last_topic
    _last_topic = t


cdef bytes _encode_publish(Publish p, bint v5, bint template, Py_ssize_t* id_offset):
    """PUBLISH bytes; with ``template`` the packet id is written as 0 (and not
    checked), DUP is cleared, and ``id_offset`` receives the id's position."""
    cdef int qos = p.qos
    if qos < 0 or qos > 2:
        _fail(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r} [MQTT-3.3.1-4]")
    cdef bint dup = p.dup and not template
    if dup and qos == 0:
        _fail("PUBLISH DUP flag set on a QoS 0 message [MQTT-3.3.1-2]")
    cdef PropPlan pl
    cdef Py_ssize_t rl = 2
    if v5:
        if p.properties is EMPTY:
            pl.n = 0
            pl.size = 0
            pl.has_alias = False
        else:
            _plan_props(p.properties, PUBLISH, &pl)
        rl += _props_part(&pl)
    cdef Str topic
    cdef object t = p.topic
    if t is _last_topic:
        # Validated a moment ago (str is immutable): a publisher loop or a
        # broker re-encoding one message for several receivers skips the scans.
        topic.s = <const char*>PyUnicode_DATA(t)
        topic.n = PyUnicode_GET_LENGTH(t)
    else:
        _str_view(t, &topic, "PUBLISH topic name")
        _check_topic_name(<const unsigned char*>topic.s, topic.n, v5 and pl.has_alias)
        if topic.n and PyUnicode_IS_COMPACT_ASCII(t):
            # Non-empty and wildcard-free: valid whatever the properties say.
            _remember_topic(t)
    payload = p.payload
    if not PyBytes_CheckExact(payload):
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = bytes(payload)
        else:
            _fail(f"PUBLISH payload must be bytes, not {type(payload).__name__}")
    cdef int packet_id = 0
    if qos:
        if not template:
            packet_id = _enc_packet_id(p.packet_id, PUBLISH)
        rl += 2
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload)
    rl += topic.n + plen
    cdef unsigned char* w
    cdef int first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if p.retain else 0)
    out = _alloc(first, rl, &w)
    w = w_lstr(w, topic.s, topic.n)
    if qos:
        id_offset[0] = w - <unsigned char*>PyBytes_AS_STRING(out)
        w = w_u16(w, packet_id)
    if v5:
        if pl.n:
            w = _write_props(w, &pl)
        else:
            w[0] = 0
            w += 1
    memcpy(w, PyBytes_AS_STRING(payload), plen)
    return out


cdef bytes _encode_ack(_Ack p, int ptype, bint v5):
    cdef int first = (ptype << 4) | (0x02 if ptype == PUBREL else 0)
    _enc_packet_id(p.packet_id, ptype)
    cdef unsigned char* w
    cdef PropPlan pl
    if not v5:
        out = _alloc(first, 2, &w)
        w_u16(w, p.packet_id)
        return out
    cdef int code = _enc_reason(p.reason_code, ptype)
    _plan_props(p.properties, ptype, &pl)
    if pl.n == 0:
        # Short forms (3.4.2.1): no properties -> no property length; reason 0
        # -> no reason code either.
        out = _alloc(first, 2 if code == 0 else 3, &w)
        w = w_u16(w, p.packet_id)
        if code:
            w[0] = <unsigned char>code
        return out
    out = _alloc(first, 3 + _props_part(&pl), &w)
    w = w_u16(w, p.packet_id)
    w[0] = <unsigned char>code
    _write_props(w + 1, &pl)
    return out


cdef bytes _encode_subscribe(Subscribe p, bint v5):
    _enc_packet_id(p.packet_id, SUBSCRIBE)
    cdef PropPlan pl
    cdef Py_ssize_t rl = 2
    if v5:
        _plan_props(p.properties, SUBSCRIBE, &pl)
        rl += _props_part(&pl)
    if not p._items:
        _fail("SUBSCRIBE contains no topic filter [MQTT-3.8.3-3]", RC_PROTOCOL)
    cdef Str sv
    cdef Subscription sub
    cdef bint shared
    for item in p._items:
        if type(item) is not Subscription:
            _fail(f"SUBSCRIBE subscriptions must be Subscription, not {type(item).__name__}")
        sub = <Subscription>item
        _str_view(sub.topic_filter, &sv, "SUBSCRIBE topic filter")
        shared = _check_filter(<const unsigned char*>sv.s, sv.n, SUBSCRIBE)
        if sub.qos < 0 or sub.qos > 2:
            _fail(f"SUBSCRIBE maximum QoS must be 0, 1 or 2, got {sub.qos!r} (3.8.3.1)",
                  RC_PROTOCOL)
        if v5:
            if sub.retain_handling < 0 or sub.retain_handling > 2:
                _fail(f"SUBSCRIBE retain handling must be 0, 1 or 2, got "
                      f"{sub.retain_handling!r} (3.8.3.1)", RC_PROTOCOL)
            if sub.no_local and shared:
                _fail("SUBSCRIBE no local set on a shared subscription [MQTT-3.8.3-4]",
                      RC_PROTOCOL)
        rl += 3 + sv.n
    cdef unsigned char* w
    out = _alloc(0x82, rl, &w)
    w = w_u16(w, p.packet_id)
    if v5:
        w = _write_props(w, &pl)
    for item in p._items:
        sub = <Subscription>item
        w = _w_str(w, sub.topic_filter)  # validated above
        if v5:
            w[0] = <unsigned char>(sub.qos | (0x04 if sub.no_local else 0)
                                   | (0x08 if sub.retain_as_published else 0)
                                   | (sub.retain_handling << 4))
        else:
            w[0] = <unsigned char>sub.qos
        w += 1
    return out


cdef bytes _encode_codes_packet(int first, int ptype, int packet_id, tuple codes,
                                object props, bint v5, bint with_codes):
    """SUBACK / UNSUBACK: packet id, v5 properties, one byte per reason code."""
    _enc_packet_id(packet_id, ptype)
    cdef PropPlan pl
    cdef Py_ssize_t rl = 2
    if v5:
        _plan_props(props, ptype, &pl)
        rl += _props_part(&pl)
    cdef Py_ssize_t n = len(codes) if with_codes else 0
    cdef Py_ssize_t i
    cdef long long code
    for i in range(n):
        c = codes[i]
        if not PyLong_Check(c) or not (0 <= c <= 255):
            _fail(f"{_pname(ptype)} reason code {c!r} is not valid for this packet",
                  RC_PROTOCOL)
        code = c
        if not (_VALID_RC[ptype][code] if v5 else _V311_SUBACK[code]):
            _fail(f"{_pname(ptype)} reason code {c!r} is not valid for this packet"
                  + ("" if v5 else " in MQTT 3.1.1"), RC_PROTOCOL)
    rl += n
    cdef unsigned char* w
    out = _alloc(first, rl, &w)
    w = w_u16(w, packet_id)
    if v5:
        w = _write_props(w, &pl)
    for i in range(n):
        w[i] = <unsigned char>(<long long>codes[i])
    return out


cdef bytes _encode_unsubscribe(Unsubscribe p, bint v5):
    _enc_packet_id(p.packet_id, UNSUBSCRIBE)
    cdef PropPlan pl
    cdef Py_ssize_t rl = 2
    if v5:
        _plan_props(p.properties, UNSUBSCRIBE, &pl)
        rl += _props_part(&pl)
    if not p._items:
        _fail("UNSUBSCRIBE contains no topic filter [MQTT-3.10.3-2]", RC_PROTOCOL)
    cdef Str sv
    for tf in p._items:
        _str_view(tf, &sv, "UNSUBSCRIBE topic filter")
        _check_filter(<const unsigned char*>sv.s, sv.n, UNSUBSCRIBE)
        rl += 2 + sv.n
    cdef unsigned char* w
    out = _alloc(0xA2, rl, &w)
    w = w_u16(w, p.packet_id)
    if v5:
        w = _write_props(w, &pl)
    for tf in p._items:
        w = _w_str(w, tf)  # validated above
    return out


cdef bytes _encode_reason_only(int ptype, int code, object props, bint v5):
    """DISCONNECT / AUTH."""
    cdef int first = ptype << 4
    if not v5:
        if ptype == AUTH:
            _fail("AUTH cannot be encoded for MQTT 3.1.1 (MQTT 5.0 only)", RC_PROTOCOL)
        return b"\xe0\x00"
    _enc_reason(code, ptype)
    cdef PropPlan pl
    _plan_props(props, ptype, &pl)
    cdef unsigned char* w
    if pl.n == 0 and code == 0:
        # Short form (3.14.2.1, 3.15.2.1): reason 0 and no properties -> empty body.
        return b"\xe0\x00" if ptype == DISCONNECT else b"\xf0\x00"
    if pl.n == 0 and ptype == DISCONNECT:
        # DISCONNECT may also omit just the property length (3.14.2.2.1); AUTH
        # has no such clause (3.15.2), so its reason is always followed by it.
        out = _alloc(first, 1, &w)
        w[0] = <unsigned char>code
        return out
    out = _alloc(first, 1 + _props_part(&pl), &w)
    w[0] = <unsigned char>code
    _write_props(w + 1, &pl)
    return out


def encode(packet, version=5):
    """Encode one packet.

    Args:
        packet: a packet object of this module.
        version: protocol level (5, 4 or 3). A CONNECT with a non-zero
            ``protocol_level`` uses that instead (3 is sent as ``MQIsdp``). For 4
            and 3, properties and v5-only reason codes are dropped and CONNACK's
            reason code is mapped to a 3.1.1 return code.

    Returns:
        The packet's bytes, fixed header included.

    Raises:
        MalformedPacket: if the packet breaks a rule a conforming peer would
            enforce (wildcard topic name, QoS 3, packet id 0, property not
            allowed in the packet, string over 65535 bytes, ...), or ``version``
            is not 3, 4 or 5 (0x84).
    """
    cdef int v
    if version == 5:
        v = 5
    else:
        v = _wire_version(version)
    cdef bint v5 = v == 5
    cdef type t = type(packet)
    cdef Py_ssize_t off
    if t is Publish:
        return _encode_publish(<Publish>packet, v5, False, &off)
    if t is Puback or t is Pubrec or t is Pubrel or t is Pubcomp:
        return _encode_ack(<_Ack>packet, PUBACK if t is Puback else PUBREC if t is Pubrec
                           else PUBREL if t is Pubrel else PUBCOMP, v5)
    if t is Subscribe:
        return _encode_subscribe(<Subscribe>packet, v5)
    if t is Suback:
        return _encode_codes_packet(0x90, SUBACK, (<Suback>packet).packet_id,
                                    (<Suback>packet)._items,
                                    (<Suback>packet).properties, v5, True)
    if t is Unsubscribe:
        return _encode_unsubscribe(<Unsubscribe>packet, v5)
    if t is Unsuback:
        return _encode_codes_packet(0xB0, UNSUBACK, (<Unsuback>packet).packet_id,
                                    (<Unsuback>packet)._items,
                                    (<Unsuback>packet).properties, v5, v5)
    if t is Pingreq:
        return b"\xc0\x00"
    if t is Pingresp:
        return b"\xd0\x00"
    if t is Connect:
        # 3 is its own level for CONNECT (MQIsdp); 4/5 as given.
        return _encode_connect(<Connect>packet, version if version == 3 else v)
    if t is Connack:
        return _encode_connack(<Connack>packet, v5)
    if t is Disconnect:
        return _encode_reason_only(DISCONNECT, (<Disconnect>packet).reason_code,
                                   (<Disconnect>packet).properties, v5)
    if t is Auth:
        return _encode_reason_only(AUTH, (<Auth>packet).reason_code,
                                   (<Auth>packet).properties, v5)
    _fail(f"cannot encode {t.__name__}: not a packet of this codec")


@cython.final
def encode_stored(publish):
    """A PUBLISH in the stores' format (:func:`fastmqtt.store.base.encode_publish`):
    a flag byte, then the v5 encoding; flag 1 marks a QoS 1/2 message without a
    packet id, encoded with id 1 (flag 0: as it is). One allocation; the same
    bytes the store's Python path builds, for the broker's hot path.

    Raises:
        MalformedPacket: if the PUBLISH cannot be encoded.
    """
    if type(publish) is not Publish:
        _fail(f"encode_stored needs a Publish, not {type(publish).__name__}")
    cdef Publish p = <Publish>publish
    cdef Py_ssize_t off = 0
    cdef bint no_id = p.qos != 0 and not p.packet_id
    body = _encode_publish(p, True, no_id, &off)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + 1)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
    w[0] = 1 if no_id else 0
    memcpy(w + 1, PyBytes_AS_STRING(body), n)
    if no_id:
        if p.dup:
            w[1] |= 0x08  # template mode cleared it
        w[1 + off] = 0
        w[2 + off] = 1
    return out


def encode_stored_fields(topic, payload, int qos, bint retain, properties=None):
    """:func:`encode_stored` of ``Publish(topic, payload, qos, retain, False, 0,
    properties)``, without building that ``Publish`` through Python (the
    broker stores its own message objects this way).

    Raises:
        MalformedPacket: if the PUBLISH cannot be encoded.
    """
    cdef Publish p = Publish.__new__(Publish)
    p.topic = topic
    p.payload = payload
    p.qos = qos
    p.retain = retain
    p.dup = False
    p.packet_id = 0
    p.properties = _normalise_properties(properties)
    return encode_stored(p)


cdef class PublishTemplate:
    """A PUBLISH encoded once, re-emitted per receiver with its own packet id
    and DUP flag, without re-encoding (the broker's fan-out path).

    Args:
        publish: the message; its ``packet_id`` and ``dup`` are ignored.
        version: protocol level to encode for (5, 4 or 3).

    Raises:
        MalformedPacket: if the PUBLISH cannot be encoded.
    """

    cdef readonly bytes data
    cdef readonly int qos
    cdef Py_ssize_t _id_offset

    def __init__(self, publish, version=5):
        if type(publish) is not Publish:
            _fail(f"PublishTemplate needs a Publish, not {type(publish).__name__}")
        cdef int v = _wire_version(version)
        self._id_offset = 0
        self.data = _encode_publish(<Publish>publish, v == 5, True, &self._id_offset)
        self.qos = (<Publish>publish).qos

    def with_packet_id(self, int packet_id, bint dup=False):
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
                _fail("PUBLISH DUP flag set on a QoS 0 message [MQTT-3.3.1-2]")
            return self.data
        _enc_packet_id(packet_id, PUBLISH)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self.data)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
        memcpy(w, PyBytes_AS_STRING(self.data), n)
        if dup:
            w[0] |= 0x08
        w[self._id_offset] = <unsigned char>(packet_id >> 8)
        w[self._id_offset + 1] = <unsigned char>packet_id
        return out

    def __repr__(self):
        return f"PublishTemplate(qos={self.qos}, data={self.data!r})"
