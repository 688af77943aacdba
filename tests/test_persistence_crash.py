"""Crash safety: nothing acknowledged is lost across ``kill -9``.

Two levels:

* the store alone, in a child process that records messages and prints each
  ticket once ``durable()`` returned, killed with SIGKILL mid-stream;
* the real broker (``fastmqtt-broker`` as a subprocess, paho and raw clients),
  killed with SIGKILL and restarted on the same data directory and port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastmqtt.store import SqliteStore
from fastmqtt.store.sqlite import DB_NAME, SEGMENT_PREFIX
from fixtures_broker import ack_bytes, publish_bytes

pytestmark = pytest.mark.integration

# --------------------------------------------------------------- store level

CHILD = textwrap.dedent("""
    import os, sys, time, trio
    from fastmqtt.codec import Publish
    from fastmqtt.broker.interfaces import DeliveryRecord
    from fastmqtt.store import SqliteStore
    from fastmqtt.store import sqlite as sqlite_mod

    data_dir, mode, compaction = sys.argv[1], sys.argv[2], sys.argv[3]
    if compaction == "never":  # everything acknowledged is only in the log
        sqlite_mod.COMPACT_PERIOD = 1e9
        sqlite_mod.COMPACT_OPS = 1 << 60
    elif compaction == "often":  # killed at any point of folding the log in
        sqlite_mod.COMPACT_PERIOD = 0.002
    elif compaction == "stuck":  # killed inside a compaction transaction
        # The compactor process creates this file inside its first
        # compaction transaction, once the rows are written, and waits there.
        os.environ["FASTMQTT_COMPACTOR_STALL"] = os.path.join(data_dir, "..", "stuck")
        sqlite_mod.COMPACT_PERIOD = 0.2
    elif compaction == "reuse":  # small segments, folded and written over again
        sqlite_mod.SEGMENT_BYTES = 8192
        sqlite_mod.COMPACT_PERIOD = 0.02

    async def main():
        store = SqliteStore(data_dir, durability=mode, batch_interval_ms=20)
        store.open()
        store.put_session("sub", 0xFFFFFFFF, 5, 1.0)
        next_id = [1]

        async def publisher(k):
            while True:
                i = next_id[0]
                next_id[0] += 1
                store.put_message(i, Publish("crash/t", b"%d" % i, 1, False, False, k + 1), None)
                store.add_delivery("sub", DeliveryRecord(i, 1))
                if i % 3 == 0:  # a third are delivered and acknowledged at once
                    store.remove_delivery("sub", i)
                await store.durable(store.mark())
                if i % 3:
                    sys.stdout.write(f"acked {i}\\n")  # one write per line
                    sys.stdout.flush()
                elif i % 300 == 0 and compaction == "reuse":
                    sys.stdout.write(f"reused {store._wal.recycled_segments}\\n")
                    sys.stdout.flush()

        async with trio.open_nursery() as n:
            for k in range(20):
                n.start_soon(publisher, k)

    trio.run(main)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode, compaction", [("sync", "default"), ("batch", "default"),
                                               ("sync", "never"), ("batch", "often"),
                                               ("sync", "stuck"), ("sync", "reuse"),
                                               ("batch", "reuse")])
def test_store_keeps_every_durable_message_across_sigkill(tmp_path, mode, compaction):
    """Killed mid-stream; also with nothing folded into the tables yet
    (``never``: recovery is the log alone), while compactions run back to back
    (``often``), inside a compaction transaction (``stuck``: its rows are
    in the tables' WAL but not committed; the log still has them), and with
    8 KiB segments folded and written over again all the time (``reuse``:
    the last segment holds older records behind its own)."""
    data = str(tmp_path / "data")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), data, mode, compaction],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = set()
    stuck = False
    reused = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("reused "):
                reused = int(line.split()[1])
                continue
            assert line.startswith("acked "), repr(line)
            acked.add(int(line.split()[1]))
            stuck = stuck or os.path.exists(tmp_path / "stuck")
            if len(acked) >= 2000 and (stuck or compaction != "stuck") and (
                    reused >= 3 or compaction != "reuse"):
                break
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: commits in flight
        proc.wait(10)
    assert len(acked) >= 2000, proc.stderr.read()
    assert stuck or compaction != "stuck"
    if stuck:
        # The compactor process dies with the store's (PR_SET_PDEATHSIG): its
        # transaction is rolled back and it holds no lock on the tables.
        child = int((tmp_path / "stuck").read_text())
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(child)
    assert reused >= 3 or compaction != "reuse"
    if compaction in ("never", "stuck"):
        in_log = sum(os.path.getsize(os.path.join(data, n)) for n in os.listdir(data)
                     if n.startswith(SEGMENT_PREFIX))
        assert in_log  # recovery below must replay the log
    store = SqliteStore(data)
    snap = store.open()
    store.close()
    (sub,) = snap.sessions
    recovered = {d.msg_id for d in sub.deliveries}
    assert acked <= recovered, f"lost {sorted(acked - recovered)[:10]}"
    assert all(snap.messages[m][0].payload == b"%d" % m for m in recovered)
    assert not any(m % 3 == 0 and m in acked for m in recovered)


