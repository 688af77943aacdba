"""Pieces shared by the store implementations: message serialisation, the
expiry rules applied when state is recovered, and the error type.

Messages are ``fastmqtt.Publish`` packets. On disk they are their MQTT 5.0
encoding behind one flag byte, so the file format is the wire format and needs
no schema of its own. The flag records a QoS 1/2 message that was stored with
packet id 0 (the broker assigns a packet id per receiver, so a stored message
may have none); the encoder insists on a non-zero id for QoS > 0
[MQTT-2.2.1-3], so such a message is encoded with id 1 and given back with 0.
"""

from __future__ import annotations

import logging
from typing import Any

from ..broker.interfaces import DeliveryRecord, SessionRecord, Snapshot, SubscriptionRecord

__all__ = [
    "StoreError", "encode_publish", "decode_publish", "NEVER_EXPIRES",
    "session_expired", "message_expired", "log",
]

log = logging.getLogger("fastmqtt.store")

#: Session Expiry Interval meaning "never" [MQTT-3.1.2-23 ... 3.1.2.11.2].
NEVER_EXPIRES = 0xFFFFFFFF

_FLAG_PLAIN = 0
_FLAG_NO_PACKET_ID = 1


class StoreError(RuntimeError):
    """The store cannot make changes durable any more (disk full, I/O error,
    database closed). Raised by ``durable()``; the broker must not acknowledge
    the message it was waiting for."""


_CODEC = None


def _codec():
    # Imported on first use (the codec module picks compiled or pure Python)
    # and cached: an import statement per message costs more than encoding.
    global _CODEC
    if _CODEC is None:
        from .. import codec

        _CODEC = codec
    return _CODEC


_ENCODE = None
_PUBLISH = None
_STORED = None
_PLAIN = bytes((_FLAG_PLAIN,))
_NO_PACKET_ID = bytes((_FLAG_NO_PACKET_ID,))


def encode_publish(publish: Any) -> bytes:
    """Serialise a PUBLISH for storage: a flag byte and its v5 encoding.

    Args:
        publish: a ``fastmqtt.Publish``.

    Returns:
        bytes to store; :func:`decode_publish` gives an equal packet back.

    Raises:
        fastmqtt.MalformedPacket: the packet cannot be encoded at all.
    """
    # Once per stored message on the store's writer thread, which shares the
    # GIL with the broker: the codec's functions are looked up once.
    global _ENCODE, _PUBLISH, _STORED
    if _ENCODE is None:
        codec = _codec()
        _ENCODE, _PUBLISH = codec.encode, codec.Publish
        # The compiled codec builds the same bytes in one call.
        _STORED = getattr(codec.IMPLEMENTATION, "encode_stored", None)
    if _STORED is not None and type(publish) is _PUBLISH:
        return _STORED(publish)
    if publish.qos and not publish.packet_id:
        publish = _PUBLISH(publish.topic, publish.payload, publish.qos, publish.retain,
                           publish.dup, 1, publish.properties)
        return _NO_PACKET_ID + _ENCODE(publish, 5)
    return _PLAIN + _ENCODE(publish, 5)


def publish_encoder():
    """The fastest function with :func:`encode_publish`'s contract for
    ``Publish`` objects: the compiled codec's ``encode_stored`` when it is in
    use (anything else raises there: fall back to :func:`encode_publish`)."""
    return getattr(_codec().IMPLEMENTATION, "encode_stored", None) or encode_publish


def publish_fields_encoder():
    """``f(topic, payload, qos, retain, properties)``: the stored form of that
    message (as :func:`encode_publish` of a ``Publish`` without packet id)."""
    codec = _codec()
    fast = getattr(codec.IMPLEMENTATION, "encode_stored_fields", None)
    if fast is not None:
        return fast
    publish = codec.Publish
    return lambda topic, payload, qos, retain, properties: encode_publish(
        publish(topic, payload, qos, retain, False, 0, properties))


def decode_publish(blob: bytes) -> Any:
    """Inverse of :func:`encode_publish`.

    Raises:
        ValueError (``MalformedPacket`` is one): the blob is not a stored PUBLISH.
    """
    codec = _codec()
    if not blob:
        raise ValueError("empty message blob")
    flag = blob[0]
    packet = codec.decode(bytes(blob[1:]), 5)
    if packet.packet_type != 3:
        raise ValueError(f"stored message is a packet of type {packet.packet_type}, not PUBLISH")
    if flag == _FLAG_NO_PACKET_ID:
        packet = codec.Publish(packet.topic, packet.payload, packet.qos, packet.retain,
                               packet.dup, 0, packet.properties)
    elif flag != _FLAG_PLAIN:
        raise ValueError(f"unknown message flag {flag}")
    return packet


