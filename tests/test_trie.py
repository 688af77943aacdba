"""Unit tests for TopicTrie, one rule per test, on both implementations.

The ``trie`` fixture (tests/conftest.py) yields the compiled ``fastmqtt._trie``
and the pure-Python ``fastmqtt._trie_py`` in turn.
"""

import pytest

from fastmqtt.errors import MalformedPacket


def subs_of(deliveries):
    """Subscribers of a match result, as a sorted list (order is unspecified)."""
    return sorted(d[0] for d in deliveries)


def by_sub(deliveries):
    out = {}
    for sub, qos, rap, ids in deliveries:
        assert sub not in out, "one delivery per subscriber"
        out[sub] = (qos, rap, ids)
    return out


def test_compiled_module_is_the_extension():
    import fastmqtt._trie as compiled

    assert compiled.__file__.endswith((".so", ".pyd")), compiled.__file__


def test_exported_from_package(trie):
    import fastmqtt

    assert fastmqtt.TopicTrie.__name__ == "TopicTrie"
    assert fastmqtt.RetainedStore.__name__ == "RetainedStore"


# -- basic operations --------------------------------------------------------


def test_subscribe_match_unsubscribe(trie):
    t = trie.TopicTrie()
    assert t.subscribe("c1", "a/b", qos=1) is True
    assert len(t) == 1
    assert t.match("a/b") == [("c1", 1, False, ())]
    assert t.match("a/c") == []
    assert t.match("a") == []
    assert t.match("a/b/c") == []
    assert t.unsubscribe("c1", "a/b") is True
    assert t.unsubscribe("c1", "a/b") is False
    assert len(t) == 0
    assert t.match("a/b") == []


def test_unsubscribe_unknown(trie):
    t = trie.TopicTrie()
    t.subscribe("c1", "a/b")
    assert t.unsubscribe("c2", "a/b") is False
    assert t.unsubscribe("c1", "a/c") is False
    assert t.unsubscribe("c1", "a") is False
    assert t.unsubscribe("c1", "a/b/c") is False
    assert t.unsubscribe("c1", "$share/g/a/b") is False
    assert len(t) == 1


def test_any_hashable_subscriber(trie):
    t = trie.TopicTrie()
    subs = [("tuple", 1), 42, frozenset({1}), None.__class__, b"bytes"]
    for s in subs:
        t.subscribe(s, "x")
    assert sorted(map(repr, subs_of_any(t.match("x")))) == sorted(map(repr, subs))
    with pytest.raises(TypeError):
        t.subscribe(["unhashable"], "x")
    assert len(t) == len(subs)


def subs_of_any(deliveries):
    return [d[0] for d in deliveries]


def test_subscriptions_lists_options(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "a/+", qos=2, no_local=True, retain_as_published=True,
                retain_handling=2, subscription_id=77)
    t.subscribe("c", "$share/g/x/#", qos=1, subscription_id=5)
    t.subscribe("c", "/", qos=0)
    assert sorted(t.subscriptions("c")) == sorted([
        ("a/+", 2, True, True, 2, 77),
        ("$share/g/x/#", 1, False, False, 0, 5),
        ("/", 0, False, False, 0, 0),
    ])
    assert t.subscriptions("nobody") == []


def test_remove_subscriber(trie):
    t = trie.TopicTrie()
    for f in ("a", "a/b", "a/#", "+/b", "$share/g/a/b", "$share/h/#"):
        t.subscribe("gone", f)
    t.subscribe("stays", "a/b")
    t.subscribe("stays2", "$share/g/a/b")
    assert t.remove_subscriber("gone") == 6
    assert t.remove_subscriber("gone") == 0
    assert t.subscriptions("gone") == []
    assert len(t) == 2
    assert subs_of(t.match("a/b")) == ["stays", "stays2"]
    assert t.match("a") == []


def test_subscriber_can_return_after_removal(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "a")
    t.remove_subscriber("c")
    assert t.subscribe("c", "a") is True
    assert t.match("a") == [("c", 0, False, ())]


def test_option_ranges_rejected(trie):
    t = trie.TopicTrie()
    with pytest.raises(ValueError):
        t.subscribe("c", "a", qos=3)
    with pytest.raises(ValueError):
        t.subscribe("c", "a", retain_handling=3)
    with pytest.raises(ValueError):
        t.subscribe("c", "a", subscription_id=268_435_456)
    with pytest.raises(ValueError):
        t.subscribe("c", "a", subscription_id=-1)
    assert len(t) == 0 and t.subscriptions("c") == []
    t.subscribe("c", "a", subscription_id=268_435_455)
    assert t.match("a") == [("c", 0, False, (268_435_455,))]


# -- filter rules ---------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "#a", "a/b#", "+a", "a+", "a/+b/c", "##", "++",
                                 "a/#/"])
