"""CONNECT / CONNACK against a real broker process (fastmqtt and Mosquitto).

Behaviour that both brokers must share runs against both (``broker_impl``);
the rest runs against fastmqtt only.
"""

from __future__ import annotations

import pytest

from fixtures_broker import (
    PINGREQ, connect_bytes, packet, publish_bytes, unique,
)

pytestmark = pytest.mark.integration

ASSIGNED_CLIENT_IDENTIFIER = 0x12
SERVER_KEEP_ALIVE = 0x13
SESSION_EXPIRY_INTERVAL = 0x11
CONNACK_ALLOWED = {0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26,
                   0x27, 0x28, 0x29, 0x2A}


@pytest.mark.parametrize("version", [3, 4, 5])
def test_connect_each_protocol_level_MQTT_3_2_2_2(broker_impl, raw, version):
    # A clean start always gets Session Present 0 [MQTT-3.2.2-2] and a success code.
    c = raw(broker_impl, version)
    ack = c.connect(unique("lvl"))
    assert ack.reason_code == 0
    assert ack.session_present is False
    assert ack.raw[0] == 0x20  # CONNACK fixed header flags are reserved 0 [MQTT-2.1.3-1]
    assert c.ping().type == "PINGRESP"


@pytest.mark.parametrize("version", [4, 5])
def test_connect_paho(broker_impl, paho, version):
    c = paho(broker_impl, version, client_id=unique("paho"))
    assert c.connack[1].value == 0
    assert c.session_present is False


def test_connack_v5_properties_are_connack_properties(broker_impl, raw):
    # Every property the server sends must be one CONNACK may carry (3.2.2.3).
    c = raw(broker_impl, 5)
    ack = c.connect(unique("props"))
    assert set(ack.properties) <= CONNACK_ALLOWED, ack.properties
    if 0x21 in ack.properties:  # Receive Maximum 0 is a Protocol Error
        assert ack.properties[0x21] > 0
    if 0x24 in ack.properties:
        assert ack.properties[0x24] in (0, 1)


def test_unsupported_protocol_level_MQTT_3_1_2_2(broker_impl, raw):
    # Level 6 does not exist: CONNACK "unacceptable protocol version" (3.1.1 code
    # 0x01 / v5 0x84), then close [MQTT-3.1.2-2]. The server cannot know the
    # client's format, so either encoding is fine.
    c = raw(broker_impl, 4)
    c.send(connect_bytes(unique("bad"), version=6))
    got = c.expect_closed()
    assert len(got) <= 1
    if got:
        assert got[0].type == "CONNACK"
        assert got[0].raw[3] in (0x01, 0x84), got[0]


def test_bad_protocol_name_closes_MQTT_3_1_2_1(broker_impl, raw):
    c = raw(broker_impl, 4)
    c.send(connect_bytes(unique("bad"), version=4, protocol_name="MQTX"))
    got = c.expect_closed()
    assert all(p.type == "CONNACK" and p.reason_code != 0 for p in got), got


def test_reserved_connect_flag_closes_MQTT_3_1_2_3(broker_impl, raw):
    c = raw(broker_impl, 4)
    c.send(connect_bytes(unique("bad"), version=4, flags=0x03))  # clean + reserved bit 0
    got = c.expect_closed()
    assert not any(p.type == "CONNACK" and p.reason_code == 0 for p in got), got


@pytest.mark.parametrize("version", [4, 5])
def test_will_qos_3_is_malformed_MQTT_3_1_2_12(broker_impl, raw, version):
    c = raw(broker_impl, version)
    c.send(connect_bytes(unique("bad"), version=version, will=("w", b"x", 3, False)))
    got = c.expect_closed()
    assert not any(p.type == "CONNACK" and p.reason_code == 0 for p in got), got


def test_v311_empty_client_id_with_clean_session_accepted_MQTT_3_1_3_6(broker_impl, raw):
    c = raw(broker_impl, 4)
    ack = c.connect("", clean=True)
    assert ack.reason_code == 0
    assert c.ping().type == "PINGRESP"


def test_v311_empty_client_id_without_clean_session_refused_MQTT_3_1_3_8(broker_impl, raw):
    # CONNACK return code 0x02 "identifier rejected", then close [MQTT-3.1.3-8].
    c = raw(broker_impl, 4)
    c.send(connect_bytes("", version=4, clean=False))
    got = c.expect_closed()
    assert [p.type for p in got] == ["CONNACK"]
    assert got[0].reason_code == 0x02