def session_expired(expiry_interval: int, disconnected_at: float | None, now: float) -> bool:
    """True when a disconnected session has outlived its Session Expiry Interval.

    A session whose client is (as far as the store knows) connected never
    expires here; after a crash the broker restores it as disconnected at the
    time recorded, or keeps it if none was recorded (``disconnected_at`` None:
    the client was connected when the process died, so the clock starts at
    restart). [MQTT-3.1.2-23]: the session is kept for the interval after the
    Network Connection is closed; 0xFFFFFFFF means it does not expire.
    """
    if disconnected_at is None or expiry_interval == NEVER_EXPIRES:
        return False
    return disconnected_at + expiry_interval <= now


def message_expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and expires_at <= now


def build_snapshot(sessions: dict, subs: dict, deliveries: dict, qos2: dict,
                   messages: dict, retained: dict, wills: dict, now: float) -> Snapshot:
    """Assemble a :class:`Snapshot` from plain dicts, dropping what has expired.

    Args:
        sessions: client_id -> (expiry_interval, protocol_level, disconnected_at, username)
        subs: client_id -> {topic_filter: SubscriptionRecord}
        deliveries: client_id -> list of (seq, DeliveryRecord)
        qos2: client_id -> set of packet ids
        messages: msg_id -> (Publish, expires_at)
        retained: topic -> (Publish, expires_at)
        wills: client_id -> (Publish, due_at)
        now: wall-clock time used for expiry.

    Expiry rules: a session past its expiry interval is dropped with everything
    hanging on it. A *queued* delivery of an expired message is dropped
    [MQTT-3.3.2-5]: the server must delete a copy it has not started to deliver;
    one already sent ("sent"/"released") is kept so the QoS 1/2 exchange can
    complete. Expired retained messages are dropped [MQTT-3.3.2-5]. Wills are
    always returned: a will whose session ended while the broker was down is
    still owed to its subscribers.
    """
    snap = Snapshot()
    used: set[int] = set()
    for client_id, (expiry, level, disc, username) in sessions.items():
        if session_expired(expiry, disc, now):
            continue
        rec = SessionRecord(client_id, expiry, level, disc, username=username)
        rec.subscriptions = [SubscriptionRecord(**vars(s)) for s in subs.get(client_id, {}).values()]
        for _, d in sorted(deliveries.get(client_id, ()), key=lambda x: x[0]):
            msg = messages.get(d.msg_id)
            if msg is None:
                log.warning("delivery of unknown message %d to %r dropped", d.msg_id, client_id)
                continue
            if d.state == "queued" and message_expired(msg[1], now):
                continue
            rec.deliveries.append(DeliveryRecord(d.msg_id, d.qos, d.packet_id, d.state,
                                                 d.retain, d.subids))
            used.add(d.msg_id)
        rec.incoming_qos2 = set(qos2.get(client_id, ()))
        snap.sessions.append(rec)
    snap.messages = {mid: messages[mid] for mid in sorted(used)}
    snap.retained = [(t, p, e) for t, (p, e) in retained.items() if not message_expired(e, now)]
    snap.wills = [(c, p, due) for c, (p, due) in wills.items()]
    snap.next_msg_id = (max(messages) + 1) if messages else 1
    return snap


def delivery_extra(retain: bool, subids: tuple) -> str | None:
    """A delivery's RETAIN flag and subscription identifiers as one column:
    None for the usual (False, ()), else "R" when retained, then the ids
    comma-separated ("R", "R3,5", "7")."""
    if not retain and not subids:
        return None
    return ("R" if retain else "") + ",".join(map(str, subids))


def parse_delivery_extra(extra: str | None) -> tuple[bool, tuple]:
    """Inverse of :func:`delivery_extra`."""
    if not extra:
        return False, ()
    retain = extra.startswith("R")
    ids = extra[1:] if retain else extra
    return retain, tuple(int(x) for x in ids.split(",")) if ids else ()