def test_MQTT_4_7_1_2_and_3_wildcards_occupy_whole_levels(trie, bad):
    t = trie.TopicTrie()
    with pytest.raises(MalformedPacket) as err:
        t.subscribe("c", bad)
    assert err.value.reason_code == 0x8F
    with pytest.raises(MalformedPacket):
        t.unsubscribe("c", bad)
    assert len(t) == 0


@pytest.mark.parametrize("good", ["#", "+", "+/+", "/+", "+/", "a/#", "/#", "+/#", "a//b",
                                  "/", "//", "a/+/c/#", "$SYS/#", "$"])
def test_valid_filters_accepted(trie, good):
    t = trie.TopicTrie()
    assert t.subscribe("c", good) is True
    assert [s[0] for s in t.subscriptions("c")] == [good]


def test_MQTT_4_7_3_1_empty_filter_rejected(trie):
    with pytest.raises(MalformedPacket) as err:
        trie.TopicTrie().subscribe("c", "")
    assert err.value.reason_code == 0x8F


def test_MQTT_4_7_3_2_null_character_rejected(trie):
    t = trie.TopicTrie()
    with pytest.raises(MalformedPacket) as err:
        t.subscribe("c", "a/\x00")
    assert err.value.reason_code == 0x8F
    with pytest.raises(MalformedPacket) as err:
        t.match("a/\x00")
    assert err.value.reason_code == 0x90


def test_MQTT_4_7_3_3_length_limit_in_utf8_bytes(trie):
    t = trie.TopicTrie()
    assert t.subscribe("c", "a" * 65535)
    # 21846 three-byte characters = 65538 bytes: over the limit though only
    # 21846 code points long.
    with pytest.raises(MalformedPacket) as err:
        t.subscribe("c", "\u20ac" * 21846)
    assert err.value.reason_code == 0x8F
    with pytest.raises(MalformedPacket):
        t.subscribe("c", "a" * 65536)
    with pytest.raises(MalformedPacket) as err:
        t.match("b" * 65536)
    assert err.value.reason_code == 0x90
    assert t.match("a" * 65535) == [("c", 0, False, ())]


def test_MQTT_1_5_4_1_lone_surrogate_is_malformed(trie):
    t = trie.TopicTrie()
    with pytest.raises(MalformedPacket) as err:
        t.subscribe("c", "a/\ud800")
    assert err.value.reason_code == 0x8F
    with pytest.raises(MalformedPacket) as err:
        t.match("a/\udfff")
    assert err.value.reason_code == 0x90


def test_non_str_filter_is_malformed(trie):
    t = trie.TopicTrie()
    with pytest.raises(MalformedPacket):
        t.subscribe("c", b"a/b")
    with pytest.raises(MalformedPacket):
        t.match(b"a/b")


def test_same_errors_as_topics_module(trie):
    from fastmqtt import topics

    for f in ["a/#/b", "", "a+", "$share//x", "$share/g", "$share/g/", "$share/g+/x",
              "$share/#/x", "x\x00", "$share/g/a#", "ok/+/#", "$share/g/+"]:
        try:
            topics.validate_topic_filter(f)
            expected = None
        except MalformedPacket as e:
            expected = e.reason_code
        try:
            trie.TopicTrie().subscribe("c", f)
            got = None
        except MalformedPacket as e:
            got = e.reason_code
        assert got == expected, f


def test_unicode_levels(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "chat/ünïcødé/+/€")
    assert subs_of(t.match("chat/ünïcødé/x/€")) == ["c"]
    assert t.match("chat/unicode/x/€") == []
    assert t.subscriptions("c")[0][0] == "chat/ünïcødé/+/€"


# -- matching rules -------------------------------------------------------------


def test_MQTT_4_7_1_2_hash_matches_parent_level(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "sport/tennis/player1/#")
    for topic in ("sport/tennis/player1", "sport/tennis/player1/ranking",
                  "sport/tennis/player1/score/wimbledon", "sport/tennis/player1/"):
        assert subs_of(t.match(topic)) == ["c"], topic
    assert t.match("sport/tennis") == []
    assert t.match("sport/tennis/player2") == []


def test_hash_alone_matches_everything_not_dollar(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "#")
    for topic in ("a", "/", "a/b/c", "/finance", "x//y"):
        assert subs_of(t.match(topic)) == ["c"]


def test_plus_matches_exactly_one_level(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "sport/tennis/+")
    assert subs_of(t.match("sport/tennis/player1")) == ["c"]
    assert subs_of(t.match("sport/tennis/")) == ["c"]  # an empty level is a level
    assert t.match("sport/tennis/player1/ranking") == []
    assert t.match("sport/tennis") == []


