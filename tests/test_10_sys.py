"""``$SYS`` topics: present with Mosquitto's names, values that follow what the
broker does, and published retained so a late subscriber gets them at once."""

from __future__ import annotations

import time

import pytest

from fixtures_broker import BrokerProcess, RawClient, unique

pytestmark = pytest.mark.integration

# Names both brokers publish (Mosquitto 2.0's, checked against it below).
CORE_NAMES = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/total",
    "$SYS/broker/clients/maximum",
    "$SYS/broker/clients/disconnected",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/publish/messages/dropped",
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/store/messages/count",
    "$SYS/broker/load/messages/received/1min",
    "$SYS/broker/load/messages/sent/1min",
    "$SYS/broker/load/connections/1min",
]


@pytest.fixture(scope="module", params=["fastmqtt", "mosquitto"])
def sys_broker(request, tmp_path_factory):
    """A broker per implementation publishing $SYS every second."""
    if request.param == "fastmqtt":
        b = BrokerProcess("fastmqtt", tmp_path_factory.mktemp("sysf"), config={"sys_interval": 1})
    else:
        b = BrokerProcess("mosquitto", tmp_path_factory.mktemp("sysm"), mosquitto_conf=["sys_interval 1"])
    try:
        b.start()
        yield b
    finally:
        b.kill()


def collect(broker, flt="$SYS/#", seconds=3.0, until=CORE_NAMES):
    """Latest value per topic seen on ``flt`` within ``seconds``, returning early
    once every topic in ``until`` has been seen."""
    c = RawClient(broker, 5)
    try:
        c.connect(unique("sys"))
        c.subscribe(flt, 0)
        values = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                p = c.recv_type("PUBLISH", timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            values[p.topic] = p.payload.decode("utf-8", "replace")
            if all(n in values for n in until):
                break
        return values
    finally:
        c.close()


def test_sys_names_match_mosquitto(sys_broker):
    values = collect(sys_broker)
    missing = [n for n in CORE_NAMES if n not in values]
    assert not missing, (missing, sorted(values))
    assert int(values["$SYS/broker/uptime"].split()[0]) >= 0
    assert values["$SYS/broker/uptime"].endswith("seconds")
    for name in CORE_NAMES[2:16]:
        assert int(values[name]) >= 0, (name, values[name])


def test_sys_retained_for_late_subscriber(sys_broker):
    # The latest value comes at once, flagged retained (Mosquitto does the same).
    c = RawClient(sys_broker, 5)
    try:
        c.connect(unique("sysr"))
        t0 = time.monotonic()
        c.subscribe("$SYS/broker/version", 0)
        p = c.recv_type("PUBLISH", timeout=3)
        assert p.retain is True
        assert time.monotonic() - t0 < 0.9
    finally:
        c.close()


def test_sys_version_names_the_broker(sys_broker):
    v = collect(sys_broker, "$SYS/broker/version", until=["$SYS/broker/version"])["$SYS/broker/version"]
    assert v.startswith("fastmqtt" if sys_broker.impl == "fastmqtt" else "mosquitto")


def watch(broker, conditions, timeout=6.0):
    """Subscribe to $SYS/# until every ``{topic: predicate}`` holds for the
    latest value of its topic; AssertionError with the values on timeout."""
    c = RawClient(broker, 5)
    values = {}
    try:
        c.connect(unique("watch"))
        c.subscribe("$SYS/#", 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                p = c.recv_type("PUBLISH", timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            values[p.topic] = p.payload.decode()
            if all(t in values and pred(int(values[t])) for t, pred in conditions.items()):
                return {t: int(values[t]) for t in conditions}
        raise AssertionError({t: values.get(t) for t in conditions})
    finally:
        c.close()


CONNECTED = "$SYS/broker/clients/connected"
RECEIVED = "$SYS/broker/messages/received"
RETAINED = "$SYS/broker/retained messages/count"


def test_sys_values_follow_activity(sys_broker):
    # Connections, received PUBLISHes and retained messages show up in the
    # counters within a couple of intervals, both ways.
    base = {k: int(v) for k, v in collect(sys_broker, until=[CONNECTED, RECEIVED, RETAINED]).items()
            if k in (CONNECTED, RECEIVED, RETAINED)}
    extra = []
    topic = unique("act")
    try:
        for _ in range(3):
            c = RawClient(sys_broker, 4)
            c.connect(unique("cc"))
            extra.append(c)
        pub = extra[0]
        for i in range(5):
            pub.publish(f"{topic}/{i}", b"r", qos=1, packet_id=i + 1, retain=True)
        for i in range(15):
            pub.publish(topic, b"x", qos=1, packet_id=i + 1)
        peak = watch(sys_broker, {
            CONNECTED: lambda v: v >= base[CONNECTED] + 3,
            RECEIVED: lambda v: v >= base[RECEIVED] + 20,
            RETAINED: lambda v: v >= base[RETAINED] + 5,
        })
        for i in range(5):
            pub.publish(f"{topic}/{i}", b"", qos=1, packet_id=i + 1, retain=True)
    finally:
        for c in extra:
            c.disconnect()
    # (Compared with the peak: the first baseline may predate the broker's own
    # retained $SYS topics.)
    watch(sys_broker, {CONNECTED: lambda v: v <= peak[CONNECTED] - 3,
                       RETAINED: lambda v: v <= peak[RETAINED] - 5})


def test_clients_cannot_publish_to_sys(sys_broker, raw):
    # $SYS is the broker's: a client's PUBLISH there is not forwarded (PUBACK
    # 0x87 or dropped), so nobody can fake broker statistics.
    broker = sys_broker
    watcher = raw(broker, 5)
    watcher.connect(unique("w"))
    watcher.subscribe("$SYS/broker/fake", 0)
    c = raw(broker, 5)
    c.connect(unique("fake"))
    ack = c.publish("$SYS/broker/fake", b"1", qos=1, packet_id=1)
    assert ack.reason_code in (0x87, 0x10, 0x00)
    watcher.expect_silence(0.5)