def test_v5_empty_client_id_is_assigned_MQTT_3_2_2_16(broker_impl, raw):
    # The server assigns a unique id and returns it [MQTT-3.1.3-6], [MQTT-3.2.2-16].
    ids = []
    for _ in range(2):
        c = raw(broker_impl, 5)
        ack = c.connect("")
        assert ack.reason_code == 0
        assigned = ack.properties.get(ASSIGNED_CLIENT_IDENTIFIER)
        assert assigned, ack.properties
        ids.append(assigned)
    assert ids[0] != ids[1]


def test_v5_takeover_old_connection_gets_0x8e_MQTT_3_1_4_3(broker_impl, raw):
    cid = unique("take")
    old = raw(broker_impl, 5)
    assert old.connect(cid).reason_code == 0
    new = raw(broker_impl, 5)
    assert new.connect(cid).reason_code == 0
    got = old.expect_closed()
    codes = [(p.type, p.reason_code) for p in got]
    if broker_impl.impl == "mosquitto":
        assert codes in ([], [("DISCONNECT", 0x8E)])  # 2.0.11 just closes
    else:
        assert codes == [("DISCONNECT", 0x8E)]
    assert new.ping().type == "PINGRESP"


def test_v311_takeover_closes_old_connection_MQTT_3_1_4_2(broker_impl, raw):
    cid = unique("take")
    old = raw(broker_impl, 4)
    assert old.connect(cid).reason_code == 0
    new = raw(broker_impl, 4)
    assert new.connect(cid).reason_code == 0
    assert old.expect_closed() == []  # 3.1.1 has no server DISCONNECT
    assert new.ping().type == "PINGRESP"


def test_takeover_across_versions(broker_impl, raw):
    cid = unique("take")
    old = raw(broker_impl, 4)
    assert old.connect(cid).reason_code == 0
    new = raw(broker_impl, 5)
    assert new.connect(cid).reason_code == 0
    old.expect_closed()
    assert new.ping().type == "PINGRESP"


@pytest.mark.parametrize("version", [4, 5])
def test_session_present_MQTT_3_2_2_2_and_3(broker_impl, raw, version):
    cid = unique("sess")
    props = {SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None
    c = raw(broker_impl, version)
    ack = c.connect(cid, clean=False, props=props)
    assert ack.session_present is False  # nothing stored yet
    c.subscribe("sp/" + cid, 1)
    c.disconnect()
    c = raw(broker_impl, version)
    ack = c.connect(cid, clean=False, props=props)
    assert ack.session_present is True  # [MQTT-3.2.2-3]
    c.disconnect()
    c = raw(broker_impl, version)
    ack = c.connect(cid, clean=True, props=props)
    assert ack.session_present is False  # clean start discards it [MQTT-3.2.2-2]
    c.disconnect()


def test_v5_session_expiry_zero_ends_session_at_disconnect_MQTT_3_1_2_23(broker_impl, raw):
    # Absent Session Expiry Interval means 0: the session ends with the connection.
    cid = unique("sess0")
    c = raw(broker_impl, 5)
    c.connect(cid, clean=False)
    c.subscribe("sp0/x", 1)
    c.disconnect()
    c = raw(broker_impl, 5)
    assert c.connect(cid, clean=False).session_present is False


def test_v5_session_expiry_elapses(broker_impl, raw):
    import time
    cid = unique("sessexp")
    c = raw(broker_impl, 5)
    c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 1})
    c.subscribe("sx/x", 1)
    c.disconnect()
    time.sleep(2.2)  # the behaviour under test is the passage of time itself
    c = raw(broker_impl, 5)
    assert c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 1}).session_present is False


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("first", [PINGREQ, publish_bytes("a", b"x", version=4)], ids=["PINGREQ", "PUBLISH"])
def test_first_packet_must_be_connect_MQTT_3_1_0_1(broker_impl, raw, version, first):
    c = raw(broker_impl, version)
    c.send(first)
    got = c.expect_closed()
    assert not any(p.type in ("CONNACK", "PINGRESP") for p in got), got


@pytest.mark.parametrize("version", [4, 5])
def test_second_connect_is_protocol_error_MQTT_3_1_0_2(broker_impl, raw, version):
    c = raw(broker_impl, version)
    c.connect(unique("twice"))
    c.send(connect_bytes(unique("twice"), version=version))
    got = c.expect_closed()
    # v5 may say why (0x82 Protocol Error); nothing else may come back.
    assert all(p.type == "DISCONNECT" and p.reason_code == 0x82 for p in got), got
    if version == 5 and broker_impl.impl == "fastmqtt":
        assert [p.reason_code for p in got] == [0x82]