def test_plus_spec_examples(trie):
    t = trie.TopicTrie()
    t.subscribe("p", "sport/+")
    t.subscribe("q", "+/+")
    t.subscribe("r", "/+")
    t.subscribe("s", "+")
    assert subs_of(t.match("sport")) == ["s"]
    assert subs_of(t.match("sport/")) == ["p", "q"]
    assert subs_of(t.match("/finance")) == ["q", "r"]


def test_empty_levels_are_real_levels(trie):
    t = trie.TopicTrie()
    t.subscribe("double", "a//b")
    t.subscribe("single", "a/b")
    t.subscribe("lead", "/a")
    t.subscribe("trail", "a/")
    assert subs_of(t.match("a//b")) == ["double"]
    assert subs_of(t.match("a/b")) == ["single"]
    assert subs_of(t.match("/a")) == ["lead"]
    assert subs_of(t.match("a/")) == ["trail"]
    assert t.match("a") == []


def test_MQTT_4_7_2_1_wildcard_first_level_skips_dollar_topics(trie):
    t = trie.TopicTrie()
    for f in ("#", "+/monitor/Clients", "+/#", "+"):
        t.subscribe(f, f)
    t.subscribe("sys-hash", "$SYS/#")
    t.subscribe("sys-plus", "$SYS/monitor/+")
    t.subscribe("dollar", "$")
    assert subs_of(t.match("$SYS/monitor/Clients")) == ["sys-hash", "sys-plus"]
    assert subs_of(t.match("$")) == ["dollar"]
    assert t.match("$other") == []
    # A '$' that is not the first character is ordinary.
    assert subs_of(t.match("a$/monitor/Clients")) == ["#", "+/#", "+/monitor/Clients"]
    # Only the first level is special: '+' later in the filter matches '$x'.
    t.subscribe("later", "$SYS/+")
    assert "later" in subs_of(t.match("$SYS/$x"))


def test_MQTT_4_7_2_1_applies_to_shared_filters_too(trie):
    t = trie.TopicTrie()
    t.subscribe("m", "$share/g/#")
    assert t.match("$SYS/x") == []
    assert subs_of(t.match("x")) == ["m"]


@pytest.mark.parametrize("bad", ["a/+", "#", "a/#", "+", "a+b"])
def test_MQTT_3_3_2_2_wildcards_in_topic_name_rejected(trie, bad):
    with pytest.raises(MalformedPacket) as err:
        trie.TopicTrie().match(bad)
    assert err.value.reason_code == 0x90


def test_MQTT_4_7_3_1_empty_topic_name_rejected(trie):
    with pytest.raises(MalformedPacket) as err:
        trie.TopicTrie().match("")
    assert err.value.reason_code == 0x90


def test_topic_names_are_case_sensitive(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "ACCOUNTS")
    assert t.match("accounts") == []
    assert subs_of(t.match("ACCOUNTS")) == ["c"]


def test_deep_topics(trie):
    t = trie.TopicTrie()
    deep = "/".join(["l"] * 5000)
    t.subscribe("exact", deep)
    t.subscribe("plus", "/".join(["+"] * 5000))
    t.subscribe("hash", "l/#")
    assert subs_of(t.match(deep)) == ["exact", "hash", "plus"]
    assert t.unsubscribe("exact", deep)
    assert t.unsubscribe("plus", "/".join(["+"] * 5000))


# -- options ---------------------------------------------------------------------


def test_MQTT_3_8_4_3_resubscribe_replaces_options(trie):
    t = trie.TopicTrie()
    assert t.subscribe("c", "a/b", qos=0, subscription_id=1) is True
    assert t.subscribe("c", "a/b", qos=2, retain_as_published=True, retain_handling=1,
                       subscription_id=9) is False
    assert len(t) == 1
    assert t.subscriptions("c") == [("a/b", 2, False, True, 1, 9)]
    assert t.match("a/b") == [("c", 2, True, (9,))]
    # Replacing again with no subscription id drops the id.
    t.subscribe("c", "a/b", qos=1)
    assert t.match("a/b") == [("c", 1, False, ())]


def test_MQTT_3_3_4_3_overlapping_subscriptions_merge_to_highest_qos(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "a/+", qos=1)
    t.subscribe("c", "a/#", qos=2)
    t.subscribe("c", "a/b", qos=0)
    t.subscribe("d", "a/b", qos=0)
    assert by_sub(t.match("a/b")) == {"c": (2, False, ()), "d": (0, False, ())}


def test_MQTT_3_3_4_4_and_5_every_subscription_identifier(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "a/+", subscription_id=7)
    t.subscribe("c", "a/#", subscription_id=3)
    t.subscribe("c", "+/b")                       # no identifier
    t.subscribe("c", "#", subscription_id=7)      # same id twice: listed once
    t.subscribe("d", "a/b", subscription_id=1)
    got = by_sub(t.match("a/b"))
    assert got["c"] == (0, False, (3, 7))
    assert got["d"] == (0, False, (1,))
    assert by_sub(t.match("z/b"))["c"] == (0, False, (7,))


