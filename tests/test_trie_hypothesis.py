"""Property tests: the trie agrees with a naive matcher and with a plain model.

The oracle is ``fastmqtt.topics.topic_matches``, written from the
specification's wording, applied to every live subscription of a dict model.
Each test runs on both implementations (``trie`` fixture), and one test runs
the compiled and the Python trie side by side on the same operations.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmqtt._trie as compiled
import fastmqtt._trie_py as reference
from fastmqtt.topics import split_shared, topic_matches

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Few distinct level strings so that random filters and topics collide often;
# '$' levels, an empty level and a non-ASCII one are in the mix.
LEVELS = ["a", "b", "", "$SYS", "$x", "ü", "a$"]
SUBSCRIBERS = ["s0", "s1", "s2", 1_000_003, ("t", 4)]


def _fresh(x):
    """An equal object that is not the same object, as a broker would pass."""
    if isinstance(x, str):
        return "".join(list(x))
    if isinstance(x, int):
        return int(str(x))
    return tuple(list(x))


# Subscribers are drawn as fresh equal copies, so the tries must go by
# equality, never by identity of the argument.
subscribers = st.sampled_from(SUBSCRIBERS).map(_fresh)

topic_levels = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5)
topics = topic_levels.map("/".join).filter(bool)


@st.composite
def filters(draw, shared=None):
    levels = draw(st.lists(st.sampled_from(LEVELS + ["+", "+"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    text = "/".join(levels)
    if not text:
        text = "#"
    if shared is None:
        shared = draw(st.integers(0, 4)) == 0
    if shared:
        text = f"$share/{draw(st.sampled_from(['g1', 'g2']))}/{text}"
    return text


@st.composite
def subscriptions(draw):
    f = draw(filters())
    is_shared = f.startswith("$share/")
    return dict(
        subscriber=draw(subscribers),
        topic_filter=f,
        qos=draw(st.integers(0, 2)),
        no_local=False if is_shared else draw(st.booleans()),
        retain_as_published=draw(st.booleans()),
        retain_handling=draw(st.integers(0, 2)),
        subscription_id=draw(st.sampled_from([0, 0, 1, 2, 268_435_455])),
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("sub"), subscriptions()),
        st.tuples(st.just("unsub"), subscribers, filters()),
        st.tuples(st.just("remove"), subscribers),
        st.tuples(st.just("match"), topics, st.one_of(st.none(), subscribers)),
    ),
    max_size=40,
)


def expected_normal(model, topic, publisher):
    """Naive merge over the model's non-shared subscriptions."""
    out = {}
    for (sub, f), o in model.items():
        if f.startswith("$share/") or not topic_matches(f, topic):
            continue
        if o["no_local"] and publisher is not None and sub == publisher:
            continue
        qos, rap, ids = out.get(sub, (0, False, set()))
        out[sub] = (max(qos, o["qos"]), rap or o["retain_as_published"],
                    ids | ({o["subscription_id"]} if o["subscription_id"] else set()))
    return {s: (q, r, tuple(sorted(i))) for s, (q, r, i) in out.items()}


def expected_groups(model, topic):
    """{(share_name, filter): [members]} for every matching shared subscription."""
    groups = {}
    for (sub, f), _ in model.items():
        if f.startswith("$share/") and topic_matches(f, topic):
            groups.setdefault(split_shared(f), []).append(sub)
    return groups


def check_match(t, model, topic, publisher):
    got = t.match(topic, publisher)
    normal_expected = expected_normal(model, topic, publisher)
    groups = expected_groups(model, topic)
    normal = got[:len(normal_expected)]
    shared = got[len(normal_expected):]
    assert {d[0]: d[1:] for d in normal} == normal_expected
    assert len({repr(d[0]) for d in normal}) == len(normal), "one delivery per subscriber"
    # One delivery per matching group, to one of its members, with its options.
    assert len(shared) == len(groups)
    remaining = dict(groups)
    for sub, qos, rap, ids in shared:
        key = next(k for k, members in remaining.items() if sub in members
                   and (qos, rap, ids) == _opts(model, sub, k))
        del remaining[key]
    return got


def _opts(model, sub, key):
    o = model[(sub, f"$share/{key[0]}/{key[1]}")]
    return (o["qos"], o["retain_as_published"],
            (o["subscription_id"],) if o["subscription_id"] else ())


def apply(t, model, op):
    kind = op[0]
    if kind == "sub":
        s = op[1]
        key = (s["subscriber"], s["topic_filter"])
        new = t.subscribe(**s)
        assert new == (key not in model)
        model[key] = s
    elif kind == "unsub":
        _, sub, f = op
        assert t.unsubscribe(sub, f) == ((sub, f) in model)
        model.pop((sub, f), None)
    elif kind == "remove":
        mine = [k for k in model if k[0] == op[1]]
        assert t.remove_subscriber(op[1]) == len(mine)
        for k in mine:
            del model[k]
    else:
        _, topic, publisher = op
        return check_match(t, model, topic, publisher)


def model_subscriptions(model, sub):
    return sorted((f, o["qos"], o["no_local"], o["retain_as_published"], o["retain_handling"],
                   o["subscription_id"]) for (s, f), o in model.items() if s == sub)


