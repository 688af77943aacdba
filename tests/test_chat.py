"""Chat layer units: topic scheme, event envelope, de-duplication, presence
folding and history page parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from fastmqtt import codec
from fastmqtt.chat import (EVENT_TYPES, TYPE_CODES, ChannelTyping, ChatMessage, ChatTopic,
                           ChatTopics, ChatTyping, Deduplicator, Event, EventDecodeError,
                           InvalidChatId, PresenceTracker, UnknownEvent, UserStatus,
                           decode_event, encode_event, new_event_id, presence_will)
from fastmqtt.chat.history import HistoryError, _parse_page
from fastmqtt.topics import topic_matches, validate_topic_filter, validate_topic_name

IDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/+#\x00"),
              min_size=1, max_size=12).filter(lambda s: not s.startswith("$"))


# ---------------------------------------------------------------- topics

@settings(max_examples=100, deadline=None)
@given(ws=IDS, ident=IDS, device=IDS, kind=st.sampled_from(["channel", "dm", "user", "presence"]))
def test_topic_build_parse_round_trip(ws, ident, device, kind):
    t = ChatTopics("acme")
    topic = (t.presence(ws, ident, device) if kind == "presence"
             else getattr(t, kind)(ws, ident))
    validate_topic_name(topic)  # always a valid MQTT topic name
    parsed = t.parse(topic)
    assert parsed == ChatTopic(kind, ws, ident, device if kind == "presence" else None)
    assert t.build(parsed) == topic
    # The workspace-wide filter of that kind matches it, and is a valid filter.
    flt = t.filter(ws, kind)
    validate_topic_filter(flt)
    assert topic_matches(flt, topic)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\x00y", "$sys", 5])
def test_ids_that_would_break_the_level_structure_are_rejected(bad):
    t = ChatTopics()
    with pytest.raises(InvalidChatId):
        t.channel("ws", bad)
    with pytest.raises(InvalidChatId):
        t.user(bad, "u1")


def test_app_prefix_can_have_levels_and_is_validated():
    t = ChatTopics("acme/chat")
    topic = t.dm("w1", "g1")
    assert topic == "acme/chat/w1/dm/g1" and t.parse(topic) == ChatTopic("dm", "w1", "g1")
    with pytest.raises(InvalidChatId):
        ChatTopics("acme/+/x")
    with pytest.raises(InvalidChatId):
        ChatTopics("$SYS")


@pytest.mark.parametrize("topic", ["chat/w/channel", "chat/w/channel/a/b", "chat/w/room/a",
                                   "other/w/dm/x", "chat/w/presence/u", "chat//dm/x"])
def test_parse_rejects_foreign_topics(topic):
    with pytest.raises(ValueError):
        ChatTopics().parse(topic)


def test_dm_grouping_id_is_symmetric():
    assert ChatTopics.dm_grouping_id("bob", "alice") == ChatTopics.dm_grouping_id("alice", "bob")
    assert ChatTopics.dm_grouping_id("c", "a", "b") == "a~b~c"
    with pytest.raises(InvalidChatId):
        ChatTopics.dm_grouping_id("alice", "alice")


# ---------------------------------------------------------------- events

def sample(cls):
    """An instance of ``cls`` with every required field filled."""
    from dataclasses import MISSING, fields

    kw = {}
    for f in fields(cls):
        if f.name in ("id", "ts", "sender") or f.default is not MISSING or f.default_factory is not MISSING:
            continue
        kw[f.name] = f"{f.name}-é"
    return cls(sender="alice", **kw)


def test_taxonomy_is_complete():
    want = {"post", "post.reaction", "post.comment", "comment.reaction", "channel.typing",
            "chat.message", "chat.reaction", "chat.comment", "chat.typing",
            "user.emoji_status", "user.status", "user.device", "task.comment",
            "task.comment.reaction", "document.comment", "document.comment.reaction",
            "activity", "channel.call", "chat.call"}
    assert set(EVENT_TYPES) == want
    assert len(TYPE_CODES) == len(EVENT_TYPES)


@pytest.mark.parametrize("cls", list(EVENT_TYPES.values()), ids=list(EVENT_TYPES))
def test_every_event_type_round_trips(cls):
    ev = sample(cls)
    data = encode_event(ev)
    assert b": " not in data and b", " not in data  # compact separators
    obj = json.loads(data)
    assert obj["type"] == cls.TYPE and obj["id"] == ev.id and obj["from"] == "alice"
    assert decode_event(data) == ev
    # Apps that number their types: the integer code decodes the same.
    obj["type"] = cls.CODE
    assert decode_event(json.dumps(obj)) == ev


def test_typing_is_qos0_and_ephemeral_messages_qos1():
    assert ChatTyping.QOS == ChannelTyping.QOS == 0 and ChatTyping.EPHEMERAL
    assert ChatMessage.QOS == 1 and not ChatMessage.EPHEMERAL
    assert UserStatus.QOS == 1


def test_unknown_type_and_unknown_fields_are_tolerated():
    ev = decode_event(b'{"type":"poll.vote","id":"x1","ts":5,"from":"u","data":{"a":1}}')
    assert isinstance(ev, UnknownEvent) and ev.type == "poll.vote" and ev.data == {"a": 1}
    assert decode_event(encode_event(ev)) == ev
    msg = decode_event(b'{"type":"chat.message","id":"x2","data":{"message_id":"m",'
                       b'"grouping_id":"g","future_field":true}}')
    assert isinstance(msg, ChatMessage) and msg.message_id == "m"


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[]", b'{"type":"chat.message"}', b'{"id":"x","data":{}}',
    b'{"type":"chat.message","id":"x","data":{"message_id":"m"}}',  # lacks grouping_id
    b'{"type":"post","id":"x","data":[]}', b'{"type":"post","id":1,"data":{}}',
    b'{"type":"post","id":"x","ts":"now","data":{}}', b"\xff\xfe",
])
def test_invalid_envelopes_raise_event_decode_error(payload):
    with pytest.raises(EventDecodeError):
        decode_event(payload)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_random_payloads_only_raise_event_decode_error(payload):
    try:
        ev = decode_event(payload)
    except EventDecodeError:
        return
    assert isinstance(ev, Event)


def test_event_ids_unique_and_time_ordered():
    ids = [new_event_id(1_700_000_000_000 + i) for i in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50 and all(len(i) == 26 for i in ids)
    assert len({new_event_id() for _ in range(1000)}) == 1000


# ---------------------------------------------------------------- dedup

def test_dedup_detects_repeats_and_is_bounded():
    d = Deduplicator(max_size=3)
    assert [d.seen(x) for x in "abca"] == [False, False, False, True]
    d.seen("d")  # evicts the least recently seen: "b"
    assert "b" not in d and "a" in d and len(d) == 3
    assert d.seen("b") is False and d.duplicates == 1


def test_dedup_time_window():
    now = [0.0]
    d = Deduplicator(max_size=100, ttl=10, clock=lambda: now[0])
    d.seen("x")
    now[0] = 5
    assert d.seen("x") is True  # refreshes it
    now[0] = 14
    assert "x" in d
    now[0] = 16
    assert "x" not in d and d.seen("x") is False


# ---------------------------------------------------------------- presence

def test_presence_will_is_retained_offline_status():
    will = presence_will(ChatTopics(), "w", "bob", "phone", delay=5)
    assert will.topic == "chat/w/presence/bob/phone" and will.retain and will.qos == 1
    ev = decode_event(will.payload)
    assert isinstance(ev, UserStatus) and ev.status == "offline" and ev.device_id == "phone"
    codec.encode(codec.Connect("c", will=will), 5)  # a valid CONNECT will


def test_presence_tracker_folds_devices():
    t = ChatTopics()
    tr = PresenceTracker(t)

    def status(s, dev):
        return encode_event(UserStatus(user_id="bob", status=s, device_id=dev))

    assert tr.update(t.presence("w", "bob", "phone"), status("online", "phone")) == ("bob", "online")
    assert tr.update(t.presence("w", "bob", "laptop"), status("away", "laptop")) == ("bob", "online")
    assert tr.update(t.presence("w", "bob", "phone"), status("offline", "phone")) == ("bob", "away")
    assert tr.update(t.presence("w", "bob", "laptop"), b"") == ("bob", "offline")
    assert tr.update(t.dm("w", "g"), b"{}") is None
    assert tr.online() == [] and tr.status("nobody") == "offline"


# ---------------------------------------------------------------- history

def test_history_page_parsing_matches_broker_format():
    body = json.dumps({"topic": "chat/w/dm/g", "next": "17", "messages": [
        {"id": "17", "ts": 1.5, "qos": 1, "retain": False, "payload": "hello"},
        {"id": "18", "ts": 2.5, "qos": 1, "retain": False, "payload_b64": "AAE=",
         "user_properties": [["k", "v"]]}]}).encode()
    page = _parse_page(body, "chat/w/dm/g")
    assert page.next == "17" and [m.payload for m in page.messages] == [b"hello", b"\x00\x01"]
    assert page.messages[1].user_properties == [("k", "v")]
    with pytest.raises(HistoryError):
        _parse_page(b'{"messages":[],"next":null,"error":"not authorized"}', "t")
