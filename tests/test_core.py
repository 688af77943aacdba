"""Sans-IO tests of the broker core: each protocol rule, two or more in-memory peers."""

import pytest

from broker_harness import Clock, Peer, make_core, of
from fastmqtt.codec import (Connack, Disconnect, Puback, Pubcomp, Publish, Pubrec, Pubrel,
                            Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will)
from fastmqtt.enums import PropertyId

P = PropertyId
VERSIONS = [4, 5]


def connected(core, cid, version=5, clock=None, **kw):
    peer = Peer(core, version, clock)
    out = peer.connect(cid, **kw)
    assert isinstance(out[0], Connack) and out[0].reason_code == 0, out
    return peer


def subscribe(peer, *filters, pid=1, qos=1, props=None, **opts):
    out = peer.send(Subscribe(pid, [Subscription(f, qos, **opts) for f in filters], props))
    return out


# ----------------------------------------------------------------- CONNECT


@pytest.mark.parametrize("version", VERSIONS)
def test_connack_session_present_0_for_new_session_MQTT_3_2_2_2(version):
    core = make_core()
    out = Peer(core, version).connect("a", clean_start=False)
    assert out[0].session_present is False and out[0].reason_code == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_session_present_1_when_resumed_MQTT_3_2_2_3(version):
    core = make_core()
    props = {P.SESSION_EXPIRY_INTERVAL: 60} if version == 5 else None
    a = connected(core, "a", version, clean_start=False, properties=props)
    a.drop()
    out = Peer(core, version).connect("a", clean_start=False, properties=props)
    assert out[0].session_present is True


def test_clean_start_discards_session_MQTT_3_1_2_4():
    core = make_core()
    a = connected(core, "a", 4, clean_start=False)
    subscribe(a, "t")
    a.drop()
    b = Peer(core, 4)
    assert b.connect("a", clean_start=True)[0].session_present is False
    c = connected(core, "p", 4)
    c.send(Publish("t", b"x", 1, packet_id=1))
    assert of(b.recv(), Publish) == []  # the subscription went with the session


def test_v5_empty_client_id_gets_assigned_identifier_MQTT_3_2_2_16():
    core = make_core()
    out = Peer(core, 5).connect("")
    cid = out[0].properties[P.ASSIGNED_CLIENT_IDENTIFIER]
    assert cid and cid in core.clients


def test_v311_empty_client_id_needs_clean_session_MQTT_3_1_3_8():
    core = make_core()
    peer = Peer(core, 4)
    out = peer.connect("", clean_start=False)
    assert out[0].reason_code == 0x85  # encoded as 3.1.1 return code 2
    assert peer.conn.closing
    ok = Peer(core, 4).connect("", clean_start=True)
    assert ok[0].reason_code == 0


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("topic", ["a/+", "a/#", ""])
def test_will_topic_must_be_a_valid_topic_name_MQTT_3_3_2_2(version, topic):
    core = make_core()
    peer = Peer(core, version)
    out = peer.connect("w", will=Will(topic, b"gone"))
    # v5: 0x90 Topic Name invalid; 3.1.1 has no such code: return code 3
    # (decoded back as 0x88), as enums.CONNACK_V5_TO_V311 maps it.
    assert out[0].reason_code == (0x90 if version == 5 else 0x88)
    assert peer.conn.closing
    assert Peer(core, version).connect("w2", will=Will("ok/t", b"gone"))[0].reason_code == 0


def test_v5_connack_advertises_capabilities():
    core = make_core(receive_maximum=77, topic_alias_maximum=4, max_qos=1)
    props = Peer(core, 5).connect("a")[0].properties
    assert props[P.RECEIVE_MAXIMUM] == 77
    assert props[P.TOPIC_ALIAS_MAXIMUM] == 4
    assert props[P.MAXIMUM_QOS] == 1
    assert props[P.SHARED_SUBSCRIPTION_AVAILABLE] == 1


def test_server_keep_alive_override():
    core = make_core(max_keepalive=30)
    peer = Peer(core, 5)
    out = peer.connect("a", keep_alive=600)
    assert out[0].properties[P.SERVER_KEEP_ALIVE] == 30
    assert peer.conn.keep_alive == 30


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_disconnects_older_connection_MQTT_3_1_4_3(version):
    core = make_core()
    a = connected(core, "dup", version)
    b = connected(core, "dup", version)
    assert a.conn.closing
    if version == 5:
        assert of(a.recv(), Disconnect)[0].reason_code == 0x8E
    assert core.clients["dup"].conn is b.conn
    a.drop()  # the old socket's end must not disturb the new session
    assert core.clients["dup"].conn is b.conn


