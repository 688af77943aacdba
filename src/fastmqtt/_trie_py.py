"""Pure-Python reference of the topic trie and retained store (same API as ``_trie``).

Theory of operation
-------------------
A subscription trie has one node per topic-filter level. A node keeps its
literal children in a dict keyed by the level string, plus the special
children ``+`` and ``#`` in the same dict (they are just keys here; the
compiled module keeps them in dedicated slots). Each node holds the normal
subscriptions whose filter ends there (``subscriber -> options``) and the
shared groups ``$share/{name}/{filter}`` whose filter ends there
(``name -> _Group``). A per-subscriber index (``subscriber -> {key: node}``)
makes ``subscriptions`` / ``remove_subscriber`` cost the subscriber's own
subscription count, and lets emptied nodes be pruned on the way back up.

Matching walks the topic's levels once, following at each level the literal
child, the ``+`` child, and collecting the ``#`` child (which also matches the
parent level, [MQTT-4.7.1-2]). At the root a topic starting with ``$`` skips
the wildcard children [MQTT-4.7.2-1]. Cost is the topic depth times the
(bounded) wildcard branching, plus the matches; never the subscription count.

This module is the oracle for the compiled module's differential tests and the
fallback when the extension is missing, so it aims at clarity first.
"""

from __future__ import annotations

import random as _random
from operator import index as _index
from typing import Any, Callable, Hashable, Sequence

from .errors import MalformedPacket

__all__ = ["TopicTrie", "RetainedStore"]

_FILTER_INVALID = 0x8F
_NAME_INVALID = 0x90
_PROTOCOL_ERROR = 0x82
_MAX_UTF8 = 65535
_MAX_SUBSCRIPTION_ID = 268_435_455  # largest Variable Byte Integer
_SHARE_PREFIX = "$share/"
_NOBODY = object()  # "no publisher" in match(), distinct from every subscriber


def _utf8_len(text: str, code: int, what: str) -> int:
    if not isinstance(text, str):
        # Same error as fastmqtt.topics, so callers need one except clause.
        raise MalformedPacket(f"{what} must be str, not {type(text).__name__}", code)
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates cannot be encoded: ill-formed UTF-8 [MQTT-1.5.4-1].
        raise MalformedPacket(f"{what} is not well-formed UTF-8", code) from None
    if n == 0:
        raise MalformedPacket(f"{what} is empty [MQTT-4.7.3-1]", code)
    if n > _MAX_UTF8:
        raise MalformedPacket(f"{what} is longer than 65535 bytes [MQTT-4.7.3-3]", code)
    if "\x00" in text:
        raise MalformedPacket(f"{what} contains U+0000 [MQTT-4.7.3-2]", code)
    return n


def _check_filter_levels(levels: list[str]) -> None:
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            # [MQTT-4.7.1-2] '#' alone in its level, and the last level.
            if level != "#" or i != last:
                raise MalformedPacket("'#' must be the whole last level [MQTT-4.7.1-2]",
                                      _FILTER_INVALID)
        elif "+" in level and level != "+":
            raise MalformedPacket("'+' must be a whole level [MQTT-4.7.1-3]", _FILTER_INVALID)


def _parse_filter(topic_filter: str) -> tuple[str | None, list[str]]:
    """Validate a filter; return (share_name or None, levels of the filter proper)."""
    _utf8_len(topic_filter, _FILTER_INVALID, "topic filter")
    share = None
    rest = topic_filter
    if topic_filter.startswith(_SHARE_PREFIX):
        body = topic_filter[len(_SHARE_PREFIX):]
        slash = body.find("/")
        share = body if slash < 0 else body[:slash]
        # [MQTT-4.8.2-1] a ShareName of at least one character;
        # [MQTT-4.8.2-2] no '/', '+', '#' in it, then '/' and a Topic Filter.
        if not share:
            raise MalformedPacket("empty ShareName [MQTT-4.8.2-1]", _FILTER_INVALID)
        if "+" in share or "#" in share:
            raise MalformedPacket("ShareName contains a wildcard [MQTT-4.8.2-2]",
                                  _FILTER_INVALID)
        if slash < 0 or slash == len(body) - 1:
            raise MalformedPacket("ShareName not followed by '/' and a Topic Filter "
                                  "[MQTT-4.8.2-2]", _FILTER_INVALID)
        rest = body[slash + 1:]
    levels = rest.split("/")
    _check_filter_levels(levels)
    return share, levels


