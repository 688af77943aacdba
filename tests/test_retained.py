"""RetainedStore: set/replace/delete/get, lookup by filter with the spec's rules,
expiry and purge; on both implementations, plus a property test against a
naive scan with ``fastmqtt.topics.topic_matches``."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmqtt.errors import MalformedPacket
from fastmqtt.topics import topic_matches


def topics_of(pairs):
    return sorted(t for t, _ in pairs)


@pytest.fixture
def store(trie):
    s = trie.RetainedStore()
    for topic in ("a", "a/b", "a/b/c", "a//b", "/a", "a/", "$SYS/load", "$SYS/x/y",
                  "b/b", "$", "ü/€"):
        s.set(topic, f"msg:{topic}")
    return s


def test_set_get_replace_delete(trie):
    s = trie.RetainedStore()
    assert len(s) == 0 and s.get("a") is None
    s.set("a/b", "one")
    assert s.get("a/b") == "one" and len(s) == 1
    s.set("a/b", "two")
    assert s.get("a/b") == "two" and len(s) == 1
    assert s.get("a") is None          # interior node, no message
    assert s.delete("a") is False
    assert s.delete("a/b") is True
    assert s.delete("a/b") is False
    assert len(s) == 0 and s.get("a/b") is None
    assert s.node_count() == 0


def test_values_are_opaque_objects(trie):
    s = trie.RetainedStore()
    obj = object()
    s.set("x", obj)
    assert s.get("x") is obj
    assert s.match("#") == [("x", obj)]


def test_delete_keeps_neighbours_and_prunes(trie):
    s = trie.RetainedStore()
    s.set("a", 1)
    s.set("a/b/c", 2)
    assert s.node_count() == 3
    s.delete("a/b/c")
    assert s.node_count() == 1 and s.get("a") == 1
    s.set("a/b/c", 2)
    s.delete("a")
    assert s.node_count() == 3 and s.get("a/b/c") == 2


def test_exact_filter(store):
    assert store.match("a/b") == [("a/b", "msg:a/b")]
    assert store.match("a/z") == []


def test_MQTT_4_7_1_2_hash_includes_parent_level(store):
    assert topics_of(store.match("a/#")) == ["a", "a/", "a//b", "a/b", "a/b/c"]
    assert topics_of(store.match("a/b/#")) == ["a/b", "a/b/c"]


def test_plus_one_level_including_empty(store):
    assert topics_of(store.match("a/+")) == ["a/", "a/b"]
    assert topics_of(store.match("+/b")) == ["a/b", "b/b"]
    assert topics_of(store.match("a/+/b")) == ["a//b"]
    assert topics_of(store.match("+")) == ["a"]
    assert topics_of(store.match("+/+")) == ["/a", "a/", "a/b", "b/b", "ü/€"]


def test_MQTT_4_7_2_1_wildcard_first_level_skips_dollar(store):
    assert "$SYS/load" not in topics_of(store.match("#"))
    assert "$" not in topics_of(store.match("+"))
    assert store.match("+/load") == []
    assert topics_of(store.match("$SYS/#")) == ["$SYS/load", "$SYS/x/y"]
    assert topics_of(store.match("$SYS/+")) == ["$SYS/load"]
    assert topics_of(store.match("$")) == ["$"]


def test_hash_matches_all_non_dollar(store):
    assert topics_of(store.match("#")) == sorted(
        ["a", "a/b", "a/b/c", "a//b", "/a", "a/", "b/b", "ü/€"])


def test_shared_filter_returns_nothing(store):
    # MQTT 5.0 section 4.8.2: no retained messages for a Shared Subscription.
    assert store.match("$share/g/#") == []
    assert store.match("$share/g/a/b") == []


def test_invalid_filter_and_topic(trie):
    s = trie.RetainedStore()
    for bad in ("a/#/b", "a+", "", "$share//x"):
        with pytest.raises(MalformedPacket) as err:
            s.match(bad)
        assert err.value.reason_code == 0x8F
    for bad in ("a/+", "#", "", "x\x00", "\ud800"):
        with pytest.raises(MalformedPacket) as err:
            s.set(bad, 1)
        assert err.value.reason_code == 0x90
    assert len(s) == 0 and s.node_count() == 0


def test_expiry_on_get_and_match(trie):
    s = trie.RetainedStore()
    s.set("a/1", "short", expires_at=100.0)
    s.set("a/2", "long", expires_at=200.0)
    s.set("a/3", "forever")
    assert s.get("a/1", now=99.0) == "short"
    assert s.get("a/1") == "short"                     # no `now`: no expiry check
    assert topics_of(s.match("a/+", now=50)) == ["a/1", "a/2", "a/3"]
    assert topics_of(s.match("a/+", now=100.0)) == ["a/2", "a/3"]  # expires_at <= now
    assert len(s) == 2                                  # the expired one is gone
    assert s.get("a/2", now=250) is None
    assert len(s) == 1 and s.get("a/3", now=1e12) == "forever"


def test_replace_resets_expiry(trie):
    s = trie.RetainedStore()
    s.set("t", "old", expires_at=10)
    s.set("t", "new")
    assert s.get("t", now=20) == "new"
    s.set("t", "newer", expires_at=30)
    assert s.items() == [("t", "newer", 30.0)]


def test_purge_expired(trie):
    s = trie.RetainedStore()
    for i in range(20):
        s.set(f"p/{i}/x", i, expires_at=float(i))
    s.set("p/keep", "k")
    assert s.purge_expired(9.5) == 10
    assert len(s) == 11
    assert sorted(t for t, _, _ in s.items()) == sorted(
        [f"p/{i}/x" for i in range(10, 20)] + ["p/keep"])
    assert s.purge_expired(100) == 10
    assert s.items() == [("p/keep", "k", None)]
    assert s.node_count() == 2


def test_items_lists_everything(store):
    items = store.items()
    assert len(items) == len(store) == 11
    assert all(m == f"msg:{t}" and e is None for t, m, e in items)


def test_many_siblings(trie):
    s = trie.RetainedStore()
    for i in range(300):
        s.set(f"dev/{i}/state", i)
    assert len(s.match("dev/+/state")) == 300
    for i in range(0, 300, 2):
        s.delete(f"dev/{i}/state")
    assert sorted(m for _, m in s.match("dev/#")) == list(range(1, 300, 2))


LEVELS = ["a", "b", "", "$SYS", "$x", "ü"]
topic_st = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
filter_st = st.lists(st.sampled_from(LEVELS + ["+"]), min_size=0, max_size=4).flatmap(
    lambda ls: st.sampled_from(["/".join(ls + ["#"]), "/".join(ls)])).filter(bool)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.tuples(topic_st, st.one_of(st.none(), st.integers(0, 10))), max_size=25),
       deletes=st.lists(topic_st, max_size=5), filters=st.lists(filter_st, min_size=1, max_size=6),
       now=st.one_of(st.none(), st.integers(0, 10)))
def test_match_agrees_with_naive_scan(trie, data, deletes, filters, now):
    s = trie.RetainedStore()
    model = {}
    for i, (topic, exp) in enumerate(data):
        s.set(topic, i, expires_at=exp)
        model[topic] = (i, exp)
    for topic in deletes:
        assert s.delete(topic) == (topic in model)
        model.pop(topic, None)
    assert len(s) == len(model)
    for f in filters:
        expected = sorted((t, m) for t, (m, exp) in model.items()
                          if topic_matches(f, t) and (now is None or exp is None or exp > now))
        assert sorted(s.match(f, now=now)) == expected
        if now is not None:
            for t in [t for t, (m, exp) in model.items()
                      if topic_matches(f, t) and exp is not None and exp <= now]:
                del model[t]
        assert len(s) == len(model)
    for t in list(model):
        s.delete(t)
    assert s.node_count() == 0


def test_cycle_through_the_store_is_collected(trie):
    # A retained message that refers back to its store must not make an
    # uncollectable cycle (the compiled store visits the messages its C nodes hold).
    import gc
    import weakref

    class Msg:
        pass

    st = trie.RetainedStore()
    m = Msg()
    m.store = st
    st.set("a/b/c", m)
    st.set("a", Msg())
    gone = weakref.ref(m)
    del m, st
    gc.collect()
    assert gone() is None
