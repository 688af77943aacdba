"""The trio client: connection management, outbox, subscriptions, routing.

Theory of operation
-------------------
One long-lived task (``_run``) owns the connection loop, in the manner of Go's
autopaho: connect to the next broker URL, run the connection until it fails,
wait an exponentially growing, jittered delay (:class:`Backoff`), repeat. A
connection runs four things in its own nursery: the handshake (CONNECT, then
wait for CONNACK), a reader task feeding bytes to the sans-IO
:class:`~fastmqtt.client.protocol.ClientProtocol`, a writer task that coalesces
everything queued since its last write into one ``send`` (acks, publishes and
pings share one buffer, so there is exactly one writer), and a keepalive task
sleeping until ``protocol.next_deadline()``. A task that fails records the
error and cancels the connection's nursery; nothing raises across tasks.

What survives reconnects, and why nothing acknowledged is lost:

* Every QoS 1/2 publish is put in the outbox first (memory, or SQLite to
  survive a restart) and removed only when its flow completes. ``_pump`` moves
  queued entries into the session while connected and the server's Receive
  Maximum allows; unacknowledged ones are resent with DUP after the next
  CONNACK by the protocol [MQTT-4.4.0-1]. ``await publish()`` waits for the
  PUBACK/PUBCOMP and raises :class:`PublishError` on a reason code >= 0x80.
* The client records every subscription. After a CONNACK with Session Present
  0 (the broker kept nothing) all of them are sent again; with Session Present
  1 only those whose SUBACK never arrived.
* Inbound QoS 2 state lives in the protocol and is kept while the session is.

Received messages are routed synchronously into bounded buffers (see
:mod:`fastmqtt.client.router`), so the reader never waits on the application.
"""

from __future__ import annotations

import inspect
import logging
import random
import secrets
import ssl as _ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import trio

from .. import codec
from ..enums import EMPTY_PROPERTIES, PropertyId, ReasonCode
from ..errors import MalformedPacket
from ..topics import validate_topic_filter, validate_topic_name
from .connection import BrokerURL, TransportClosed, open_transport, parse_url
from .errors import (ClientClosed, ClientError, ConnectError, MessageExpired, PublishError,
                     RequestTimeout, SubscribeError)
from .outbox import MemoryOutbox, OutboxEntry
from .protocol import (AuthReceived, ClientProtocol, Connected, ConnectionRefused,
                       KeepAliveTimeout, MessageReceived, PingResponse, ProtocolError,
                       PublishCompleted, PublishReceived, ServerDisconnected,
                       SubscribeCompleted, UnsubscribeCompleted)
from .router import HandlerRoute, Message, MessageStream, Router

__all__ = ["Client", "Backoff", "PublishResult", "ConnectionInfo"]

log = logging.getLogger("fastmqtt.client")
P = PropertyId

#: CONNACK reason codes after which trying again cannot help.
_PERMANENT_REFUSALS = frozenset([
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD, ReasonCode.NOT_AUTHORIZED, ReasonCode.BANNED,
    ReasonCode.BAD_AUTHENTICATION_METHOD,
])

_WRITE_HIGH_WATER = 1 << 20  # bytes buffered for the writer before publishers wait


