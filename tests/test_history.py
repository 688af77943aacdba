"""Chat history: recording rules, limits, cursors, expiry, persistence and the
``$history/`` request/response format."""

from __future__ import annotations

import base64
import json

import pytest

from fastmqtt.codec import Publish
from fastmqtt.enums import PropertyId as P
from fastmqtt.store import HistoryService, MemoryStore, SqliteStore, open_history
from fastmqtt.store.history import HISTORY_PREFIX, MAX_LIMIT, is_history_request

T0 = 1_800_000_000.0
FILTERS = ["chat/+/channel/+", "chat/+/dm/+"]
CH = "chat/acme/channel/42"


def msg(payload, topic=CH, qos=1, retain=False, props=None):
    if isinstance(payload, str):
        payload = payload.encode()
    return Publish(topic, payload, qos, retain, False, 1 if qos else 0, props)


def fill(h, n, topic=CH, start=T0, step=1.0):
    for i in range(n):
        assert h.record(msg(f"m{i}", topic), start + i * step)


def payloads(entries):
    return [e[3].payload.decode() for e in entries]


def request(topic=CH, body=None, response_topic="resp/me", correlation=b"c-1", qos=1):
    props = {}
    if response_topic is not None:
        props[P.RESPONSE_TOPIC] = response_topic
    if correlation is not None:
        props[P.CORRELATION_DATA] = correlation
    payload = b"" if body is None else json.dumps(body).encode()
    return Publish(HISTORY_PREFIX + topic, payload, qos, False, False, 1 if qos else 0,
                   props or None)


def answer(h, req, now=T0 + 10_000, client="alice"):
    out = h.handle_request(req, client, now)
    assert len(out) == 1
    return out[0], json.loads(out[0].payload)


# ------------------------------------------------------------------- recording

def test_records_only_matching_topics():
    h = HistoryService(FILTERS)
    assert h.record(msg("a"), T0)
    assert h.record(msg("b", "chat/acme/dm/7"), T0)
    assert not h.record(msg("c", "chat/acme/user/1"), T0)
    assert not h.record(msg("d", "chat/acme/channel/42/extra"), T0)
    assert payloads(h.query(CH)[0]) == ["a"]
    assert payloads(h.query("chat/acme/dm/7")[0]) == ["b"]
    assert h.query("chat/acme/user/1") == ([], None)


def test_qos0_typing_indicators_are_not_recorded_by_default():
    h = HistoryService(FILTERS)
    assert not h.record(msg("typing", qos=0), T0)
    assert h.query(CH) == ([], None)
    h0 = HistoryService(FILTERS, record_qos0=True)
    assert h0.record(msg("typing", qos=0), T0)


def test_retained_delete_and_dollar_topics_are_not_recorded():
    h = HistoryService(["#", "$app/#"])
    assert not h.record(msg("", retain=True), T0)  # deletes a retained message
    # A filter starting with a wildcard does not match '$' topics [MQTT-4.7.2-1].
    assert not h.record(msg("x", "$SYS/broker/load"), T0)
    assert h.record(msg("x", "$app/a"), T0)
    assert not h.record(msg("x", "$history/chat"), T0)


def test_no_filters_records_nothing():
    h = HistoryService([])
    assert not h.enabled() and not h.record(msg("a"), T0)
    assert open_history(type("C", (), {"history": []})()) is None


def test_max_messages_per_topic():
    h = HistoryService(FILTERS, max_messages=5)
    fill(h, 12)
    fill(h, 2, topic="chat/acme/channel/other")
    assert payloads(h.query(CH, limit=100)[0]) == [f"m{i}" for i in range(7, 12)]
    assert len(h.query("chat/acme/channel/other")[0]) == 2


def test_max_days():
    h = HistoryService(FILTERS, max_days=1)
    day = 86400
    h.record(msg("old"), T0)
    h.record(msg("mid"), T0 + day / 2)
    # Querying a day and a bit later hides what is older than a day...
    assert payloads(h.query(CH, now=T0 + day + 1)[0]) == ["mid"]
    # ...and recording drops it for good.
    h.record(msg("new"), T0 + day + 2)
    assert payloads(h.query(CH)[0]) == ["mid", "new"]
    assert h.purge(T0 + 3 * day) == 2
    assert h.query(CH) == ([], None)


