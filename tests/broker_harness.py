"""In-memory harness for the broker's sans-IO layers (no sockets, no trio).

A :class:`Peer` is a client wired straight to a :class:`ServerConnection` and
a :class:`BrokerCore`: ``peer.send(packet)`` encodes the packet, feeds the
bytes to the server side, runs the core on the resulting events (as the trio
edge would) and returns the packets the server queued for this client, decoded
by a client-side ``Decoder`` (the h11 ConnectionPair idea).
"""

from __future__ import annotations

from fastmqtt.broker.config import BrokerConfig
from fastmqtt.broker.core import BrokerCore
from fastmqtt.codec import Connect, Decoder, encode
from fastmqtt.session import ProtocolViolation, ServerConnection


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def advance(self, dt: float) -> None:
        self.now += dt


def make_core(**cfg) -> BrokerCore:
    cfg.setdefault("persistence", False)
    cfg.setdefault("sys_interval", 0)
    return BrokerCore(BrokerConfig(**cfg))


class Peer:
    def __init__(self, core: BrokerCore, version: int = 5, clock: Clock | None = None) -> None:
        self.core = core
        self.version = version
        self.clock = clock or Clock()
        cfg = core.config
        self.conn = ServerConnection(
            self.clock.now, max_packet_size=cfg.max_packet_size,
            topic_alias_maximum=cfg.topic_alias_maximum, connect_timeout=cfg.connect_timeout,
            keepalive_grace=cfg.keepalive_grace, max_qos=cfg.max_qos,
            retain_available=cfg.retain_available)
        self.decoder = Decoder(version)
        self.violations: list[ProtocolViolation] = []
        self.lost = False

    def send_bytes(self, data: bytes) -> list:
        core = self.core
        now = self.clock.now
        for ev in self.conn.receive_data(data, now):
            if isinstance(ev, ProtocolViolation):
                self.violations.append(ev)
                if self.conn.client is not None:
                    core.protocol_error(self.conn, ev.reason_code, ev.message)
                else:
                    self.conn.close(None, ev.message)
                break
            if ev.packet_type == 1:
                core.connect(self.conn, ev, now)
            else:
                core.handle(self.conn, ev, now)
            if self.conn.closing:
                break
        return self.recv()

    def send(self, packet) -> list:
        return self.send_bytes(encode(packet, self.version))

    def connect(self, client_id: str = "c", **kw) -> list:
        kw.setdefault("protocol_level", self.version)
        return self.send(Connect(client_id, **kw))

    def recv(self) -> list:
        """Packets the server queued for this client (acks included)."""
        data = self.conn.take_output()
        _, acks = self.conn.take_acks()
        return self.decoder.feed(data + acks)

    def drop(self) -> None:
        """The network connection breaks (no DISCONNECT)."""
        if not self.lost:
            self.lost = True
            self.core.connection_lost(self.conn, self.clock.now)


def of(packets, cls):
    return [p for p in packets if isinstance(p, cls)]
