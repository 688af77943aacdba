"""Chat-workload corpus for the trie benchmarks, the plain-Python baseline, and a
fresh-process measurement (``python bench/trie_corpus.py IMPL SIZE``, IMPL one of
``c``, ``py``, ``dict`` or ``floor``).

The workload follows /work/shared/CHAT.md: workspaces x channels x users with
topics ``chat/{ws}/channel/{uuid}``, ``chat/{ws}/dm/{gid}``,
``chat/{ws}/user/{uuid}``. Per workspace of 100 users:

* each user: its own user topic, 4 of the 20 channels, 2 DMs (exact filters);
* 2 admins on ``chat/{ws}/channel/+``, 1 auditor on ``chat/{ws}/#``;
* 2 workers in ``$share/workers/chat/{ws}/#``;
* a notifier on ``chat/+/user/{uuid}`` for 10 of the users;
* and, once, 3 monitors on ``#``.

That is ~715 subscriptions per workspace; a publish (60 % channel, 25 % DM,
15 % user topics) reaches ~19 subscribers on average.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time

USERS_PER_WS = 100
CHANNELS_PER_WS = 20
CHANNELS_PER_USER = 4
DMS_PER_WS = 100          # 2 members each, so 2 DMs per user
SUBS_PER_WS = 715


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Corpus:
    """Subscriptions ``(subscriber, filter, qos)`` and publish topics for ~``size`` subscriptions."""

    def __init__(self, size: int, seed: int = 1, publishes: int = 20_000):
        rng = random.Random(seed)
        self.subscriptions: list[tuple[str, str, int]] = []
        self.topics: list[str] = []
        subs = self.subscriptions
        workspaces = max(1, round(size / SUBS_PER_WS))
        ws_topics = []
        for w in range(workspaces):
            ws = f"ws{w}"
            channels = [f"chat/{ws}/channel/{_uuid(rng)}" for _ in range(CHANNELS_PER_WS)]
            dms = [f"chat/{ws}/dm/{_uuid(rng)}" for _ in range(DMS_PER_WS)]
            users = [_uuid(rng) for _ in range(USERS_PER_WS)]
            user_topics = [f"chat/{ws}/user/{u}" for u in users]
            for i, u in enumerate(users):
                client = f"web-{ws}-{i}"
                subs.append((client, user_topics[i], 1))
                for c in rng.sample(channels, CHANNELS_PER_USER):
                    subs.append((client, c, 1))
                for d in (dms[i], dms[(i + 37) % DMS_PER_WS]):
                    subs.append((client, d, 1))
            subs.append((f"admin-{ws}-0", f"chat/{ws}/channel/+", 1))
            subs.append((f"admin-{ws}-1", f"chat/{ws}/channel/+", 0))
            subs.append((f"audit-{ws}", f"chat/{ws}/#", 1))
            subs.append(("worker-0", f"$share/workers/chat/{ws}/#", 1))
            subs.append(("worker-1", f"$share/workers/chat/{ws}/#", 1))
            for u in users[:10]:
                subs.append(("notifier", f"chat/+/user/{u}", 1))
            ws_topics.append((channels, dms, user_topics))
        for m in range(3):
            subs.append((f"monitor-{m}", "#", 0))
        for _ in range(publishes):
            channels, dms, user_topics = rng.choice(ws_topics)
            r = rng.random()
            pool = channels if r < 0.60 else dms if r < 0.85 else user_topics
            self.topics.append(rng.choice(pool))
        rng.shuffle(subs)


class DictTrie:
    """The trie a Python developer would write: nested dicts, one per level.

    Subscribers of a filter live under the ``None`` key of its node as
    ``{subscriber: qos}``. Matching merges per subscriber with the highest QoS.
    Shared subscriptions are not special here (the baseline is deliberately
    plain); ``$`` topics skip first-level wildcards as the spec requires.
    """

    def __init__(self):
        self.root: dict = {}
        self.count = 0

    def subscribe(self, subscriber, topic_filter: str, qos: int = 0) -> None:
        node = self.root
        for level in topic_filter.split("/"):
            node = node.setdefault(level, {})
        subs = node.setdefault(None, {})
        if subscriber not in subs:
            self.count += 1
        subs[subscriber] = qos

    def unsubscribe(self, subscriber, topic_filter: str) -> bool:
        path = [self.root]
        for level in topic_filter.split("/"):
            node = path[-1].get(level)
            if node is None:
                return False
            path.append(node)
        subs = path[-1].get(None)
        if not subs or subscriber not in subs:
            return False
        del subs[subscriber]
        self.count -= 1
        if not subs:
            del path[-1][None]
        levels = topic_filter.split("/")
        for i in range(len(levels), 0, -1):  # prune empty nodes
            if path[i]:
                break
            del path[i - 1][levels[i - 1]]
        return True

    def match(self, topic: str) -> dict:
        levels = topic.split("/")
        out: dict = {}
        n = len(levels)

        def add(node):
            for sub, qos in node.get(None, {}).items():
                if out.get(sub, -1) < qos:
                    out[sub] = qos

        def walk(node, i):
            wild = not (i == 0 and topic.startswith("$"))
            if wild and "#" in node:
                add(node["#"])
            if i == n:
                add(node)
                return
            child = node.get(levels[i])
            if child is not None:
                walk(child, i + 1)
            if wild and "+" in node:
                walk(node["+"], i + 1)

        walk(self.root, 0)
        return out

    def __len__(self):
        return self.count


def make_trie(impl: str):
    """A fresh trie by name: ``c`` (compiled), ``py`` (reference), ``dict`` (baseline)."""
    if impl == "c":
        from fastmqtt._trie import TopicTrie
        return TopicTrie()
    if impl == "py":
        from fastmqtt._trie_py import TopicTrie
        return TopicTrie()
    if impl == "dict":
        return DictTrie()
    raise ValueError(impl)


def _clock() -> float:
    # CPU time of this process: the benchmark machine is shared, and wall time
    # would count the time other processes hold the core.
    return time.process_time()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(impl: str, size: int, publishes: int = 20_000, unsubscribes: int = 100_000) -> dict:
    """Build, match and tear down one trie; rates per second and RSS bytes per subscription.

    Meant to run in a fresh process (see ``__main__``) so the RSS delta is the
    trie's own: the corpus (subscriber and filter strings) exists before the
    first RSS reading.
    """
    corpus = Corpus(size, publishes=publishes)
    subs = corpus.subscriptions
    topics = corpus.topics
    gc.collect()
    gc.disable()  # the collector's pauses are not the trie's cost
    trie = make_trie(impl)
    rss0 = _rss()
    t0 = _clock()
    subscribe = trie.subscribe
    for sub, f, q in subs:
        subscribe(sub, f, q)
    t_sub = _clock() - t0
    rss1 = _rss()
    deliveries = 0
    match = trie.match
    t0 = _clock()
    for topic in topics:
        deliveries += len(match(topic))
    t_match = _clock() - t0
    n_unsub = min(unsubscribes, len(subs))
    gone = subs[:n_unsub]
    t0 = _clock()
    for sub, f, _ in gone:
        trie.unsubscribe(sub, f)
    t_unsub = _clock() - t0
    gc.enable()
    return {
        "impl": impl,
        "size": len(subs),
        "subscribe_per_s": len(subs) / t_sub,
        "match_per_s": len(topics) / t_match,
        "matches_per_publish": deliveries / len(topics),
        "unsubscribe_per_s": n_unsub / t_unsub,
        "bytes_per_sub": (rss1 - rss0) / len(subs),
    }


def measure_floor(size: int, publishes: int = 20_000) -> dict:
    """The match rate of bench/trie_floor.pyx on this corpus: a matcher with no
    matching work at all (one dict probe for the precomputed answer, then the
    fresh list of fresh tuples that ``match`` returns). No trie can beat it, so
    its ratio to the dict trie is the most any trie with this API can reach here.
    """
    import tempfile

    import pyximport

    pyximport.install(language_level=3, build_dir=tempfile.mkdtemp(prefix="trie-floor-"),
                      setup_args={"script_args": ["--quiet"]})
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from trie_floor import Floor

    corpus = Corpus(size, publishes=publishes)
    trie = make_trie("c")
    for sub, f, q in corpus.subscriptions:
        trie.subscribe(sub, f, q)
    # The real answers (the subscriber objects the trie stores), once per topic.
    floor = Floor({t: tuple(d[0] for d in trie.match(t)) for t in set(corpus.topics)})
    topics = corpus.topics
    gc.collect()
    gc.disable()
    deliveries = 0
    match = floor.match
    t0 = _clock()
    for topic in topics:
        deliveries += len(match(topic))
    t_match = _clock() - t0
    gc.enable()
    return {"impl": "floor", "size": len(corpus.subscriptions),
            "match_per_s": len(topics) / t_match,
            "matches_per_publish": deliveries / len(topics)}


def measure_in_subprocess(impl: str, size: int, timeout: float = 900) -> dict:
    """Run :func:`measure` in a fresh interpreter and return its result."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, impl, str(size)], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"measure {impl} {size} exited with {out.returncode}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1] == "floor":
        print(json.dumps(measure_floor(int(sys.argv[2]))))
    else:
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