# ------------------------------------------------------------------- QoS


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_each_qos_delivered(version, qos):
    core = make_core()
    sub = connected(core, "s", version)
    subscribe(sub, "t/#", qos=2)
    pub = connected(core, "p", version)
    acks = pub.send(Publish("t/1", b"hi", qos, packet_id=5 if qos else 0))
    got = of(sub.recv(), Publish)
    assert [(m.topic, m.payload, m.qos) for m in got] == [("t/1", b"hi", qos)]
    if qos == 1:
        assert isinstance(acks[0], Puback) and acks[0].packet_id == 5
    if qos == 2:
        assert isinstance(acks[0], Pubrec)
        assert isinstance(pub.send(Pubrel(5))[0], Pubcomp)


def test_qos_downgraded_to_subscription_MQTT_3_8_4_8():
    core = make_core()
    sub = connected(core, "s")
    subscribe(sub, "t", qos=0)
    connected(core, "p").send(Publish("t", b"x", 2, packet_id=1))
    assert of(sub.recv(), Publish)[0].qos == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_qos2_resent_publish_not_delivered_twice_MQTT_4_3_3_10(version):
    core = make_core()
    sub = connected(core, "s", version)
    subscribe(sub, "t", qos=2)
    pub = connected(core, "p", version)
    pub.send(Publish("t", b"x", 2, packet_id=9))
    again = pub.send(Publish("t", b"x", 2, dup=True, packet_id=9))
    assert isinstance(again[0], Pubrec)
    assert len(of(sub.recv(), Publish)) == 1
    pub.send(Pubrel(9))
    pub.send(Publish("t", b"y", 2, packet_id=9))  # after PUBREL the id is new again
    assert [m.payload for m in of(sub.recv(), Publish)] == [b"y"]


def test_pubrel_unknown_id_gets_0x92_in_v5():
    core = make_core()
    pub = connected(core, "p")
    out = pub.send(Pubrel(44))
    assert isinstance(out[0], Pubcomp) and out[0].reason_code == 0x92


def test_outbound_qos2_flow_and_pubrel():
    core = make_core()
    sub = connected(core, "s")
    subscribe(sub, "t", qos=2)
    connected(core, "p").send(Publish("t", b"x", 2, packet_id=1))
    msg = of(sub.recv(), Publish)[0]
    out = sub.send(Pubrec(msg.packet_id))
    assert isinstance(out[0], Pubrel) and out[0].packet_id == msg.packet_id
    sub.send(Pubcomp(msg.packet_id))
    assert core.clients["s"].inflight == {}


def test_receive_maximum_bounds_inflight_and_keeps_order_MQTT_4_9_0_2():
    core = make_core()
    sub = connected(core, "s", properties={P.RECEIVE_MAXIMUM: 2})
    subscribe(sub, "t")
    pub = connected(core, "p")
    for i in range(5):
        pub.send(Publish("t", str(i).encode(), 1, packet_id=i + 1))
    first = of(sub.recv(), Publish)
    assert [m.payload for m in first] == [b"0", b"1"]
    # acknowledge one at a time: exactly one more arrives each time, in order [MQTT-4.6.0-2]
    payloads = [m.payload for m in first]
    pending = list(first)
    while pending:
        m = pending.pop(0)
        more = of(sub.send(Puback(m.packet_id)), Publish)
        assert len(more) <= 1
        pending += more
        payloads += [x.payload for x in more]
    assert payloads == [b"0", b"1", b"2", b"3", b"4"]


def test_packet_ids_never_reused_while_in_flight_MQTT_2_2_1_3():
    core = make_core(max_inflight_messages=65535)
    sub = connected(core, "s")
    subscribe(sub, "t")
    cs = core.clients["s"]
    cs.next_pid = 65534
    pub = connected(core, "p")
    for i in range(4):
        pub.send(Publish("t", b"x", 1, packet_id=i + 1))
    ids = [m.packet_id for m in of(sub.recv(), Publish)]
    assert ids == [65534, 65535, 1, 2]
    sub.send(Puback(1))  # only 1 completes; 65534 stays in flight
    cs.next_pid = 65534
    pub.send(Publish("t", b"y", 1, packet_id=9))
    assert of(sub.recv(), Publish)[0].packet_id == 1  # skips 65534/65535


