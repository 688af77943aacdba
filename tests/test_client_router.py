"""Router dispatch (overlapping wildcards, shared filters, $ topics), bounded
streams with their overflow policies, handler routes, and the outboxes."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings, strategies as st

from fastmqtt import codec, trie
from fastmqtt.client import Message, MemoryOutbox, OutboxFull, SQLiteOutbox
from fastmqtt.client.router import Router
from fastmqtt.enums import PropertyId as P
from fastmqtt.errors import MalformedPacket
from fastmqtt.topics import topic_matches


def msg(topic, payload=b"", qos=0):
    return Message(topic, payload, qos)


def test_router_uses_compiled_trie():
    # The router is built on fastmqtt.trie; a normal install has it compiled.
    assert trie.COMPILED


async def test_overlapping_wildcards_each_route_gets_one_copy():
    r = Router()
    streams = {f: r.stream(f) for f in ["a/b/c", "a/+/c", "a/#", "#", "+/+/+", "a/b"]}
    assert r.dispatch(msg("a/b/c")) == 5
    got = {f: len(s) for f, s in streams.items()}
    assert got == {"a/b/c": 1, "a/+/c": 1, "a/#": 1, "#": 1, "+/+/+": 1, "a/b": 0}


async def test_same_filter_twice_gives_two_routes():
    r = Router()
    s1, s2 = r.stream("x/#"), r.stream("x/#")
    r.dispatch(msg("x/1"))
    assert len(s1) == len(s2) == 1


async def test_shared_subscription_routes_by_inner_filter():
    r = Router()
    s = r.stream("$share/g1/sensors/+")
    r.dispatch(msg("sensors/7"))
    assert (await s.receive()).topic == "sensors/7"


async def test_dollar_topics_not_matched_by_leading_wildcard_MQTT_4_7_2_1():
    r = Router()
    hash_, sys_, every = r.stream("#"), r.stream("$SYS/#"), r.stream(None)
    r.dispatch(msg("$SYS/broker/uptime"))
    assert len(hash_) == 0 and len(sys_) == 1 and len(every) == 1


async def test_invalid_filter_rejected():
    r = Router()
    with pytest.raises(MalformedPacket):
        r.stream("a/#/b")


async def test_stream_overflow_drop_oldest_and_newest():
    r = Router()
    old = r.stream("t", buffer=2, overflow="drop_oldest")
    new = r.stream("t", buffer=2, overflow="drop_newest")
    for i in range(5):
        r.dispatch(msg("t", bytes([i])))
    assert [m.payload for m in old._buf.items] == [b"\x03", b"\x04"] and old.dropped == 3
    assert [m.payload for m in new._buf.items] == [b"\x00", b"\x01"] and new.dropped == 3


async def test_closed_stream_stops_buffering_and_ends_iteration():
    r = Router()
    s = r.stream("t")
    r.dispatch(msg("t"))
    s.close()
    assert r.dispatch(msg("t")) == 0
    got = [m async for m in s]
    assert len(got) == 1  # what was buffered is still handed out, then it ends


async def test_dropped_stream_is_unregistered():
    import gc

    r = Router()
    r.stream("t")  # not kept
    gc.collect()
    assert len(r) == 0


async def test_handler_route_runs_in_its_own_task_in_order(nursery):
    from fastmqtt.client.router import HandlerRoute

    r = Router()
    seen = []
    done = trio.Event()
    release = trio.Event()

    async def slow(m):
        await release.wait()
        seen.append(m.payload)
        if len(seen) == 3:
            done.set()

    errors = []
    route = HandlerRoute(r, "t/#", slow, 10, "drop_oldest", lambda e, m: errors.append(e))
    nursery.start_soon(route.run)
    for i in range(3):
        r.dispatch(msg("t/x", bytes([i])))  # never blocks on the slow handler
    release.set()
    with trio.fail_after(5):
        await done.wait()
    assert seen == [b"\x00", b"\x01", b"\x02"]
    route.remove()


async def test_handler_exception_does_not_stop_route(nursery):
    from fastmqtt.client.router import HandlerRoute

    r = Router()
    errors, ok = [], []
    done = trio.Event()

    def handler(m):
        if m.payload == b"bad":
            raise RuntimeError("boom")
        ok.append(m.payload)
        done.set()

    route = HandlerRoute(r, "t", handler, 10, "drop_oldest", lambda e, m: errors.append(e))
    nursery.start_soon(route.run)
    r.dispatch(msg("t", b"bad"))
    r.dispatch(msg("t", b"good"))
    with trio.fail_after(5):
        await done.wait()
    assert ok == [b"good"] and isinstance(errors[0], RuntimeError)
    route.remove()


LEVELS = st.sampled_from(["a", "b", "c", ""])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join).filter(bool)
FILTER_LEVELS = st.sampled_from(["a", "b", "+", ""])


@st.composite
def filters(draw):
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=80, deadline=None)
@given(fs=st.lists(filters().filter(bool), min_size=1, max_size=8), topic=TOPICS)
def test_router_agrees_with_naive_matcher(fs, topic):
    r = Router()
    streams = [(f, r.stream(f)) for f in fs]
    r.dispatch(msg(topic))
    for f, s in streams:
        assert len(s) == (1 if topic_matches(f, topic) else 0), (f, topic)


def test_message_conveniences():
    m = Message("t", b'{"a":1}', 1, False, {P.USER_PROPERTY: (("k", "v"),),
                                            P.CORRELATION_DATA: b"c", P.RESPONSE_TOPIC: "r"})
    assert m.json() == {"a": 1} and m.text == '{"a":1}'
    assert m.user_properties == (("k", "v"),) and m.correlation_data == b"c"
    assert m.response_topic == "r"


# ----------------------------------------------------------------- outboxes

def pub(topic="t", payload=b"x", qos=1, props=None):
    return codec.Publish(topic, payload, qos, False, False, 0, props)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_outbox_states_and_bound(kind, tmp_path):
    ob = MemoryOutbox(3) if kind == "memory" else SQLiteOutbox(tmp_path / "o.db", 3)
    e1, e2, e3 = ob.put(pub(payload=b"1")), ob.put(pub(payload=b"2")), ob.put(pub(payload=b"3"))
    with pytest.raises(OutboxFull):
        ob.put(pub())
    assert ob.peek_queued() is e1 and ob.queued == 3
    ob.mark_sent(e1, 10)
    assert ob.peek_queued() is e2 and e1.state == "publish" and e1.packet_id == 10
    ob.mark_released(e1)
    ob.remove(e2)
    assert [e.seq for e in ob.entries()] == [e1.seq, e3.seq]
    ob.close()


def test_sqlite_outbox_survives_reopen(tmp_path):
    path = tmp_path / "o.db"
    ob = SQLiteOutbox(path)
    props = {P.USER_PROPERTY: (("k", "v"),), P.MESSAGE_EXPIRY_INTERVAL: 60}
    a = ob.put(pub("a", b"A", 1, props))
    b = ob.put(pub("b", b"B", 2))
    c = ob.put(pub("c", b"C", 1))
    ob.mark_sent(a, 7)
    ob.mark_sent(b, 8)
    ob.mark_released(b)
    ob.close()
    ob2 = SQLiteOutbox(path)
    got = [(e.publish.topic, e.publish.payload, e.publish.qos, e.state, e.packet_id)
           for e in ob2.entries()]
    assert got == [("a", b"A", 1, "publish", 7), ("b", b"B", 2, "pubrel", 8), ("c", b"C", 1, "queued", 0)]
    assert dict(ob2.entries()[0].publish.properties) == props
    assert ob2.peek_queued().seq == c.seq
    d = ob2.put(pub("d"))
    assert d.seq > c.seq
    ob2.close()
