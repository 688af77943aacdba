"""Routing received messages to the application.

The reader task of a connection must never wait on the application, or one slow
handler stalls keepalive and acknowledgements for everyone. So routing is
synchronous and never blocks: :meth:`Router.dispatch` finds the matching routes
in a :class:`~fastmqtt.trie.TopicTrie` (compiled when available) and hands the
message to each route's bounded buffer. What drains the buffer runs elsewhere:

* :class:`MessageStream` — the buffer behind ``async for message in
  client.messages(filter)``, drained by the application's own task;
* :class:`HandlerRoute` — a registered handler with its own queue and its own
  task (started in the client's nursery), so each handler sees its messages in
  order and a slow one delays only itself.

Overflow (a full buffer) is decided per route: ``"drop_oldest"`` (the default:
the newest state wins, right for chat and telemetry) or ``"drop_newest"``;
either way the route counts what it dropped in ``.dropped``. The MQTT
acknowledgement has already gone out, so a dropped message is gone: size the
buffer for your bursts or keep the consumer fast.

Shared subscriptions are routed by their inner filter: a message that arrived
through ``$share/group/sensors/#`` is delivered to routes for ``sensors/#``.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import trio

from ..enums import EMPTY_PROPERTIES, PropertyId
from ..topics import split_shared, validate_topic_filter
from ..trie import TopicTrie

__all__ = ["Message", "Router", "MessageStream", "HandlerRoute", "OVERFLOW_POLICIES"]

OVERFLOW_POLICIES = ("drop_oldest", "drop_newest")


@dataclass(slots=True, eq=True)
class Message:
    """An application message as the client receives (or sends) it.

    Attributes:
        topic: the topic name (inbound topic aliases already resolved).
        payload: the payload bytes.
        qos: the QoS it was delivered with.
        retain: True when it came from the retained store.
        properties: v5 properties (``{PropertyId: value}``; empty for 3.1.1).
        dup: the DUP flag of the PUBLISH.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Mapping[int, Any] = field(default_factory=lambda: EMPTY_PROPERTIES)
    dup: bool = False

    @classmethod
    def from_publish(cls, pub: Any) -> "Message":
        return cls(pub.topic, pub.payload, pub.qos, pub.retain, pub.properties, pub.dup)

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON."""
        import json

        return json.loads(self.payload)

    @property
    def user_properties(self) -> tuple[tuple[str, str], ...]:
        return self.properties.get(PropertyId.USER_PROPERTY, ())

    @property
    def response_topic(self) -> str | None:
        return self.properties.get(PropertyId.RESPONSE_TOPIC)

    @property
    def correlation_data(self) -> bytes | None:
        return self.properties.get(PropertyId.CORRELATION_DATA)

    @property
    def content_type(self) -> str | None:
        return self.properties.get(PropertyId.CONTENT_TYPE)


class _BoundedBuffer:
    """Deque with a maximum length, an overflow policy and a wakeup for one reader."""

    __slots__ = ("maxlen", "overflow", "items", "dropped", "_waiter", "closed")

    def __init__(self, maxlen: int, overflow: str) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}")
        if maxlen < 1:
            raise ValueError("buffer size must be >= 1")
        self.maxlen = maxlen
        self.overflow = overflow
        self.items: deque = deque()
        self.dropped = 0
        self._waiter: trio.Event | None = None
        self.closed = False

    def push(self, item) -> None:
        if self.closed:
            return
        if len(self.items) >= self.maxlen:
            self.dropped += 1
            if self.overflow == "drop_newest":
                return
            self.items.popleft()
        self.items.append(item)
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    async def pop(self):
        while not self.items:
            if self.closed:
                raise trio.EndOfChannel
            if self._waiter is None:
                self._waiter = trio.Event()
            await self._waiter.wait()
        return self.items.popleft()


class MessageStream:
    """Messages matching one filter, buffered until the consumer takes them.

    Iterate with ``async for``; use ``async with`` (or :meth:`close`) to stop
    buffering when done. Buffering starts when the stream is created, not at
    the first iteration, so nothing that arrives in between is missed.

    Attributes:
        topic_filter: the filter (None: every message).
        dropped: messages discarded because the buffer was full.
    """

    def __init__(self, router: "Router", topic_filter: str | None, buffer: int,
                 overflow: str) -> None:
        self.topic_filter = topic_filter
        self._buf = _BoundedBuffer(buffer, overflow)
        self._router = router
        self._route_id = router._add_sink(topic_filter, self._buf)

    @property
    def dropped(self) -> int:
        return self._buf.dropped

    def __len__(self) -> int:
        return len(self._buf.items)

    def __aiter__(self) -> "MessageStream":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._buf.pop()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """The next message.

        Raises:
            trio.EndOfChannel: the stream (or the client) was closed.
        """
        return await self._buf.pop()

    def close(self) -> None:
        """Stop buffering; a waiting iteration ends."""
        if not self._buf.closed:
            self._router.remove(self._route_id)
            self._buf.close()

    def __enter__(self) -> "MessageStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "MessageStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a stream dropped after `break` stops buffering
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


Handler = Callable[[Message], Any] | Callable[[Message], Awaitable[Any]]


class HandlerRoute:
    """A handler with its own bounded queue, drained by its own task.

    Exceptions from the handler are passed to ``on_error`` (default: printed
    via the ``fastmqtt.client`` logger) and do not stop the route.
    """

    def __init__(self, router: "Router", topic_filter: str | None, handler: Handler,
                 buffer: int, overflow: str, on_error: Callable[[BaseException, Message], None]) -> None:
        self.topic_filter = topic_filter
        self.handler = handler
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None))
        self._buf = _BoundedBuffer(buffer, overflow)
        self._on_error = on_error
        self._router = router
        self.route_id = router._add_sink(topic_filter, self._buf)
        self.started = False

    @property
    def dropped(self) -> int:
        return self._buf.dropped

    async def run(self) -> None:
        """Drain the queue until the route is removed."""
        self.started = True
        while True:
            try:
                message = await self._buf.pop()
            except trio.EndOfChannel:
                return
            try:
                if self._is_async:
                    await self.handler(message)
                else:
                    result = self.handler(message)
                    if inspect.isawaitable(result):
                        await result
            except Exception as exc:  # a handler bug must not end the route
                self._on_error(exc, message)

    def remove(self) -> None:
        self._router.remove(self.route_id)
        self._buf.close()


class Router:
    """Topic-filter routing table over the topic trie.

    Routes are keyed by an integer id in the trie; ``None`` as a filter means
    "every message" (``#`` would skip ``$``-topics, [MQTT-4.7.2-1]).
    """

    def __init__(self) -> None:
        self._trie = TopicTrie()
        # route id -> (inner filter, buffer); the router holds buffers, not
        # streams, so a MessageStream the application dropped is collected
        # (and its __del__ removes the route).
        self._sinks: dict[int, tuple[str, _BoundedBuffer]] = {}
        self._catch_all: dict[int, _BoundedBuffer] = {}
        self._ids = itertools.count(1)
        self.unmatched = 0

    def _add_sink(self, topic_filter: str | None, sink: _BoundedBuffer) -> int:
        rid = next(self._ids)
        if topic_filter is None:
            self._catch_all[rid] = sink
            return rid
        validate_topic_filter(topic_filter)
        _, inner = split_shared(topic_filter)
        self._trie.subscribe(rid, inner)
        self._sinks[rid] = (inner, sink)
        return rid

    def remove(self, route_id: int) -> None:
        if self._catch_all.pop(route_id, None) is not None:
            return
        item = self._sinks.pop(route_id, None)
        if item is not None:
            self._trie.unsubscribe(route_id, item[0])

    def stream(self, topic_filter: str | None = None, buffer: int = 1000,
               overflow: str = "drop_oldest") -> MessageStream:
        """A new :class:`MessageStream` for ``topic_filter``."""
        return MessageStream(self, topic_filter, buffer, overflow)

    def dispatch(self, message: Message) -> int:
        """Hand ``message`` to every matching route; returns how many matched."""
        n = 0
        if self._sinks:
            sinks = self._sinks
            for delivery in self._trie.match(message.topic):
                sinks[delivery[0]][1].push(message)
                n += 1
        for sink in list(self._catch_all.values()):
            sink.push(message)
            n += 1
        if not n:
            self.unmatched += 1
        return n

    def close_all(self) -> None:
        """End every stream and handler route (the client is closing)."""
        for _, buf in list(self._sinks.values()):
            buf.close()
        for buf in list(self._catch_all.values()):
            buf.close()

    def __len__(self) -> int:
        return len(self._sinks) + len(self._catch_all)


