"""SUBSCRIBE / UNSUBSCRIBE: SUBACK codes, wildcards, v5 subscription options,
subscription identifiers and shared subscriptions."""

from __future__ import annotations

import pytest

from fixtures_broker import Closed, ack_bytes, packet, sub_options, subscribe_bytes, unique, unsubscribe_bytes

pytestmark = pytest.mark.integration

SUBSCRIPTION_IDENTIFIER = 0x0B


def connected(raw, broker, version=5, **kw):
    c = raw(broker, version)
    assert c.connect(unique("s"), **kw).reason_code == 0
    return c


@pytest.mark.parametrize("version", [4, 5])
def test_suback_codes_in_order_MQTT_3_9_3_1(broker_impl, raw, version):
    c = connected(raw, broker_impl, version)
    base = unique("sa")
    c.send(subscribe_bytes(17, [(base + "/0", 0), (base + "/2", 2), (base + "/1", 1)], version=version))
    ack = c.recv_type("SUBACK")
    assert ack.packet_id == 17  # same id as the SUBSCRIBE [MQTT-3.8.4-2]
    assert ack.reason_codes == [0, 2, 1]  # one per filter, in order [MQTT-3.8.4-6], [MQTT-3.9.3-1]


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("flt", ["a/#/b", "a/b#", "a+/b", "#/"])
def test_invalid_filter_MQTT_4_7_1_1(broker_impl, raw, version, flt):
    check_invalid_filter(broker_impl, raw, version, flt)


# In 3.1.1 "$share/..." is an ordinary filter; only v5 gives it rules. Mosquitto
# 2.0.11 accepts "$share/g" and "$share//t", so these run on fastmqtt only.
@pytest.mark.parametrize("flt", ["$share/g", "$share//t", "$share/g+/t"])
def test_invalid_shared_filter_MQTT_4_8_2_1_and_2(shared_broker, raw, flt):
    check_invalid_filter(shared_broker, raw, 5, flt)


def check_invalid_filter(broker_impl, raw, version, flt):
    # A malformed filter [MQTT-4.7.1-1], [MQTT-4.8.2-1], [MQTT-4.8.2-2] is refused:
    # a failure SUBACK code (0x80 in 3.1.1, >= 0x80 in v5) or, as for any
    # Malformed Packet, a close (after a v5 DISCONNECT >= 0x80).
    c = connected(raw, broker_impl, version)
    c.send(subscribe_bytes(1, [(flt, 0)], version=version))
    try:
        p = c.recv(3)
    except Closed:
        return
    if p.type == "SUBACK":
        assert p.reason_codes[0] >= 0x80, p
    else:
        assert p.type == "DISCONNECT" and p.reason_code >= 0x80, p
        assert c.expect_closed() == []


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_bad_fixed_header_flags_closes_MQTT_3_8_1_1(broker_impl, raw, version):
    c = connected(raw, broker_impl, version)
    good = subscribe_bytes(1, [("x/y", 0)], version=version)
    c.send(bytes([0x80]) + good[1:])  # flags 0000 instead of 0010
    got = c.expect_closed()
    assert not any(p.type == "SUBACK" for p in got)


@pytest.mark.parametrize("version", [4, 5])
def test_subscribe_without_filters_closes_MQTT_3_8_3_2(broker_impl, raw, version):
    c = connected(raw, broker_impl, version)
    body = b"\x00\x01" + (b"\x00" if version == 5 else b"")
    c.send(packet(0x82, body))
    got = c.expect_closed()
    assert not any(p.type == "SUBACK" for p in got)


WILDCARD_CASES = [
    # filter, topic, matches
    ("{b}/+/c", "{b}/x/c", True),
    ("{b}/+/c", "{b}/x/y/c", False),
    ("{b}/#", "{b}", True),  # '#' also matches the parent level [MQTT-4.7.1-2]
    ("{b}/#", "{b}/x/y", True),
    ("{b}/+", "{b}/", True),  # empty level
    ("{b}/+/+", "{b}/x", False),
    ("{b}/x", "{b}/X", False),  # case-sensitive [MQTT-4.7.3-4]
]


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("flt,topic,match", WILDCARD_CASES)
def test_wildcards(broker_impl, raw, paho, version, flt, topic, match):
    b = unique("w")
    c = connected(raw, broker_impl, version)
    c.subscribe(flt.format(b=b), 0)
    c.subscribe(b + "-marker", 0, packet_id=2)
    pub = paho(broker_impl, 5)
    pub.publish(topic.format(b=b), b"probe", qos=1)
    # Published after the probe by the same client: receiving the marker first
    # proves the probe was not delivered.
    pub.publish(b + "-marker", b"marker", qos=1)
    got = []
    while True:
        p = c.recv_type("PUBLISH")
        if p.payload == b"marker":
            break
        got.append(p.topic)
    assert got == ([topic.format(b=b)] if match else [])


