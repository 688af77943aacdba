"""Workloads for the codec benchmark (bench/test_codec.py).

Each workload is one realistic packet shape from the chat use case (see
/work/shared/CHAT.md), built three times: for our compiled codec
(``fastmqtt._codec``), for the pure-Python reference (``fastmqtt._codec_py``,
the baseline) and for the ``mqtt5`` PyPI package (Rust, the competitor).

For every (workload, operation, implementation) :func:`case` returns
``(function, argument, packets_per_call, check)``: the benchmark times
``function(argument)``, divides by ``packets_per_call`` for packets/s, and
``check(result)`` asserts the result is right, so a broken codec cannot post a
good number. Decoding feeds each implementation the bytes that implementation
encoded (the packets carry the same fields; mqtt5 spells some defaults
differently on the wire).
"""

from __future__ import annotations

import importlib
import json
import random
import uuid

import mqtt5

from fastmqtt.enums import PropertyId as P

#: Implementations in table order; "c" is ours, "py" the baseline.
IMPLS = ("c", "py", "mqtt5")
_MODULES = {"c": "fastmqtt._codec", "py": "fastmqtt._codec_py"}

WORKLOADS = (
    "publish-qos0",      # chat event, QoS 0, no properties (typing indicator)
    "publish-qos1-props",  # chat post, QoS 1, expiry + content type + 2 user properties
    "publish-varied",    # 2048 QoS 1 posts, all topics and property values distinct
    "publish-16k",       # 16 KiB payload (document comment with an attachment preview)
    "stream-1mb",        # 1 MB buffer of small PUBLISH packets, decoded in one feed
    "subscribe-3",       # SUBSCRIBE with 3 chat filters
    "connect-v5",        # CONNECT v5 with a few properties, user name and password
)
OPERATIONS = ("encode", "decode")

_RNG = random.Random(42)
_TOPIC = f"chat/ws-42/channel/{uuid.UUID(int=_RNG.getrandbits(128), version=4)}"


def _json_payload(size: int) -> bytes:
    """A JSON-like chat envelope padded to exactly ``size`` bytes."""
    body = {"type": 1, "id": 48213, "u": 7, "t": ""}
    raw = json.dumps(body, separators=(",", ":")).encode()
    fill = size - len(raw)
    body["t"] = "x" * fill
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == size, len(raw)
    return raw


PAYLOAD_64 = _json_payload(64)
PAYLOAD_16K = _json_payload(16 * 1024)
USER_PROPS = [("event", "post"), ("sender", "user-7")]
FILTERS = ("chat/ws-42/channel/+", "chat/ws-42/dm/#", "chat/ws-42/user/u-7")
STREAM_BYTES = 1 << 20


def _codec(impl: str):
    return importlib.import_module(_MODULES[impl])


# --------------------------------------------------------------- packet builders

def _ours(impl: str, workload: str):
    """Packet object(s) of workload for our codec or the reference."""
    c = _codec(impl)
    if workload == "publish-qos0":
        return c.Publish(_TOPIC, PAYLOAD_64)
    if workload == "publish-qos1-props":
        return c.Publish(_TOPIC, PAYLOAD_64, qos=1, packet_id=4711, properties={
            P.MESSAGE_EXPIRY_INTERVAL: 3600, P.CONTENT_TYPE: "application/json",
            P.USER_PROPERTY: USER_PROPS})
    if workload == "publish-16k":
        return c.Publish(_TOPIC, PAYLOAD_16K, qos=1, packet_id=9)
    if workload == "stream-1mb":
        return _stream_packets(impl)
    if workload == "publish-varied":
        return [c.Publish(topic, payload, qos=1, packet_id=pid, properties={
            P.MESSAGE_EXPIRY_INTERVAL: expiry, P.CONTENT_TYPE: "application/json",
            P.USER_PROPERTY: users}) for topic, payload, pid, expiry, users in _VARIED]
    if workload == "subscribe-3":
        return c.Subscribe(12, [c.Subscription(FILTERS[0], 1),
                                c.Subscription(FILTERS[1], 1, retain_handling=1),
                                c.Subscription(FILTERS[2], 0, no_local=True)])
    if workload == "connect-v5":
        return c.Connect("web-3f2a9c", clean_start=False, keep_alive=30, username="user-7",
                         password=b"s3cret-token", properties={
                             P.SESSION_EXPIRY_INTERVAL: 3600, P.RECEIVE_MAXIMUM: 100,
                             P.TOPIC_ALIAS_MAXIMUM: 16, P.MAXIMUM_PACKET_SIZE: 1 << 20,
                             P.USER_PROPERTY: [("app", "chat")]},
                         protocol_level=5)
    raise KeyError(workload)


