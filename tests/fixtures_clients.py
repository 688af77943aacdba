"""Client-side test helpers: a severable MQTT-aware TCP proxy, a scripted
in-process broker, and a pytest fixture for both brokers.

:class:`MqttProxy` sits between a client and a real broker on 127.0.0.1. It
frames the byte stream into whole MQTT packets (fixed header + Remaining
Length) in each direction, so a test can cut the connection at an exact
point: "drop the first PUBACK going to the client and sever", which leaves the
broker holding a message the client never heard back about. It runs in the
test's own trio loop; every wait in it is event-driven.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import trio

TO_BROKER, TO_CLIENT = "to_broker", "to_client"
TYPE_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
              7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
              12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


def _frame(buf: bytearray) -> bytes | None:
    """Take one whole packet off the front of ``buf`` (None: need more)."""
    if len(buf) < 2:
        return None
    mult, length, i = 1, 0, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        i += 1
        if not b & 0x80:
            break
        mult *= 128
        if i > 4:
            raise ValueError("bad remaining length")
    end = i + length
    if len(buf) < end:
        return None
    pkt = bytes(buf[:end])
    del buf[:end]
    return pkt


@dataclass
class CutRule:
    """Sever the connection when the ``count``-th packet of ``packet_type``
    passes in ``direction``; that packet is dropped (``drop=True``) or
    forwarded first."""

    direction: str
    packet_type: str
    count: int = 1
    drop: bool = True
    seen: int = 0
    fired: trio.Event = field(default_factory=trio.Event)


class MqttProxy:
    """Forwarding proxy 127.0.0.1:port -> broker with cut points."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.host = "127.0.0.1"
        self.rules: list[CutRule] = []
        self.log: list[tuple[int, str, str, bytes]] = []  # (conn no, direction, type, bytes)
        self.connections = 0
        self._scopes: dict[int, trio.CancelScope] = {}
        self._conn_event = trio.Event()
        self.accepting = True
        self.frozen = False  # True: swallow every packet, keep sockets open

    def freeze(self, frozen: bool = True) -> None:
        """Black-hole the open connections (a dead network path: no RST, no data)."""
        self.frozen = frozen

    def cut_on(self, direction: str, packet_type: str, count: int = 1, drop: bool = True) -> CutRule:
        rule = CutRule(direction, packet_type, count, drop)
        self.rules.append(rule)
        return rule

    def sever(self) -> None:
        """Close every open connection at once (like a network failure)."""
        for scope in list(self._scopes.values()):
            scope.cancel()

    async def wait_connections(self, n: int) -> None:
        while self.connections < n:
            self._conn_event = trio.Event()
            await self._conn_event.wait()

    def packets(self, direction: str, packet_type: str) -> list[bytes]:
        return [raw for _, d, t, raw in self.log if d == direction and t == packet_type]

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client_stream: trio.SocketStream) -> None:
        if not self.accepting:
            await client_stream.aclose()
            return
        self.connections += 1
        number = self.connections
        self._conn_event.set()
        try:
            broker_stream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client_stream.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes[number] = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, number, client_stream, broker_stream, TO_BROKER, scope)
                nursery.start_soon(self._pump, number, broker_stream, client_stream, TO_CLIENT, scope)
        self._scopes.pop(number, None)
        for s in (client_stream, broker_stream):
            with trio.CancelScope(shield=True):
                try:
                    await s.aclose()
                except Exception:
                    pass

    async def _pump(self, number, src, dst, direction, scope) -> None:
        buf = bytearray()
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    scope.cancel()
                    return
                buf += data
                while True:
                    pkt = _frame(buf)
                    if pkt is None:
                        break
                    name = TYPE_NAMES.get(pkt[0] >> 4, "?")
                    self.log.append((number, direction, name, pkt))
                    cut = None
                    for rule in self.rules:
                        if rule.direction == direction and rule.packet_type == name and not rule.fired.is_set():
                            rule.seen += 1
                            if rule.seen >= rule.count:
                                cut = rule
                                break
                    if self.frozen:
                        continue
                    if cut is not None:
                        if not cut.drop:
                            await dst.send_all(pkt)
                        cut.fired.set()
                        scope.cancel()
                        return
                    await dst.send_all(pkt)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()


@pytest.fixture
async def mqtt_proxy(nursery):
    """Factory ``await mqtt_proxy(broker)`` -> a running :class:`MqttProxy`."""

    async def make(broker) -> MqttProxy:
        proxy = MqttProxy(broker.host, broker.port)
        await nursery.start(proxy.run)
        return proxy

    return make


@pytest.fixture(params=["mosquitto", "fastmqtt"])
def any_broker(request, broker_factory):
    """A fresh broker process of each implementation in turn."""
    return broker_factory(request.param)


_ids = itertools.count(1)


def uid(prefix: str = "c") -> str:
    return f"{prefix}{next(_ids)}"


async def collect(stream, n: int, timeout: float = 10.0) -> list:
    """Take ``n`` messages from a stream within ``timeout``."""
    out = []
    with trio.fail_after(timeout):
        while len(out) < n:
            out.append(await stream.receive())
    return out


def make_predicate(direction: str, packet_type: str) -> Callable[[str, str], bool]:
    return lambda d, t: d == direction and t == packet_type


class ScriptedConn:
    """Server side of one connection to :class:`ScriptedBroker`."""

    def __init__(self, stream: trio.SocketStream, version: int | None) -> None:
        from fastmqtt import codec

        self.codec = codec
        self.stream = stream
        self.decoder = codec.Decoder(version)
        self.pending: list = []
        self.version = version or 5

    async def recv(self):
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.pending += self.decoder.feed(data)
            if self.decoder.version:
                self.version = self.decoder.version
        return self.pending.pop(0)

    async def recv_type(self, cls):
        while True:
            pkt = await self.recv()
            if isinstance(pkt, cls):
                return pkt

    async def send(self, *packets) -> None:
        await self.stream.send_all(b"".join(self.codec.encode(p, self.version) for p in packets))


class ScriptedBroker:
    """An in-process TCP server whose every connection runs ``script(conn)``:
    for client behaviour a real broker will not show on demand (negative
    acknowledgements, refusals)."""

    def __init__(self, script) -> None:
        self.script = script
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream) -> None:
        self.connections += 1
        conn = ScriptedConn(stream, None)
        try:
            await self.script(conn)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


@pytest.fixture
async def scripted_broker(nursery):
    """Factory ``await scripted_broker(script)`` -> a running :class:`ScriptedBroker`."""

    async def make(script) -> ScriptedBroker:
        b = ScriptedBroker(script)
        await nursery.start(b.run)
        return b

    return make
