"""Will messages: published on abnormal close, not on DISCONNECT, v5 0x04, will
retain, will properties and the v5 Will Delay Interval."""

from __future__ import annotations

import time

import pytest

from fixtures_broker import connect_bytes, disconnect_bytes, publish_bytes, unique

pytestmark = pytest.mark.integration

SESSION_EXPIRY_INTERVAL = 0x11
WILL_DELAY_INTERVAL = 0x18


def watcher(raw, broker, topic, version=5):
    w = raw(broker, version)
    w.connect(unique("watch"))
    w.subscribe(topic, 1)
    return w


def with_will(raw, broker, topic, version=5, payload=b"gone", qos=1, retain=False, will_props=None,
              props=None, client_id=None, clean=True):
    c = raw(broker, version)
    ack = c.connect(client_id or unique("will"), version=version, clean=clean, props=props,
                    will=(topic, payload, qos, retain, will_props))
    assert ack.reason_code == 0
    return c


@pytest.mark.parametrize("version", [4, 5])
def test_abnormal_close_publishes_will_MQTT_3_1_2_8(broker_impl, raw, version):
    topic = unique("w")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, version)
    c.close()  # TCP close without DISCONNECT
    p = w.recv_type("PUBLISH")
    assert (p.topic, p.payload, p.qos) == (topic, b"gone", 1)


@pytest.mark.parametrize("version", [4, 5])
def test_disconnect_discards_will_MQTT_3_1_2_10(broker_impl, raw, version):
    topic = unique("w")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, version)
    c.disconnect()
    w.expect_silence(0.7)


def test_v5_disconnect_with_will_0x04_publishes_it(broker_impl, raw):
    topic = unique("w")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, 5)
    c.disconnect(reason=0x04)
    assert w.recv_type("PUBLISH").payload == b"gone"


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("violation", ["qos3", "second_connect"])
def test_protocol_error_publishes_will_MQTT_3_1_2_8(broker_impl, raw, version, violation):
    # A connection the server closes for a protocol violation is not a normal
    # disconnect: the will goes out [MQTT-3.1.2-8].
    if violation == "second_connect" and broker_impl.impl == "mosquitto":
        pytest.xfail("Mosquitto 2.0.11 drops the will when a second CONNECT closes the connection")
    topic = unique("w")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, version)
    if violation == "qos3":
        c.send(publish_bytes("x", b"", qos=3, packet_id=1, version=version))
    else:
        c.send(connect_bytes(unique("again"), version=version))
    c.expect_closed()
    assert w.recv_type("PUBLISH").payload == b"gone"


@pytest.mark.parametrize("version", [4, 5])
def test_will_retain_MQTT_3_1_2_17(broker_impl, raw, version):
    topic = unique("wr")
    c = with_will(raw, broker_impl, topic, version, payload=b"offline", retain=True)
    w = watcher(raw, broker_impl, topic)
    c.close()
    assert w.recv_type("PUBLISH").payload == b"offline"
    late = raw(broker_impl, 5)
    late.connect(unique("late"))
    late.subscribe(topic, 1)
    p = late.recv_type("PUBLISH")
    assert (p.payload, p.retain) == (b"offline", True)
    late.publish(topic, b"", qos=1, packet_id=1, retain=True)


def test_v5_will_properties_forwarded(broker_impl, raw):
    topic = unique("wp")
    w = watcher(raw, broker_impl, topic)
    props = [(0x03, "application/json"), (0x26, ("who", "me")), (0x26, ("why", "crash")), (0x01, 1)]
    c = with_will(raw, broker_impl, topic, 5, payload=b'{"online":false}', will_props=props)
    c.close()
    p = w.recv_type("PUBLISH")
    assert p.properties[0x03] == "application/json"
    assert p.properties[0x26] == [("who", "me"), ("why", "crash")]
    assert p.properties[0x01] == 1


def test_v5_will_delay_MQTT_3_1_3_9(broker_impl, raw):
    # The will waits for the Will Delay Interval (or the session's end, if earlier).
    topic = unique("wd")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, 5, will_props={WILL_DELAY_INTERVAL: 1},
                  props={SESSION_EXPIRY_INTERVAL: 60}, clean=False)
    t0 = time.monotonic()
    c.close()
    p = w.recv_type("PUBLISH", timeout=5)
    waited = time.monotonic() - t0
    assert p.payload == b"gone"
    assert waited >= 0.8, waited


def test_v5_will_delay_cancelled_by_reconnect_MQTT_3_1_3_9(broker_impl, raw):
    # Reconnecting within the delay means the will is not published.
    topic = unique("wdc")
    cid = unique("wdc")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, 5, will_props={WILL_DELAY_INTERVAL: 1},
                  props={SESSION_EXPIRY_INTERVAL: 60}, client_id=cid, clean=False)
    c.close()
    c = raw(broker_impl, 5)
    assert c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 60}).session_present
    w.expect_silence(1.8)  # past the 1 s delay
    c.disconnect()


def test_v5_will_delay_longer_than_session_fires_at_session_end(broker_impl, raw):
    # Session Expiry 1 s, Will Delay 30 s: the session ends first, the will goes then.
    topic = unique("wds")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, 5, will_props={WILL_DELAY_INTERVAL: 30},
                  props={SESSION_EXPIRY_INTERVAL: 1}, clean=False)
    c.close()
    assert w.recv_type("PUBLISH", timeout=5).payload == b"gone"


@pytest.mark.parametrize("version", [4, 5])
def test_takeover_publishes_will_of_old_connection(broker_impl, raw, version):
    # With a clean start the old session ends, so its will is published
    # [MQTT-3.1.4-3] ("...the Will Message is published").
    topic = unique("wt")
    cid = unique("wt")
    w = watcher(raw, broker_impl, topic)
    old = with_will(raw, broker_impl, topic, version, client_id=cid)
    new = raw(broker_impl, version)
    assert new.connect(cid).reason_code == 0
    old.expect_closed()
    assert w.recv_type("PUBLISH").payload == b"gone"


def test_will_not_sent_to_no_local_self_irrelevant(broker_impl, raw):
    # A will is published by the server on behalf of a dead client; other
    # clients sharing the topic with "no local" still get it.
    topic = unique("wnl")
    w = raw(broker_impl, 5)
    w.connect(unique("wnl"))
    w.subscribe(topic, options=1 | 0x04)
    c = with_will(raw, broker_impl, topic, 5)
    c.close()
    assert w.recv_type("PUBLISH").payload == b"gone"


def test_v5_disconnect_normal_after_will_delay_set(broker_impl, raw):
    topic = unique("wdn")
    w = watcher(raw, broker_impl, topic)
    c = with_will(raw, broker_impl, topic, 5, will_props={WILL_DELAY_INTERVAL: 1},
                  props={SESSION_EXPIRY_INTERVAL: 10}, clean=False)
    c.send(disconnect_bytes(5, 0))
    c.expect_closed()
    w.expect_silence(1.5)
