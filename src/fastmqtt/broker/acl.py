"""Authorisation: Mosquitto-compatible ACL files, plug-ins and the ``$SYS`` rule.

ACL file format (Mosquitto's ``acl_file``)::

    # comment
    topic read public/#            # before any "user" line: anonymous clients
    user alice
    topic readwrite alice/#        # alice only; access defaults to readwrite
    topic deny alice/secret
    pattern write devices/%c/state # everyone; %c client id, %u user name

Theory of operation
-------------------
Rules are compiled per client into one list: the rules of its user block
(the anonymous block when it has no user name) followed by every ``pattern``
with ``%u``/``%c`` substituted. A pattern whose substitution is impossible
(no user name for ``%u``) or unsafe (a value containing ``+`` or ``#`` would
widen the filter, the reason Mosquitto refuses them too) is left out.

A check walks that list twice: any matching ``deny`` rule refuses (deny
always wins, whichever block it came from), then any matching rule granting
the access allows; nothing matching refuses. "Matching" depends on the check:

* publish (write) and delivery (read): the ACL filter matches the topic name
  with MQTT's rules, including [MQTT-4.7.2-1] (a filter starting with a
  wildcard never matches a topic starting with ``$``);
* subscribe (read): the ACL filter must *cover* the whole subscription filter
  (Mosquitto's ``mosquitto_sub_matches_acl``): ``+`` covers ``+`` or any one
  level, ``#`` covers the rest, a literal level covers only itself. So
  ``topic read a/+`` allows ``a/b`` and ``a/+`` but not ``a/#``. Shared
  subscriptions are checked on their inner filter (``$share/g/a/b`` -> ``a/b``).

``$SYS`` is read-only for clients whatever the rules say: publishing to
``$SYS`` or below is always refused. Reading it needs an explicit grant
(``topic read $SYS/#``), since wildcard rules never reach ``$`` topics.

Results are cached per (access, client, user, topic) and the cache is dropped
on :meth:`AclAuthorizer.reload`; ``generation`` counts reloads so the core
can tell that subscriptions must be re-checked (see :func:`stale_subscriptions`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = [
    "AclRule",
    "AclFile",
    "parse_acl",
    "load_acl_file",
    "topic_matches",
    "filter_covers",
    "AclAuthorizer",
    "ChainAuthorizer",
    "stale_subscriptions",
    "is_sys_topic",
    "READ",
    "WRITE",
]

log = logging.getLogger("fastmqtt.broker.acl")

READ = 1
WRITE = 2
DENY = 0
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}

_CACHE_LIMIT = 65536


def is_sys_topic(topic: str) -> bool:
    """True for ``$SYS`` and anything below it."""
    return topic == "$SYS" or topic.startswith("$SYS/")


def _strip_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching of a topic name against a filter.

    Args:
        topic_filter: may hold ``+`` and a trailing ``#``.
        topic: a topic name (no wildcards).

    Returns:
        True when the filter matches; ``$`` topics are not matched by a
        leading wildcard [MQTT-4.7.2-1]; ``a/#`` matches ``a`` [MQTT-4.7.1-2].
    """
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    nf = len(f)
    for i, level in enumerate(f):
        if level == "#":
            return i == nf - 1
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return nf == len(t)


def filter_covers(acl_filter: str, sub_filter: str) -> bool:
    """Whether an ACL filter covers every topic a subscription filter can match.

    Args:
        acl_filter: the filter in the ACL rule.
        sub_filter: the filter the client subscribes to.

    Returns:
        True when each level of ``sub_filter`` is covered: ``#`` in the ACL
        covers the rest (also ``#`` and nothing), ``+`` covers one level
        (a literal or ``+``), a literal covers only the same literal.
    """
    if acl_filter == sub_filter:
        return True
    if sub_filter.startswith("$") and acl_filter[:1] in ("+", "#"):
        return False
    a = acl_filter.split("/")
    s = sub_filter.split("/")
    na = len(a)
    for i, level in enumerate(a):
        if level == "#":
            return i == na - 1
        if i >= len(s):
            return False
        sl = s[i]
        if sl == "#":
            return False
        if level == "+":
            continue
        if level != sl:
            return False
    return na == len(s)


