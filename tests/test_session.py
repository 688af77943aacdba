"""Sans-IO tests of ServerConnection: transitions, violations, deadlines, aliases."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fastmqtt.codec import (Connect, Disconnect, Pingreq, Publish, Suback, Subscribe,
                            Subscription, encode)
from fastmqtt.enums import PropertyId
from fastmqtt.session import (AWAIT_CONNECT, CLOSED, CONNECTED, ERROR, ProtocolViolation,
                              ServerConnection)

P = PropertyId


def feed(conn, *packets, version=5, now=0.0):
    return conn.receive_data(b"".join(encode(p, version) for p in packets), now)


def test_first_packet_must_be_connect_MQTT_3_1_0_1():
    conn = ServerConnection(0.0)
    events = conn.receive_data(encode(Pingreq(), 5), 0.0)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert events[0].by_peer and events[0].reason_code == 0x82
    assert conn.state == ERROR
    assert conn.receive_data(encode(Pingreq(), 5), 0.0) == []  # stays broken


def test_connect_then_packets_in_order_and_version_learnt():
    conn = ServerConnection(0.0)
    events = feed(conn, Connect("a", protocol_level=4), Pingreq(), version=4)
    assert [e.packet_type for e in events] == [1, 12]
    assert conn.version == 4 and conn.state == CONNECTED


def test_second_connect_is_protocol_error_MQTT_3_1_0_2():
    conn = ServerConnection(0.0)
    events = feed(conn, Connect("a", protocol_level=5), Connect("a", protocol_level=5))
    assert events[0].packet_type == 1
    assert isinstance(events[1], ProtocolViolation)
    assert events[1].reason_code == 0x82 and "MQTT-3.1.0-2" in events[1].message


def test_server_only_packet_from_client_is_protocol_error():
    conn = ServerConnection(0.0)
    feed(conn, Connect("a", protocol_level=5))
    events = feed(conn, Suback(1, [0]))
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reason_code == 0x82


def test_good_packets_before_a_malformed_one_are_kept():
    conn = ServerConnection(0.0)
    data = encode(Connect("a", protocol_level=5), 5) + encode(Pingreq(), 5) + b"\xc0\x01\x00"
    events = conn.receive_data(data, 0.0)
    assert [getattr(e, "packet_type", None) for e in events[:2]] == [1, 12]
    assert isinstance(events[2], ProtocolViolation) and events[2].reason_code == 0x81


def test_unsupported_protocol_level_reports_0x84_MQTT_3_1_2_2():
    conn = ServerConnection(0.0)
    data = bytearray(encode(Connect("a", protocol_level=4), 4))
    data[8] = 9  # protocol level byte
    events = conn.receive_data(bytes(data), 0.0)
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reason_code == 0x84


def test_disconnect_closes_and_records_will_choice_MQTT_3_1_2_10():
    conn = ServerConnection(0.0)
    feed(conn, Connect("a", protocol_level=5), Disconnect(0))
    assert conn.state == CLOSED and conn.will_on_close is False
    conn = ServerConnection(0.0)
    feed(conn, Connect("a", protocol_level=5), Disconnect(0x04))
    assert conn.will_on_close is True


def test_connect_timeout_deadline():
    conn = ServerConnection(100.0, connect_timeout=5)
    assert conn.state == AWAIT_CONNECT and conn.next_deadline() == 105.0
    assert conn.timed_out(104.9) is None
    assert conn.timed_out(105.0) == "connect"


def test_keepalive_one_and_a_half_times_MQTT_3_1_2_24():
    conn = ServerConnection(0.0)
    feed(conn, Connect("a", keep_alive=10, protocol_level=5), now=1.0)
    conn.keep_alive = 10  # the core sets the effective value
    assert conn.next_deadline() == 16.0
    assert conn.timed_out(15.9) is None
    feed(conn, Pingreq(), now=12.0)  # any packet restarts the timer
    assert conn.timed_out(17.0) is None
    assert conn.timed_out(27.0) == "keepalive"


def test_keepalive_zero_never_times_out():
    conn = ServerConnection(0.0)
    feed(conn, Connect("a", keep_alive=0, protocol_level=5))
    conn.keep_alive = 0
    assert conn.next_deadline() == math.inf


def test_inbound_topic_alias_resolved_and_stripped_MQTT_3_3_2_12():
    conn = ServerConnection(0.0, topic_alias_maximum=5)
    events = feed(conn, Connect("a", protocol_level=5),
                  Publish("t/1", b"x", properties={P.TOPIC_ALIAS: 2}),
                  Publish("", b"y", properties={P.TOPIC_ALIAS: 2}))
    pubs = events[1:]
    assert [p.topic for p in pubs] == ["t/1", "t/1"]
    assert all(P.TOPIC_ALIAS not in p.properties for p in pubs)


def test_topic_alias_above_maximum_is_0x94_MQTT_3_3_2_9():
    conn = ServerConnection(0.0, topic_alias_maximum=2)
    events = feed(conn, Connect("a", protocol_level=5),
                  Publish("t", b"x", properties={P.TOPIC_ALIAS: 3}))
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reason_code == 0x94


def test_unknown_topic_alias_is_protocol_error():
    conn = ServerConnection(0.0, topic_alias_maximum=2)
    events = feed(conn, Connect("a", protocol_level=5),
                  Publish("", b"x", properties={P.TOPIC_ALIAS: 1}))
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reason_code == 0x82


def test_qos_above_maximum_is_0x9B_MQTT_3_2_2_11():
    conn = ServerConnection(0.0, max_qos=1)
    events = feed(conn, Connect("a", protocol_level=5), Publish("t", b"x", qos=2, packet_id=1))
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reason_code == 0x9B


def test_packet_over_maximum_size_is_0x95():
    conn = ServerConnection(0.0, max_packet_size=64)
    events = feed(conn, Connect("a", protocol_level=5), Publish("t", b"x" * 100))
    assert isinstance(events[-1], ProtocolViolation) and events[-1].reason_code == 0x95


def test_output_coalescing_wakes_writer_once_per_batch():
    conn = ServerConnection(0.0)
    wakes = []
    conn.on_output = lambda: wakes.append(1)
    conn.write(b"a")
    conn.write(b"b")
    assert len(wakes) == 1
    assert conn.take_output() == b"ab" and conn.out_bytes == 0
    conn.write(b"c")
    assert len(wakes) == 2


def test_acks_wait_for_their_ticket_in_order():
    conn = ServerConnection(0.0)
    conn.send_ack(3, b"A")
    conn.send_ack(0, b"B")  # behind a pending ack it must keep its place [MQTT-4.6.0-2]
    conn.send_ack(5, b"C")
    assert conn.take_output() == b""
    assert conn.take_acks() == (5, b"ABC")


def test_outbound_alias_assignment_up_to_client_maximum_MQTT_3_3_2_10():
    conn = ServerConnection(0.0)
    conn.out_alias_maximum = 2
    assert conn.outbound_alias("a") == (1, False)
    assert conn.outbound_alias("a") == (1, True)
    assert conn.outbound_alias("b") == (2, False)
    assert conn.outbound_alias("c") == (0, False)  # table full: full topic


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    conn = ServerConnection(0.0)
    events = conn.receive_data(data, 0.0)
    for ev in events[:-1]:
        assert not isinstance(ev, ProtocolViolation)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=10))
def test_any_chunking_gives_the_same_events(cuts):
    packets = [Connect("a", protocol_level=5), Subscribe(1, [Subscription("a/#", 1)]),
               Publish("a/b", b"hello", 1, packet_id=7), Pingreq(), Disconnect()]
    data = b"".join(encode(p, 5) for p in packets)
    conn = ServerConnection(0.0)
    events = []
    pos = 0
    for c in cuts:
        events += conn.receive_data(data[pos:pos + c], 0.0)
        pos += c
    events += conn.receive_data(data[pos:], 0.0)
    # compared through their encoding: equal packets encode identically
    assert [encode(e, 5) for e in events] == [encode(p, 5) for p in packets]
