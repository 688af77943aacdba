"""Client side of the broker's history request/response (``$history/<topic>``).

The request is a v5 PUBLISH to ``$history/{topic}`` with a Response Topic and
Correlation Data (:meth:`fastmqtt.Client.request` adds both) and a JSON body
``{"limit": N, "before": cursor, "after": cursor}``; the broker answers on the
response topic with ``{"topic": ..., "messages": [...oldest first...],
"next": cursor-or-null}`` (and ``"error"`` when it refuses), as defined in
``fastmqtt.store.history``. Cursors are the broker's entry ids (strings of
integers), not event ids.

:func:`fetch_history` gets one page; :func:`iter_history` walks back page by
page. Brokers without history (Mosquitto) never answer: the request times out
and :class:`HistoryUnavailable` is raised, which callers treat as "nothing to
catch up from".
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..client.errors import ClientError, RequestTimeout

__all__ = ["HistoryMessage", "HistoryPage", "HistoryError", "HistoryUnavailable",
           "fetch_history", "iter_history", "HISTORY_PREFIX"]

HISTORY_PREFIX = "$history/"


class HistoryError(ClientError):
    """The broker answered the history request with an error."""


class HistoryUnavailable(HistoryError):
    """No answer: the broker does not offer history (or did not in time)."""


@dataclass(slots=True)
class HistoryMessage:
    """One stored message."""

    id: str  # the broker's cursor for this entry
    ts: float  # seconds since the epoch, when the broker received it
    payload: bytes
    qos: int = 1
    retain: bool = False
    content_type: str | None = None
    user_properties: list = field(default_factory=list)


@dataclass(slots=True)
class HistoryPage:
    topic: str
    messages: list[HistoryMessage]  # oldest first
    next: str | None  # pass as ``before`` for the older page; None: no more


def _parse_page(body: bytes, topic: str) -> HistoryPage:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise HistoryError(f"history response is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HistoryError("history response is not a JSON object")
    if obj.get("error"):
        raise HistoryError(f"history request for {topic!r} refused: {obj['error']}")
    messages = []
    for m in obj.get("messages") or ():
        if "payload_b64" in m:
            payload = base64.b64decode(m["payload_b64"])
        else:
            payload = str(m.get("payload", "")).encode("utf-8")
        messages.append(HistoryMessage(
            str(m.get("id", "")), float(m.get("ts", 0.0)), payload, int(m.get("qos", 1)),
            bool(m.get("retain", False)), m.get("content_type"),
            [tuple(p) for p in m.get("user_properties") or ()]))
    nxt = obj.get("next")
    return HistoryPage(obj.get("topic", topic), messages, None if nxt is None else str(nxt))


async def fetch_history(client: Any, topic: str, *, limit: int = 50, before: str | None = None,
                        after: str | None = None, timeout: float = 5.0) -> HistoryPage:
    """Fetch the newest ``limit`` messages of ``topic`` (older than ``before``,
    newer than ``after``).

    Args:
        client: a connected v5 :class:`fastmqtt.Client`.
        topic: a topic name (no wildcards).
        limit: 1..500.
        before, after: cursors from an earlier page or message.
        timeout: seconds to wait for the answer.

    Returns:
        The page, messages oldest first.
    Raises:
        HistoryUnavailable: no answer within ``timeout``.
        HistoryError: the broker refused (not covered, not authorized, ...).
    """
    req: dict[str, Any] = {"limit": limit}
    if before is not None:
        req["before"] = before
    if after is not None:
        req["after"] = after
    if getattr(client, "version", 5) != 5:
        return await _fetch_v311(client, topic, req, timeout)
    try:
        response = await client.request(HISTORY_PREFIX + topic,
                                        json.dumps(req, separators=(",", ":")),
                                        timeout=timeout, content_type="application/json")
    except RequestTimeout:
        raise HistoryUnavailable(f"no history answer for {topic!r} in {timeout}s") from None
    return _parse_page(response.payload, topic)


async def _fetch_v311(client: Any, topic: str, req: dict, timeout: float) -> HistoryPage:
    # MQTT 3.1.1 has no Response Topic / Correlation Data properties: both go
    # in the JSON body, and the broker echoes "correlation" in its answer.
    import secrets

    import trio

    corr = secrets.token_hex(8)
    try:
        with trio.fail_after(timeout):
            response_topic = await client._ensure_response_topic()
            req = {**req, "response_topic": response_topic, "correlation": corr}
            with client.messages(response_topic, buffer=64) as answers:
                await client.publish(HISTORY_PREFIX + topic,
                                     json.dumps(req, separators=(",", ":")), qos=1)
                async for m in answers:
                    try:
                        body = json.loads(m.payload)
                    except ValueError:
                        continue
                    if isinstance(body, dict) and body.get("correlation") == corr:
                        return _parse_page(m.payload, topic)
    except trio.TooSlowError:
        pass
    raise HistoryUnavailable(f"no history answer for {topic!r} in {timeout}s")


async def iter_history(client: Any, topic: str, *, limit: int = 50, max_pages: int = 10,
                       before: str | None = None, after: str | None = None,
                       timeout: float = 5.0) -> AsyncIterator[HistoryPage]:
    """Pages of ``topic`` from the newest back, at most ``max_pages``."""
    for _ in range(max_pages):
        page = await fetch_history(client, topic, limit=limit, before=before, after=after,
                                   timeout=timeout)
        yield page
        if page.next is None or not page.messages:
            return
        before = page.next
