"""PUBLISH end to end: QoS 0/1/2 flows, exactly-once, offline queues, resend, ordering."""

from __future__ import annotations

import pytest

from fixtures_broker import ack_bytes, mosquitto_pub, publish_bytes, unique

pytestmark = pytest.mark.integration

SESSION_EXPIRY_INTERVAL = 0x11


def persistent(version):
    """CONNECT keyword arguments for a session that outlives the connection."""
    return {"clean": False, "props": {SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None}


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_to_mosquitto_sub(broker_impl, mosquitto_sub, version, qos):
    topic = unique("cli") + "/t"
    sub = mosquitto_sub(broker_impl, topic, count=1, qos=qos, version=version)
    sub.wait_subscribed()
    res = mosquitto_pub(broker_impl, topic, "payload-ü", qos=qos, version=version)
    assert res.returncode == 0, res.stderr
    msgs = sub.wait()
    assert [(m.topic, m.payload, m.qos) for m in msgs] == [(topic, "payload-ü".encode(), qos)]


@pytest.mark.parametrize("pub_version,sub_version", [(4, 5), (5, 4), (5, 5), (4, 4)])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_both_ways(broker_impl, paho, pub_version, sub_version, qos):
    topic = unique("paho") + "/t"
    sub = paho(broker_impl, sub_version)
    assert sub.subscribe(topic, qos) == [qos]
    pub = paho(broker_impl, pub_version)
    pub.publish(topic, b"\x00\x01binary\xff", qos=qos)
    m = sub.get()
    assert (m.topic, m.payload, m.qos, m.retain) == (topic, b"\x00\x01binary\xff", qos, False)


@pytest.mark.parametrize("pub_qos,sub_qos", [(2, 1), (2, 0), (1, 0), (0, 2), (1, 2)])
def test_delivered_qos_is_minimum_MQTT_3_8_4_8(broker_impl, paho, pub_qos, sub_qos):
    topic = unique("minqos")
    sub = paho(broker_impl, 5)
    sub.subscribe(topic, sub_qos)
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"x", qos=pub_qos)
    assert sub.get().qos == min(pub_qos, sub_qos)


@pytest.mark.parametrize("version", [4, 5])
def test_qos1_puback_echoes_packet_id_MQTT_4_3_2_2(broker_impl, raw, version):
    c = raw(broker_impl, version)
    c.connect(unique("pa"))
    ack = c.publish(unique("pa/t"), b"x", qos=1, packet_id=4242)
    assert ack.packet_id == 4242
    if version == 5:
        assert ack.reason_code in (0x00, 0x10)  # 0x10: no matching subscribers (MAY)


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_exactly_once_with_dup_before_pubrel_MQTT_4_3_3_10(broker_impl, raw, version):
    # Until PUBREL, a repeated PUBLISH with the same id is acknowledged with PUBREC
    # again and MUST NOT be delivered again [MQTT-4.3.3-10 (v5) / MQTT-4.3.3-2 (3.1.1)].
    topic = unique("eo")
    sub = raw(broker_impl, version)
    sub.connect(unique("eos"))
    sub.subscribe(topic, 2)
    pub = raw(broker_impl, version)
    pub.connect(unique("eop"))
    pub.send(publish_bytes(topic, b"once", qos=2, packet_id=7, version=version))
    assert pub.recv_type("PUBREC").packet_id == 7
    pub.send(publish_bytes(topic, b"once", qos=2, packet_id=7, dup=True, version=version))
    assert pub.recv_type("PUBREC").packet_id == 7
    pub.send(ack_bytes("PUBREL", 7))
    assert pub.recv_type("PUBCOMP").packet_id == 7
    p = sub.recv_type("PUBLISH")
    assert (p.topic, p.payload, p.qos) == (topic, b"once", 2)
    sub.send(ack_bytes("PUBREC", p.packet_id))
    assert sub.recv_type("PUBREL").packet_id == p.packet_id
    sub.send(ack_bytes("PUBCOMP", p.packet_id))
    sub.expect_silence(0.5)
    # After PUBCOMP the id is free again: the same id now carries a new message.
    pub.publish(topic, b"again", qos=2, packet_id=7)
    assert sub.recv_type("PUBLISH").payload == b"again"


def test_v5_pubrel_unknown_id_gets_pubcomp_MQTT_4_3_3_11(broker_impl, raw):
    c = raw(broker_impl, 5)
    c.connect(unique("rel"))
    c.send(ack_bytes("PUBREL", 999))
    comp = c.recv_type("PUBCOMP")
    assert comp.packet_id == 999
    # 0x92 "Packet Identifier not found" says what happened; Mosquitto 2.0.11
    # answers 0x00, which the spec does not forbid.
    assert comp.reason_code in (0x00, 0x92)
    assert c.ping().type == "PINGRESP"  # not a reason to close