@SETTINGS
@given(ops=ops)
def test_trie_agrees_with_naive_model(trie, ops):
    t = trie.TopicTrie()
    model = {}
    for op in ops:
        apply(t, model, op)
        assert len(t) == len(model)
    for sub in SUBSCRIBERS:
        assert sorted(t.subscriptions(sub)) == model_subscriptions(model, sub)
    # Emptying the trie frees every node.
    for sub in SUBSCRIBERS:
        t.remove_subscriber(sub)
    assert len(t) == 0 and t.node_count() == 0


@SETTINGS
@given(base=st.lists(subscriptions(), max_size=15), extra=st.lists(subscriptions(), max_size=15),
       probe=st.lists(topics, min_size=1, max_size=8))
def test_subscribe_then_unsubscribe_restores_state(trie, base, extra, probe):
    t = trie.TopicTrie()
    for s in base:
        t.subscribe(**s)
    taken = {(s["subscriber"], s["topic_filter"]) for s in base}
    extra = [s for s in extra if (s["subscriber"], s["topic_filter"]) not in taken]

    def state():
        # Round robin moves cursors, so shared deliveries are left out here.
        return (len(t), t.node_count(),
                {repr(s): sorted(t.subscriptions(s)) for s in SUBSCRIBERS},
                [sorted(map(repr, t.match(p)[:len(expected_normal(model, p, None))]))
                 for p in probe])

    model = {(s["subscriber"], s["topic_filter"]): s for s in base}
    before = state()
    for s in extra:
        t.subscribe(**s)
    for s in reversed(extra):
        t.unsubscribe(s["subscriber"], s["topic_filter"])
    assert state() == before


@SETTINGS
@given(ops=ops)
def test_compiled_and_python_give_identical_results(ops):
    # Same operations on both: identical return values, including the exact
    # round-robin choice of every shared group (compared as sorted lists since
    # delivery order is unspecified).
    c, p = compiled.TopicTrie(), reference.TopicTrie()
    for op in ops:
        kind = op[0]
        if kind == "sub":
            assert c.subscribe(**op[1]) == p.subscribe(**op[1])
        elif kind == "unsub":
            assert c.unsubscribe(op[1], op[2]) == p.unsubscribe(op[1], op[2])
        elif kind == "remove":
            assert c.remove_subscriber(op[1]) == p.remove_subscriber(op[1])
        else:
            assert sorted(map(repr, c.match(op[1], op[2]))) == \
                sorted(map(repr, p.match(op[1], op[2])))
        assert len(c) == len(p)
        assert c.node_count() == p.node_count()
    for sub in SUBSCRIBERS:
        assert sorted(c.subscriptions(sub)) == sorted(p.subscriptions(sub))


@SETTINGS
@given(members=st.integers(1, 6), groups=st.integers(1, 3), rounds=st.integers(1, 4))
def test_round_robin_distribution_is_exact(trie, members, groups, rounds):
    t = trie.TopicTrie()
    for g in range(groups):
        for m in range(members):
            t.subscribe((g, m), f"$share/g{g}/work/#")
    seen = []
    for _ in range(members * rounds):
        d = t.match("work/item")
        assert len(d) == groups
        seen.extend(x[0] for x in d)
    for g in range(groups):
        mine = [s for s in seen if s[0] == g]
        # Members in subscription order, over and over.
        assert mine == [(g, m) for m in range(members)] * rounds


@SETTINGS
@given(f=st.text(alphabet="ab+#/$\x00ü", max_size=12))
def test_filter_validation_matches_topics_module(trie, f):
    from fastmqtt.errors import MalformedPacket
    from fastmqtt.topics import validate_topic_filter

    try:
        validate_topic_filter(f)
        expected = None
    except MalformedPacket as e:
        expected = e.reason_code
    try:
        trie.TopicTrie().subscribe("c", f)
        got = None
    except MalformedPacket as e:
        got = e.reason_code
    assert got == expected


@SETTINGS
@given(name=st.text(alphabet="ab+#/$\x00", max_size=8))
def test_topic_validation_matches_topics_module(trie, name):
    from fastmqtt.errors import MalformedPacket
    from fastmqtt.topics import validate_topic_name

    try:
        validate_topic_name(name)
        expected = None
    except MalformedPacket as e:
        expected = e.reason_code
    try:
        trie.TopicTrie().match(name)
        got = None
    except MalformedPacket as e:
        got = e.reason_code
    assert got == expected


@pytest.mark.parametrize("impl", [compiled, reference], ids=["trie-c", "trie-py"])
def test_model_helpers_catch_a_wrong_trie(impl):
    # The oracle must be able to fail: a trie that forgets '#' matches the
    # parent level is caught.
    t = impl.TopicTrie()
    model = {}
    apply(t, model, ("sub", dict(subscriber="s0", topic_filter="a/#", qos=0, no_local=False,
                                 retain_as_published=False, retain_handling=0,
                                 subscription_id=0)))
    assert expected_normal(model, "a", None) == {"s0": (0, False, ())}
    with pytest.raises(AssertionError):
        check_match(t, {}, "a", None)
