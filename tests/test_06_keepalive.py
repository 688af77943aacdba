"""Keep alive: the server closes a silent connection after 1.5 x the keepalive
[MQTT-3.1.2-24 (3.1.1) / MQTT-3.1.2-22 (v5)], fires its will, and answers PINGREQ.

Only the timeout itself is compared with Mosquitto (whose 5 s check timer makes
short keepalives slow to observe); the rest runs on fastmqtt."""

from __future__ import annotations

import time

import pytest

from fixtures_broker import PINGREQ, unique

pytestmark = pytest.mark.integration


def test_silent_connection_closed_after_one_and_a_half_keepalive(broker_impl, raw):
    # A 3.1.1 and a v5 client with keepalive 1 s go silent at the same moment.
    topic = unique("ka")
    w = raw(broker_impl, 5)
    w.connect(unique("kaw"))
    w.subscribe(topic, 1)
    clients = {}
    t0 = time.monotonic()
    for version in (4, 5):
        c = raw(broker_impl, version)
        c.connect(unique("ka"), keepalive=1, will=(topic, f"timed out {version}".encode(), 1, False))
        clients[version] = c
    # Mosquitto 2.0.11 checks keepalives on a 5 s timer, so allow it longer.
    limit = 3.5 if broker_impl.impl == "fastmqtt" else 9.0
    for version, c in clients.items():
        got = c.expect_closed(timeout=limit + 1)
        elapsed = time.monotonic() - t0
        # Not before the keepalive itself; about 1.5 s for fastmqtt.
        assert 1.0 <= elapsed <= limit, elapsed
        if version == 5:
            # v5 may say why: 0x8D Keep Alive timeout.
            assert all((p.type, p.reason_code) == ("DISCONNECT", 0x8D) for p in got), got
            if broker_impl.impl == "fastmqtt":
                assert [(p.type, p.reason_code) for p in got] == [("DISCONNECT", 0x8D)]
        else:
            assert got == []
    # The close is abnormal, so the wills are published [MQTT-3.1.2-8].
    wills = sorted(w.recv_type("PUBLISH").payload for _ in range(2))
    assert wills == [b"timed out 4", b"timed out 5"]


def test_pingreq_and_traffic_keep_connection_alive_MQTT_3_12_4_1(shared_broker, raw):
    # Three clients with keepalive 1 s over 2.5 s: a 3.1.1 and a v5 one that send
    # PINGREQ (answered with PINGRESP [MQTT-3.12.4-1]) and one that only
    # publishes (any control packet counts as activity). None is closed.
    pingers = [raw(shared_broker, v) for v in (4, 5)]
    for c in pingers:
        c.connect(unique("ping"), keepalive=1)
    talker = raw(shared_broker, 5)
    talker.connect(unique("act"), keepalive=1)
    topic = unique("act")
    t_end = time.monotonic() + 2.5
    while time.monotonic() < t_end:
        for c in pingers:
            c.send(PINGREQ)
            assert c.recv_type("PINGRESP", timeout=2).raw == b"\xd0\x00"
        talker.publish(topic, b"x", qos=0)
        time.sleep(0.5)  # pacing the clients' own traffic, not synchronisation
    for c in pingers + [talker]:
        assert c.ping().type == "PINGRESP"


def test_keepalive_zero_means_no_timeout(shared_broker, raw):
    broker_impl = shared_broker
    c = raw(broker_impl, 5)
    c.connect(unique("ka0"), keepalive=0)
    c.expect_silence(2.0)  # longer than 1.5 x any keepalive a test here uses
    assert c.ping().type == "PINGRESP"


def test_paho_keepalive_pings(shared_broker, paho):
    broker_impl = shared_broker
    # paho pings by itself; the connection outlives several keepalive periods.
    c = paho(broker_impl, 5, keepalive=1)
    topic = unique("pk")
    c.subscribe(topic, 1)
    assert not c.wait_disconnected(2.5)
    c.publish(topic, b"still here", qos=1)
    assert c.get().payload == b"still here"


def test_v5_server_keep_alive_is_enforced(broker_factory, raw):
    # fastmqtt with --max-keepalive 1: the client asked for 60 s, the server
    # answers Server Keep Alive 1 and then enforces it [MQTT-3.2.2-21].
    b = broker_factory("fastmqtt", args=["--max-keepalive", "1"])
    c = raw(b, 5)
    t0 = time.monotonic()
    ack = c.connect(unique("ska"), keepalive=60)
    assert ack.properties.get(0x13) == 1
    got = c.expect_closed(timeout=5)
    assert 1.0 <= time.monotonic() - t0 <= 3.5
    assert [(p.type, p.reason_code) for p in got] == [("DISCONNECT", 0x8D)]
