"""Chat history: the last N messages (and/or M days) per topic, for configured
topic filters, and an MQTT v5 request/response API to fetch them.

Why: MQTT's offline queue only serves a session that existed while the message
was published; a chat client that reconnects with a clean session, opens a new
tab or scrolls back needs "what happened in this topic before X". Keeping a
bounded per-topic history in the broker removes the REST round trip chat apps
otherwise make on every reconnect (see the chat notes in the README).

What is recorded
----------------
Every accepted PUBLISH whose topic matches one of the configured filters
(``history = ["chat/+/channel/+", "chat/+/dm/+"]``), except:

* QoS 0 messages, unless ``record_qos0=True``: chat uses QoS 0 for typing
  indicators, which must never be replayed;
* a retained PUBLISH with an empty payload (it deletes the retained message,
  it is not a message) and topics starting with ``$`` matched by a wildcard
  first level [MQTT-4.7.2-1].

Each topic keeps at most ``max_messages`` entries (oldest dropped first) and,
with ``max_days``, nothing older than that. A message with a Message Expiry
Interval leaves the history when it expires [MQTT-3.3.2-5 in spirit: an expired
message is not delivered]. Entry ids are integers increasing across restarts
(microseconds of the wall clock, bumped when equal), so a cursor stays valid
after a broker restart.

Queries are answered from memory, so they never block. With the SQLite store,
every change is mirrored to the ``history`` table in the same group commit as
the rest of the broker state, and reloaded at start-up.

Request/response format (MQTT 5.0)
----------------------------------
Request: PUBLISH to ``$history/<topic>`` (``<topic>`` is a topic name, no
wildcards), with the Response Topic and (optionally) Correlation Data
properties [MQTT-4.10]. The payload is empty or a JSON object::

    {"limit": 50,          # 1..500, default 50: newest entries to return
     "before": "1700...",  # optional cursor: only entries older than it
     "after": "1700..."}   # optional cursor: only entries newer than it

Response: one PUBLISH to the Response Topic, QoS 1 (0 if the request was QoS 0),
with the same Correlation Data, Content Type ``application/json`` and Payload
Format Indicator 1, whose payload is::

    {"topic": "chat/acme/channel/42",
     "messages": [                    # oldest first
        {"id": "1700000000123456", "ts": 1700000000.123456, "qos": 1,
         "retain": false,
         "payload": "<UTF-8 text>"    # or "payload_b64": "<base64>" if not UTF-8
         "content_type": "...",       # only when the message had one
         "user_properties": [["k", "v"]]},  # only when the message had some
        ...],
     "next": "1700000000123456"}      # pass as "before" for the previous page;
                                      # null when there is nothing older

Errors give ``"messages": []``, ``"next": null`` and ``"error"``:
``"bad request"`` (not JSON, bad field), ``"no history"`` (topic not covered by
the history filters), ``"not authorized"``.

MQTT 3.1.1 clients have no properties: they put ``"response_topic"`` (and
optionally ``"correlation"``, any JSON value, echoed back in the response
body) in the JSON payload instead.
"""

from __future__ import annotations

import base64
import json
from collections import deque
from typing import Any, Callable, Iterable

from ..enums import PropertyId
from .base import log

__all__ = ["HistoryService", "HISTORY_PREFIX", "is_history_request", "HistoryEntry"]

HISTORY_PREFIX = "$history/"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_DAY = 86400.0

# (hist_id, ts, expires_at, publish)
HistoryEntry = tuple


def is_history_request(topic: str) -> bool:
    """True for the topics the broker hands to :meth:`HistoryService.handle_request`."""
    return topic.startswith(HISTORY_PREFIX)


def _matches(topic_filter: str, topic: str) -> bool:
    from ..topics import topic_matches

    return topic_matches(topic_filter, topic)


