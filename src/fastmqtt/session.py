"""Sans-IO server side of one MQTT connection.

Theory of operation
-------------------
A :class:`ServerConnection` is the protocol object for one network connection
on the broker, shaped like h11: it never touches a socket or a clock.

* Bytes in: ``receive_data(data, now)`` feeds the streaming decoder and
  returns the events completed by those bytes, in order: decoded packets
  (``Connect``, ``Publish``, ...) and, at the end when the input broke the
  protocol, one :class:`ProtocolViolation`. Every packet is first checked
  against the transition table :data:`TRANSITIONS` (which packets a client may
  send in which state); an inbound v5 Topic Alias is resolved here, so the
  core only ever sees PUBLISH packets with their full topic and without a
  TOPIC_ALIAS property.
* Bytes out: ``send(packet)`` encodes for the negotiated version and queues the
  bytes; ``write(data)`` queues bytes already encoded (the broker core writes
  PUBLISH templates this way). The queue is ``outbox`` (a list of ``bytes``
  that a writer joins and sends in one call) and ``acks``: ``(ticket, bytes)``
  acknowledgements that may leave only once the store made ``ticket``
  durable. ``on_output`` (set by the trio edge) is called when the queue goes
  from empty to non-empty, so the writer wakes once per batch, not per packet.
* Time: the caller passes ``now``; ``next_deadline()`` says when to call
  ``timed_out(now)`` again (CONNECT timeout before the handshake, 1.5 x Keep
  Alive after it [MQTT-3.1.2-24]). There are no retry timers: MQTT resends
  unacknowledged messages only on reconnect [MQTT-4.4.0-1], which the core
  does.

States: ``AWAIT_CONNECT`` -> (CONNECT) -> ``CONNECTED`` -> (DISCONNECT or
``close``) -> ``CLOSED``; any violation -> ``ERROR``. Violations by the peer
(``ProtocolViolation.by_peer``) are kept apart from our own failures
(``send_failed``), as h11 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .codec import Decoder, Disconnect, Publish, encode
from .enums import PacketType, PropertyId, ReasonCode
from .errors import MalformedPacket

__all__ = [
    "ServerConnection", "ProtocolViolation", "AWAIT_CONNECT", "CONNECTED", "CLOSED",
    "ERROR", "TRANSITIONS",
]

AWAIT_CONNECT = "AWAIT_CONNECT"
CONNECTED = "CONNECTED"
CLOSED = "CLOSED"
ERROR = "ERROR"

_PT = PacketType
_CLIENT_PACKETS = (_PT.PUBLISH, _PT.PUBACK, _PT.PUBREC, _PT.PUBREL, _PT.PUBCOMP,
                   _PT.SUBSCRIBE, _PT.UNSUBSCRIBE, _PT.PINGREQ)

#: (state, packet type) -> next state, for every packet a client may send.
#: A pair missing from the table is a Protocol Error; ``_RULES`` names the rule.
TRANSITIONS: dict[tuple[str, int], str] = {
    (AWAIT_CONNECT, _PT.CONNECT): CONNECTED,
    **{(CONNECTED, t): CONNECTED for t in _CLIENT_PACKETS},
    (CONNECTED, _PT.DISCONNECT): CLOSED,
}

_RULES = {
    (AWAIT_CONNECT, None): "the first packet must be CONNECT [MQTT-3.1.0-1]",
    (CONNECTED, _PT.CONNECT): "a second CONNECT is a Protocol Error [MQTT-3.1.0-2]",
    (CONNECTED, _PT.AUTH): "AUTH without an Authentication Method in CONNECT [MQTT-4.12.0-1]",
}

_TOPIC_ALIAS = PropertyId.TOPIC_ALIAS


@dataclass(frozen=True)
class ProtocolViolation:
    """The input broke the protocol; the connection must close.

    Attributes:
        reason_code: v5 reason code for the DISCONNECT (0x81 malformed,
            0x82 protocol error, 0x93, 0x94, 0x95, 0x9A, 0x9B, ...).
        message: what was wrong, naming the rule.
        by_peer: True when the peer broke the rule; False for our own failure.
    """

    reason_code: int
    message: str
    by_peer: bool = True


class ServerConnection:
    """Server end of one MQTT connection (sans-IO).

    Args:
        now: current time (any monotonic clock; the caller's unit is seconds).
        max_packet_size: largest packet accepted from the client (whole packet).
        topic_alias_maximum: aliases the client may use (v5; 0 = none).
        connect_timeout: seconds allowed before CONNECT arrives.
        keepalive_grace: multiple of Keep Alive after which the client is dead.
        max_qos: highest QoS accepted in PUBLISH (v5 Maximum QoS).
        retain_available: whether retained PUBLISH is accepted.
    """

    __slots__ = (
        "state", "version", "decoder", "client_id", "username", "keep_alive",
        "keepalive_grace", "last_rx", "connect_deadline", "max_qos", "retain_available",
        "topic_alias_maximum", "in_aliases", "out_alias_maximum", "out_aliases",
        "out_max_packet_size", "send_quota", "request_problem_info", "outbox",
        "out_bytes", "acks", "ack_ticket", "on_output", "closing", "close_reason", "violation",
        "client", "peer", "will_on_close", "failed", "lost", "extra",
    )

    def __init__(self, now: float = 0.0, *, max_packet_size: int = 268_435_460,
                 topic_alias_maximum: int = 0, connect_timeout: float = 10.0,
                 keepalive_grace: float = 1.5, max_qos: int = 2,
                 retain_available: bool = True) -> None:
        self.state = AWAIT_CONNECT
        self.version = 0  # learnt from CONNECT
        self.decoder = Decoder(None, max_packet_size)
        self.client_id = ""
        self.username: str | None = None
        self.keep_alive = 0  # effective, seconds (after a Server Keep Alive override)
        self.keepalive_grace = keepalive_grace
        self.last_rx = now
        self.connect_deadline = now + connect_timeout
        self.max_qos = max_qos
        self.retain_available = retain_available
        self.topic_alias_maximum = topic_alias_maximum
        # Alias maps are created on first use (most clients use no aliases;
        # an empty dict is 64 bytes per idle connection).
        self.in_aliases: dict[int, str] | None = None
        self.out_alias_maximum = 0  # the client's Topic Alias Maximum
        self.out_aliases: dict[str, int] | None = None
        self.out_max_packet_size = 268_435_460  # the client's Maximum Packet Size
        self.send_quota = 65535  # the client's Receive Maximum [MQTT-3.3.4-9]
        self.request_problem_info = True
        self.outbox: list[bytes] = []
        self.out_bytes = 0
        # PUBACK/PUBREC/... that wait for the store, in order, and the
        # highest ticket among them (tickets only grow).
        self.acks: list[bytes] = []
        self.ack_ticket = 0
        self.on_output: Callable[[], None] | None = None
        self.closing = False  # a close was requested; flush, then close
        self.close_reason: str = ""
        self.violation: ProtocolViolation | None = None
        self.client: Any = None  # the core's per-client state while attached
        self.peer = ""
        self.will_on_close = True  # False after a normal DISCONNECT
        self.failed = False
        self.lost = False  # the core was told the connection ended
        self.extra: dict | None = None  # free for the edge / plug-ins

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes, now: float) -> list:
        """Feed bytes from the network.

        Args:
            data: any chunk of the byte stream (b"" is ignored; EOF is the
                caller's business).
            now: current time, for the keep-alive deadline.

        Returns:
            The events completed by ``data``: packets, then a
            :class:`ProtocolViolation` if the input broke the protocol (after
            which the connection is in ``ERROR`` and returns nothing more).
        """
        if self.state in (ERROR, CLOSED):
            return []
        self.last_rx = now
        try:
            packets = self.decoder.feed(data)
            violation = None
        except MalformedPacket as exc:
            packets = exc.packets
            violation = ProtocolViolation(exc.reason_code, str(exc))
        if not packets and violation is None:
            return packets
        events: list = []
        state = self.state
        for packet in packets:
            ptype = packet.packet_type
            nxt = TRANSITIONS.get((state, ptype))
            if nxt is None:
                rule = _RULES.get((state, ptype)) or _RULES.get((state, None)) or (
                    f"{PacketType(ptype).name} may not be sent by a client"
                    f" in state {state}")
                violation = ProtocolViolation(0x82, rule)
                break
            if ptype == 3:  # PUBLISH: the hot path, checked inline
                if packet.qos > self.max_qos:
                    violation = ProtocolViolation(
                        0x9B, f"QoS {packet.qos} above Maximum QoS {self.max_qos} [MQTT-3.2.2-11]")
                    break
                if packet.retain and not self.retain_available:
                    violation = ProtocolViolation(0x9A, "retain not available [MQTT-3.2.2-14]")
                    break
                if self.version == 5 and _TOPIC_ALIAS in packet.properties:
                    packet = self._resolve_alias(packet)
                    if packet.__class__ is ProtocolViolation:
                        violation = packet
                        break
            elif ptype == 1:
                self.version = packet.protocol_level
            elif ptype == 14:
                self.will_on_close = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL_MESSAGE
            state = nxt
            events.append(packet)
        self.state = state
        if violation is not None:
            self.state = ERROR
            self.violation = violation
            events.append(violation)
        return events

    def _resolve_alias(self, packet):
        """Map a v5 Topic Alias to its topic [MQTT-3.3.2-7..12]; strip the property."""
        props = packet.properties
        alias = props[_TOPIC_ALIAS]
        if alias == 0 or alias > self.topic_alias_maximum:
            return ProtocolViolation(
                0x94, f"Topic Alias {alias} outside 1..{self.topic_alias_maximum} [MQTT-3.3.2-9]")
        topic = packet.topic
        aliases = self.in_aliases
        if topic:
            if aliases is None:
                aliases = self.in_aliases = {}
            aliases[alias] = topic
        else:
            topic = aliases.get(alias) if aliases is not None else None
            if topic is None:
                return ProtocolViolation(0x82, f"Topic Alias {alias} was never set (section 3.3.2.3.4)")
        rest = {k: v for k, v in props.items() if k != _TOPIC_ALIAS}
        return Publish(topic, packet.payload, packet.qos, packet.retain, packet.dup,
                       packet.packet_id, rest)

    # ------------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        """Queue already-encoded bytes for the writer."""
        outbox = self.outbox
        outbox.append(data)
        self.out_bytes += len(data)
        if len(outbox) == 1 and self.on_output is not None:
            self.on_output()

    def send(self, packet) -> bytes:
        """Encode ``packet`` for this connection's version and queue it.

        Returns:
            The bytes queued.
        """
        data = encode(packet, self.version or 4)
        self.write(data)
        return data

    def send_ack(self, ticket: int, data: bytes) -> None:
        """Queue a PUBACK/PUBREC that may leave only once ``ticket`` is durable.

        Ticket 0 means nothing to wait for: the bytes join the normal outbox
        (keeping their order with other acks already there)."""
        acks = self.acks
        if acks:
            acks.append(data)
            if ticket > self.ack_ticket:
                self.ack_ticket = ticket
            return
        if not ticket:
            self.write(data)
            return
        acks.append(data)
        self.ack_ticket = ticket
        if not self.outbox and self.on_output is not None:
            self.on_output()

    def take_output(self) -> bytes:
        """Everything queued for immediate sending, as one ``bytes`` (then cleared)."""
        outbox = self.outbox
        if not outbox:
            return b""
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        self.out_bytes = 0
        return data

    def take_acks(self) -> tuple[int, bytes]:
        """(highest ticket, joined bytes) of the queued acknowledgements, cleared."""
        acks = self.acks
        if not acks:
            return 0, b""
        ticket = self.ack_ticket
        data = b"".join(acks)
        acks.clear()
        self.ack_ticket = 0
        return ticket, data

    def take_acks_upto(self, n: int) -> bytes:
        """The first ``n`` queued acknowledgements, joined (and removed);
        ``ack_ticket`` stays the highest of all (tickets only grow)."""
        acks = self.acks
        if n >= len(acks):
            self.ack_ticket = 0
        data = b"".join(acks[:n])
        del acks[:n]
        return data

    def close(self, reason_code: int | None = None, reason: str = "",
              reason_string: str | None = None) -> None:
        """Ask for the connection to close after what is queued has been sent.

        Args:
            reason_code: v5 DISCONNECT reason to send first (v5 connections
                only; ignored before CONNECT completed and for 3.1.1).
            reason: for the log.
            reason_string: v5 Reason String property for the DISCONNECT.
        """
        if self.closing:
            return
        if reason_code is not None and self.version == 5 and self.client is not None:
            props = None
            if reason_string and self.request_problem_info:
                props = {PropertyId.REASON_STRING: reason_string[:200]}
            try:
                self.send(Disconnect(reason_code, props))
            except MalformedPacket:
                self.send(Disconnect(reason_code))
        self.closing = True
        self.close_reason = reason or self.close_reason
        if self.state != ERROR:
            self.state = CLOSED
        if self.on_output is not None:
            self.on_output()

    def send_failed(self) -> None:
        """The transport failed while sending: we, not the peer, broke off."""
        self.failed = True
        self.closing = True
        self.state = ERROR

    # -------------------------------------------------------------------- time

    def next_deadline(self) -> float:
        """When ``timed_out`` may next become true (``math.inf``: never)."""
        if self.state == AWAIT_CONNECT:
            return self.connect_deadline
        if self.keep_alive:
            return self.last_rx + self.keepalive_grace * self.keep_alive
        return math.inf

    def timed_out(self, now: float) -> str | None:
        """"connect" or "keepalive" when that deadline has passed, else None."""
        if now < self.next_deadline():
            return None
        return "connect" if self.state == AWAIT_CONNECT else "keepalive"

    # ---------------------------------------------------------- outbound alias

    def outbound_alias(self, topic: str) -> tuple[int, bool]:
        """Topic alias to use for ``topic`` towards the client.

        Returns:
            ``(alias, known)``: alias 0 = send the full topic without an alias;
            ``known`` True = the client already has this alias, send an empty
            topic [MQTT-3.3.2-12]. New aliases are handed out until the client's
            Topic Alias Maximum [MQTT-3.3.2-10]; after that topics go in full.
        """
        aliases = self.out_aliases
        if aliases is None:
            aliases = self.out_aliases = {}
        alias = aliases.get(topic)
        if alias is not None:
            return alias, True
        if len(aliases) < self.out_alias_maximum:
            alias = len(aliases) + 1
            aliases[topic] = alias
            return alias, False
        return 0, False