@pytest.mark.parametrize("version", [4, 5])
def test_offline_queue_keeps_qos1_and_qos2_not_qos0(broker_impl, raw, paho, version):
    cid = unique("offq")
    topic = unique("offq/t")
    c = raw(broker_impl, version)
    c.connect(cid, **persistent(version))
    c.subscribe(topic, 2)
    c.disconnect()
    pub = paho(broker_impl, 5)
    for i, qos in enumerate([0, 1, 2, 0, 1, 2]):
        pub.publish(topic, f"m{i}-q{qos}".encode(), qos=qos)
    c = raw(broker_impl, version)
    ack = c.connect(cid, **persistent(version))
    assert ack.session_present is True
    got = []
    for _ in range(4):
        p = c.recv_type("PUBLISH")
        got.append((p.payload, p.qos))
        if p.qos == 1:
            c.send(ack_bytes("PUBACK", p.packet_id))
        else:
            c.send(ack_bytes("PUBREC", p.packet_id))
            assert c.recv_type("PUBREL").packet_id == p.packet_id
            c.send(ack_bytes("PUBCOMP", p.packet_id))
    # QoS 0 is not queued for an offline session (Mosquitto's default too), the
    # others arrive in publish order [MQTT-4.6.0-5].
    assert got == [(b"m1-q1", 1), (b"m2-q2", 2), (b"m4-q1", 1), (b"m5-q2", 2)]
    c.expect_silence(0.5)


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_qos1_resent_with_dup_on_reconnect_MQTT_4_4_0_1(broker_impl, raw, paho, version):
    cid = unique("dup")
    topic = unique("dup/t")
    c = raw(broker_impl, version)
    c.connect(cid, **persistent(version))
    c.subscribe(topic, 1)
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"unacked", qos=1)
    first = c.recv_type("PUBLISH")
    assert first.dup is False  # first delivery [MQTT-3.3.1-3]
    c.close()  # no PUBACK, no DISCONNECT
    c = raw(broker_impl, version)
    assert c.connect(cid, **persistent(version)).session_present is True
    again = c.recv_type("PUBLISH")
    # Same packet id, DUP set [MQTT-4.4.0-1], [MQTT-3.3.1-1].
    assert (again.payload, again.packet_id, again.dup, again.qos) == (b"unacked", first.packet_id, True, 1)
    c.send(ack_bytes("PUBACK", again.packet_id))
    c.expect_silence(0.5)


@pytest.mark.parametrize("version", [4, 5])
def test_pubrel_resent_on_reconnect_MQTT_4_4_0_1(broker_impl, raw, paho, version):
    cid = unique("rel")
    topic = unique("rel/t")
    c = raw(broker_impl, version)
    c.connect(cid, **persistent(version))
    c.subscribe(topic, 2)
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"q2", qos=2)
    p = c.recv_type("PUBLISH")
    c.send(ack_bytes("PUBREC", p.packet_id))
    assert c.recv_type("PUBREL").packet_id == p.packet_id
    c.close()  # PUBCOMP never sent
    c = raw(broker_impl, version)
    assert c.connect(cid, **persistent(version)).session_present is True
    rel = c.recv()
    # The message is not re-sent; the PUBREL is, with the same id.
    assert (rel.type, rel.packet_id) == ("PUBREL", p.packet_id)
    c.send(ack_bytes("PUBCOMP", p.packet_id))
    c.expect_silence(0.5)