class HistoryService:
    """Bounded per-topic message history with a request/response API.

    Args:
        filters: topic filters whose messages are kept (empty: nothing is).
        max_messages: entries kept per topic.
        max_days: if set, entries older than this many days are dropped.
        store: a store with ``put_history``/``delete_history``/``load_history``
            (the SQLite or memory store) to keep history across restarts; any
            other store (or None) keeps it in memory only.
        record_qos0: also keep QoS 0 messages (off: typing indicators).
        authorize: ``authorize(client_id, topic) -> bool`` checked on every
            request (the ACL hook); None allows every client.
    """

    def __init__(self, filters: Iterable[str], max_messages: int = 100,
                 max_days: float | None = None, store: Any = None, record_qos0: bool = False,
                 authorize: Callable[[str, str], bool] | None = None) -> None:
        self.filters = list(filters)
        self.max_messages = max(1, int(max_messages))
        self.max_age = None if not max_days else float(max_days) * _DAY
        self.record_qos0 = record_qos0
        self.authorize = authorize
        self._store = store if hasattr(store, "put_history") else None
        self._topics: dict[str, deque] = {}
        self._match_cache: dict[str, bool] = {}
        self._last_id = 0
        self._loaded = False

    # ------------------------------------------------------------ recording

    def enabled(self) -> bool:
        return bool(self.filters)

    def matches(self, topic: str) -> bool:
        """Whether messages on ``topic`` are kept (cached per topic)."""
        hit = self._match_cache.get(topic)
        if hit is None:
            hit = any(_matches(f, topic) for f in self.filters)
            if len(self._match_cache) > 100_000:
                self._match_cache.clear()
            self._match_cache[topic] = hit
        return hit

    def _ensure_loaded(self) -> None:
        # Lazily, so the service can be built before the store is opened; the
        # rows were read by store.open(), this does no I/O.
        if self._loaded:
            return
        self._loaded = True
        if self._store is None:
            return
        dropped = []
        for hid, topic, ts, exp, publish in self._store.load_history():
            self._last_id = max(self._last_id, hid)
            if not self.matches(topic):
                dropped.append(hid)  # filter removed from the config
                continue
            self._topics.setdefault(topic, deque()).append((hid, ts, exp, publish))
        for topic, ring in self._topics.items():
            while len(ring) > self.max_messages:
                dropped.append(ring.popleft()[0])
        if dropped:
            self._store.delete_history(dropped)

    def record(self, publish: Any, now: float) -> bool:
        """Keep ``publish`` if its topic is covered. Called by the broker for
        every accepted PUBLISH (after topic alias resolution).

        Args:
            publish: the ``fastmqtt.Publish`` as received.
            now: wall-clock ``time.time()``.

        Returns:
            True if the message was recorded.
        """
        if not self.filters:
            return False
        topic = publish.topic
        if not topic or topic.startswith(HISTORY_PREFIX):
            return False
        if publish.qos == 0 and not self.record_qos0:
            return False
        if publish.retain and not publish.payload:
            return False
        if not self.matches(topic):
            return False
        self._ensure_loaded()
        hid = max(self._last_id + 1, int(now * 1_000_000))
        self._last_id = hid
        expiry = publish.properties.get(PropertyId.MESSAGE_EXPIRY_INTERVAL)
        expires_at = now + expiry if expiry is not None else None
        ring = self._topics.get(topic)
        if ring is None:
            ring = self._topics[topic] = deque()
        ring.append((hid, now, expires_at, publish))
        dropped = []
        while len(ring) > self.max_messages:
            dropped.append(ring.popleft()[0])
        if self.max_age is not None:
            cutoff = now - self.max_age
            while ring and ring[0][1] < cutoff:
                dropped.append(ring.popleft()[0])
        if self._store is not None:
            self._store.put_history(hid, topic, now, expires_at, publish)
            if dropped:
                self._store.delete_history(dropped)
        return True

    def purge(self, now: float) -> int:
        """Drop entries past ``max_days`` or their message expiry in every
        topic (the broker may call this periodically). Returns how many."""
        self._ensure_loaded()
        dropped = []
        cutoff = now - self.max_age if self.max_age is not None else None
        for topic in list(self._topics):
            ring = self._topics[topic]
            keep = deque(e for e in ring if not ((cutoff is not None and e[1] < cutoff)
                                                 or (e[2] is not None and e[2] <= now)))
            if len(keep) != len(ring):
                dropped.extend(e[0] for e in ring if e not in keep)
                if keep:
                    self._topics[topic] = keep
                else:
                    del self._topics[topic]
        if dropped and self._store is not None:
            self._store.delete_history(dropped)
        return len(dropped)

    # -------------------------------------------------------------- queries

    def query(self, topic: str, limit: int = DEFAULT_LIMIT, before: int | None = None,
              after: int | None = None, now: float | None = None
              ) -> tuple[list[HistoryEntry], int | None]:
        """The newest ``limit`` entries of ``topic`` with ``after < id < before``.

        Args:
            topic: a topic name.
            limit: at most this many entries (clamped to 1..500).
            before, after: exclusive id bounds (cursors), or None.
            now: wall-clock time; entries older than ``max_days`` or past their
                message expiry are left out.

        Returns:
            (entries oldest first as ``(id, ts, expires_at, Publish)``, cursor
            for the previous page or None when nothing older is left).
        """
        self._ensure_loaded()
        limit = max(1, min(MAX_LIMIT, int(limit)))
        ring = self._topics.get(topic)
        if not ring:
            return [], None
        cutoff = now - self.max_age if (now is not None and self.max_age is not None) else None
        out: list[HistoryEntry] = []
        more = False
        for entry in reversed(ring):  # newest first
            hid, ts, exp, _ = entry
            if before is not None and hid >= before:
                continue
            if after is not None and hid <= after:
                break
            if cutoff is not None and ts < cutoff:
                break
            if now is not None and exp is not None and exp <= now:
                continue
            if len(out) == limit:
                more = True
                break
            out.append(entry)
        out.reverse()
        return out, (out[0][0] if more and out else None)

    def handle_request(self, publish: Any, client_id: str, now: float) -> list[Any]:
        """Answer a PUBLISH to ``$history/<topic>``.

        Args:
            publish: the request PUBLISH (see the module docstring for its format).
            client_id: the requesting client, for the ACL hook.
            now: wall-clock time.

        Returns:
            the response PUBLISH packets for the broker to route normally (to
            the request's response topic); empty when the request names no
            response topic (nothing can be answered).
        """
        from ..codec import Publish

        topic = publish.topic[len(HISTORY_PREFIX):]
        props = publish.properties
        response_topic = props.get(PropertyId.RESPONSE_TOPIC)
        correlation = props.get(PropertyId.CORRELATION_DATA)
        body: dict[str, Any] = {"topic": topic}
        error = None
        req: dict = {}
        if publish.payload:
            try:
                req = json.loads(publish.payload)
                if not isinstance(req, dict):
                    raise ValueError("request must be a JSON object")
            except ValueError as e:
                error = f"bad request: {e}"
                req = {}
        if response_topic is None:
            rt = req.get("response_topic")
            if isinstance(rt, str) and rt and "+" not in rt and "#" not in rt:
                response_topic = rt
        if "correlation" in req:
            body["correlation"] = req["correlation"]
        if not response_topic:
            log.debug("history request from %r without a response topic ignored", client_id)
            return []
        limit, before, after = DEFAULT_LIMIT, None, None
        if error is None:
            try:
                limit = int(req.get("limit", DEFAULT_LIMIT))
                if limit < 1:
                    raise ValueError("limit must be >= 1")
                before = None if req.get("before") is None else int(req["before"])
                after = None if req.get("after") is None else int(req["after"])
            except (TypeError, ValueError) as e:
                error = f"bad request: {e}"
        if error is None and (not topic or "+" in topic or "#" in topic):
            error = "bad request: not a topic name"
        if error is None and not self.matches(topic):
            error = "no history"
        if error is None and self.authorize is not None and not self.authorize(client_id, topic):
            error = "not authorized"
        if error is not None:
            body.update(messages=[], next=None, error=error)
        else:
            entries, nxt = self.query(topic, limit, before, after, now)
            body["messages"] = [self._entry_json(e) for e in entries]
            body["next"] = None if nxt is None else str(nxt)
        out_props: dict[int, Any] = {
            PropertyId.PAYLOAD_FORMAT_INDICATOR: 1,
            PropertyId.CONTENT_TYPE: "application/json",
        }
        if correlation is not None:
            out_props[PropertyId.CORRELATION_DATA] = correlation
        payload = json.dumps(body, separators=(",", ":")).encode()
        return [Publish(response_topic, payload, 1 if publish.qos else 0, False, False,
                        0, out_props)]

    @staticmethod
    def _entry_json(entry: HistoryEntry) -> dict[str, Any]:
        hid, ts, _, p = entry
        item: dict[str, Any] = {"id": str(hid), "ts": ts, "qos": p.qos, "retain": p.retain}
        try:
            item["payload"] = p.payload.decode("utf-8")
        except UnicodeDecodeError:
            item["payload_b64"] = base64.b64encode(p.payload).decode("ascii")
        ct = p.properties.get(PropertyId.CONTENT_TYPE)
        if ct is not None:
            item["content_type"] = ct
        up = p.properties.get(PropertyId.USER_PROPERTY)
        if up:
            item["user_properties"] = [list(kv) for kv in up]
        return item