def _theirs(workload: str):
    """The same packet(s) as mqtt5 objects."""
    q0, q1 = mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE
    if workload == "publish-qos0":
        return mqtt5.PublishPacket(_TOPIC, PAYLOAD_64, qos=q0)
    if workload == "publish-qos1-props":
        return mqtt5.PublishPacket(_TOPIC, PAYLOAD_64, qos=q1, packet_id=4711,
                                   message_expiry_interval=3600,
                                   content_type="application/json",
                                   user_properties=list(USER_PROPS))
    if workload == "publish-16k":
        return mqtt5.PublishPacket(_TOPIC, PAYLOAD_16K, qos=q1, packet_id=9)
    if workload == "stream-1mb":
        return _stream_packets("mqtt5")
    if workload == "publish-varied":
        return [mqtt5.PublishPacket(topic, payload, qos=q1, packet_id=pid,
                                    message_expiry_interval=expiry,
                                    content_type="application/json", user_properties=users)
                for topic, payload, pid, expiry, users in _VARIED]
    if workload == "subscribe-3":
        return mqtt5.SubscribePacket(12, [
            mqtt5.TopicFilter(FILTERS[0], max_qos=q1, retain_as_published=False),
            mqtt5.TopicFilter(FILTERS[1], max_qos=q1, retain_as_published=False,
                              retain_handling=mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS),
            mqtt5.TopicFilter(FILTERS[2], max_qos=q0, no_local=True,
                              retain_as_published=False)])
    if workload == "connect-v5":
        return mqtt5.ConnectPacket("web-3f2a9c", clean_start=False, keep_alive=30,
                                   username="user-7", password=b"s3cret-token",
                                   session_expiry_interval=3600, receive_max=100,
                                   topic_alias_max=16, max_packet_size=1 << 20,
                                   user_properties=[("app", "chat")])
    raise KeyError(workload)


def _varied():
    """Fields of 2048 distinct chat posts: every topic (channel id), sender,
    message id and expiry differs, so no decoder cache can hit."""
    rng = random.Random(11)
    rows = []
    for i in range(2048):
        channel = uuid.UUID(int=rng.getrandbits(128), version=4)
        users = [("event", "post"), ("sender", f"user-{rng.randrange(10**6)}"),
                 ("msg", f"{rng.getrandbits(64):016x}")]
        rows.append((f"chat/ws-{i % 100}/channel/{channel}", _json_payload(64),
                     i % 65535 + 1, 3600 + i, users))
    return rows


_VARIED = _varied()


def _stream_packets(impl: str) -> list:
    """Small chat PUBLISH packets (QoS 0 and 1, varying topics and payload
    sizes) totalling about 1 MB on the wire."""
    rng = random.Random(7)
    out = []
    size = 0
    while size < STREAM_BYTES:
        channel = uuid.UUID(int=rng.getrandbits(128), version=4)
        topic = f"chat/ws-{rng.randrange(100)}/channel/{channel}"
        payload = _json_payload(rng.randrange(40, 160))
        qos = rng.randrange(2)
        pid = rng.randrange(1, 65536) if qos else 0
        if impl == "mqtt5":
            packet = mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS(qos),
                                         packet_id=pid or None)
        else:
            packet = _codec(impl).Publish(topic, payload, qos=qos, packet_id=pid)
        out.append(packet)
        size += 2 + 2 + len(topic) + (2 if qos else 0) + 1 + len(payload)
    return out


# ------------------------------------------------------------------------ cases

def _mqtt5_stream(data: bytes) -> list:
    view = memoryview(data)
    pos = 0
    end = len(data)
    out = []
    read = mqtt5.read
    while pos < end:
        packet, used = read(view[pos:])
        out.append(packet)
        pos += used
    return out


def case(workload: str, operation: str, impl: str):
    """``(function, argument, packets_per_call, check)`` for one benchmark."""
    if impl == "mqtt5":
        packets = _theirs(workload)
        if workload == "stream-1mb":
            wire = b"".join(p.write() for p in packets)
            if operation == "encode":
                return (lambda ps: [p.write() for p in ps], packets, len(packets),
                        lambda out: _check_len(out, len(packets)))
            return (_mqtt5_stream, wire, len(packets),
                    lambda out: _check_stream_mqtt5(out, packets))
        if workload == "publish-varied":
            wires = [p.write() for p in packets]
            if operation == "encode":
                return (lambda ps: [p.write() for p in ps], packets, len(packets),
                        lambda out: _check_eq(out, wires))
            return (lambda ws, read=mqtt5.read: [read(w) for w in ws], wires, len(packets),
                    lambda out: _check_eq([o[0] for o in out], packets))
        wire = packets.write()
        if operation == "encode":
            return (type(packets).write, packets, 1, lambda out: _check_eq(out, wire))
        return (mqtt5.read, wire, 1, lambda out: _check_eq(out[0], packets))

    c = _codec(impl)
    packets = _ours(impl, workload)
    encode = c.encode
    if workload == "stream-1mb":
        wire = b"".join(encode(p) for p in packets)
        if operation == "encode":
            return (lambda ps: [encode(p) for p in ps], packets, len(packets),
                    lambda out: _check_eq(b"".join(out), wire))

        def stream(data, Decoder=c.Decoder):
            return Decoder(5).feed(data)

        return (stream, wire, len(packets), lambda out: _check_eq(out, packets))
    if workload == "publish-varied":
        wires = [encode(p) for p in packets]
        if operation == "encode":
            return (lambda ps: [encode(p) for p in ps], packets, len(packets),
                    lambda out: _check_eq(out, wires))
        decode = c.decode
        return (lambda ws: [decode(w) for w in ws], wires, len(packets),
                lambda out: _check_eq(out, packets))
    wire = encode(packets)
    if operation == "encode":
        return (encode, packets, 1, lambda out: _check_eq(out, wire))
    return (c.decode, wire, 1, lambda out: _check_eq(out, packets))


def _check_eq(got, want) -> None:
    assert got == want


def _check_len(got, n: int) -> None:
    assert len(got) == n


def _check_stream_mqtt5(got, packets) -> None:
    assert len(got) == len(packets)
    assert got[0] == packets[0] and got[-1] == packets[-1]
