"""Sans-IO client protocol against scripted broker bytes (no sockets, no clock).

A :class:`Broker` here is a few lines over the codec: it decodes what the
client protocol writes and encodes what a server would answer, so each test
reads as a transcript.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from fastmqtt import codec
from fastmqtt.client.protocol import (ClientProtocol, Connected, ConnectionRefused,
                                      KeepAliveTimeout, MessageReceived, PingResponse,
                                      ProtocolError, PublishCompleted, PublishReceived,
                                      ServerDisconnected, SubscribeCompleted,
                                      UnsubscribeCompleted)
from fastmqtt.enums import PropertyId as P, ReasonCode


class Broker:
    """The server end of a scripted conversation."""

    def __init__(self, version: int = 5) -> None:
        self.version = version
        self.decoder = codec.Decoder(None)

    def read(self, data: bytes) -> list:
        return self.decoder.feed(data)

    def send(self, *packets) -> bytes:
        return b"".join(codec.encode(p, self.version) for p in packets)


def connect(version=5, session_present=False, connack_props=None, **kw):
    proto = ClientProtocol("c1", version=version, **kw)
    broker = Broker(version)
    (pkt,) = broker.read(proto.start(0.0))
    assert isinstance(pkt, codec.Connect)
    events = proto.receive_data(broker.send(codec.Connack(session_present, 0, connack_props)), 0.0)
    assert isinstance(events[0], Connected)
    return proto, broker, events[0]


def reconnect(proto, broker_version=5, session_present=True, now=1.0):
    proto.connection_lost()
    broker = Broker(broker_version)
    (pkt,) = broker.read(proto.start(now))
    events = proto.receive_data(broker.send(codec.Connack(session_present, 0)), now)
    return broker, pkt, events


@pytest.mark.parametrize("version", [3, 4, 5])
def test_connect_packet_fields(version):
    proto = ClientProtocol("dev-1", version=version, keep_alive=30, clean_start=False,
                           username="u", password=b"p", session_expiry=60)
    (pkt,) = Broker(version).read(proto.start(0.0))
    assert pkt.client_id == "dev-1" and pkt.keep_alive == 30
    assert pkt.clean_start is False and pkt.username == "u" and pkt.password == b"p"
    assert pkt.protocol_level == version
    if version == 5:
        assert pkt.properties[P.SESSION_EXPIRY_INTERVAL] == 60


def test_v5_reconnect_uses_clean_start_0_to_resume_session():
    proto, broker, _ = connect(clean_start=True, session_expiry=300)
    _, pkt, _ = reconnect(proto)
    assert pkt.clean_start is False


def test_311_reconnect_keeps_clean_session_as_configured():
    proto, _, _ = connect(version=4, clean_start=True)
    _, pkt, _ = reconnect(proto, 4, session_present=False)
    assert pkt.clean_start is True


def test_connack_refused_is_an_event():
    proto = ClientProtocol("c", version=5)
    b = Broker()
    b.read(proto.start(0))
    (ev,) = proto.receive_data(b.send(codec.Connack(False, ReasonCode.NOT_AUTHORIZED)), 0)
    assert isinstance(ev, ConnectionRefused) and ev.reason_code == 0x87
    assert not proto.connected


def test_packet_before_connack_is_protocol_error_MQTT_3_2_0_1():
    proto = ClientProtocol("c")
    b = Broker()
    b.read(proto.start(0))
    with pytest.raises(ProtocolError):
        proto.receive_data(b.send(codec.Publish("t", b"x")), 0)


def test_second_connack_is_protocol_error_MQTT_3_2_0_2():
    proto, b, _ = connect()
    with pytest.raises(ProtocolError):
        proto.receive_data(b.send(codec.Connack(False, 0)), 0)


def test_qos1_publish_flow_and_puback_reason_code():
    proto, b, _ = connect()
    pid, data = proto.publish("a/b", b"x", qos=1)
    (pkt,) = b.read(data)
    assert pkt.qos == 1 and pkt.packet_id == pid and not pkt.dup
    (ev,) = proto.receive_data(b.send(codec.Puback(pid, 0x10)), 0)
    assert isinstance(ev, PublishCompleted) and ev.reason_code == 0x10 and ev.packet_id == pid
    assert proto.inflight == 0


def test_qos2_publish_flow_pubrec_pubrel_pubcomp():
    proto, b, _ = connect()
    pid, data = proto.publish("a/b", b"x", qos=2)
    b.read(data)
    events = proto.receive_data(b.send(codec.Pubrec(pid)), 0)
    assert events == [PublishReceived(pid)]
    (rel,) = b.read(proto.data_to_send())
    assert isinstance(rel, codec.Pubrel) and rel.packet_id == pid
    (ev,) = proto.receive_data(b.send(codec.Pubcomp(pid)), 0)
    assert isinstance(ev, PublishCompleted) and ev.reason_code == 0


def test_pubcomp_packet_id_not_found_after_resent_pubrel_is_success():
    proto, b, _ = connect(session_expiry=60)
    pid, _ = proto.publish("a", b"x", qos=2)
    proto.receive_data(b.send(codec.Pubrec(pid, 0x10)), 0)
    b2, _, _ = reconnect(proto, session_present=True)
    (ev,) = proto.receive_data(b2.send(codec.Pubcomp(pid, 0x92)), 1)
    assert isinstance(ev, PublishCompleted) and ev.reason_code == 0x10


def test_qos2_failed_pubrec_ends_the_flow():
    proto, b, _ = connect()
    pid, data = proto.publish("a/b", b"x", qos=2)
    (ev,) = proto.receive_data(b.send(codec.Pubrec(pid, 0x87)), 0)
    assert isinstance(ev, PublishCompleted) and ev.reason_code == 0x87
    assert proto.data_to_send() == b""  # no PUBREL after a failed PUBREC
    assert proto.inflight == 0


def test_resend_unacked_publish_with_dup_and_same_id_MQTT_4_4_0_1():
    proto, b, _ = connect(session_expiry=60)
    p1, _ = proto.publish("t/1", b"one", qos=1)
    p2, _ = proto.publish("t/2", b"two", qos=2)
    p3, _ = proto.publish("t/3", b"three", qos=2)
    proto.receive_data(b.send(codec.Pubrec(p3)), 0)  # p3 reaches the PUBREL stage
    proto.data_to_send()
    b2, _, events = reconnect(proto, session_present=True)
    (conn,) = events
    resent = [b2.decoder.feed(d)[0] for d in conn.resend]
    kinds = [(type(p).__name__, p.packet_id) for p in resent]
    # Original order and ids [MQTT-4.6.0-1]; PUBLISH with DUP [MQTT-3.3.1-1].
    assert kinds == [("Publish", p1), ("Publish", p2), ("Pubrel", p3)]
    assert all(p.dup for p in resent[:2])
    assert resent[0].payload == b"one" and resent[1].topic == "t/2"


def test_no_session_present_sends_every_unfinished_message_again():
    # Even a PUBREC'd QoS 2 message: a server without our session may have
    # dropped it before delivering (Mosquitto delivers on PUBREL).
    proto, b, _ = connect()
    p1, _ = proto.publish("t/1", b"one", qos=1)
    p2, _ = proto.publish("t/2", b"two", qos=2)
    proto.receive_data(b.send(codec.Pubrec(p2)), 0)
    b2, _, events = reconnect(proto, session_present=False)
    (conn,) = events
    resent = [b2.read(d)[0] for d in conn.resend]
    assert [(type(p).__name__, p.packet_id, p.dup) for p in resent] == [
        ("Publish", p1, False), ("Publish", p2, False)]
    proto.receive_data(b2.send(codec.Pubrec(p2)), 1)
    (rel,) = b2.read(proto.data_to_send())
    assert isinstance(rel, codec.Pubrel)


def test_publish_while_disconnected_waits_in_session():
    proto = ClientProtocol("c")
    pid, data = proto.publish("t", b"x", qos=1)
    assert data == b"" and pid
    b = Broker()
    b.read(proto.start(0))
    (conn,) = proto.receive_data(b.send(codec.Connack(False, 0)), 0)
    (pkt,) = b.read(conn.resend[0])
    assert pkt.packet_id == pid and pkt.payload == b"x"


def test_inbound_qos1_is_acked():
    proto, b, _ = connect()
    (ev,) = proto.receive_data(b.send(codec.Publish("t", b"x", 1, packet_id=7)), 0)
    assert isinstance(ev, MessageReceived) and ev.publish.payload == b"x"
    (ack,) = b.read(proto.data_to_send())
    assert isinstance(ack, codec.Puback) and ack.packet_id == 7


def test_inbound_qos2_delivered_exactly_once_MQTT_4_3_3_10():
    proto, b, _ = connect()
    msg = codec.Publish("t", b"x", 2, packet_id=9)
    events = proto.receive_data(b.send(msg), 0)
    assert len(events) == 1
    (rec,) = b.read(proto.data_to_send())
    assert isinstance(rec, codec.Pubrec)
    # The server resends (DUP) before seeing our PUBREC: acknowledged, not redelivered.
    events = proto.receive_data(b.send(codec.Publish("t", b"x", 2, dup=True, packet_id=9)), 0)
    assert events == []
    assert isinstance(b.read(proto.data_to_send())[0], codec.Pubrec)
    proto.receive_data(b.send(codec.Pubrel(9)), 0)
    (comp,) = b.read(proto.data_to_send())
    assert isinstance(comp, codec.Pubcomp) and comp.reason_code == 0
    # After PUBCOMP the id is free again: a new message with it is delivered.
    assert len(proto.receive_data(b.send(msg), 0)) == 1


def test_inbound_qos2_state_survives_reconnect_with_session():
    proto, b, _ = connect(session_expiry=60)
    proto.receive_data(b.send(codec.Publish("t", b"x", 2, packet_id=3)), 0)
    b2, _, _ = reconnect(proto, session_present=True)
    events = proto.receive_data(b2.send(codec.Publish("t", b"x", 2, dup=True, packet_id=3)), 1)
    assert events == []


def test_pubrel_for_unknown_id_answers_not_found():
    proto, b, _ = connect()
    proto.receive_data(b.send(codec.Pubrel(42)), 0)
    (comp,) = b.read(proto.data_to_send())
    assert comp.reason_code == ReasonCode.PACKET_IDENTIFIER_NOT_FOUND


def test_inbound_topic_alias_resolution_and_errors():
    proto, b, _ = connect(topic_alias_maximum=4)
    (ev,) = proto.receive_data(b.send(codec.Publish("long/topic", b"1", properties={P.TOPIC_ALIAS: 2})), 0)
    assert ev.publish.topic == "long/topic"
    (ev,) = proto.receive_data(b.send(codec.Publish("", b"2", properties={P.TOPIC_ALIAS: 2})), 0)
    assert ev.publish.topic == "long/topic" and ev.publish.payload == b"2"
    with pytest.raises(ProtocolError) as err:
        proto.receive_data(b.send(codec.Publish("", b"3", properties={P.TOPIC_ALIAS: 3})), 0)
    assert err.value.reason_code == ReasonCode.TOPIC_ALIAS_INVALID


def test_inbound_alias_above_maximum_MQTT_3_3_2_9():
    proto, b, _ = connect(topic_alias_maximum=2)
    with pytest.raises(ProtocolError) as err:
        proto.receive_data(b.send(codec.Publish("x", b"", properties={P.TOPIC_ALIAS: 3})), 0)
    assert err.value.reason_code == 0x94


def test_outbound_topic_alias_used_after_first_publish():
    proto, b, _ = connect(connack_props={P.TOPIC_ALIAS_MAXIMUM: 1})
    _, d1 = proto.publish("sensors/1", b"a")
    _, d2 = proto.publish("sensors/1", b"b")
    _, d3 = proto.publish("sensors/2", b"c")  # LRU replaces alias 1
    _, d4 = proto.publish("sensors/2", b"d")
    p1, p2, p3, p4 = (b.read(d)[0] for d in (d1, d2, d3, d4))
    assert p1.topic == "sensors/1" and p1.properties[P.TOPIC_ALIAS] == 1
    assert p2.topic == "" and p2.properties[P.TOPIC_ALIAS] == 1
    assert p3.topic == "sensors/2" and p3.properties[P.TOPIC_ALIAS] == 1
    assert p4.topic == ""


def test_topic_aliases_reset_on_new_connection_MQTT_3_3_2_7():
    proto, b, _ = connect(connack_props={P.TOPIC_ALIAS_MAXIMUM: 5}, session_expiry=60)
    pid, d = proto.publish("s/1", b"a", qos=1)
    proto.publish("s/1", b"b", qos=1)
    proto.connection_lost()
    b2 = Broker()
    b2.read(proto.start(1))
    (conn,) = proto.receive_data(b2.send(codec.Connack(True, 0)), 1)  # no alias max now
    for data in conn.resend:
        (pkt,) = b2.read(data)
        assert pkt.topic == "s/1" and P.TOPIC_ALIAS not in pkt.properties


def test_server_receive_maximum_limits_send_quota_MQTT_4_9_0_2():
    proto, b, _ = connect(connack_props={P.RECEIVE_MAXIMUM: 2})
    proto.publish("t", b"1", qos=1)
    proto.publish("t", b"2", qos=1)
    assert proto.send_quota == 0
    with pytest.raises(ValueError):
        proto.publish("t", b"3", qos=1)


def test_server_maximum_qos_enforced_MQTT_3_2_2_11():
    proto, b, _ = connect(connack_props={P.MAXIMUM_QOS: 1})
    with pytest.raises(ValueError):
        proto.publish("t", b"x", qos=2)


def test_subscribe_unsubscribe_round_trip():
    proto, b, _ = connect()
    pid, data = proto.subscribe([codec.Subscription("a/#", 1)])
    (pkt,) = b.read(data)
    assert pkt.subscriptions[0].topic_filter == "a/#"
    (ev,) = proto.receive_data(b.send(codec.Suback(pid, [1])), 0)
    assert isinstance(ev, SubscribeCompleted) and ev.reason_codes == (1,)
    pid, data = proto.unsubscribe(["a/#"])
    (ev,) = proto.receive_data(b.send(codec.Unsuback(pid, [0])), 0)
    assert isinstance(ev, UnsubscribeCompleted)


def test_suback_for_unknown_id_is_protocol_error():
    proto, b, _ = connect()
    with pytest.raises(ProtocolError):
        proto.receive_data(b.send(codec.Suback(99, [0])), 0)


def test_keepalive_ping_and_dead_connection_detection():
    proto, b, _ = connect(keep_alive=10, ping_timeout=5)
    proto.note_sent(0.0)
    assert proto.next_deadline() == 10.0
    assert proto.tick(9.9) == b""
    ping = proto.tick(10.0)
    assert isinstance(b.read(ping)[0], codec.Pingreq)
    assert proto.next_deadline() == 15.0
    (ev,) = proto.receive_data(b.send(codec.Pingresp()), 11.0)
    assert isinstance(ev, PingResponse)
    proto.note_sent(11.0)
    assert proto.tick(21.0)  # next ping
    with pytest.raises(KeepAliveTimeout):
        proto.tick(26.0)


def test_server_keep_alive_overrides_ours_MQTT_3_2_2_21():
    proto, b, _ = connect(keep_alive=60, connack_props={P.SERVER_KEEP_ALIVE: 5})
    proto.note_sent(100.0)
    assert proto.next_deadline() == 105.0


def test_sending_resets_keepalive_MQTT_3_1_2_23():
    proto, b, _ = connect(keep_alive=10)
    proto.note_sent(8.0)
    assert proto.tick(10.0) == b""
    assert proto.next_deadline() == 18.0


def test_server_disconnect_event():
    proto, b, _ = connect()
    (ev,) = proto.receive_data(b.send(codec.Disconnect(ReasonCode.SESSION_TAKEN_OVER)), 0)
    assert isinstance(ev, ServerDisconnected) and ev.reason_code == 0x8E


def test_malformed_bytes_raise_protocol_error_with_earlier_events():
    proto, b, _ = connect()
    good = b.send(codec.Publish("t", b"ok", 1, packet_id=1))
    with pytest.raises(ProtocolError) as err:
        proto.receive_data(good + b"\x30\x02\x00\x05", 0)  # topic length beyond the packet
    assert [type(e) for e in err.value.events] == [MessageReceived]
    assert err.value.reason_code == 0x81


def test_assigned_client_identifier_taken():
    proto = ClientProtocol("", version=5)
    b = Broker()
    b.read(proto.start(0))
    proto.receive_data(b.send(codec.Connack(False, 0, {P.ASSIGNED_CLIENT_IDENTIFIER: "auto-1"})), 0)
    assert proto.client_id == "auto-1"


def test_restore_inflight_from_previous_process():
    proto = ClientProtocol("c", clean_start=False)
    proto.restore_inflight(500, "pubrel", codec.Publish("t", b"x", 2))
    proto.restore_inflight(501, "publish", codec.Publish("t", b"y", 1))
    b = Broker()
    b.read(proto.start(0))
    (conn,) = proto.receive_data(b.send(codec.Connack(True, 0)), 0)
    resent = [b.read(d)[0] for d in conn.resend]
    assert [(type(p).__name__, p.packet_id) for p in resent] == [("Pubrel", 500), ("Publish", 501)]
    pid, _ = proto.publish("t", b"z", qos=1)
    assert pid not in (500, 501)


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.integers(1, 7), min_size=1, max_size=40), version=st.sampled_from([4, 5]))
def test_any_chunking_gives_the_same_events(chunks, version):
    proto, b, _ = connect(version=version)
    stream = b.send(
        codec.Publish("a", b"1", 1, packet_id=1), codec.Publish("b", b"2", 2, packet_id=2),
        codec.Pubrel(2), codec.Publish("c", b"3", 0), codec.Pingresp())
    events = []
    i = 0
    for n in itertools_cycle(chunks):
        if i >= len(stream):
            break
        events += proto.receive_data(stream[i:i + n], 0)
        i += n
    got = [(e.publish.topic, e.publish.payload) for e in events if isinstance(e, MessageReceived)]
    assert got == [("a", b"1"), ("b", b"2"), ("c", b"3")]
    acks = b.read(proto.data_to_send())
    assert [type(a).__name__ for a in acks] == ["Puback", "Pubrec", "Pubcomp"]


def itertools_cycle(seq):
    while True:
        yield from seq


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120), version=st.sampled_from([4, 5]))
def test_random_server_bytes_only_raise_protocol_error(data, version):
    proto, b, _ = connect(version=version)
    proto.publish("t", b"x", qos=2)
    try:
        proto.receive_data(data, 0)
    except ProtocolError:
        return
    proto.data_to_send()