# -------------------------------------------------------------- broker level

def start_broker(broker_factory, *args, config=None):
    return broker_factory("fastmqtt", args=list(args), config=config)


def crash_and_restart(broker):
    broker.kill()  # SIGKILL: no shutdown, no final commit
    broker.start()


def publish_all(client, topic, payloads, qos=1):
    """Publish everything with paho's in-flight window and wait for every ack."""
    infos = [client.publish(topic, p, qos=qos, wait=False) for p in payloads]
    for info in infos:
        client._wait_ack(info.mid, 30)


def drain(client, n, timeout=30.0):
    msgs = client.get_n(n, timeout)
    return msgs


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_offline_qos1_queue_survives_kill9(broker_factory, paho, durability):
    broker = start_broker(broker_factory, "--durability", durability)
    sub = paho(broker, client_id="crash-sub", clean=False, session_expiry=3600)
    assert sub.subscribe("crash/q1", qos=1) == [1]
    sub.disconnect()
    pub = paho(broker, client_id="crash-pub")
    n = 300
    publish_all(pub, "crash/q1", [b"m%d" % i for i in range(n)])  # every PUBACK received
    crash_and_restart(broker)
    sub2 = paho(broker, client_id="crash-sub", clean=False, session_expiry=3600, connect=False)
    sub2.connect()
    assert sub2.session_present  # [MQTT-3.2.2-2] the session survived the crash
    got = drain(sub2, n)
    payloads = [m.payload for m in got]
    # QoS 1: at least once; every acknowledged message arrives, in order.
    assert set(payloads) == {b"m%d" % i for i in range(n)}
    first = [payloads.index(b"m%d" % i) for i in range(n)]
    assert first == sorted(first)
    assert all(m.qos == 1 for m in got)


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_kill9_mid_stream_loses_no_acknowledged_message(broker_factory, paho, raw, durability):
    """The broker dies while a publisher streams QoS 1 messages: every message
    whose PUBACK reached the publisher (even one read from the socket buffer
    after the crash) is delivered after the restart."""
    from fixtures_broker import Closed

    # No queue limit: a message dropped for a full queue is not "lost".
    broker = start_broker(broker_factory, "--durability", durability,
                          config={"max_queued_messages": 0})
    sub = paho(broker, client_id="stream-sub", clean=False, session_expiry=3600)
    sub.subscribe("crash/stream", qos=1)
    sub.disconnect()
    pub = raw(broker)
    pub.connect("stream-pub")
    acked: set[int] = set()
    sent = 0
    killed = False
    try:
        while sent < 3000:
            burst = b"".join(publish_bytes("crash/stream", b"s%d" % (sent + k), qos=1,
                                           packet_id=sent + k + 1) for k in range(100))
            pub.send(burst)
            sent += 100
            while len(acked) < sent - 200:  # keep about 200 in flight
                acked.add(pub.recv_type("PUBACK").packet_id)
            if len(acked) >= 1000 and not killed:
                broker.kill()
                killed = True
                break
        while True:  # PUBACKs that left the broker before it died count too
            acked.add(pub.recv_type("PUBACK", timeout=5).packet_id)
    except (Closed, OSError):
        pass
    assert killed and len(acked) >= 1000
    pub.close()
    broker.start()
    sub2 = paho(broker, client_id="stream-sub", clean=False, session_expiry=3600, connect=False)
    sub2.connect()
    assert sub2.session_present
    marker = paho(broker, client_id="stream-marker")
    marker.publish("crash/stream", b"end", qos=1)
    got = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = sub2.get(30)
        if m.payload == b"end":
            break
        got.add(m.payload)
    want = {b"s%d" % (pid - 1) for pid in acked}
    assert want <= got, f"lost {len(want - got)} acknowledged messages"


