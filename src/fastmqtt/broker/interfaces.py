"""Seams between the broker core and the parts plugged into it.

The core (``fastmqtt.broker.core``) is synchronous and calls these objects; the
trio edge (``fastmqtt.broker.server``) awaits the few asynchronous calls. Each
has a do-nothing or allow-everything default so the core runs without them.

* :class:`Store` — persistence of sessions, queues, in-flight state, retained
  messages and wills (``fastmqtt.store``: memory and SQLite).
* :class:`Authenticator` / :class:`Authorizer` — passwords and ACLs
  (``fastmqtt.broker.auth`` / ``fastmqtt.broker.acl``).
* :class:`Stats` — the counters that feed ``$SYS`` and Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Store", "NullStore", "Snapshot", "SessionRecord", "SubscriptionRecord",
    "DeliveryRecord", "Authenticator", "Authorizer", "AllowAll", "Stats",
]


# --------------------------------------------------------------------------- store

@dataclass
class SubscriptionRecord:
    topic_filter: str  # as subscribed, "$share/g/f" included
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int = 0


@dataclass(slots=True)  # one per stored delivery change: no __dict__ to build
class DeliveryRecord:
    """One message owed to one persistent session.

    state: "queued" (not sent yet), "sent" (PUBLISH sent, awaiting PUBACK or
    PUBREC), "released" (QoS 2: PUBREL sent, awaiting PUBCOMP).
    """

    msg_id: int
    qos: int
    packet_id: int = 0
    state: str = "queued"
    retain: bool = False  # the RETAIN flag it is sent with (Retain As Published)
    subids: tuple[int, ...] = ()  # subscription identifiers it is sent with [MQTT-3.3.4-3]


@dataclass
class SessionRecord:
    client_id: str
    expiry_interval: int  # seconds; 0xFFFFFFFF = never
    protocol_level: int
    disconnected_at: float | None  # wall-clock time.time(); None while connected
    subscriptions: list[SubscriptionRecord] = field(default_factory=list)
    deliveries: list[DeliveryRecord] = field(default_factory=list)  # in queue order
    incoming_qos2: set[int] = field(default_factory=set)  # packet ids awaiting PUBREL
    username: str | None = None  # of its last CONNECT: ACLs apply to it while it is away


@dataclass
class Snapshot:
    """Everything ``Store.open`` recovers. Messages are stored once and shared by
    every delivery that refers to them (and by the retained store)."""

    sessions: list[SessionRecord] = field(default_factory=list)
    messages: dict[int, tuple[Any, float | None]] = field(default_factory=dict)  # msg_id -> (Publish, expires_at)
    retained: list[tuple[str, Any, float | None]] = field(default_factory=list)  # (topic, Publish, expires_at)
    wills: list[tuple[str, Any, float]] = field(default_factory=list)  # (client_id, Publish, due_at)
    next_msg_id: int = 1


class Store(Protocol):
    """Persistent broker state.

    Every mutator is synchronous and cheap: it records the change in the current
    batch and returns at once (never blocks the trio loop). ``mark()`` returns a
    ticket covering everything recorded so far; ``await durable(ticket)``
    returns once all of it is committed per the durability mode (``sync``:
    fsynced). The broker sends PUBACK/PUBREC only after that [issue 5]. Messages
    are ``fastmqtt.Publish`` packets; times are wall-clock ``time.time()``.
    """

    def open(self) -> Snapshot: ...  # blocking; once, before serving
    def mark(self) -> int: ...
    async def durable(self, ticket: int) -> None: ...
    async def aclose(self) -> None: ...

    def put_session(self, client_id: str, expiry_interval: int, protocol_level: int,
                    disconnected_at: float | None, username: str | None = None) -> None: ...
    def delete_session(self, client_id: str) -> None: ...  # and all that hangs on it
    def put_subscription(self, client_id: str, sub: SubscriptionRecord) -> None: ...
    def delete_subscription(self, client_id: str, topic_filter: str) -> None: ...

    def put_message(self, msg_id: int, publish: Any, expires_at: float | None) -> None: ...
    def add_delivery(self, client_id: str, delivery: DeliveryRecord) -> None: ...
    def update_delivery(self, client_id: str, delivery: DeliveryRecord) -> None: ...  # qos, packet id, state (retain, subids stay as added)
    def remove_delivery(self, client_id: str, msg_id: int) -> None: ...  # message row dropped when unreferenced
    # Optional, for speed: add_delivery_fields(client_id, msg_id, qos, packet_id,
    # state, retain, subids) and update_delivery_fields(client_id, msg_id, qos,
    # packet_id, state), the same changes without a DeliveryRecord to build, and
    # put_message_fields(msg_id, topic, payload, qos, retain, properties,
    # expires_at), put_message without a Publish, and put_message_add_delivery
    # (those seven, then client_id, qos, packet_id, state, retain, subids of
    # the delivery): both for a message's first persistent receiver, in one
    # call. The core uses them where a store has them (the SQLite store does),
    # and passes the message object itself last (``src``: its topic, payload,
    # qos, retain, props and expires_at), to put_message_add_delivery and
    # add_delivery_fields alike, so a store need not keep a copy of the
    # fields to store a released message again.

    def put_incoming_qos2(self, client_id: str, packet_id: int) -> None: ...
    def delete_incoming_qos2(self, client_id: str, packet_id: int) -> None: ...

    def put_retained(self, topic: str, publish: Any, expires_at: float | None) -> None: ...
    def delete_retained(self, topic: str) -> None: ...

    def put_will(self, client_id: str, publish: Any, due_at: float) -> None: ...
    def delete_will(self, client_id: str) -> None: ...


class NullStore:
    """Keeps nothing: the broker runs purely in memory (``--no-persistence``)."""

    persistent = False

    def open(self) -> Snapshot:
        return Snapshot()

    def mark(self) -> int:
        return 0

    async def durable(self, ticket: int) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _noop(self, *args, **kwargs) -> None:
        return None

    put_session = delete_session = put_subscription = delete_subscription = _noop
    put_message = add_delivery = update_delivery = remove_delivery = _noop
    put_incoming_qos2 = delete_incoming_qos2 = _noop
    put_retained = delete_retained = put_will = delete_will = _noop


# --------------------------------------------------------------------- security

class Authenticator(Protocol):
    """Checks a CONNECT. Returns a reason code: 0 accept, 0x86 bad user name or
    password, 0x87 not authorized, 0x8C bad authentication method. Anything slow
    (hashing, HTTP) runs off the trio loop (``trio.to_thread``)."""

    async def authenticate(self, client_id: str, username: str | None,
                           password: bytes | None, connect: Any) -> int: ...


class Authorizer(Protocol):
    """Topic permissions; synchronous and fast (called on the hot path)."""

    def can_publish(self, client_id: str, username: str | None, topic: str) -> bool: ...
    def can_subscribe(self, client_id: str, username: str | None, topic_filter: str) -> bool: ...
    def can_receive(self, client_id: str, username: str | None, topic: str) -> bool: ...


class AllowAll:
    """Default authenticator and authorizer: everyone, everything."""

    async def authenticate(self, client_id, username, password, connect) -> int:
        return 0

    def can_publish(self, client_id, username, topic) -> bool:
        return True

    def can_subscribe(self, client_id, username, topic_filter) -> bool:
        return True

    def can_receive(self, client_id, username, topic) -> bool:
        return True


# ------------------------------------------------------------------------ stats

class Stats:
    """Counters kept by the broker core; ``$SYS`` topics and ``/metrics`` read them."""

    def __init__(self) -> None:
        self.started_at = 0.0  # time.time() at start
        self.clients_connected = 0
        self.clients_maximum = 0
        self.connections_total = 0  # accepted CONNECTs since start
        self.sessions_total = 0  # connected + persistent disconnected
        self.messages_received = 0  # PUBLISH packets in
        self.messages_sent = 0  # PUBLISH packets out
        self.bytes_received = 0
        self.bytes_sent = 0
        self.publish_dropped: dict[str, int] = {}  # reason -> count ("queue_full", "qos0_slow", "too_large", "expired", "not_authorized", ...)
        self.protocol_errors = 0
        self.connections_rejected: dict[str, int] = {}  # reason -> count ("max_connections", "connection_rate"), by the listeners
        self.retained_messages = 0
        self.subscriptions = 0
        self.queued_messages = 0  # across all sessions
        self.inflight_messages = 0
        self.store_commit_seconds = 0.0  # cumulative, with store_commits count
        self.store_commits = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.publish_dropped[reason] = self.publish_dropped.get(reason, 0) + n
