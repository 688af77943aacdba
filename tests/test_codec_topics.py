"""fastmqtt.topics: topic name / filter validation, shared subscriptions and the
naive matcher (the oracle the trie is tested against), checked against the
specification's own examples (4.7.1, 4.7.2) and against paho-mqtt's matcher."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub as paho_matches

from codec_strategies import topic_filters, topic_levels, topic_names
from fastmqtt.errors import MalformedPacket
from fastmqtt.topics import split_shared, topic_matches, validate_topic_filter, validate_topic_name


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "a//b", "/finance", "$SYS/broker/uptime",
                                   "chat/ws1/dm/7", "ä/€/𝄞", "x" * 65535, " "])
def test_valid_topic_names(topic):
    validate_topic_name(topic)


@pytest.mark.parametrize(("topic", "statement"), [
    ("", "MQTT-4.7.3-1"),
    ("a/+", "MQTT-3.3.2-2"),
    ("+", "MQTT-3.3.2-2"),
    ("a/#", "MQTT-3.3.2-2"),
    ("a#b", "MQTT-3.3.2-2"),
    ("a\x00b", "MQTT-4.7.3-2"),
    ("x" * 65536, "MQTT-4.7.3-3"),
    ("€" * 21846, "MQTT-4.7.3-3"),  # 65538 UTF-8 bytes in 21846 characters
])
def test_invalid_topic_names(topic, statement):
    with pytest.raises(MalformedPacket) as info:
        validate_topic_name(topic)
    assert info.value.reason_code == 0x90
    assert statement in str(info.value)


@pytest.mark.parametrize("topic_filter", [
    "#", "+", "a/#", "+/+", "/", "a//b", "+/#", "a/+/b/#", "$SYS/#", "/+", "sport/tennis/+",
    "$share/g/#", "$share/group-1/chat/+/channel/#", "$share/g//", "$sharex/a", "$share",
])
def test_valid_topic_filters(topic_filter):
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(("topic_filter", "statement"), [
    ("", "MQTT-4.7.3-1"),
    ("a/#/b", "MQTT-4.7.1-1"),
    ("a#", "MQTT-4.7.1-1"),
    ("#/", "MQTT-4.7.1-1"),
    ("sport/tennis#", "MQTT-4.7.1-1"),
    ("a+", "MQTT-4.7.1-2"),
    ("sport+", "MQTT-4.7.1-2"),
    ("+a/b", "MQTT-4.7.1-2"),
    ("a\x00", "MQTT-4.7.3-2"),
    ("$share/", "MQTT-4.8.2-1"),
    ("$share//a", "MQTT-4.8.2-1"),
    ("$share/g+/a", "MQTT-4.8.2-1"),
    ("$share/#/a", "MQTT-4.8.2-1"),
    ("$share/g", "MQTT-4.8.2-2"),
    ("$share/g/", "MQTT-4.8.2-2"),
    ("$share/g/a#", "MQTT-4.7.1-1"),
    ("$share/g/a+", "MQTT-4.7.1-2"),
])
def test_invalid_topic_filters(topic_filter, statement):
    with pytest.raises(MalformedPacket) as info:
        validate_topic_filter(topic_filter)
    assert info.value.reason_code == 0x8F
    assert statement in str(info.value)


@pytest.mark.parametrize(("topic_filter", "expected"), [
    ("a/b", (None, "a/b")),
    ("$share/g/a/b", ("g", "a/b")),
    ("$share/g/#", ("g", "#")),
    ("$share/g//", ("g", "/")),
    ("$sharex/a", (None, "$sharex/a")),
    ("$share", (None, "$share")),
])
def test_split_shared(topic_filter, expected):
    assert split_shared(topic_filter) == expected


# The specification's examples, section 4.7.1.2, 4.7.1.3 and 4.7.2.
SPEC_EXAMPLES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("#", "$SYS/monitor/Clients", False),  # [MQTT-4.7.2-1]
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),  # [MQTT-4.7.2-1]
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("ACCOUNTS", "Accounts", False),  # case sensitive (4.7.3)
    ("a/b", "a/b/", False),
    ("a/b/", "a/b/", True),
    (" ", " ", True),  # spaces are ordinary characters
    ("$share/g/sport/#", "sport/x", True),
    ("$share/g/#", "$SYS/x", False),
    ("a/+/c", "a//c", True),
    ("a/#", "a", True),
    ("a/#", "ab", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_topic_matches_spec_examples(topic_filter, topic, expected):
    assert topic_matches(topic_filter, topic) is expected


def _regex_matches(topic_filter: str, topic: str) -> bool:
    """A second, differently built matcher: the filter as a regular expression."""
    _, topic_filter = split_shared(topic_filter)
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    parts = []
    for level in topic_filter.split("/"):
        if level == "#":
            # '#' also matches the parent: drop the '/' that would precede it.
            # DOTALL: a level may hold a newline, which '.' alone would not match.
            return re.fullmatch("/".join(parts) + ("(/.*)?" if parts else ".*"), topic,
                                re.DOTALL) is not None
        parts.append("[^/]*" if level == "+" else re.escape(level))
    return re.fullmatch("/".join(parts), topic, re.DOTALL) is not None


@st.composite
def _related_topics(draw):
    """A filter and a topic that often match: the topic is built from the filter."""
    topic_filter = draw(topic_filters())
    _, plain = split_shared(topic_filter)
    levels = []
    for level in plain.split("/"):
        if level == "+":
            levels.append(draw(topic_levels()))
        elif level == "#":
            levels += draw(st.lists(topic_levels(), max_size=3))
        else:
            levels.append(level)
    topic = "/".join(levels)
    if draw(st.booleans()) or not topic:
        topic = draw(st.one_of(st.just(topic + "/x"), topic_names(), st.just("$SYS/" + topic)))
    return topic_filter, topic or "x"


@settings(max_examples=400, deadline=None)
@given(_related_topics())
def test_topic_matches_agrees_with_regex_and_paho(case):
    topic_filter, topic = case
    expected = _regex_matches(topic_filter, topic)
    assert topic_matches(topic_filter, topic) is expected
    _, plain = split_shared(topic_filter)
    assert paho_matches(plain, topic) is expected


@settings(max_examples=200, deadline=None)
@given(topic_filters())
def test_generated_filters_are_valid(topic_filter):
    validate_topic_filter(topic_filter)


@settings(max_examples=200, deadline=None)
@given(topic_names())
def test_generated_names_are_valid_and_match_themselves(topic):
    validate_topic_name(topic)
    assert topic_matches(topic, topic)