def test_subscriptions_and_retained_survive_kill9(broker_factory, paho):
    broker = start_broker(broker_factory)
    pub = paho(broker, client_id="ret-pub")
    pub.publish("crash/ret/a", b"kept", qos=1, retain=True)
    pub.publish("crash/ret/b", b"gone", qos=1, retain=True)
    pub.publish("crash/ret/b", b"", qos=1, retain=True)  # deletes it [MQTT-3.3.1-6]
    sub = paho(broker, client_id="ret-sub", clean=False, session_expiry=3600)
    sub.subscribe("crash/live/#", qos=1, no_local=True)
    sub.disconnect()
    # No waiting: the SUBACK of a persistent session is sent once the
    # subscription is durable, so a crash right after it must not lose it.
    crash_and_restart(broker)
    fresh = paho(broker, client_id="ret-fresh")
    fresh.subscribe("crash/ret/#", qos=1)
    m = fresh.get(10)
    assert (m.topic, m.payload, m.retain) == ("crash/ret/a", b"kept", True)
    fresh.expect_nothing(0.3)
    # The persistent session's subscription still routes new messages.
    sub2 = paho(broker, client_id="ret-sub", clean=False, session_expiry=3600, connect=False)
    sub2.connect()
    assert sub2.session_present
    pub2 = paho(broker, client_id="ret-pub2")
    pub2.publish("crash/live/x", b"after", qos=1)
    m = sub2.get(10)
    assert (m.topic, m.payload) == ("crash/live/x", b"after")


def test_session_expiry_still_applies_after_restart(broker_factory, paho):
    broker = start_broker(broker_factory)
    s = paho(broker, client_id="short", clean=False, session_expiry=1)
    s.subscribe("crash/exp", qos=1)
    s.disconnect()
    keep = paho(broker, client_id="long", clean=False, session_expiry=3600)
    keep.subscribe("crash/exp", qos=1)
    keep.disconnect()
    wait_for_rows(broker, "SELECT count(*) FROM sessions WHERE disconnected_at IS NOT NULL", 2)
    broker.kill()
    time.sleep(1.5)  # let the 1 s Session Expiry Interval elapse while the broker is down
    broker.start()
    again = paho(broker, client_id="short", clean=False, session_expiry=1, connect=False)
    again.connect()
    assert not again.session_present  # expired while down [MQTT-3.1.2-23]
    long2 = paho(broker, client_id="long", clean=False, session_expiry=3600, connect=False)
    long2.connect()
    assert long2.session_present


def test_incoming_qos2_survives_kill9_without_duplicates(broker_factory, paho, raw):
    """A QoS 2 PUBLISH whose PUBREC was sent is delivered once, even if the
    publisher re-sends it after a crash, and its PUBREL is completed
    [MQTT-4.3.3-10]: no duplicate once the packet id is known."""
    broker = start_broker(broker_factory)
    sub = paho(broker, client_id="q2-sub", clean=False, session_expiry=3600)
    sub.subscribe("crash/q2", qos=2)
    sub.disconnect()

    pub = raw(broker)
    ack = pub.connect("q2-pub", clean=False, props={0x11: 3600})
    assert ack.reason_code == 0
    pub.send(publish_bytes("crash/q2", b"once", qos=2, packet_id=7))
    assert pub.recv_type("PUBREC").packet_id == 7
    pub.close()
    crash_and_restart(broker)

    pub = raw(broker)
    ack = pub.connect("q2-pub", clean=False, props={0x11: 3600})
    assert ack.session_present
    # The publisher did not see the PUBREC (say) and re-sends the PUBLISH.
    pub.send(publish_bytes("crash/q2", b"once", qos=2, packet_id=7, dup=True))
    assert pub.recv_type("PUBREC").packet_id == 7
    pub.send(ack_bytes("PUBREL", 7))
    comp = pub.recv_type("PUBCOMP")
    assert comp.packet_id == 7 and comp.reason_code == 0  # not 0x92: the id was known

    sub2 = paho(broker, client_id="q2-sub", clean=False, session_expiry=3600, connect=False)
    sub2.connect()
    m = sub2.get(10)
    assert (m.payload, m.qos) == (b"once", 2)
    sub2.expect_nothing(0.5)


