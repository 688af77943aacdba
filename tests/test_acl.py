"""ACL files: parsing, Mosquitto's semantics, %u/%c patterns, $SYS, matching."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmqtt.broker.acl import (
    READ,
    WRITE,
    AclAuthorizer,
    filter_covers,
    parse_acl,
    stale_subscriptions,
    topic_matches,
)

ACL = """
# anonymous clients (rules before any user line)
topic read public/#
topic write public/anon-inbox

user alice
topic readwrite alice/#
topic deny alice/secret
topic read shared/+/news
topic   sensors/with spaces/x

user bob
topic write bob/out
topic read $SYS/#
topic write $SYS/broker/evil

# everyone
pattern readwrite devices/%c/#
pattern read app/ws/user/%u
pattern deny app/ws/user/%u/blocked
"""


@pytest.fixture
def az():
    return AclAuthorizer(acl=parse_acl(ACL))


def test_parse_structure():
    acl = parse_acl(ACL)
    assert [(r.access, r.topic_filter) for r in acl.anonymous] == [
        (READ, "public/#"), (WRITE, "public/anon-inbox")]
    assert [(r.access, r.topic_filter) for r in acl.users["alice"]] == [
        (READ | WRITE, "alice/#"), (0, "alice/secret"), (READ, "shared/+/news"),
        (READ | WRITE, "sensors/with spaces/x")]  # no access word: readwrite, spaces kept
    assert [r.topic_filter for r in acl.patterns] == [
        "devices/%c/#", "app/ws/user/%u", "app/ws/user/%u/blocked"]


@pytest.mark.parametrize("bad", ["frobnicate x", "user", "topic", "topic read"])
def test_parse_errors(bad):
    # "topic read" alone is a filter called "read" in Mosquitto; an empty one is an error.
    if bad == "topic read":
        assert parse_acl(bad).anonymous[0].topic_filter == "read"
        return
    with pytest.raises(ValueError):
        parse_acl(bad)


def test_anonymous_rules(az):
    assert az.can_subscribe("c", None, "public/#")
    assert az.can_receive("c", None, "public/a/b")
    assert not az.can_publish("c", None, "public/a")
    assert az.can_publish("c", None, "public/anon-inbox")
    # Anonymous rules do not apply to named users ...
    assert not az.can_subscribe("c", "alice", "public/#")
    # ... and user rules not to anonymous clients.
    assert not az.can_publish("c", None, "alice/x")


def test_user_rules_and_deny(az):
    assert az.can_publish("c", "alice", "alice/a/b")
    assert az.can_receive("c", "alice", "alice/a")
    assert az.can_subscribe("c", "alice", "alice/#")
    # deny wins over the broader grant, for every access
    assert not az.can_publish("c", "alice", "alice/secret")
    assert not az.can_receive("c", "alice", "alice/secret")
    assert not az.can_subscribe("c", "alice", "alice/secret")
    # a wider subscription is allowed (the deny filter does not cover all of
    # it) but the denied topic is then filtered at delivery by can_receive
    assert az.can_subscribe("c", "alice", "alice/+")
    assert not az.can_receive("c", "alice", "alice/secret")
    # unknown user: nothing at all
    assert not az.can_receive("c", "mallory", "alice/a")
    assert not az.can_publish("c", "mallory", "public/anon-inbox")


def test_read_write_split(az):
    assert az.can_publish("c", "bob", "bob/out")
    assert not az.can_subscribe("c", "bob", "bob/out")
    assert not az.can_receive("c", "bob", "bob/out")
    assert az.can_receive("c", "alice", "shared/x/news")
    assert not az.can_publish("c", "alice", "shared/x/news")


@pytest.mark.parametrize("sub,allowed", [
    ("shared/x/news", True),
    ("shared/+/news", True),        # '+' covered by '+'
    ("shared/#", False),            # wider than the ACL
    ("shared/+/#", False),
    ("shared/x/+", False),          # last level wider than the literal
    ("shared/x/news/more", False),
    ("$share/g/shared/x/news", True),   # shared subscriptions: inner filter checked
    ("$share/g/shared/#", False),
])
def test_subscribe_needs_full_cover(az, sub, allowed):
    """Mosquitto's rule: the ACL filter must cover the whole subscription filter."""
    assert az.can_subscribe("c", "alice", sub) is allowed


def test_patterns_substitute_user_and_client(az):
    assert az.can_publish("dev42", "anyone", "devices/dev42/state")
    assert az.can_subscribe("dev42", None, "devices/dev42/#")  # %c works for anonymous too
    assert not az.can_publish("dev42", "anyone", "devices/dev43/state")
    assert az.can_subscribe("c", "carol", "app/ws/user/carol")
    assert not az.can_subscribe("c", "carol", "app/ws/user/dave")
    assert not az.can_subscribe("c", "carol", "app/ws/user/+")
    # %u needs a user name: anonymous clients get nothing from it
    assert not az.can_receive("c", None, "app/ws/user/")
    # pattern deny
    assert not az.can_receive("c", "carol", "app/ws/user/carol/blocked")