def _parse_topic(topic: str) -> list[str]:
    _utf8_len(topic, _NAME_INVALID, "topic name")
    if "+" in topic or "#" in topic:
        raise MalformedPacket("wildcard in a topic name [MQTT-3.3.2-2]", _NAME_INVALID)
    return topic.split("/")


def _pack_opts(qos, no_local, rap, rh, subid) -> tuple:
    # operator.index, like the compiled module's C integer arguments: ints
    # and bools pass, strings and floats are a TypeError.
    qos = _index(qos)
    rh = _index(rh)
    subid = _index(subid)
    if qos not in (0, 1, 2):
        raise ValueError("qos must be 0, 1 or 2")
    if rh not in (0, 1, 2):
        raise ValueError("retain_handling must be 0, 1 or 2")
    if not 0 <= subid <= _MAX_SUBSCRIPTION_ID:
        raise ValueError("subscription_id must be in 0..268435455")
    return (qos, bool(no_local), bool(rap), rh, subid)


class _Node:
    __slots__ = ("parent", "key", "children", "subs", "groups")

    def __init__(self, parent, key):
        self.parent = parent
        self.key = key
        self.children: dict[str, _Node] = {}
        self.subs: dict = {}  # subscriber -> options tuple
        self.groups: dict[str, _Group] = {}

    def empty(self) -> bool:
        return not (self.children or self.subs or self.groups)

    def filter(self) -> str:
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.key)
            node = node.parent
        return "/".join(reversed(parts))


class _Group:
    __slots__ = ("name", "members", "cursor")

    def __init__(self, name):
        self.name = name
        self.members: dict = {}  # subscriber -> options, in subscription order
        self.cursor = 0