def test_retain_as_published_merged_with_any(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "a/+", retain_as_published=True)
    t.subscribe("c", "a/b", qos=1)
    assert t.match("a/b") == [("c", 1, True, ())]


def test_MQTT_3_8_3_3_no_local_skips_the_publisher(trie):
    t = trie.TopicTrie()
    t.subscribe("me", "a/b", no_local=True, qos=1)
    t.subscribe("other", "a/b", no_local=True)
    assert subs_of(t.match("a/b", publisher="me")) == ["other"]
    assert subs_of(t.match("a/b", publisher="other")) == ["me"]
    assert subs_of(t.match("a/b")) == ["me", "other"]
    assert subs_of(t.match("a/b", publisher="stranger")) == ["me", "other"]


def test_no_local_only_drops_the_no_local_subscriptions(trie):
    t = trie.TopicTrie()
    t.subscribe("me", "a/b", no_local=True, qos=2, subscription_id=1)
    t.subscribe("me", "a/+", qos=1, subscription_id=2)
    # The '+' subscription still delivers, with its own QoS and id only.
    assert t.match("a/b", publisher="me") == [("me", 1, False, (2,))]


def test_MQTT_3_8_3_4_no_local_on_shared_is_protocol_error(trie):
    t = trie.TopicTrie()
    with pytest.raises(MalformedPacket) as err:
        t.subscribe("c", "$share/g/a", no_local=True)
    assert err.value.reason_code == 0x82
    assert len(t) == 0
    assert t.subscriptions("c") == []


# -- shared subscriptions ------------------------------------------------------------


@pytest.mark.parametrize("bad", ["$share//a", "$share/", "$share/g", "$share/g/",
                                 "$share/g+/a", "$share/#/a", "$share/a#b/c"])
def test_MQTT_4_8_2_1_and_2_share_name_rules(trie, bad):
    with pytest.raises(MalformedPacket) as err:
        trie.TopicTrie().subscribe("c", bad)
    assert err.value.reason_code == 0x8F


def test_share_prefix_needs_the_slash(trie):
    # "$share" and "$sharex/..." are ordinary filters.
    t = trie.TopicTrie()
    t.subscribe("c", "$share")
    t.subscribe("d", "$sharex/g/a")
    assert subs_of(t.match("$share")) == ["c"]
    assert subs_of(t.match("$sharex/g/a")) == ["d"]


def test_shared_group_round_robin_is_exact_and_in_subscription_order(trie):
    t = trie.TopicTrie()
    for m in ("m1", "m2", "m3"):
        t.subscribe(m, "$share/g/jobs/+", qos=1)
    got = [t.match("jobs/x")[0][0] for _ in range(9)]
    assert got == ["m1", "m2", "m3"] * 3


def test_shared_round_robin_after_member_leaves(trie):
    t = trie.TopicTrie()
    for m in ("m1", "m2", "m3", "m4"):
        t.subscribe(m, "$share/g/j")
    assert [t.match("j")[0][0] for _ in range(2)] == ["m1", "m2"]
    t.unsubscribe("m2", "$share/g/j")
    # Cursor is at position 2, now "m4"; members keep their order.
    assert [t.match("j")[0][0] for _ in range(4)] == ["m4", "m1", "m3", "m4"]


def test_shared_groups_independent_of_each_other_and_normal_subs(trie):
    t = trie.TopicTrie()
    t.subscribe("a1", "$share/A/s/+", qos=1, subscription_id=4)
    t.subscribe("a2", "$share/A/s/+", qos=1)
    t.subscribe("b1", "$share/B/s/#", qos=2)
    t.subscribe("n", "s/x")
    t.subscribe("a1", "s/x", qos=0)   # a member can also hold a normal subscription
    counts = {}
    for _ in range(10):
        d = t.match("s/x")
        normal = [x for x in d if x[0] in ("n",) or (x[0] == "a1" and x[1] == 0)]
        assert sorted(x[0] for x in normal) == ["a1", "n"]
        shared = [x for x in d if x not in normal]
        assert len(shared) == 2  # one per group
        for x in shared:
            counts[x[0]] = counts.get(x[0], 0) + 1
    assert counts == {"a1": 5, "a2": 5, "b1": 10}


def test_shared_delivery_carries_member_options(trie):
    t = trie.TopicTrie()
    t.subscribe("a1", "$share/A/s", qos=2, retain_as_published=True, subscription_id=9)
    assert t.match("s") == [("a1", 2, True, (9,))]


def test_same_share_name_different_filters_are_different_groups(trie):
    t = trie.TopicTrie()
    t.subscribe("x", "$share/g/a/+")
    t.subscribe("y", "$share/g/a/b")
    assert subs_of(t.match("a/b")) == ["x", "y"]