def test_packet_id_released_by_pubcomp_is_free_after_kill9(broker_factory, paho, raw):
    """Once the broker sent PUBCOMP, the publisher may reuse the packet id
    [MQTT-4.3.3-13]; a crash must not bring the old id back (else the new
    message would be taken for a duplicate and lost)."""
    broker = start_broker(broker_factory)
    sub = paho(broker, client_id="q2-reuse-sub", clean=False, session_expiry=3600)
    sub.subscribe("crash/reuse", qos=2)
    sub.disconnect()
    pub = raw(broker)
    pub.connect("q2-reuse", clean=False, props={0x11: 3600})
    pub.publish("crash/reuse", b"first", qos=2, packet_id=9)  # whole flow, PUBCOMP received
    pub.close()
    crash_and_restart(broker)
    pub = raw(broker)
    assert pub.connect("q2-reuse", clean=False, props={0x11: 3600}).session_present
    pub.publish("crash/reuse", b"second", qos=2, packet_id=9)
    sub2 = paho(broker, client_id="q2-reuse-sub", clean=False, session_expiry=3600,
                connect=False)
    sub2.connect()
    got = sorted(m.payload for m in sub2.get_n(2, 10))
    assert got == [b"first", b"second"]


def test_outgoing_qos2_after_pubrec_resumes_with_pubrel(broker_factory, paho, raw):
    """The broker sent PUBREL (the subscriber's PUBREC arrived) and crashed:
    on reconnect it must re-send the PUBREL, not the PUBLISH [MQTT-4.4.0-1]."""
    broker = start_broker(broker_factory)
    sub = raw(broker)
    sub.connect("q2-out", clean=False, props={0x11: 3600})
    sub.subscribe("crash/q2out", 2)
    pub = paho(broker, client_id="q2-out-pub")
    pub.publish("crash/q2out", b"x", qos=2)
    p = sub.recv_type("PUBLISH")
    assert p.qos == 2
    sub.send(ack_bytes("PUBREC", p.packet_id))
    assert sub.recv_type("PUBREL").packet_id == p.packet_id
    sub.close()
    crash_and_restart(broker)
    sub = raw(broker)
    ack = sub.connect("q2-out", clean=False, props={0x11: 3600})
    assert ack.session_present
    rel = sub.recv()
    assert (rel.type, rel.packet_id) == ("PUBREL", p.packet_id)
    sub.send(ack_bytes("PUBCOMP", p.packet_id))
    sub.expect_silence(0.5)


def wait_for_rows(broker, sql, want, timeout=10.0):
    """Poll the broker's database (read-only, WAL allows a concurrent reader)
    until ``sql`` returns ``want``: the only outside view of "committed" for
    state the broker does not acknowledge to anyone. Bounded."""
    import sqlite3

    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{broker.data_dir / DB_NAME}?mode=ro", uri=True,
                                 timeout=1) as db:
                got = db.execute(sql).fetchone()[0]
        except sqlite3.Error:
            got = None
        if got == want:
            return
        time.sleep(0.02)
    raise AssertionError(f"{sql} gave {got!r}, want {want!r}")


def test_delayed_will_survives_kill9(broker_factory, paho):
    """A will waiting for its Will Delay Interval is still published after the
    broker crashed and restarted [MQTT-3.1.3-9]."""
    broker = start_broker(broker_factory)
    # The watcher's session is persistent: the will reaches it however soon
    # after the restart it is published.
    watcher = paho(broker, client_id="will-watcher", clean=False, session_expiry=60)
    watcher.subscribe("crash/will", qos=1)
    watcher.disconnect()
    c = paho(broker, client_id="will-client", clean=False, session_expiry=60,
             will=("crash/will", b"offline", 1, False, {"WillDelayInterval": 6}))
    dropped = time.monotonic()
    c.drop()  # abnormal close: the will is pending for 6 s
    wait_for_rows(broker, "SELECT count(*) FROM wills", 1)
    crash_and_restart(broker)
    # Killed before the will was due: it is the restarted broker that sends it.
    assert time.monotonic() - dropped < 6
    watcher = paho(broker, client_id="will-watcher", clean=False, session_expiry=60)
    m = watcher.get(15)
    assert (m.topic, m.payload) == ("crash/will", b"offline")