@pytest.mark.parametrize("version", [4, 5])
def test_long_client_id_accepted_MQTT_3_1_3_5(broker_impl, raw, version):
    # 1..23 chars of [0-9a-zA-Z] MUST be allowed; longer ones MAY be (both brokers do).
    c = raw(broker_impl, version)
    assert c.connect("A" * 23).reason_code == 0
    c.disconnect()
    c = raw(broker_impl, version)
    assert c.connect("client-" + "x" * 200).reason_code == 0


def test_v5_server_keep_alive_MQTT_3_2_2_21(broker_factory, raw, impl):
    # A server that caps keepalive tells the client with Server Keep Alive, and
    # the client must use it [MQTT-3.1.2-21], [MQTT-3.2.2-21].
    if impl == "fastmqtt":
        b = broker_factory("fastmqtt", args=["--max-keepalive", "10"])
    else:
        b = broker_factory("mosquitto", mosquitto_conf=["max_keepalive 10"])
    c = raw(b, 5)
    ack = c.connect(unique("ka"), keepalive=60)
    assert ack.reason_code == 0
    assert ack.properties.get(SERVER_KEEP_ALIVE) == 10


def test_connect_split_into_single_bytes(broker_impl, raw):
    # TCP is a stream: a CONNECT trickling in byte by byte is still one packet.
    c = raw(broker_impl, 5)
    for b in connect_bytes(unique("split"), version=5, props={SESSION_EXPIRY_INTERVAL: 0}):
        c.send(bytes([b]))
    assert c.recv_type("CONNACK").reason_code == 0


def test_connect_and_publish_in_one_segment(broker_impl, raw):
    # Pipelined bytes after CONNECT are processed after the CONNACK.
    sub = raw(broker_impl, 5)
    sub.connect(unique("pipe"))
    t = unique("pipe/t")
    sub.subscribe(t, 0)
    c = raw(broker_impl, 5)
    c.send(connect_bytes(unique("pipe"), version=5) + publish_bytes(t, b"hello", version=5) + PINGREQ)
    assert c.recv().type == "CONNACK"
    assert c.recv().type == "PINGRESP"
    p = sub.recv_type("PUBLISH")
    assert (p.topic, p.payload) == (t, b"hello")


def test_username_password_anonymous_allowed(broker_impl, raw):
    c = raw(broker_impl, 5)
    assert c.connect(unique("up"), username="u", password=b"p").reason_code == 0


def test_v5_zero_receive_maximum_is_protocol_error(broker_impl, raw):
    # Receive Maximum 0 is a Protocol Error (3.1.2.11.3).
    c = raw(broker_impl, 5)
    c.send(connect_bytes(unique("rm0"), version=5, props={0x21: 0}))
    got = c.expect_closed()
    assert not any(p.type == "CONNACK" and p.reason_code == 0 for p in got), got


def test_garbage_instead_of_connect_closes(broker_impl, raw):
    c = raw(broker_impl, 4)
    c.send(packet(0x10, b"\x00\x04MQTT\x04"))  # truncated variable header
    got = c.expect_closed()
    assert not any(p.type == "CONNACK" and p.reason_code == 0 for p in got)
    # The broker still serves others.
    d = raw(broker_impl, 4)
    assert d.connect(unique("after")).reason_code == 0



def test_v5_unknown_authentication_method_0x8c(broker_impl, raw):
    # Enhanced authentication with a method the server does not support: CONNACK
    # 0x8C "Bad authentication method", then close (4.12).
    c = raw(broker_impl, 5)
    c.send(connect_bytes(unique("auth"), version=5, props={0x15: "NO-SUCH-METHOD"}))
    got = c.expect_closed()
    assert [(p.type, p.reason_code) for p in got] == [("CONNACK", 0x8C)]


@pytest.mark.parametrize("version", [4, 5])
def test_takeover_keeps_persistent_session_MQTT_3_1_4_3(broker_impl, raw, version):
    # Taking over with Clean Start 0 continues the session: Session Present 1
    # and the old subscriptions now deliver to the new connection.
    cid, topic = unique("tk"), unique("tk")
    props = {SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None
    old = raw(broker_impl, version)
    old.connect(cid, clean=False, props=props)
    old.subscribe(topic, 1)
    new = raw(broker_impl, version)
    assert new.connect(cid, clean=False, props=props).session_present is True
    old.expect_closed()
    pub = raw(broker_impl, 5)
    pub.connect(unique("tkp"))
    pub.publish(topic, b"to the new one", qos=1, packet_id=1)
    assert new.recv_type("PUBLISH").payload == b"to the new one"