def test_shared_groups_listed_after_normal_deliveries(trie):
    t = trie.TopicTrie()
    t.subscribe("s", "$share/g/a")
    t.subscribe("n1", "a")
    t.subscribe("n2", "#")
    assert t.match("a")[-1][0] == "s"


def test_share_policy_callable(trie):
    t = trie.TopicTrie()
    seen = []

    def last_member(name, topic_filter, members):
        seen.append((name, topic_filter, list(members)))
        return members[-1]

    t.subscribe("m1", "$share/g/a/#")
    t.subscribe("m2", "$share/g/a/#")
    t.set_share_policy(last_member)
    assert subs_of(t.match("a/b")) == ["m2"]
    assert seen == [("g", "a/#", ["m1", "m2"])]
    t.set_share_policy(lambda *a: None)       # None skips the group
    assert t.match("a/b") == []
    t.set_share_policy(lambda *a: "stranger")
    with pytest.raises(ValueError):
        t.match("a/b")
    t.set_share_policy("round_robin")
    assert subs_of(t.match("a/b")) == ["m1"]


def test_share_policy_random_picks_members(trie):
    t = trie.TopicTrie()
    t.set_share_policy("random")
    for m in ("m1", "m2", "m3"):
        t.subscribe(m, "$share/g/a")
    picked = {t.match("a")[0][0] for _ in range(200)}
    assert picked == {"m1", "m2", "m3"}
    with pytest.raises(ValueError):
        t.set_share_policy("fastest")
    with pytest.raises(TypeError):
        t.set_share_policy(3)


def test_policy_callable_may_change_the_trie(trie):
    t = trie.TopicTrie()
    t.subscribe("m1", "$share/g/a")
    t.subscribe("m2", "$share/h/a")

    def evict(name, topic_filter, members):
        t.remove_subscriber("m1")
        t.remove_subscriber("m2")
        return members[0]

    t.set_share_policy(evict)
    assert subs_of(t.match("a")) == ["m1", "m2"]
    assert len(t) == 0


@pytest.mark.parametrize("extra", [0, 40], ids=["few-subscriptions", "many-subscriptions"])
def test_unsubscribe_finds_exactly_the_filter_given(trie, extra):
    # The compiled trie finds a few-subscription client's filter among its own
    # subscriptions (matching each node's path upward) and walks from the root
    # for a client with many; both must tell apart filters that share their
    # last level, differ only by an empty level, or by a $share prefix.
    t = trie.TopicTrie()
    for i in range(extra):
        t.subscribe("c", f"pad/{i}")
    similar = ["a/x", "b/x", "x", "a//x", "/x", "a/+/x", "$share/g/a/x", "$share/h/a/x",
               "$share/g/x", "a/x/#", "+/x"]
    for f in similar:
        t.subscribe("c", f, qos=1)
    assert t.unsubscribe("c", "q/x") is False
    assert t.unsubscribe("c", "a/a/x") is False
    assert t.unsubscribe("c", "$share/q/a/x") is False
    assert t.unsubscribe("c", "a") is False
    left = list(similar)
    for f in ["$share/g/a/x", "a//x", "x", "+/x", "a/x", "/x", "$share/g/x", "b/x",
              "a/x/#", "$share/h/a/x", "a/+/x"]:
        assert t.unsubscribe("c", f) is True, f
        assert t.unsubscribe("c", f) is False, f
        left.remove(f)
        assert sorted(s[0] for s in t.subscriptions("c") if not s[0].startswith("pad/")) == sorted(left)
    assert len(t) == extra


def test_no_local_with_equal_copies_of_the_subscriber(trie):
    # A broker passes equal, not identical, objects (a client id decoded from
    # each packet): no_local [MQTT-3.8.3-3] must still recognise the publisher
    # when its subscriptions were made with different copies.
    t = trie.TopicTrie()

    def fresh():
        return "".join(["s", "0"])

    t.subscribe(fresh(), "$share/g1/#")
    t.subscribe(fresh(), "#", no_local=True)
    t.subscribe(fresh(), "a", qos=1)
    assert by_sub(t.match("b", fresh())) == {"s0": (0, False, ())}  # the group only
    d = t.match("a", fresh())
    assert sorted(x[1] for x in d) == [0, 1]    # "a" (qos 1) and the group; '#' left out


# -- pruning ------------------------------------------------------------------------------


def test_unsubscribe_prunes_emptied_nodes(trie):
    t = trie.TopicTrie()
    t.subscribe("keep", "a/b")
    base = t.node_count()
    assert base == 2
    for f in ("a/b/c/d", "a/+/#", "x/y/z", "$share/g/a/b/q", "a//b", "#"):
        t.subscribe("tmp", f)
    assert t.node_count() > base
    for f in ("a/b/c/d", "a/+/#", "x/y/z", "$share/g/a/b/q", "a//b", "#"):
        assert t.unsubscribe("tmp", f)
    assert t.node_count() == base
    t.remove_subscriber("keep")
    assert t.node_count() == 0


