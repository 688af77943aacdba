"""Unit tests of the broker stores (memory and SQLite): every mutator, the
snapshot round trip, expiry purge, and (SQLite) group commit, coalescing,
durable() ordering, failure reporting and corrupt databases."""

from __future__ import annotations

import errno
import logging
import os
import struct
import sqlite3
import sys
import tempfile
import time

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastmqtt.broker.interfaces import DeliveryRecord, NullStore, SubscriptionRecord
from fastmqtt.codec import Publish
from fastmqtt.enums import PropertyId
from fastmqtt.store import MemoryStore, SqliteStore, StoreError, open_store
from fastmqtt.store.base import decode_publish, encode_publish
from fastmqtt.store import sqlite as sqlite_mod
from fastmqtt.store.sqlite import DB_NAME, LOG_NAME, SCHEMA_VERSION, SEGMENT_PREFIX

NOW = 1_800_000_000.0
NEVER = 0xFFFFFFFF


def pub(topic="a/b", payload=b"x", qos=1, pid=0, **props):
    return Publish(topic, payload, qos, False, False, pid, props or None)


def fields(p):
    """A Publish as plain values (properties as a dict, order-insensitive)."""
    return (p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, dict(p.properties))


def close_without_compacting(store):
    """Close a SqliteStore the way a crash leaves it: every change appended to
    the log (the writer drains its batch), none of what the compactor had not
    folded yet in the tables. Recovery must replay the log."""
    def refuse(conn, dirty, hold=False):
        raise sqlite3.OperationalError("test: no compaction")

    store._compact = refuse
    store.close()


class Reopener:
    """Builds a store and "restarts" it: close, then a fresh open of the same
    state (a new SqliteStore on the same directory; the same MemoryStore).
    ``sqlite-log`` restarts as after a crash: the latest changes only in the
    log, recovered by replaying it onto the tables."""

    def __init__(self, kind, path):
        self.kind = kind
        self.path = path
        self.store = None

    def new(self):
        if self.kind == "memory":
            if self.store is None:
                self.store = MemoryStore()
        elif self.kind == "sqlite-thread":
            self.store = SqliteStore(self.path, compactor="thread")
        else:
            self.store = SqliteStore(self.path)
        return self.store

    def first(self, now=NOW):
        s = self.new()
        snap = s.open(now=now)
        return s, snap

    def restart(self, now=NOW):
        if self.kind == "sqlite-log":
            close_without_compacting(self.store)
        else:
            self.store.close()
        return self.first(now)


@pytest.fixture(params=["memory", "sqlite", "sqlite-log", "sqlite-thread"])
def reopener(request, tmp_path):
    r = Reopener(request.param, str(tmp_path / "data"))
    yield r
    if r.store is not None:
        r.store.close()


def by_client(snap):
    return {s.client_id: s for s in snap.sessions}


# ---------------------------------------------------------------- serialisation

@pytest.mark.parametrize("p", [
    Publish("t", b"", 0),
    Publish("chat/acme/channel/1", b'{"type":1}', 1, True, True, 77,
            {PropertyId.MESSAGE_EXPIRY_INTERVAL: 60, PropertyId.CONTENT_TYPE: "application/json",
             PropertyId.USER_PROPERTY: (("k", "v"), ("k", "w")),
             PropertyId.CORRELATION_DATA: b"\x00\x01"}),
    Publish("q/2", b"\xff" * 1000, 2, False, False, 0),  # QoS 2 without a packet id
])
def test_publish_blob_round_trip(p):
    assert fields(decode_publish(encode_publish(p))) == fields(p)


@pytest.mark.parametrize("p", [
    Publish("t", b"", 0),
    Publish("t", b"x", 1, False, True, 0),  # DUP without a packet id
    Publish("chat/acme/channel/1", b'{"type":1}', 1, True, True, 77,
            {PropertyId.CONTENT_TYPE: "application/json",
             PropertyId.USER_PROPERTY: (("k", "v"),)}),
    Publish("q/2", b"\xff" * 1000, 2, False, False, 0, {PropertyId.MESSAGE_EXPIRY_INTERVAL: 5}),
])
def test_compiled_stored_form_is_the_python_one(p):
    """The store's hot path encodes with the compiled codec's encode_stored:
    byte for byte what the pure-Python path (flag, then a v5 PUBLISH with
    packet id 1 when it has none) gives."""
    from fastmqtt import _codec, _codec_py

    q = _codec_py.Publish(p.topic, p.payload, p.qos, p.retain, p.dup,
                          p.packet_id or (1 if p.qos else 0), p.properties)
    flag = b"\x01" if p.qos and not p.packet_id else b"\x00"
    assert _codec.encode_stored(p) == flag + _codec_py.encode(q, 5)
    with pytest.raises(Exception, match="needs a Publish"):
        _codec.encode_stored(object())
    if not p.dup and not p.packet_id:  # what a message the broker holds can be
        assert _codec.encode_stored_fields(p.topic, p.payload, p.qos, p.retain,
                                           p.properties) == _codec.encode_stored(p)


def test_undecodable_blob_raises_value_error():
    with pytest.raises(ValueError):
        decode_publish(b"\x00\x30")
    with pytest.raises(ValueError):
        decode_publish(b"")


# --------------------------------------------------------------------- open_store

class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_open_store_picks_implementation(tmp_path):
    assert isinstance(open_store(Cfg(persistence=False)), NullStore)
    s = open_store(Cfg(persistence=True, data_dir=str(tmp_path / "d"), durability="batch",
                       batch_interval_ms=5))
    assert isinstance(s, SqliteStore)
    assert s.durability == "batch" and s.batch_interval == 0.005
    assert s.path == str(tmp_path / "d" / DB_NAME)
    assert isinstance(open_store(Cfg(persistence=True, store_backend="memory")), MemoryStore)
    with pytest.raises(ValueError):
        open_store(Cfg(persistence=True, data_dir=str(tmp_path), durability="never"))


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = open_store(Cfg())
    s.open()
    s.close()
    assert (tmp_path / "fastmqtt-data" / DB_NAME).exists()


# ------------------------------------------------------------------ every mutator

def test_empty_store_gives_empty_snapshot(reopener):
    _, snap = reopener.first()
    assert snap.sessions == [] and snap.messages == {} and snap.retained == []
    assert snap.wills == [] and snap.next_msg_id == 1


def test_sessions_and_subscriptions_round_trip(reopener):
    s, _ = reopener.first()
    s.put_session("c1", 3600, 5, None)
    s.put_session("c2", NEVER, 4, NOW - 10)
    sub = SubscriptionRecord("$share/g/chat/+/channel/#", 1, no_local=True,
                             retain_as_published=True, retain_handling=2, subscription_id=9)
    s.put_subscription("c1", sub)
    s.put_subscription("c1", SubscriptionRecord("x/y", 0))
    s.put_subscription("c1", SubscriptionRecord("x/y", 2))  # replaces
    s.put_subscription("c1", SubscriptionRecord("gone", 1))
    s.delete_subscription("c1", "gone")
    s.put_session("c2", NEVER, 5, NOW - 5)  # replaces
    _, snap = reopener.restart()
    sessions = by_client(snap)
    assert set(sessions) == {"c1", "c2"}
    c1 = sessions["c1"]
    assert (c1.expiry_interval, c1.protocol_level, c1.disconnected_at) == (3600, 5, None)
    subs = {x.topic_filter: x for x in c1.subscriptions}
    assert subs == {sub.topic_filter: sub, "x/y": SubscriptionRecord("x/y", 2)}
    assert (sessions["c2"].protocol_level, sessions["c2"].disconnected_at) == (5, NOW - 5)


def test_session_username_round_trip(reopener):
    # ACLs judge an offline session's deliveries by its user: the name must
    # survive a restart, and None (anonymous) stays None.
    s, _ = reopener.first()
    s.put_session("c1", 3600, 5, None, "alice")
    s.put_session("c2", 3600, 4, NOW - 1)
    s.put_session("c3", 3600, 5, None, "bob")
    s.put_session("c3", 3600, 5, NOW - 1, "carol")   # replaces
    _, snap = reopener.restart()
    assert {c: r.username for c, r in by_client(snap).items()} == {
        "c1": "alice", "c2": None, "c3": "carol"}


def test_deliveries_keep_queue_order_and_state(reopener):
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, NOW)
    for mid in (5, 3, 9):
        s.put_message(mid, pub(payload=b"m%d" % mid), None)
        s.add_delivery("c", DeliveryRecord(mid, 1))
    s.update_delivery("c", DeliveryRecord(3, 1, packet_id=12, state="sent"))
    s.put_message(11, pub(qos=2, pid=4), None)
    s.add_delivery("c", DeliveryRecord(11, 2))
    s.update_delivery("c", DeliveryRecord(11, 2, packet_id=13, state="sent"))
    s.update_delivery("c", DeliveryRecord(11, 2, packet_id=13, state="released"))
    s.update_delivery("c", DeliveryRecord(99, 1, 1, "sent"))  # unknown: ignored
    _, snap = reopener.restart()
    c = by_client(snap)["c"]
    assert c.deliveries == [DeliveryRecord(5, 1), DeliveryRecord(3, 1, 12, "sent"),
                            DeliveryRecord(9, 1), DeliveryRecord(11, 2, 13, "released")]
    assert snap.messages[5][0].payload == b"m5"
    assert snap.messages[11][0] == pub(qos=2, pid=4)
    assert set(snap.messages) == {3, 5, 9, 11}
    assert snap.next_msg_id == 12


def test_delivery_retain_flag_and_subscription_ids_round_trip(reopener):
    # What a queued or in-flight copy is sent with survives a restart: the
    # RETAIN flag (Retain As Published) and the subscription identifiers
    # [MQTT-3.3.4-3]; an update of its state keeps them.
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, NOW)
    for mid in (1, 2, 3):
        s.put_message(mid, pub(payload=b"m%d" % mid), None)
    s.add_delivery("c", DeliveryRecord(1, 1, retain=True, subids=(3, 268435455)))
    s.add_delivery("c", DeliveryRecord(2, 1, subids=(7,)))
    s.add_delivery("c", DeliveryRecord(3, 1, retain=True))
    s.update_delivery("c", DeliveryRecord(1, 1, packet_id=5, state="sent"))
    _, snap = reopener.restart()
    assert by_client(snap)["c"].deliveries == [
        DeliveryRecord(1, 1, 5, "sent", True, (3, 268435455)),
        DeliveryRecord(2, 1, 0, "queued", False, (7,)),
        DeliveryRecord(3, 1, 0, "queued", True, ())]


def test_rows_with_and_without_null_columns_in_one_batch_keep_their_values(reopener):
    # The tables get rows with no expiry or no RETAIN flag/subscription ids
    # through statements that leave those columns out (NULL): in one batch
    # with rows that have them, every value lands in its own column.
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, NOW)
    for mid, exp in ((1, None), (2, NOW + 50), (3, None), (4, NOW + 70)):
        s.put_message(mid, pub(payload=b"m%d" % mid), exp)
    s.add_delivery("c", DeliveryRecord(1, 1))
    s.add_delivery("c", DeliveryRecord(2, 2, 9, "sent", True, (4,)))
    s.add_delivery("c", DeliveryRecord(3, 0))
    s.add_delivery("c", DeliveryRecord(4, 1, 0, "queued", False, (5, 6)))
    _, snap = reopener.restart()
    assert by_client(snap)["c"].deliveries == [
        DeliveryRecord(1, 1), DeliveryRecord(2, 2, 9, "sent", True, (4,)),
        DeliveryRecord(3, 0), DeliveryRecord(4, 1, 0, "queued", False, (5, 6))]
    assert {mid: (bytes(p.payload), exp) for mid, (p, exp) in snap.messages.items()} == {
        1: (b"m1", None), 2: (b"m2", NOW + 50), 3: (b"m3", None), 4: (b"m4", NOW + 70)}


def test_message_kept_while_any_delivery_refers_to_it(reopener):
    s, _ = reopener.first()
    for c in ("a", "b"):
        s.put_session(c, NEVER, 5, None)
    s.put_message(1, pub(), None)
    s.add_delivery("a", DeliveryRecord(1, 1))
    s.add_delivery("b", DeliveryRecord(1, 1))
    s, snap = reopener.restart()
    assert 1 in snap.messages
    s.remove_delivery("a", 1)
    s, snap = reopener.restart()
    assert 1 in snap.messages and by_client(snap)["a"].deliveries == []
    assert by_client(snap)["b"].deliveries == [DeliveryRecord(1, 1)]
    s.remove_delivery("b", 1)
    _, snap = reopener.restart()
    assert snap.messages == {}
    if reopener.kind != "memory":
        with sqlite3.connect(reopener.store.path) as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


def test_delete_session_removes_everything_hanging_on_it(reopener):
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, None)
    s.put_subscription("c", SubscriptionRecord("t", 1))
    s.put_message(1, pub(), None)
    s.add_delivery("c", DeliveryRecord(1, 1))
    s.put_incoming_qos2("c", 7)
    s.put_will("c", pub("will"), NOW + 5)
    s.put_session("other", NEVER, 5, None)
    s, _ = reopener.restart()
    s.delete_session("c")
    _, snap = reopener.restart()
    assert [x.client_id for x in snap.sessions] == ["other"]
    assert snap.messages == {} and snap.wills == []


def test_delete_then_recreate_session_in_one_batch(reopener):
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, None)
    s.put_subscription("c", SubscriptionRecord("old", 1))
    s, _ = reopener.restart()
    # A clean-start reconnect: the old session goes, a new one is made at once.
    s.delete_session("c")
    s.put_session("c", 60, 5, None)
    s.put_subscription("c", SubscriptionRecord("new", 1))
    _, snap = reopener.restart()
    c = by_client(snap)["c"]
    assert c.expiry_interval == 60
    assert [x.topic_filter for x in c.subscriptions] == ["new"]


def test_incoming_qos2_ids(reopener):
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, None)
    for pid in (1, 2, 65535):
        s.put_incoming_qos2("c", pid)
    s.delete_incoming_qos2("c", 2)
    _, snap = reopener.restart()
    assert by_client(snap)["c"].incoming_qos2 == {1, 65535}


def test_retained_put_replace_delete_and_expiry(reopener):
    s, _ = reopener.first()
    s.put_retained("a", Publish("a", b"1", 1, True), None)
    s.put_retained("a", Publish("a", b"2", 1, True), None)
    s.put_retained("b", Publish("b", b"b", 0, True), None)
    s.delete_retained("b")
    s.put_retained("soon", Publish("soon", b"s", 0, True), NOW + 10)
    s.put_retained("past", Publish("past", b"p", 0, True), NOW + 1)
    _, snap = reopener.restart(now=NOW + 5)
    got = {t: (p.payload, e) for t, p, e in snap.retained}
    # [MQTT-3.3.2-5]: an expired retained message is not delivered.
    assert got == {"a": (b"2", None), "soon": (b"s", NOW + 10)}


