"""MQTT 5.0 features: topic aliases both ways, Receive Maximum both ways, message
expiry, properties forwarded unchanged, Maximum Packet Size, and DISCONNECT rules."""

from __future__ import annotations

import time

import pytest

from fixtures_broker import ack_bytes, disconnect_bytes, publish_bytes, unique

pytestmark = pytest.mark.integration

PAYLOAD_FORMAT_INDICATOR = 0x01
MESSAGE_EXPIRY_INTERVAL = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SESSION_EXPIRY_INTERVAL = 0x11
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27


def small_window_broker(broker_factory, impl, receive_maximum):
    """A broker whose inbound Receive Maximum is ``receive_maximum``."""
    if impl == "fastmqtt":
        return broker_factory("fastmqtt", config={"receive_maximum": receive_maximum})
    return broker_factory("mosquitto", mosquitto_conf=[f"max_inflight_messages {receive_maximum}"])


# ------------------------------------------------------------- topic aliases

def test_topic_alias_client_to_server_MQTT_3_3_2_12(broker_impl, raw):
    topic = unique("ta")
    sub = raw(broker_impl, 5)
    sub.connect(unique("tas"))
    sub.subscribe(topic, 0)
    c = raw(broker_impl, 5)
    ack = c.connect(unique("ta"))
    assert ack.properties.get(TOPIC_ALIAS_MAXIMUM, 0) >= 1
    c.send(publish_bytes(topic, b"1", props={TOPIC_ALIAS: 1}))  # sets alias 1
    c.send(publish_bytes("", b"2", props={TOPIC_ALIAS: 1}))  # uses it
    c.send(publish_bytes(topic + "/other", b"3", props={TOPIC_ALIAS: 1}))  # remaps it
    c.send(publish_bytes("", b"4", props={TOPIC_ALIAS: 1}))
    sub.subscribe(topic + "/other", 0, packet_id=2)
    got = []
    for _ in range(2):
        p = sub.recv_type("PUBLISH")
        got.append((p.topic, p.payload))
        # The alias is a per-connection mapping; it is not forwarded.
        assert TOPIC_ALIAS not in p.properties or p.topic, p
    assert got == [(topic, b"1"), (topic, b"2")]
    assert c.ping().type == "PINGRESP"


@pytest.mark.parametrize("alias", ["zero", "too_big"])
def test_topic_alias_out_of_range_is_0x94_MQTT_3_3_2_8_and_9(broker_impl, raw, alias):
    c = raw(broker_impl, 5)
    ack = c.connect(unique("tab"))
    maximum = ack.properties.get(TOPIC_ALIAS_MAXIMUM, 0)
    value = 0 if alias == "zero" else maximum + 1
    c.send(publish_bytes(unique("tab"), b"x", props={TOPIC_ALIAS: value}))
    got = c.expect_closed()
    if alias == "zero":
        # 0 is never a valid alias [MQTT-3.3.2-8]: a Protocol Error (fastmqtt
        # 0x82, Mosquitto 0x81) or "Topic Alias invalid".
        assert all(p.type == "DISCONNECT" and p.reason_code in (0x81, 0x82, 0x94) for p in got), got
    else:
        # Above the maximum the server announced: 0x94 [MQTT-3.3.2-9].
        assert all(p.type == "DISCONNECT" and p.reason_code == 0x94 for p in got), got
    if broker_impl.impl == "fastmqtt":
        assert len(got) == 1


def test_unknown_topic_alias_is_protocol_error(broker_impl, raw):
    # An empty topic with an alias never set: Protocol Error (3.3.2.3.4).
    c = raw(broker_impl, 5)
    c.connect(unique("tau"))
    c.send(publish_bytes("", b"x", props={TOPIC_ALIAS: 1}))
    got = c.expect_closed()
    assert all(p.type == "DISCONNECT" and p.reason_code in (0x82, 0x94) for p in got), got


def resolve(aliases, p, maximum):
    """Apply server-to-client topic alias rules to a received PUBLISH."""
    alias = p.properties.get(TOPIC_ALIAS)
    if alias is None:
        return p.topic
    assert 1 <= alias <= maximum, p  # [MQTT-3.3.2-10]
    if p.topic:
        aliases[alias] = p.topic
        return p.topic
    assert alias in aliases, p
    return aliases[alias]