@pytest.mark.parametrize("version", VERSIONS)
def test_unacked_resent_with_dup_on_reconnect_MQTT_4_4_0_1(version):
    core = make_core()
    props = {P.SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None
    sub = connected(core, "s", version, clean_start=False, properties=props)
    subscribe(sub, "t", qos=2)
    pub = connected(core, "p", version)
    pub.send(Publish("t", b"one", 1, packet_id=1))
    pub.send(Publish("t", b"two", 2, packet_id=2))
    got = of(sub.recv(), Publish)
    sub.send(Pubrec(got[1].packet_id))  # "two" is now waiting for PUBCOMP
    sub.drop()
    sub2 = Peer(core, version)
    out = sub2.connect("s", clean_start=False, properties=props)
    assert out[0].session_present
    again = out[1:]
    assert isinstance(again[0], Publish) and again[0].dup and again[0].payload == b"one"
    assert again[0].packet_id == got[0].packet_id
    assert isinstance(again[1], Pubrel) and again[1].packet_id == got[1].packet_id


@pytest.mark.parametrize("version", VERSIONS)
def test_offline_queue_keeps_qos1_not_qos0(version):
    core = make_core()
    props = {P.SESSION_EXPIRY_INTERVAL: 300} if version == 5 else None
    sub = connected(core, "s", version, clean_start=False, properties=props)
    subscribe(sub, "t", qos=1)
    sub.drop()
    pub = connected(core, "p", version)
    pub.send(Publish("t", b"q0", 0))
    pub.send(Publish("t", b"q1", 1, packet_id=1))
    out = Peer(core, version).connect("s", clean_start=False, properties=props)
    assert [m.payload for m in of(out, Publish)] == [b"q1"]


def test_no_persistence_makes_no_store_calls_for_persistent_sessions():
    """With a NullStore (--no-persistence) nothing is kept, so a session with
    an expiry interval costs no store calls: no message ids, no records (the
    in-memory broker's hot path), and it still works as a session."""
    from fastmqtt.broker.core import BrokerCore
    from fastmqtt.broker.interfaces import NullStore

    calls = []

    class Counting(NullStore):
        def __getattribute__(self, name):
            if name.startswith(("put_", "add_", "update_", "remove_", "delete_")):
                calls.append(name)
            return super().__getattribute__(name)

    core = BrokerCore(make_core().config, Counting())
    calls.clear()  # what the core looked up at start
    props = {P.SESSION_EXPIRY_INTERVAL: 300}
    sub = connected(core, "s", 5, clean_start=False, properties=props)
    subscribe(sub, "t", qos=1)
    sub.drop()
    pub = connected(core, "p", 5)
    pub.send(Publish("t", b"q1", 1, packet_id=1))
    out = Peer(core, 5).connect("s", clean_start=False, properties=props)
    assert [m.payload for m in of(out, Publish)] == [b"q1"]
    assert calls == []


def test_offline_queue_bounded_drops_counted():
    core = make_core(max_queued_messages=3)
    sub = connected(core, "s", properties={P.SESSION_EXPIRY_INTERVAL: 300}, clean_start=False)
    subscribe(sub, "t")
    sub.drop()
    pub = connected(core, "p")
    for i in range(5):
        pub.send(Publish("t", b"%d" % i, 1, packet_id=i + 1))
    assert core.stats.publish_dropped["queue_full"] == 2
    out = Peer(core, 5).connect("s", clean_start=False,
                                properties={P.SESSION_EXPIRY_INTERVAL: 300})
    assert [m.payload for m in of(out, Publish)] == [b"0", b"1", b"2"]


def test_slow_consumer_qos0_dropped_first():
    core = make_core(max_outgoing_bytes=100)
    slow = connected(core, "slow")
    fast = connected(core, "fast")
    subscribe(slow, "t", qos=1)
    subscribe(fast, "t", qos=1)
    pub = connected(core, "p")
    for i in range(20):
        pub.send(Publish("t", b"x" * 30, 0))
        fast.recv()  # the fast one keeps reading; the slow one never does
    assert core.stats.publish_dropped["qos0_slow"] > 0
    assert slow.conn.out_bytes <= 100 + 40
    pub.send(Publish("t", b"x" * 30, 1, packet_id=1))
    assert of(fast.recv(), Publish)  # others unaffected
    assert len(core.clients["slow"].queue) == 1  # QoS 1 waits in the bounded queue


# ---------------------------------------------------------- SUBSCRIBE


@pytest.mark.parametrize("version", VERSIONS)
def test_suback_grants_at_most_maximum_qos_MQTT_3_9_3(version):
    core = make_core(max_qos=1)
    sub = connected(core, "s", version)
    out = sub.send(Subscribe(3, [Subscription("a", 2), Subscription("b", 0)]))
    assert isinstance(out[0], Suback) and out[0].packet_id == 3
    assert out[0].reason_codes == (1, 0)


def _raw_subscribe(pid, topic_filter, options):
    body = bytes([pid >> 8, pid & 255, 0]) + len(topic_filter).to_bytes(2, "big") + \
        topic_filter.encode() + bytes([options])
    return bytes([0x82, len(body)]) + body


def test_invalid_filter_closes_connection_MQTT_4_7_1_1():
    core = make_core()
    sub = connected(core, "s")
    out = sub.send_bytes(_raw_subscribe(1, "a/#/b", 1))
    assert sub.conn.closing and sub.violations
    assert of(out, Disconnect)[0].reason_code in (0x81, 0x8F)
    assert "s" not in core.clients or core.trie.subscriptions(core.clients["s"]) == []


def test_resubscribe_replaces_MQTT_3_8_4_3():
    core = make_core()
    sub = connected(core, "s")
    subscribe(sub, "t", qos=0)
    subscribe(sub, "t", qos=2)
    connected(core, "p").send(Publish("t", b"x", 2, packet_id=1))
    got = of(sub.recv(), Publish)
    assert len(got) == 1 and got[0].qos == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_codes_MQTT_3_11_3_1(version):
    core = make_core()
    sub = connected(core, "s", version)
    subscribe(sub, "t")
    out = sub.send(Unsubscribe(4, ["t", "nope"]))
    assert isinstance(out[0], Unsuback) and out[0].packet_id == 4
    if version == 5:
        assert out[0].reason_codes == (0x00, 0x11)
    connected(core, "p", version).send(Publish("t", b"x", 1, packet_id=1))
    assert of(sub.recv(), Publish) == []


def test_no_local_MQTT_3_8_3_3():
    core = make_core()
    a = connected(core, "a")
    subscribe(a, "t", no_local=True)
    a.send(Publish("t", b"mine", 1, packet_id=1))
    assert of(a.recv(), Publish) == []


def test_subscription_identifiers_forwarded_MQTT_3_3_4_3():
    core = make_core()
    s = connected(core, "s")
    subscribe(s, "a/+", pid=1, props={P.SUBSCRIPTION_IDENTIFIER: (7,)})
    subscribe(s, "a/#", pid=2, props={P.SUBSCRIPTION_IDENTIFIER: (9,)})
    connected(core, "p").send(Publish("a/b", b"x", 1, packet_id=1))
    got = of(s.recv(), Publish)
    assert len(got) == 1
    assert sorted(got[0].properties[P.SUBSCRIPTION_IDENTIFIER]) == [7, 9]


def test_shared_subscription_round_robin_MQTT_4_8_2():
    core = make_core()
    a = connected(core, "a")
    b = connected(core, "b")
    subscribe(a, "$share/g/job")
    subscribe(b, "$share/g/job")
    pub = connected(core, "p")
    for i in range(4):
        pub.send(Publish("job", b"%d" % i, 1, packet_id=i + 1))
    ga = of(a.recv(), Publish)
    gb = of(b.recv(), Publish)
    assert len(ga) == 2 and len(gb) == 2
    assert sorted(m.payload for m in ga + gb) == [b"0", b"1", b"2", b"3"]


def test_shared_no_local_is_protocol_error_MQTT_3_8_3_4():
    core = make_core()
    a = connected(core, "a")
    out = a.send_bytes(_raw_subscribe(1, "$share/g/x", 0x05))  # QoS 1 + no local
    assert a.conn.closing
    assert of(out, Disconnect)[0].reason_code == 0x82


# ------------------------------------------------------------- retained


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_store_replace_delete_MQTT_3_3_1_5_to_7(version):
    core = make_core()
    pub = connected(core, "p", version)
    pub.send(Publish("r", b"one", 1, retain=True, packet_id=1))
    pub.send(Publish("r", b"two", 1, retain=True, packet_id=2))
    s = connected(core, "s", version)
    got = of(subscribe(s, "r"), Publish)
    assert [(m.payload, m.retain) for m in got] == [(b"two", True)]  # [MQTT-3.3.1-9]
    pub.send(Publish("r", b"", 1, retain=True, packet_id=3))
    s2 = connected(core, "s2", version)
    assert of(subscribe(s2, "r"), Publish) == []


def test_live_message_has_retain_0_unless_retain_as_published_MQTT_3_3_1_12_13():
    core = make_core()
    a = connected(core, "a")
    b = connected(core, "b")
    subscribe(a, "r")
    subscribe(b, "r", retain_as_published=True)
    connected(core, "p").send(Publish("r", b"x", 0, retain=True))
    assert of(a.recv(), Publish)[0].retain is False
    assert of(b.recv(), Publish)[0].retain is True


def test_retain_handling_1_and_2_MQTT_3_3_1_10_11():
    core = make_core()
    connected(core, "p").send(Publish("r", b"x", 0, retain=True))
    s = connected(core, "s")
    assert of(subscribe(s, "r", retain_handling=2), Publish) == []
    s2 = connected(core, "s2")
    assert len(of(subscribe(s2, "r", retain_handling=1), Publish)) == 1
    assert of(subscribe(s2, "r", retain_handling=1), Publish) == []  # not new any more


def test_retained_not_sent_for_shared_subscription():
    core = make_core()
    connected(core, "p").send(Publish("r", b"x", 0, retain=True))
    s = connected(core, "s")
    assert of(subscribe(s, "$share/g/r"), Publish) == []


def test_retained_cap():
    core = make_core(max_retained_messages=2)
    p = connected(core, "p")
    for t in ("a", "b", "c"):
        p.send(Publish(t, b"x", 0, retain=True))
    assert len(core.retained) == 2 and core.stats.publish_dropped["retained_full"] == 1


# --------------------------------------------------------------- expiry


def test_message_expiry_decremented_and_expired_dropped_MQTT_3_3_2_5_6():
    clock = Clock()
    core = make_core()
    s = connected(core, "s", clock=clock, clean_start=False,
                  properties={P.SESSION_EXPIRY_INTERVAL: 600})
    subscribe(s, "t")
    s.drop()
    p = connected(core, "p", clock=clock)
    p.send(Publish("t", b"short", 1, packet_id=1, properties={P.MESSAGE_EXPIRY_INTERVAL: 5}))
    p.send(Publish("t", b"long", 1, packet_id=2, properties={P.MESSAGE_EXPIRY_INTERVAL: 100}))
    clock.advance(30)
    out = Peer(core, 5, clock).connect("s", clean_start=False,
                                       properties={P.SESSION_EXPIRY_INTERVAL: 600})
    got = of(out, Publish)
    assert [m.payload for m in got] == [b"long"]
    assert got[0].properties[P.MESSAGE_EXPIRY_INTERVAL] == 70


def test_session_expires_when_abandoned():
    clock = Clock()
    core = make_core()
    s = connected(core, "s", clock=clock, clean_start=False,
                  properties={P.SESSION_EXPIRY_INTERVAL: 10})
    subscribe(s, "t")
    s.drop()
    clock.advance(5)
    core.tick(clock.now)
    assert "s" in core.clients
    clock.advance(6)
    core.tick(clock.now)
    assert "s" not in core.clients and len(core.trie) == 0


def test_v311_persistent_session_capped_by_config():
    core = make_core(persistent_session_expiry=50)
    connected(core, "s", 4, clean_start=False)
    assert core.clients["s"].expiry == 50


def test_disconnect_cannot_raise_expiry_from_zero_MQTT_3_14_2_2():
    core = make_core()
    s = connected(core, "s")
    out = s.send(Disconnect(0, {P.SESSION_EXPIRY_INTERVAL: 100}))
    assert of(out, Disconnect)[0].reason_code == 0x82
    assert s.conn.closing and core.clients["s"].expiry == 0


# ----------------------------------------------------------------- wills


def _will_setup(version, **will_props):
    core = make_core()
    w = connected(core, "watcher", version)
    subscribe(w, "will/#")
    props = will_props or None
    c = Peer(core, version)
    c.connect("dying", will=Will("will/dying", b"gone", 1, False, props))
    return core, w, c


@pytest.mark.parametrize("version", VERSIONS)
def test_will_published_on_abnormal_close_MQTT_3_1_2_8(version):
    core, w, c = _will_setup(version)
    c.drop()
    assert [m.payload for m in of(w.recv(), Publish)] == [b"gone"]


@pytest.mark.parametrize("version", VERSIONS)
def test_will_not_published_on_normal_disconnect_MQTT_3_1_2_10(version):
    core, w, c = _will_setup(version)
    c.send(Disconnect())
    c.drop()
    assert of(w.recv(), Publish) == []


def test_disconnect_with_will_message_0x04():
    core, w, c = _will_setup(5)
    c.send(Disconnect(0x04))
    c.drop()
    assert len(of(w.recv(), Publish)) == 1


def test_will_on_protocol_violation():
    core, w, c = _will_setup(5)
    c.send_bytes(b"\xc0\x01\x00")  # malformed PINGREQ
    assert c.conn.closing
    c.drop()
    assert len(of(w.recv(), Publish)) == 1


def test_will_delay_and_cancel_on_reconnect_MQTT_3_1_3_9():
    clock = Clock()
    core = make_core()
    w = connected(core, "watcher", clock=clock)
    subscribe(w, "will/#")
    props = {P.SESSION_EXPIRY_INTERVAL: 100}
    c = Peer(core, 5, clock)
    c.connect("d", clean_start=False, properties=props,
              will=Will("will/d", b"late", 0, False, {P.WILL_DELAY_INTERVAL: 10}))
    c.drop()
    clock.advance(5)
    core.tick(clock.now)
    assert of(w.recv(), Publish) == []
    Peer(core, 5, clock).connect("d", clean_start=False, properties=props)
    clock.advance(20)
    core.tick(clock.now)
    assert of(w.recv(), Publish) == []  # came back in time: no will
    # and when it does not come back, the will goes after the delay
    c3 = Peer(core, 5, clock)
    c3.connect("e", will=Will("will/e", b"late", 0, False, {P.WILL_DELAY_INTERVAL: 10}),
               properties=props)
    c3.drop()
    clock.advance(11)
    core.tick(clock.now)
    assert [m.payload for m in of(w.recv(), Publish)] == [b"late"]


# ------------------------------------------------------------ v5 extras


def test_topic_alias_inbound_and_outbound():
    core = make_core(topic_alias_maximum=4)
    s = connected(core, "s", properties={P.TOPIC_ALIAS_MAXIMUM: 3})
    subscribe(s, "t/#")
    p = connected(core, "p")
    p.send(Publish("t/long/topic", b"1", 0, properties={P.TOPIC_ALIAS: 1}))
    p.send(Publish("", b"2", 0, properties={P.TOPIC_ALIAS: 1}))
    got = of(s.recv(), Publish)
    assert got[0].topic == "t/long/topic" and got[0].properties[P.TOPIC_ALIAS] == 1
    assert got[1].topic == "" and got[1].properties[P.TOPIC_ALIAS] == 1  # [MQTT-3.3.2-12]


def test_message_too_large_for_receiver_not_sent_MQTT_3_1_2_25():
    core = make_core()
    small = connected(core, "small", properties={P.MAXIMUM_PACKET_SIZE: 50})
    big = connected(core, "big")
    subscribe(small, "t")
    subscribe(big, "t")
    connected(core, "p").send(Publish("t", b"x" * 100, 1, packet_id=1))
    assert of(small.recv(), Publish) == []
    assert len(of(big.recv(), Publish)) == 1
    assert core.stats.publish_dropped["too_large"] == 1


def test_receive_maximum_exceeded_0x93_MQTT_3_3_4_7():
    core = make_core(receive_maximum=2)
    p = connected(core, "p")
    p.send(Publish("t", b"x", 2, packet_id=1))
    p.send(Publish("t", b"x", 2, packet_id=2))
    out = p.send(Publish("t", b"x", 2, packet_id=3))
    assert p.conn.closing
    assert of(out, Disconnect)[0].reason_code == 0x93


def test_properties_forwarded_unchanged_MQTT_3_3_2_17_to_20():
    core = make_core()
    s = connected(core, "s")
    subscribe(s, "t")
    props = {P.PAYLOAD_FORMAT_INDICATOR: 1, P.CONTENT_TYPE: "text/plain",
             P.RESPONSE_TOPIC: "reply/1", P.CORRELATION_DATA: b"\x01\x02",
             P.USER_PROPERTY: (("k", "v"), ("k", "w"))}
    connected(core, "p").send(Publish("t", b"x", 1, packet_id=1, properties=props))
    got = of(s.recv(), Publish)[0].properties
    for k, v in props.items():
        assert got[k] == v


def test_puback_no_matching_subscribers_and_not_authorized():
    class Deny:
        def can_publish(self, cid, user, topic):
            return topic != "secret"

        def can_subscribe(self, cid, user, f):
            return f != "secret"

        def can_receive(self, cid, user, topic):
            return True

    from fastmqtt.broker.config import BrokerConfig
    from fastmqtt.broker.core import BrokerCore
    core = BrokerCore(BrokerConfig(persistence=False), authorizer=Deny())
    p = connected(core, "p")
    assert p.send(Publish("nobody", b"x", 1, packet_id=1))[0].reason_code == 0x10
    assert p.send(Publish("secret", b"x", 1, packet_id=2))[0].reason_code == 0x87
    s = connected(core, "s")
    assert subscribe(s, "secret")[0].reason_codes == (0x87,)
    p4 = connected(core, "p4", 4)
    out = p4.send(Publish("secret", b"x", 1, packet_id=3))
    assert isinstance(out[0], Puback)  # 3.1.1: acked normally, dropped


# --------------------------------------------------------------- $SYS


def test_sys_topics_published_retained():
    from fastmqtt.broker.sys_topics import SysTopics
    core = make_core()
    s = connected(core, "s")
    SysTopics(core, core.stats, "0.1.0").publish(1000.0)
    got = {m.topic: m.payload for m in of(subscribe(s, "$SYS/#"), Publish)}
    assert got["$SYS/broker/clients/connected"] == b"1"
    assert "$SYS/broker/load/messages/received/1min" in got
    assert got["$SYS/broker/version"].startswith(b"fastmqtt")
    # a normal '#' subscription does not see $SYS [MQTT-4.7.2-1]
    s2 = connected(core, "s2")
    assert of(subscribe(s2, "#"), Publish) == []


# ------------------------------------------------------------- restore


def test_restore_from_store_resends_with_dup():
    from fastmqtt.broker.config import BrokerConfig
    from fastmqtt.broker.core import BrokerCore
    from fastmqtt.store.memory import MemoryStore

    store = MemoryStore(clock=lambda: 1_000_100.0)
    store.open()
    core = BrokerCore(BrokerConfig(), store=store)
    s = connected(core, "s", 4, clean_start=False)
    subscribe(s, "t")
    p = connected(core, "p", 4)
    p.send(Publish("t", b"inflight", 1, packet_id=1))
    sent = of(s.recv(), Publish)[0]
    p.send(Publish("r", b"kept", 1, retain=True, packet_id=2))
    s.drop()
    p.send(Publish("t", b"queued", 1, packet_id=3))
    snap = store.open()
    core2 = BrokerCore(BrokerConfig(), store=store)
    core2.restore(snap, 1_000_100.0)
    out = Peer(core2, 4).connect("s", clean_start=False)
    assert out[0].session_present
    pubs = of(out, Publish)
    assert [(m.payload, m.dup) for m in pubs] == [(b"inflight", True), (b"queued", False)]
    assert pubs[0].packet_id == sent.packet_id
    assert core2.retained.get("r").payload == b"kept"


def test_core_hands_its_message_to_the_sqlite_store_lite_entries(tmp_path):
    """The core passes its Message with a delivery (src), so the SQLite
    store keeps a message one client has as that client's id, no object of
    its own, and keeps nothing once it is acknowledged. A retained message
    given to a new persistent subscriber after that is stored again from
    the core's Message: it survives a restart."""
    from fastmqtt.broker.config import BrokerConfig
    from fastmqtt.broker.core import BrokerCore
    from fastmqtt.store import SqliteStore

    store = SqliteStore(str(tmp_path / "d"), compactor="thread")
    store.open(now=1_000_100.0)
    try:
        core = BrokerCore(BrokerConfig(), store=store)
        s = connected(core, "s", 4, clean_start=False)
        subscribe(s, "r")
        s.drop()
        p = connected(core, "p", 4)
        p.send(Publish("r", b"kept", 1, retain=True, packet_id=1))
        mid = core.retained.get("r").msg_id
        assert store._msgs[mid] == "s" and type(store._msgs[mid]) is str  # lite
        s = Peer(core, 4)
        pub = of(s.connect("s", clean_start=False), Publish)[0]
        assert pub.payload == b"kept"
        s.send(Puback(pub.packet_id))
        assert mid not in store._msgs and mid not in store._released
        t = connected(core, "t", 4, clean_start=False)
        subscribe(t, "r")  # the retained message, delivered again: stored again
        assert mid in store._msgs
        assert store.wait_durable()
    finally:
        store.close()
    again = SqliteStore(str(tmp_path / "d"))
    snap = again.open(now=1_000_100.0)
    try:
        assert snap.messages[mid][0].payload == b"kept"
        t_rec, = [r for r in snap.sessions if r.client_id == "t"]
        assert [d.msg_id for d in t_rec.deliveries] == [mid]
    finally:
        again.close()


def test_queued_and_retained_messages_are_left_out_of_the_cyclic_gc():
    # Messages waiting in offline queues and retained messages (live, and
    # restored from the store) are untracked: collections do not walk them.
    # They still go out whole, and go away with their last reference.
    import gc
    import sys

    from fastmqtt.broker.config import BrokerConfig
    from fastmqtt.broker.core import BrokerCore
    from fastmqtt.store.memory import MemoryStore

    store = MemoryStore(clock=lambda: 1_000_100.0)
    store.open()
    core = BrokerCore(BrokerConfig(), store=store)
    s = connected(core, "s", 5, clean_start=False,
                  properties={P.SESSION_EXPIRY_INTERVAL: 300})
    subscribe(s, "t")
    s.drop()
    p = connected(core, "p", 5)
    p.send(Publish("t", b"queued", 1, packet_id=1, properties={P.CONTENT_TYPE: "text/plain"}))
    p.send(Publish("r", b"kept", 1, retain=True, packet_id=2))
    og = core.clients["s"].queue[0]
    assert not gc.is_tracked(og) and not gc.is_tracked(og.msg)
    assert not gc.is_tracked(core.retained.get("r"))
    gc.collect()
    snap = store.open()
    core2 = BrokerCore(BrokerConfig(), store=store)
    core2.restore(snap, 1_000_100.0)
    og2 = core2.clients["s"].queue[0]
    assert not gc.is_tracked(og2) and not gc.is_tracked(og2.msg)
    assert not gc.is_tracked(core2.retained.get("r"))
    back = Peer(core, 5)
    pub = of(back.connect("s", clean_start=False,
                          properties={P.SESSION_EXPIRY_INTERVAL: 300}), Publish)[0]
    assert (pub.payload, pub.properties[P.CONTENT_TYPE]) == (b"queued", "text/plain")
    # Delivered and acknowledged: nothing but this frame refers to it now.
    back.send(Puback(pub.packet_id))
    assert sys.getrefcount(og) == 2


def test_takeover_of_non_persistent_session_starts_fresh_MQTT_3_2_2_2():
    core = make_core()
    a = connected(core, "dup", 4, clean_start=True)
    subscribe(a, "t")
    b = Peer(core, 4)
    out = b.connect("dup", clean_start=False)
    assert out[0].session_present is False  # the old session ended with its connection
    assert core.trie.subscriptions(core.clients["dup"]) == []
    assert core.clients["dup"].conn is b.conn


def test_takeover_of_persistent_session_keeps_it():
    core = make_core()
    a = connected(core, "dup", 4, clean_start=False)
    subscribe(a, "t")
    b = Peer(core, 4)
    assert b.connect("dup", clean_start=False)[0].session_present is True
    connected(core, "p", 4).send(Publish("t", b"x", 1, packet_id=1))
    assert len(of(b.recv(), Publish)) == 1


def test_unsupported_authentication_method_refused_0x8C():
    core = make_core()
    peer = Peer(core, 5)
    out = peer.connect("a", properties={P.AUTHENTICATION_METHOD: "SCRAM-SHA-1"})
    assert out[0].reason_code == 0x8C and peer.conn.closing
    assert "a" not in core.clients


def test_receive_maximum_exceeded_by_qos1_while_acks_wait_for_the_store():
    from fastmqtt.broker.config import BrokerConfig
    from fastmqtt.broker.core import BrokerCore

    class SlowStore:  # every ack waits for a commit that has not happened yet
        persistent = True
        _n = 0

        def mark(self):
            self._n += 1
            return self._n

        def __getattr__(self, name):
            return lambda *a, **k: None

    core = BrokerCore(BrokerConfig(receive_maximum=3), store=SlowStore())
    p = Peer(core, 5)
    assert p.connect("p")[0].reason_code == 0
    for i in range(3):
        core.handle(p.conn, Publish("t", b"x", 1, packet_id=i + 1), 0.0)
    assert not p.conn.closing and len(p.conn.acks) == 3
    core.handle(p.conn, Publish("t", b"x", 1, packet_id=4), 0.0)
    assert p.conn.closing


def test_history_records_matching_and_answers_requests_without_fanout():
    from fastmqtt.broker.config import BrokerConfig
    from fastmqtt.broker.core import BrokerCore

    class FakeHistory:
        def __init__(self):
            self.recorded = []

        def matches(self, topic):
            return topic.startswith("chat/")

        def record(self, publish, now):
            self.recorded.append(publish.topic)

        def handle_request(self, publish, client_id, now):
            reply = publish.properties[P.RESPONSE_TOPIC]
            return [Publish(reply, b"old message", 1)]

    h = FakeHistory()
    core = BrokerCore(BrokerConfig(persistence=False), history=h)
    asker = connected(core, "asker")
    subscribe(asker, "reply/asker")
    spy = connected(core, "spy")
    subscribe(spy, "$history/#")
    p = connected(core, "p")
    p.send(Publish("chat/1", b"x", 1, packet_id=1))
    p.send(Publish("other", b"x", 1, packet_id=2))
    assert h.recorded == ["chat/1"]
    out = asker.send(Publish("$history/chat/1", b"", 1, packet_id=3,
                             properties={P.RESPONSE_TOPIC: "reply/asker"}))
    assert [m.payload for m in of(out, Publish)] == [b"old message"]
    assert of(spy.recv(), Publish) == []  # the request itself is not fanned out