def test_wills(reopener):
    s, _ = reopener.first()
    s.put_session("a", 60, 5, NOW)
    s.put_will("a", pub("will/a", b"gone"), NOW + 30)
    s.put_will("b", pub("will/b"), NOW + 1)
    s.delete_will("b")
    _, snap = reopener.restart()
    assert snap.wills == [("a", pub("will/a", b"gone"), NOW + 30)]


def test_expired_sessions_are_purged(reopener):
    s, _ = reopener.first()
    s.put_session("expired", 60, 5, NOW - 61)
    s.put_message(1, pub(), None)
    s.add_delivery("expired", DeliveryRecord(1, 1))
    s.put_subscription("expired", SubscriptionRecord("t", 1))
    s.put_session("zero", 0, 5, NOW - 1)  # expiry 0: ends at disconnect [MQTT-3.1.2-23]
    s.put_session("alive", 60, 5, NOW - 30)
    s.put_session("never", NEVER, 5, NOW - 10**8)
    s.put_session("connected", 0, 5, None)
    s.put_will("expired", pub("w"), NOW - 1)
    _, snap = reopener.restart()
    assert set(by_client(snap)) == {"alive", "never", "connected"}
    assert snap.messages == {}
    # A will whose session ended while the broker was down is still owed.
    assert [c for c, _, _ in snap.wills] == ["expired"]
    # Purged for good: a later start does not see it again.
    _, snap = reopener.restart(now=NOW - 100)
    assert "expired" not in by_client(snap)


def test_queued_copies_of_expired_messages_are_dropped_but_inflight_kept(reopener):
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, NOW)
    s.put_message(1, pub(), NOW + 1)
    s.put_message(2, pub(), NOW + 1)
    s.put_message(3, pub(), NOW + 100)
    s.add_delivery("c", DeliveryRecord(1, 1))
    s.add_delivery("c", DeliveryRecord(2, 1, 5, "sent"))
    s.add_delivery("c", DeliveryRecord(3, 1))
    _, snap = reopener.restart(now=NOW + 2)
    # [MQTT-3.3.2-5]: delete the copy not yet sent; one in flight completes.
    assert by_client(snap)["c"].deliveries == [DeliveryRecord(2, 1, 5, "sent"),
                                               DeliveryRecord(3, 1)]
    assert set(snap.messages) == {2, 3}


async def test_durable_returns_for_every_mark(reopener):
    s, _ = reopener.first()
    s.put_session("c", NEVER, 5, None)
    with trio.fail_after(10):
        await s.durable(s.mark())
        await s.durable(0)
    await s.aclose()
    with pytest.raises(StoreError):
        s.put_session("d", NEVER, 5, None)
        await s.durable(s.mark())


# ------------------------------------------------------- property: same as memory

OPS = st.lists(st.one_of(
    st.tuples(st.just("session"), st.sampled_from("abc"), st.sampled_from([0, 60, NEVER]),
              st.sampled_from([None, NOW - 100, NOW - 1])),
    st.tuples(st.just("del_session"), st.sampled_from("abc")),
    st.tuples(st.just("sub"), st.sampled_from("abc"), st.sampled_from(["t/1", "t/+", "#"]),
              st.integers(0, 2)),
    st.tuples(st.just("unsub"), st.sampled_from("abc"), st.sampled_from(["t/1", "t/+", "#"])),
    st.tuples(st.just("msg"), st.integers(1, 6), st.sampled_from([None, NOW - 1, NOW + 50])),
    st.tuples(st.just("add"), st.sampled_from("abc"), st.integers(1, 6), st.integers(1, 2)),
    st.tuples(st.just("upd"), st.sampled_from("abc"), st.integers(1, 6),
              st.sampled_from(["sent", "released"])),
    st.tuples(st.just("rm"), st.sampled_from("abc"), st.integers(1, 6)),
    st.tuples(st.just("q2"), st.sampled_from("abc"), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("ret"), st.sampled_from(["r/1", "r/2"]), st.booleans()),
    st.tuples(st.just("will"), st.sampled_from("abc"), st.booleans()),
    st.tuples(st.just("flush")),
    st.tuples(st.just("compact")),
), max_size=40)


_CLIENT_OPS = {"session", "del_session", "sub", "unsub", "add", "upd", "rm", "q2", "will"}
_CIDS = {"a": "client-a", "b": "client-b", "c": "client-c"}


def _cid(c, i):
    # Every other op names its client with a string object of its own (equal,
    # not identical): a client is its id's value, whichever object holds it.
    return "client-" + c if i % 2 else _CIDS[c]


def apply_ops(store, ops, flush, compact=lambda s: None):
    for i, op in enumerate(ops):
        kind = op[0]
        if kind in _CLIENT_OPS:
            op = (kind, _cid(op[1], i), *op[2:])
        if kind == "session":
            store.put_session(op[1], op[2], 5, op[3])
        elif kind == "del_session":
            store.delete_session(op[1])
        elif kind == "sub":
            store.put_subscription(op[1], SubscriptionRecord(op[2], op[3]))
        elif kind == "unsub":
            store.delete_subscription(op[1], op[2])
        elif kind == "msg":
            store.put_message(op[1], pub(payload=b"%d" % op[1]), op[2])
        elif kind == "add":
            store.add_delivery(op[1], DeliveryRecord(op[2], op[3]))
        elif kind == "upd":
            store.update_delivery(op[1], DeliveryRecord(op[2], 1, op[2], op[3]))
        elif kind == "rm":
            store.remove_delivery(op[1], op[2])
        elif kind == "q2":
            (store.put_incoming_qos2 if op[3] else store.delete_incoming_qos2)(op[1], op[2])
        elif kind == "ret":
            if op[2]:
                store.put_retained(op[1], Publish(op[1], b"r", 1, True, False, 1), None)
            else:
                store.delete_retained(op[1])
        elif kind == "will":
            if op[2]:
                store.put_will(op[1], pub("w/" + op[1]), NOW + 9)
            else:
                store.delete_will(op[1])
        elif kind == "flush":
            flush(store)
        elif kind == "compact":
            compact(store)


def normal(snap):
    return (
        sorted((s.client_id, s.expiry_interval, s.disconnected_at,
                sorted((x.topic_filter, x.qos) for x in s.subscriptions),
                [(d.msg_id, d.qos, d.packet_id, d.state) for d in s.deliveries],
                sorted(s.incoming_qos2)) for s in snap.sessions),
        {k: (v[0].payload, v[1]) for k, v in snap.messages.items()},
        sorted((t, p.payload) for t, p, _ in snap.retained),
        sorted((c, p.topic) for c, p, _ in snap.wills),
        snap.next_msg_id,
    )


def wait_committed(store):
    # Outside trio: everything recorded so far is written (and, in sync mode,
    # fsynced).
    assert store.wait_durable(timeout=10), "writer did not commit"


def compact_now(store):
    wait_committed(store)
    assert store.compact()