def test_many_children_grow_and_shrink(trie):
    # Crosses the compiled module's switch from a small array to a hash table
    # and back, with removals in an order that exercises probe-chain repair.
    t = trie.TopicTrie()
    names = [f"n{i}" for i in range(500)]
    for i, n in enumerate(names):
        t.subscribe(i % 7, f"root/{n}")
    for n in names[::3]:
        assert t.unsubscribe(names.index(n) % 7, f"root/{n}")
    for i, n in enumerate(names):
        expect = [] if i % 3 == 0 else [i % 7]
        assert subs_of(t.match(f"root/{n}")) == expect
    for i, n in enumerate(names):
        if i % 3:
            assert t.unsubscribe(i % 7, f"root/{n}")
    assert t.node_count() == 0 and len(t) == 0


def test_many_subscribers_on_one_node(trie):
    t = trie.TopicTrie()
    for i in range(300):
        t.subscribe(i, "hot", qos=i % 3)
    for i in range(0, 300, 2):
        assert t.unsubscribe(i, "hot")
    got = by_sub(t.match("hot"))
    assert got == {i: (i % 3, False, ()) for i in range(1, 300, 2)}
    # Re-subscribing finds the existing entry (replace, not add).
    for i in range(1, 300, 2):
        assert t.subscribe(i, "hot", qos=2) is False
    assert len(t) == 150


def test_share_name_equal_to_a_level_is_kept_apart(trie):
    # The compiled trie keeps group nodes in the same child table as levels.
    t = trie.TopicTrie()
    t.subscribe("literal", "a/b")
    t.subscribe("member", "$share/b/a")
    assert subs_of(t.match("a/b")) == ["literal"]
    assert subs_of(t.match("a")) == ["member"]
    assert t.unsubscribe("literal", "a/b")
    assert subs_of(t.match("a")) == ["member"]
    assert t.match("a/b") == []
    assert t.unsubscribe("member", "$share/b/a")
    assert t.node_count() == 0


def test_many_groups_on_one_filter(trie):
    t = trie.TopicTrie()
    for g in range(40):
        t.subscribe(f"m{g}", f"$share/g{g}/x/+")
        t.subscribe(f"n{g}", f"x/g{g}")         # literal siblings in the same table
    got = subs_of(t.match("x/g3"))
    assert got == sorted([f"m{g}" for g in range(40)] + ["n3"])
    for g in range(0, 40, 2):
        assert t.unsubscribe(f"m{g}", f"$share/g{g}/x/+")
    assert subs_of(t.match("x/y")) == sorted(f"m{g}" for g in range(1, 40, 2))


def test_unhashable_publisher_is_not_a_subscriber(trie):
    t = trie.TopicTrie()
    t.subscribe("c", "a", no_local=True)
    assert subs_of(t.match("a", publisher=["not", "hashable"])) == ["c"]


def test_subscriber_with_custom_equality(trie):
    # Equal objects are the same subscriber, whatever their identity.
    class Client:
        def __init__(self, cid):
            self.cid = cid

        def __eq__(self, other):
            return isinstance(other, Client) and other.cid == self.cid

        def __hash__(self):
            return hash(self.cid) & 0xF   # many collisions on purpose

    t = trie.TopicTrie()
    for i in range(50):
        t.subscribe(Client(i), "a/+")
    assert t.subscribe(Client(7), "a/+", qos=2) is False
    assert len(t) == 50
    assert t.unsubscribe(Client(8), "a/+") is True
    assert sorted(d[0].cid for d in t.match("a/b")) == [i for i in range(50) if i != 8]
    assert t.remove_subscriber(Client(9)) == 1
    assert t.subscriptions(Client(7)) == [("a/+", 2, False, False, 0, 0)]


def test_eq_that_changes_the_trie_does_not_corrupt_it(trie):
    t = trie.TopicTrie()
    calls = []

    class Meddler:
        def __init__(self, n):
            self.n = n

        def __hash__(self):
            return 1

        def __eq__(self, other):
            if not calls:
                calls.append(1)
                for i in range(40):     # grows the compiled subscriber table
                    t.subscribe(f"extra{i}", "z")
            return isinstance(other, Meddler) and other.n == self.n

    assert t.subscribe(Meddler(1), "a")
    assert t.subscribe(Meddler(2), "a")
    assert calls
    assert len(t) == 42
    assert sorted(d[0].n for d in t.match("a")) == [1, 2]
    assert t.remove_subscriber(Meddler(1)) == 1
    assert len(t.match("z")) == 40


