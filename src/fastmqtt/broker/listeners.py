"""Network listeners: TCP, TLS, WebSocket and WebSocket over TLS.

Theory of operation
-------------------
:func:`serve_listener` binds one :class:`ListenerSpec` and runs an accept loop
that takes every pending connection per wake-up (up to ``ACCEPT_BATCH``)
rather than one per trip through the scheduler. Every accepted socket first
passes the listener's admission checks (connection count, connection rate); a
refused socket is closed at once, before any byte is read, and counted in
``Stats.connections_rejected`` when stats are given. An admitted socket gets
its own task which

1. runs the transport handshake with a deadline (``handshake_timeout``): TLS
   (``trio.SSLStream``), then for ``ws``/``wss`` the HTTP upgrade
   (trio-websocket on wsproto), checking the request path and answering with
   the ``mqtt`` subprotocol [MQTT-6.0.0-4] (``mqttv3.1`` for old clients that
   offer only that, as Mosquitto does);
2. calls ``await handler(stream, spec)`` with a plain ``trio.abc.Stream``, so
   the broker sees bytes and nothing of the transport;
3. closes the stream and releases the connection slot, whatever happened.

A plain TCP connection is a :class:`TcpStream`: the accepted socket with one
``setsockopt`` (TCP_NODELAY), the peer address that ``accept`` returned, and
a synchronous :meth:`TcpStream.try_send`, so the broker can answer a client
from its reader without starting a writer task. It is the connection-rate
path: ``trio.SocketStream`` costs a second ``setsockopt``, a ``getpeername``
and several Python layers per call, and closing through
``trio.aclose_forcefully`` costs two cancel scopes.

Each connection task catches everything except cancellation: a bad handshake,
a reset socket or a bug in the handler never reaches the accept loop (trio's
own ``serve_listeners`` would let it crash the server).

Over WebSocket, MQTT packets travel in binary messages [MQTT-6.0.0-1]; a
packet may span messages or several may share one [MQTT-6.0.0-2], so the
adapter simply concatenates message payloads into a byte stream. A text
message is a protocol violation: the connection is closed [MQTT-6.0.0-1].
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import functools
import logging
import socket
import ssl
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from .security import RateLimiter

__all__ = [
    "ListenerSpec",
    "serve_listener",
    "serve_listeners",
    "make_server_ssl_context",
    "WebSocketStream",
    "WS_SUBPROTOCOLS",
    "reload_certificates",
    "listener_connections",
    "ConnectionInfo",
    "connection_info",
    "TcpStream",
]

log = logging.getLogger("fastmqtt.broker.listeners")

#: Subprotocols we accept, in order of preference. ``mqttv3.1`` is what old
#: 3.1 clients (and Mosquitto's listener) still offer.
WS_SUBPROTOCOLS = ("mqtt", "mqttv3.1")

_TYPES = ("tcp", "tls", "ws", "wss")

# accept() errors that mean "out of resources": wait a little and go on, the
# way trio.serve_listeners does, rather than die or spin.
_SLEEPY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors about one connection that died in the backlog: skip it.
_SKIP_ERRNOS = {getattr(errno, n) for n in ("ECONNABORTED", "EPROTO", "ECONNRESET", "EPERM",
                                             "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH")
                if hasattr(errno, n)}
#: Connections accepted per wake-up of the accept loop at most (then other
#: tasks get a turn before the next batch).
ACCEPT_BATCH = 64


@dataclass
class ListenerSpec:
    """One listening socket and its policy.

    Attributes:
        type: ``"tcp"``, ``"tls"``, ``"ws"`` or ``"wss"``.
        host: address to bind (``"0.0.0.0"`` all IPv4, ``"::"`` all IPv6).
        port: port to bind; 0 picks a free one (reported by ``task_status``).
        certfile: PEM server certificate chain (``tls``/``wss``).
        keyfile: PEM private key; None when it is inside ``certfile``.
        cafile: PEM CA bundle used to verify client certificates.
        require_certificate: refuse clients without a valid certificate signed
            by ``cafile``. With a ``cafile`` but without this flag a client
            certificate is optional (verified when presented).
        path: WebSocket request path to accept (query string ignored); None
            accepts any path, as Mosquitto does.
        max_connections: open connections allowed on this listener; None = no limit.
        connection_rate: new connections per second allowed (token bucket with
            one second of burst); None = no limit.
        handshake_timeout: seconds allowed for the TLS and WebSocket
            handshakes; a client that stalls longer is dropped.
        ws_max_message_size: largest single WebSocket message (bytes); larger
            ones close the connection with 1009. MQTT's own maximum packet
            size is enforced by the broker's decoder.
        tls_min_version: lowest TLS version accepted.
        ssl_context: a ready server context; overrides certfile/keyfile/cafile.
        name: label for logs and metrics; defaults to ``type:port``.
    """

    type: str = "tcp"
    host: str = "0.0.0.0"
    port: int = 1883
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    require_certificate: bool = False
    path: str | None = None
    max_connections: int | None = None
    connection_rate: float | None = None
    handshake_timeout: float = 10.0
    ws_max_message_size: int = 16 * 1024 * 1024
    tls_min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    ssl_context: ssl.SSLContext | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"listener type must be one of {_TYPES}, not {self.type!r}")
        if self.is_tls and self.ssl_context is None and not self.certfile:
            raise ValueError(f"a {self.type} listener needs a certfile")
        if self.require_certificate and self.ssl_context is None and not self.cafile:
            raise ValueError("require_certificate needs a cafile")
        if self.max_connections is not None and self.max_connections < 0:
            raise ValueError("max_connections must be >= 0")
        if self.connection_rate is not None and self.connection_rate <= 0:
            raise ValueError("connection_rate must be > 0")

    @property
    def is_tls(self) -> bool:
        return self.type in ("tls", "wss")

    @property
    def is_websocket(self) -> bool:
        return self.type in ("ws", "wss")

    @property
    def label(self) -> str:
        return self.name or f"{self.type}:{self.port}"


def make_server_ssl_context(spec: ListenerSpec) -> ssl.SSLContext:
    """Build the stdlib server context for a ``tls``/``wss`` listener.

    Args:
        spec: the listener (certfile, keyfile, cafile, require_certificate).

    Returns:
        An ``ssl.SSLContext`` for server-side use.

    Raises:
        OSError, ssl.SSLError: when a file is missing or not valid PEM.
    """
    if spec.ssl_context is not None:
        return spec.ssl_context
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = spec.tls_min_version
    ctx.load_cert_chain(spec.certfile, spec.keyfile)
    if spec.cafile:
        ctx.load_verify_locations(cafile=spec.cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if spec.require_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


Handler = Callable[[trio.abc.Stream, ListenerSpec], Awaitable[Any]]


@dataclass(frozen=True, slots=True)  # one per connection: no __dict__
class ConnectionInfo:
    """What the listener knows about a connection, for authentication plug-ins.

    Attributes:
        listener: the listener's spec.
        peer: ``(host, port)`` of the client.
        certificate: the verified client certificate as ``ssl.getpeercert()``
            returns it (``subject``, ``subjectAltName``, ...), or None.
        path: the WebSocket request path, or None.
    """

    listener: ListenerSpec
    peer: tuple | None
    certificate: dict | None = None
    path: str | None = None

    @property
    def certificate_common_name(self) -> str | None:
        """The subject's commonName of the client certificate, if any."""
        for rdn in (self.certificate or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return None


#: The current connection's :class:`ConnectionInfo`. Set by the listener in the
#: connection's task before the handler runs, so code the handler calls in
#: that task (the broker's ``authenticate``) can read it with ``.get()``.
connection_info: contextvars.ContextVar[ConnectionInfo | None] = contextvars.ContextVar(
    "fastmqtt_connection_info", default=None)


def _peer_of(stream: Any) -> tuple | None:
    peer = getattr(stream, "peer", None)
    if peer is not None:
        return tuple(peer[:2])
    try:
        return tuple(stream.socket.getpeername()[:2])
    except (AttributeError, OSError):
        return None


def _count_reject(stats: Any, reason: str) -> None:
    if stats is None:
        return
    rejected = getattr(stats, "connections_rejected", None)
    if rejected is None:
        rejected = {}
        try:
            stats.connections_rejected = rejected
        except AttributeError:  # a Stats with __slots__: nowhere to count
            return
    rejected[reason] = rejected.get(reason, 0) + 1


class TcpStream(trio.abc.Stream):
    """A trio ``Stream`` over an accepted, non-blocking TCP socket.

    What ``trio.SocketStream`` does for the broker, with less work per call,
    plus a synchronous :meth:`try_send`. Like any trio stream, every ``await``
    is a checkpoint: ``receive_some`` yields to the scheduler even when data
    was already there, so a busy client cannot starve the others. One task
    may send at a time (the broker has at most one writer per connection).

    Attributes:
        socket: the stdlib socket.
        peer: ``(host, port)`` of the client, as ``accept`` returned it.
    """

    __slots__ = ("socket", "peer")

    def __init__(self, sock: socket.socket, peer: tuple | None = None) -> None:
        self.socket = sock
        self.peer = peer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.socket
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = sock.recv(max_bytes or 65536)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from None
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
            except (OSError, ValueError, TypeError):  # closed under us
                raise trio.ClosedResourceError("socket was closed") from None
            try:
                return sock.recv(max_bytes or 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _stream_error(exc) from None

    def try_receive(self, max_bytes: int = 65536) -> bytes | None:
        """What the socket holds now, without waiting (and without a
        checkpoint): ``b""`` at end of stream, None when nothing is there.

        Raises:
            trio.BrokenResourceError: the connection is broken.
            trio.ClosedResourceError: the stream was closed.
        """
        try:
            return self.socket.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from None

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now, without waiting.

        Returns:
            The number of bytes sent (0 when the socket buffer is full).

        Raises:
            trio.BrokenResourceError: the connection is broken.
            trio.ClosedResourceError: the stream was closed.
        """
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            total = len(view)
            sent = 0
            waited = False
            while sent < total:
                try:
                    sent += sock.send(view[sent:])
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _stream_error(exc) from None
                try:
                    await trio.lowlevel.wait_writable(sock)
                except (OSError, ValueError, TypeError):
                    raise trio.ClosedResourceError("socket was closed") from None
                waited = True
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    def close(self) -> None:
        """Close at once (wakes any task waiting on the socket with
        ``ClosedResourceError``); a second call does nothing."""
        sock = self.socket
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def _stream_error(exc: OSError) -> Exception:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class WebSocketStream(trio.abc.Stream):
    """A trio ``Stream`` over a trio-websocket connection.

    ``receive_some`` returns the payload of binary messages (split into
    ``max_bytes`` pieces when asked), ``b""`` once the peer has closed;
    ``send_all`` sends one binary message. A text message closes the
    connection with 1003 (unsupported data) [MQTT-6.0.0-1].
    """

    #: Seconds to wait for the peer's close frame before dropping the socket.
    close_timeout = 5.0

    def __init__(self, ws: Any, request_path: str = "/", subprotocol: str | None = None) -> None:
        self.websocket = ws
        self.request_path = request_path
        self.subprotocol = subprotocol
        self._pending = b""
        self._eof = False

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The TCP or TLS stream below the WebSocket (for peer address, certificate)."""
        return self.websocket._stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        from trio_websocket import ConnectionClosed

        if not self._pending:
            if self._eof:
                return b""
            while True:
                try:
                    message = await self.websocket.get_message()
                except ConnectionClosed:
                    self._eof = True
                    return b""
                if isinstance(message, str):
                    # [MQTT-6.0.0-1]: only binary frames carry MQTT.
                    log.info("text WebSocket frame received; closing connection")
                    self._eof = True
                    with trio.move_on_after(1):
                        await self.websocket.aclose(1003, "MQTT needs binary frames")
                    return b""
                if message:
                    self._pending = message
                    break
        data = self._pending
        if max_bytes is not None and len(data) > max_bytes:
            self._pending = data[max_bytes:]
            return data[:max_bytes]
        self._pending = b""
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        from trio_websocket import ConnectionClosed

        try:
            await self.websocket.send_message(bytes(data))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("WebSocket closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        return None

    async def aclose(self) -> None:
        # trio-websocket waits for the peer's close frame without a limit; a
        # client that never answers must not pin the connection task.
        with trio.move_on_after(self.close_timeout) as scope:
            await self.websocket.aclose()
        if scope.cancelled_caught:  # no close frame came back: drop the transport
            await trio.aclose_forcefully(self.transport_stream)


def _choose_subprotocol(proposed: tuple[str, ...]) -> str | None | bool:
    """The subprotocol to answer with; ``None`` when the client offered none
    (lenient, like Mosquitto), ``False`` when it offered only others."""
    if not proposed:
        return None
    lowered = [p.strip().lower() for p in proposed]
    for want in WS_SUBPROTOCOLS:
        if want in lowered:
            return proposed[lowered.index(want)]
    return False


async def _websocket_session(spec: ListenerSpec, stream: trio.abc.Stream, handler: Handler) -> None:
    """Upgrade ``stream`` to a WebSocket and run ``handler`` over it."""
    import trio_websocket

    async with trio.open_nursery() as nursery:
        ws = None
        with trio.move_on_after(spec.handshake_timeout) as scope:
            request = await trio_websocket.wrap_server_stream(
                nursery, stream, max_message_size=spec.ws_max_message_size)
            path = request.path.split("?", 1)[0]
            if spec.path is not None and path != spec.path:
                log.info("%s: WebSocket path %r refused (want %r)", spec.label, path, spec.path)
                await request.reject(404)
            else:
                proto = _choose_subprotocol(request.proposed_subprotocols)
                if proto is False:
                    log.info("%s: WebSocket subprotocols %r refused", spec.label,
                             request.proposed_subprotocols)
                    await request.reject(400, body=b"MQTT needs subprotocol 'mqtt'\n")
                else:
                    ws = await request.accept(subprotocol=proto)
        if scope.cancelled_caught:
            log.info("%s: WebSocket handshake timed out", spec.label)
        if ws is None:
            nursery.cancel_scope.cancel()
            return
        wrapped = WebSocketStream(ws, path, proto or None)
        info = connection_info.get()
        if info is not None:
            connection_info.set(dataclasses.replace(info, path=path))
        try:
            await handler(wrapped, spec)
        finally:
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def _tls_handshake(spec: ListenerSpec, stream: trio.abc.Stream,
                         ctx: ssl.SSLContext) -> trio.SSLStream | None:
    ssl_stream = trio.SSLStream(stream, ctx, server_side=True)
    with trio.move_on_after(spec.handshake_timeout):
        try:
            await ssl_stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", spec.label, exc)
            return None
        return ssl_stream
    log.info("%s: TLS handshake timed out", spec.label)
    return None


async def _run_tcp_connection(spec: ListenerSpec, sock: socket.socket, peer: Any,
                              handler: Handler, release: Callable[[], None]) -> None:
    # The plain TCP case, kept short: it runs once per connection.
    stream = TcpStream(sock, peer)
    try:
        connection_info.set(ConnectionInfo(spec, peer[:2] if peer else None))
        await handler(stream, spec)
    except Exception:  # one connection's failure stays in that connection
        log.exception("%s: connection handler failed", spec.label)
    finally:
        release()
        stream.close()  # synchronous: no cancel scope, no checkpoint needed


async def _run_connection(spec: ListenerSpec, sock: socket.socket, peer: Any, handler: Handler,
                          ctx: ssl.SSLContext | None, release: Callable[[], None]) -> None:
    stream = None
    try:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        top: trio.abc.Stream = stream
        cert = None
        if ctx is not None:
            tls = await _tls_handshake(spec, stream, ctx)
            if tls is None:
                return
            top = tls
            cert = tls.getpeercert() or None
        connection_info.set(ConnectionInfo(spec, peer[:2] if peer else _peer_of(stream), cert))
        if spec.is_websocket:
            await _websocket_session(spec, top, handler)
        else:
            await handler(top, spec)
    except Exception:  # one connection's failure stays in that connection
        log.exception("%s: connection handler failed", spec.label)
    finally:
        release()
        if stream is None:
            sock.close()
        else:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


class _Gate:
    """Admission state of one listener: open connections and the rate bucket."""

    __slots__ = ("spec", "stats", "active", "bucket", "ctx", "_next_info", "_quiet", "__weakref__")

    def __init__(self, spec: ListenerSpec, stats: Any, ctx: ssl.SSLContext | None = None) -> None:
        self.spec = spec
        self.stats = stats
        self.ctx = ctx  # replaced by reload_certificates(); each accept reads it
        self.active = 0
        self.bucket = RateLimiter(spec.connection_rate) if spec.connection_rate else None
        self._next_info = 0.0
        self._quiet = 0

    def _refuse(self, now: float, reason: str, detail: str) -> bool:
        _count_reject(self.stats, reason)
        # A flood must not turn into a flood of log lines: one info line per
        # 10 s with the number refused in between, the rest at debug.
        if now >= self._next_info:
            more = f" ({self._quiet} more refused since the last report)" if self._quiet else ""
            log.info("%s: connection refused: %s%s", self.spec.label, detail, more)
            self._next_info = now + 10.0
            self._quiet = 0
        else:
            self._quiet += 1
            log.debug("%s: connection refused: %s", self.spec.label, detail)
        return False

    def admit(self) -> bool:
        spec = self.spec
        now = trio.current_time()
        if spec.max_connections is not None and self.active >= spec.max_connections:
            return self._refuse(now, "max_connections",
                                f"{self.active} open (max_connections {spec.max_connections})")
        if self.bucket is not None and not self.bucket.allow(now):
            return self._refuse(now, "connection_rate",
                                f"more than {spec.connection_rate}/s (connection_rate)")
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


#: TLS listeners being served, for :func:`reload_certificates`.
_TLS_GATES: "weakref.WeakSet[_Gate]" = weakref.WeakSet()
#: Every listener being served, for :func:`listener_connections`.
_ALL_GATES: "weakref.WeakSet[_Gate]" = weakref.WeakSet()


def listener_connections() -> list[tuple[str, str, int]]:
    """``(label, type, open connections)`` for every listener served in this
    process (the ``fastmqtt_listener_connections`` gauge)."""
    return sorted((g.spec.label, g.spec.type, g.active) for g in list(_ALL_GATES))


def reload_certificates() -> int:
    """Re-read the certificate, key and CA files of every TLS/WSS listener.

    Called on SIGHUP (``security.sighup_reloader``) so renewed certificates
    (Let's Encrypt and the like) take effect without a restart. Connections
    already open keep their session; new ones get the new context. A listener
    whose files fail to load keeps its old context (the error is logged).

    Returns:
        How many listeners got a new context.
    """
    done = 0
    for gate in list(_TLS_GATES):
        if gate.spec.ssl_context is not None:
            continue  # a context handed in by the caller is the caller's to renew
        try:
            gate.ctx = make_server_ssl_context(gate.spec)
            done += 1
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("%s: certificates not reloaded, keeping the old ones: %s",
                      gate.spec.label, exc)
    if done:
        log.info("reloaded TLS certificates of %d listener(s)", done)
    return done


async def _accept_loop(gate: _Gate, lsock: socket.socket, handler: Handler,
                       nursery: trio.Nursery) -> None:
    spec = gate.spec
    plain = not spec.is_tls and not spec.is_websocket
    start_soon = nursery.start_soon
    admit = gate.admit
    while True:
        await trio.lowlevel.wait_readable(lsock)
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lsock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _SKIP_ERRNOS:
                    continue
                if exc.errno in _SLEEPY_ERRNOS:
                    log.error("%s: accept failed (%s); pausing 100 ms", spec.label, exc)
                    await trio.sleep(0.1)
                    break
                raise
            if not admit():
                # Refuse before reading a byte: an RST-free close is cheap and
                # the client's reconnect backoff does the rest. The socket was
                # never registered with trio, so a plain close is enough.
                sock.close()
                continue
            try:
                sock.setblocking(False)
                if plain:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset already
                gate.release()
                sock.close()
                continue
            if plain:
                start_soon(_run_tcp_connection, spec, sock, peer, handler, gate.release)
            else:
                start_soon(_run_connection, spec, sock, peer, handler, gate.ctx, gate.release)


def _stdlib_listener(listener: trio.SocketListener) -> socket.socket:
    """The listening socket of ``listener`` as a non-blocking stdlib socket
    (the trio wrapper gives up the descriptor), for the batch accept loop."""
    tsock = listener.socket
    family, type_, proto = tsock.family, tsock.type, tsock.proto
    sock = socket.socket(family, type_, proto, fileno=tsock.detach())
    sock.setblocking(False)
    return sock


async def serve_listener(spec: ListenerSpec, handler: Handler, *, stats: Any = None,
                         task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Bind ``spec`` and serve connections until cancelled.

    Args:
        spec: what to bind and how to treat connections.
        handler: ``async handler(stream, spec)``, run in its own task for each
            admitted connection, with the TLS/WebSocket handshake already
            done. The stream is closed after it returns or raises; what it
            raises is logged, never propagated.
        stats: optional ``interfaces.Stats``; refused connections are counted
            in ``stats.connections_rejected[reason]`` (``"max_connections"``,
            ``"connection_rate"``).
        task_status: receives ``(host, port)`` once bound; with port 0 it is
            the real port chosen by the OS.

    Raises:
        OSError: when the address cannot be bound.
        ssl.SSLError: when the certificate or key cannot be loaded.
    """
    ctx = make_server_ssl_context(spec) if spec.is_tls else None
    listeners = await trio.open_tcp_listeners(spec.port, host=spec.host or None)
    bound = listeners[0].socket.getsockname()
    host, port = bound[0], bound[1]
    if spec.name is None and spec.port != port:
        # Port 0 was asked for: label logs and metrics with the real port.
        spec = dataclasses.replace(spec, name=f"{spec.type}:{port}")
    log.debug("listening on %s (%s %s:%d)", spec.label, spec.type, host, port)
    socks = [_stdlib_listener(listener) for listener in listeners]
    gate = _Gate(spec, stats, ctx)
    _ALL_GATES.add(gate)
    if ctx is not None:
        _TLS_GATES.add(gate)
    try:
        async with trio.open_nursery() as nursery:
            for lsock in socks:
                nursery.start_soon(_accept_loop, gate, lsock, handler, nursery)
            task_status.started((host, port))
    finally:
        _TLS_GATES.discard(gate)
        _ALL_GATES.discard(gate)
        for lsock in socks:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()


async def serve_listeners(specs: list[ListenerSpec], handler: Handler, *, stats: Any = None,
                          task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve several listeners; ``task_status`` gets the list of ``(host, port)``.

    Args:
        specs: the listeners, bound in order.
        handler: as for :func:`serve_listener`.
        stats: as for :func:`serve_listener`.
        task_status: receives ``[(host, port), ...]`` in the order of ``specs``.
    """
    async with trio.open_nursery() as nursery:
        bound = []
        for spec in specs:
            bound.append(await nursery.start(
                functools.partial(serve_listener, spec, handler, stats=stats)))
        task_status.started(bound)