@pytest.mark.parametrize("end", ["close", "crash"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_sqlite_store_recovers_what_memory_store_holds(end, ops):
    """Any sequence of mutations, cut into batches anywhere and folded into
    the tables anywhere, recovers to the same state as the reference memory
    store (group commit, coalescing across batches and replaying the log never
    change what survives)."""
    mem = MemoryStore()
    mem.open(now=NOW)
    apply_ops(mem, ops, lambda s: None)
    with tempfile.TemporaryDirectory() as d:
        sq = SqliteStore(d)
        sq.open(now=NOW)
        apply_ops(sq, ops, wait_committed, compact_now)
        if end == "crash":
            close_without_compacting(sq)
        else:
            sq.close()
        sq2 = SqliteStore(d)
        got = sq2.open(now=NOW)
        sq2.close()
    assert normal(got) == normal(mem.open(now=NOW))


# ------------------------------------------------------------- SQLite specifics

@pytest.fixture
def sq(tmp_path):
    s = SqliteStore(str(tmp_path / "d"))
    s.open(now=NOW)
    yield s
    s.close()


def rows(store, table):
    """Rows in one of the tables, once the log has been folded into them."""
    if store._thread is not None:
        assert store.compact()
    with sqlite3.connect(store.path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_schema_2_database_gains_session_usernames(tmp_path):
    # A database from before sessions kept a user name (and deliveries their
    # RETAIN flag and ids): the columns are added in place, old rows come back
    # with the defaults, new sessions keep their user name.
    d = str(tmp_path / "d")
    s = SqliteStore(d)
    s.open(now=NOW)
    s.put_session("old", 3600, 5, NOW - 1)
    s.put_message(1, pub(), None)
    s.add_delivery("old", DeliveryRecord(1, 1))
    s.close()
    with sqlite3.connect(s.path) as db:
        db.execute("ALTER TABLE sessions DROP COLUMN username")
        db.execute("ALTER TABLE deliveries DROP COLUMN extra")
        db.execute("UPDATE meta SET value=2 WHERE key='schema_version'")
    s = SqliteStore(d)
    snap = s.open(now=NOW)
    assert [(r.client_id, r.username) for r in snap.sessions] == [("old", None)]
    assert snap.sessions[0].deliveries == [DeliveryRecord(1, 1, 0, "queued", False, ())]
    s.put_session("new", 3600, 5, None, "alice")
    s.close()
    s = SqliteStore(d)
    snap = s.open(now=NOW)
    s.close()
    assert {r.client_id: r.username for r in snap.sessions} == {"old": None, "new": "alice"}
    with sqlite3.connect(s.path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == 3


class HeldWriter:
    """Holds the log writer before its next write until released, to observe
    what happens while records wait to be written."""

    def __init__(self, store):
        self.wal = store._wal
        self.wal.pause(True)

    def release(self):
        self.wal.pause(False)


async def test_durable_waits_for_the_commit(sq):
    held = HeldWriter(sq)
    sq.put_session("c", NEVER, 5, None)
    ticket = sq.mark()
    done = trio.Event()

    async def waiter():
        await sq.durable(ticket)
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert sq.commits == 1  # the record is appended...
            assert not done.is_set()  # ...but not written yet
            held.release()
    assert done.is_set() and sq._committed >= ticket


async def test_group_commit_many_concurrent_publishers(sq):
    """Changes recorded while the writer is busy wait for its next write:
    hundreds of publishers share a handful of records and one write, and each
    durable() returns only once its own changes are committed."""
    held = HeldWriter(sq)
    sq.put_session("sub", NEVER, 5, None)
    n_pub = 300
    seen = []

    async def publisher(i):
        sq.put_message(i, pub(payload=b"%d" % i), None)
        sq.add_delivery("sub", DeliveryRecord(i, 1))
        t = sq.mark()
        await sq.durable(t)
        assert sq._committed >= t
        seen.append(i)

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for i in range(1, n_pub + 1):
                n.start_soon(publisher, i)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [] and sq._wal.writes == 0
            held.release()
    assert sorted(seen) == list(range(1, n_pub + 1))
    assert sq.commits <= 3  # the session, then (nearly) everyone together
    assert sq._wal.writes == 1  # one write for all of it
    assert rows(sq, "deliveries") == n_pub


async def test_durable_tickets_complete_in_order(sq):
    order = []

    async def wait_for(t):
        await sq.durable(t)
        order.append(t)

    tickets = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for i in range(50):
                sq.put_session(f"c{i}", NEVER, 5, None)
                t = sq.mark()
                tickets.append(t)
                n.start_soon(wait_for, t)
                if i % 7 == 0:
                    await trio.sleep(0)
    assert sorted(order) == tickets
    # A ticket already committed returns without waiting.
    with trio.fail_after(1):
        await sq.durable(tickets[0])


async def test_fast_subscriber_messages_never_reach_the_tables(sq):
    held = HeldWriter(sq)
    sq.put_session("fast", NEVER, 5, None)
    await trio.testing.wait_all_tasks_blocked()
    assert sq.commits == 1
    # While the first record waits for the writer, a message is queued, sent
    # and acked.
    for i in range(1, 101):
        sq.put_message(i, pub(), None)
        sq.add_delivery("fast", DeliveryRecord(i, 1))
        sq.update_delivery("fast", DeliveryRecord(i, 1, i, "sent"))
        sq.remove_delivery("fast", i)
    t = sq.mark()
    held.release()
    with trio.fail_after(10):
        await sq.durable(t)
    # The record holds the ops as they came; their net effect is nothing.
    assert sq.commits == 2
    (_, off, n), = [r for r in log_records(sq.data_dir) if r[0] == sq._lsn]
    with open(segments(sq.data_dir)[-1], "rb") as f:
        rec = f.read()[off + 12:off + n]
    net = sqlite_mod._decode_record(rec)
    assert net.messages == {} and net.msg_del == set() and net.deliv == {"fast": {}}
    assert rows(sq, "messages") == 0 and rows(sq, "deliveries") == 0


async def test_remove_of_committed_delivery_reaches_disk(sq):
    sq.put_session("c", NEVER, 5, None)
    sq.put_message(1, pub(), None)
    sq.add_delivery("c", DeliveryRecord(1, 1))
    await sq.durable(sq.mark())
    assert rows(sq, "deliveries") == 1
    sq.update_delivery("c", DeliveryRecord(1, 1, 3, "sent"))
    sq.remove_delivery("c", 1)
    await sq.durable(sq.mark())
    assert rows(sq, "deliveries") == 0 and rows(sq, "messages") == 0


async def test_batch_mode_commits_and_recovers(tmp_path):
    s = SqliteStore(str(tmp_path), durability="batch", batch_interval_ms=5)
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    for i in range(1, 51):
        s.put_message(i, pub(), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
    with trio.fail_after(10):
        await s.durable(s.mark())
    await s.aclose()
    s2 = SqliteStore(str(tmp_path), durability="batch")
    snap = s2.open(now=NOW)
    s2.close()
    assert len(snap.sessions[0].deliveries) == 50


async def test_writer_failure_is_reported_by_durable(sq, caplog):
    sq._wal.retry_scale = 0.0
    sq._wal.inject_failure(errno.EIO, writes=100)
    sq.put_session("c", NEVER, 5, None)
    with trio.fail_after(10), pytest.raises(StoreError, match="Input/output error"):
        await sq.durable(sq.mark())
    assert sq._wal.retries == 5  # first try and five retries, then it gives up
    assert "writing the log failed" in caplog.text
    # Later changes are refused too: nothing after a failure is acknowledged.
    sq.put_session("d", NEVER, 5, None)
    with trio.fail_after(10), pytest.raises(StoreError):
        await sq.durable(sq.mark())


async def test_transient_write_failure_is_retried(sq):
    # A disk that is full for a moment: the writer waits and tries again.
    sq._wal.retry_scale = 0.0
    sq._wal.inject_failure(errno.ENOSPC, writes=2)
    sq.put_session("c", NEVER, 5, None)
    with trio.fail_after(10):
        await sq.durable(sq.mark())
    assert sq._wal.retries == 2 and sq._wal.error == 0
    assert rows(sq, "sessions") == 1


def test_second_process_on_same_directory_is_refused(sq):
    other = SqliteStore(sq.data_dir)
    with pytest.raises(StoreError, match="in use"):
        other.open()


def test_unencodable_message_is_logged_not_fatal(sq, caplog):
    class Bad:
        topic, payload, qos, retain, dup, packet_id, properties = "a/+", b"", 1, False, False, 1, {}

    sq.put_session("c", NEVER, 5, None)
    sq.put_message(1, Bad(), None)
    sq.add_delivery("c", DeliveryRecord(1, 1))
    sq.put_message(2, pub(), None)
    sq.add_delivery("c", DeliveryRecord(2, 1))
    sq.put_message_fields(3, "a/+", b"", 1, False, None, None)  # the core's path
    sq.add_delivery_fields("c", 3, 1, 0, "queued")
    sq.put_message_add_delivery(4, "a/+", b"", 1, False, None, None, "c", 1, 0, "queued")
    wait_committed(sq)
    assert "cannot store message 1" in caplog.text
    assert "cannot store message 3" in caplog.text
    assert "cannot store message 4" in caplog.text
    sq.close()
    s2 = SqliteStore(sq.data_dir)
    snap = s2.open(now=NOW)
    s2.close()
    # The delivery without a message is dropped; the good one survives.
    assert snap.sessions[0].deliveries == [DeliveryRecord(2, 1)]


# ------------------------------------------------------------ corrupt databases

def make_db_with_session(data_dir, page_size=None):
    s = SqliteStore(data_dir)
    if page_size is None:
        s.open(now=NOW)
    else:  # as a version with other pages made it
        saved, sqlite_mod.PAGE_SIZE = sqlite_mod.PAGE_SIZE, page_size
        try:
            s.open(now=NOW)
        finally:
            sqlite_mod.PAGE_SIZE = saved
    s.put_session("c", NEVER, 5, None)
    s.put_retained("r", Publish("r", b"v", 0, True), None)
    s.close()
    return os.path.join(data_dir, DB_NAME)


def corrupt_garbage(path):
    with open(path, "wb") as f:
        f.write(b"this is not a database" * 100)


def corrupt_truncated(path):
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.truncate(max(512, size // 2))
        f.seek(100)
        f.write(b"\xff" * 300)


def corrupt_foreign(path):
    os.remove(path)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users(name)")


def corrupt_newer(path):
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value=99 WHERE key='schema_version'")


@pytest.mark.parametrize("damage", [corrupt_garbage, corrupt_truncated, corrupt_foreign,
                                    corrupt_newer])
def test_unusable_database_is_moved_aside_and_logged(tmp_path, caplog, damage):
    data = str(tmp_path / "d")
    path = make_db_with_session(data)
    damage(path)
    with open(path, "rb") as f:
        original = f.read()
    caplog.set_level(logging.ERROR, "fastmqtt.store")
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    try:
        assert snap.sessions == []  # started, empty
        assert s.moved_aside and os.path.basename(s.moved_aside).startswith(DB_NAME + ".corrupt-")
        with open(s.moved_aside, "rb") as f:
            assert f.read() == original  # kept, not overwritten
        assert "unusable" in caplog.text and s.moved_aside in caplog.text
        s.put_session("new", NEVER, 5, None)
    finally:
        s.close()
    s2 = SqliteStore(data)
    snap = s2.open(now=NOW)
    s2.close()
    assert [x.client_id for x in snap.sessions] == ["new"] and s2.moved_aside is None


def make_logged_state(data_dir, sessions=3):
    """A store whose state is only in the log (never compacted): one record per
    session, each with a queued message."""
    s = SqliteStore(data_dir)
    s.open(now=NOW)
    for i in range(1, sessions + 1):
        s.put_session(f"c{i}", NEVER, 5, None)
        s.put_message(i, pub(payload=b"m%d" % i), None)
        s.add_delivery(f"c{i}", DeliveryRecord(i, 1))
        wait_committed(s)  # one batch, one record each
    close_without_compacting(s)
    lsns = [lsn for lsn, _, _ in log_records(data_dir)]
    assert len(lsns) == sessions
    return lsns


def segments(data_dir):
    return sorted(os.path.join(data_dir, n) for n in os.listdir(data_dir)
                  if n.startswith(SEGMENT_PREFIX) and len(n) == len(SEGMENT_PREFIX) + 16)


def log_records(data_dir):
    """[(lsn, offset, length)] of every framed record in the segments (the
    frame: record length and lsn, little endian, then the record)."""
    out = []
    for path in segments(data_dir):
        with open(path, "rb") as f:
            data = f.read()
        off = 0
        while off < len(data):
            n, lsn = struct.unpack_from("<IQ", data, off)
            out.append((lsn, off, 12 + n))
            off += 12 + n
    return out


def test_log_records_not_compacted_are_replayed_into_the_tables(tmp_path):
    data = str(tmp_path / "d")
    lsns = make_logged_state(data)
    with sqlite3.connect(os.path.join(data, DB_NAME)) as db:
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    try:
        assert sorted(by_client(snap)) == ["c1", "c2", "c3"]
        assert {m: p.payload for m, (p, _) in snap.messages.items()} == {
            1: b"m1", 2: b"m2", 3: b"m3"}
        # Folded into the tables and the log emptied, in that order.
        assert rows(s, "deliveries") == 3
        assert log_records(data) == []
        with sqlite3.connect(s.path) as db:
            assert db.execute("SELECT value FROM meta WHERE key='compacted_lsn'"
                              ).fetchone() == (lsns[-1],)
        # New records continue the sequence.
        s.put_session("c9", NEVER, 5, None)
        wait_committed(s)
        assert s._lsn == lsns[-1] + 1
    finally:
        s.close()


def test_interrupted_replay_leaves_the_log_and_runs_again(tmp_path, monkeypatch):
    """A replay that fails half way (here: an I/O error after part of the rows
    were written) rolls back; the log is untouched and the next start replays
    it all again."""
    from fastmqtt.store import sqlite as sqlite_mod

    data = str(tmp_path / "d")
    make_logged_state(data)
    inner = sqlite_mod._apply_tables

    def fail_half_way(conn, batch):
        inner(conn, batch)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_mod, "_apply_tables", fail_half_way)
    with pytest.raises(StoreError, match="disk I/O"):
        SqliteStore(data).open(now=NOW)
    assert len(log_records(data)) == 3
    with sqlite3.connect(os.path.join(data, DB_NAME)) as db:
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
    monkeypatch.setattr(sqlite_mod, "_apply_tables", inner)
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert sorted(by_client(snap)) == ["c1", "c2", "c3"] and s.moved_aside is None


def test_compaction_failure_keeps_everything_in_the_log(tmp_path, caplog):
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    s.retry_delays = (0.0,)
    fails = []
    inner = s._compact

    def flaky(conn, dirty, hold=False):
        if not fails:
            fails.append(dirty.lsn)
            raise sqlite3.OperationalError("database or disk is full")
        return inner(conn, dirty, hold)

    s._compact = flaky
    s.put_session("c", NEVER, 5, None)
    wait_committed(s)
    assert not s.compact(timeout=0.5) or fails  # the first attempt fails
    assert s.compact()  # the retry folds it in
    assert fails and rows(s, "sessions") == 1
    assert "compaction failed" in caplog.text
    s.close()


def test_fold_holding_back_skips_what_the_next_records_undo(tmp_path):
    """A periodic fold holds the records it reads back for the next one, and
    folds those the last one held without what the newer records undo: a
    delivery added and acknowledged a moment later, and its message, never
    reach the tables (no insert, no delete); the rest does. Recovery replays
    the held records after the compacted lsn as ever. Records that delete
    little (subscribers offline) are folded at once."""
    d = str(tmp_path)
    s = SqliteStore(d)
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    for i in (1, 2, 3):
        s.put_message(i, pub(payload=b"%d" % i), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
    wait_committed(s)
    lsn0 = log_records(d)[-1][0]
    s.remove_delivery("c", 1)  # deliveries are being acknowledged: worth holding
    s.put_message(4, pub(payload=b"acked"), None)
    s.add_delivery("c", DeliveryRecord(4, 1))
    s.put_message(5, pub(payload=b"kept"), None)
    s.add_delivery("c", DeliveryRecord(5, 1))
    s.add_delivery("c", DeliveryRecord(3, 1, 9, "sent"))  # a re-add of a row in the tables
    wait_committed(s)
    lsn1 = log_records(d)[-1][0]
    s.remove_delivery("c", 4)  # acknowledged: the last delivery of 4
    s.remove_delivery("c", 3)
    wait_committed(s)
    lsn2 = log_records(d)[-1][0]
    close_without_compacting(s)

    def table(conn, sql):
        return sorted(conn.execute(sql).fetchall())

    conn = sqlite_mod._connect(s.path, "FULL")
    done = []
    conn.set_trace_callback(done.append)
    f = sqlite_mod._Folder(conn, d, s.path)
    assert f.fold(lsn0, hold=True)[0] == lsn0  # nothing deleted: folded at once
    assert table(conn, "SELECT msg_id FROM messages") == [(1,), (2,), (3,)]
    assert f.fold(lsn1, hold=True) == (lsn0, 0)  # held back
    assert table(conn, "SELECT msg_id FROM messages") == [(1,), (2,), (3,)]
    lsn, _ = f.fold(lsn2, hold=True)  # folds up to lsn1, holds the removals
    assert lsn == lsn1
    assert table(conn, "SELECT msg_id FROM messages") == [(2,), (3,), (5,)]
    assert table(conn, "SELECT msg_id, state FROM deliveries") == [
        (2, "queued"), (3, "queued"), (5, "queued")]  # 3's re-add: its delete is due
    assert not any("(4," in x or ",4," in x for x in done if x.startswith("INSERT"))
    f.reader.close()
    conn.close()
    s2 = SqliteStore(d)  # a crash now: the held records are replayed
    snap = s2.open(now=NOW)
    s2.close()
    assert [x.msg_id for x in snap.sessions[0].deliveries] == [2, 5]
    assert sorted(snap.messages) == [2, 5]


def test_a_compactor_process_that_died_is_replaced(tmp_path, caplog):
    """The compactor process is gone (killed, crashed): the next compaction
    fails, says so, and the retry starts another; nothing is lost."""
    s = SqliteStore(str(tmp_path), compactor="process")
    s.open(now=NOW)
    s.retry_delays = (0.0,)
    s.put_session("c", NEVER, 5, None)
    assert s.compact() and rows(s, "sessions") == 1
    first = s._child
    first.kill()
    first.wait()
    for i in range(1, 101):
        s.put_message(i, pub(payload=b"%d" % i), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
    wait_committed(s)
    assert s.compact()  # the first attempt fails, the retry starts another process
    assert s._child is not None and s._child is not first and s._child.poll() is None
    assert rows(s, "deliveries") == 100 and rows(s, "messages") == 100
    assert "compactor process exited" in caplog.text
    s.close()
    assert segments(str(tmp_path)) == []  # a clean close: the tables have it all


def test_no_compactor_process_means_compacting_in_a_thread(tmp_path, caplog, monkeypatch):
    """An interpreter that cannot start another (embedded, frozen): the
    store says so and folds the log in a thread instead; nothing is lost."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    s = SqliteStore(str(tmp_path / "d"))
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    s.put_message(1, pub(), None)
    s.add_delivery("c", DeliveryRecord(1, 1))
    assert s.compact() and rows(s, "deliveries") == 1
    assert s.compactor == "thread" and "compacting in a thread" in caplog.text
    s.close()


def test_compactor_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match="compactor"):
        SqliteStore(str(tmp_path), compactor="fork")


def _rewrite_segment(data_dir, edit):
    (path,) = segments(data_dir)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    records = log_records(data_dir)
    data = edit(data, records)
    with open(path, "wb") as f:
        f.write(data)


def corrupt_log_record(data_dir):
    def edit(data, records):
        _, off, _ = records[1]  # the second of three records: not a torn tail
        data[off + 12 + 20] ^= 0x5A
        return data
    _rewrite_segment(data_dir, edit)


def drop_log_record(data_dir):
    def edit(data, records):
        _, off, n = records[1]
        del data[off:off + n]
        return data
    _rewrite_segment(data_dir, edit)


@pytest.mark.parametrize("damage, reason", [(drop_log_record, "is missing")])
def test_damaged_log_moves_tables_and_log_aside(tmp_path, caplog, damage, reason):
    data = str(tmp_path / "d")
    make_logged_state(data)
    damage(data)
    (seg,) = segments(data)
    with open(seg, "rb") as f:
        log_bytes = f.read()
    with open(os.path.join(data, DB_NAME), "rb") as f:
        tables = f.read()
    caplog.set_level(logging.ERROR, "fastmqtt.store")
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    try:
        assert snap.sessions == []  # started, empty
        assert reason in caplog.text and "unusable" in caplog.text
        tag = s.moved_aside[len(s.path):]
        assert tag.startswith(".corrupt-")
        with open(s.moved_aside, "rb") as f:
            assert f.read() == tables  # kept as it was
        with open(seg + tag, "rb") as f:  # the log went with it, as it was
            assert f.read() == log_bytes
    finally:
        s.close()


def test_damaged_record_in_the_last_segment_ends_the_log_and_the_segment_is_kept(tmp_path,
                                                                                caplog):
    """A damaged record in the last segment ends the log there, even with
    intact records after it: a power failure while a reused segment is
    written over leaves exactly that, and what it drops was never
    acknowledged. The store starts with what came before (not moved aside:
    that would lose all of it), says so as an error, and keeps a copy of
    the segment. (A missing record, which no crash makes, still moves the
    store aside: above.)"""
    data = str(tmp_path / "d")
    make_logged_state(data)  # three records, one session each
    corrupt_log_record(data)  # the second
    (seg,) = segments(data)
    with open(seg, "rb") as f:
        log_bytes = f.read()
    caplog.set_level(logging.ERROR, "fastmqtt.store")
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert s.moved_aside is None
    assert [x.client_id for x in snap.sessions] == ["c1"]
    assert "record 3 follows it" in caplog.text and "unusable" not in caplog.text
    (kept,) = [n for n in os.listdir(data) if ".damaged-" in n]
    with open(os.path.join(data, kept), "rb") as f:
        assert f.read() == log_bytes
    s = SqliteStore(data)  # the copy is left alone from then on
    assert [x.client_id for x in s.open(now=NOW).sessions] == ["c1"]
    s.close()
    assert kept in os.listdir(data)


@pytest.mark.parametrize("cut", ["header", "body", "checksum"])
def test_torn_last_record_is_ignored(tmp_path, caplog, cut):
    """A crash in the middle of an append leaves the last record cut short
    (or, after a power failure, with garbage in it). That append was never
    acknowledged: recovery keeps every record before it and starts."""
    data = str(tmp_path / "d")
    make_logged_state(data)

    def edit(buf, records):
        _, off, n = records[-1]
        if cut == "header":
            return buf[:off + 7]
        if cut == "body":
            return buf[:off + n - 3]
        buf[off + n - 1] ^= 0xFF
        return buf

    _rewrite_segment(data, edit)
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert sorted(by_client(snap)) == ["c1", "c2"] and s.moved_aside is None
    assert "cut short" in caplog.text


def test_log_of_earlier_versions_is_replayed_and_removed(tmp_path):
    """Brokers before segment files kept the log in fastmqtt-log.db, one row
    per record: its records after compacted_lsn are replayed, then it goes."""
    data = str(tmp_path / "d")
    lsns = make_logged_state(data)
    old = os.path.join(data, LOG_NAME)
    with sqlite3.connect(old) as db:
        db.executescript("CREATE TABLE meta(key TEXT PRIMARY KEY, value);"
                         "INSERT INTO meta VALUES('schema_version', 1);"
                         "CREATE TABLE log(lsn INTEGER PRIMARY KEY, rec BLOB NOT NULL);")
        for path in segments(data):
            with open(path, "rb") as f:
                buf = f.read()
            for lsn, off, n in log_records(data):
                db.execute("INSERT INTO log VALUES(?, ?)", (lsn, buf[off + 12:off + n]))
    for path in segments(data):
        os.remove(path)
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert sorted(by_client(snap)) == ["c1", "c2", "c3"] and s.moved_aside is None
    assert not os.path.exists(old)
    with sqlite3.connect(s.path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='compacted_lsn'"
                          ).fetchone() == (lsns[-1],)


def test_version_1_database_without_log_is_upgraded(tmp_path):
    data = str(tmp_path / "d")
    path = make_db_with_session(data)
    with sqlite3.connect(path) as db:  # as version 1 left it: no log, no compacted_lsn
        db.execute("UPDATE meta SET value=1 WHERE key='schema_version'")
        db.execute("DELETE FROM meta WHERE key='compacted_lsn'")
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert [x.client_id for x in snap.sessions] == ["c"] and s.moved_aside is None
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'"
                          ).fetchone() == (SCHEMA_VERSION,)


def test_new_database_gets_the_large_page_size_an_existing_one_keeps_its_own(tmp_path):
    new = str(tmp_path / "new")
    s = SqliteStore(new)
    s.open(now=NOW)
    s.put_session("c", 60, 5, None)
    s.close()
    with sqlite3.connect(os.path.join(new, DB_NAME)) as db:
        assert db.execute("PRAGMA page_size").fetchone() == (sqlite_mod.PAGE_SIZE,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # A database made with SQLite's default pages (by an earlier version)
    # keeps them, and its contents.
    old = str(tmp_path / "old")
    path = make_db_with_session(old, page_size=4096)
    s = SqliteStore(old)
    snap = s.open(now=NOW)
    s.put_session("d", 60, 5, None)
    s.close()
    assert [x.client_id for x in snap.sessions] == ["c"] and s.moved_aside is None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA page_size").fetchone() == (4096,)
    s = SqliteStore(old)
    assert sorted(x.client_id for x in s.open(now=NOW).sessions) == ["c", "d"]
    s.close()


def test_undecodable_row_is_dropped_rest_recovered(tmp_path, caplog):
    data = str(tmp_path / "d")
    path = make_db_with_session(data)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO retained VALUES('bad', x'00ff', NULL)")
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert [t for t, _, _ in snap.retained] == ["r"]
    assert [x.client_id for x in snap.sessions] == ["c"]
    assert s.moved_aside is None and "undecodable retained message 'bad'" in caplog.text


async def test_aclose_commits_what_is_pending(tmp_path):
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    for i in range(1, 200):
        s.put_message(i, pub(), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
    await s.aclose()  # no durable() awaited: closing still commits everything
    s2 = SqliteStore(str(tmp_path))
    snap = s2.open(now=NOW)
    s2.close()
    assert len(snap.sessions[0].deliveries) == 199


def test_open_twice_is_an_error(sq):
    with pytest.raises(StoreError):
        sq.open()


@pytest.mark.parametrize("mode", ["sync", "batch"])
async def test_log_is_fsynced_before_durable_in_sync_mode_only(tmp_path, mode):
    """sync: durable() returns only once an fdatasync covers the append.
    batch: durable() returns once the append is written (a kill -9 cannot lose
    it); the fdatasync follows at most batch_interval_ms later."""
    s = SqliteStore(str(tmp_path), durability=mode, batch_interval_ms=60_000)
    s.open(now=NOW)
    try:
        wal = s._wal
        s.put_session("c", NEVER, 5, None)
        ticket = s.mark()
        with trio.fail_after(10):
            await s.durable(ticket)
        assert wal.written >= ticket
        if mode == "sync":
            assert wal.synced >= ticket and wal.fsyncs >= 1
        else:
            assert wal.synced < ticket and wal.fsyncs == 0  # not before the period
    finally:
        await s.aclose()
    assert wal.synced >= ticket  # closing fsyncs what is written


async def test_batch_mode_acknowledges_the_write_before_a_due_fsync(tmp_path):
    # batch: durable() waits for the write only. When the periodic fdatasync
    # is due right after that write (an interval of 0 here, a slow disk),
    # the write is announced first, not once the fsync is done.
    s = SqliteStore(str(tmp_path), durability="batch", batch_interval_ms=0)
    s.open(now=NOW)
    try:
        wal = s._wal
        wal.inject_sync_delay(2.0)
        s.put_session("c", NEVER, 5, None)
        ticket = s.mark()
        with trio.fail_after(1):  # less than the fsync takes
            await s.durable(ticket)
        assert wal.written >= ticket and wal.synced < ticket
        wal.inject_sync_delay(0)
    finally:
        await s.aclose()
    assert wal.synced >= ticket


async def test_batch_mode_fsyncs_within_the_interval(tmp_path):
    s = SqliteStore(str(tmp_path), durability="batch", batch_interval_ms=20)
    s.open(now=NOW)
    try:
        s.put_session("c", NEVER, 5, None)
        ticket = s.mark()
        with trio.fail_after(10):
            await s.durable(ticket)
            while s._wal.synced < ticket:  # the writer's timer, nothing else
                await trio.sleep(0.005)
    finally:
        await s.aclose()


async def test_failed_fsync_fails_the_store_in_sync_mode(tmp_path, caplog):
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    s._wal.inject_failure(errno.EIO, fsyncs=1)
    s.put_session("c", NEVER, 5, None)
    with trio.fail_after(10), pytest.raises(StoreError, match="Input/output"):
        await s.durable(s.mark())
    assert "writing the log failed" in caplog.text
    assert s._wal.retries == 0  # after a failed fsync nothing is retried
    await s.aclose()


def test_unopenable_database_is_an_error_not_moved_aside(tmp_path):
    data = tmp_path / "d"
    (data / DB_NAME).mkdir(parents=True)  # the path exists but is not a file
    s = SqliteStore(str(data))
    with pytest.raises(StoreError, match="cannot use"):
        s.open()
    assert (data / DB_NAME).is_dir() and s.moved_aside is None
    # The lock was released: a retry after fixing the problem works.
    (data / DB_NAME).rmdir()
    s2 = SqliteStore(str(data))
    s2.open()
    s2.close()


def test_data_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="data directory"):
        SqliteStore(str(tmp_path / "f")).open()


def test_released_message_handed_out_again_is_stored_again(reopener):
    """The broker keeps one msg_id per message object: a retained message sent
    to a second persistent subscriber after the first acknowledged it reuses
    the id without a new put_message. The store brings the row back."""
    s, _ = reopener.first()
    for c in ("a", "b"):
        s.put_session(c, NEVER, 5, None)
    s.put_message(1, Publish("r", b"retained", 1, True), None)
    s.add_delivery("a", DeliveryRecord(1, 1))
    if reopener.kind != "memory":
        wait_committed(s)
    s.remove_delivery("a", 1)  # last reference gone: the row is dropped
    if reopener.kind != "memory":
        wait_committed(s)
        assert rows(s, "messages") == 0
    s.add_delivery("b", DeliveryRecord(1, 1))  # same id again, no put_message
    _, snap = reopener.restart()
    assert by_client(snap)["b"].deliveries == [DeliveryRecord(1, 1)]
    assert snap.messages[1][0].payload == b"retained"


def test_a_client_is_known_by_its_id_not_by_the_string_object(sq):
    """A client's deliveries are matched by its id's value: equal strings
    that are other objects name the same client."""
    sq.put_session("client-1", NEVER, 5, None)
    sq.put_message(1, pub(), None)
    sq.add_delivery("client-" + str(1), DeliveryRecord(1, 1))
    sq.add_delivery("client-" + str(1), DeliveryRecord(1, 1, 3, "sent"))  # a re-add
    wait_committed(sq)
    sq.remove_delivery("client-" + str(1), 1)  # its one delivery: the row goes
    wait_committed(sq)
    assert rows(sq, "messages") == 0 and rows(sq, "deliveries") == 0


def test_deleting_a_session_releases_the_messages_only_it_had(sq):
    for c in ("c", "d"):
        sq.put_session(c, NEVER, 5, None)
    for mid in (1, 2, 3):
        sq.put_message(mid, pub(payload=b"%d" % mid), None)
    sq.add_delivery("c", DeliveryRecord(1, 1))
    sq.add_delivery("c", DeliveryRecord(2, 1))  # c first, d second
    sq.add_delivery("d", DeliveryRecord(2, 1))
    sq.add_delivery("d", DeliveryRecord(3, 1))  # d first, c second
    sq.add_delivery("c", DeliveryRecord(3, 1))
    wait_committed(sq)
    assert rows(sq, "messages") == 3
    sq.delete_session("c")
    wait_committed(sq)
    assert rows(sq, "messages") == 2  # 1 went with c; d still has 2 and 3
    sq.remove_delivery("d", 2)
    sq.remove_delivery("d", 3)
    wait_committed(sq)
    assert rows(sq, "messages") == 0


@pytest.mark.parametrize("gap", ["same batch", "folded between"])
def test_message_stored_again_then_released_leaves_no_row(sq, gap):
    """A message released (its row deleted), stored again under its id and
    released again within the records one fold nets: the second release
    still deletes the row, which the first fold may have left in the tables
    (before, the put and its delete cancelled out and the row stayed)."""
    sq.put_session("c", NEVER, 5, None)
    sq.put_message(1, pub(), None)
    sq.add_delivery("c", DeliveryRecord(1, 1))
    wait_committed(sq)
    assert rows(sq, "messages") == 1
    sq.remove_delivery("c", 1)  # released
    if gap == "folded between":
        wait_committed(sq)
        assert rows(sq, "messages") == 0
    sq.add_delivery("c", DeliveryRecord(1, 1))  # stored again (the same id)
    sq.remove_delivery("c", 1)  # released again
    wait_committed(sq)
    assert rows(sq, "messages") == 0


def test_fold_holding_back_keeps_the_delete_of_a_message_put_over_a_row(tmp_path):
    from fastmqtt._record import Batch, decode_ops

    d = str(tmp_path)
    s = SqliteStore(d)
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    s.put_message(1, pub(), None)
    s.add_delivery("c", DeliveryRecord(1, 1))
    wait_committed(s)
    assert s.compact()  # the row is in the tables
    s.remove_delivery("c", 1)  # released...
    s.add_delivery("c", DeliveryRecord(1, 1))  # ...stored again, over the row
    s.put_message(2, pub(), None)  # (a delete for each put: worth holding)
    s.add_delivery("c", DeliveryRecord(2, 1))
    s.remove_delivery("c", 2)
    wait_committed(s)
    lsn1 = log_records(d)[-1][0]
    s.remove_delivery("c", 1)  # released again, in the next window
    wait_committed(s)
    lsn2 = log_records(d)[-1][0]
    close_without_compacting(s)
    conn = sqlite_mod._connect(s.path, "FULL")
    f = sqlite_mod._Folder(conn, d, s.path)
    assert f.fold(lsn1, hold=True)[1] == 0  # held
    assert f.fold(lsn2, hold=True)[0] == lsn1
    assert f.fold(lsn2)[0] == lsn2
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    f.reader.close()
    conn.close()


def test_a_client_that_keeps_everything_costs_no_filtering(sq):
    """An offline client's list holds only messages it still has (its count
    says so), so growing it never scans it; delete_session then releases
    all of them."""
    sq.put_session("c", NEVER, 5, None)
    for i in range(1, 10_001):
        sq.put_message_add_delivery(i, "a/b", b"x", 1, False, None, None, "c", 1, 0, "queued")
    for i in range(10_001, 10_101):
        sq.put_message_fields(i, "a/b", b"y", 1, False, None, None)
        sq.add_delivery_fields("c", i, 1, 0, "queued")
    assert sq.held_sizes["c"] == 10_100
    assert sq._held_scanned == 0
    sq.remove_delivery("c", 5)
    sq.add_delivery_fields("c", 5, 1, 0, "queued")  # a second entry for 5
    for i in range(10_101, 20_300):
        sq.put_message_add_delivery(i, "a/b", b"x", 1, False, None, None, "c", 1, 0, "queued")
    assert sq._held_scanned > 0  # the limit came with a stale entry: filtered
    sq.delete_session("c")
    assert not sq._msgs
    wait_committed(sq)
    assert rows(sq, "messages") == 0


def test_what_delete_session_needs_stays_bounded_and_right(sq):
    """Per client, the recorder lists the messages it was given (nothing is
    done per acknowledgement): the list is filtered as it grows, so a client
    that acknowledges as it goes keeps a short one, and delete_session
    releases exactly what the client still had, re-adds included."""
    for c in ("c", "d"):
        sq.put_session(c, NEVER, 5, None)
    for i in range(1, 5001):  # online: each acknowledged at once
        sq.put_message_add_delivery(i, "a/b", b"x", 1, False, None, None, "c", 1, 0, "queued")
        sq.remove_delivery("c", i)
    assert sq.held_sizes["c"] <= 64
    for i in range(5001, 8001):  # offline: 3,000 kept, d has every third too
        sq.put_message_add_delivery(i, "a/b", b"y", 1, False, None, None, "c", 1, 0, "queued")
        if i % 3 == 0:
            sq.add_delivery_fields("d", i, 1, 0, "queued")
    for i in range(5001, 8001, 2):  # half acknowledged, then given again
        sq.remove_delivery("c", i)
        sq.add_delivery_fields("c", i, 1, 0, "queued")
    for i in range(5003, 8001, 4):  # and some of those acknowledged for good
        sq.remove_delivery("c", i)
    left = {i for i in range(5001, 8001)} - set(range(5003, 8001, 4))
    assert sq.held_sizes["c"] <= 2 * len(left) + 64
    assert sq._held_scanned > 0
    sq.delete_session("c")
    kept = {i for i in range(5001, 8001) if i % 3 == 0}  # d's
    assert set(sq._msgs) == kept
    wait_committed(sq)
    assert rows(sq, "messages") == len(kept)


def test_deliveries_named_before_their_message_is_stored_carry_over(sq, caplog):
    unknown = "delivery of message 5, which was never stored"
    for c in ("c", "d"):
        sq.put_session(c, NEVER, 5, None)
    sq.add_delivery("c", DeliveryRecord(5, 1))
    sq.add_delivery("d", DeliveryRecord(5, 1))
    sq.add_delivery("d", DeliveryRecord(5, 1))  # a re-add: not reported again
    assert caplog.text.count(unknown) == 2
    sq.put_message(5, pub(payload=b"late"), None)  # both deliveries count
    sq.remove_delivery("c", 5)
    wait_committed(sq)
    assert rows(sq, "messages") == 1
    sq.remove_delivery("d", 5)
    wait_committed(sq)
    assert rows(sq, "messages") == 0
    sq.add_delivery("c", DeliveryRecord(5, 1))  # released a moment ago: stored again
    assert caplog.text.count(unknown) == 2
    wait_committed(sq)
    assert rows(sq, "messages") == 1
    sq.add_delivery("c", DeliveryRecord(6, 1))  # never stored: its count alone
    sq.remove_delivery("c", 6)
    assert 6 not in sq._msgs and 6 not in sq._released


async def test_waiters_registered_out_of_order_all_wake(sq):
    held = HeldWriter(sq)
    tickets = []
    for i in range(30):
        sq.put_session(f"c{i}", NEVER, 5, None)
        tickets.append(sq.mark())
    woke = []

    async def wait_for(t):
        await sq.durable(t)
        woke.append(t)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for t in reversed(tickets):  # newest first: the heap must still order them
                n.start_soon(wait_for, t)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == []
            held.release()
    assert sorted(woke) == tickets
    assert sq._waiters == []


async def test_aclose_completes_pending_waiters(tmp_path):
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    held = HeldWriter(s)
    s.put_session("c", NEVER, 5, None)
    await trio.testing.wait_all_tasks_blocked()
    s.put_session("d", NEVER, 5, None)  # lands in the next batch
    ticket = s.mark()
    errors = []

    async def waiter():
        try:
            await s.durable(ticket)
        except StoreError as e:
            errors.append(e)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            held.release()
            await s.aclose()  # commits the second batch too
    assert errors == []  # closing committed everything first: the wait succeeded


async def test_checkpointer_moves_the_wal_into_the_database(tmp_path, monkeypatch):
    from fastmqtt.store import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_BYTES", 64 * 1024)
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    try:
        base = os.path.getsize(s.path)
        s.put_session("c", NEVER, 5, None)
        for i in range(1, 2001):
            s.put_message(i, pub(payload=b"x" * 200), None)
            s.add_delivery("c", DeliveryRecord(i, 1))
        with trio.fail_after(10):
            await s.durable(s.mark())
            # The writer itself never checkpoints (wal_autocheckpoint=0); the
            # checkpoint thread copies the pages into the database file.
            assert s._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
            while os.path.getsize(s.path) <= base + 200 * 1000:
                await trio.sleep(0.01)
    finally:
        await s.aclose()


async def test_when_durable_calls_back_once_committed(sq):
    """The broker's acknowledgements wait with a callback, not a task: it
    runs on the trio thread once the ticket is committed, never before."""
    held = HeldWriter(sq)
    sq.put_session("c", NEVER, 5, None)
    ticket = sq.mark()
    calls = []
    with trio.fail_after(10):
        assert sq.when_durable(ticket, lambda: calls.append(sq.committed))
        await trio.testing.wait_all_tasks_blocked()
        assert calls == [] and sq.committed < ticket
        held.release()
        while not calls:
            await trio.sleep(0.001)
    assert calls[0] >= ticket
    # Durable already: nothing is registered, the caller goes ahead itself.
    assert sq.when_durable(ticket, lambda: calls.append("again")) is False
    assert calls[1:] == []


async def test_when_durable_calls_back_when_the_store_fails(sq):
    sq._wal.inject_failure(errno.EIO, fsyncs=1)
    sq.put_session("c", NEVER, 5, None)
    ticket = sq.mark()
    called = trio.Event()
    assert sq.when_durable(ticket, called.set)
    with trio.fail_after(10):
        await called.wait()  # woken to find out: not committed, durable() raises
    assert sq.committed < ticket
    with pytest.raises(StoreError):
        await sq.durable(ticket)
    assert sq.when_durable(sq.mark() + 1, called.set) is False  # failed: nothing registered


async def test_changes_are_flushed_in_the_same_turn_of_the_loop(sq):
    sq.put_session("off", NEVER, 5, 1.0)
    sq.put_message(1, pub(), None)
    sq.add_delivery("off", DeliveryRecord(1, 1))  # queued: no PUBACK is coming soon
    await trio.testing.wait_all_tasks_blocked()
    assert sq.commits == 1
    with trio.fail_after(10):
        await sq.durable(sq.mark())


def test_log_rotates_into_segments_replayed_in_order_and_deleted_once_folded(tmp_path,
                                                                               monkeypatch):
    from fastmqtt.store import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "SEGMENT_BYTES", 2048)
    data = str(tmp_path / "d")
    s = SqliteStore(data)
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    for i in range(1, 121):
        s.put_message(i, pub(payload=b"m%d" % i + b"x" * 100), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
        wait_committed(s)  # a record each: the log goes through many segments
    files = segments(data)
    assert len(files) >= 5
    lsns = [lsn for lsn, _, _ in log_records(data)]
    assert lsns == list(range(lsns[0], lsns[0] + len(lsns)))  # in order, none missing
    close_without_compacting(s)  # as after a crash: only the log has them
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    try:
        assert [d.msg_id for d in by_client(snap)["c"].deliveries] == list(range(1, 121))
        assert {m: p.payload[:4] for m, (p, _) in snap.messages.items()}[120] == b"m120"
        for i in range(121, 181):
            s.put_message(i, pub(payload=b"y" * 100), None)
            s.add_delivery("c", DeliveryRecord(i, 1))
            wait_committed(s)
        assert len(segments(data)) >= 3
        assert s.compact()
        # Folded into the tables: every segment but the one being written goes.
        assert len(segments(data)) == 1
        assert rows(s, "deliveries") == 180
    finally:
        s.close()
    assert segments(data) == [] or log_records(data) == []  # a clean close leaves no log


async def test_batch_direct_writes_across_segment_switches_replay_in_order(tmp_path,
                                                                          monkeypatch):
    """batch on the trio thread: records written by the event loop itself
    and records the writer writes around each segment switch (a switch
    pending sends them through it) reach the segments in lsn order, and all
    of them come back after a crash."""
    from fastmqtt.store import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "SEGMENT_BYTES", 2048)
    data = str(tmp_path / "d")
    s = SqliteStore(data, durability="batch", batch_interval_ms=5)
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    with trio.fail_after(30):
        for i in range(1, 121):
            s.put_message(i, pub(payload=b"m%d" % i + b"x" * 100), None)
            s.add_delivery("c", DeliveryRecord(i, 1))
            await s.durable(s.mark())  # a record each, through many segments
    wal = s._wal
    assert wal.direct_writes >= 60 and wal.writes >= 5  # both ways, switches included
    assert len(segments(data)) >= 5
    lsns = [lsn for lsn, _, _ in log_records(data)]
    assert lsns == list(range(lsns[0], lsns[0] + len(lsns)))  # in order, none missing
    close_without_compacting(s)  # as after a crash: only the log has them
    s = SqliteStore(data)
    snap = s.open(now=NOW)
    s.close()
    assert [d.msg_id for d in by_client(snap)["c"].deliveries] == list(range(1, 121))
    assert {m: p.payload[:4] for m, (p, _) in snap.messages.items()}[120] == b"m120"


async def test_stalled_disk_keeps_changes_in_the_batch_not_in_records(tmp_path, monkeypatch):
    """Memory stays bounded while the disk stalls: past PENDING_LIMIT bytes
    of unwritten records, flushes stop and changes stay in the batch (a net
    effect: a message queued and acknowledged again cancels out); once the
    writer catches up, everything is flushed, written and recovered."""
    from fastmqtt.store import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "PENDING_LIMIT", 4096)
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    held = HeldWriter(s)
    s.put_session("c", NEVER, 5, None)
    for i in range(1, 201):
        s.put_message(i, pub(payload=b"%05d" % i + b"x" * 200), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
        await trio.testing.wait_all_tasks_blocked()  # each turn of the loop: a flush
    pending = s._wal.pending
    assert 4096 < pending < 4096 + 8192  # the first records, then no more
    assert s._seq >= s._first  # the rest waits in the batch
    with trio.fail_after(10):
        held.release()
        await s.durable(s.mark())
    await s.aclose()
    s2 = SqliteStore(str(tmp_path))
    snap = s2.open(now=NOW)
    s2.close()
    assert [d.msg_id for d in snap.sessions[0].deliveries] == list(range(1, 201))


def test_pickled_part_of_a_record_from_before_reput_still_decodes():
    """Records written before the pickled batch carried ``reput`` (12
    fields) decode as before, with no such marks."""
    import pickle

    from fastmqtt.store import sqlite as sqlite_mod

    old = pickle.dumps((1, set(), {"c": ("c", 5, 5, None, None)}, {}, {}, {}, {}, {7},
                        {}, {}, {}, set()), 5)
    b = sqlite_mod._decode_cold(old)
    assert b.msg_del == {7} and "c" in b.sessions and b.reput == set()


async def test_stalled_batch_keeps_a_put_over_a_row_then_a_later_release_deletes_it(
        tmp_path, monkeypatch):
    """While the disk stalls, ops are folded into the batch, and that batch
    is written as the record's pickled part once the stall clears. A message
    released there and stored again over its row (Batch.reput) keeps that
    mark in the pickle, so its release in a later record, folded with it,
    still deletes the row (without the mark the put and the delete cancel
    out and the old row stays until the next start)."""
    from fastmqtt.store import sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "PENDING_LIMIT", 4096)
    monkeypatch.setattr(sqlite_mod, "COMPACT_PERIOD", 3600.0)  # folds only when asked
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    s.put_message(1, pub(), None)
    s.add_delivery("c", DeliveryRecord(1, 1))
    await s.durable(s.mark())
    assert s.compact()  # message 1 has a row in the tables
    held = HeldWriter(s)
    for i in range(2, 202):  # records until the writer is PENDING_LIMIT behind
        s.put_message(i, pub(payload=b"x" * 200), None)
        s.add_delivery("c", DeliveryRecord(i, 1))
        await trio.testing.wait_all_tasks_blocked()
    assert s._wal.pending > 4096 and s._flush_held
    s.remove_delivery("c", 1)  # released: its row is to go...
    await trio.testing.wait_all_tasks_blocked()
    s.add_delivery("c", DeliveryRecord(1, 1))  # ...stored again over it, in the batch
    await trio.testing.wait_all_tasks_blocked()
    assert 1 in s._batch.reput
    with trio.fail_after(10):
        held.release()
        await s.durable(s.mark())  # the batch, pickled, is a record now
    s.remove_delivery("c", 1)  # released again, in a later record
    with trio.fail_after(10):
        await s.durable(s.mark())
    assert s.compact()  # one fold nets both records
    with sqlite3.connect(s.path) as db:
        assert db.execute("SELECT count(*) FROM messages WHERE msg_id=1").fetchone()[0] == 0
    await s.aclose()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_damaged_ops_raise_value_error_only(data):
    """The ops decoder meets damaged input (a record whose checksum matched
    by chance, a bug): ValueError with the byte, never a crash or a hang."""
    from fastmqtt._record import Batch, decode_ops

    try:
        decode_ops(data, Batch())
    except ValueError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       payload=st.binary(max_size=200), qos=st.integers(0, 2), retain=st.booleans(),
       expires=st.one_of(st.none(), st.floats(0, 1e10)))
@example("a\x00b", b"", 1, False, None)
@example("a/+", b"", 1, False, None)
@example("a/b", b"x" * 20_000, 2, True, None)  # Remaining Length in 3 bytes
@example("a/b", b"x" * 2_100_000, 1, False, 5.0)  # and in 4
@example("#", b"", 0, True, None)
def test_message_recorded_as_fields_decodes_to_its_stored_form(topic, payload, qos, retain,
                                                                expires):
    """A message without properties is recorded as its fields (an MSGF op:
    no encoding on the event loop); decode_ops then gives exactly the stored
    form the encoder makes, as for a message recorded encoded (MSG). A topic
    the encoder would refuse (wildcards, U+0000) is encoded when recorded,
    and so refused there, never in the compactor."""
    from fastmqtt._codec import encode_stored_fields
    from fastmqtt._record import Batch, decode_ops

    with tempfile.TemporaryDirectory() as d:
        s = SqliteStore(d)
        s.open(now=NOW)
        try:
            s.take_ops()
            s.put_message_fields(7, topic, payload, qos, retain, None, expires)
            ops = s.take_ops()
        finally:
            s.close()
    valid = not any(c in topic for c in "+#\x00")
    if not valid:
        assert ops == b""  # refused (and logged) when recorded
        return
    assert ops[0] == 7  # MSGF
    b = Batch()
    decode_ops(ops, b)
    blob, exp = b.messages[7]
    assert type(blob) is bytearray  # (bound by the sqlite3 module without an adapter)
    assert bytes(blob) == encode_stored_fields(topic, payload, qos, retain, None)
    assert exp == expires
    # and it decodes back to the message.
    assert decode_publish(bytes(blob)) == Publish(topic, payload, qos, retain, False, 0, {})


def test_fields_op_decodes_without_the_store_imported():
    """decode_ops needs nothing registered (fastmqtt.store.sqlite never
    imported): a tool reading the log alone."""
    import subprocess

    code = (
        "import struct, sys\n"
        "from fastmqtt._record import Batch, decode_ops\n"
        "assert 'fastmqtt.store.sqlite' not in sys.modules\n"
        "t, p = b'a/b', b'xyz'\n"
        "op = (bytes([7]) + struct.pack('<Qd', 5, 9.5) + bytes([1 | 4]) + struct.pack('<H', 3)"
        " + t + struct.pack('<I', 3) + p)\n"
        "b = Batch(); decode_ops(op, b)\n"
        "from fastmqtt._codec import encode_stored_fields\n"
        "assert bytes(b.messages[5][0]) == encode_stored_fields('a/b', p, 1, True, None)\n"
        "assert b.messages[5][1] == 9.5\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_message_with_properties_is_recorded_encoded(sq):
    sq.take_ops()
    sq.put_message_fields(1, "a/b", b"x", 1, False, {PropertyId.CONTENT_TYPE: "t"}, None)
    ops = sq.take_ops()
    assert ops[0] == 1  # MSG: the stored form, encoded when recorded


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.text(max_size=24), payload=st.binary(max_size=40), qos=st.integers(0, 2),
       retain=st.booleans(), exp=st.one_of(st.none(), st.floats(allow_nan=False)),
       client=st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
       dqos=st.integers(0, 2), pid=st.integers(0, 0xFFFF),
       state=st.sampled_from(["queued", "sent", "released"]),
       before=st.sampled_from(["nothing", "stored", "named", "released"]))
def test_hot_path_records_what_the_two_calls_do(topic, payload, qos, retain, exp, client,
                                                dqos, pid, state, before):
    """put_message_add_delivery's one-pass path (a message without properties,
    a delivery without extra) records the same ops, byte for byte, as
    put_message_fields then add_delivery_fields, whatever the message's past
    (stored with this client's delivery: a re-add; named by a delivery before
    it was stored; released)."""
    with tempfile.TemporaryDirectory() as d:
        fused, pair = SqliteStore(d + "/a"), SqliteStore(d + "/b")
        for s in (fused, pair):
            if before == "stored":
                s.put_message_fields(7, "t", b"old", 1, False, None, None)
                s.add_delivery_fields(client, 7, 1, 0, "queued")
            elif before == "named":
                s.add_delivery_fields(client, 7, 1, 0, "queued")
                s.add_delivery_fields(client + "2", 7, 1, 0, "queued")
            elif before == "released":
                s.put_message_fields(7, "t", b"old", 1, False, None, None)
                s.add_delivery_fields(client, 7, 1, 0, "queued")
                s.remove_delivery(client, 7)
            s.take_ops()
        fused.put_message_add_delivery(7, topic, payload, qos, retain, None, exp, client, dqos,
                                       pid, state)
        pair.put_message_fields(7, topic, payload, qos, retain, None, exp)
        pair.add_delivery_fields(client, 7, dqos, pid, state)
        assert fused.take_ops() == pair.take_ops()
        assert fused._seq == pair._seq
        fused.remove_delivery(client, 7)  # the same deliveries are left
        pair.remove_delivery(client, 7)
        assert fused.take_ops() == pair.take_ops()
        assert (7 in fused._msgs, 7 in fused._released) == (7 in pair._msgs, 7 in pair._released)


class _Src:
    """The broker's message as the recorder reads ``src`` (core.Message's
    attributes)."""

    def __init__(self, topic, payload, qos=1, retain=False, props=None, expires_at=None):
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.props, self.expires_at = props, expires_at


_SRCS = {1: _Src("a/1", b"one"), 2: _Src("a/2", b"two", 2, True, None, 5.5),
         3: _Src("a/3", b"", 0), 4: _Src("a/4", b"four" * 10, 1, False, None, 7.0)}


def test_a_message_one_client_has_is_kept_lite_and_grows_full_for_a_second(sq):
    """With ``src`` (the core's message), a message that one client has a
    delivery of costs the recorder no object of its own: its entry is that
    client's id. A second client makes it a full entry, with the fields
    taken from ``src``; the last delivery going releases it either way."""
    m = _SRCS[1]
    sq.put_message_add_delivery(1, m.topic, m.payload, 1, False, None, None, "c1", 1, 0,
                                "queued", False, (), m)
    assert sq._msgs[1] == "c1" and type(sq._msgs[1]) is str
    sq.add_delivery_fields("c2", 1, 1, 0, "queued", False, (), m)
    assert type(sq._msgs[1]) is not str  # full now
    sq.remove_delivery("c1", 1)
    assert 1 in sq._msgs  # c2 still has it
    sq.take_ops()
    sq.remove_delivery("c2", 1)
    assert 1 not in sq._msgs
    assert sq.take_ops().count(bytes([2]) + struct.pack("<Q", 1)) == 1  # MSGDEL
    # The full entry had src's fields: kept after its release like any
    # other, so a delivery without src stores it again.
    assert 1 in sq._released
    sq.add_delivery_fields("c3", 1, 1, 0, "queued")
    ops = sq.take_ops()
    assert ops[0] == 1  # MSG
    b = sqlite_mod._Batch()
    sqlite_mod.decode_ops(ops, b)
    assert decode_publish(bytes(b.messages[1][0])) == Publish("a/1", b"one", 1, False, False, 0)


def test_a_lite_message_released_then_handed_out_again_is_stored_again_from_src(sq):
    """A lite entry keeps no fields, and nothing is kept once it is released
    (no ``_released`` entry): a later delivery of the same message (a
    retained message given to a new subscriber, say) stores it again from
    the ``src`` it brings. Without ``src`` that delivery would name a
    message the store no longer has."""
    m = _SRCS[2]
    sq.put_message_add_delivery(2, m.topic, m.payload, 2, True, None, 5.5, "c1", 1, 0,
                                "queued", False, (), m)
    sq.remove_delivery("c1", 2)
    assert 2 not in sq._msgs and 2 not in sq._released
    sq.take_ops()
    sq.add_delivery_fields("c2", 2, 1, 0, "queued", False, (), m)
    ops = sq.take_ops()
    assert ops[0] == 1  # MSG: stored again, encoded from src's fields
    b = sqlite_mod._Batch()
    sqlite_mod.decode_ops(ops, b)
    assert decode_publish(bytes(b.messages[2][0])) == Publish("a/2", b"two", 2, True, False, 0)
    assert b.messages[2][1] == 5.5
    assert sq._msgs[2] is not None and 2 in b.deliv["c2"]


def _lite_step(s, what, mid, client, src, put, pid=0):
    """One step of _LITE_STEPS on store ``s``, with ``src`` (or None) for the
    message (its fields, else those of _SRCS[mid]); ``put``: the messages
    stored so far (an add names only those)."""
    m = _SRCS[mid] if src is None else src
    if what == "put_add":
        s.put_message_add_delivery(mid, m.topic, m.payload, m.qos, m.retain, None,
                                   m.expires_at, client, 1, pid, "queued", False, (), src)
    elif what == "add" and mid in put:
        s.add_delivery_fields(client, mid, 1, 0, "queued", False, (), src)
    elif what == "update":
        s.update_delivery_fields(client, mid, 1, 9, "sent")
    elif what == "remove":
        s.remove_delivery(client, mid)
    elif what == "drop":
        s.delete_session(client)


_LITE_STEPS = st.lists(st.tuples(st.sampled_from(["put_add", "add", "update", "remove",
                                                  "drop"]),
                                 st.integers(1, 4), st.sampled_from(["a", "b", "c"])),
                       max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_LITE_STEPS)
def test_lite_entries_record_what_full_ones_do(steps):
    """Any sequence of the core's calls records the same ops, byte for byte,
    and keeps the same messages, with ``src`` (lite entries where one client
    has a message) as without (a full entry for every message): stored
    again, re-added, a second client, released, sessions deleted. As in the
    broker, a delivery names only a message that was stored before."""
    with tempfile.TemporaryDirectory() as d:
        lite, full = SqliteStore(d + "/a"), SqliteStore(d + "/b")
        put = set()
        for what, mid, client in steps:
            for s, src in ((lite, _SRCS[mid]), (full, None)):
                _lite_step(s, what, mid, client, src, put, 3)
            if what == "put_add":
                put.add(mid)
            assert lite.take_ops() == full.take_ops(), (what, mid, client)
            assert set(lite._msgs) == set(full._msgs)
            for k in sorted(lite._msgs):  # the same clients hold each message
                for c in "abc":
                    assert _held_by(lite, k, c) == _held_by(full, k, c), (k, c)


# The recorder's message index: a window of slots by msg_id, and a dict for
# ids outside it (see Recorder in _record.pyx). Clusters of ids far enough
# apart to leave gaps in the window (2,500 ids), to make it sparse (over
# 4,096 slots with fewer than one live entry in 4), and to move it (1,000,000
# ids past its end); and ids below it.
_IX_IDS = st.one_of(st.integers(1, 40), st.integers(2_500, 2_540),
                    st.integers(5_000, 5_040), st.integers(7_500, 7_540),
                    st.integers(1_000_000, 1_000_040), st.integers(1_002_000, 1_002_040))
_IX_STEPS = st.lists(st.tuples(st.sampled_from(["put_add", "add", "remove", "drop"]),
                               _IX_IDS, st.sampled_from(["a", "b"])), max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_IX_STEPS)
def test_the_message_index_keeps_what_a_dict_would(steps):
    """Whatever order message ids come and go in (in order, out of order,
    with gaps, far ahead, below the oldest kept), the index holds exactly
    the messages some client has a delivery of, each with its entry (the
    client's id while one client has it), as the dict it replaced would."""
    with tempfile.TemporaryDirectory() as d:
        s = SqliteStore(d + "/a")
        model: dict[int, set] = {}
        for what, mid, client in steps:
            _lite_step(s, what, mid, client, _Src(f"a/{mid}", b"p"), model)
            if what == "put_add":
                model.setdefault(mid, set()).add(client)
            elif what == "add" and mid in model:
                model[mid].add(client)
            elif what == "remove":
                if client in model.get(mid, ()):
                    model[mid].discard(client)
                    if not model[mid]:
                        del model[mid]
            elif what == "drop":
                for m in list(model):
                    model[m].discard(client)
                    if not model[m]:
                        del model[m]
            msgs = s._msgs
            assert set(msgs) == set(model), (what, mid, client)
            for m, clients in model.items():
                if len(clients) == 1 and type(msgs[m]) is str:
                    assert msgs[m] in clients
            window, live, spilled, _ = s.index_sizes
            assert live + spilled == len(model)
            assert live <= window <= 10_000  # no slot for each id up to 1,000,000
        s.take_ops()


def test_the_message_index_stays_small_when_one_old_message_is_kept(sq):
    """A message kept for a long time (an offline client's) while a hundred
    thousand others come and go (online clients acknowledging) does not hold
    a slot open for each of them: once the window is mostly empty, its
    oldest entries move to the dict, and the window stays small."""
    sq.put_message_add_delivery(1, "a/b", b"old", 1, False, None, None, "off", 1, 0, "queued")
    for i in range(2, 100_002):
        sq.put_message_add_delivery(i, "a/b", b"x", 1, False, None, None, "on", 1, 0, "queued")
        if i >= 10:  # a few in flight at a time
            sq.remove_delivery("on", i - 8)
        if i % 10_000 == 0:
            sq.take_ops()
    window, live, spilled, cap = sq.index_sizes
    assert (live, spilled) == (8, 1)
    assert window <= 16 and cap <= 4096 * 16
    assert 1 in sq._msgs
    sq.take_ops()


def test_the_message_index_gives_back_a_long_queue_s_slots(sq):
    """An offline queue of 200,000 messages takes a slot each (8 bytes);
    once it has drained, the next message starts a small window again."""
    for i in range(1, 200_001):
        sq.put_message_add_delivery(i, "a/b", b"x", 1, False, None, None, "c", 1, 0, "queued")
    window, live, spilled, cap = sq.index_sizes
    assert (window, live, spilled) == (200_000, 200_000, 0) and cap < 2 * 200_000
    sq.take_ops()
    for i in range(1, 200_001):
        sq.remove_delivery("c", i)
    assert sq.index_sizes[:3] == (0, 0, 0)
    sq.take_ops()
    sq.put_message_add_delivery(200_001, "a/b", b"x", 1, False, None, None, "c", 1, 0,
                                "queued")
    assert sq.index_sizes == (1, 1, 0, 4096)
    assert list(sq._msgs) == [200_001]
    sq.take_ops()


def _held_by(store, mid, client) -> bool:
    """``client`` has a delivery of ``mid`` by the recorder's state (through
    what update_delivery records: an UPD op only for a delivery it knows)."""
    store.take_ops()
    seq = store._seq
    store.update_delivery_fields(client, mid, 1, 1, "sent")
    known = bool(store.take_ops())
    assert store._seq == seq + 1
    return known


def test_changes_by_fields_are_the_records_ones(tmp_path):
    """put_message_fields, add_delivery_fields, update_delivery_fields and
    put_message_add_delivery (the core's hot path) store exactly what
    put_message with a Publish and add_delivery / update_delivery with a
    record do."""
    snaps = []
    changes = [("add", 1, 1, 0, "queued", False, ()), ("add", 2, 2, 7, "sent", True, (3, 4)),
               ("add", 3, 1, 0, "queued", False, (9,)), ("update", 1, 1, 5, "sent"),
               ("update", 2, 2, 7, "released")]
    for way, d in (("record", "a"), ("fields", "b"), ("fused", "c")):
        s = SqliteStore(str(tmp_path / d))
        s.open(now=NOW)
        s.put_session("c", NEVER, 5, None)
        for i in range(1, 4):
            props = {PropertyId.CONTENT_TYPE: "text/plain"} if i == 2 else None
            if way == "record":
                s.put_message(i, Publish("a/b", b"%d" % i, 1, False, False, 0, props), NOW + 60 * i)
            elif way == "fields":
                s.put_message_fields(i, "a/b", b"%d" % i, 1, False, props, NOW + 60 * i)
            else:  # each message with its first delivery, in one call
                _, _, qos, pid, state, *rest = changes[i - 1]
                s.put_message_add_delivery(i, "a/b", b"%d" % i, 1, False, props, NOW + 60 * i,
                                           "c", qos, pid, state, *rest)
        for op, mid, qos, pid, state, *rest in changes:
            if way == "fused" and op == "add":
                continue  # done above
            if way == "record":
                rec = DeliveryRecord(mid, qos, pid, state, *rest)
                (s.add_delivery if op == "add" else s.update_delivery)("c", rec)
            elif op == "add":
                s.add_delivery_fields("c", mid, qos, pid, state, *rest)
            else:
                s.update_delivery_fields("c", mid, qos, pid, state)
        s.close()
        s = SqliteStore(str(tmp_path / d))
        snap = s.open(now=NOW)
        snaps.append((snap.sessions[0].deliveries,
                      {m: (fields(p), e) for m, (p, e) in snap.messages.items()}))
        s.close()
    assert snaps[0][1] == snaps[1][1] == snaps[2][1] and snaps[0][1][2][0][-1] == {
        PropertyId.CONTENT_TYPE: "text/plain"}
    assert snaps[0][0] == snaps[1][0] == snaps[2][0] == [DeliveryRecord(1, 1, 5, "sent"),
                                    DeliveryRecord(2, 2, 7, "released", True, (3, 4)),
                                    DeliveryRecord(3, 1, 0, "queued", False, (9,))]


def test_released_messages_are_kept_a_while_then_forgotten(sq, caplog):
    """Messages whose last delivery went stay revivable for at least
    _released_kept later releases (at most twice that), then go."""
    sq._released_kept = 4
    sq.put_session("c", NEVER, 5, None)
    for i in range(1, 11):
        sq.put_message(i, pub(payload=b"%d" % i), None)
        sq.add_delivery("c", DeliveryRecord(i, 1))
        sq.remove_delivery("c", i)
    assert len(sq._released) + len(sq._released_old) <= 8
    for i in range(7, 11):  # the last four: still known
        sq.add_delivery("c", DeliveryRecord(i, 1))
    assert "never stored or was released long ago" not in caplog.text
    sq.add_delivery("c", DeliveryRecord(1, 1))  # long gone
    assert "delivery of message 1, which was never stored" in caplog.text
    sq.close()
    s2 = SqliteStore(sq.data_dir)
    snap = s2.open(now=NOW)
    s2.close()
    assert sorted(snap.messages) == [7, 8, 9, 10]
    assert [d.msg_id for d in snap.sessions[0].deliveries] == [7, 8, 9, 10]


def test_flush_task_serves_each_trio_run(tmp_path):
    """The first flush in a trio loop starts a task that does the later ones
    (woken without a system call); it ends with its loop, and the next loop
    starts its own."""
    s = SqliteStore(str(tmp_path))
    s.open(now=NOW)

    async def changes(run):
        for i in range(3):
            s.put_session(f"c{run}-{i}", NEVER, 5, None)
            with trio.fail_after(10):
                await s.durable(s.mark())
        assert s._flush_task is not None  # the later changes went through it

    trio.run(changes, 1)
    assert s._flush_task is None and not s._flush_parked
    trio.run(changes, 2)
    s.close()
    s2 = SqliteStore(str(tmp_path))
    snap = s2.open(now=NOW)
    s2.close()
    assert sorted(x.client_id for x in snap.sessions) == [
        f"c{r}-{i}" for r in (1, 2) for i in range(3)]


def test_message_stored_again_keeps_its_delivery_count(sq):
    """put_message of an id already stored replaces the message but keeps
    the count of deliveries referring to it: the row goes with the last one,
    not before."""
    sq.put_session("c", NEVER, 5, None)
    sq.put_session("d", NEVER, 5, None)
    sq.put_message(1, pub(payload=b"old"), None)
    sq.add_delivery("c", DeliveryRecord(1, 1))
    sq.add_delivery("d", DeliveryRecord(1, 1))
    sq.put_message(1, pub(payload=b"new"), None)
    sq.remove_delivery("c", 1)
    wait_committed(sq)
    assert rows(sq, "messages") == 1  # d still has it
    sq.remove_delivery("d", 1)
    wait_committed(sq)
    assert rows(sq, "messages") == 0 and rows(sq, "deliveries") == 0


def test_stored_message_shares_the_payload_not_a_copy(sq):
    """The recorder keeps a stored message as its fields (the payload object
    the broker holds), not as a second, encoded copy; a re-delivery after
    its release encodes it again."""
    payload = b"p" * 10_000
    sq.put_session("c", NEVER, 5, None)
    before = sys.getrefcount(payload)
    sq.put_message_fields(1, "a/b", payload, 1, False, {PropertyId.CONTENT_TYPE: "x"}, None)
    sq.add_delivery_fields("c", 1, 1, 0, "queued")
    assert sys.getrefcount(payload) == before + 1  # the recorder holds this very object
    sq.remove_delivery("c", 1)  # released: kept for a while, still by reference
    assert sys.getrefcount(payload) == before + 1
    sq.add_delivery_fields("c", 1, 1, 0, "queued")  # stored again from it
    sq.close()
    s2 = SqliteStore(sq.data_dir)
    snap = s2.open(now=NOW)
    s2.close()
    assert snap.messages[1][0].payload == payload
    assert snap.messages[1][0].properties == {PropertyId.CONTENT_TYPE: "x"}


# ------------------------------------------------ the writer thread's CRC-32

@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=1000, max_size=5000)),
       st.integers(0, 0xFFFFFFFF))
def test_writer_crc32_is_zlibs(data, start):
    """Both ways: carry-less multiplication (64 bytes and more, where the CPU
    has it) and the tables."""
    import zlib

    from fastmqtt._wal import crc32

    assert crc32(data, start) == zlib.crc32(data, start)
    assert crc32(data, start, tables=True) == zlib.crc32(data, start)


def test_writer_crc32_across_the_folding_boundaries():
    import zlib

    from fastmqtt._wal import CRC_CLMUL, crc32

    data = bytes(range(256)) * 8
    for n in [*range(0, 200), 255, 256, 257, 1023, 1024, 1025, 2048]:
        for start in (0, 1, 0xFFFFFFFF, 0x12345678):
            assert crc32(data[:n], start) == zlib.crc32(data[:n], start), (n, start)
            assert crc32(data[3:3 + n], start) == zlib.crc32(data[3:3 + n], start)  # unaligned
    import platform
    if platform.machine() in ("x86_64", "AMD64"):
        with open("/proc/cpuinfo") as f:
            assert CRC_CLMUL == (" pclmulqdq" in f.read())  # the fast way is used where it can be


def _frame(lsn, body=b"\x02\x00\x00\x00\x00"):
    """One log record of ``body`` (by default ops alone: an empty pickled
    part) framed as the writer frames it: its CRC-32, then the frame header."""
    import zlib

    rec = zlib.crc32(body).to_bytes(4, "little") + body
    return sqlite_mod._FRAME.pack(len(rec), lsn) + rec


def test_append_record_writes_the_framed_record(tmp_path):
    """The store hands a record's parts to the writer, which computes the
    CRC-32 off the trio thread: the file holds exactly what framing the
    CRC-32 and the parts by hand gives, across a segment switch too."""
    import threading

    from fastmqtt._wal import LogWriter

    first, second = tmp_path / "a.log", tmp_path / "b.log"
    fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    wal = LogWriter(fd, -1, True)
    t = threading.Thread(target=wal.run)
    t.start()
    expected = []
    parts = [(b"\x02\x00\x00\x00\x00", b"", b"ops" * 1000),
             (b"\x02\x03\x00\x00\x00", b"abc", b""),
             (b"\x02\x00\x00\x00\x00", b"", bytes(range(256)) * 3)]
    wal.pause(True)  # all three in one buffer, the switch between the first two
    for lsn, (head, cold, ops) in enumerate(parts, 1):
        wal.append_record(lsn, head, cold, ops, lsn)
        expected.append(_frame(lsn, head + cold + ops))
        if lsn == 1:
            assert wal.rotate(os.fsencode(second))
    wal.pause(False)
    wal.stop()
    t.join(10)
    assert wal.written == 3 and wal.error == 0
    assert first.read_bytes() == expected[0]
    assert second.read_bytes() == expected[1] + expected[2]
    # and the readers take them back
    got = list(sqlite_mod._read_segments([(1, str(first)), (2, str(second))]))
    assert [(lsn, bytes(rec)) for lsn, rec, _ in got] == [
        (i, e[sqlite_mod._FRAME.size:]) for i, e in enumerate(expected, 1)]


def _await_writer(wal, done, timeout=10.0):
    """Wait (on the writer's eventfd, which it signals after each step) until
    ``done()``."""
    import select

    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, "the log writer did not get there"
        if select.select([wal.notify_fd], [], [], left)[0]:
            try:
                os.eventfd_read(wal.notify_fd)
            except BlockingIOError:
                pass


def test_write_record_writes_on_the_callers_thread_only_when_the_writer_is_idle(tmp_path):
    """batch: write_record puts the framed record in the file before it
    returns (``written`` moves at once: nothing is left for a kill -9 to
    lose); with the writer busy (paused here), a switch pending, or in sync
    mode it queues the record for the writer instead, which frames it the
    same way. Records reach the file in append order either way."""
    import threading

    from fastmqtt._wal import LogWriter

    def framed(lsn, head, cold, ops):
        return _frame(lsn, head + cold + ops)

    path = tmp_path / "a.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    wal = LogWriter(fd, -1, False, 60.0)  # batch; no periodic fsync in the test
    t = threading.Thread(target=wal.run)
    t.start()
    try:
        parts = [(b"\x02\x00\x00\x00\x00", b"cold", b"ops" * 500), (b"h", b"", b""),
                 (b"h2", b"c2", b"o2"), (b"h3", b"", b"o3")]
        assert wal.write_record(1, *parts[0], 1) is True
        assert wal.written == 1 and wal.direct_writes == 1
        assert path.read_bytes() == framed(1, *parts[0])  # in the file already
        wal.pause(True)
        # A paused (busy) writer: queued behind it, in order.
        assert wal.write_record(2, *parts[1], 2) is False
        assert wal.written == 1
        # Something pending before it: never overtaken.
        assert wal.write_record(3, *parts[2], 3) is False
        assert wal.advance(4) is False
        wal.pause(False)
        _await_writer(wal, lambda: wal.written == 4)
        assert wal.written == 4 and wal.direct_writes == 1
        assert wal.advance(5) is True and wal.written == 5  # idle again: at once
        assert wal.write_record(6, *parts[3], 6) is True
        assert wal.direct_writes == 2
    finally:
        wal.stop()
        t.join(10)
    assert wal.error == 0 and wal.synced == 6  # stop() fsyncs the direct writes too
    assert path.read_bytes() == (framed(1, *parts[0]) + framed(2, *parts[1])
                                 + framed(3, *parts[2]) + framed(6, *parts[3]))


def test_write_record_is_refused_in_sync_mode(tmp_path):
    import threading

    from fastmqtt._wal import LogWriter

    fd = os.open(tmp_path / "a.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    wal = LogWriter(fd, -1, True)
    t = threading.Thread(target=wal.run)
    t.start()
    try:
        assert wal.write_record(1, b"h", b"", b"", 1) is False  # queued: the writer fsyncs it
        _await_writer(wal, lambda: wal.synced == 1)
        assert wal.synced == 1 and wal.direct_writes == 0
    finally:
        wal.stop()
        t.join(10)


def test_write_record_leaves_a_failing_write_to_the_writer(tmp_path):
    """A write that fails on the caller's thread is not retried there (the
    retries pause): the writer gets the record and retries it."""
    import threading

    from fastmqtt._wal import LogWriter

    fd = os.open(tmp_path / "a.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    wal = LogWriter(fd, -1, False, 60.0)
    wal.retry_scale = 0
    wal.inject_failure(errno.EIO, writes=2)
    t = threading.Thread(target=wal.run)
    t.start()
    try:
        assert wal.write_record(1, b"h", b"c", b"o", 1) is False
        _await_writer(wal, lambda: wal.written == 1)
        assert wal.written == 1 and wal.retries == 2 and wal.error == 0
    finally:
        wal.stop()
        t.join(10)


async def test_batch_store_commits_in_the_flush_without_the_writer_thread(tmp_path):
    """batch, on the trio thread: the flush writes the record itself and
    commits its ticket there; durable() returns with no round trip through
    the writer thread (its write count does not move); the record is in the
    log file at that point, and a restart recovers the change."""
    s = SqliteStore(str(tmp_path), durability="batch", batch_interval_ms=60_000)
    s.open(now=NOW)
    wal = s._wal
    try:
        s.put_session("c", NEVER, 5, None)
        s.put_message(1, pub(), None)
        s.add_delivery("c", DeliveryRecord(1, 1))
        ticket = s.mark()
        woken = []
        assert s.when_durable(ticket, lambda: woken.append(s.committed))
        assert not woken
        with trio.fail_after(10):
            await s.durable(ticket)
        assert woken == [ticket]  # called by the flush itself
        assert wal.direct_writes >= 1 and wal.writes == 0
        assert wal.synced < ticket  # written, not yet fsynced (60 s period)
        segs = sqlite_mod._list_segments(str(tmp_path))
        assert [lsn for lsn, _, _ in sqlite_mod._read_segments(segs)] == [1]  # in the log
    finally:
        await s.aclose()
    s2 = SqliteStore(str(tmp_path))
    snap = s2.open(now=NOW)
    s2.close()
    assert [r.client_id for r in snap.sessions] == ["c"] and 1 in snap.messages


def test_store_records_carry_their_crc(tmp_path):
    """Every record the store writes through append_record carries the
    CRC-32 of the rest, as the readers check it."""
    s = SqliteStore(str(tmp_path), durability="sync")
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    s.put_message(1, pub(), None)
    s.add_delivery("c", DeliveryRecord(1, 1))
    assert s.wait_durable()
    try:
        segs = sqlite_mod._list_segments(str(tmp_path))
        recs = [bytes(r) for _, r, _ in sqlite_mod._read_segments(segs)]
    finally:
        s.close()
    assert recs
    for rec in recs:
        import zlib
        assert int.from_bytes(rec[:4], "little") == zlib.crc32(rec[4:])


def test_compactor_is_woken_by_the_first_record_only(tmp_path, monkeypatch):
    """The compactor thread waits with no end only while it has nothing to
    fold: the first record wakes it; records that follow while it waits for
    its due time are queued without a wake-up (each would take the GIL from
    the event loop) and are folded in when it is due."""
    import time

    def in_tables(table):  # without asking for a compaction
        with sqlite3.connect(s.path) as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def until(cond):
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    monkeypatch.setattr(sqlite_mod, "COMPACT_PERIOD", 0.05)
    s = SqliteStore(str(tmp_path), compactor="thread")
    s.open(now=NOW)
    try:
        s.put_session("c", NEVER, 5, None)
        assert s.wait_durable()
        # Folded in when due; then nothing to fold: waiting with no end.
        until(lambda: in_tables("sessions") == 1 and s._compact_idle)
        monkeypatch.setattr(sqlite_mod, "COMPACT_PERIOD", 2.0)  # longer than the records take
        wakes = []
        real_notify = s._compact_cv.notify
        monkeypatch.setattr(s._compact_cv, "notify",
                            lambda *a: (wakes.append(1), real_notify(*a)))
        for i in range(1, 21):  # twenty records, one flush each
            s.put_message(i, pub(payload=b"%d" % i), None)
            s.add_delivery("c", DeliveryRecord(i, 1))
            assert s.wait_durable()
            # Paced, not synchronised: time for a compactor that had been
            # woken to take the queue, so the next record would wake it again.
            time.sleep(0.02)
        assert len(wakes) == 1  # the first record: the compactor was idle
        until(lambda: in_tables("deliveries") == 20)  # due: all twenty folded in
        assert in_tables("messages") == 20 and len(wakes) == 1
    finally:
        s.close()


def test_recorder_lock_excludes_and_waits_without_the_gil():
    """The store's lock (a pthread mutex in _record): a thread that finds it
    taken waits with the GIL released, so the holder can finish (a wait that
    kept the GIL would hang here), and only then gets in."""
    import threading
    import time

    from fastmqtt._record import Lock

    lock = Lock()
    order = []
    inside = threading.Event()

    def holder():
        with lock:
            inside.set()
            time.sleep(0.05)  # Python work needing the GIL while the main thread waits
            order.append("holder out")

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(5)
    with lock:
        order.append("main in")
    t.join(5)
    assert order == ["holder out", "main in"]


# ------------------------------------------------ rows written by a fold

_KINDS = (sqlite_mod._ADD, sqlite_mod._ADDR, sqlite_mod._UPD, sqlite_mod._DEL)


def _delivery_change(draw, seq):
    kind = draw(st.sampled_from(_KINDS))
    if kind == sqlite_mod._DEL:
        return [kind]
    # Few distinct values, so that a client's adds mostly share them (the
    # grouped path) and sometimes do not (the per-row path).
    qos = draw(st.sampled_from([1, 1, 1, 2]))
    pid = draw(st.sampled_from([0, 0, 0, 7, 8]))
    state = draw(st.sampled_from(["queued", "queued", "sent", "released"]))
    if kind == sqlite_mod._UPD:
        return [kind, 0, qos, pid, state]
    extra = draw(st.sampled_from([None, None, None, "r", "1,2"]))
    return [kind, seq, qos, pid, state, extra]


@st.composite
def _fold_batches(draw):
    """Rows already in the tables, and a batch of changes to fold over them."""
    clients = draw(st.lists(st.sampled_from(["a", "b", "c", "ü"]), min_size=1, max_size=3,
                            unique=True))
    before = {}  # (client, msg_id) -> row already in the tables
    b = sqlite_mod._Batch()
    seq = 0
    for cid in clients:
        n = draw(st.integers(0, 2 * sqlite_mod._SHARED_MIN + 5))
        mids = draw(st.lists(st.integers(1, 80), min_size=n, max_size=n, unique=True))
        changes = {}
        for mid in mids:
            seq += 1
            e = changes[mid] = _delivery_change(draw, seq)
            if e[0] == sqlite_mod._UPD or draw(st.booleans()):
                # (an update names a row in the tables)
                before[(cid, mid)] = (cid, mid, seq + 1000, 1, 3, "sent", None)
        b.deliv[cid] = changes
    for mid in draw(st.lists(st.integers(1, 80), max_size=40, unique=True)):
        exp = draw(st.sampled_from([None, None, 1.5e9]))
        b.messages[mid] = (bytearray(encode_publish(Publish(f"s/{mid}", b"q%d" % mid, 1, False))),
                           exp)
    return before, b


def _reference_fold(db, b):
    """What a fold must leave: the changes applied one row at a time."""
    for cid, d in b.deliv.items():
        for mid, e in d.items():
            if e[0] == sqlite_mod._DEL:
                db.execute("DELETE FROM deliveries WHERE client_id=? AND msg_id=?", (cid, mid))
            elif e[0] == sqlite_mod._UPD:
                db.execute("UPDATE deliveries SET qos=?, packet_id=?, state=? "
                           "WHERE client_id=? AND msg_id=?", (e[2], e[3], e[4], cid, mid))
            else:
                db.execute("INSERT OR REPLACE INTO deliveries VALUES (?,?,?,?,?,?,?)",
                           (cid, mid, *e[1:6]))
    for mid, (data, exp) in b.messages.items():
        db.execute("INSERT OR REPLACE INTO messages VALUES (?,?,?)", (mid, bytes(data), exp))


@given(_fold_batches())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_fold_writes_the_rows_one_row_at_a_time_would(case):
    """The compactor's bulk statements (a client's adds that share qos,
    packet id and state bound once for the group, the rest row by row)
    leave the tables as applying each change on its own does."""
    before, b = case
    out = []
    for apply in (sqlite_mod._apply_tables, _reference_fold):
        db = sqlite3.connect(":memory:")
        db.executescript(sqlite_mod._SCHEMA)
        db.executemany("INSERT INTO deliveries VALUES (?,?,?,?,?,?,?)", before.values())
        apply(db, b)
        out.append((sorted(db.execute("SELECT * FROM deliveries"), key=repr),
                    sorted((m, bytes(p), e) for m, p, e in db.execute("SELECT * FROM messages"))))
        db.close()
    assert out[0] == out[1]


def test_an_offline_queue_is_written_as_one_group_per_client():
    b = sqlite_mod._Batch()
    n = sqlite_mod._SHARED_MIN
    b.deliv["q"] = {mid: [sqlite_mod._ADD, mid * 2, 1, 0, "queued", None] for mid in range(n)}
    b.deliv["q"][99] = [sqlite_mod._ADD, 500, 2, 9, "sent", None]  # not like the others
    b.deliv["few"] = {mid: [sqlite_mod._ADD, mid, 1, 0, "queued", None] for mid in range(n - 1)}
    flat, shared = [], []
    for cid, d in b.deliv.items():
        assert sqlite_mod._delivery_rows(cid, d, flat, shared, n) == 0
    assert shared == [("q", 1, 0, "queued", [x for mid in range(n) for x in (mid, mid * 2)])]
    assert flat[:6] == ["q", 99, 500, 2, 9, "sent"] and len(flat) == 6 * n


def _records_of(steps, cuts):
    """The log records a store writes for ``steps`` (as in _LITE_STEPS),
    a record ending after each step in ``cuts``."""
    import zlib

    recs = []
    with tempfile.TemporaryDirectory() as d:
        s = SqliteStore(d)
        put = set()

        def record():
            b, s._batch = s._batch, sqlite_mod._Batch()
            head, cold = sqlite_mod._encode_parts(b, s._blob)
            body = head + cold + s.take_ops()
            recs.append(zlib.crc32(body).to_bytes(4, "little") + body)

        for i, (what, mid, client) in enumerate(steps):
            _lite_step(s, what, mid, client, _SRCS[mid], put)
            if what == "put_add":
                put.add(mid)
            if i in cuts:
                record()
        record()
    return recs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_LITE_STEPS, cuts=st.sets(st.integers(0, 40)))
# stored, released and stored again, a record each: the row must stay
@example(steps=[("put_add", 1, "a"), ("remove", 1, "a"), ("put_add", 1, "b")], cuts={0, 1})
# stored again by the client that has it, then released, in the next record
@example(steps=[("put_add", 1, "a"), ("put_add", 1, "a"), ("remove", 1, "a")], cuts={0})
# acknowledged in one record, given again and updated in the next ones
@example(steps=[("put_add", 2, "a"), ("add", 2, "b"), ("remove", 2, "a"), ("add", 2, "a"),
                ("update", 2, "a"), ("drop", 2, "b")], cuts={1, 2, 4})
def test_records_decoded_into_one_batch_fold_as_merged_batches_do(steps, cuts):
    """A fold decodes records of ops alone straight into its batch
    (_decode_into) rather than each into a batch of its own that it then
    merges (_merge): the tables end up the same, whatever the records hold
    (stored again, re-added, updated, acknowledged, sessions deleted, in
    one record or across several)."""
    recs = _records_of(steps, cuts)
    direct, merged = sqlite_mod._Batch(), sqlite_mod._Batch()
    for rec in recs:
        sqlite_mod._decode_into(direct, rec)
        sqlite_mod._merge(merged, sqlite_mod._decode_record(rec))
    out = []
    for b in (direct, merged):
        db = sqlite3.connect(":memory:")
        db.executescript(sqlite_mod._SCHEMA)
        sqlite_mod._apply_tables(db, b)
        out.append([sorted(db.execute(f"SELECT * FROM {t}"), key=repr)
                    for t in ("sessions", "messages", "deliveries")])
        db.close()
    assert out[0] == out[1]


# ------------------------------------------------ recycled log segments

def _segment_file(data_dir, first, content):
    path = os.path.join(data_dir, SEGMENT_PREFIX + f"{first:016x}")
    with open(path, "wb") as f:
        f.write(content)
    return path


def _read(data_dir):
    return [lsn for lsn, _, _ in
            sqlite_mod._read_segments(sqlite_mod._list_segments(data_dir))]


def test_recycled_segment_ends_where_its_own_records_end(tmp_path, caplog):
    """A segment written over a folded one keeps what that one held after
    its own records (until it is left): older records, usually not even
    aligned with its own. Recovery reads its records and stops there,
    quietly: nothing is damaged or torn."""
    d = str(tmp_path)
    old = b"".join(_frame(lsn, b"\x02\x00\x00\x00\x00" + bytes(40)) for lsn in range(1, 9))
    new = b"".join(_frame(lsn) for lsn in (20, 21, 22))
    _segment_file(d, 20, new + old[len(new):])  # misaligned: mid-frame of an old record
    assert _read(d) == [20, 21, 22]
    _segment_file(d, 20, new + old)  # aligned: an intact old frame follows
    assert _read(d) == [20, 21, 22]
    assert "cut short" not in caplog.text


def test_torn_append_over_a_recycled_segment_is_ignored(tmp_path, caplog):
    d = str(tmp_path)
    old = b"".join(_frame(lsn, bytes(60)) for lsn in range(1, 9))
    torn = _frame(22, b"\x02\x00\x00\x00\x00" + bytes(30))[:20]  # header and a bit
    content = _frame(20) + _frame(21) + torn
    _segment_file(d, 20, content + old[len(content):])
    assert _read(d) == [20, 21]
    assert "record 22 cut short" in caplog.text


@pytest.mark.parametrize("damage", ["checksum", "length", "lsn"])
def test_damaged_record_with_records_after_it_ends_the_last_segment(tmp_path, caplog,
                                                                    damage):
    """Recovery stops at the first frame that is not one of the last
    segment's records, also when intact records of the log follow it (a
    power failure during a write over a reused segment): an error names
    them, and the segment is copied aside."""
    d = str(tmp_path)
    bad = bytearray(_frame(21, b"\x02\x00\x00\x00\x00" + bytes(30)))
    if damage == "checksum":
        bad[30] ^= 0x40
    elif damage == "length":
        bad[0] ^= 0x08
    else:  # an lsn older than the segment, as a recycled file's leftovers have
        bad[4:12] = struct.pack("<Q", 3)
    _segment_file(d, 20, _frame(20) + bytes(bad) + _frame(22) + bytes(100))
    assert _read(d) == [20]
    assert "record 22 follows it" in caplog.text
    assert [n for n in os.listdir(d) if ".damaged-" in n]


def test_only_the_last_segment_may_end_before_its_file(tmp_path):
    d = str(tmp_path)
    _segment_file(d, 20, _frame(20) + _frame(21) + _frame(3))  # not cut at its end
    _segment_file(d, 22, _frame(22))
    with pytest.raises(sqlite_mod._Unusable, match="cut short or damaged"):
        _read(d)


def test_compactor_reader_follows_the_log_when_its_segment_is_recycled(tmp_path):
    """The compactor's reader keeps the segment it read last open between
    folds. Once that segment is folded and kept for reuse (renamed, then
    written over as a later segment), the reader must go on in the next
    segment, not read on in its old file."""
    d = str(tmp_path)
    a = _segment_file(d, 1, b"".join(_frame(lsn) for lsn in (1, 2, 3)))
    _segment_file(d, 4, b"".join(_frame(lsn) for lsn in (4, 5)))
    reader = sqlite_mod._LogReader(d, 0)
    try:
        assert [lsn for lsn, _ in reader.read(3)] == [1, 2, 3]  # open on a, at its end
        spare = os.path.join(d, sqlite_mod.SPARE_PREFIX + "1")
        os.rename(a, spare)
        later = os.path.join(d, SEGMENT_PREFIX + f"{6:016x}")
        os.rename(spare, later)
        with open(later, "r+b") as f:  # written over from its start, and longer
            f.write(b"".join(_frame(lsn, bytes(50)) for lsn in range(6, 12)))
        assert [lsn for lsn, _ in reader.read(5)] == [4, 5]
    finally:
        reader.close()


def test_folded_segments_are_reused_and_a_crash_loses_nothing(tmp_path, monkeypatch, caplog):
    """Folded segments are kept (at most SPARE_SEGMENTS) and written over as
    later ones; after a crash, with the newest segment holding what it held
    before behind its own records, every record comes back."""
    monkeypatch.setattr(sqlite_mod, "SEGMENT_BYTES", 2048)
    data = str(tmp_path / "d")
    s = SqliteStore(data)
    s.open(now=NOW)
    s.put_session("c", NEVER, 5, None)
    mid = 0
    with caplog.at_level(logging.WARNING, "fastmqtt.store"):
        while s._wal.recycled_segments < 3:
            for _ in range(20):
                mid += 1
                s.put_message(mid, pub(payload=b"m%d" % mid + b"x" * 100), None)
                s.add_delivery("c", DeliveryRecord(mid, 1))
                wait_committed(s)  # a record each: a segment every dozen or so
            assert s.compact()
            spares = [n for n in os.listdir(data) if n.startswith(sqlite_mod.SPARE_PREFIX)]
            assert len(spares) <= sqlite_mod.SPARE_SEGMENTS
            assert mid < 2000
        # The newest segment is a reused one, with fewer records of its own
        # than it held before: a crash now leaves older records behind them.
        mid += 1
        s.put_message(mid, pub(payload=b"last"), None)
        s.add_delivery("c", DeliveryRecord(mid, 1))
        wait_committed(s)
        newest = segments(data)[-1]
        own = [12 + len(rec) for _, rec, _ in
               sqlite_mod._read_segments([(int(newest[-16:], 16), newest)])]
        assert own and os.path.getsize(newest) > sum(own)
        close_without_compacting(s)
        s = SqliteStore(data)
        snap = s.open(now=NOW)
        s.close()
    assert [d.msg_id for d in by_client(snap)["c"].deliveries] == list(range(1, mid + 1))
    assert "cut short" not in caplog.text and "unusable" not in caplog.text
    assert not [n for n in os.listdir(data) if n.startswith(sqlite_mod.SPARE_PREFIX)]


def test_a_message_stored_again_then_released_leaves_no_row_in_a_later_fold():
    """A message stored again while it is stored (its row may be in the
    tables already) and then released: the fold that sees the release
    removes the row an earlier fold wrote, rather than taking the new put
    and its MSGDEL as cancelling out and leaving the old row behind."""
    recs = _records_of([("put_add", 1, "a"), ("put_add", 1, "a"), ("remove", 1, "a")], {0})
    assert len(recs) == 2
    db = sqlite3.connect(":memory:")
    db.executescript(sqlite_mod._SCHEMA)
    counts = []
    for rec in recs:  # a fold each
        b = sqlite_mod._Batch()
        sqlite_mod._decode_into(b, rec)
        sqlite_mod._apply_tables(db, b)
        counts.append([db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                       for t in ("messages", "deliveries")])
    db.close()
    assert counts == [[1, 1], [0, 0]]