@dataclass(slots=True)
class Backoff:
    """Reconnect delays: ``initial * multiplier**(n-1)`` capped at ``maximum``,
    each reduced by a random fraction up to ``jitter`` so that many clients
    cut off at once do not reconnect in lockstep.

    Args:
        initial: first delay (seconds).
        maximum: largest delay.
        multiplier: growth per failed attempt.
        jitter: 0..1, the random fraction taken off each delay.
    """

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt number ``attempt`` (1-based)."""
        base = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        r = (rng or random).random()
        return base * (1.0 - self.jitter * r)


@dataclass(slots=True)
class PublishResult:
    """The broker's acknowledgement of a QoS 1/2 message (reason code < 0x80;
    0x10 No matching subscribers is a success)."""

    reason_code: int
    properties: Mapping[int, Any] = field(default_factory=lambda: EMPTY_PROPERTIES)
    packet_id: int = 0


@dataclass(slots=True)
class ConnectionInfo:
    """Passed to ``on_connect`` hooks."""

    url: BrokerURL
    session_present: bool
    properties: Mapping[int, Any]
    connection_number: int


class _Waiter:
    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any = None) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(slots=True)
class _Sub:
    sub: Any  # codec.Subscription
    properties: Mapping[int, Any] | None
    acked: bool = False
    granted: int = -1
    waiters: list = field(default_factory=list)


class _Conn:
    """One live connection: its transport, write buffer and cancel scope."""

    def __init__(self, transport, scope: trio.CancelScope, url: BrokerURL) -> None:
        self.transport = transport
        self.scope = scope
        self.url = url
        self.buf = bytearray()
        self._wake = trio.Event()
        self._drained = trio.Event()
        self.error: BaseException | None = None
        self.started_at = trio.current_time()

    def write(self, data: bytes) -> None:
        if data:
            self.buf += data
            self._wake.set()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.scope.cancel()
        self._drained.set()  # release publishers waiting for buffer space

    async def wait_drained(self, level: int = 0) -> None:
        while len(self.buf) > level and self.error is None:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def writer(self, protocol: ClientProtocol) -> None:
        try:
            while True:
                while not self.buf:
                    self._drained.set()
                    if self._wake.is_set():
                        self._wake = trio.Event()
                    await self._wake.wait()
                data = bytes(self.buf)
                self.buf.clear()
                await self.transport.send(data)
                protocol.note_sent(trio.current_time())
                self._drained.set()
        except Exception as exc:
            self.fail(exc)
            self._drained.set()


def _normalise_payload(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if payload is None:
        return b""
    raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")


def _safe_level(text: str) -> str:
    # A client id becomes one topic level of the response topic.
    return "".join("_" if c in "/+#\x00" else c for c in text) or "anon"


class Client:
    """An MQTT 5.0 / 3.1.1 client for trio that reconnects by itself.

    Use it as ``async with Client("localhost") as client:``. On entry it
    connects (trying each URL in turn with backoff) and keeps the connection up
    until exit; every method works across reconnects.

    Args:
        host: host name, or a broker URL (``mqtt://``, ``mqtts://``, ``ws://``,
            ``wss://``). None when ``urls`` is given.
        port: port for a plain ``host`` (default 1883, 8883 with TLS, 80/443
            for WebSocket).
        urls: further broker URLs, tried in turn after ``host``.
        client_id: Client Identifier (default: a random ``fastmqtt-...``; ""
            asks a v5 broker to assign one).
        version: 5 or 4 (3.1.1) (3 for MQTT 3.1).
        clean_start: Clean Start of the first CONNECT (v5: later CONNECTs
            resume the session; 3.1.1: the same Clean Session every time).
        session_expiry: v5 Session Expiry Interval in seconds.
        keep_alive: seconds between pings on an idle connection (0: none).
        username, password: credentials (``password`` str or bytes).
        will: a :class:`fastmqtt.Will` published by the broker when the
            connection dies without DISCONNECT.
        tls: True or an ``ssl.SSLContext`` for a plain ``host`` (URLs say it
            themselves); the context is used for every TLS URL.
        transport: "tcp" or "websockets" for a plain ``host``.
        ws_path: WebSocket path for a plain ``host``.
        connect_timeout: seconds for TCP/TLS/WebSocket setup plus CONNACK.
        backoff: reconnect delays (:class:`Backoff`).
        connect_attempts: rounds over all URLs before the first connection
            gives up (``__aenter__`` raises :class:`ConnectError`); None:
            keep trying.
        max_reconnect_attempts: failed rounds in a row after a lost connection
            before giving up (then every waiting call raises
            :class:`ConnectError`); None: keep trying forever.
        reconnect: False to give up at the first lost connection.
        outbox: a :class:`~fastmqtt.client.outbox.MemoryOutbox` (default, of
            ``outbox_size``) or :class:`~fastmqtt.client.outbox.SQLiteOutbox`.
        outbox_size: bound of the default outbox.
        receive_maximum: unacknowledged QoS 1/2 messages we accept (v5).
        topic_alias_maximum: inbound topic aliases we accept (v5).
        topic_aliases: use outbound topic aliases when the broker allows (v5).
        max_packet_size: largest packet we accept (0: no limit).
        connect_properties: extra v5 CONNECT properties.
        ping_timeout: seconds without PINGRESP before the connection counts as
            dead (default: the keep alive, at most 30).
        on_connect: callables ``hook(client, info)`` (sync or async) run on
            every connection after resubscription; add more with
            :meth:`add_connect_hook`.
        response_prefix: first levels of the request/response reply topic.
        auth_method, auth_data: v5 enhanced authentication (4.12): sent in
            CONNECT; each AUTH challenge (reason 0x18) from the broker is
            answered with ``on_auth(properties)`` (sync or async, returning the
            next Authentication Data bytes).
        wait_connected: ``__aenter__`` waits for the first connection (and
            raises :class:`ConnectError` when ``connect_attempts`` run out);
            False returns at once and connects in the background (publishes
            wait in the outbox meanwhile).
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        urls: Sequence[str] = (),
        client_id: str | None = None,
        version: int = 5,
        clean_start: bool = True,
        session_expiry: int = 0,
        keep_alive: int = 60,
        username: str | None = None,
        password: str | bytes | None = None,
        will: Any = None,
        tls: bool | _ssl.SSLContext = False,
        transport: str = "tcp",
        ws_path: str = "/mqtt",
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
        connect_attempts: int | None = 1,
        max_reconnect_attempts: int | None = None,
        reconnect: bool = True,
        outbox: MemoryOutbox | None = None,
        outbox_size: int = 10_000,
        receive_maximum: int = 65535,
        topic_alias_maximum: int = 16,
        topic_aliases: bool = True,
        max_packet_size: int = 0,
        connect_properties: Mapping[int, Any] | None = None,
        ping_timeout: float | None = None,
        on_connect: Callable | Iterable[Callable] | None = None,
        response_prefix: str = "fastmqtt/response",
        wait_connected: bool = True,
        auth_method: str | None = None,
        auth_data: bytes | None = None,
        on_auth: Callable | None = None,
    ) -> None:
        self.ssl_context = tls if isinstance(tls, _ssl.SSLContext) else None
        parsed: list[BrokerURL] = []
        if host is not None:
            if "://" in host:
                parsed.append(parse_url(host))
            else:
                ws = transport in ("websockets", "websocket", "ws")
                secure = bool(tls)
                default = (443 if secure else 80) if ws else (8883 if secure else 1883)
                parsed.append(BrokerURL("ws" if ws else "tcp", host, port or default, secure,
                                        ws_path))
        parsed.extend(parse_url(u) for u in urls)
        if not parsed:
            raise ValueError("give a host or at least one broker URL")
        self.urls = parsed
        if username is None:
            creds = next((u for u in parsed if u.username), None)
            if creds is not None:
                username, password = creds.username, creds.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if client_id is None:
            client_id = "fastmqtt-" + secrets.token_hex(6)
        self.version = version
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.connect_attempts = connect_attempts
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect = reconnect
        self.response_prefix = response_prefix
        self.wait_connected_on_enter = wait_connected
        self.auth_method = auth_method
        self.on_auth = on_auth
        if auth_method is not None:
            connect_properties = dict(connect_properties or {})
            connect_properties[P.AUTHENTICATION_METHOD] = auth_method
            if auth_data is not None:
                connect_properties[P.AUTHENTICATION_DATA] = auth_data
        self._protocol = ClientProtocol(
            client_id, version=version, keep_alive=keep_alive, clean_start=clean_start,
            session_expiry=session_expiry, username=username, password=password, will=will,
            connect_properties=connect_properties, receive_maximum=receive_maximum,
            topic_alias_maximum=topic_alias_maximum, max_packet_size=max_packet_size,
            ping_timeout=ping_timeout, outbound_topic_aliases=topic_aliases)
        self._outbox = outbox if outbox is not None else MemoryOutbox(outbox_size)
        self.router = Router()
        self._conn: _Conn | None = None
        self._connected = trio.Event()
        self._disconnected = trio.Event()
        self._disconnected.set()
        self._nursery: trio.Nursery | None = None
        self._nursery_cm = None
        self._closing = False
        self._closed = False
        self._failure: ConnectError | None = None
        self._first_result = _Waiter()
        self._pub_waiters: dict[int, _Waiter] = {}
        self._pid_seq: dict[int, int] = {}
        self._subs: dict[str, _Sub] = {}
        self._sub_requests: dict[int, list[str]] = {}
        self._unsub_requests: dict[int, tuple[list[str], _Waiter]] = {}
        self._pending_unsubs: set[str] = set()
        self._requests: dict[bytes, _Waiter] = {}
        self._response_topic: str | None = None
        self._response_lock = trio.Lock()
        self._handlers: list[HandlerRoute] = []
        self._connect_hooks: list[Callable] = []
        self._drained = trio.Event()
        if on_connect is not None:
            for hook in ([on_connect] if callable(on_connect) else on_connect):
                self.add_connect_hook(hook)
        self._redirect: BrokerURL | None = None  # Server Reference to try next
        self.connections = 0  # successful connections so far
        self.last_error: BaseException | None = None
        self.session_present = False
        # A persistent outbox may hold flows from the previous process: put
        # their packet ids back in the session so they resume [MQTT-4.4.0-1].
        for entry in self._outbox.entries():
            if entry.state in ("publish", "pubrel"):
                self._protocol.restore_inflight(entry.packet_id, entry.state, entry.publish)
                self._pid_seq[entry.packet_id] = entry.seq

    # ------------------------------------------------------------ lifecycle

    @property
    def client_id(self) -> str:
        return self._protocol.client_id

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and self._protocol.connected

    @property
    def outbox(self) -> MemoryOutbox:
        return self._outbox

    @property
    def protocol(self) -> ClientProtocol:
        return self._protocol

    async def __aenter__(self) -> "Client":
        if self._nursery is not None or self._closed:
            raise RuntimeError("a Client can be entered once")
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        for route in self._handlers:
            if not route.started:
                self._nursery.start_soon(route.run)
        self._nursery.start_soon(self._run)
        if not self.wait_connected_on_enter:
            return self
        try:
            await self._first_result.wait()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        try:
            conn = self._conn
            if conn is not None and self._protocol.connected:
                # Normal disconnection: the broker discards the will
                # [MQTT-3.14.4-3]. Shielded and bounded, so it is sent even
                # when we are leaving because of a cancellation.
                conn.write(self._protocol.disconnect(0))
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await conn.wait_drained()
        finally:
            self._closed = True
            closed = ClientClosed("the client is closed")
            self._fail_waiters(closed)
            self.router.close_all()
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            try:
                # The caller's own exception is not passed in: it propagates
                # unchanged instead of inside an exception group. Our tasks
                # catch their errors, so the nursery ends quietly once cancelled.
                await self._nursery_cm.__aexit__(None, None, None)
            finally:
                self._outbox.close()
                self._connected.set()  # wake wait_connected() callers: they see _closed
                self._disconnected.set()

    async def aclose(self) -> None:
        """Disconnect and stop (same as leaving ``async with``)."""
        if not self._closed and self._nursery is not None:
            await self._shutdown()

    def _fail_waiters(self, error: BaseException) -> None:
        for w in self._pub_waiters.values():
            w.fail(error)
        self._pub_waiters.clear()
        for st in self._subs.values():
            for w in st.waiters:
                w.fail(error)
            st.waiters.clear()
        for _, w in self._unsub_requests.values():
            w.fail(error)
        for w in self._requests.values():
            w.fail(error)
        self._first_result.fail(error)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once connected.

        Raises:
            ConnectError: the client gave up.
            ClientClosed: the client was closed.
            trio.TooSlowError: ``timeout`` passed.
        """
        with trio.fail_after(timeout) if timeout is not None else _nullcontext():
            while True:
                self._check_usable()
                if self.is_connected:
                    return
                await self._connected.wait()

    async def wait_disconnected(self) -> None:
        """Return once the current connection (if any) is lost."""
        await self._disconnected.wait()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed or self._closing:
            raise ClientClosed("the client is closed")

    def add_connect_hook(self, hook: Callable) -> None:
        """Run ``hook(client, info: ConnectionInfo)`` (sync or async) after every
        successful connection, once lost subscriptions have been sent again."""
        self._connect_hooks.append(hook)

    # -------------------------------------------------------- connection loop

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except Exception as exc:  # a bug must surface as a clear error, not hang callers
            log.exception("connection loop failed")
            self._give_up(ConnectError(f"connection loop failed: {exc!r}", last_error=exc))

    async def _connection_loop(self) -> None:
        failures = 0  # failed rounds over all URLs in a row
        index = 0
        ever_connected = False
        while not self._closing:
            if self._redirect is not None:
                # The broker named another server (v5 Server Reference, 4.11):
                # try it next, once, without counting an attempt.
                url, self._redirect = self._redirect, None
            else:
                url = self.urls[index % len(self.urls)]
                index += 1
            try:
                connected, lasted = await self._one_connection(url)
            except ConnectError as exc:  # a permanent refusal
                self._give_up(exc)
                return
            if self._closing:
                return
            if self._redirect is not None:
                continue
            if connected:
                ever_connected = True
                # A connection that dies at once (session taken over, broker
                # crashing at start) must not make us reconnect in a hot loop.
                failures = 0 if lasted >= 1.0 else failures + 1
                if not self.reconnect:
                    self._give_up(ConnectError("connection lost and reconnect is off",
                                               last_error=self.last_error))
                    return
                await trio.sleep(self.backoff.delay(max(1, failures)))
                continue
            if index % len(self.urls):
                continue  # try the next URL at once
            failures += 1
            limit = self.max_reconnect_attempts if ever_connected else self.connect_attempts
            if limit is not None and failures >= limit:
                where = ", ".join(str(u) for u in self.urls)
                self._give_up(ConnectError(f"could not connect to {where}: {self.last_error!r}",
                                           last_error=self.last_error))
                return
            await trio.sleep(self.backoff.delay(failures))

    def _give_up(self, error: ConnectError) -> None:
        log.warning("giving up: %s", error)
        self._failure = error
        self._fail_waiters(error)
        self._connected.set()

    async def _one_connection(self, url: BrokerURL) -> tuple[bool, float]:
        """Run one connection to its end; returns (got a CONNACK, seconds up)."""
        proto = self._protocol
        connected = False
        up_at = 0.0
        conn: _Conn | None = None
        refusal: ConnectError | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(self.connect_timeout):
                        transport = await open_transport(url, nursery, self.ssl_context)
                        conn = _Conn(transport, nursery.cancel_scope, url)
                        now = trio.current_time()
                        await transport.send(proto.start(now))
                        proto.note_sent(now)
                        events: list = []
                        while not events:
                            events = proto.receive_data(await transport.receive(),
                                                        trio.current_time())
                            if events and isinstance(events[0], AuthReceived):
                                # Enhanced authentication: answer the challenge
                                # and keep waiting for the CONNACK [MQTT-4.12.0-2].
                                await transport.send(await self._answer_auth(events[0]))
                                events = events[1:]
                except (OSError, TransportClosed, ProtocolError, trio.TooSlowError,
                        MalformedPacket) as exc:
                    self.last_error = exc
                    log.info("connect to %s failed: %r", url, exc)
                    nursery.cancel_scope.cancel()
                    return False, 0.0
                except Exception as exc:  # e.g. trio_websocket.HandshakeError
                    self.last_error = exc
                    log.info("connect to %s failed: %r", url, exc)
                    nursery.cancel_scope.cancel()
                    return False, 0.0
                first = events[0]
                if isinstance(first, ConnectionRefused):
                    rc = first.reason_code
                    self._note_redirect(url, rc, first.properties)
                    self.last_error = ConnectError(
                        f"{url} refused the connection: 0x{rc:02X}", rc)
                    nursery.cancel_scope.cancel()
                    if rc in _PERMANENT_REFUSALS:
                        # Raised after the nursery, so it is not wrapped in an
                        # exception group.
                        refusal = self.last_error
                    return False, 0.0
                if not isinstance(first, Connected):
                    self.last_error = ConnectError(f"{url} answered CONNECT with {first!r}")
                    nursery.cancel_scope.cancel()
                    return False, 0.0
                connected = True
                up_at = trio.current_time()
                self._on_connected(conn, first)
                try:
                    self._handle_events(events[1:])
                except Exception as exc:
                    conn.fail(exc)
                conn.write(proto.data_to_send())
                nursery.start_soon(conn.writer, proto)
                nursery.start_soon(self._reader, conn)
                nursery.start_soon(self._keepalive, conn)
                info = ConnectionInfo(url, first.session_present, first.properties,
                                      self.connections)
                for hook in self._connect_hooks:
                    nursery.start_soon(self._run_hook, hook, info)
            # The nursery ends only when a task failed (conn.fail cancels it)
            # or the client is closing.
        finally:
            if conn is not None:
                if conn.error is not None:
                    self.last_error = conn.error
                    log.info("connection to %s lost: %r", url, conn.error)
                with trio.CancelScope(shield=True):
                    await conn.transport.aclose()
            if connected:
                self._on_disconnected()
            else:
                proto.connection_lost()
            if refusal is not None:
                raise refusal
        return connected, trio.current_time() - up_at if connected else 0.0

    async def _answer_auth(self, ev: AuthReceived) -> bytes:
        if ev.reason_code != ReasonCode.CONTINUE_AUTHENTICATION or self.on_auth is None:
            raise ProtocolError(f"unexpected AUTH 0x{ev.reason_code:02X} during connect")
        if ev.properties.get(P.AUTHENTICATION_METHOD) != self.auth_method:
            # The method must stay the same throughout [MQTT-4.12.0-5].
            raise ProtocolError("AUTH with a different Authentication Method")
        data = self.on_auth(ev.properties)
        if inspect.isawaitable(data):
            data = await data
        props = {P.AUTHENTICATION_METHOD: self.auth_method}
        if data is not None:
            props[P.AUTHENTICATION_DATA] = bytes(data)
        return self._protocol.auth(ReasonCode.CONTINUE_AUTHENTICATION, props)

    def _note_redirect(self, current: BrokerURL, reason_code: int,
                       properties: Mapping[int, Any]) -> None:
        """Remember a v5 Server Reference sent with Use another server (0x9C)
        or Server moved (0x9D). Its format is not fixed by the specification:
        a URL, or ``host[:port]`` reached like the current broker."""
        ref = properties.get(P.SERVER_REFERENCE)
        if reason_code not in (ReasonCode.USE_ANOTHER_SERVER, ReasonCode.SERVER_MOVED) or not ref:
            return
        target = ref.split()[0] if ref.split() else ""
        try:
            if "://" in target:
                self._redirect = parse_url(target)
            else:
                host, _, port = target.rpartition(":") if target.count(":") == 1 else (target, "", "")
                self._redirect = BrokerURL(current.kind, host or target,
                                           int(port) if port else current.port, current.tls,
                                           current.path)
        except ValueError:
            log.warning("ignoring unusable server reference %r", ref)

    async def _run_hook(self, hook: Callable, info: ConnectionInfo) -> None:
        try:
            result = hook(self, info)
            if inspect.isawaitable(result):
                await result
        except ClientError as exc:
            log.info("connect hook %r: %r", hook, exc)
        except Exception:
            log.exception("connect hook %r failed", hook)

    def _on_connected(self, conn: _Conn, ev: Connected) -> None:
        self._conn = conn
        self.connections += 1
        self.session_present = ev.session_present
        for data in ev.resend:
            conn.write(data)
        if not ev.session_present:
            # The protocol sends PUBREC'd messages again as new PUBLISHes;
            # keep the persistent outbox in step.
            for entry in self._outbox.entries():
                if entry.state == "pubrel":
                    self._outbox.mark_sent(entry, entry.packet_id)
            # The broker has no subscriptions for us: send them all again.
            self._pending_unsubs.clear()
            for st in self._subs.values():
                st.acked = False
                st.granted = -1
        elif self._pending_unsubs:
            filters = sorted(self._pending_unsubs)
            self._pending_unsubs.clear()
            pid, data = self._protocol.unsubscribe(filters)
            self._unsub_requests[pid] = (filters, _Waiter())
            conn.write(data)
        self._send_subscriptions([st for st in self._subs.values() if not st.acked])
        self._pump()
        self._disconnected = trio.Event()
        self._connected.set()
        self._first_result.set()

    def _on_disconnected(self) -> None:
        self._conn = None
        self._protocol.connection_lost()
        self._sub_requests.clear()  # unacked subscriptions are sent again
        for filters, waiter in self._unsub_requests.values():
            self._pending_unsubs.update(f for f in filters if f not in self._subs)
            waiter.set(None)
        self._unsub_requests.clear()
        self._connected = trio.Event()
        self._disconnected.set()

    async def _reader(self, conn: _Conn) -> None:
        proto = self._protocol
        try:
            while True:
                data = await conn.transport.receive()
                try:
                    events = proto.receive_data(data, trio.current_time())
                except ProtocolError as exc:
                    self._handle_events(exc.events)
                    conn.write(proto.data_to_send())
                    if self.version == 5:
                        # Tell the broker why before closing [MQTT-4.13.1-1].
                        conn.write(proto.disconnect(exc.reason_code))
                    with trio.move_on_after(1):
                        await conn.wait_drained()
                    raise
                self._handle_events(events)
                out = proto.data_to_send()
                if out:
                    conn.write(out)
        except Exception as exc:
            conn.fail(exc)

    async def _keepalive(self, conn: _Conn) -> None:
        proto = self._protocol
        try:
            while True:
                deadline = proto.next_deadline()
                if deadline is None:
                    await trio.sleep_forever()
                await trio.sleep_until(deadline)
                conn.write(proto.tick(trio.current_time()))
        except KeepAliveTimeout as exc:
            conn.fail(exc)

    # -------------------------------------------------------------- events

    def _handle_events(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, MessageReceived):
                self._on_message(ev.publish)
            elif isinstance(ev, PublishCompleted):
                self._on_publish_completed(ev)
            elif isinstance(ev, PublishReceived):
                seq = self._pid_seq.get(ev.packet_id)
                entry = self._outbox.get(seq) if seq is not None else None
                if entry is not None:
                    self._outbox.mark_released(entry)
            elif isinstance(ev, SubscribeCompleted):
                self._on_suback(ev)
            elif isinstance(ev, UnsubscribeCompleted):
                item = self._unsub_requests.pop(ev.packet_id, None)
                if item is not None:
                    item[1].set(ev.reason_codes)
            elif isinstance(ev, ServerDisconnected):
                rc = ev.reason_code
                if self._conn is not None:
                    self._note_redirect(self._conn.url, rc, ev.properties)
                reason = ev.properties.get(P.REASON_STRING, "")
                raise TransportClosed(f"broker sent DISCONNECT 0x{rc:02X} {reason}".strip())
            elif isinstance(ev, AuthReceived):
                raise ProtocolError("enhanced authentication is not supported")
            elif isinstance(ev, PingResponse):
                pass

    def _on_message(self, pub: Any) -> None:
        msg = Message(pub.topic, pub.payload, pub.qos, pub.retain, pub.properties, pub.dup)
        if self._requests and pub.topic == self._response_topic:
            waiter = self._requests.get(pub.properties.get(P.CORRELATION_DATA))
            if waiter is not None:
                waiter.set(msg)
                return
        self.router.dispatch(msg)

    def _on_publish_completed(self, ev: PublishCompleted) -> None:
        seq = self._pid_seq.pop(ev.packet_id, None)
        if seq is not None:
            entry = self._outbox.get(seq)
            if entry is not None:
                self._outbox.remove(entry)
            waiter = self._pub_waiters.pop(seq, None)
            if waiter is not None:
                if ev.reason_code >= 0x80:
                    waiter.fail(PublishError(ev.reason_code, ev.properties))
                else:
                    waiter.set(PublishResult(ev.reason_code, ev.properties, ev.packet_id))
            if not len(self._outbox):
                self._drained.set()
        self._pump()

    def _on_suback(self, ev: SubscribeCompleted) -> None:
        filters = self._sub_requests.pop(ev.packet_id, None) or []
        for topic_filter, rc in zip(filters, ev.reason_codes):
            st = self._subs.get(topic_filter)
            if st is None:
                continue
            if rc >= 0x80:
                del self._subs[topic_filter]
                for w in st.waiters:
                    w.fail(SubscribeError(topic_filter, rc))
            else:
                st.acked = True
                st.granted = rc
                for w in st.waiters:
                    w.set(rc)
            st.waiters.clear()

    # ------------------------------------------------------------- publish

    def _pump(self) -> None:
        """Move queued outbox entries into the session while connected and the
        server's Receive Maximum allows [MQTT-4.9.0-2]."""
        conn = self._conn
        proto = self._protocol
        if conn is None or not proto.connected:
            return
        outbox = self._outbox
        while True:
            entry = outbox.peek_queued()
            if entry is None:
                break
            pub = entry.publish
            if pub.qos and proto.send_quota <= 0:
                break
            props = pub.properties
            expiry = props.get(P.MESSAGE_EXPIRY_INTERVAL) if props else None
            if expiry is not None:
                # The receiver gets the remaining lifetime [MQTT-3.3.2-6]; a
                # message that expired while queued is not sent at all.
                elapsed = int(time.time() - entry.created)
                if elapsed >= expiry:
                    self._drop_entry(entry, MessageExpired(f"message to {pub.topic!r} expired"))
                    continue
                if elapsed:
                    props = {**props, P.MESSAGE_EXPIRY_INTERVAL: expiry - elapsed}
            try:
                pid, data = proto.publish(pub.topic, pub.payload, pub.qos, pub.retain, props)
            except (MalformedPacket, ValueError) as exc:
                self._drop_entry(entry, exc)
                continue
            if pub.qos:
                outbox.mark_sent(entry, pid)
                self._pid_seq[pid] = entry.seq
            else:
                outbox.remove(entry)
            conn.write(data)
        if not len(outbox):
            self._drained.set()

    def _drop_entry(self, entry: OutboxEntry, error: BaseException) -> None:
        self._outbox.remove(entry)
        waiter = self._pub_waiters.pop(entry.seq, None)
        if waiter is not None:
            waiter.fail(error)
        else:
            log.warning("dropped queued message to %r: %s", entry.publish.topic, error)

    async def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 1,
        retain: bool = False,
        *,
        properties: Mapping[int, Any] | None = None,
        user_properties: Iterable[tuple[str, str]] | None = None,
        message_expiry: int | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        wait: bool = True,
        timeout: float | None = None,
        if_connected: bool = False,
    ) -> PublishResult | None:
        """Publish a message.

        QoS 1/2 messages go through the outbox: written at once when connected,
        otherwise when the connection is back, and resent after a reconnect
        until acknowledged. QoS 0 messages are written at once when connected
        (queued behind anything already waiting, to keep the order) and queued
        in the outbox while offline unless ``if_connected`` is set.

        Args:
            topic: topic name (no wildcards).
            payload: bytes, or str (sent as UTF-8).
            qos: 0, 1 or 2.
            retain: ask the broker to retain it.
            properties: v5 PUBLISH properties (``{PropertyId: value}``).
            user_properties: v5 (name, value) pairs.
            message_expiry: v5 Message Expiry Interval (seconds).
            content_type, response_topic, correlation_data: v5 properties.
            wait: for QoS 1/2, wait for the acknowledgement (False: return
                once queued).
            timeout: seconds to wait for the acknowledgement; on timeout the
                message stays queued and is still delivered later.
            if_connected: drop the message (return None) instead of queueing
                it while offline; for typing indicators and other ephemera.

        Returns:
            :class:`PublishResult` for an acknowledged QoS 1/2 message, else None.
        Raises:
            PublishError: the broker answered with a reason code >= 0x80.
            MalformedPacket: invalid topic or properties.
            OutboxFull: too many messages waiting.
            ConnectError: the client gave up connecting; ClientClosed: closed.
            trio.TooSlowError: ``timeout`` passed.
        """
        self._check_usable()
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        validate_topic_name(topic)
        payload = _normalise_payload(payload)
        if (user_properties or message_expiry is not None or content_type is not None
                or response_topic is not None or correlation_data is not None):
            props = dict(properties or {})
            if user_properties:
                props[P.USER_PROPERTY] = tuple(user_properties)
            if message_expiry is not None:
                props[P.MESSAGE_EXPIRY_INTERVAL] = message_expiry
            if content_type is not None:
                props[P.CONTENT_TYPE] = content_type
            if response_topic is not None:
                props[P.RESPONSE_TOPIC] = response_topic
            if correlation_data is not None:
                props[P.CORRELATION_DATA] = correlation_data
            properties = props
        if self.version != 5:
            properties = None
        conn = self._conn
        connected = conn is not None and self._protocol.connected
        if not connected and if_connected:
            return None
        if qos == 0 and connected and not self._outbox.queued:
            _, data = self._protocol.publish(topic, payload, 0, retain, properties)
            conn.write(data)
            if len(conn.buf) > _WRITE_HIGH_WATER:
                await conn.wait_drained(_WRITE_HIGH_WATER // 2)
            return None
        pub = codec.Publish(topic, payload, qos, retain, False, 0, properties)
        entry = self._outbox.put(pub)
        self._drained = trio.Event() if self._drained.is_set() else self._drained
        waiter = None
        if qos and wait:
            waiter = self._pub_waiters[entry.seq] = _Waiter()
        self._pump()
        if waiter is None:
            if conn is not None and len(conn.buf) > _WRITE_HIGH_WATER:
                await conn.wait_drained(_WRITE_HIGH_WATER // 2)
            return None
        try:
            with trio.fail_after(timeout) if timeout is not None else _nullcontext():
                return await waiter.wait()
        finally:
            if not waiter.event.is_set():
                self._pub_waiters.pop(entry.seq, None)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the outbox is empty (every message acknowledged).

        Raises:
            trio.TooSlowError: ``timeout`` passed.
        """
        with trio.fail_after(timeout) if timeout is not None else _nullcontext():
            while len(self._outbox):
                self._check_usable()
                if self._drained.is_set():
                    self._drained = trio.Event()
                await self._drained.wait()

    # ----------------------------------------------------------- subscribe

    def _send_subscriptions(self, states: list[_Sub]) -> None:
        conn = self._conn
        if conn is None or not states or not self._protocol.connected:
            return
        plain = [st for st in states if not st.properties]
        groups = [plain] if plain else []
        groups += [[st] for st in states if st.properties]
        for group in groups:
            for i in range(0, len(group), 64):
                chunk = group[i:i + 64]
                pid, data = self._protocol.subscribe([st.sub for st in chunk],
                                                     chunk[0].properties)
                self._sub_requests[pid] = [st.sub.topic_filter for st in chunk]
                conn.write(data)

    async def subscribe(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int | None = None,
        user_properties: Iterable[tuple[str, str]] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Subscribe, and keep the subscription across reconnects.

        The filter is recorded at once; if the connection is down (or drops
        before the SUBACK) it is sent when the connection is back, and this
        waits for that.

        Args:
            topic_filter: a topic filter, ``$share/{group}/{filter}`` included.
            qos: maximum QoS to receive.
            no_local, retain_as_published, retain_handling: v5 options.
            subscription_id: v5 Subscription Identifier.
            user_properties: v5 (name, value) pairs.
            timeout: seconds to wait for the SUBACK.

        Returns:
            The granted QoS (SUBACK reason code < 0x80).
        Raises:
            SubscribeError: the broker refused it.
            MalformedPacket: invalid filter.
            ConnectError / ClientClosed / trio.TooSlowError.
        """
        self._check_usable()
        validate_topic_filter(topic_filter)
        if self.version == 5:
            sub = codec.Subscription(topic_filter, qos, no_local, retain_as_published,
                                     retain_handling)
            props: dict | None = {}
            if subscription_id:
                props[P.SUBSCRIPTION_IDENTIFIER] = (subscription_id,)
            if user_properties:
                props[P.USER_PROPERTY] = tuple(user_properties)
            props = props or None
        else:
            sub = codec.Subscription(topic_filter, qos)
            props = None
        st = self._subs.get(topic_filter)
        if st is None or st.sub != sub or st.properties != props:
            old_waiters = st.waiters if st is not None else []
            st = self._subs[topic_filter] = _Sub(sub, props, waiters=old_waiters)
            self._pending_unsubs.discard(topic_filter)
            self._send_subscriptions([st])
        elif st.acked:
            return st.granted
        waiter = _Waiter()
        st.waiters.append(waiter)
        try:
            with trio.fail_after(timeout) if timeout is not None else _nullcontext():
                return await waiter.wait()
        finally:
            if waiter in st.waiters:
                st.waiters.remove(waiter)

    async def subscribe_many(self, topic_filters: Iterable[str | tuple[str, int]], qos: int = 1, *,
                             timeout: float | None = None) -> list[int]:
        """Subscribe to several filters with one SUBSCRIBE (what a chat client
        does on login); each is kept across reconnects like :meth:`subscribe`.

        Args:
            topic_filters: filters, or ``(filter, qos)`` pairs.
            qos: QoS for plain filters.
            timeout: seconds to wait for the SUBACK.

        Returns:
            The granted QoS of each filter, in order.
        Raises:
            SubscribeError: the first refused filter (the others stay subscribed).
        """
        self._check_usable()
        pairs = [(f, qos) if isinstance(f, str) else (f[0], f[1]) for f in topic_filters]
        states, waiters = [], []
        for topic_filter, q in pairs:
            validate_topic_filter(topic_filter)
            st = _Sub(codec.Subscription(topic_filter, q), None)
            old = self._subs.get(topic_filter)
            if old is not None:
                st.waiters = old.waiters
            self._subs[topic_filter] = st
            self._pending_unsubs.discard(topic_filter)
            waiter = _Waiter()
            st.waiters.append(waiter)
            states.append(st)
            waiters.append(waiter)
        self._send_subscriptions(states)
        results: list[int] = []
        error: BaseException | None = None
        with trio.fail_after(timeout) if timeout is not None else _nullcontext():
            for waiter in waiters:
                try:
                    results.append(await waiter.wait())
                except SubscribeError as exc:
                    error = error or exc
                    results.append(exc.reason_code)
        if error is not None:
            raise error
        return results

    async def unsubscribe(self, topic_filter: str, *, timeout: float | None = None) -> None:
        """Remove a subscription (also from what is resent after reconnects).

        Returns once the broker acknowledged it, or at once while offline (it
        is sent after reconnecting if the broker kept the session).
        """
        self._check_usable()
        self._subs.pop(topic_filter, None)
        conn = self._conn
        if conn is None or not self._protocol.connected:
            self._pending_unsubs.add(topic_filter)
            return
        pid, data = self._protocol.unsubscribe([topic_filter])
        waiter = _Waiter()
        self._unsub_requests[pid] = ([topic_filter], waiter)
        conn.write(data)
        with trio.fail_after(timeout) if timeout is not None else _nullcontext():
            await waiter.wait()

    @property
    def subscriptions(self) -> dict[str, int]:
        """Recorded subscriptions: filter -> granted QoS (-1 until acknowledged)."""
        return {f: st.granted for f, st in self._subs.items()}

    # ------------------------------------------------------------- receive

    def messages(self, topic_filter: str | None = None, *, buffer: int = 1000,
                 overflow: str = "drop_oldest") -> MessageStream:
        """Received messages matching ``topic_filter`` (None: all), for
        ``async for``. Does not subscribe: call :meth:`subscribe` too.

        Buffering starts now. When ``buffer`` messages are waiting, the oldest
        is discarded (``overflow="drop_oldest"``) or the new one is
        (``"drop_newest"``); ``stream.dropped`` counts them. The iteration ends
        when the client closes.
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        return self.router.stream(topic_filter, buffer, overflow)

    def add_handler(self, topic_filter: str | None, handler: Callable[[Message], Any], *,
                    buffer: int = 1000, overflow: str = "drop_oldest") -> HandlerRoute:
        """Call ``handler(message)`` (sync or async) for each matching message,
        in order, from the handler's own task and queue (see router docs).

        Returns:
            The route; ``route.remove()`` unregisters it.
        """
        route = HandlerRoute(self.router, topic_filter, handler, buffer, overflow,
                             self._handler_error)
        self._handlers.append(route)
        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(route.run)
        return route

    def on_message(self, topic_filter: str | None = None, **kwargs) -> Callable:
        """Decorator form of :meth:`add_handler`."""

        def register(fn):
            self.add_handler(topic_filter, fn, **kwargs)
            return fn

        return register

    def _handler_error(self, exc: BaseException, message: Message) -> None:
        log.error("handler failed on %r: %r", message.topic, exc, exc_info=exc)

    # -------------------------------------------------- request / response

    async def _ensure_response_topic(self) -> str:
        async with self._response_lock:
            if self._response_topic is None:
                topic = (f"{self.response_prefix}/{_safe_level(self.client_id)}/"
                         f"{secrets.token_hex(4)}")
                await self.subscribe(topic, qos=1)
                self._response_topic = topic
        return self._response_topic

    async def request(self, topic: str, payload: bytes | str = b"", *, qos: int = 1,
                      timeout: float = 10.0, user_properties=None,
                      properties: Mapping[int, Any] | None = None,
                      content_type: str | None = None) -> Message:
        """Publish a request and wait for its response (MQTT 5.0, 4.10).

        The request carries a Response Topic private to this client and a
        random Correlation Data; the first message on that topic with the same
        Correlation Data is the response.

        Returns:
            The response message.
        Raises:
            RequestTimeout: no response within ``timeout``.
            PublishError, ClientError: the request could not be sent.
        """
        if self.version != 5:
            raise ClientError("request/response needs MQTT 5.0")
        corr = secrets.token_bytes(12)
        waiter = _Waiter()
        try:
            with trio.fail_after(timeout):
                response_topic = await self._ensure_response_topic()
                self._requests[corr] = waiter
                await self.publish(topic, payload, qos, properties=properties,
                                   user_properties=user_properties, content_type=content_type,
                                   response_topic=response_topic, correlation_data=corr)
                return await waiter.wait()
        except trio.TooSlowError:
            raise RequestTimeout(f"no response to the request on {topic!r} in {timeout}s") from None
        finally:
            self._requests.pop(corr, None)

    async def respond(self, request: Message, payload: bytes | str = b"", *, qos: int = 1,
                      **kwargs) -> PublishResult | None:
        """Answer a request message: publish to its Response Topic with its
        Correlation Data.

        Raises:
            ValueError: the message has no Response Topic.
        """
        topic = request.response_topic
        if not topic:
            raise ValueError("the message has no Response Topic")
        corr = request.correlation_data
        return await self.publish(topic, payload, qos, correlation_data=corr, **kwargs)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
