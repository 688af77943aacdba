"""Synchronous broker core: sessions, subscriptions, retained messages, wills.

Theory of operation
-------------------
The core owns every piece of broker state and never awaits: the trio edge
(``server.py``) hands it decoded packets from a connection's
:class:`~fastmqtt.session.ServerConnection` together with ``now`` (wall-clock
seconds, the unit the store uses), and the core answers by queueing bytes on
the connections concerned (``conn.write`` / ``conn.send_ack``) and by asking
connections to close (``conn.close``). The edge's writer tasks then send what
was queued. So "what to send" is the set of connection outboxes, filled in one
synchronous step per packet: easy to test without sockets and no task per
message.

State per client id is a :class:`ClientState` ("session" in the spec). It
outlives its connection when the session is persistent (v5 Session Expiry
Interval > 0, or 3.1.1 Clean Session 0) and then holds:

* its subscriptions live only in the shared :class:`TopicTrie`, keyed by the
  ClientState object itself so ``match`` hands back the state without a
  lookup (``trie.subscriptions(state)`` lists them);
* ``inflight``: packet id -> :class:`Outgoing`, QoS 1/2 messages sent and not
  yet acknowledged (state ``sent``) or PUBREL'd (``released``). Bounded by the
  client's Receive Maximum and ``max_inflight_messages`` [MQTT-4.9.0-2];
  re-sent with DUP=1 in order on reconnect [MQTT-4.4.0-1];
* ``queue``: messages waiting for a window slot, a connection, or a writer
  that stopped being slow; bounded by count and bytes (QoS 0 goes first);
* ``incoming_qos2``: packet ids of QoS 2 PUBLISHes received and not yet
  released: a PUBLISH with such an id is a re-send and is not delivered again
  (exactly once, method A of [MQTT-4.3.3-10..13]).

Hot path: a PUBLISH becomes one :class:`Message`, matched once in the trie.
For each receiver the outgoing bytes come from ``Message.templates``, keyed by
the variant (protocol version, QoS, retain, subscription ids, remaining
expiry, topic alias) and encoded at most once per variant; QoS>0 copies only
patch the packet id (``PublishTemplate.with_packet_id``).

Ordering [MQTT-4.6.0-*]: per client, messages are sent in the order they
were routed: while anything is queued, new messages join the queue behind it,
and the queue drains front first as the window opens.

Persistence: for persistent sessions every change goes to the ``Store`` at
once; the edge waits for ``store.durable(ticket)`` before the PUBACK/PUBREC
that a ticket covers goes out (``conn.send_ack``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from typing import Any

from ..codec import Connack, Publish, PublishTemplate, Suback, Unsuback, encode
from ..enums import PropertyId, ReasonCode
from ..errors import MalformedPacket
from ..topics import validate_topic_name
from ..trie import RetainedStore, TopicTrie
from .config import BrokerConfig
from .interfaces import (AllowAll, DeliveryRecord, NullStore, Snapshot, Stats,
                         SubscriptionRecord)

__all__ = ["BrokerCore", "ClientState", "Message", "Outgoing"]

log = logging.getLogger("fastmqtt.broker")

P = PropertyId
_NEVER = 0xFFFFFFFF
_EXPIRY = P.MESSAGE_EXPIRY_INTERVAL
_SUBID = P.SUBSCRIPTION_IDENTIFIER
_ALIAS = P.TOPIC_ALIAS
_WILL_DELAY = P.WILL_DELAY_INTERVAL
_PINGRESP = b"\xd0\x00"
_NO_IDS: frozenset = frozenset()  # shared empty incoming-QoS-2 set (saves ~200 B/session)
_DROP_PROPS = (_ALIAS, _SUBID)

# Queued and retained messages leave the cyclic GC (see fastmqtt._gcutil): they
# can be in no cycle, and with hundreds of thousands queued the collector
# walking them cost more than queueing them.
def _untrack(a: Any, b: Any = None) -> None:
    pass  # without the extensions (FASTMQTT_NO_EXTENSIONS=1): the GC walks them


if os.environ.get("FASTMQTT_NO_EXTENSIONS") != "1":
    try:
        from .._gcutil import untrack as _untrack  # noqa: F811
    except ImportError:  # pragma: no cover - a broken build: the GC walks them
        pass


class Message:
    """One application message inside the broker (shared by all its receivers)."""

    __slots__ = ("topic", "payload", "qos", "retain", "props", "expires_at", "msg_id",
                 "origin", "templates", "size")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, props,
                 expires_at: float | None = None, origin: str = "") -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props  # v5 properties to forward (no alias, no subscription ids)
        self.expires_at = expires_at
        self.msg_id = 0  # store id, assigned when first persisted
        self.origin = origin
        self.templates: dict = {}
        self.size = len(payload) + len(topic) + 16

    def to_publish(self, qos: int | None = None, retain: bool | None = None) -> Any:
        """The message as a ``Publish`` (for the store and for history)."""
        return Publish(self.topic, self.payload, self.qos if qos is None else qos,
                       self.retain if retain is None else retain, False, 0, self.props)

    @classmethod
    def from_publish(cls, pub, expires_at: float | None = None, origin: str = "") -> "Message":
        props = pub.properties
        if _ALIAS in props or _SUBID in props:
            props = {k: v for k, v in props.items() if k not in _DROP_PROPS}
        return cls(pub.topic, pub.payload, pub.qos, pub.retain, props, expires_at, origin)


class Outgoing:
    """One message owed to one client: queued, or in flight with a packet id."""

    __slots__ = ("msg", "qos", "retain", "subids", "packet_id", "state")

    def __init__(self, msg: Message, qos: int, retain: bool, subids: tuple,
                 packet_id: int = 0, state: str = "queued") -> None:
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.subids = subids
        self.packet_id = packet_id
        self.state = state  # queued | sent | released


class ClientState:
    """Session state of one client id (see the module docstring)."""

    __slots__ = ("client_id", "conn", "version", "expiry", "username", "inflight",
                 "queue", "queue_bytes", "queue_qos0", "incoming_qos2", "will", "will_delay", "next_pid",
                 "expires_at", "persisted", "__weakref__")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.conn = None
        self.version = 4
        self.expiry = 0  # seconds the session outlives its connection
        self.username: str | None = None
        self.inflight: dict[int, Outgoing] = {}
        # An empty tuple until something is queued: an empty deque costs ~600
        # bytes, and most sessions never queue anything.
        self.queue: deque[Outgoing] | tuple = ()
        self.queue_bytes = 0
        self.queue_qos0 = 0  # QoS 0 entries in ``queue`` (the first to drop when full)
        self.incoming_qos2: set[int] | frozenset = _NO_IDS  # a real set once used
        self.will: Message | None = None
        self.will_delay = 0
        self.next_pid = 1
        self.expires_at: float | None = None  # while disconnected
        self.persisted = False  # a session row exists in the store

    def __repr__(self) -> str:
        return f"<ClientState {self.client_id!r}>"

    def alloc_packet_id(self) -> int:
        """Next packet id not in flight [MQTT-2.2.1-3]; ids cycle 1..65535."""
        pid = self.next_pid
        inflight = self.inflight
        while pid in inflight:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        return pid


def _is_allow_all(obj) -> bool:
    return obj is None or isinstance(obj, AllowAll) or getattr(obj, "allows_all", False)


class BrokerCore:
    """The broker's state machine (synchronous, no I/O).

    Args:
        config: broker settings and limits.
        store: persistence (``interfaces.Store``); default keeps nothing.
        authorizer: topic permissions; default allows everything.
        stats: counters to keep up to date.
        history: optional chat history service (``record``/``handle_request``).
    """

    def __init__(self, config: BrokerConfig | None = None, store=None, authorizer=None,
                 stats: Stats | None = None, history=None) -> None:
        self.config = cfg = config or BrokerConfig()
        self.store = store if store is not None else NullStore()
        self.persistent_store = bool(getattr(self.store, "persistent", True)) and not isinstance(
            self.store, NullStore)
        # Messages and delivery changes with their fields as arguments where
        # the store offers that (no Publish or DeliveryRecord per change on
        # the hot path); otherwise built here for the store's plain methods.
        self._put_message = getattr(self.store, "put_message_fields", None) or self._put_record
        self._add_delivery = getattr(self.store, "add_delivery_fields", None) or self._add_record
        self._update_delivery = (getattr(self.store, "update_delivery_fields", None)
                                 or self._update_record)
        # A message's first persistent receiver: message and delivery in one call.
        self._put_and_add = (getattr(self.store, "put_message_add_delivery", None)
                             or self._put_and_add_record)
        # A NullStore (--no-persistence) keeps nothing: the core then makes no
        # store calls for its sessions (no message ids, records or tickets).
        self._keeps_sessions = not isinstance(self.store, NullStore)
        self.authorizer = authorizer if authorizer is not None else AllowAll()
        self.check_acl = not _is_allow_all(self.authorizer)
        self.stats = stats if stats is not None else Stats()
        self.history = history
        if history is not None and self.check_acl and getattr(history, "authorize", False) is None:
            # $history/<topic> requests read <topic>: only for clients the ACL
            # lets subscribe to and receive from it (see can_read_history).
            history.authorize = self.can_read_history
        self.trie = TopicTrie()
        self.trie.set_share_policy(self._share_policy)
        self.retained = RetainedStore()
        self.retained_bytes = 0
        self.clients: dict[str, ClientState] = {}
        self.pending_wills: dict[str, tuple[Message, float]] = {}
        self.next_msg_id = 1
        self._rr: dict[tuple[str, str], int] = {}
        self._next_purge = 0.0
        # Connections whose unsent bytes passed half of max_outgoing_bytes while
        # routing: the edge lets their writers catch up before it reads more
        # from the publisher (see server.Broker._backpressure).
        self.pressured: set = set()
        self.soft_out = max(1, cfg.max_outgoing_bytes // 2)
        self.soft_queue = max(1, cfg.max_queued_messages // 2) if cfg.max_queued_messages else 1 << 62
        self.max_out = cfg.max_outgoing_bytes
        self.max_inflight = cfg.max_inflight_messages
        self.max_queued = cfg.max_queued_messages
        self.max_queued_bytes = cfg.max_queued_bytes
        # Encoded successful CONNACKs (see connect), valid for this config object.
        self._connacks: dict[tuple, bytes] = {}
        self._connack_config = cfg

    # ================================================================ connect

    def reject(self, conn, reason_code: int, reason: str = "") -> None:
        """Refuse a CONNECT: CONNACK with ``reason_code`` (mapped for 3.1.1), then close.

        [MQTT-3.2.2-6]/[MQTT-3.2.2-7]: session present 0 with a non-zero code,
        and the connection is closed."""
        props = None
        if conn.version == 5 and reason and conn.request_problem_info:
            props = {P.REASON_STRING: reason[:200]}
        conn.send(Connack(False, reason_code, props))
        conn.close(None, reason or f"CONNACK 0x{reason_code:02X}")

    def connect(self, conn, pkt, now: float) -> bool:
        """Accept (or refuse) an authenticated CONNECT.

        Args:
            conn: the connection the CONNECT came in on.
            pkt: the ``Connect`` packet.
            now: wall-clock seconds.

        Returns:
            True when the client is now connected; False when a CONNACK with an
            error was queued and the connection is closing.
        """
        cfg = self.config
        version = pkt.protocol_level
        v5 = version == 5
        props = pkt.properties
        cid = pkt.client_id
        assigned = None
        if v5:
            conn.request_problem_info = props.get(P.REQUEST_PROBLEM_INFORMATION, 1) == 1
            if P.AUTHENTICATION_METHOD in props:
                # Enhanced authentication (AUTH exchanges) is not offered
                # [MQTT-4.12.0-1]: refuse the method rather than ignore it.
                self.reject(conn, ReasonCode.BAD_AUTHENTICATION_METHOD,
                            "authentication method not supported")
                return False
        if not cid:
            # [MQTT-3.1.3-6]/[MQTT-3.1.3-7] zero-length id: assign one (v5
            # always; 3.1.1 only with Clean Session 1, else 0x02 [MQTT-3.1.3-8]).
            if v5 or (version == 4 and pkt.clean_start):
                cid = assigned = "fastmqtt-" + uuid.uuid4().hex[:20]
            else:
                self.reject(conn, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                            "empty client id needs clean session [MQTT-3.1.3-8]")
                return False
        if len(cid) > cfg.max_client_id_length:
            self.reject(conn, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "client id too long")
            return False
        if pkt.will is not None:
            try:
                validate_topic_name(pkt.will.topic)
            except MalformedPacket as exc:
                # The will is published as a PUBLISH, so its topic obeys the
                # topic-name rules [MQTT-3.3.2-2]: refuse it now rather than
                # fail when the will fires.
                self.reject(conn, ReasonCode.TOPIC_NAME_INVALID, f"will topic: {exc}")
                return False
        conn.client_id = cid
        conn.username = pkt.username

        # Keep alive; v5 Server Keep Alive overrides a larger (or zero) value.
        ka = pkt.keep_alive
        server_ka = None
        if v5 and cfg.max_keepalive < 65535 and (ka == 0 or ka > cfg.max_keepalive):
            ka = server_ka = cfg.max_keepalive
        conn.keep_alive = ka

        if v5:
            conn.send_quota = props.get(P.RECEIVE_MAXIMUM, 65535)
            conn.out_max_packet_size = props.get(P.MAXIMUM_PACKET_SIZE, 268_435_460)
            conn.out_alias_maximum = (props.get(P.TOPIC_ALIAS_MAXIMUM, 0)
                                      if cfg.outbound_topic_aliases else 0)
            requested = props.get(P.SESSION_EXPIRY_INTERVAL, 0)
            expiry = min(requested, cfg.max_session_expiry)
        else:
            requested = expiry = 0 if pkt.clean_start else cfg.persistent_session_expiry

        cs = self.clients.get(cid)
        if cs is not None:
            old = cs.conn
            if old is not None:
                # Session takeover [MQTT-3.1.4-3]: the older connection goes.
                log.info("client %s: session taken over by a new connection", cid)
                old.will_on_close = False
                old.close(ReasonCode.SESSION_TAKEN_OVER, "session taken over",
                          "another connection used this client id")
                self._detach(cs, old, now, will=True, takeover_clean=pkt.clean_start)
            self._cancel_pending_will(cid)  # reconnected in time [MQTT-3.1.3-9]
            if self.clients.get(cid) is not cs:
                cs = None  # the old session ended with its connection (expiry 0)
            elif pkt.clean_start or (cs.expires_at is not None and cs.expires_at <= now):
                self._end_session(cs, now)
                cs = None
        else:
            self._cancel_pending_will(cid)
        session_present = cs is not None
        if cs is None:
            cs = ClientState(cid)
            self.clients[cid] = cs
        cs.conn = conn
        conn.client = cs
        cs.version = version
        cs.expiry = expiry
        cs.expires_at = None
        cs.username = pkt.username
        cs.will = None
        cs.will_delay = 0
        will = pkt.will
        if will is not None:
            wprops = will.properties
            delay = wprops.get(_WILL_DELAY, 0) if v5 else 0
            expires_at = None
            if v5 and _EXPIRY in wprops:
                expires_at = None  # counted from when the will is published
            msg = Message(will.topic, will.payload, will.qos, will.retain,
                          {k: v for k, v in wprops.items() if k != _WILL_DELAY} if wprops else wprops,
                          expires_at, cid)
            cs.will = msg
            cs.will_delay = delay

        store = self.store
        if expiry > 0 and self._keeps_sessions:
            store.put_session(cid, expiry, version, None, cs.username)
            cs.persisted = True
        elif cs.persisted:
            store.delete_session(cid)
            cs.persisted = False

        # CONNACK [MQTT-3.2.2-1..3]: session present only when a session resumed.
        # Its bytes depend on a few values only (unless an id was assigned):
        # encoded once per combination, not once per connect.
        key = (version, session_present, server_ka, expiry if expiry != requested else None)
        if assigned is None and self._connack_config is cfg:
            data = self._connacks.get(key)
            if data is not None:
                conn.write(data)
            else:
                data = conn.send(self._connack(cfg, session_present, server_ka, expiry,
                                               requested, assigned, v5))
                if len(self._connacks) < 64:
                    self._connacks[key] = data
        else:
            conn.send(self._connack(cfg, session_present, server_ka, expiry, requested,
                                    assigned, v5))

        st = self.stats
        st.connections_total += 1
        st.clients_connected += 1
        if st.clients_connected > st.clients_maximum:
            st.clients_maximum = st.clients_connected
        st.sessions_total = len(self.clients)

        if session_present:
            self._resume(cs, conn, now)
        return True

    @staticmethod
    def _connack(cfg: BrokerConfig, session_present: bool, server_ka: int | None, expiry: int,
                 requested: int, assigned: str | None, v5: bool):
        cprops = None
        if v5:
            cprops = {
                P.RECEIVE_MAXIMUM: cfg.receive_maximum,
                P.TOPIC_ALIAS_MAXIMUM: cfg.topic_alias_maximum,
                P.WILDCARD_SUBSCRIPTION_AVAILABLE: int(cfg.wildcard_subscriptions),
                P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: int(cfg.subscription_identifiers),
                P.SHARED_SUBSCRIPTION_AVAILABLE: int(cfg.shared_subscriptions),
                P.RETAIN_AVAILABLE: int(cfg.retain_available),
            }
            if cfg.max_qos < 2:
                cprops[P.MAXIMUM_QOS] = cfg.max_qos
            if cfg.max_packet_size < 268_435_460:
                cprops[P.MAXIMUM_PACKET_SIZE] = cfg.max_packet_size
            if not cfg.topic_alias_maximum:
                del cprops[P.TOPIC_ALIAS_MAXIMUM]
            if server_ka is not None:
                cprops[P.SERVER_KEEP_ALIVE] = server_ka
            if expiry != requested:
                cprops[P.SESSION_EXPIRY_INTERVAL] = expiry
            if assigned:
                cprops[P.ASSIGNED_CLIENT_IDENTIFIER] = assigned
        return Connack(session_present, 0, cprops)

    def _resume(self, cs: ClientState, conn, now: float) -> None:
        """Re-send in-flight messages with DUP and PUBRELs in order [MQTT-4.4.0-1]."""
        if cs.inflight:
            for og in list(cs.inflight.values()):
                if og.state == "released":
                    conn.write(_pubrel(og.packet_id))
                    continue
                data = self._encode(conn, og.msg, og.qos, og.retain, og.subids, now,
                                    og.packet_id, True)
                if data is None:  # too large or expired: treat as delivered
                    del cs.inflight[og.packet_id]
                    self._finish(cs, og)
                    continue
                conn.write(data)
                self.stats.messages_sent += 1
        self.pump(cs, now)

    # ============================================================= disconnect

    def connection_lost(self, conn, now: float) -> None:
        """The connection ended (any reason). Publish or schedule the will when
        the client did not send DISCONNECT 0x00 [MQTT-3.1.2-8]/[MQTT-3.1.2-10],
        then detach or end the session.

        Args:
            conn: the connection.
            now: wall-clock seconds.
        """
        cs = conn.client
        if cs is None or cs.conn is not conn:
            return  # never connected, or already taken over
        self._detach(cs, conn, now, will=conn.will_on_close)

    def _detach(self, cs: ClientState, conn, now: float, will: bool,
                takeover_clean: bool = False) -> None:
        cs.conn = None
        conn.client = None
        st = self.stats
        st.clients_connected -= 1
        msg = cs.will
        cs.will = None
        if msg is not None and will:
            delay = cs.will_delay
            if delay and not takeover_clean:
                # v5 Will Delay: publish after min(delay, session expiry) unless the
                # client comes back first [MQTT-3.1.3-9].
                due = now + min(delay, cs.expiry)
                self.pending_wills[cs.client_id] = (msg, due)
                if cs.expiry:
                    self.store.put_will(cs.client_id, msg.to_publish(), due)
            else:
                self._publish_will(msg, now)
        if cs.expiry == 0:
            self._end_session(cs, now)
            return
        cs.expires_at = now + cs.expiry if cs.expiry != _NEVER else None
        if cs.persisted:
            self.store.put_session(cs.client_id, cs.expiry, cs.version, now, cs.username)
        # QoS 1/2 in flight stay for the resend; the writer lost what it had.

    def _end_session(self, cs: ClientState, now: float) -> None:
        """Discard a session: subscriptions, queue, in-flight state."""
        self.trie.remove_subscriber(cs)
        if self.clients.get(cs.client_id) is cs:
            del self.clients[cs.client_id]
        if cs.persisted:
            self.store.delete_session(cs.client_id)
            cs.persisted = False
        cs.inflight.clear()
        cs.queue = ()
        cs.queue_bytes = 0
        cs.queue_qos0 = 0
        cs.incoming_qos2 = _NO_IDS
        pending = self.pending_wills.pop(cs.client_id, None)
        if pending is not None:
            # Session over before the will delay: publish now [MQTT-3.1.3-9].
            self.store.delete_will(cs.client_id)
            self._publish_will(pending[0], now)
        self.stats.sessions_total = len(self.clients)
        self.stats.subscriptions = len(self.trie)

    def _cancel_pending_will(self, cid: str) -> None:
        if self.pending_wills.pop(cid, None) is not None:
            self.store.delete_will(cid)

    def _publish_will(self, msg: Message, now: float) -> None:
        if _EXPIRY in msg.props:
            msg.expires_at = now + msg.props[_EXPIRY]
        origin = self.clients.get(msg.origin)
        if self.check_acl and not self.authorizer.can_publish(
                msg.origin, origin.username if origin else None, msg.topic):
            self.stats.drop("not_authorized")
            return
        log.debug("publishing will of %s to %s", msg.origin, msg.topic)
        if msg.retain:
            self._retain(msg)
        self._route(msg, None, now)

    # ================================================================ packets

    def handle(self, conn, pkt, now: float) -> None:
        """Handle one packet from a connected client (anything but CONNECT).

        Args:
            conn: the connection (its ``client`` is the session).
            pkt: the decoded packet (topic aliases already resolved).
            now: wall-clock seconds.
        """
        t = pkt.packet_type
        if t == 3:
            self.handle_publish(conn, pkt, now)
        elif t == 4:
            self.handle_puback(conn, pkt, now)
        elif t == 5:
            self.handle_pubrec(conn, pkt, now)
        elif t == 6:
            self.handle_pubrel(conn, pkt, now)
        elif t == 7:
            self.handle_pubcomp(conn, pkt, now)
        elif t == 8:
            self.handle_subscribe(conn, pkt, now)
        elif t == 10:
            self.handle_unsubscribe(conn, pkt, now)
        elif t == 12:
            conn.write(_PINGRESP)
        elif t == 14:
            self.handle_disconnect(conn, pkt, now)

    def protocol_error(self, conn, reason_code: int, message: str) -> None:
        """Close ``conn`` for breaking the protocol (v5: DISCONNECT ``reason_code``)."""
        self.stats.protocol_errors += 1
        log.warning("client %s (%s): protocol violation 0x%02X: %s", conn.client_id or "?",
                    conn.peer, reason_code, message)
        conn.close(reason_code, f"protocol violation: {message}", message)

    # ---------------------------------------------------------------- publish

    def handle_publish(self, conn, pkt, now: float) -> None:
        cs = conn.client
        st = self.stats
        st.messages_received += 1
        qos = pkt.qos
        pid = pkt.packet_id
        v5 = conn.version == 5
        if qos == 2:
            inc = cs.incoming_qos2
            if pid in inc:
                # A re-sent QoS 2 PUBLISH: acknowledge, do not deliver again [MQTT-4.3.3-10].
                conn.send_ack(0, _ack(0x50, pid, 0))
                return
            if len(inc) >= self.config.receive_maximum:
                self.protocol_error(conn, ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                                    "more QoS 2 PUBLISH in flight than Receive Maximum [MQTT-3.3.4-7]")
                return
        elif qos == 1 and len(conn.acks) >= self.config.receive_maximum:
            # PUBACKs still owed (waiting for the store): the client has more
            # QoS 1 messages in flight than our Receive Maximum [MQTT-3.3.4-7].
            self.protocol_error(conn, ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                                "more QoS 1 PUBLISH in flight than Receive Maximum [MQTT-3.3.4-7]")
            return
        topic = pkt.topic
        rc = 0
        routed = True
        if self.check_acl and not self.authorizer.can_publish(cs.client_id, cs.username, topic):
            st.drop("not_authorized")
            # v5: tell the publisher; 3.1.1: acknowledge normally and drop (as Mosquitto).
            rc = ReasonCode.NOT_AUTHORIZED if v5 else -1
        elif topic[0] == "$":
            if topic.startswith("$SYS"):
                rc = ReasonCode.NOT_AUTHORIZED if v5 else -1  # clients may not write $SYS
            elif topic.startswith("$history/") and self.history is not None:
                # A history request is answered, not fanned out.
                self._history_request(cs, pkt, now)
                routed = False
        if rc == 0 and routed:
            props = pkt.properties
            expires_at = None
            if props and _EXPIRY in props:
                expires_at = now + props[_EXPIRY]
            msg = Message.from_publish(pkt, expires_at, cs.client_id)
            if pkt.retain:
                self._retain(msg)
            history = self.history
            if history is not None and topic[0] != "$" and history.matches(topic):
                try:
                    history.record(pkt, now)
                except Exception:  # history must never break delivery
                    log.exception("history.record failed")
            n = self._route(msg, cs, now)
            if v5 and n == 0:
                rc = ReasonCode.NO_MATCHING_SUBSCRIBERS
        if qos == 0:
            return
        if rc < 0:
            rc = 0
        ticket = self.store.mark() if self.persistent_store else 0
        if qos == 1:
            conn.send_ack(ticket, _ack(0x40, pid, rc if v5 else 0))
        else:
            if rc < 0x80:
                if not cs.incoming_qos2:
                    cs.incoming_qos2 = set()
                cs.incoming_qos2.add(pid)
                if cs.persisted:
                    self.store.put_incoming_qos2(cs.client_id, pid)
                    ticket = self.store.mark()
            conn.send_ack(ticket, _ack(0x50, pid, rc if v5 else 0))

    def handle_pubrel(self, conn, pkt, now: float) -> None:
        cs = conn.client
        pid = pkt.packet_id
        ticket = 0
        if pid in cs.incoming_qos2:
            cs.incoming_qos2.discard(pid)
            if cs.persisted:
                self.store.delete_incoming_qos2(cs.client_id, pid)
                # PUBCOMP frees the id for reuse by the publisher [MQTT-4.3.3-13]:
                # a crash must not bring the old id back, so wait for the commit.
                if self.persistent_store:
                    ticket = self.store.mark()
            rc = 0
        else:
            rc = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if conn.version == 5 else 0
        conn.send_ack(ticket, _ack(0x70, pid, rc))

    def handle_puback(self, conn, pkt, now: float) -> None:
        cs = conn.client
        og = cs.inflight.get(pkt.packet_id)
        if og is None or og.qos != 1:
            return  # unknown id: ignore, as Mosquitto does
        del cs.inflight[pkt.packet_id]
        self._finish(cs, og)
        if cs.queue:
            self.pump(cs, now)

    def handle_pubrec(self, conn, pkt, now: float) -> None:
        cs = conn.client
        pid = pkt.packet_id
        og = cs.inflight.get(pid)
        if og is None or og.qos != 2:
            if conn.version == 5:
                conn.write(_ack(0x62, pid, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
            return
        if pkt.reason_code >= 0x80:
            # The receiver refused it: the flow ends here [MQTT-4.3.3-4 note].
            del cs.inflight[pid]
            self._finish(cs, og)
            if cs.queue:
                self.pump(cs, now)
            return
        og.state = "released"
        ticket = 0
        if cs.persisted and og.msg.msg_id:
            self._update_delivery(cs.client_id, og.msg.msg_id, 2, pid, "released")
            # After a crash the resend must be this PUBREL, not the PUBLISH
            # [MQTT-4.4.0-1]: the PUBREL leaves once the new state is committed.
            if self.persistent_store:
                ticket = self.store.mark()
        conn.send_ack(ticket, _pubrel(pid))

    def handle_pubcomp(self, conn, pkt, now: float) -> None:
        cs = conn.client
        og = cs.inflight.get(pkt.packet_id)
        if og is None or og.qos != 2:
            return
        del cs.inflight[pkt.packet_id]
        self._finish(cs, og)
        if cs.queue:
            self.pump(cs, now)

    def _finish(self, cs: ClientState, og: Outgoing) -> None:
        if cs.persisted and og.msg.msg_id:
            self.store.remove_delivery(cs.client_id, og.msg.msg_id)

    # ------------------------------------------------------------- subscribe

    def handle_subscribe(self, conn, pkt, now: float) -> None:
        cs = conn.client
        cfg = self.config
        v5 = conn.version == 5
        subids = pkt.properties.get(_SUBID, ()) if v5 else ()
        subid = subids[0] if subids else 0
        if subid and not cfg.subscription_identifiers:
            self.protocol_error(conn, ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                                "subscription identifiers are not supported")
            return
        codes = []
        to_send = []
        for sub in pkt.subscriptions:
            f = sub.topic_filter
            shared = f.startswith("$share/")
            if shared and not cfg.shared_subscriptions:
                codes.append(0x9E if v5 else 0x80)
                continue
            if not cfg.wildcard_subscriptions and ("+" in f or "#" in f):
                codes.append(0xA2 if v5 else 0x80)
                continue
            if self.check_acl and not self.authorizer.can_subscribe(cs.client_id, cs.username, f):
                codes.append(0x87 if v5 else 0x80)
                continue
            granted = min(sub.qos, cfg.max_qos)
            try:
                new = self.trie.subscribe(cs, f, granted, sub.no_local, sub.retain_as_published,
                                          sub.retain_handling, subid)
            except MalformedPacket as exc:
                if exc.reason_code == 0x82:  # no-local on a shared subscription [MQTT-3.8.3-4]
                    self.protocol_error(conn, 0x82, str(exc))
                    return
                codes.append(0x8F if v5 else 0x80)
                continue
            if cs.persisted:
                self.store.put_subscription(cs.client_id, SubscriptionRecord(
                    f, granted, sub.no_local, sub.retain_as_published, sub.retain_handling, subid))
            codes.append(granted)
            # Retained messages on subscribe [MQTT-3.3.1-9..11]; never for shared
            # subscriptions (section 4.8.2: retained messages are not sent to shared ones).
            rh = sub.retain_handling
            if not shared and (rh == 0 or (rh == 1 and new)):
                to_send.append((f, granted, (subid,) if subid else ()))
        self._send_after_commit(cs, conn, Suback(pkt.packet_id, codes))
        self.stats.subscriptions = len(self.trie)
        for f, granted, sids in to_send:
            for topic, msg in self.retained.match(f, now):
                if self.check_acl and not self.authorizer.can_receive(cs.client_id, cs.username, topic):
                    continue
                self._deliver(cs, msg, msg.qos if msg.qos < granted else granted, True, sids, now)

    def handle_unsubscribe(self, conn, pkt, now: float) -> None:
        cs = conn.client
        codes = []
        for f in pkt.topic_filters:
            try:
                removed = self.trie.unsubscribe(cs, f)
            except MalformedPacket:
                codes.append(0x8F)
                continue
            if removed:
                if cs.persisted:
                    self.store.delete_subscription(cs.client_id, f)
            codes.append(0x00 if removed else 0x11)  # [MQTT-3.11.3-1]
        self._send_after_commit(cs, conn, Unsuback(pkt.packet_id, codes))
        self.stats.subscriptions = len(self.trie)

    def _send_after_commit(self, cs: ClientState, conn, packet) -> None:
        """Send an acknowledgement of a persistent session's state change only
        once the store committed it: a SUBACK promises that messages published
        after it reach the subscriber, even across a crash. (The Server may
        send matching PUBLISHes before the SUBACK, section 3.8.4.)"""
        ticket = self.store.mark() if cs.persisted and self.persistent_store else 0
        conn.send_ack(ticket, encode(packet, conn.version or 4))

    def handle_disconnect(self, conn, pkt, now: float) -> None:
        cs = conn.client
        if conn.version == 5:
            new = pkt.properties.get(P.SESSION_EXPIRY_INTERVAL)
            if new is not None:
                if cs.expiry == 0 and new != 0:
                    # [MQTT-3.14.2-2] from zero to non-zero is a Protocol Error.
                    conn.will_on_close = True
                    self.protocol_error(conn, 0x82, "Session Expiry Interval changed from 0 [MQTT-3.14.2-2]")
                    return
                cs.expiry = min(new, self.config.max_session_expiry)
        reason = "normal disconnect" if pkt.reason_code == 0 else f"DISCONNECT 0x{pkt.reason_code:02X}"
        conn.close(None, reason)

    # ================================================================ routing

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties=None, now: float = 0.0) -> int:
        """Publish a message from inside the broker ($SYS, history answers, plug-ins).

        Args:
            topic: topic name.
            payload: message body.
            qos: 0, 1 or 2.
            retain: keep as the topic's retained message.
            properties: v5 properties to forward.
            now: wall-clock seconds.

        Returns:
            How many receivers it was routed to.
        """
        props = properties or {}
        expires_at = now + props[_EXPIRY] if _EXPIRY in props else None
        msg = Message(topic, payload, qos, retain, props, expires_at, "")
        if retain:
            self._retain(msg)
        return self._route(msg, None, now)

    def _history_request(self, cs: ClientState, pkt, now: float) -> None:
        try:
            answers = self.history.handle_request(pkt, cs.client_id, now)
        except Exception:
            log.exception("history request from %s failed", cs.client_id)
            return
        for pub in answers or ():
            props = pub.properties
            expires_at = now + props[_EXPIRY] if props and _EXPIRY in props else None
            self._route(Message.from_publish(pub, expires_at, ""), None, now)

    def can_read_history(self, client_id: str, topic: str) -> bool:
        """The ``authorize`` hook of the history service: may ``client_id`` read
        the history of ``topic``? Only if the ACL would let it subscribe to
        ``topic`` and deliver ``topic``'s messages to it, so ``$history/``
        never reveals what a live subscription could not (a denied request is
        answered with ``"error": "not authorized"``).

        Args:
            client_id: the requesting (connected) client.
            topic: the topic name whose history is asked for.

        Returns:
            True when allowed.
        """
        cs = self.clients.get(client_id)
        username = cs.username if cs is not None else None
        auth = self.authorizer
        return bool(auth.can_subscribe(client_id, username, topic)
                    and auth.can_receive(client_id, username, topic))

    def drop_stale_subscriptions(self) -> int:
        """Remove every subscription the authorizer no longer allows (after an
        ACL reload): from the trie and, for persistent sessions, from the store.

        Deliveries are checked with ``can_receive`` either way, so this is about
        not keeping (and persisting, and counting) subscriptions the new rules
        would have refused with SUBACK 0x87. Sessions restored from the store
        are judged by the user name they last connected with (persisted).

        Returns:
            How many subscriptions were removed.
        """
        if not self.check_acl:
            return 0
        from .acl import stale_subscriptions

        trie = self.trie
        subs = [(cs.client_id, cs.username, sub[0]) for cs in self.clients.values()
                for sub in trie.subscriptions(cs)]
        removed = 0
        for cid, topic_filter in stale_subscriptions(self.authorizer, subs):
            cs = self.clients.get(cid)
            if cs is None or not trie.unsubscribe(cs, topic_filter):
                continue
            removed += 1
            if cs.persisted:
                self.store.delete_subscription(cid, topic_filter)
            log.info("client %s: subscription %r removed, no longer allowed by the ACL",
                     cid, topic_filter)
        self.stats.subscriptions = len(trie)
        return removed

    def _retain(self, msg: Message) -> None:
        """Store, replace or (empty payload) delete a retained message [MQTT-3.3.1-5..7]."""
        topic = msg.topic
        old = self.retained.get(topic)
        if not msg.payload:
            if old is not None:
                self.retained.delete(topic)
                self.retained_bytes -= len(old.payload)
                self.store.delete_retained(topic)
        else:
            cfg = self.config
            if old is None and (len(self.retained) >= cfg.max_retained_messages or
                                self.retained_bytes + len(msg.payload) > cfg.max_retained_bytes):
                self.stats.drop("retained_full")
                return
            self.retained.set(topic, msg, msg.expires_at)
            _untrack(msg)
            self.retained_bytes += len(msg.payload) - (len(old.payload) if old is not None else 0)
            self.store.put_retained(topic, msg.to_publish(retain=True), msg.expires_at)
        self.stats.retained_messages = len(self.retained)

    def _route(self, msg: Message, origin: ClientState | None, now: float) -> int:
        """Deliver ``msg`` to every matching subscriber; returns how many."""
        matches = self.trie.match(msg.topic, origin)
        if not matches:
            return 0
        mqos = msg.qos
        mretain = msg.retain
        check = self.check_acl
        deliver = self._deliver
        if msg.expires_at is not None and msg.expires_at <= now:
            self.stats.drop("expired", len(matches))
            return 0
        # Fast path, inlined: a connected receiver without outbound aliases,
        # not slow, nothing queued and a free window slot. The encoded variant
        # is looked up in a per-call dict keyed by what differs between
        # receivers; the remaining expiry is the same for all of them here.
        local: dict = {}
        max_out = self.max_out
        max_inflight = self.max_inflight
        template = self._template
        soft_out = self.soft_out
        pressured = self.pressured
        sent = 0
        for cs, qos, rap, subids in matches:
            if check and not self.authorizer.can_receive(cs.client_id, cs.username, msg.topic):
                self.stats.drop("not_authorized")
                continue
            # [MQTT-3.8.4-8] QoS is the lower of the message's and the subscription's;
            # retain is kept only with Retain As Published [MQTT-3.3.1-12/13].
            q = mqos if mqos < qos else qos
            retain = mretain and rap
            conn = cs.conn
            if (conn is None or conn.out_alias_maximum or conn.out_bytes > max_out
                    or (q and (cs.queue or len(cs.inflight) >= max_inflight
                               or len(cs.inflight) >= conn.send_quota))):
                deliver(cs, msg, q, retain, subids, now)
                continue
            key = (conn.version == 5, q, retain, subids)
            tpl = local.get(key)
            if tpl is None:
                tpl = template(conn, msg, q, retain, subids, now)
                if tpl is None:
                    continue
                local[key] = tpl
            data = tpl.data
            if len(data) > conn.out_max_packet_size:
                self.stats.drop("too_large")  # [MQTT-3.1.2-25]
                continue
            if q:
                pid = cs.alloc_packet_id()
                cs.inflight[pid] = Outgoing(msg, q, retain, subids, pid, "sent")
                data = tpl.with_packet_id(pid)
                if cs.persisted:
                    mid = msg.msg_id
                    if mid:
                        self._add_delivery(cs.client_id, mid, q, pid, "sent", retain, subids, msg)
                    else:  # _persist_msg and _add_delivery, inlined: once per message
                        mid = msg.msg_id = self.next_msg_id
                        self.next_msg_id = mid + 1
                        self._put_and_add(mid, msg.topic, msg.payload, msg.qos, msg.retain,
                                          msg.props, msg.expires_at, cs.client_id, q, pid,
                                          "sent", retain, subids, msg)
            outbox = conn.outbox
            outbox.append(data)
            conn.out_bytes += len(data)
            if len(outbox) == 1 and conn.on_output is not None:
                conn.on_output()
            elif conn.out_bytes > soft_out:
                pressured.add(conn)
            sent += 1
        self.stats.messages_sent += sent
        return len(matches)

    def _deliver(self, cs: ClientState, msg: Message, qos: int, retain: bool, subids: tuple,
                 now: float) -> None:
        conn = cs.conn
        if qos == 0:
            if conn is None:
                if self.config.queue_qos0_messages and cs.expiry:
                    self._enqueue(cs, Outgoing(msg, 0, retain, subids), now)
                return
            if conn.out_bytes > self.max_out:
                self.stats.drop("qos0_slow")  # a slow reader loses QoS 0 first
                self.pressured.add(conn)  # and the publisher is held back a little
                return
            data = self._encode(conn, msg, 0, retain, subids, now)
            if data is not None:
                conn.write(data)
                self.stats.messages_sent += 1
                if conn.out_bytes > self.soft_out:
                    self.pressured.add(conn)
            return
        og = Outgoing(msg, qos, retain, subids, 0, "new")
        if (conn is None or cs.queue or conn.out_bytes > self.max_out
                or len(cs.inflight) >= min(conn.send_quota, self.max_inflight)):
            self._enqueue(cs, og, now)
            return
        self._send(cs, conn, og, now)

    def _send(self, cs: ClientState, conn, og: Outgoing, now: float) -> bool:
        """Put a QoS 1/2 message in flight. False when it was discarded instead."""
        msg = og.msg
        tpl = self._template(conn, msg, og.qos, og.retain, og.subids, now)
        if tpl is None:
            self._finish(cs, og)
            return False
        pid = cs.alloc_packet_id()
        og.packet_id = pid
        prev = og.state
        og.state = "sent"
        cs.inflight[pid] = og
        conn.write(tpl.with_packet_id(pid))
        self.stats.messages_sent += 1
        if conn.out_bytes > self.soft_out:
            self.pressured.add(conn)
        if cs.persisted:
            if prev == "queued":
                self._update_delivery(cs.client_id, msg.msg_id or self._persist_msg(msg), og.qos,
                                      pid, "sent")
            else:
                self._add_delivery(cs.client_id, msg.msg_id or self._persist_msg(msg), og.qos,
                                   pid, "sent", og.retain, og.subids, msg)
        return True

    def _persist_msg(self, msg: Message) -> int:
        # Callers skip the call once the message has its id (``msg.msg_id or
        # self._persist_msg(msg)``): a fan-out to many persistent sessions
        # stores it once and pays one attribute read per further receiver.
        # _route's fast path and _enqueue inline it, storing the message and
        # its first delivery in one call (_put_and_add).
        if not msg.msg_id:
            msg.msg_id = self.next_msg_id
            self.next_msg_id += 1
            self._put_message(msg.msg_id, msg.topic, msg.payload, msg.qos, msg.retain,
                              msg.props, msg.expires_at)
        return msg.msg_id

    def _enqueue(self, cs: ClientState, og: Outgoing, now: float) -> None:
        """Queue for later; bounded by count and bytes. When full, QoS 0 goes
        first (the oldest queued QoS 0, or the new one), else the new message
        is refused (counted in ``queue_full``)."""
        q = cs.queue
        if q.__class__ is not deque:
            q = cs.queue = deque()
        size = og.msg.size
        full = ((self.max_queued and len(q) >= self.max_queued) or
                (self.max_queued_bytes and cs.queue_bytes + size > self.max_queued_bytes))
        if full:
            if og.qos == 0:
                self.stats.drop("queue_full")
                return
            if not cs.queue_qos0:
                self.stats.drop("queue_full")
                return
            victim = next(o for o in q if o.qos == 0)
            q.remove(victim)
            cs.queue_qos0 -= 1
            cs.queue_bytes -= victim.msg.size
            self.stats.drop("queue_full")
            if cs.persisted and victim.msg.msg_id:
                self.store.remove_delivery(cs.client_id, victim.msg.msg_id)
        og.state = "queued"
        _untrack(og, og.msg)  # may wait long: out of the GC's way
        if cs.conn is not None and len(q) > self.soft_queue:
            self.pressured.add(cs.conn)  # connected but behind: ask for backpressure
        q.append(og)
        cs.queue_bytes += size
        if og.qos == 0:
            cs.queue_qos0 += 1
        if cs.persisted:
            msg = og.msg
            mid = msg.msg_id
            if mid:
                self._add_delivery(cs.client_id, mid, og.qos, 0, "queued", og.retain, og.subids,
                                   msg)
            else:  # _persist_msg and _add_delivery, inlined: once per message
                mid = msg.msg_id = self.next_msg_id
                self.next_msg_id = mid + 1
                self._put_and_add(mid, msg.topic, msg.payload, msg.qos, msg.retain, msg.props,
                                  msg.expires_at, cs.client_id, og.qos, 0, "queued",
                                  og.retain, og.subids, msg)

    def _put_and_add_record(self, msg_id: int, topic: str, payload: bytes, qos: int,
                            retain: bool, props, expires_at: float | None, client_id: str,
                            dqos: int, packet_id: int, state: str, dretain: bool = False,
                            subids: tuple = (), src=None) -> None:
        self._put_message(msg_id, topic, payload, qos, retain, props, expires_at)
        self._add_delivery(client_id, msg_id, dqos, packet_id, state, dretain, subids, src)

    def _put_record(self, msg_id: int, topic: str, payload: bytes, qos: int, retain: bool,
                    props, expires_at: float | None) -> None:
        self.store.put_message(msg_id, Publish(topic, payload, qos, retain, False, 0, props),
                               expires_at)

    def _add_record(self, client_id: str, msg_id: int, qos: int, packet_id: int, state: str,
                    retain: bool = False, subids: tuple = (), src=None) -> None:
        # src (the Message itself): for stores with add_delivery_fields only
        self.store.add_delivery(client_id, DeliveryRecord(msg_id, qos, packet_id, state,
                                                          retain, subids))

    def _update_record(self, client_id: str, msg_id: int, qos: int, packet_id: int,
                       state: str) -> None:
        self.store.update_delivery(client_id, DeliveryRecord(msg_id, qos, packet_id, state))

    def pump(self, cs: ClientState, now: float) -> None:
        """Move queued messages into flight while the window and writer allow."""
        conn = cs.conn
        if conn is None:
            return
        q = cs.queue
        window = min(conn.send_quota, self.max_inflight)
        inflight = cs.inflight
        max_out = self.max_out
        while q and conn.out_bytes <= max_out:
            og = q[0]
            if og.qos and len(inflight) >= window:
                break
            q.popleft()
            cs.queue_bytes -= og.msg.size
            if og.qos == 0:
                cs.queue_qos0 -= 1
            if og.msg.expires_at is not None and og.msg.expires_at <= now:
                self.stats.drop("expired")  # [MQTT-3.3.2-5]
                self._finish(cs, og)
                continue
            if og.qos == 0:
                data = self._encode(conn, og.msg, 0, og.retain, og.subids, now)
                if data is not None:
                    conn.write(data)
                    self.stats.messages_sent += 1
                self._finish(cs, og)
            else:
                self._send(cs, conn, og, now)

    # =============================================================== encoding

    def _template(self, conn, msg: Message, qos: int, retain: bool, subids: tuple, now: float):
        """The encoded variant of ``msg`` for this receiver (cached per variant),
        or None when it must not be sent (too large [MQTT-3.1.2-25], expired)."""
        version = conn.version
        if version == 5:
            remaining = None
            if msg.expires_at is not None:
                # [MQTT-3.3.2-6] forward the interval minus the time spent here.
                remaining = int(msg.expires_at - now + 0.999)
                if remaining <= 0:
                    self.stats.drop("expired")
                    return None
            alias = 0
            known = False
            if conn.out_alias_maximum:
                alias, known = conn.outbound_alias(msg.topic)
            key = (5, qos, retain, subids, remaining, alias, known)
        else:
            key = (4, qos, retain)
        tpl = msg.templates.get(key)
        if tpl is None:
            if version == 5:
                props = msg.props
                if subids or remaining is not None or alias:
                    props = dict(props)
                    if subids:
                        props[_SUBID] = subids
                    if remaining is not None:
                        props[_EXPIRY] = remaining
                    if alias:
                        props[_ALIAS] = alias
                pub = Publish("" if known else msg.topic, msg.payload, qos, retain, False, 0, props)
            else:
                pub = Publish(msg.topic, msg.payload, qos, retain)
            tpl = PublishTemplate(pub, 4 if version != 5 else 5)
            msg.templates[key] = tpl
        if len(tpl.data) > conn.out_max_packet_size:
            self.stats.drop("too_large")
            if version == 5 and alias and not known:
                # The alias was never sent: forget it so the next message sets it.
                if conn.out_aliases is not None:
                    conn.out_aliases.pop(msg.topic, None)
            return None
        return tpl

    def _encode(self, conn, msg: Message, qos: int, retain: bool, subids: tuple, now: float,
                packet_id: int = 0, dup: bool = False) -> bytes | None:
        """Bytes of ``msg`` for this receiver, or None when it must not be sent."""
        tpl = self._template(conn, msg, qos, retain, subids, now)
        if tpl is None:
            return None
        if qos == 0:
            return tpl.data
        return tpl.with_packet_id(packet_id, dup)

    # ============================================================ maintenance

    def tick(self, now: float) -> None:
        """Periodic work: expire sessions and retained messages, fire delayed wills.

        Args:
            now: wall-clock seconds.
        """
        for cid, (msg, due) in list(self.pending_wills.items()):
            if due <= now:
                del self.pending_wills[cid]
                self.store.delete_will(cid)
                self._publish_will(msg, now)
        for cs in list(self.clients.values()):
            if cs.conn is None and cs.expires_at is not None and cs.expires_at <= now:
                log.info("session %s expired", cs.client_id)
                self._end_session(cs, now)
        # Expired retained messages are skipped on lookup anyway; sweeping the
        # whole store is only for memory, so once a minute is plenty.
        purged = 0
        if now >= self._next_purge:
            self._next_purge = now + 60.0
            purged = self.retained.purge_expired(now)
        if purged:
            self.retained_bytes = sum(len(m.payload) for _, m, _ in self.retained.items())
        st = self.stats
        st.retained_messages = len(self.retained)
        st.subscriptions = len(self.trie)
        st.sessions_total = len(self.clients)
        queued = inflight = 0
        for cs in self.clients.values():
            queued += len(cs.queue)
            inflight += len(cs.inflight)
        st.queued_messages = queued
        st.inflight_messages = inflight

    def shutdown(self) -> None:
        """Tell every connected client the server is going away (v5 0x8B) and close."""
        for cs in list(self.clients.values()):
            conn = cs.conn
            if conn is not None:
                conn.will_on_close = False
                conn.close(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down",
                           "server shutting down")

    # ================================================================ restore

    def restore(self, snap: Snapshot, now: float) -> None:
        """Rebuild state from the store's snapshot at start-up.

        Sessions come back disconnected (their expiry counted from when they
        disconnected); deliveries in state ``sent``/``released`` become in-flight
        entries re-sent with DUP on reconnect [MQTT-4.4.0-1].

        Args:
            snap: what ``Store.open()`` returned.
            now: wall-clock seconds.
        """
        messages: dict[int, Message] = {}
        for mid, (pub, expires_at) in snap.messages.items():
            m = Message.from_publish(pub, expires_at, "")
            m.msg_id = mid
            messages[mid] = m
        for rec in snap.sessions:
            cs = ClientState(rec.client_id)
            cs.version = rec.protocol_level
            cs.expiry = rec.expiry_interval
            cs.username = rec.username   # ACLs judge its deliveries while it is away
            cs.persisted = True
            since = rec.disconnected_at if rec.disconnected_at is not None else now
            cs.expires_at = since + cs.expiry if cs.expiry != _NEVER else None
            for sub in rec.subscriptions:
                try:
                    self.trie.subscribe(cs, sub.topic_filter, sub.qos, sub.no_local,
                                        sub.retain_as_published, sub.retain_handling,
                                        sub.subscription_id)
                except (MalformedPacket, ValueError):
                    continue
            for d in rec.deliveries:
                m = messages.get(d.msg_id)
                if m is None:
                    continue
                og = Outgoing(m, d.qos, d.retain, tuple(d.subids), d.packet_id, d.state)
                _untrack(og, m)
                if d.state in ("sent", "released") and d.packet_id:
                    cs.inflight[d.packet_id] = og
                    cs.next_pid = d.packet_id % 65535 + 1
                else:
                    if not cs.queue:
                        cs.queue = deque()
                    cs.queue.append(og)
                    cs.queue_bytes += m.size
                    cs.queue_qos0 += og.qos == 0
            cs.incoming_qos2 = set(rec.incoming_qos2)
            if rec.disconnected_at is None:
                self.store.put_session(cs.client_id, cs.expiry, cs.version, now, cs.username)
            self.clients[cs.client_id] = cs
        for topic, pub, expires_at in snap.retained:
            m = Message.from_publish(pub, expires_at, "")
            m.retain = True
            self.retained.set(topic, m, expires_at)
            _untrack(m)
            self.retained_bytes += len(m.payload)
        for cid, pub, due in snap.wills:
            self.pending_wills[cid] = (Message.from_publish(pub, None, cid), due)
        self.next_msg_id = max(self.next_msg_id, snap.next_msg_id)
        self.tick(now)

    # ================================================================ sharing

    def _share_policy(self, name: str, topic_filter: str, members):
        """Round robin over the connected members of a shared group; an offline
        member gets the message only when nobody is connected (then it queues)."""
        n = len(members)
        key = (name, topic_filter)
        start = self._rr.get(key, 0)
        for i in range(n):
            m = members[(start + i) % n]
            if m.conn is not None:
                self._rr[key] = (start + i + 1) % n
                return m
        self._rr[key] = (start + 1) % n
        return members[start % n]



def _ack(first: int, pid: int, rc: int) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP bytes; the reason code is omitted when 0 [MQTT-3.4.2-1]."""
    if rc:
        return bytes((first, 3, pid >> 8, pid & 0xFF, rc))
    return bytes((first, 2, pid >> 8, pid & 0xFF))


def _pubrel(pid: int) -> bytes:
    return bytes((0x62, 2, pid >> 8, pid & 0xFF))