@dataclass(frozen=True)
class AclRule:
    """One ``topic`` or ``pattern`` line.

    Attributes:
        access: ``READ``, ``WRITE``, both, or ``DENY`` (0).
        topic_filter: the filter, with ``%u``/``%c`` still in it for patterns.
        pattern: True for ``pattern`` lines.
    """

    access: int
    topic_filter: str
    pattern: bool = False


@dataclass
class AclFile:
    """A parsed ACL file.

    Attributes:
        anonymous: rules that come before any ``user`` line.
        users: user name -> that user's rules.
        patterns: ``pattern`` rules (everyone).
    """

    anonymous: list[AclRule]
    users: dict[str, list[AclRule]]
    patterns: list[AclRule]


def parse_acl(text: str, source: str = "<acl>") -> AclFile:
    """Parse ACL file text.

    Args:
        text: the file's contents.
        source: name used in error messages.

    Returns:
        The parsed rules.

    Raises:
        ValueError: for a line that is not a comment, ``user``, ``topic`` or
            ``pattern``, or an empty filter.
    """
    acl = AclFile([], {}, [])
    current = acl.anonymous
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.lower()
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                raise ValueError(f"{source}:{lineno}: 'user' needs a user name")
            current = acl.users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            raise ValueError(f"{source}:{lineno}: unknown keyword {keyword!r}")
        first, _, after = rest.partition(" ")
        if first.lower() in _ACCESS and after.strip():
            access = _ACCESS[first.lower()]
            topic_filter = after.strip()
        else:  # no access word: readwrite, and the whole rest is the filter
            access = READ | WRITE
            topic_filter = rest
        if not topic_filter:
            raise ValueError(f"{source}:{lineno}: empty topic filter")
        if is_sys_topic(topic_filter) and access & WRITE:
            log.warning("%s:%d: write access to $SYS is never granted", source, lineno)
        rule = AclRule(access, topic_filter, keyword == "pattern")
        if rule.pattern:
            acl.patterns.append(rule)
        else:
            current.append(rule)
    return acl


def load_acl_file(path: str | os.PathLike) -> AclFile:
    """Read and parse an ACL file.

    Raises:
        OSError: when it cannot be read.
        ValueError: when it does not parse.
    """
    with open(path, encoding="utf-8") as fh:
        return parse_acl(fh.read(), os.fspath(path))


def _substitute(topic_filter: str, client_id: str, username: str | None) -> str | None:
    if "%u" in topic_filter:
        if username is None or "+" in username or "#" in username:
            return None
        topic_filter = topic_filter.replace("%u", username)
    if "%c" in topic_filter:
        if not client_id or "+" in client_id or "#" in client_id:
            return None
        topic_filter = topic_filter.replace("%c", client_id)
    return topic_filter


