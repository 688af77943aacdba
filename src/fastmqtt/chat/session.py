"""ChatSession: the chat layer on top of one :class:`fastmqtt.Client`.

It subscribes to what a user needs (their user topic, the workspace's
presence, the channels and conversations they join), decodes every message
into a typed event, drops events whose id was already seen (QoS 1 redelivery,
or the same event from history and live), tracks presence, and after every
reconnect asks the broker's history for what was missed in each joined topic
(walking back page by page until it meets an event it already has), so the
application needs no REST round trip to repair its state.

Events come out of :meth:`ChatSession.events` as :class:`ChatDelivery`
objects, live ones in arrival order; recovered ones are marked
``from_history`` and may interleave with live ones that arrived while the
history was being fetched (order by ``event.ts`` or the time-ordered
``event.id`` when that matters).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from ..client.router import Message, _BoundedBuffer
from .dedup import Deduplicator
from .events import Event, EventDecodeError, UserStatus, decode_event, encode_event
from .history import HistoryError, iter_history
from .presence import Presence, PresenceTracker, presence_will
from .topics import ChatTopic, ChatTopics

__all__ = ["ChatSession", "ChatDelivery"]

log = logging.getLogger("fastmqtt.chat")


@dataclass(slots=True)
class ChatDelivery:
    """One event for the application.

    Attributes:
        topic: where it was published (parsed).
        event: the typed event.
        from_history: recovered through the history API after a reconnect.
        message: the MQTT message (None for history entries).
    """

    topic: ChatTopic
    event: Event
    from_history: bool = False
    message: Message | None = None


class ChatSession:
    """A user's chat view over a connected client.

    Args:
        client: a :class:`fastmqtt.Client` (entered, or about to be).
        workspace: workspace id.
        user_id: this user.
        device_id: this device (one presence topic per device).
        app: the topic prefix.
        dedup: a :class:`Deduplicator` (default: 10,000 ids).
        buffer: events held for :meth:`events` before the oldest is dropped.
        catch_up: fetch missed history after each reconnect.
        history_limit, history_pages, history_timeout: catch-up bounds.
    """

    def __init__(self, client: Any, *, workspace: str, user_id: str, device_id: str = "default",
                 app: str = "chat", dedup: Deduplicator | None = None, buffer: int = 1000,
                 catch_up: bool = True, history_limit: int = 50, history_pages: int = 4,
                 history_timeout: float = 3.0) -> None:
        self.client = client
        self.topics = ChatTopics(app)
        self.workspace = workspace
        self.user_id = user_id
        self.device_id = device_id
        self.dedup = dedup or Deduplicator()
        self.presence = Presence(client, self.topics, workspace, user_id, device_id)
        self.tracker = PresenceTracker(self.topics)
        self.catch_up_enabled = catch_up
        self.history_limit = history_limit
        self.history_pages = history_pages
        self.history_timeout = history_timeout
        self.joined: dict[str, None] = {}
        self.invalid = 0  # messages that were not valid event envelopes
        self._out = _BoundedBuffer(buffer, "drop_oldest")
        self._base_connections = client.connections
        self._route = client.add_handler(f"{self.topics.app}/{workspace}/#", self._on_message,
                                         buffer=buffer)
        client.add_connect_hook(self._on_connect)
        self.history_available: bool | None = None

    @staticmethod
    def will(workspace: str, user_id: str, device_id: str = "default", app: str = "chat",
             delay: int = 0):
        """The will for ``Client(will=...)`` that marks this device offline."""
        return presence_will(ChatTopics(app), workspace, user_id, device_id, delay=delay)

    # ---------------------------------------------------------- membership

    async def start(self, status: str = "online") -> None:
        """Subscribe to the user topic and the workspace presence, then announce
        ``status``."""
        user_topic = self.topics.user(self.workspace, self.user_id)
        await self.client.subscribe_many(
            [user_topic, self.topics.presence_filter(self.workspace)], qos=1)
        self.joined[user_topic] = None
        await self.presence.set_status(status)

    async def join(self, topic: str, *, load_history: int = 0) -> None:
        """Subscribe to a channel/dm/user topic (QoS 1) and track it for
        catch-up; ``load_history`` > 0 also loads that many recent events."""
        self.topics.parse(topic)  # only chat topics
        await self.client.subscribe(topic, qos=1)
        self.joined[topic] = None
        if load_history:
            await self.catch_up(topic, limit=load_history, max_pages=1)

    async def leave(self, topic: str) -> None:
        self.joined.pop(topic, None)
        await self.client.unsubscribe(topic)

    # -------------------------------------------------------------- sending

    async def send(self, topic: str, event: Event) -> None:
        """Publish ``event`` on ``topic`` with its type's QoS; typing and other
        ephemeral events are dropped while offline, never queued.

        The event is marked as seen, so its echo from the broker is not
        delivered back to this session.
        """
        if not event.sender:
            event.sender = self.user_id
        self.dedup.seen(event.id)
        await self.client.publish(topic, encode_event(event), qos=event.QOS,
                                  if_connected=event.EPHEMERAL,
                                  message_expiry=30 if event.EPHEMERAL else None)

    async def close(self) -> None:
        """Announce "offline" and stop routing (before leaving the client)."""
        try:
            with trio.move_on_after(2):
                await self.presence.go_offline()
        finally:
            self._route.remove()
            self._out.close()

    # ------------------------------------------------------------ receiving

    def _on_message(self, msg: Message) -> None:
        try:
            t = self.topics.parse(msg.topic)
        except ValueError:
            return
        if t.kind == "presence":
            self.tracker.update(msg.topic, msg.payload)
            if not msg.payload:
                return
        try:
            ev = decode_event(msg.payload)
        except EventDecodeError:
            self.invalid += 1
            return
        if t.kind != "presence" and self.dedup.seen(ev.id):
            return
        self._out.push(ChatDelivery(t, ev, False, msg))

    async def events(self) -> AsyncIterator[ChatDelivery]:
        """Decoded, de-duplicated events, until :meth:`close`."""
        while True:
            try:
                yield await self._out.pop()
            except trio.EndOfChannel:
                return

    async def next_event(self) -> ChatDelivery:
        """The next event (raises ``trio.EndOfChannel`` after :meth:`close`)."""
        return await self._out.pop()

    # ------------------------------------------------------------- catch-up

    async def _on_connect(self, client, info) -> None:
        if self._out.closed:
            return  # this session was closed; the client lives on
        if info.connection_number <= max(self._base_connections, 1):
            return  # the first connection (made before or after we were created)
        # Presence: say we are back (the will may have marked us offline).
        if self.presence.status != "offline":
            await self.presence.set_status(self.presence.status)
        if self.catch_up_enabled and self.history_available is not False:
            for topic in list(self.joined):
                await self.catch_up(topic)

    async def catch_up(self, topic: str, *, limit: int | None = None,
                       max_pages: int | None = None) -> int:
        """Fetch recent history of ``topic`` and deliver the events not seen
        yet, oldest first; stops at the first page holding a known event.

        Returns:
            How many events were delivered.
        """
        t = self.topics.parse(topic)
        found: list[Event] = []
        try:
            async for page in iter_history(self.client, topic,
                                           limit=limit or self.history_limit,
                                           max_pages=max_pages or self.history_pages,
                                           timeout=self.history_timeout):
                self.history_available = True
                reached_known = False
                for entry in reversed(page.messages):  # newest first
                    try:
                        ev = decode_event(entry.payload)
                    except EventDecodeError:
                        continue
                    if ev.id in self.dedup:
                        reached_known = True
                        continue
                    found.append(ev)
                if reached_known:
                    break
        except HistoryError as exc:
            if self.history_available is None:
                self.history_available = False
            log.info("history catch-up of %r failed: %s", topic, exc)
        n = 0
        for ev in reversed(found):  # oldest first
            if not self.dedup.seen(ev.id):
                self._out.push(ChatDelivery(t, ev, True, None))
                n += 1
        return n

    # ------------------------------------------------------------- helpers

    def status_of(self, user_id: str) -> str:
        """The folded presence of ``user_id``."""
        return self.tracker.status(user_id)


del UserStatus