def test_message_expiry_hides_entries():
    h = HistoryService(FILTERS)
    h.record(msg("short", props={P.MESSAGE_EXPIRY_INTERVAL: 10}), T0)
    h.record(msg("long"), T0 + 1)
    assert payloads(h.query(CH, now=T0 + 5)[0]) == ["short", "long"]
    assert payloads(h.query(CH, now=T0 + 11)[0]) == ["long"]


# --------------------------------------------------------------------- queries

def test_limit_returns_newest_oldest_first_with_cursor():
    h = HistoryService(FILTERS)
    fill(h, 10)
    page, nxt = h.query(CH, limit=3)
    assert payloads(page) == ["m7", "m8", "m9"]
    assert nxt == page[0][0]


def test_before_cursor_pages_back_to_the_start():
    h = HistoryService(FILTERS)
    fill(h, 10)
    seen, cursor = [], None
    for _ in range(10):
        page, cursor = h.query(CH, limit=4, before=cursor)
        seen = payloads(page) + seen
        if cursor is None:
            break
    assert seen == [f"m{i}" for i in range(10)]
    # Exactly a full last page: no cursor when nothing older remains.
    page, nxt = h.query(CH, limit=10)
    assert len(page) == 10 and nxt is None


def test_after_cursor_returns_only_newer():
    h = HistoryService(FILTERS)
    fill(h, 6)
    ids = [e[0] for e in h.query(CH)[0]]
    page, _ = h.query(CH, after=ids[3])
    assert payloads(page) == ["m4", "m5"]
    page, nxt = h.query(CH, after=ids[0], limit=2)
    assert payloads(page) == ["m4", "m5"] and nxt == ids[4]


def test_ids_increase_even_when_the_clock_does_not():
    h = HistoryService(FILTERS)
    for i in range(5):
        h.record(msg(f"m{i}"), T0)  # same timestamp
    h.record(msg("back"), T0 - 100)  # clock stepped back
    ids = [e[0] for e in h.query(CH)[0]]
    assert ids == sorted(set(ids)) and len(ids) == 6


def test_limit_is_clamped():
    h = HistoryService(FILTERS, max_messages=1000)
    fill(h, MAX_LIMIT + 10)
    assert len(h.query(CH, limit=10**6)[0]) == MAX_LIMIT
    assert len(h.query(CH, limit=0)[0]) == 1


# ----------------------------------------------------------------- persistence

def test_history_survives_restart_with_sqlite(tmp_path):
    s = SqliteStore(str(tmp_path))
    s.open()
    h = HistoryService(FILTERS, max_messages=3, store=s)
    fill(h, 5)
    before = h.query(CH)
    s.close()
    s2 = SqliteStore(str(tmp_path))
    s2.open()
    h2 = HistoryService(FILTERS, max_messages=3, store=s2)
    after = h2.query(CH)
    assert [(e[0], e[1], e[3].payload) for e in after[0]] == \
        [(e[0], e[1], e[3].payload) for e in before[0]]
    # New ids continue after the recovered ones.
    h2.record(msg("next"), T0 - 10**6)
    assert h2.query(CH)[0][-1][0] > before[0][-1][0]
    s2.close()
    # Trimmed rows are gone from disk too.
    import sqlite3
    with sqlite3.connect(s2.path) as db:
        assert db.execute("SELECT count(*) FROM history").fetchone()[0] == 3


def test_smaller_limit_or_removed_filter_trims_at_load(tmp_path):
    s = SqliteStore(str(tmp_path))
    s.open()
    h = HistoryService(FILTERS, max_messages=10, store=s)
    fill(h, 8)
    fill(h, 2, topic="chat/acme/dm/1")
    s.close()
    s2 = SqliteStore(str(tmp_path))
    s2.open()
    h2 = HistoryService(["chat/+/channel/+"], max_messages=4, store=s2)
    assert payloads(h2.query(CH)[0]) == ["m4", "m5", "m6", "m7"]
    assert h2.query("chat/acme/dm/1") == ([], None)
    s2.close()


def test_history_with_memory_store_survives_reopen():
    s = MemoryStore()
    s.open()
    h = HistoryService(FILTERS, store=s)
    fill(h, 3)
    s.close()
    s.open()
    assert payloads(HistoryService(FILTERS, store=s).query(CH)[0]) == ["m0", "m1", "m2"]


# ------------------------------------------------------------ request/response

def test_is_history_request():
    assert is_history_request("$history/chat/a/channel/1")
    assert not is_history_request("chat/a/channel/1")