def test_wildcards_do_not_match_dollar_topics_MQTT_4_7_2_1(broker_factory, raw, impl):
    if impl == "fastmqtt":
        b = broker_factory("fastmqtt", config={"sys_interval": 1})
    else:
        b = broker_factory("mosquitto", mosquitto_conf=["sys_interval 1"])
    wild = []
    for flt in ("#", "+/broker/uptime", "+/#"):
        c = connected(raw, b, 5)
        c.subscribe(flt, 0)
        wild.append(c)
    probe = connected(raw, b, 5)
    probe.subscribe("$SYS/broker/uptime", 0)
    # Wait for a periodic publication that happened after the wildcard
    # subscriptions (a retained copy may come first): the wildcard subscribers
    # would have got it too if '#'/'+' matched '$' topics.
    while probe.recv_type("PUBLISH", timeout=5).retain:
        pass
    for c in wild:
        while True:
            try:
                p = c.recv(0.2)
            except TimeoutError:
                break
            assert not p.topic.startswith("$"), p


@pytest.mark.parametrize("version", [4, 5])
def test_resubscribe_replaces_MQTT_3_8_4_3(broker_impl, raw, paho, version):
    # A second SUBSCRIBE to the same filter replaces the first: new QoS, and no
    # duplicate deliveries.
    topic = unique("re")
    c = connected(raw, broker_impl, version)
    assert c.subscribe(topic, 0).reason_codes == [0]
    assert c.subscribe(topic, 1, packet_id=2).reason_codes == [1]
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"x", qos=1)
    p = c.recv_type("PUBLISH")
    assert p.qos == 1
    c.send(ack_bytes("PUBACK", p.packet_id))
    c.expect_silence(0.5)


@pytest.mark.parametrize("version", [4, 5])
def test_unsubscribe_stops_delivery(broker_impl, raw, paho, version):
    topic = unique("uns")
    c = connected(raw, broker_impl, version)
    c.subscribe(topic, 0)
    c.send(unsubscribe_bytes(9, [topic, topic + "/never"], version=version))
    ack = c.recv_type("UNSUBACK")
    assert ack.packet_id == 9  # [MQTT-3.10.4-4]
    if version == 5:
        # One reason code per filter: success, then "no subscription existed".
        assert ack.reason_codes == [0x00, 0x11]
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"x", qos=1)
    c.expect_silence(0.5)


def test_v5_no_local_MQTT_3_8_3_3(broker_impl, raw):
    topic = unique("nl")
    c = connected(raw, broker_impl, 5)
    c.subscribe(topic, options=sub_options(1, no_local=True))
    c.subscribe(topic + "/ctl", 0, packet_id=2)
    c.publish(topic, b"own", qos=1, packet_id=1)
    c.publish(topic + "/ctl", b"marker", qos=0)
    p = c.recv_type("PUBLISH")
    assert p.payload == b"marker", p  # the own message was not sent back


def test_v5_local_delivery_without_no_local(broker_impl, raw):
    topic = unique("l")
    c = connected(raw, broker_impl, 5)
    c.subscribe(topic, 0)
    c.publish(topic, b"own", qos=0)
    assert c.recv_type("PUBLISH").payload == b"own"


@pytest.mark.parametrize("rap", [False, True])
def test_v5_retain_as_published_MQTT_3_3_1_12_13(broker_impl, raw, paho, rap):
    topic = unique("rap")
    c = connected(raw, broker_impl, 5)
    c.subscribe(topic, options=sub_options(0, rap=rap))
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"live", qos=1, retain=True)
    p = c.recv_type("PUBLISH")
    assert p.retain is rap
    pub.publish(topic, b"", qos=1, retain=True)  # clean up the retained message


@pytest.mark.parametrize("rh,expect", [(0, [True, True]), (1, [True, False]), (2, [False, False])])
def test_v5_retain_handling_MQTT_3_3_1_9_10_11(broker_impl, raw, paho, rh, expect):
    # 0: send retained at every subscribe; 1: only if the subscription is new;
    # 2: never.
    topic = unique("rh")
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"kept", qos=1, retain=True)
    c = connected(raw, broker_impl, 5)
    seen = []
    for pid in (1, 2):
        c.send(subscribe_bytes(pid, [(topic, sub_options(1, rh=rh))]))
        c.recv_type("SUBACK")
        c.send(b"\xc0\x00")  # PINGRESP comes after any retained PUBLISH
        p = c.recv()
        if p.type == "PUBLISH":
            assert (p.payload, p.retain) == (b"kept", True)
            c.send(ack_bytes("PUBACK", p.packet_id))
            seen.append(True)
            assert c.recv().type == "PINGRESP"
        else:
            assert p.type == "PINGRESP"
            seen.append(False)
    assert seen == expect
    pub.publish(topic, b"", qos=1, retain=True)