class AclAuthorizer:
    """Authorizer over a Mosquitto-compatible ACL file.

    Args:
        path: the ACL file; or None with ``acl`` given directly.
        acl: parsed rules (tests, or rules built in code).

    Raises:
        OSError, ValueError: when the file cannot be read or parsed at start-up.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, acl: AclFile | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        if acl is None:
            if self.path is None:
                raise ValueError("need a path or parsed rules")
            acl = load_acl_file(self.path)
        self.generation = 0
        self._set(acl)

    def _set(self, acl: AclFile) -> None:
        self.acl = acl
        self._rules: dict[tuple[str, str | None], tuple[tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]] = {}
        self._cache: dict[tuple, bool] = {}

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). On error the old rules stay in force.

        Returns:
            True when new rules were loaded; ``generation`` is then one higher
            and the core should re-check subscriptions (:func:`stale_subscriptions`).
        """
        if self.path is None:
            return False
        try:
            acl = load_acl_file(self.path)
        except (OSError, ValueError) as exc:
            log.error("ACL file %s not reloaded: %s", self.path, exc)
            return False
        self._set(acl)
        self.generation += 1
        log.info("ACL file %s reloaded", self.path)
        return True

    def rules_for(self, client_id: str, username: str | None):
        """(deny filters, grant (access, filter) pairs) for one client, compiled once."""
        key = (client_id, username)
        compiled = self._rules.get(key)
        if compiled is not None:
            return compiled
        acl = self.acl
        base = acl.anonymous if username is None else acl.users.get(username, ())
        denies: list[tuple[int, str]] = []
        grants: list[tuple[int, str]] = []
        for rule in list(base) + acl.patterns:
            flt = rule.topic_filter
            if rule.pattern:
                flt = _substitute(flt, client_id, username)
                if flt is None:
                    continue
            (grants if rule.access else denies).append((rule.access, flt))
        compiled = (tuple(denies), tuple(grants))
        if len(self._rules) >= _CACHE_LIMIT:
            self._rules.clear()
        self._rules[key] = compiled
        return compiled

    def check(self, access: int, client_id: str, username: str | None, topic: str,
              subscribe: bool = False) -> bool:
        """The uncached decision; see the module docstring for the rules."""
        if access & WRITE and is_sys_topic(topic):
            return False  # $SYS is read-only for clients
        denies, grants = self.rules_for(client_id, username)
        match = filter_covers if subscribe else topic_matches
        for _, flt in denies:
            if match(flt, topic):
                return False
        for acc, flt in grants:
            if acc & access and match(flt, topic):
                return True
        return False

    def _cached(self, access: int, client_id: str, username: str | None, topic: str,
                subscribe: bool) -> bool:
        key = (access, subscribe, client_id, username, topic)
        cache = self._cache
        result = cache.get(key)
        if result is None:
            result = self.check(access, client_id, username, topic, subscribe)
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[key] = result
        return result

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        """Write access to a topic name (PUBLISH; v5 answer 0x87 when False)."""
        return self._cached(WRITE, client_id, username, topic, False)

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        """Read access covering a whole subscription filter (SUBACK 0x87 when False)."""
        return self._cached(READ, client_id, username, _strip_share(topic_filter), True)

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        """Read access to one message's topic (each delivery, retained included)."""
        return self._cached(READ, client_id, username, topic, False)


class ChainAuthorizer:
    """Asks authorizers in order; the first definite answer wins.

    A member may return ``None`` ("no opinion", e.g. a dynamic plug-in that
    only knows chat topics) to pass the question on; when every member
    abstains the answer is no. Publishing to ``$SYS`` is refused before any
    member is asked.

    Args:
        authorizers: checked in order (plug-ins first, then the ACL file).
    """

    def __init__(self, authorizers: Iterable[Any]) -> None:
        self.authorizers = list(authorizers)

    @property
    def generation(self) -> int:
        return sum(getattr(a, "generation", 0) for a in self.authorizers)

    def reload(self) -> None:
        """Reload every member that can."""
        for a in self.authorizers:
            reload = getattr(a, "reload", None)
            if reload is not None:
                reload()

    def _ask(self, method: str, client_id: str, username: str | None, topic: str) -> bool:
        for a in self.authorizers:
            result = getattr(a, method)(client_id, username, topic)
            if result is not None:
                return bool(result)
        return False

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool:
        if is_sys_topic(topic):
            return False
        return self._ask("can_publish", client_id, username, topic)

    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool:
        return self._ask("can_subscribe", client_id, username, topic_filter)

    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool:
        return self._ask("can_receive", client_id, username, topic)


def stale_subscriptions(authorizer: Any,
                        subscriptions: Iterable[tuple[str, str | None, str]]) -> list[tuple[str, str]]:
    """Subscriptions an authorizer no longer allows (after a reload).

    Args:
        authorizer: the broker's authorizer.
        subscriptions: ``(client_id, username, topic_filter)`` for every
            subscription of every session.

    Returns:
        ``(client_id, topic_filter)`` pairs the core should unsubscribe.
    """
    return [(cid, flt) for cid, user, flt in subscriptions
            if not authorizer.can_subscribe(cid, user, flt)]