@pytest.mark.parametrize("where", ["subscribe", "unsubscribe", "match"])
def test_reentrant_eq_during_lookup(trie, where):
    # User __eq__ runs in the middle of subscribe/unsubscribe/match (the
    # compiled trie overlaps the subscriber lookup with its walk); whatever it
    # does to the trie, the outer call must see a consistent trie.
    t = trie.TopicTrie()
    armed = []

    class Peer:
        def __init__(self, n):
            self.n = n

        def __hash__(self):
            return 7

        def __eq__(self, other):
            if armed:
                armed.clear()
                t.match("a/b")                      # re-enters the match scratch
                t.remove_subscriber("victim")       # prunes nodes on the same path
                t.subscribe("late", "a/+")
            return isinstance(other, Peer) and other.n == self.n

    t.subscribe("victim", "a/b")
    t.subscribe("victim", "a/b/c")
    t.subscribe(Peer(1), "a/b", no_local=True)
    armed.append(1)
    if where == "subscribe":
        assert t.subscribe(Peer(2), "a/b/c") is True
        assert {d[0] if isinstance(d[0], str) else d[0].n for d in t.match("a/b/c")} == {2}
    elif where == "unsubscribe":
        assert t.unsubscribe(Peer(2), "a/b") is False
        assert t.unsubscribe(Peer(1), "a/b") is True
    else:
        got = t.match("a/b", publisher=Peer(1))
        # Peer(1)'s no_local subscription is skipped; the victim is gone and
        # "late" arrived before the walk was redone.
        assert [d[0] for d in got] == ["late"]
    assert not armed
    assert "victim" not in [d[0] for d in t.match("a/b")]
    assert t.subscriptions("late") == [("a/+", 0, False, False, 0, 0)]
    for sub in ["late", Peer(1), Peer(2)]:
        t.remove_subscriber(sub)
    assert len(t) == 0 and t.node_count() == 0


def test_none_is_a_subscriber_like_any_other(trie):
    # publisher=None means "no publisher", not "the subscriber None".
    t = trie.TopicTrie()
    t.subscribe(None, "a", no_local=True)
    assert t.match("a") == [(None, 0, False, ())]
    assert t.subscriptions(None) == [("a", 0, True, False, 0, 0)]
    assert t.remove_subscriber(None) == 1


# -- references and memory ----------------------------------------------------------


class _Obj:
    """A weak-referenceable, hashable subscriber."""


def test_subscriber_references_are_released(trie):
    import gc
    import weakref

    t = trie.TopicTrie()
    a, b, c = _Obj(), _Obj(), _Obj()
    refs = [weakref.ref(x) for x in (a, b, c)]
    t.subscribe(a, "x/+")
    t.subscribe(a, "$share/g/x/#")
    t.subscribe(b, "x/y")
    t.subscribe(c, "#")
    assert len(t.match("x/y")) == 4
    t.remove_subscriber(a)
    t.unsubscribe(b, "x/y")
    del a, b
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
    assert refs[2]() is c
    del c
    del t
    gc.collect()
    assert refs[2]() is None


def test_retained_messages_are_released(trie):
    import gc
    import weakref

    s = trie.RetainedStore()
    msgs = [_Obj() for _ in range(4)]
    refs = [weakref.ref(m) for m in msgs]
    s.set("a", msgs[0])
    s.set("a", msgs[1])                    # replaces msgs[0]
    s.set("b", msgs[2], expires_at=1.0)
    s.set("c", msgs[3])
    s.match("#", now=2.0)                  # expires msgs[2]
    s.delete("c")
    del msgs
    gc.collect()
    assert [r() is None for r in refs] == [True, False, True, True]
    del s
    gc.collect()
    assert refs[1]() is None


def test_no_memory_growth_over_subscribe_unsubscribe_cycles(trie):
    # PyMem allocations (the compiled trie's nodes, tables and arrays) are
    # traced by tracemalloc: a full cycle must give all of them back.
    import gc
    import random
    import tracemalloc

    rng = random.Random(5)
    levels = ["a", "b", "c", "+", ""] + [f"n{i}" for i in range(60)]
    filters = sorted({"/".join(rng.choice(levels) for _ in range(rng.randint(1, 5)))
                      + rng.choice(["", "/#"]) for _ in range(1500)} - {""})
    subs = [(i % 97, f if i % 5 else f"$share/g{i % 3}/{f}") for i, f in enumerate(filters)]
    t = trie.TopicTrie()
    st = trie.RetainedStore()

    def cycle():
        for s, f in subs:
            t.subscribe(s, f, qos=1, subscription_id=s + 1)
            st.set(f.replace("+", "p").replace("#", "h"), s)
        for _ in range(50):
            t.match("a/b/n3")
        for s, f in subs:
            t.unsubscribe(s, f)
            st.delete(f.replace("+", "p").replace("#", "h"))

    cycle()
    tracemalloc.start()
    try:
        cycle()
        gc.collect()    # the Python trie's pruned nodes are parent<->child cycles
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            cycle()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(t) == 0 and t.node_count() == 0 and len(st) == 0
    assert grown < 4096, grown


