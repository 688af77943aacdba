"""Retained messages: store, replace, delete, wildcard lookup, QoS, flags, expiry,
and survival across a broker restart."""

from __future__ import annotations

import time

import pytest

from fixtures_broker import ack_bytes, publish_bytes, unique

pytestmark = pytest.mark.integration

MESSAGE_EXPIRY_INTERVAL = 0x02


def retained_after_subscribe(raw, broker, flt, version=5, qos=1):
    """Subscribe a fresh client and return the retained PUBLISHes sent for it
    (a PINGRESP marks the end: it is queued after them)."""
    c = raw(broker, version)
    c.connect(unique("r"))
    c.subscribe(flt, qos)
    c.send(b"\xc0\x00")
    got = []
    while True:
        p = c.recv()
        if p.type == "PINGRESP":
            return got
        assert p.type == "PUBLISH", p
        if p.qos == 1:
            c.send(ack_bytes("PUBACK", p.packet_id))
        elif p.qos == 2:
            c.send(ack_bytes("PUBREC", p.packet_id))
        got.append(p)


@pytest.mark.parametrize("version", [4, 5])
def test_store_replace_delete_MQTT_3_3_1_5_6(broker_impl, raw, paho, version):
    topic = unique("ret")
    pub = paho(broker_impl, version)
    pub.publish(topic, b"v1", qos=1, retain=True)
    got = retained_after_subscribe(raw, broker_impl, topic, version)
    # Delivered because of a new subscription: RETAIN flag 1 [MQTT-3.3.1-8 (3.1.1)].
    assert [(p.topic, p.payload, p.retain) for p in got] == [(topic, b"v1", True)]
    pub.publish(topic, b"v2", qos=1, retain=True)  # replaces [MQTT-3.3.1-5]
    assert [p.payload for p in retained_after_subscribe(raw, broker_impl, topic, version)] == [b"v2"]
    pub.publish(topic, b"", qos=1, retain=True)  # zero bytes deletes [MQTT-3.3.1-6 (v5) / -10 (3.1.1)]
    assert retained_after_subscribe(raw, broker_impl, topic, version) == []


@pytest.mark.parametrize("version", [4, 5])
def test_live_delivery_clears_retain_flag_MQTT_3_3_1_9(broker_impl, raw, paho, version):
    # 3.1.1: an established subscription gets RETAIN 0 [MQTT-3.3.1-9]; v5 does the
    # same unless Retain As Published is set [MQTT-3.3.1-12].
    topic = unique("live")
    c = raw(broker_impl, version)
    c.connect(unique("live"))
    c.subscribe(topic, 0)
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"x", qos=1, retain=True)
    p = c.recv_type("PUBLISH")
    assert (p.payload, p.retain) == (b"x", False)
    pub.publish(topic, b"", qos=1, retain=True)
    # The zero-byte retained PUBLISH still goes to current subscribers [MQTT-3.3.1-7 (3.1.1)].
    assert c.recv_type("PUBLISH").payload == b""


def test_wildcard_subscription_gets_all_matching(broker_impl, raw, paho):
    base = unique("rw")
    pub = paho(broker_impl, 5)
    topics = [f"{base}/a", f"{base}/b/c", f"{base}/b/d", f"{base}x/e"]
    for t in topics:
        pub.publish(t, t.encode(), qos=1, retain=True)
    got = sorted(p.topic for p in retained_after_subscribe(raw, broker_impl, base + "/#"))
    assert got == topics[:3]
    got = sorted(p.topic for p in retained_after_subscribe(raw, broker_impl, base + "/+/d"))
    assert got == [f"{base}/b/d"]
    for t in topics:
        pub.publish(t, b"", qos=1, retain=True)


@pytest.mark.parametrize("pub_qos,sub_qos", [(2, 1), (1, 0), (0, 2), (2, 2)])
def test_retained_qos_is_minimum(broker_impl, raw, paho, pub_qos, sub_qos):
    topic = unique("rq")
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"q", qos=pub_qos, retain=True)
    got = retained_after_subscribe(raw, broker_impl, topic, qos=sub_qos)
    assert [p.qos for p in got] == [min(pub_qos, sub_qos)]
    pub.publish(topic, b"", qos=1, retain=True)


def test_retained_qos0_is_stored(broker_impl, raw, paho):
    # A QoS 0 retained message replaces the retained one too [MQTT-3.3.1-5].
    topic = unique("r0")
    pub = paho(broker_impl, 4)
    pub.publish(topic, b"first", qos=1, retain=True)
    pub.publish(topic, b"second", qos=0, retain=True)
    pub.publish(unique("sync"), b"", qos=1)  # a round trip after the QoS 0 one
    assert [p.payload for p in retained_after_subscribe(raw, broker_impl, topic)] == [b"second"]
    pub.publish(topic, b"", qos=1, retain=True)


def test_v5_retained_message_expiry_MQTT_3_3_2_5(broker_impl, raw, paho):
    topic = unique("rexp")
    pub = paho(broker_impl, 5)
    pub.publish(topic + "/short", b"s", qos=1, retain=True, MessageExpiryInterval=1)
    pub.publish(topic + "/long", b"l", qos=1, retain=True, MessageExpiryInterval=100)
    time.sleep(2.1)  # the behaviour under test is the passage of time itself
    got = retained_after_subscribe(raw, broker_impl, topic + "/#")
    assert [p.topic for p in got] == [topic + "/long"]
    # The interval sent on is what is left of it [MQTT-3.3.2-6].
    assert 90 <= got[0].properties[MESSAGE_EXPIRY_INTERVAL] <= 98
    pub.publish(topic + "/long", b"", qos=1, retain=True)


def test_retained_survives_restart(broker_factory, raw, paho, impl):
    b = broker_factory(impl, persistence=True) if impl == "mosquitto" else broker_factory(impl)
    topic = unique("rrst")
    pub = paho(b, 5)
    pub.publish(topic, b"durable", qos=1, retain=True)
    pub.close()
    assert b.stop() == 0
    b.start()
    assert [p.payload for p in retained_after_subscribe(raw, b, topic)] == [b"durable"]


def test_acked_retained_survives_sigkill(broker_factory, raw, paho):
    # fastmqtt acknowledges only what is durable: a retained QoS 1 message that
    # got its PUBACK is there after SIGKILL (issue 5: "lose no acknowledged message").
    b = broker_factory("fastmqtt")
    topic = unique("rkill")
    c = raw(b, 5)
    c.connect(unique("rk"))
    assert c.publish(topic, b"acked", qos=1, packet_id=1, retain=True).type == "PUBACK"
    b.kill()
    b.start()
    assert [p.payload for p in retained_after_subscribe(raw, b, topic)] == [b"acked"]


def test_many_retained_topics(broker_impl, raw, paho):
    base = unique("rmany")
    c = raw(broker_impl, 5)
    c.connect(unique("rm"))
    n = 300

    def publish_all(payload_of):
        # Pipelined: all PUBLISHes first, then the PUBACKs.
        c.send(b"".join(publish_bytes(f"{base}/{i}", payload_of(i), qos=1, packet_id=1 + i, retain=True)
                        for i in range(n)))
        assert sorted(c.recv_type("PUBACK").packet_id for _ in range(n)) == list(range(1, n + 1))

    publish_all(lambda i: str(i).encode())
    got = retained_after_subscribe(raw, broker_impl, base + "/+", qos=0)
    assert sorted(int(p.payload) for p in got) == list(range(n))
    publish_all(lambda i: b"")
    assert retained_after_subscribe(raw, broker_impl, base + "/+", qos=0) == []