@pytest.mark.parametrize("client_id", ["a+b", "#", "x/+"])
def test_wildcards_in_client_id_never_widen_patterns(az, client_id):
    """A client id holding '+' or '#' would turn ``devices/%c/#`` into a
    wildcard filter: the pattern is dropped for that client (as in Mosquitto)."""
    assert not az.can_subscribe(client_id, "u", f"devices/{client_id}/#")
    assert not az.can_receive(client_id, "u", "devices/other/x")
    assert az.can_subscribe(client_id, "u", "app/ws/user/u")  # other patterns unaffected


@pytest.mark.parametrize("username", ["+", "x/#", "a+"])
def test_wildcards_in_username_never_widen_patterns(az, username):
    assert not az.can_subscribe("c", username, f"app/ws/user/{username}")
    assert not az.can_receive("c", username, "app/ws/user/victim")
    assert az.can_subscribe("c", username, "devices/c/#")


def test_sys_is_read_only(az):
    # bob may read $SYS, never write it even with a matching write rule
    assert az.can_subscribe("c", "bob", "$SYS/#")
    assert az.can_receive("c", "bob", "$SYS/broker/uptime")
    assert not az.can_publish("c", "bob", "$SYS/broker/evil")
    assert not az.can_publish("c", "bob", "$SYS")
    # alice has 'alice/#' only; wildcard rules never reach $ topics [MQTT-4.7.2-1]
    everything = AclAuthorizer(acl=parse_acl("topic readwrite #\n"))
    assert everything.can_publish("c", None, "a/b")
    assert not everything.can_receive("c", None, "$SYS/broker/uptime")
    assert not everything.can_subscribe("c", None, "$SYS/#")
    assert not everything.can_publish("c", None, "$SYS/x")


def test_reload_and_stale_subscriptions(tmp_path):
    f = tmp_path / "acl"
    f.write_text("user alice\ntopic read chat/general\ntopic read chat/random\n")
    az = AclAuthorizer(str(f))
    subs = [("c1", "alice", "chat/general"), ("c1", "alice", "chat/random"),
            ("c2", None, "chat/general")]
    assert stale_subscriptions(az, subs) == [("c2", "chat/general")]
    assert az.can_receive("c1", "alice", "chat/random")  # cached
    f.write_text("user alice\ntopic read chat/general\n")
    assert az.reload() and az.generation == 1
    assert stale_subscriptions(az, subs) == [("c1", "chat/random"), ("c2", "chat/general")]
    assert not az.can_receive("c1", "alice", "chat/random")  # cache dropped
    f.write_text("bogus line\n")
    assert not az.reload() and az.generation == 1  # a broken file keeps the old rules
    assert az.can_receive("c1", "alice", "chat/general")


# ------------------------------------------------------------ matching

@pytest.mark.parametrize("flt,topic,ok", [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a", True),  # [MQTT-4.7.1-2] '#' includes the parent level
    ("a/#", "a/b/c", True), ("#", "a", True), ("+", "a", True), ("+", "a/b", False),
    ("+/+", "/a", True), ("a/+/c", "a//c", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),  # [MQTT-4.7.2-1]
    ("$SYS/#", "$SYS/x", True), ("$SYS/+", "$SYS/x", True),
])
def test_topic_matches(flt, topic, ok):
    assert topic_matches(flt, topic) is ok


@pytest.mark.parametrize("acl,sub,ok", [
    ("#", "a/#", True), ("#", "#", True), ("a/#", "a/#", True), ("a/#", "a", True),
    ("a/#", "a/+/c", True), ("a/+", "a/+", True), ("a/+", "a/#", False),
    ("a/b", "a/+", False), ("+", "#", False), ("a/+/c", "a/b/c", True),
    ("#", "$SYS/#", False), ("$SYS/#", "$SYS/broker/+", True),
])
def test_filter_covers(acl, sub, ok):
    assert filter_covers(acl, sub) is ok


LEVEL = st.sampled_from(["a", "b", ""])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join).filter(bool)  # "" is no topic name
FILTER = st.builds(
    lambda levels, tail: "/".join(levels + (["#"] if tail else [])),
    st.lists(st.sampled_from(["a", "b", "", "+"]), min_size=0, max_size=4),
    st.booleans(),
).filter(bool)


def _all_topics():
    import itertools

    out = []
    for n in range(1, 5):
        out += ["/".join(p) for p in itertools.product(["a", "b", ""], repeat=n)]
    return [t for t in out if t]


ALL_TOPICS = _all_topics()


@settings(max_examples=300, deadline=None)
@given(FILTER, TOPIC)
def test_topic_matches_agrees_with_trie(flt, topic):
    """Oracle: the broker's topic trie must agree with the ACL matcher."""
    from fastmqtt.trie import TopicTrie

    t = TopicTrie()
    t.subscribe("s", flt)
    assert topic_matches(flt, topic) is bool(t.match(topic))


@settings(max_examples=300, deadline=None)
@given(FILTER, FILTER)
def test_cover_means_every_matched_topic_is_matched(acl, sub):
    """filter_covers(acl, sub) implies that acl matches every topic sub matches
    (checked over every topic of up to four levels from a small alphabet)."""
    matched_by_sub = [t for t in ALL_TOPICS if topic_matches(sub, t)]
    if filter_covers(acl, sub):
        assert all(topic_matches(acl, t) for t in matched_by_sub)