def test_cycle_through_the_trie_is_collected(trie):
    # A subscriber that refers back to its trie (a session holding the broker)
    # must not make an uncollectable cycle.
    import gc
    import weakref

    t = trie.TopicTrie()
    s = _Obj()
    s.trie = t
    t.subscribe(s, "a/+")
    t.subscribe(s, "$share/g/a/#")
    t.set_share_policy(lambda name, f, members: members[0])
    refs = weakref.ref(s)
    del s, t
    gc.collect()
    assert refs() is None


def test_share_policy_callable_delivery_carries_chosen_members_options(trie):
    t = trie.TopicTrie()
    t.subscribe("m1", "$share/g/a", qos=0)
    t.subscribe("m2", "$share/g/a", qos=2, retain_as_published=True, subscription_id=11)
    t.subscribe("m3", "$share/g/a", qos=1, subscription_id=12)
    for pick, expected in [("m2", ("m2", 2, True, (11,))), ("m3", ("m3", 1, False, (12,))),
                           ("m1", ("m1", 0, False, ()))]:
        t.set_share_policy(lambda name, f, members, pick=pick: pick)
        assert t.match("a") == [expected]


def test_equal_temporaries_never_alias_through_the_lookup_cache(trie):
    # Regression: the compiled trie once cached the *argument* of the last
    # lookup; a freed equal temporary's address, reused by the next temporary,
    # then named the wrong subscriber. Many short-lived equal objects make
    # address reuse near certain.
    class Key:
        __slots__ = ("k",)

        def __init__(self, k):
            self.k = k

        def __eq__(self, other):
            return isinstance(other, Key) and other.k == self.k

        def __hash__(self):
            return hash(self.k)

    t = trie.TopicTrie()
    keep = [Key(i) for i in range(20)]
    for k in keep:
        t.subscribe(k, "a")
    for rnd in range(300):
        i, j = rnd % 20, (rnd * 7 + 3) % 20
        assert t.subscribe(Key(i), "a", qos=rnd % 3) is False   # replace via a temporary
        assert t.unsubscribe(Key(j), "a") is True               # another temporary
        assert sorted(d[0].k for d in t.match("a")) == sorted(set(range(20)) - {j})
        assert t.subscribe(Key(j), "a") is True
    assert len(t) == 20


_DEBUG_WORKLOAD = r'''
import random
import fastmqtt._trie as c
import fastmqtt._trie_py as p

rng = random.Random(11)
levels = ["a", "b", "", "$x", "\u00fc", "+"] + ["n%d" % i for i in range(40)]
tc, tp = c.TopicTrie(), p.TopicTrie()
rc, rp = c.RetainedStore(), p.RetainedStore()
subs = ["s%d" % i for i in range(30)]
for step in range(6000):
    f = "/".join(rng.choice(levels) for _ in range(rng.randint(1, 6))) or "a"
    if rng.random() < 0.3:
        f += "/#"
    if rng.random() < 0.15:
        f = "$share/g%d/%s" % (rng.randint(0, 2), f)
    s = "".join(rng.choice(subs))           # a fresh equal str each time
    op = rng.random()
    if op < 0.5:
        a = tc.subscribe(s, f, qos=rng.randint(0, 2), subscription_id=rng.randint(0, 3))
        b = tp.subscribe(s, f, qos=0)
        assert a == b
    elif op < 0.8:
        assert tc.unsubscribe(s, f) == tp.unsubscribe(s, f)
    elif op < 0.85:
        assert tc.remove_subscriber(s) == tp.remove_subscriber(s)
    else:
        topic = f.replace("$share/", "").replace("+", "x").replace("#", "y")
        assert sorted(d[0] for d in tc.match(topic)) == sorted(d[0] for d in tp.match(topic))
        rc.set(topic, step, expires_at=step + 50)
        rp.set(topic, step, expires_at=step + 50)
        flt = f.split("$share/", 1)[-1]
        assert sorted(rc.match(flt, now=step)) == sorted(rp.match(flt, now=step))
    assert len(tc) == len(tp)
for s in subs:
    tc.remove_subscriber(s)
assert len(tc) == 0 and tc.node_count() == 0
print("ok")
'''


def test_compiled_trie_under_the_debug_allocator():
    # PYTHONMALLOC=debug puts guard bytes around every PyMem block and checks
    # them on free: a write past any node, table or array fails this run.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DEBUG_WORKLOAD], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ,
                                                      "PYTHONMALLOC": "debug"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