def test_v5_retain_handling_3_is_malformed(broker_impl, raw):
    c = connected(raw, broker_impl, 5)
    c.send(subscribe_bytes(1, [(unique("rh3"), 0x30)]))
    got = c.expect_closed()
    assert not any(p.type == "SUBACK" and p.reason_codes[0] < 0x80 for p in got)


def test_v5_subscription_identifier_in_publish_MQTT_3_3_4_3(broker_impl, raw, paho):
    topic = unique("sid")
    c = connected(raw, broker_impl, 5)
    c.subscribe(topic + "/#", 1, props={SUBSCRIPTION_IDENTIFIER: 42})
    pub = paho(broker_impl, 5)
    pub.publish(topic + "/a", b"x", qos=1)
    p = c.recv_type("PUBLISH")
    assert p.properties.get(SUBSCRIPTION_IDENTIFIER) == [42]


def test_v5_subscription_identifier_on_retained(broker_impl, raw, paho):
    topic = unique("sidr")
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"r", qos=1, retain=True)
    c = connected(raw, broker_impl, 5)
    c.subscribe(topic, 0, props={SUBSCRIPTION_IDENTIFIER: 7})
    p = c.recv_type("PUBLISH")
    assert (p.payload, p.retain, p.properties.get(SUBSCRIPTION_IDENTIFIER)) == (b"r", True, [7])
    pub.publish(topic, b"", qos=1, retain=True)


def test_v5_no_subscription_identifier_when_not_subscribed_with_one(broker_impl, raw, paho):
    topic = unique("nosid")
    c = connected(raw, broker_impl, 5)
    c.subscribe(topic, 0)
    paho(broker_impl, 5).publish(topic, b"x", qos=1)
    assert SUBSCRIPTION_IDENTIFIER not in c.recv_type("PUBLISH").properties


def test_v5_subscription_identifier_zero_is_protocol_error(broker_impl, raw):
    c = connected(raw, broker_impl, 5)
    c.send(subscribe_bytes(1, [(unique("sid0"), 0)], props={SUBSCRIPTION_IDENTIFIER: 0}))
    got = c.expect_closed()
    assert not any(p.type == "SUBACK" and p.reason_codes[0] < 0x80 for p in got)


@pytest.mark.parametrize("version", [4, 5])
def test_shared_subscription_each_message_to_one_member_MQTT_4_8_2_1(broker_impl, raw, paho, version):
    topic = unique("sh")
    group = unique("g").replace("-", "")
    members = [connected(raw, broker_impl, version) for _ in range(3)]
    for m in members:
        assert m.subscribe(f"$share/{group}/{topic}", 1).reason_codes == [1]
    plain = connected(raw, broker_impl, version)
    plain.subscribe(topic, 1)
    pub = paho(broker_impl, 5)
    n = 30
    for i in range(n):
        pub.publish(topic, str(i).encode(), qos=1)
    got_plain = []
    for _ in range(n):
        p = plain.recv_type("PUBLISH")
        plain.send(ack_bytes("PUBACK", p.packet_id))
        got_plain.append(int(p.payload))
    assert got_plain == list(range(n))  # non-shared subscriber gets every message
    got = []
    # Every message was routed before the plain copy of the last one arrived
    # (same publisher, same topic); collect what the members hold.
    for m in members:
        while True:
            try:
                p = m.recv_type("PUBLISH", timeout=0.3 if len(got) < n else 0.1)
            except TimeoutError:
                break
            assert p.topic == topic  # delivered under the real topic name
            m.send(ack_bytes("PUBACK", p.packet_id))
            got.append(int(p.payload))
    assert sorted(got) == list(range(n))  # each exactly once across the group


def test_shared_subscription_gets_no_retained_on_subscribe(shared_broker, raw, paho):
    # "Retained messages are not sent to the Session when it first subscribes
    # to a Shared Subscription" (v5 4.8.2). Mosquitto 2.0.11 sends them, so this
    # runs on fastmqtt only.
    broker_impl = shared_broker
    topic = unique("shr")
    group = unique("g").replace("-", "")
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"kept", qos=1, retain=True)
    c = connected(raw, broker_impl, 5)
    c.subscribe(f"$share/{group}/{topic}", 1)
    c.send(b"\xc0\x00")
    assert c.recv().type == "PINGRESP"  # nothing before it
    pub.publish(topic, b"", qos=1, retain=True)
