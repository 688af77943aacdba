"""Sans-IO client side of one MQTT session (5.0, 3.1.1 and 3.1).

Theory of operation
-------------------
:class:`ClientProtocol` owns the *session state* that MQTT asks a client to keep
and nothing else: it never touches a socket and never reads a clock.

* The I/O layer calls :meth:`~ClientProtocol.start` for every new network
  connection and writes the CONNECT bytes it returns, then passes every chunk it
  reads to :meth:`~ClientProtocol.receive_data` together with ``now`` and gets a
  list of events back (:class:`Connected`, :class:`MessageReceived`,
  :class:`PublishCompleted`, ...). Replies the protocol owes the server
  (PUBACK, PUBREC, PUBREL, PUBCOMP) are queued and handed out by
  :meth:`~ClientProtocol.data_to_send`.
* Operations (:meth:`publish`, :meth:`subscribe`, :meth:`unsubscribe`,
  :meth:`disconnect`) return the bytes to write, like h11's ``send``.
* Time: the I/O layer reports each write with :meth:`note_sent` and asks
  :meth:`next_deadline` when it must call :meth:`tick`, which returns a PINGREQ
  when the connection has been idle for Keep Alive seconds and raises
  :class:`KeepAliveTimeout` when a PINGRESP is overdue (a dead connection).

Session state (what survives a reconnect) is the ordered map of outgoing QoS 1
and 2 messages not yet fully acknowledged (``_inflight``: state ``"publish"``
waiting for PUBACK/PUBREC, ``"pubrel"`` waiting for PUBCOMP) and the packet ids
of incoming QoS 2 messages already delivered but not yet released
(``_incoming_qos2``). When a connection is lost the state is kept; when the next
CONNACK says the session is present, every unacknowledged PUBLISH is resent with
DUP set and every PUBREL is resent, with the original packet ids and in the
original order [MQTT-4.4.0-1] [MQTT-4.6.0-1]. When the server has *no* session,
every unfinished message is sent again as a new PUBLISH, even one already
PUBREC'd: a server that lost its session may have lost the message with it
(Mosquitto holds a QoS 2 message until the PUBREL before delivering it), and
dropping it would lose a message the caller is still waiting for. Topic aliases, the server's limits and the keepalive state belong to
one network connection and are reset by :meth:`start` [MQTT-3.3.2-7].

Incoming QoS 2 uses "method B" of the specification (4.3.3): the message is
handed to the application when the PUBLISH first arrives, its packet id is
remembered until the PUBREL, and a resent PUBLISH with that id is acknowledged
but not delivered again, so the application sees it exactly once
[MQTT-4.3.3-9] [MQTT-4.3.3-10].
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .. import codec
from ..enums import EMPTY_PROPERTIES, PacketType, PropertyId, ReasonCode
from ..errors import MalformedPacket

__all__ = [
    "ClientProtocol",
    "Connected",
    "ConnectionRefused",
    "MessageReceived",
    "PublishReceived",
    "PublishCompleted",
    "SubscribeCompleted",
    "UnsubscribeCompleted",
    "ServerDisconnected",
    "AuthReceived",
    "PingResponse",
    "ProtocolError",
    "KeepAliveTimeout",
]

P = PropertyId

# ----------------------------------------------------------------------- events


@dataclass(slots=True)
class Connected:
    """CONNACK with reason code 0: the connection is up."""

    session_present: bool
    properties: Mapping[int, Any]
    #: Publishes and PUBRELs from the previous connection that :meth:`start`'s
    #: caller must write now, already encoded (the protocol hands them out here
    #: rather than through ``data_to_send`` so they are not mixed with replies).
    resend: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class ConnectionRefused:
    """CONNACK with a reason code >= 0x80; the server closes the connection."""

    reason_code: int
    properties: Mapping[int, Any]


@dataclass(slots=True)
class MessageReceived:
    """An application message (the PUBLISH with any inbound topic alias resolved)."""

    publish: Any  # codec.Publish


@dataclass(slots=True)
class PublishReceived:
    """PUBREC (success) for an outgoing QoS 2 message: the server holds it; the
    flow continues with PUBREL/PUBCOMP (a persistent outbox records this)."""

    packet_id: int


@dataclass(slots=True)
class PublishCompleted:
    """The end of an outgoing QoS 1/2 flow: PUBACK, PUBCOMP, or a PUBREC >= 0x80."""

    packet_id: int
    reason_code: int
    properties: Mapping[int, Any]
    publish: Any  # the codec.Publish that was sent


@dataclass(slots=True)
class SubscribeCompleted:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Mapping[int, Any]


@dataclass(slots=True)
class UnsubscribeCompleted:
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Mapping[int, Any]


@dataclass(slots=True)
class ServerDisconnected:
    """DISCONNECT from the server (MQTT 5.0 only); the connection is over."""

    reason_code: int
    properties: Mapping[int, Any]


@dataclass(slots=True)
class AuthReceived:
    reason_code: int
    properties: Mapping[int, Any]


@dataclass(slots=True)
class PingResponse:
    pass


class ProtocolError(Exception):
    """The server broke the protocol; the connection must be closed.

    Attributes:
        reason_code: the MQTT 5.0 reason code to put in the client's DISCONNECT.
    """

    def __init__(self, message: str, reason_code: int = ReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason_code = int(reason_code)
        #: events completed before the violation (still to be handled)
        self.events: list = []


class KeepAliveTimeout(Exception):
    """No PINGRESP (nor anything else) arrived in time: the connection is dead."""


@dataclass(slots=True)
class _Outgoing:
    publish: Any  # codec.Publish with the full topic (never an alias-only topic)
    state: str  # "publish" (awaiting PUBACK/PUBREC) or "pubrel" (awaiting PUBCOMP)
    sent: bool  # written on the current connection (False: pending resend)
    rec_code: int = 0  # the PUBREC's reason code (QoS 2)


# --------------------------------------------------------------------- protocol

DISCONNECTED, CONNECTING, CONNECTED = "DISCONNECTED", "CONNECTING", "CONNECTED"


class ClientProtocol:
    """Client-side MQTT session state machine with no I/O (see module docstring).

    Args:
        client_id: Client Identifier; "" lets a v5 server assign one (it is then
            taken from ASSIGNED_CLIENT_IDENTIFIER).
        version: 5, 4 (3.1.1) or 3 (3.1).
        keep_alive: seconds; 0 disables pings.
        clean_start: Clean Start (v5) / Clean Session (3.1.1) of the *first*
            CONNECT. Later CONNECTs of a v5 session use Clean Start 0 so a session
            kept by ``session_expiry`` is resumed.
        session_expiry: v5 Session Expiry Interval (seconds, 0xFFFFFFFF = never).
        username, password, will: CONNECT fields (``will`` is a ``codec.Will``).
        connect_properties: extra v5 CONNECT properties.
        receive_maximum: how many unacknowledged QoS 1/2 messages we accept.
        topic_alias_maximum: inbound aliases we accept (v5).
        max_packet_size: largest packet we accept (advertised in v5 CONNECT).
        ping_timeout: seconds to wait for PINGRESP before declaring the
            connection dead (default: the keep alive, at most 30 s).
        outbound_topic_aliases: use topic aliases on outgoing PUBLISH (v5), up
            to the server's Topic Alias Maximum, least recently used replaced.
    """

    def __init__(
        self,
        client_id: str = "",
        *,
        version: int = 5,
        keep_alive: int = 60,
        clean_start: bool = True,
        session_expiry: int = 0,
        username: str | None = None,
        password: bytes | None = None,
        will: Any = None,
        connect_properties: Mapping[int, Any] | None = None,
        receive_maximum: int = 65535,
        topic_alias_maximum: int = 16,
        max_packet_size: int = 0,
        ping_timeout: float | None = None,
        outbound_topic_aliases: bool = True,
    ) -> None:
        if version not in (3, 4, 5):
            raise ValueError(f"unsupported MQTT version {version}")
        if not 0 <= keep_alive <= 65535:
            raise ValueError("keep_alive must be 0..65535")
        self.client_id = client_id
        self.version = version
        self.keep_alive = keep_alive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.username = username
        self.password = password
        self.will = will
        self.connect_properties = dict(connect_properties or {})
        self.receive_maximum = receive_maximum
        self.topic_alias_maximum = topic_alias_maximum if version == 5 else 0
        self.max_packet_size = max_packet_size
        self.ping_timeout = ping_timeout
        self.outbound_topic_aliases = outbound_topic_aliases

        self.state = DISCONNECTED
        self.connections = 0  # CONNECTs sent so far
        self._inflight: OrderedDict[int, _Outgoing] = OrderedDict()
        self._incoming_qos2: set[int] = set()
        self._pending_subscribe: dict[int, Any] = {}
        self._pending_unsubscribe: dict[int, Any] = {}
        self._next_id = 1
        self._out = bytearray()
        self._decoder = None
        self._reset_connection_state()

    # ------------------------------------------------------------ connection

    def _reset_connection_state(self) -> None:
        self.server_properties: Mapping[int, Any] = EMPTY_PROPERTIES
        self.server_receive_maximum = 65535
        self.server_max_qos = 2
        self.server_max_packet_size = 0
        self.retain_available = True
        self._alias_out: OrderedDict[str, int] = OrderedDict()
        self._alias_out_max = 0
        self._alias_in: dict[int, str] = {}
        self._effective_keep_alive = self.keep_alive
        self._last_sent = 0.0
        self._ping_sent_at: float | None = None

    def start(self, now: float) -> bytes:
        """Begin a new network connection: return the CONNECT to write first.

        Subscription and unsubscription requests of a lost connection are
        forgotten (the caller sends them again); the session state is kept.
        """
        self._reset_connection_state()
        self._pending_subscribe.clear()
        self._pending_unsubscribe.clear()
        self._out.clear()
        kwargs = {}
        if self.max_packet_size:
            kwargs["max_packet_size"] = self.max_packet_size
        self._decoder = codec.Decoder(self.version, **kwargs)
        props: dict[int, Any] = {}
        if self.version == 5:
            props.update(self.connect_properties)
            if self.session_expiry:
                props[P.SESSION_EXPIRY_INTERVAL] = self.session_expiry
            if self.receive_maximum != 65535:
                props[P.RECEIVE_MAXIMUM] = self.receive_maximum
            if self.topic_alias_maximum:
                props[P.TOPIC_ALIAS_MAXIMUM] = self.topic_alias_maximum
            if self.max_packet_size:
                props[P.MAXIMUM_PACKET_SIZE] = self.max_packet_size
        if self.connections == 0 or self.version != 5:
            clean = self.clean_start
        else:
            # Resume whatever the server kept; with Session Expiry 0 there is
            # nothing and the server answers Session Present 0.
            clean = False
        if clean:
            # Clean Start discards the session on both sides [MQTT-3.1.2-4]
            # (our outgoing in-flight messages stay queued: they are resent as
            # new messages once the CONNACK arrives).
            self._incoming_qos2.clear()
        self.connections += 1
        self.state = CONNECTING
        self._last_sent = now
        pkt = codec.Connect(
            client_id=self.client_id,
            clean_start=clean,
            keep_alive=self.keep_alive,
            username=self.username,
            password=self.password,
            will=self.will,
            properties=props or None,
            protocol_level=self.version,
        )
        return codec.encode(pkt, self.version)

    def connection_lost(self) -> None:
        """The network connection is gone; keep the session for the next one."""
        self.state = DISCONNECTED
        self._decoder = None
        self._out.clear()
        for item in self._inflight.values():
            item.sent = False

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    # ------------------------------------------------------------- receiving

    def receive_data(self, data: bytes, now: float) -> list:
        """Feed bytes read from the network; return the events they complete.

        Raises:
            ProtocolError: the server sent something invalid (its reason code
                says what to put in our DISCONNECT).
        """
        if self._decoder is None:
            raise ProtocolError("receive_data() before start()")
        try:
            packets = self._decoder.feed(data)
        except MalformedPacket as exc:
            # Packets completed before the bad one are still handled so an
            # acknowledgement that arrived intact is not lost.
            events: list = []
            for pkt in exc.packets:
                self._handle(pkt, now, events)
            err = ProtocolError(str(exc), exc.reason_code)
            err.events = events
            raise err from exc
        if packets:
            # Anything from the server proves the connection alive.
            self._ping_sent_at = None
        events: list = []
        for pkt in packets:
            self._handle(pkt, now, events)
        return events

    def _handle(self, pkt, now: float, events: list) -> None:
        t = pkt.packet_type
        if self.state == CONNECTING:
            if t == PacketType.CONNACK:
                self._handle_connack(pkt, events)
                return
            if t == PacketType.AUTH:
                events.append(AuthReceived(pkt.reason_code, pkt.properties))
                return
            if t == PacketType.DISCONNECT:
                events.append(ServerDisconnected(pkt.reason_code, pkt.properties))
                self.state = DISCONNECTED
                return
            # The server sends CONNACK first [MQTT-3.2.0-1].
            raise ProtocolError(f"{PacketType(t).name} before CONNACK")
        if self.state != CONNECTED:
            raise ProtocolError(f"{PacketType(t).name} after the connection ended")
        if t == PacketType.PUBLISH:
            self._handle_publish(pkt, events)
        elif t == PacketType.PUBACK:
            self._handle_puback(pkt, events)
        elif t == PacketType.PUBREC:
            self._handle_pubrec(pkt, events)
        elif t == PacketType.PUBREL:
            self._handle_pubrel(pkt)
        elif t == PacketType.PUBCOMP:
            self._handle_pubcomp(pkt, events)
        elif t == PacketType.SUBACK:
            if self._pending_subscribe.pop(pkt.packet_id, None) is None:
                raise ProtocolError(f"SUBACK for unknown packet id {pkt.packet_id}")
            events.append(SubscribeCompleted(pkt.packet_id, pkt.reason_codes, pkt.properties))
        elif t == PacketType.UNSUBACK:
            if self._pending_unsubscribe.pop(pkt.packet_id, None) is None:
                raise ProtocolError(f"UNSUBACK for unknown packet id {pkt.packet_id}")
            events.append(UnsubscribeCompleted(pkt.packet_id, pkt.reason_codes, pkt.properties))
        elif t == PacketType.PINGRESP:
            events.append(PingResponse())
        elif t == PacketType.DISCONNECT:
            self.state = DISCONNECTED
            events.append(ServerDisconnected(pkt.reason_code, pkt.properties))
        elif t == PacketType.AUTH:
            events.append(AuthReceived(pkt.reason_code, pkt.properties))
        else:
            # CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ or a second CONNACK
            # [MQTT-3.2.0-2]: not something a server sends.
            raise ProtocolError(f"unexpected {PacketType(t).name} from the server")

    def _handle_connack(self, pkt, events: list) -> None:
        if pkt.reason_code >= 0x80:
            self.state = DISCONNECTED
            events.append(ConnectionRefused(pkt.reason_code, pkt.properties))
            return
        self.state = CONNECTED
        props = pkt.properties
        self.server_properties = props
        if self.version == 5:
            self.server_receive_maximum = props.get(P.RECEIVE_MAXIMUM, 65535)
            self.server_max_qos = props.get(P.MAXIMUM_QOS, 2)
            self.server_max_packet_size = props.get(P.MAXIMUM_PACKET_SIZE, 0)
            self.retain_available = bool(props.get(P.RETAIN_AVAILABLE, 1))
            self._alias_out_max = props.get(P.TOPIC_ALIAS_MAXIMUM, 0) if self.outbound_topic_aliases else 0
            assigned = props.get(P.ASSIGNED_CLIENT_IDENTIFIER)
            if assigned:
                self.client_id = assigned
            # The server's keep alive overrides ours [MQTT-3.2.2-21].
            ska = props.get(P.SERVER_KEEP_ALIVE)
            if ska is not None:
                self._effective_keep_alive = ska
        resend: list[bytes] = []
        completed: list = []
        if pkt.session_present:
            # Same ids, same order, DUP on PUBLISH [MQTT-4.4.0-1] [MQTT-3.3.1-1].
            for pid, item in self._inflight.items():
                if item.state == "publish":
                    resend.append(self._encode_publish(item.publish, pid, dup=True))
                else:
                    resend.append(codec.encode(codec.Pubrel(pid), self.version))
                item.sent = True
        else:
            # No session on the server: it holds no QoS 2 state for us either.
            self._incoming_qos2.clear()
            for pid, item in self._inflight.items():
                # A server that keeps a QoS 2 message until the PUBREL before
                # delivering it (Mosquitto does) lost it with the session, so
                # even a PUBREC'd message is sent again, as a new message: a
                # possible duplicate is better than a silent loss.
                item.state = "publish"
                resend.append(self._encode_publish(item.publish, pid, dup=False))
                item.sent = True
        # Connected comes first: the I/O layer treats the first event after
        # CONNECT as the answer to it.
        events.append(Connected(bool(pkt.session_present), props, resend))
        events.extend(completed)

    def _handle_publish(self, pkt, events: list) -> None:
        if self.version == 5:
            alias = pkt.properties.get(P.TOPIC_ALIAS)
            if alias is not None:
                if alias > self.topic_alias_maximum:
                    # [MQTT-3.3.2-9]
                    raise ProtocolError(f"topic alias {alias} above our maximum",
                                        ReasonCode.TOPIC_ALIAS_INVALID)
                if pkt.topic:
                    self._alias_in[alias] = pkt.topic
                else:
                    topic = self._alias_in.get(alias)
                    if topic is None:
                        raise ProtocolError(f"unknown topic alias {alias}",
                                            ReasonCode.TOPIC_ALIAS_INVALID)
                    pkt = codec.Publish(topic, pkt.payload, pkt.qos, pkt.retain, pkt.dup,
                                        pkt.packet_id, pkt.properties)
            elif not pkt.topic:
                raise ProtocolError("empty topic without a topic alias",
                                    ReasonCode.TOPIC_NAME_INVALID)
        qos = pkt.qos
        if qos == 0:
            events.append(MessageReceived(pkt))
        elif qos == 1:
            events.append(MessageReceived(pkt))
            self._out += codec.encode(codec.Puback(pkt.packet_id), self.version)
        else:
            pid = pkt.packet_id
            if pid not in self._incoming_qos2:
                if len(self._incoming_qos2) >= self.receive_maximum:
                    # [MQTT-3.3.4-9]
                    raise ProtocolError("server exceeded our Receive Maximum",
                                        ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)
                self._incoming_qos2.add(pid)
                events.append(MessageReceived(pkt))
            # else: a resend of a message already delivered [MQTT-4.3.3-10].
            self._out += codec.encode(codec.Pubrec(pid), self.version)

    def _handle_puback(self, pkt, events: list) -> None:
        item = self._inflight.get(pkt.packet_id)
        if item is None or item.state != "publish" or item.publish.qos != 1:
            return  # a late ack for a flow already finished: harmless
        del self._inflight[pkt.packet_id]
        events.append(PublishCompleted(pkt.packet_id, pkt.reason_code, pkt.properties, item.publish))

    def _handle_pubrec(self, pkt, events: list) -> None:
        pid = pkt.packet_id
        item = self._inflight.get(pid)
        if item is None or item.publish.qos != 2:
            # Unknown id: the server expects a PUBREL all the same; answer it
            # with "not found" so its state machine can finish.
            self._out += codec.encode(
                codec.Pubrel(pid, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version == 5 else 0),
                self.version)
            return
        if pkt.reason_code >= 0x80:
            # A failed PUBREC ends the flow [MQTT-4.3.3-4 note]; the id is free.
            del self._inflight[pid]
            events.append(PublishCompleted(pid, pkt.reason_code, pkt.properties, item.publish))
            return
        item.state = "pubrel"
        item.rec_code = pkt.reason_code
        events.append(PublishReceived(pid))
        self._out += codec.encode(codec.Pubrel(pid), self.version)

    def _handle_pubrel(self, pkt) -> None:
        pid = pkt.packet_id
        if pid in self._incoming_qos2:
            self._incoming_qos2.discard(pid)
            rc = 0
        else:
            rc = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND if self.version == 5 else 0
        self._out += codec.encode(codec.Pubcomp(pid, rc), self.version)

    def _handle_pubcomp(self, pkt, events: list) -> None:
        item = self._inflight.get(pkt.packet_id)
        if item is None or item.state != "pubrel":
            return
        del self._inflight[pkt.packet_id]
        # The outcome is the PUBREC's: a successful PUBREC means the server took
        # the message. PUBCOMP 0x92 (Packet Identifier not found) only says the
        # server finished this id already, e.g. its first PUBCOMP was lost with
        # the connection and we resent the PUBREL [MQTT-4.4.0-1].
        events.append(PublishCompleted(pkt.packet_id, item.rec_code, pkt.properties, item.publish))

    def data_to_send(self) -> bytes:
        """Replies queued by :meth:`receive_data` (acks); empties the queue."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    # -------------------------------------------------------------- sending

    def _allocate_id(self) -> int:
        busy = self._inflight
        for _ in range(65535):
            pid = self._next_id
            self._next_id = pid + 1 if pid < 65535 else 1
            if pid not in busy and pid not in self._pending_subscribe and pid not in self._pending_unsubscribe:
                return pid
        raise RuntimeError("no free packet identifier")

    @property
    def send_quota(self) -> int:
        """How many more QoS 1/2 PUBLISHes the server's Receive Maximum allows
        now [MQTT-4.9.0-2]."""
        return max(0, self.server_receive_maximum - len(self._inflight))

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def inflight_messages(self) -> list[tuple[int, str, Any]]:
        """(packet_id, state, publish) of every unfinished outgoing flow, in order."""
        return [(pid, it.state, it.publish) for pid, it in self._inflight.items()]

    def restore_inflight(self, packet_id: int, state: str, publish: Any) -> None:
        """Put back an outgoing flow saved by a previous process (persistent
        outbox); it is resent after the next CONNACK like any other."""
        if state not in ("publish", "pubrel"):
            raise ValueError(state)
        self._inflight[packet_id] = _Outgoing(publish, state, False)
        if packet_id >= self._next_id:
            self._next_id = packet_id + 1 if packet_id < 65535 else 1

    def _encode_publish(self, pub, packet_id: int, dup: bool) -> bytes:
        topic = pub.topic
        props = pub.properties
        if not self._alias_out_max or self.version != 5:
            return codec.encode(
                codec.Publish(topic, pub.payload, pub.qos, pub.retain, dup, packet_id, props),
                self.version)
        aliases = self._alias_out
        alias = aliases.get(topic)
        if alias is not None:
            aliases.move_to_end(topic)
            # The alias alone stands for the topic on this connection [MQTT-3.3.2-12].
            return codec.encode(
                codec.Publish("", pub.payload, pub.qos, pub.retain, dup, packet_id,
                              {**props, P.TOPIC_ALIAS: alias}), self.version)
        evicted = None
        if len(aliases) < self._alias_out_max:
            alias = len(aliases) + 1
        else:
            # Reuse the least recently used alias: sending the topic with it
            # again rebinds it on the server [MQTT-3.3.2-12].
            evicted, alias = aliases.popitem(last=False)
        data = codec.encode(
            codec.Publish(topic, pub.payload, pub.qos, pub.retain, dup, packet_id,
                          {**props, P.TOPIC_ALIAS: alias}), self.version)
        # Bound only once the packet encoded: a rejected one must not leave an
        # alias the server never heard of.
        aliases[topic] = alias
        return data

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                properties: Mapping[int, Any] | None = None) -> tuple[int, bytes]:
        """Start an outgoing message.

        QoS 1/2 messages are recorded in the session before this returns, so
        they are resent after a reconnect even when these bytes never reach the
        server. When not connected the bytes are ``b""`` (nothing to write):
        the message waits in the session and goes out after the next CONNACK.

        Returns:
            ``(packet_id, data)``; packet id 0 for QoS 0.
        Raises:
            MalformedPacket: invalid topic, properties or payload.
            ValueError: QoS above the server's Maximum QoS, retain not
                available, or the server's Receive Maximum is used up (check
                :attr:`send_quota`).
        """
        if qos > self.server_max_qos and self.state == CONNECTED:
            # [MQTT-3.2.2-11]
            raise ValueError(f"the server accepts QoS <= {self.server_max_qos}")
        if retain and not self.retain_available and self.state == CONNECTED:
            raise ValueError("the server does not support retained messages")  # [MQTT-3.2.2-14]
        pub = codec.Publish(topic, payload, qos, retain, False, 0, properties)
        if qos == 0:
            if self.state != CONNECTED:
                return 0, b""
            return 0, self._encode_publish(pub, 0, False)
        connected = self.state == CONNECTED
        if connected and self.send_quota <= 0:
            raise ValueError("server Receive Maximum reached")
        pid = self._allocate_id()
        # Encoding validates (MalformedPacket) before the message enters the
        # session, so a bad message leaves no state behind.
        if connected:
            data = self._encode_publish(pub, pid, False)
        else:
            codec.encode(codec.Publish(topic, payload, qos, retain, False, pid, properties),
                         self.version)
            data = b""
        self._inflight[pid] = _Outgoing(pub, "publish", connected)
        return pid, data

    def subscribe(self, subscriptions: Iterable[Any],
                  properties: Mapping[int, Any] | None = None) -> tuple[int, bytes]:
        """Encode a SUBSCRIBE for ``codec.Subscription`` objects.

        Returns:
            ``(packet_id, data)``.
        Raises:
            MalformedPacket: an invalid filter or option.
            RuntimeError: not connected.
        """
        self._require_connected()
        pid = self._allocate_id()
        data = codec.encode(codec.Subscribe(pid, subscriptions, properties), self.version)
        self._pending_subscribe[pid] = True
        return pid, data

    def unsubscribe(self, topic_filters: Iterable[str],
                    properties: Mapping[int, Any] | None = None) -> tuple[int, bytes]:
        """Encode an UNSUBSCRIBE; returns ``(packet_id, data)``."""
        self._require_connected()
        pid = self._allocate_id()
        data = codec.encode(codec.Unsubscribe(pid, topic_filters, properties), self.version)
        self._pending_unsubscribe[pid] = True
        return pid, data

    def disconnect(self, reason_code: int = 0, properties: Mapping[int, Any] | None = None) -> bytes:
        """Encode a DISCONNECT and end the connection (the session is kept)."""
        if self.state == DISCONNECTED:
            return b""
        data = codec.encode(codec.Disconnect(reason_code, properties), self.version)
        self.connection_lost()
        return data

    def auth(self, reason_code: int, properties: Mapping[int, Any]) -> bytes:
        """Encode an AUTH packet (v5 enhanced authentication)."""
        return codec.encode(codec.Auth(reason_code, properties), 5)

    def _require_connected(self) -> None:
        if self.state != CONNECTED:
            raise RuntimeError("not connected")

    # ----------------------------------------------------------------- time

    def note_sent(self, now: float) -> None:
        """Tell the protocol bytes were written at ``now`` (keepalive idles
        from the last write [MQTT-3.1.2-23])."""
        self._last_sent = now

    @property
    def effective_keep_alive(self) -> int:
        return self._effective_keep_alive

    def _ping_timeout(self) -> float:
        if self.ping_timeout is not None:
            return self.ping_timeout
        return float(min(max(self._effective_keep_alive, 1), 30))

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next be called (None: no timer)."""
        if self.state == DISCONNECTED:
            return None
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self._ping_timeout()
        if self.state == CONNECTING:
            return None  # the I/O layer bounds the CONNACK wait itself
        ka = self._effective_keep_alive
        if not ka:
            return None
        return self._last_sent + ka

    def tick(self, now: float) -> bytes:
        """Run timers: return a PINGREQ to write when one is due.

        Raises:
            KeepAliveTimeout: the PINGRESP did not arrive within the ping timeout.
        """
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self._ping_timeout():
                raise KeepAliveTimeout(f"no PINGRESP within {self._ping_timeout():g}s")
            return b""
        ka = self._effective_keep_alive
        if self.state != CONNECTED or not ka or now < self._last_sent + ka:
            return b""
        self._ping_sent_at = now
        return codec.encode(codec.Pingreq(), self.version)