@pytest.mark.parametrize("version", [4, 5])
def test_incoming_qos2_state_survives_reconnect(broker_impl, raw, version):
    # The server keeps "PUBREC sent" across a reconnect of a persistent session:
    # the re-sent PUBLISH (DUP) is not delivered twice [MQTT-4.3.3-10].
    cid = unique("in2")
    topic = unique("in2/t")
    sub = raw(broker_impl, version)
    sub.connect(unique("in2s"))
    sub.subscribe(topic, 0)
    c = raw(broker_impl, version)
    c.connect(cid, **persistent(version))
    c.send(publish_bytes(topic, b"x", qos=2, packet_id=11, version=version))
    assert c.recv_type("PUBREC").packet_id == 11
    c.close()
    c = raw(broker_impl, version)
    assert c.connect(cid, **persistent(version)).session_present is True
    c.send(publish_bytes(topic, b"x", qos=2, packet_id=11, dup=True, version=version))
    assert c.recv_type("PUBREC").packet_id == 11
    c.send(ack_bytes("PUBREL", 11))
    assert c.recv_type("PUBCOMP").packet_id == 11
    assert sub.recv_type("PUBLISH").payload == b"x"
    sub.expect_silence(0.5)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_ordering_from_one_publisher_MQTT_4_6_0_5(broker_impl, paho, qos):
    topic = unique("order")
    sub = paho(broker_impl, 5)
    sub.subscribe(topic, qos)
    pub = paho(broker_impl, 5)
    n = 200
    infos = [pub.publish(topic, str(i).encode(), qos=qos, wait=False) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    got = [int(m.payload) for m in sub.get_n(n, timeout=15)]
    assert got == list(range(n))


@pytest.mark.parametrize("version", [4, 5])
def test_empty_and_large_payloads(broker_impl, paho, version):
    topic = unique("size")
    sub = paho(broker_impl, version)
    sub.subscribe(topic, 1)
    pub = paho(broker_impl, version)
    big = bytes(range(256)) * 4096  # 1 MiB
    pub.publish(topic, b"", qos=1)
    pub.publish(topic, big, qos=1, timeout=15)
    assert sub.get().payload == b""
    assert sub.get(timeout=15).payload == big


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("topic", ["a/+/c", "a/#", "+"])
def test_wildcard_in_topic_name_closes_MQTT_3_3_2_2(broker_impl, raw, version, topic):
    c = raw(broker_impl, version)
    c.connect(unique("wild"))
    c.send(publish_bytes(topic, b"x", version=version))
    got = c.expect_closed()
    assert all(p.type == "DISCONNECT" and p.reason_code >= 0x80 for p in got), got


@pytest.mark.parametrize("version", [4, 5])
def test_qos3_publish_closes_MQTT_3_3_1_4(broker_impl, raw, version):
    c = raw(broker_impl, version)
    c.connect(unique("q3"))
    c.send(publish_bytes("q3/t", b"x", qos=3, packet_id=1, version=version))
    got = c.expect_closed()
    assert all(p.type == "DISCONNECT" and p.reason_code >= 0x80 for p in got), got


@pytest.mark.parametrize("version", [4, 5])
def test_qos1_packet_id_zero_closes_MQTT_2_2_1_3(broker_impl, raw, version):
    c = raw(broker_impl, version)
    c.connect(unique("pid0"))
    c.send(publish_bytes("pid0/t", b"x", qos=1, packet_id=0, version=version))
    got = c.expect_closed()
    assert all(p.type == "DISCONNECT" and p.reason_code >= 0x80 for p in got), got


def test_publish_to_many_subscribers(broker_impl, raw, paho):
    topic = unique("many")
    subs = []
    for i in range(20):
        s = raw(broker_impl, 5 if i % 2 else 4)
        s.connect(unique("many"))
        s.subscribe(topic, 1)
        subs.append(s)
    pub = paho(broker_impl, 5)
    pub.publish(topic, b"all", qos=1)
    for s in subs:
        p = s.recv_type("PUBLISH")
        assert (p.topic, p.payload, p.qos) == (topic, b"all", 1)


@pytest.mark.parametrize("version", [4, 5])
def test_mosquitto_sub_persistent_session_gets_offline_messages(broker_impl, mosquitto_sub, version):
    # mosquitto_sub -c -i ID (v5: -x session expiry) subscribes, exits; QoS 1
    # messages published meanwhile arrive when it comes back.
    topic = unique("cliq") + "/t"
    cid = unique("cliq")
    extra = ["-c", "-i", cid] + (["-x", "300"] if version == 5 else [])
    first = mosquitto_sub(broker_impl, topic, count=1, qos=1, version=version, timeout=10, extra=extra)
    first.wait_subscribed()
    assert mosquitto_pub(broker_impl, topic, "online", qos=1, version=version).returncode == 0
    assert [m.payload for m in first.wait()] == [b"online"]
    for i in range(3):
        assert mosquitto_pub(broker_impl, topic, f"offline-{i}", qos=1, version=version).returncode == 0
    again = mosquitto_sub(broker_impl, topic, count=3, qos=1, version=version, timeout=10, extra=extra)
    assert [m.payload for m in again.wait()] == [b"offline-0", b"offline-1", b"offline-2"]


@pytest.mark.parametrize("qos", [1, 2])
def test_mqtt31_publish_flow(broker_impl, raw, qos):
    # Protocol level 3 (MQTT 3.1, "MQIsdp") clients still work end to end.
    topic = unique("v31")
    sub = raw(broker_impl, 3)
    assert sub.connect(unique("v31s")).reason_code == 0
    assert sub.subscribe(topic, qos).reason_codes == [qos]
    pub = raw(broker_impl, 3)
    pub.connect(unique("v31p"))
    pub.publish(topic, b"old but gold", qos=qos, packet_id=5)
    p = sub.recv_type("PUBLISH")
    assert (p.payload, p.qos) == (b"old but gold", qos)