def test_inflight_qos1_is_redelivered_after_kill9(broker_factory, paho, raw):
    """Messages sent to a subscriber that had not acknowledged them when the
    broker died are delivered again on reconnect [MQTT-4.4.0-1]."""
    broker = start_broker(broker_factory)
    sub = raw(broker)
    sub.connect("inflight-sub", clean=False, props={0x11: 3600})
    sub.subscribe("crash/inflight", 1)
    pub = paho(broker, client_id="inflight-pub")
    publish_all(pub, "crash/inflight", [b"i%d" % i for i in range(5)])
    first = [sub.recv_type("PUBLISH") for _ in range(5)]  # never acknowledged
    assert [p.payload for p in first] == [b"i%d" % i for i in range(5)]
    sub.close()
    crash_and_restart(broker)
    sub = raw(broker)
    assert sub.connect("inflight-sub", clean=False, props={0x11: 3600}).session_present
    again = [sub.recv_type("PUBLISH") for _ in range(5)]
    assert [p.payload for p in again] == [b"i%d" % i for i in range(5)]
    for p in again:
        sub.send(ack_bytes("PUBACK", p.packet_id))
    sub.expect_silence(0.3)


def test_retained_message_inflight_to_second_subscriber_survives_kill9(broker_factory, paho, raw):
    """One retained message delivered to two persistent sessions one after the
    other (the first acknowledges it before the second subscribes): the
    second's unacknowledged copy is still there after a crash."""
    broker = start_broker(broker_factory)
    pub = paho(broker, client_id="rr-pub")
    pub.publish("crash/rr", b"retained-once", qos=1, retain=True)
    first = paho(broker, client_id="rr-first", clean=False, session_expiry=3600)
    first.subscribe("crash/rr", qos=1)
    assert first.get(10).payload == b"retained-once"  # paho acknowledges it
    wait_for_rows(broker, "SELECT count(*) FROM deliveries WHERE client_id='rr-first'", 0)
    second = raw(broker)
    second.connect("rr-second", clean=False, props={0x11: 3600})
    second.subscribe("crash/rr", 1)
    assert second.recv_type("PUBLISH").payload == b"retained-once"  # not acknowledged
    wait_for_rows(broker, "SELECT count(*) FROM deliveries d JOIN messages m USING (msg_id) "
                          "WHERE d.client_id='rr-second'", 1)
    second.close()
    crash_and_restart(broker)
    second = raw(broker)
    assert second.connect("rr-second", clean=False, props={0x11: 3600}).session_present
    again = second.recv_type("PUBLISH")
    assert again.payload == b"retained-once"


def test_corrupt_database_is_moved_aside_and_broker_starts(broker_factory, paho):
    broker = start_broker(broker_factory)
    pub = paho(broker, client_id="corrupt-pub")
    pub.publish("crash/c", b"v", qos=1, retain=True)
    pub.close() if hasattr(pub, "close") else None
    broker.kill()
    db = broker.data_dir / DB_NAME
    original = b"garbage, not SQLite " * 200
    db.write_bytes(original)
    for extra in ("-wal", "-shm"):
        p = broker.data_dir / (DB_NAME + extra)
        if p.exists():
            p.unlink()
    since = broker.mark()
    broker.start()
    assert broker.wait_for_log("unusable", timeout=5, since=since), broker.log(since)
    aside = [p for p in broker.data_dir.iterdir() if p.name.startswith(DB_NAME + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == original
    c = paho(broker, client_id="corrupt-check")
    c.subscribe("crash/c", qos=1)
    c.expect_nothing(0.3)  # the state was lost with the file, but the broker serves
    c.publish("crash/after", b"ok", qos=1)


def test_chat_history_over_mqtt_survives_kill9(broker_factory, paho):
    broker = start_broker(broker_factory, config={"history": ["chat/+/channel/+"],
                                                  "history_max_messages": 5})
    pub = paho(broker, client_id="hist-pub")
    topic = "chat/acme/channel/7"
    for i in range(8):
        pub.publish(topic, json.dumps({"type": "post", "id": i}), qos=1)
    crash_and_restart(broker)
    cli = paho(broker, client_id="hist-cli")
    cli.subscribe("hist/resp/cli", qos=1)

    def ask(body):
        cli.publish("$history/" + topic, json.dumps(body), qos=1,
                    ResponseTopic="hist/resp/cli", CorrelationData=b"q-1")
        m = cli.get(10)
        assert m.topic == "hist/resp/cli"
        assert m.properties.CorrelationData == b"q-1"
        return json.loads(m.payload)

    page = ask({"limit": 3})
    assert [json.loads(x["payload"])["id"] for x in page["messages"]] == [5, 6, 7]
    older = ask({"limit": 3, "before": page["next"]})
    assert [json.loads(x["payload"])["id"] for x in older["messages"]] == [3, 4]
    assert older["next"] is None
