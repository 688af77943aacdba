"""Lose no acknowledged message: what the broker acknowledged is still there after
a crash (SIGKILL) and a restart on the same data directory.

fastmqtt's default durability is ``sync``: PUBACK/PUBREC go out only after the
store committed (fsync). Mosquitto is not compared here: it saves its database
only periodically and on clean exit, by design.
"""

from __future__ import annotations

import pytest

from fixtures_broker import ack_bytes, publish_bytes, unique

pytestmark = pytest.mark.integration

SESSION_EXPIRY_INTERVAL = 0x11


def persistent(version):
    return {"clean": False, "props": {SESSION_EXPIRY_INTERVAL: 3600} if version == 5 else None}


def reconnect(raw, broker, cid, version):
    c = raw(broker, version)
    ack = c.connect(cid, **persistent(version))
    assert ack.session_present is True, "the session did not survive"
    return c


@pytest.mark.parametrize("durability", ["sync", "batch"])
@pytest.mark.parametrize("version", [4, 5])
def test_acked_messages_for_offline_session_survive_sigkill(broker_factory, raw, version, durability):
    b = broker_factory("fastmqtt", args=["--durability", durability])
    cid, topic = unique("dur"), unique("dur")
    c = raw(b, version)
    c.connect(cid, **persistent(version))
    c.subscribe(topic, 2)
    c.disconnect()
    pub = raw(b, 5)
    pub.connect(unique("durp"))
    for i in range(10):
        pub.publish(topic, f"q1-{i}".encode(), qos=1, packet_id=1 + i)  # returns after PUBACK
    pub.publish(topic, b"q2", qos=2, packet_id=100)  # after PUBREC/PUBREL/PUBCOMP
    b.kill()
    b.start()
    c = reconnect(raw, b, cid, version)
    got = []
    for _ in range(11):
        p = c.recv_type("PUBLISH")
        got.append(p.payload)
        if p.qos == 1:
            c.send(ack_bytes("PUBACK", p.packet_id))
        else:
            c.send(ack_bytes("PUBREC", p.packet_id))
            assert c.recv_type("PUBREL").packet_id == p.packet_id
            c.send(ack_bytes("PUBCOMP", p.packet_id))
    assert got == [f"q1-{i}".encode() for i in range(10)] + [b"q2"]
    c.expect_silence(0.3)


@pytest.mark.parametrize("version", [4, 5])
def test_subscriptions_survive_sigkill(broker_factory, raw, version):
    # A SUBACK is an acknowledgement too: a message published (and PUBACKed)
    # after it must reach the subscriber even across a crash, so the session
    # and subscription must be durable before SUBACK goes out.
    b = broker_factory("fastmqtt")
    cid, topic = unique("dsub"), unique("dsub")
    c = raw(b, version)
    c.connect(cid, **persistent(version))
    c.subscribe(topic + "/#", 1)
    b.kill()
    b.start()
    c = reconnect(raw, b, cid, version)
    pub = raw(b, 5)
    pub.connect(unique("dsubp"))
    pub.publish(topic + "/x", b"after restart", qos=1, packet_id=1)
    assert c.recv_type("PUBLISH").payload == b"after restart"


def test_inflight_message_redelivered_with_dup_after_sigkill_MQTT_4_4_0_1(broker_factory, raw):
    b = broker_factory("fastmqtt")
    cid, topic = unique("dinf"), unique("dinf")
    c = raw(b, 5)
    c.connect(cid, **persistent(5))
    c.subscribe(topic, 1)
    pub = raw(b, 5)
    pub.connect(unique("dinfp"))
    pub.publish(topic, b"unacked", qos=1, packet_id=1)
    first = c.recv_type("PUBLISH")  # never acknowledged
    b.kill()
    b.start()
    c = reconnect(raw, b, cid, 5)
    again = c.recv_type("PUBLISH")
    assert (again.payload, again.dup, again.packet_id) == (b"unacked", True, first.packet_id)
    c.send(ack_bytes("PUBACK", again.packet_id))
    c.expect_silence(0.3)


def test_incoming_qos2_survives_sigkill_without_duplicate(broker_factory, raw):
    # PUBREC sent means "I own it": after a crash, the re-sent PUBLISH (DUP) is
    # recognised and the message is delivered once [MQTT-4.3.3-10].
    b = broker_factory("fastmqtt")
    cid, topic = unique("dq2"), unique("dq2")
    watcher_id = unique("dq2w")
    w = raw(b, 5)
    w.connect(watcher_id, **persistent(5))
    w.subscribe(topic, 1)
    c = raw(b, 5)
    c.connect(cid, **persistent(5))
    c.send(publish_bytes(topic, b"exactly once", qos=2, packet_id=9))
    assert c.recv_type("PUBREC").packet_id == 9
    b.kill()
    b.start()
    c = reconnect(raw, b, cid, 5)
    c.send(publish_bytes(topic, b"exactly once", qos=2, packet_id=9, dup=True))
    assert c.recv_type("PUBREC").packet_id == 9
    c.send(ack_bytes("PUBREL", 9))
    assert c.recv_type("PUBCOMP").packet_id == 9
    w = reconnect(raw, b, watcher_id, 5)
    got = []
    while True:
        try:
            p = w.recv_type("PUBLISH", timeout=0.7)
        except TimeoutError:
            break
        w.send(ack_bytes("PUBACK", p.packet_id))
        got.append(p.payload)
    assert got == [b"exactly once"]


def test_graceful_restart_keeps_everything(broker, raw):
    cid, topic = unique("grs"), unique("grs")
    c = raw(broker, 4)
    c.connect(cid, **persistent(4))
    c.subscribe(topic, 1)
    c.disconnect()
    pub = raw(broker, 4)
    pub.connect(unique("grsp"))
    pub.publish(topic, b"kept", qos=1, packet_id=1)
    pub.publish(topic + "/r", b"retained", qos=1, packet_id=2, retain=True)
    assert broker.stop() == 0
    broker.start()
    c = reconnect(raw, broker, cid, 4)
    assert c.recv_type("PUBLISH").payload == b"kept"
    r = raw(broker, 4)
    r.connect(unique("grsr"))
    r.subscribe(topic + "/r", 0)
    assert r.recv_type("PUBLISH").payload == b"retained"



def test_queued_copy_keeps_retain_flag_and_subscription_id_across_sigkill(broker_factory, raw):
    # A v5 subscription with a subscription identifier and Retain As
    # Published: the copy queued for the offline session must, after a crash,
    # still carry the identifier [MQTT-3.3.4-3] and the RETAIN flag as
    # published [MQTT-3.3.1-12].
    b = broker_factory("fastmqtt")
    cid, topic = unique("drap"), unique("drap")
    c = raw(b, 5)
    c.connect(cid, **persistent(5))
    c.subscribe(topic, options=0x01 | 0x08, props={0x0B: 77})  # QoS 1, retain as published
    c.disconnect()
    pub = raw(b, 5)
    pub.connect(unique("drapp"))
    pub.publish(topic, b"kept", qos=1, packet_id=1, retain=True)  # returns after PUBACK
    pub.publish(topic, b"plain", qos=1, packet_id=2)
    b.kill()
    b.start()
    c = reconnect(raw, b, cid, 5)
    got = []
    for _ in range(2):
        p = c.recv_type("PUBLISH")
        got.append((p.payload, p.retain, p.properties.get(0x0B)))
        c.send(ack_bytes("PUBACK", p.packet_id))
    assert got == [(b"kept", True, [77]), (b"plain", False, [77])]