def test_topic_alias_server_to_client_MQTT_3_3_2_10(broker_impl, raw, paho):
    # With Topic Alias Maximum 2 the server MAY use aliases up to 2; whatever it
    # does, the receiver can always tell the real topic name.
    base = unique("tas")
    c = raw(broker_impl, 5)
    c.connect(unique("tac"), props={TOPIC_ALIAS_MAXIMUM: 2})
    c.subscribe(base + "/#", 0)
    pub = paho(broker_impl, 5)
    topics = [f"{base}/{i % 3}" for i in range(12)]
    for i, t in enumerate(topics):
        pub.publish(t, str(i).encode(), qos=1)
    aliases: dict = {}
    got = []
    for _ in topics:
        p = c.recv_type("PUBLISH")
        got.append(resolve(aliases, p, 2))
    assert got == topics


def test_no_topic_alias_without_client_maximum_MQTT_3_3_2_11(broker_impl, raw, paho):
    # No Topic Alias Maximum in CONNECT means 0: the server sends no aliases.
    topic = unique("tan")
    c = raw(broker_impl, 5)
    c.connect(unique("tan"))
    c.subscribe(topic, 0)
    pub = paho(broker_impl, 5)
    for i in range(3):
        pub.publish(topic, b"x", qos=1)
    for _ in range(3):
        p = c.recv_type("PUBLISH")
        assert p.topic == topic and TOPIC_ALIAS not in p.properties


# ----------------------------------------------------------- receive maximum

def test_receive_maximum_exceeded_is_0x93_MQTT_3_3_4_7(broker_factory, raw, impl):
    # The server allows 3 unacknowledged QoS 2 PUBLISHes; the 4th is 0x93.
    if impl == "mosquitto":
        pytest.xfail("Mosquitto 2.0.11 announces Receive Maximum but does not enforce it")
    b = small_window_broker(broker_factory, impl, 3)
    c = raw(b, 5)
    ack = c.connect(unique("rm"))
    assert ack.properties.get(RECEIVE_MAXIMUM) == 3
    topic = unique("rm")
    for pid in (1, 2, 3):  # QoS 2 without PUBREL: each stays in flight
        c.send(publish_bytes(topic, b"x", qos=2, packet_id=pid))
        assert c.recv_type("PUBREC").packet_id == pid
    c.send(publish_bytes(topic, b"x", qos=2, packet_id=4))
    got = c.expect_closed()
    if impl == "fastmqtt":
        assert [(p.type, p.reason_code) for p in got] == [("DISCONNECT", 0x93)]
    else:
        assert all((p.type, p.reason_code) == ("DISCONNECT", 0x93) for p in got), got


def test_receive_maximum_window_frees_on_pubcomp(broker_factory, raw, impl):
    b = small_window_broker(broker_factory, impl, 2)
    c = raw(b, 5)
    c.connect(unique("rmf"))
    topic = unique("rmf")
    for round_ in range(3):  # 6 messages through a window of 2, completed each time
        for pid in (1, 2):
            c.send(publish_bytes(topic, b"x", qos=2, packet_id=pid))
            assert c.recv_type("PUBREC").packet_id == pid
        for pid in (1, 2):
            c.send(ack_bytes("PUBREL", pid))
            assert c.recv_type("PUBCOMP").packet_id == pid
    assert c.ping().type == "PINGRESP"


def test_server_respects_client_receive_maximum_MQTT_3_3_4_9(broker_impl, raw, paho):
    if broker_impl.impl == "mosquitto":
        pytest.xfail("Mosquitto 2.0.11 refills the window one message too many after a PUBACK")
    topic = unique("crm")
    c = raw(broker_impl, 5)
    c.connect(unique("crm"), props={RECEIVE_MAXIMUM: 2})
    c.subscribe(topic, 1)
    pub = paho(broker_impl, 5)
    for i in range(5):
        pub.publish(topic, str(i).encode(), qos=1)
    first = [c.recv_type("PUBLISH") for _ in range(2)]
    c.expect_silence(0.5)  # no third one while two are unacknowledged
    c.send(ack_bytes("PUBACK", first[0].packet_id))
    third = c.recv_type("PUBLISH")
    got = [p.payload for p in first] + [third.payload]
    c.expect_silence(0.3)
    for p in first[1:] + [third]:
        c.send(ack_bytes("PUBACK", p.packet_id))
    for _ in range(2):
        p = c.recv_type("PUBLISH")
        got.append(p.payload)
        c.send(ack_bytes("PUBACK", p.packet_id))
    assert got == [b"0", b"1", b"2", b"3", b"4"]