def test_request_response_format():
    h = HistoryService(FILTERS)
    h.record(msg("hello"), T0)
    h.record(msg(b"\xff\x00bin", props={P.CONTENT_TYPE: "application/octet-stream",
                                        P.USER_PROPERTY: (("type", "post"),)}), T0 + 1)
    resp, body = answer(h, request())
    assert resp.topic == "resp/me" and resp.qos == 1 and not resp.retain
    # The response carries the request's Correlation Data [MQTT-4.10].
    assert resp.properties[P.CORRELATION_DATA] == b"c-1"
    assert resp.properties[P.CONTENT_TYPE] == "application/json"
    assert resp.properties[P.PAYLOAD_FORMAT_INDICATOR] == 1
    assert body["topic"] == CH and body["next"] is None and "error" not in body
    m0, m1 = body["messages"]
    assert m0["payload"] == "hello" and m0["qos"] == 1 and m0["ts"] == T0
    assert m0["retain"] is False
    assert "payload" not in m1 and base64.b64decode(m1["payload_b64"]) == b"\xff\x00bin"
    assert m1["content_type"] == "application/octet-stream"
    assert m1["user_properties"] == [["type", "post"]]
    assert int(m0["id"]) < int(m1["id"])


def test_request_paging_with_before():
    h = HistoryService(FILTERS)
    fill(h, 7)
    _, body = answer(h, request(body={"limit": 3}))
    assert [m["payload"] for m in body["messages"]] == ["m4", "m5", "m6"]
    _, body2 = answer(h, request(body={"limit": 3, "before": body["next"]}))
    assert [m["payload"] for m in body2["messages"]] == ["m1", "m2", "m3"]
    _, body3 = answer(h, request(body={"limit": 3, "before": body2["next"]}))
    assert [m["payload"] for m in body3["messages"]] == ["m0"] and body3["next"] is None


def test_qos0_request_gets_qos0_response():
    h = HistoryService(FILTERS)
    resp, _ = answer(h, request(qos=0))
    assert resp.qos == 0


@pytest.mark.parametrize("payload,reason", [
    (b"not json", "bad request"),
    (b"[1, 2]", "bad request"),
    (json.dumps({"limit": "many"}).encode(), "bad request"),
    (json.dumps({"limit": 0}).encode(), "bad request"),
    (json.dumps({"before": "abc"}).encode(), "bad request"),
])
def test_bad_requests_get_an_error_response(payload, reason):
    h = HistoryService(FILTERS)
    fill(h, 2)
    req = Publish(HISTORY_PREFIX + CH, payload, 1, False, False, 1,
                  {P.RESPONSE_TOPIC: "r", P.CORRELATION_DATA: b"x"})
    resp, body = answer(h, req)
    assert body["error"].startswith(reason)
    assert body["messages"] == [] and body["next"] is None
    assert resp.properties[P.CORRELATION_DATA] == b"x"


def test_topic_without_history_is_an_error():
    h = HistoryService(FILTERS)
    _, body = answer(h, request(topic="chat/acme/user/1"))
    assert body["error"] == "no history"


def test_acl_hook_is_applied():
    h = HistoryService(FILTERS, authorize=lambda client, topic: client == "alice")
    fill(h, 1)
    _, ok = answer(h, request(), client="alice")
    _, denied = answer(h, request(), client="mallory")
    assert len(ok["messages"]) == 1
    assert denied["error"] == "not authorized" and denied["messages"] == []


def test_request_without_response_topic_is_not_answered():
    h = HistoryService(FILTERS)
    fill(h, 1)
    assert h.handle_request(request(response_topic=None), "alice", T0) == []


def test_v311_request_names_the_response_topic_in_the_payload():
    h = HistoryService(FILTERS)
    fill(h, 2)
    req = Publish(HISTORY_PREFIX + CH,
                  json.dumps({"response_topic": "resp/v3", "correlation": {"n": 5},
                              "limit": 1}).encode(), 1, False, False, 1)
    resp, body = answer(h, req)
    assert resp.topic == "resp/v3" and P.CORRELATION_DATA not in resp.properties
    assert body["correlation"] == {"n": 5}
    assert [m["payload"] for m in body["messages"]] == ["m1"]
    # A wildcard is not a topic a response can be published to.
    bad = Publish(HISTORY_PREFIX + CH, json.dumps({"response_topic": "resp/#"}).encode(), 1,
                  False, False, 1)
    assert h.handle_request(bad, "alice", T0) == []