class TopicTrie:
    """Subscriptions by topic filter, with per-subscriber options and shared groups.

    A subscriber is any hashable object (a client id, a session object).
    """

    def __init__(self) -> None:
        self._root = _Node(None, "")
        # subscriber -> {(share_name or None, filter_text): node}
        self._index: dict = {}
        # subscriber -> the object first stored for it, so match() can compare
        # by identity and run user __eq__ only once, before walking.
        self._canon: dict = {}
        self._count = 0
        self._policy: str | Callable = "round_robin"

    # -- changes ---------------------------------------------------------

    def subscribe(self, subscriber: Hashable, topic_filter: str, qos: int = 0,
                  no_local: bool = False, retain_as_published: bool = False,
                  retain_handling: int = 0, subscription_id: int = 0) -> bool:
        """Add a subscription, or replace the options of an identical one.

        Args:
            subscriber: any hashable object identifying the receiver.
            topic_filter: an MQTT topic filter, or ``$share/{name}/{filter}`` to
                join the shared group ``name`` on ``filter``.
            qos: maximum QoS granted (0..2).
            no_local: do not deliver this subscriber's own publications [MQTT-3.8.3-3].
            retain_as_published: keep the RETAIN flag on forwarded messages.
            retain_handling: 0, 1 or 2 (kept for the broker; not used in matching).
            subscription_id: 0 for none, else 1..268,435,455.

        Returns:
            True if the subscription is new, False if it replaced one [MQTT-3.8.4-3].

        Raises:
            MalformedPacket: invalid filter (0x8F), or no_local on a shared
                subscription (0x82) [MQTT-3.8.3-4].
            ValueError: an option out of range.
        """
        # Same order of checks as the compiled trie: options, filter, no_local.
        opts = _pack_opts(qos, no_local, retain_as_published, retain_handling, subscription_id)
        share, levels = _parse_filter(topic_filter)
        if share is not None and no_local:
            raise MalformedPacket("no_local on a shared subscription [MQTT-3.8.3-4]",
                                  _PROTOCOL_ERROR)
        hash(subscriber)
        # Node tables key by the object first stored for this subscriber, so
        # no_local's identity check in match() holds for an equal copy too.
        subscriber = self._canon.get(subscriber, subscriber)
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node(node, level)
            node = child
        if share is None:
            holder = node.subs
        else:
            group = node.groups.get(share)
            if group is None:
                group = node.groups[share] = _Group(share)
            holder = group.members
        new = subscriber not in holder
        holder[subscriber] = opts  # replacing keeps the member's position
        if new:
            if subscriber not in self._index:
                self._index[subscriber] = {}
                self._canon[subscriber] = subscriber
            self._index[subscriber][(share, "/".join(levels))] = node
            self._count += 1
        return new

    def unsubscribe(self, subscriber: Hashable, topic_filter: str) -> bool:
        """Remove one subscription.

        Args:
            subscriber: the subscriber given to :meth:`subscribe`.
            topic_filter: the filter exactly as subscribed (``$share/...`` included).

        Returns:
            True if it existed.

        Raises:
            MalformedPacket: invalid filter (0x8F).
        """
        share, levels = _parse_filter(topic_filter)
        subs = self._index.get(subscriber)
        if subs is None:
            return False
        node = subs.pop((share, "/".join(levels)), None)
        if node is None:
            return False
        if not subs:
            del self._index[subscriber]
            del self._canon[subscriber]
        self._detach(subscriber, share, node)
        return True

    def _detach(self, subscriber, share, node: _Node) -> None:
        if share is None:
            del node.subs[subscriber]
        else:
            group = node.groups[share]
            del group.members[subscriber]
            if not group.members:
                del node.groups[share]
        self._count -= 1
        # Prune emptied nodes back towards the root so memory follows the
        # live subscriptions, not the history.
        while node.parent is not None and node.empty():
            del node.parent.children[node.key]
            node = node.parent

    def remove_subscriber(self, subscriber: Hashable) -> int:
        """Drop every subscription of ``subscriber`` (session end).

        Returns:
            How many subscriptions were removed.
        """
        subs = self._index.pop(subscriber, None)
        self._canon.pop(subscriber, None)
        if not subs:
            return 0
        for (share, _), node in subs.items():
            self._detach(subscriber, share, node)
        return len(subs)

    def set_share_policy(self, policy: str | Callable) -> None:
        """Choose how a shared group picks the member for each message.

        Args:
            policy: ``"round_robin"`` (default; members in subscription order),
                ``"random"``, or a callable
                ``(share_name, topic_filter, members) -> member or None``
                (None skips the group for that message).

        Raises:
            ValueError: unknown policy name.
        """
        if isinstance(policy, str):
            if policy not in ("round_robin", "random"):
                raise ValueError(f"unknown share policy {policy!r}")
        elif not callable(policy):
            raise TypeError("policy must be a name or a callable")
        self._policy = policy

    # -- queries ---------------------------------------------------------

    def subscriptions(self, subscriber: Hashable) -> list[tuple[str, int, bool, bool, int, int]]:
        """Every subscription of ``subscriber``.

        Returns:
            ``(topic_filter, qos, no_local, retain_as_published, retain_handling,
            subscription_id)`` tuples; shared ones carry their ``$share/`` filter.
            The order is unspecified.
        """
        out = []
        for (share, text), node in self._index.get(subscriber, {}).items():
            if share is None:
                opts = node.subs[subscriber]
            else:
                opts = node.groups[share].members[subscriber]
                text = f"{_SHARE_PREFIX}{share}/{text}"
            out.append((text, *opts))
        return out

    def match(self, topic: str, publisher: Hashable | None = None) -> list[tuple]:
        """Who receives a message published to ``topic``.

        Args:
            topic: a topic name (no wildcards).
            publisher: the publishing subscriber, for no_local [MQTT-3.8.3-3].

        Returns:
            ``(subscriber, qos, retain_as_published, subscription_ids)`` — one
            per subscriber over its normal subscriptions, merged: the highest
            QoS [MQTT-3.3.4-3], retain_as_published if any says so, the sorted
            distinct non-zero subscription ids [MQTT-3.3.4-4], [MQTT-3.3.4-5];
            then one per matching shared group, for the member the share policy
            chose. Order among deliveries is unspecified.

        Raises:
            MalformedPacket: invalid topic name (0x90).
        """
        levels = _parse_topic(topic)
        pub = _NOBODY
        if publisher is not None:
            try:
                pub = self._canon.get(publisher, _NOBODY)
            except TypeError:
                pass  # unhashable: cannot be a subscriber
        nodes: list[_Node] = []
        self._collect(self._root, levels, nodes, topic.startswith("$"))
        merged: dict = {}
        for node in nodes:
            for sub, (qos, nl, rap, _rh, subid) in node.subs.items():
                if nl and sub is pub:
                    continue
                cur = merged.get(sub)
                if cur is None:
                    merged[sub] = [qos, rap, {subid} if subid else set()]
                else:
                    if qos > cur[0]:
                        cur[0] = qos
                    cur[1] = cur[1] or rap
                    if subid:
                        cur[2].add(subid)
        out = [(sub, q, r, tuple(sorted(ids))) for sub, (q, r, ids) in merged.items()]
        # Snapshot the groups first: a callable share policy may run any code,
        # including changes to this trie.
        snapshot = [(group, node.filter(), list(group.members.items()))
                    for node in nodes for group in node.groups.values()]
        for group, filter_text, members in snapshot:
            chosen = self._choose(group, filter_text, [m for m, _ in members])
            if chosen is None:
                continue
            qos, _nl, rap, _rh, subid = dict(members)[chosen]
            out.append((chosen, qos, rap, (subid,) if subid else ()))
        return out

    def _choose(self, group: _Group, filter_text: str, members: list):
        policy = self._policy
        if policy == "round_robin":
            # The cursor stays below the member count (as in the compiled
            # module), so after a member leaves the rotation carries on from
            # the same position.
            index = group.cursor % len(members)
            group.cursor = index + 1
            return members[index]
        if policy == "random":
            return _random.choice(members)
        chosen = policy(group.name, filter_text, list(members))
        if chosen is not None and chosen not in members:
            raise ValueError("share policy returned a non-member")
        return chosen

    def _collect(self, root: _Node, levels: list[str], out: list, dollar: bool) -> None:
        # An explicit stack: filters can be tens of thousands of levels deep.
        last = len(levels)
        stack = [(root, 0)]
        while stack:
            node, i = stack.pop()
            children = node.children
            # [MQTT-4.7.2-1] wildcards at the first level never match '$' topics.
            wild = not (dollar and i == 0)
            if wild:
                multi = children.get("#")
                if multi is not None:
                    out.append(multi)  # '#' also matches the parent level [MQTT-4.7.1-2]
            if i == last:
                out.append(node)
                continue
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if wild:
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))

    def node_count(self) -> int:
        """Trie nodes below the root (introspection: emptied nodes are pruned)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count

    def __len__(self) -> int:
        return self._count


class _RNode:
    __slots__ = ("parent", "key", "children", "has", "message", "expires_at")

    def __init__(self, parent, key):
        self.parent = parent
        self.key = key
        self.children: dict[str, _RNode] = {}
        self.has = False
        self.message = None
        self.expires_at = None


class RetainedStore:
    """The latest retained message per topic, looked up by topic filter.

    Messages are opaque objects. Expiry is by absolute time ``expires_at``
    (compared with the ``now`` the caller passes; the store reads no clock).
    """

    def __init__(self) -> None:
        self._root = _RNode(None, "")
        self._count = 0

    def set(self, topic: str, message: Any, expires_at: float | None = None) -> None:
        """Store ``message`` as the retained message of ``topic``, replacing any.

        Raises:
            MalformedPacket: invalid topic name (0x90).
        """
        node = self._root
        for level in _parse_topic(topic):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _RNode(node, level)
            node = child
        if not node.has:
            self._count += 1
            node.has = True
        node.message = message
        node.expires_at = None if expires_at is None else float(expires_at)

    def _find(self, topic: str) -> _RNode | None:
        node = self._root
        for level in _parse_topic(topic):
            node = node.children.get(level)
            if node is None:
                return None
        return node if node.has else None

    def _drop(self, node: _RNode) -> None:
        node.has = False
        node.message = None
        node.expires_at = None
        self._count -= 1
        while node.parent is not None and not node.has and not node.children:
            del node.parent.children[node.key]
            node = node.parent

    def delete(self, topic: str) -> bool:
        """Remove the retained message of ``topic``; True if there was one."""
        node = self._find(topic)
        if node is None:
            return False
        self._drop(node)
        return True

    def get(self, topic: str, now: float | None = None) -> Any | None:
        """The retained message of ``topic``, or None (also when expired at ``now``)."""
        node = self._find(topic)
        if node is None:
            return None
        if now is not None and node.expires_at is not None and node.expires_at <= now:
            self._drop(node)
            return None
        return node.message

    def match(self, topic_filter: str, now: float | None = None) -> list[tuple[str, Any]]:
        """Every retained message whose topic ``topic_filter`` matches.

        Walks only the branches the filter can reach. Topics starting with ``$``
        are not matched by a filter starting with a wildcard [MQTT-4.7.2-1].
        A ``$share/...`` filter returns nothing: MQTT 5.0 section 4.8.2 sends no
        retained messages when a Shared Subscription is made. Entries expired
        at ``now`` are skipped and removed.

        Raises:
            MalformedPacket: invalid filter (0x8F).
        """
        share, levels = _parse_filter(topic_filter)
        if share is not None:
            return []
        found: list[tuple[str, _RNode]] = []
        last = len(levels)
        stack = [(self._root, 0, ())]
        while stack:
            node, i, path = stack.pop()
            if i == last:
                if node.has:
                    found.append(("/".join(path), node))
                continue
            level = levels[i]
            if level == "#":
                # '#' matches the parent level itself [MQTT-4.7.1-2] and everything below.
                if node.has and i > 0:
                    found.append(("/".join(path), node))
                self._all_below(node, path, found, skip_dollar=(i == 0))
            elif level == "+":
                for key, child in node.children.items():
                    if i == 0 and key.startswith("$"):
                        continue  # [MQTT-4.7.2-1]
                    stack.append((child, i + 1, path + (key,)))
            else:
                child = node.children.get(level)
                if child is not None:
                    stack.append((child, i + 1, path + (level,)))
        out = []
        for topic, node in found:
            if now is not None and node.expires_at is not None and node.expires_at <= now:
                self._drop(node)
                continue
            out.append((topic, node.message))
        return out

    @staticmethod
    def _all_below(top: _RNode, path: tuple, found: list, skip_dollar: bool) -> None:
        stack = [(child, path + (key,)) for key, child in top.children.items()
                 if not (skip_dollar and key.startswith("$"))]
        while stack:
            node, p = stack.pop()
            if node.has:
                found.append(("/".join(p), node))
            for key, child in node.children.items():
                stack.append((child, p + (key,)))

    def purge_expired(self, now: float) -> int:
        """Remove every message with ``expires_at <= now``; returns how many."""
        expired = [node for _, node in self._nodes() if node.expires_at is not None
                   and node.expires_at <= now]
        for node in expired:
            self._drop(node)
        return len(expired)

    def _nodes(self):
        stack = [(self._root, [])]
        while stack:
            node, path = stack.pop()
            if node.has:
                yield "/".join(path), node
            for key, child in node.children.items():
                stack.append((child, path + [key]))

    def items(self) -> list[tuple[str, Any, float | None]]:
        """Every stored ``(topic, message, expires_at)``, expired or not."""
        return [(topic, node.message, node.expires_at) for topic, node in self._nodes()]

    def node_count(self) -> int:
        """Tree nodes below the root (introspection: emptied nodes are pruned)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count

    def __len__(self) -> int:
        return self._count