# ------------------------------------------------------------ message expiry

def test_message_expiry_decremented_MQTT_3_3_2_6(broker_impl, raw, paho):
    cid = unique("exp")
    topic = unique("exp")
    c = raw(broker_impl, 5)
    c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 60})
    c.subscribe(topic, 1)
    c.disconnect()
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"long", qos=1, MessageExpiryInterval=30)
    pub.publish(topic, b"short", qos=1, MessageExpiryInterval=1)
    pub.publish(topic, b"never", qos=1)
    time.sleep(2.1)  # the behaviour under test is the passage of time itself
    c = raw(broker_impl, 5)
    assert c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 60}).session_present
    got = []
    for _ in range(2):
        p = c.recv_type("PUBLISH")
        c.send(ack_bytes("PUBACK", p.packet_id))
        got.append((p.payload, p.properties.get(MESSAGE_EXPIRY_INTERVAL)))
    c.expect_silence(0.3)  # the expired one is not sent [MQTT-3.3.2-5]
    assert got[0][0] == b"long" and 25 <= got[0][1] <= 28, got  # 30 minus time waited
    assert got[1] == (b"never", None)


def test_message_expiry_live_delivery_keeps_interval(broker_impl, raw, paho):
    topic = unique("expl")
    c = raw(broker_impl, 5)
    c.connect(unique("expl"))
    c.subscribe(topic, 0)
    paho(broker_impl, 5).publish(topic, b"x", qos=1, MessageExpiryInterval=3600)
    p = c.recv_type("PUBLISH")
    assert 3598 <= p.properties[MESSAGE_EXPIRY_INTERVAL] <= 3600


# ------------------------------------------------------- forwarded properties

def test_properties_forwarded_unchanged_MQTT_3_3_2_17_18(broker_impl, raw):
    # User properties in order [MQTT-3.3.2-17], [MQTT-3.3.2-18]; payload format
    # [MQTT-3.3.2-4]; content type [MQTT-3.3.2-20]; response topic
    # [MQTT-3.3.2-15]; correlation data [MQTT-3.3.2-16].
    topic = unique("props")
    sub = raw(broker_impl, 5)
    sub.connect(unique("ps"))
    sub.subscribe(topic, 1)
    pub = raw(broker_impl, 5)
    pub.connect(unique("pp"))
    props = [
        (PAYLOAD_FORMAT_INDICATOR, 1),
        (CONTENT_TYPE, "application/json; charset=utf-8"),
        (RESPONSE_TOPIC, "reply/here"),
        (CORRELATION_DATA, b"\x00\x01\xfe\xff"),
        (USER_PROPERTY, ("b", "2")),
        (USER_PROPERTY, ("a", "1")),
        (USER_PROPERTY, ("b", "3")),  # repeated names are kept
        (USER_PROPERTY, ("ünï", "çødé")),
    ]
    pub.publish(topic, b'{"type":"post"}', qos=1, packet_id=1, props=props)
    p = sub.recv_type("PUBLISH")
    assert p.payload == b'{"type":"post"}'
    assert p.properties[PAYLOAD_FORMAT_INDICATOR] == 1
    assert p.properties[CONTENT_TYPE] == "application/json; charset=utf-8"
    assert p.properties[RESPONSE_TOPIC] == "reply/here"
    assert p.properties[CORRELATION_DATA] == b"\x00\x01\xfe\xff"
    assert p.properties[USER_PROPERTY] == [("b", "2"), ("a", "1"), ("b", "3"), ("ünï", "çødé")]


