"""Limits: bounded per-session queues (QoS 0 dropped first), slow consumers
disconnected without hurting anyone else, drop counters."""

from __future__ import annotations

import queue
import socket
import time

import pytest

from fixtures_broker import RawClient, ack_bytes, publish_bytes, unique

pytestmark = pytest.mark.integration

SESSION_EXPIRY_INTERVAL = 0x11


def offline_session(raw, broker, cid, topic, qos=1):
    c = raw(broker, 5)
    c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 300})
    c.subscribe(topic, qos)
    c.disconnect()


def drain(c, n_max=100, quiet=0.5):
    """Receive PUBLISHes (acknowledging them) until ``quiet`` seconds pass without one."""
    got = []
    while len(got) < n_max:
        try:
            p = c.recv_type("PUBLISH", timeout=quiet)
        except TimeoutError:
            break
        if p.qos == 1:
            c.send(ack_bytes("PUBACK", p.packet_id))
        elif p.qos == 2:
            c.send(ack_bytes("PUBREC", p.packet_id))
        got.append(p.payload)
    return got


def sys_value(raw, broker, topic, pred, timeout=5.0):
    """Wait for a $SYS topic value satisfying ``pred`` (values arrive every sys_interval)."""
    c = raw(broker, 5)
    c.connect(unique("sys"))
    c.subscribe(topic, 0)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        p = c.recv_type("PUBLISH", timeout=max(0.01, deadline - time.monotonic()))
        last = p.payload.decode()
        if pred(last):
            return last
    raise AssertionError(f"{topic} never satisfied the condition; last value {last!r}")


def test_offline_queue_is_bounded(broker_factory, raw, impl):
    # max 4 queued messages: of 7 QoS 1 messages an offline session gets the first 4.
    if impl == "fastmqtt":
        b = broker_factory("fastmqtt", config={"max_queued_messages": 4, "sys_interval": 1})
    else:
        b = broker_factory("mosquitto", mosquitto_conf=["max_queued_messages 4", "sys_interval 1"])
    cid, topic = unique("bq"), unique("bq")
    offline_session(raw, b, cid, topic)
    pub = raw(b, 5)
    pub.connect(unique("bqp"))
    for i in range(7):
        pub.publish(topic, f"m{i}".encode(), qos=1, packet_id=i + 1)
    c = raw(b, 5)
    assert c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 300}).session_present
    assert drain(c) == [b"m0", b"m1", b"m2", b"m3"]
    # The three refused messages are counted (Mosquitto's name for the counter).
    sys_value(raw, b, "$SYS/broker/publish/messages/dropped", lambda v: int(v) >= 3)


def test_queue_full_drops_qos0_first(broker_factory, raw):
    # With QoS 0 queued for offline sessions, a full queue makes room for a QoS 1
    # message by dropping the oldest QoS 0 one; QoS 1 is refused only when no QoS 0
    # is left to drop.
    b = broker_factory("fastmqtt", config={"max_queued_messages": 4, "queue_qos0_messages": True})
    cid, topic = unique("q0"), unique("q0")
    offline_session(raw, b, cid, topic)
    pub = raw(b, 5)
    pub.connect(unique("q0p"))
    plan = [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 1), ("f", 1), ("g", 1), ("h", 0)]
    for i, (payload, qos) in enumerate(plan):
        pub.publish(topic, payload.encode(), qos=qos, packet_id=i + 1 if qos else 0)
    pub.ping()  # the QoS 0 ones have been handled too
    c = raw(b, 5)
    assert c.connect(cid, clean=False, props={SESSION_EXPIRY_INTERVAL: 300}).session_present
    assert drain(c) == [b"b", b"d", b"e", b"f"]


def test_slow_consumer_disconnected_others_unaffected(broker_factory, raw, paho):
    b = broker_factory("fastmqtt", config={"max_outgoing_bytes": 65536, "slow_consumer_timeout": 1.0})
    topic = unique("slow")
    # A subscriber that never reads, with small socket buffers.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((b.host, b.port))
    slow_c = RawClient.from_socket(slow, 5)
    slow_cid = unique("slowc")
    slow_c.connect(slow_cid)
    slow_c.subscribe(topic, 0)
    fast = paho(b, 5)
    fast.subscribe(topic, 1)  # QoS 0 messages may be shed under load; the QoS 1 "last" may not
    pub = raw(b, 5)
    pub.connect(unique("slowp"))
    mark = b.mark()
    chunk = b"z" * 16384
    for i in range(400):  # 6.5 MB, far more than any buffer on the way
        pub.send(publish_bytes(topic, chunk))
    pub.publish(topic, b"last", qos=1, packet_id=1)
    # The fast subscriber keeps up (it may lose QoS 0 under load, but not the end).
    deadline = time.monotonic() + 20
    try:
        while fast.get(timeout=max(0.01, deadline - time.monotonic())).payload != b"last":
            pass
    except queue.Empty:
        raise AssertionError("fast subscriber never got the last message:\n" + b.log(mark)) from None
    assert b.wait_for_log(r"slow consumer", since=mark, timeout=10) is not None, b.log(mark)
    # Its connection is closed: draining what is buffered ends in EOF.
    slow.settimeout(5)
    total = 0
    while True:
        data = slow.recv(1 << 20)
        if not data:
            break
        total += len(data)
    assert total < 400 * len(chunk)
    assert pub.ping().type == "PINGRESP"
    slow.close()


def test_slow_qos1_consumer_queue_bounded(broker_factory, raw, paho):
    # A QoS 1 subscriber that never acknowledges gets at most its window; the
    # rest waits in a bounded queue and the excess is counted as dropped.
    b = broker_factory("fastmqtt", config={"max_queued_messages": 10, "max_inflight_messages": 5,
                                           "sys_interval": 1})
    topic = unique("sq")
    c = raw(b, 5)
    c.connect(unique("sq"))
    c.subscribe(topic, 1)
    pub = raw(b, 5)
    pub.connect(unique("sqp"))
    for i in range(30):
        pub.publish(topic, str(i).encode(), qos=1, packet_id=i + 1)
    first = [c.recv_type("PUBLISH") for _ in range(5)]
    c.expect_silence(0.3)
    for p in first:
        c.send(ack_bytes("PUBACK", p.packet_id))
    rest = drain(c)
    got = [int(p.payload) for p in first] + [int(x) for x in rest]
    assert got == list(range(15))  # 5 in flight + 10 queued, in order
    sys_value(raw, b, "$SYS/broker/publish/messages/dropped", lambda v: int(v) >= 15)


def test_many_connections(broker_impl, raw):
    # 200 concurrent clients connect, subscribe and get one message each.
    topic = unique("many")
    clients = []
    for i in range(200):
        c = raw(broker_impl, 5 if i % 2 else 4)
        c.connect(unique("m"))
        c.subscribe(topic, 0)
        clients.append(c)
    pub = raw(broker_impl, 5)
    pub.connect(unique("mp"))
    pub.publish(topic, b"hello all", qos=1, packet_id=1)
    for c in clients:
        assert c.recv_type("PUBLISH").payload == b"hello all"
