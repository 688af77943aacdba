"""One network connection to a broker: TCP, TLS, WebSocket or secure WebSocket.

A :class:`Transport` moves bytes and knows nothing about MQTT. Broker addresses
are URLs: ``mqtt://`` (or ``tcp://``) and ``mqtts://`` (``ssl://``, ``tls://``)
for raw streams, ``ws://`` and ``wss://`` for MQTT over WebSocket (binary
frames, subprotocol ``mqtt`` [MQTT-6.0.0-3], path ``/mqtt`` unless given).
"""

from __future__ import annotations

import ssl as _ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

import trio

__all__ = ["BrokerURL", "parse_url", "Transport", "open_transport", "TransportClosed"]

_SCHEMES = {
    "mqtt": ("tcp", False, 1883),
    "tcp": ("tcp", False, 1883),
    "mqtts": ("tcp", True, 8883),
    "ssl": ("tcp", True, 8883),
    "tls": ("tcp", True, 8883),
    "ws": ("ws", False, 80),
    "wss": ("ws", True, 443),
}


class TransportClosed(Exception):
    """The peer closed the connection or it broke."""


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """Where to connect: ``kind`` is "tcp" or "ws"; ``tls`` adds TLS."""

    kind: str
    host: str
    port: int
    tls: bool = False
    path: str = "/mqtt"
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        scheme = {("tcp", False): "mqtt", ("tcp", True): "mqtts",
                  ("ws", False): "ws", ("ws", True): "wss"}[(self.kind, self.tls)]
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = self.path if self.kind == "ws" else ""
        return f"{scheme}://{host}:{self.port}{suffix}"


def parse_url(url: str) -> BrokerURL:
    """Parse a broker URL such as ``mqtts://user:pw@broker:8883`` or
    ``ws://localhost:8080/mqtt``.

    Raises:
        ValueError: unknown scheme or no host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r}")
    kind, tls, default_port = _SCHEMES[scheme]
    if not parts.hostname:
        raise ValueError(f"no host in broker URL {url!r}")
    path = parts.path or "/mqtt"
    if parts.query:
        path += "?" + parts.query
    return BrokerURL(kind, parts.hostname, parts.port or default_port, tls, path,
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None)


class Transport(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def receive(self) -> bytes: ...  # raises TransportClosed at the end
    async def aclose(self) -> None: ...


class StreamTransport:
    """A trio stream (TCP, or TLS over TCP)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc
        if not data:
            raise TransportClosed("connection closed by the broker")
        return data

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except Exception:
                pass


class WebSocketTransport:
    """MQTT over WebSocket: each send is one binary message; a message may hold
    any part of the MQTT byte stream [MQTT-6.0.0-2]."""

    def __init__(self, ws) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        import trio_websocket

        try:
            await self.ws.send_message(bytes(data))
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
            raise TransportClosed(str(exc)) from exc

    async def receive(self) -> bytes:
        import trio_websocket

        try:
            msg = await self.ws.get_message()
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
            raise TransportClosed(str(exc)) from exc
        if isinstance(msg, str):
            # MQTT uses binary frames only [MQTT-6.0.0-1].
            raise TransportClosed("text WebSocket frame from the broker")
        return msg

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.ws.aclose()
            except Exception:
                pass


async def open_transport(url: BrokerURL, nursery: trio.Nursery,
                         ssl_context: _ssl.SSLContext | None = None) -> Transport:
    """Connect to ``url``.

    Args:
        url: the broker address.
        nursery: hosts the WebSocket reader task (lives as long as the connection).
        ssl_context: for TLS URLs (default: ``ssl.create_default_context()``).

    Returns:
        A connected :class:`Transport`.
    Raises:
        OSError, trio_websocket.HandshakeError: connection failed.
    """
    ctx = None
    if url.tls:
        ctx = ssl_context or _ssl.create_default_context()
    if url.kind == "tcp":
        if ctx is not None:
            stream = await trio.open_ssl_over_tcp_stream(url.host, url.port, ssl_context=ctx,
                                                         https_compatible=False)
            await stream.do_handshake()
        else:
            stream = await trio.open_tcp_stream(url.host, url.port)
        return StreamTransport(stream)
    import trio_websocket

    ws = await trio_websocket.connect_websocket(
        nursery, url.host, url.port, url.path, use_ssl=ctx if ctx is not None else False,
        subprotocols=["mqtt"], message_queue_size=64, max_message_size=16 * 1024 * 1024)
    return WebSocketTransport(ws)