def test_v5_properties_dropped_for_v311_subscriber(broker_impl, raw, paho):
    topic = unique("pv3")
    sub = raw(broker_impl, 4)
    sub.connect(unique("pv3"))
    sub.subscribe(topic, 1)
    paho(broker_impl, 5).publish(topic, b"x", qos=1, UserProperty=[("k", "v")], ContentType="text/plain")
    p = sub.recv_type("PUBLISH")
    # A 3.1.1 PUBLISH has no property field: topic, packet id, then payload.
    assert p.payload == b"x"


def test_payload_format_utf8_invalid_payload(broker_impl, raw):
    # A server MAY check the payload against Payload Format Indicator 1
    # [MQTT-3.3.2-4]; if it does, 0x99. Either way the connection stays usable
    # for a correct message.
    c = raw(broker_impl, 5)
    c.connect(unique("pfi"))
    try:
        ack = c.publish(unique("pfi"), b"\xff\xfe", qos=1, packet_id=1, props={PAYLOAD_FORMAT_INDICATOR: 1})
    except Exception:
        return
    assert ack.reason_code in (0x00, 0x10, 0x99)


# -------------------------------------------------------- maximum packet size

def test_client_maximum_packet_size_MQTT_3_1_2_25(broker_impl, raw, paho):
    # A message too large for a receiver is not sent to it (and not the next
    # ones either); other receivers get it.
    topic = unique("mps")
    small = raw(broker_impl, 5)
    small.connect(unique("mps"), props={MAXIMUM_PACKET_SIZE: 128})
    small.subscribe(topic, 1)
    big = raw(broker_impl, 5)
    big.connect(unique("mpb"))
    big.subscribe(topic, 1)
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"L" * 500, qos=1)
    pub.publish(topic, b"small", qos=1)
    p = small.recv_type("PUBLISH")
    assert p.payload == b"small"
    assert len(p.raw) <= 128
    assert [big.recv_type("PUBLISH").payload for _ in range(2)] == [b"L" * 500, b"small"]


def test_server_maximum_packet_size_is_0x95(broker_factory, raw, impl):
    if impl == "fastmqtt":
        b = broker_factory("fastmqtt", config={"max_packet_size": 1000})
    else:
        b = broker_factory("mosquitto", mosquitto_conf=["max_packet_size 1000"])
    c = raw(b, 5)
    ack = c.connect(unique("smps"))
    assert ack.properties.get(MAXIMUM_PACKET_SIZE) == 1000
    c.publish(unique("smps"), b"x" * 900, qos=1, packet_id=1)  # fits
    c.send(publish_bytes(unique("smps"), b"x" * 2000, qos=1, packet_id=2))
    got = c.expect_closed()
    assert all((p.type, p.reason_code) == ("DISCONNECT", 0x95) for p in got), got
    if impl == "fastmqtt":
        assert [p.reason_code for p in got] == [0x95]


# ----------------------------------------------------------------- DISCONNECT

def test_disconnect_cannot_set_session_expiry_from_zero_MQTT_3_14_2_2(broker_impl, raw):
    c = raw(broker_impl, 5)
    c.connect(unique("dse"))  # Session Expiry absent = 0
    c.send(disconnect_bytes(5, 0, props={SESSION_EXPIRY_INTERVAL: 60}))
    got = c.expect_closed()
    assert all((p.type, p.reason_code) == ("DISCONNECT", 0x82) for p in got), got


def test_disconnect_can_shorten_session_expiry(broker_impl, raw):
    cid = unique("dsx")
    c = raw(broker_impl, 5)
    c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 60})
    c.subscribe(unique("dsx"), 1)
    c.send(disconnect_bytes(5, 0, props={SESSION_EXPIRY_INTERVAL: 0}))
    c.expect_closed()
    c = raw(broker_impl, 5)
    assert c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 60}).session_present is False


def test_puback_reason_no_matching_subscribers(broker_impl, raw):
    c = raw(broker_impl, 5)
    c.connect(unique("nms"))
    ack = c.publish(unique("nobody/here"), b"x", qos=1, packet_id=3)
    assert ack.reason_code in (0x00, 0x10)  # 0x10 is a MAY
