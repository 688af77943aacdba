"""The broker's trio edge: listeners, one reader and one writer per connection, timers.

Theory of operation
-------------------
Everything protocol-related happens in the sans-IO
:class:`~fastmqtt.session.ServerConnection` and the synchronous
:class:`~fastmqtt.broker.core.BrokerCore`; this module only moves bytes and
time.

Per connection there are two tasks:

* the **reader** receives bytes (with ``move_on_at(conn.next_deadline())`` for
  the CONNECT timeout and keep alive), feeds the connection, and hands each
  event to the core. The only await between packets is the authenticator on
  CONNECT; it never waits for the store, so a publisher with many messages in
  flight is never held up by a commit per message.
* the **writer** sleeps until the connection's outbox becomes non-empty, then
  joins everything queued (from any number of publishers) into one
  ``send_all``. Acknowledgements that depend on durability (``conn.acks``)
  wait for ``store.durable`` of the newest ticket in the batch, then go out in
  order. A ``send_all`` that makes no progress for ``slow_consumer_timeout``
  means the peer stopped reading: the connection is dropped (its messages for
  a persistent session stay queued, bounded).

Every exception is caught inside the connection handler: one broken client
never takes the server or other clients down. A violation is logged with the
client id and the rule and, for v5, answered with DISCONNECT and the reason
code before closing.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from typing import Any

import trio

from .. import __version__
from ..codec import Connack, encode
from ..enums import ReasonCode
from ..session import ProtocolViolation, ServerConnection
from .config import BrokerConfig, ListenerConfig
from .core import BrokerCore
from .interfaces import AllowAll, NullStore, Stats

__all__ = ["serve", "Broker"]

log = logging.getLogger("fastmqtt.broker")

RECV_SIZE = 65536
FLUSH_TIMEOUT = 2.0
STUCK_AFTER = 0.5  # no send_all completed for this long: the receiver is not keeping up
WAKE_READERS = 4  # held-back publishers let in per completed send


def _open_store(config: BrokerConfig, stats: Stats):
    if not config.persistence:
        return NullStore()
    from ..store import open_store

    return open_store(config, stats)


def _build_security(config: BrokerConfig):
    try:
        from .security import build_security
    except ImportError:  # TEMPORARY: until fastmqtt.broker.security lands
        return AllowAll(), AllowAll()
    return build_security(config)


def _open_history(config: BrokerConfig, store):
    if not config.history:
        return None
    try:
        from ..store import open_history
    except ImportError:  # TEMPORARY: until fastmqtt.store.history lands
        log.warning("chat history configured but fastmqtt.store.history is missing")
        return None
    return open_history(config, store)


def _listener_spec(lc: ListenerConfig, config: BrokerConfig):
    from .listeners import ListenerSpec

    # A WebSocket message must hold the largest MQTT packet the broker accepts
    # (clients such as MQTT.js send one packet per message); never below the
    # listener default, since one message may also carry several packets
    # [MQTT-6.0.0-2]. The MQTT limit itself is enforced by the decoder (0x95).
    ws_max = max(config.max_packet_size, ListenerSpec.ws_max_message_size)
    return ListenerSpec(type=lc.type, host=lc.host, port=lc.port, certfile=lc.certfile,
                        keyfile=lc.keyfile, cafile=lc.cafile,
                        require_certificate=lc.require_certificate, path=lc.path,
                        max_connections=lc.max_connections, connection_rate=lc.connection_rate,
                        handshake_timeout=lc.handshake_timeout, ws_max_message_size=ws_max,
                        name=lc.name)


class _Link:
    """Per-connection glue between the sans-IO connection and the trio tasks.

    It is the connection's ``on_output`` callback: when bytes get queued and no
    writer is running, it starts one in the broker-wide writer nursery. A
    writer runs while there is something to send and then ends, so an idle
    connection costs one parked task (its reader), not two.
    """

    __slots__ = ("broker", "stream", "conn", "writing", "holding", "direct", "reader_scope",
                 "done", "last_done", "waiters", "acks_waiting", "ack_marks")

    def __init__(self, broker: "Broker", stream, conn: ServerConnection) -> None:
        self.broker = broker
        self.stream = stream
        self.conn = conn
        self.writing = False
        # True while the connection's own reader handles packets: output they
        # cause (CONNACK, SUBACK, PUBACK, ...) waits for the reader's flush
        # before its next await, which sends it directly when the socket
        # takes it all (no writer task; see Broker._flush).
        self.holding = False
        # try_send/try_receive: listeners.TcpStream (plain TCP) only
        self.direct = hasattr(stream, "try_send") and hasattr(stream, "try_receive")
        self.reader_scope: trio.CancelScope | None = None
        self.done: trio.Event | None = None  # set when a writer ends, if someone waits
        self.last_done = trio.current_time()  # when a send_all last completed
        # Readers held back until this receiver's writer makes room
        # (backpressure); created on first use: most connections never need
        # it and an empty ParkingLot costs about 240 bytes.
        self.waiters: trio.lowlevel.ParkingLot | None = None
        # Acknowledgements wait for the store (Store.when_durable) with no
        # writer task: the store calls Broker._durable_acks.
        self.acks_waiting = False
        # (number of acks, ticket that covers them) at the end of each of
        # the reader's turns while acks wait: what may go out as soon as
        # that ticket is durable, without a ticket per ack.
        self.ack_marks: list[tuple[int, int]] = []

    def __call__(self) -> None:
        if not self.writing and not self.holding:
            touched = self.broker._touched
            if touched is not None and self.direct:
                # Output routed by another client's reader: that reader sends
                # it directly once its packets are handled (Broker._flush_all),
                # saving a writer task and a trip through the scheduler.
                self.holding = True
                touched.append(self)
                return
            self.writing = True
            # An idle receiver that gets output is not "stuck": progress is
            # measured from here until its first send completes.
            self.last_done = trio.current_time()
            self.broker._nursery.start_soon(self.broker._writer, self)

    def stop_reader(self) -> None:
        if self.reader_scope is not None:
            self.reader_scope.cancel()


class Broker:
    """A running broker (what :func:`serve` hands to ``task_status``).

    Attributes:
        config: the settings in use.
        core: the :class:`BrokerCore` (state; tests may inspect it).
        stats: the counters.
        ports: bound ports, in listener order.
        addresses: ``(type, host, port)`` per listener.
    """

    def __init__(self, config: BrokerConfig, core: BrokerCore, store, authenticator,
                 stats: Stats) -> None:
        self.config = config
        self.core = core
        self.store = store
        self._when_durable = getattr(store, "when_durable", None)
        self.authenticator = authenticator
        self.stats = stats
        self.ports: list[int] = []
        self.addresses: list[tuple[str, str, int]] = []
        self.connections: set[ServerConnection] = set()
        self._nursery: trio.Nursery | None = None
        # While a reader handles its packets: the links of other connections
        # that got output from them (see _Link.__call__); None otherwise.
        self._touched: list[_Link] | None = None
        self._idle = trio.Event()
        self._idle.set()
        self.closing = False

    # ----------------------------------------------------------- connection

    async def handle_connection(self, stream: trio.abc.Stream, spec: Any = None) -> None:
        """Serve one client over ``stream`` (TCP, TLS or WebSocket alike)."""
        cfg = self.config
        if self.closing:
            return
        conn = ServerConnection(
            trio.current_time(), max_packet_size=cfg.max_packet_size,
            topic_alias_maximum=cfg.topic_alias_maximum, connect_timeout=cfg.connect_timeout,
            keepalive_grace=cfg.keepalive_grace, max_qos=cfg.max_qos,
            retain_available=cfg.retain_available)
        peer = getattr(stream, "peer", None)
        conn.peer = f"{peer[0]}:{peer[1]}" if peer else _peer_name(stream)
        link = _Link(self, stream, conn)
        conn.on_output = link
        self.connections.add(conn)
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            try:
                await self._reader(stream, conn, link)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                link.holding = False
                conn.close(None, f"connection lost: {exc or type(exc).__name__}")
            except Exception:
                link.holding = False
                log.exception("client %s (%s): internal error", conn.client_id or "?", conn.peer)
                conn.will_on_close = True
                conn.close(0x83, "internal error", "implementation specific error")
            finally:
                # The reader is over: a writer is needed only for bytes still
                # queued (a CONNACK refusal, a DISCONNECT), not to stop it.
                link.holding = True
                conn.close(None, "connection closed")
                link.holding = False
                if not link.writing and (conn.outbox or conn.acks):
                    link()
                self._lost(conn)
            # Let the writer flush what is queued (a DISCONNECT included), bounded.
            if link.writing:
                link.done = trio.Event()
                with trio.move_on_after(FLUSH_TIMEOUT):
                    await link.done.wait()
        except Exception:
            log.exception("client %s (%s): error in connection handler", conn.client_id or "?",
                          conn.peer)
            self._lost(conn)
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self._idle.set()
            # Break the connection <-> link cycle: the connection's objects go
            # by reference counting now instead of waiting for (and adding
            # work to) the cyclic garbage collector.
            conn.on_output = None
            link.reader_scope = None

    def _lost(self, conn: ServerConnection) -> None:
        if conn.lost:
            return
        conn.lost = True
        try:
            was = conn.client is not None
            self.core.connection_lost(conn, time.time())
            if was:
                log.info("client %s disconnected (%s)", conn.client_id, conn.close_reason or "closed")
        except Exception:
            log.exception("client %s: error while cleaning up the session", conn.client_id)

    async def _reader(self, stream: trio.abc.Stream, conn: ServerConnection, link: _Link) -> None:
        core = self.core
        stats = self.stats
        current_time = trio.current_time
        wall = time.time
        # Per-connection publish rate limit: a local of this task, so it costs
        # nothing (no object, no per-message work beyond one None test) when off.
        limiter = self._publish_limiter()
        touched: list[_Link] = []
        # The first read of a new connection needs no trip through the
        # scheduler (the task has just been scheduled): take what is there.
        data = stream.try_receive(RECV_SIZE) if link.direct else None
        # One cancel scope per connection, its deadline moved after every read
        # (cheaper than a scope per receive): CONNECT timeout, then keep alive.
        while not conn.closing:
            with trio.CancelScope(deadline=conn.next_deadline()) as scope:
                link.reader_scope = scope
                while True:
                    if data is None:
                        data = await stream.receive_some(RECV_SIZE)
                    if not data:
                        if conn.client is not None and not conn.closing:
                            link.holding = True  # handle_connection flushes
                            conn.close(None, "connection closed by client")
                        return
                    stats.bytes_received += len(data)
                    mono = current_time()
                    events = conn.receive_data(data, mono)
                    data = None
                    if events:
                        now = wall()
                        # Output caused by these packets goes out in one
                        # direct send below (see _Link.holding), and so does
                        # what they route to other clients (_Link.__call__).
                        link.holding = True
                        self._touched = touched
                        try:
                            for ev in events:
                                if ev.__class__ is ProtocolViolation:
                                    self._violation(conn, ev)
                                    return
                                if ev.packet_type == 1:
                                    self._flush_all(touched)
                                    if not await self._connect(conn, ev, link):
                                        return
                                    self._touched = touched
                                    now = wall()
                                elif (limiter is not None and ev.packet_type == 3
                                      and not limiter.allow(mono)):
                                    self._rate_exceeded(conn)
                                    return
                                else:
                                    core.handle(conn, ev, now)
                                if conn.closing:
                                    return
                                if core.pressured:
                                    # A receiver fell behind: wait for its writer
                                    # before routing the rest of this read, not
                                    # after it (one read holds hundreds of
                                    # messages; with many publishers the
                                    # receiver's buffer would overflow in between).
                                    self._flush_all(touched)
                                    self._flush(link)
                                    await self._backpressure(conn)
                                    if conn.closing:
                                        return
                                    link.holding = True
                                    self._touched = touched
                                    now = wall()
                        finally:
                            # Every exit (a return above, an exception) sends
                            # or hands to a writer what the others got.
                            self._flush_all(touched)
                        self._flush(link)
                        if conn.closing:
                            return  # the send failed
                        # Let the packets and the read buffer go before the
                        # next read: an idle connection would otherwise keep
                        # its last packet (the CONNECT) alive in this frame.
                        events = ev = now = None
                    mono = None
                    deadline = conn.next_deadline()
                    if deadline != scope.deadline:  # setting it costs, even unchanged
                        scope.deadline = deadline
            link.reader_scope = None
            if conn.closing:
                return  # stopped by the writer (slow consumer, takeover, shutdown)
            why = conn.timed_out(current_time())
            if why is not None:
                link.holding = True  # what the close queues: handle_connection flushes it
            if why == "connect":
                log.info("%s: no CONNECT within %.0fs, dropped", conn.peer,
                         self.config.connect_timeout)
                conn.close(None, "CONNECT timeout")
                return
            if why == "keepalive":
                log.info("client %s: keep alive timeout (%ds)", conn.client_id, conn.keep_alive)
                conn.will_on_close = True  # [MQTT-3.1.2-8]: the will is published
                conn.close(0x8D, "keep alive timeout", "keep alive timeout")
                return

    async def _backpressure(self, publisher: ServerConnection) -> None:
        """Before routing the next packet from ``publisher``, let the writers of
        receivers whose unsent bytes passed half of ``max_outgoing_bytes``
        catch up (called between packets of one read, so a receiver fed by
        many publishers overshoots that mark by about one message each, not
        by one read each).

        Without this, many busy readers starve a receiver's writer of turns on
        the event loop and its buffer overflows although the receiver reads
        fine (QoS 0 would be dropped, QoS 1/2 would pile up in the queue). A
        receiver whose socket has accepted nothing for ``STUCK_AFTER`` seconds
        is not waited for: a subscriber that stops reading must not slow
        delivery to the others; it loses QoS 0 and is dropped after
        ``slow_consumer_timeout``.
        """
        core = self.core
        conns = [c for c in core.pressured if c is not publisher]
        core.pressured.clear()
        soft = core.soft_out
        qsoft = core.soft_queue
        current_time = trio.current_time
        for c in conns:
            link = c.on_output
            if not isinstance(link, _Link):
                continue
            while not c.closing:
                cs = c.client
                if c.out_bytes <= soft and (cs is None or len(cs.queue) <= qsoft):
                    break
                if current_time() - link.last_done > STUCK_AFTER:
                    break  # not making progress: do not wait for it
                waiters = link.waiters
                if waiters is None:
                    waiters = link.waiters = trio.lowlevel.ParkingLot()
                with trio.move_on_after(STUCK_AFTER) as scope:
                    await waiters.park()
                if scope.cancelled_caught:
                    break

    def _publish_limiter(self):
        """A fresh token bucket for one connection, or None when
        ``max_publish_rate`` is 0 (off)."""
        rate = self.config.max_publish_rate
        if not rate:
            return None
        from .security import RateLimiter

        return RateLimiter(rate, self.config.publish_rate_burst)

    def _rate_exceeded(self, conn: ServerConnection) -> None:
        """A client published faster than ``max_publish_rate``: the PUBLISH is
        dropped and the connection closed. v5 gets DISCONNECT 0x96 Message rate
        too high first (section 3.14.2.1; nothing may follow a DISCONNECT and
        the sender closes the connection [MQTT-3.14.4-1]/[MQTT-3.14.4-2]);
        3.1.1 has no server DISCONNECT, so the connection is just closed. Not a
        normal DISCONNECT, so the will is published [MQTT-3.1.2-8]."""
        self.stats.drop("rate_limited")
        log.warning("client %s (%s): more than %g PUBLISH/s (burst %g); disconnecting",
                    conn.client_id, conn.peer, self.config.max_publish_rate,
                    self.config.publish_rate_burst or max(1.0, self.config.max_publish_rate))
        conn.will_on_close = True
        conn.close(ReasonCode.MESSAGE_RATE_TOO_HIGH, "message rate too high",
                   "message rate too high")

    def _violation(self, conn: ServerConnection, ev: ProtocolViolation) -> None:
        if conn.client is None:
            self.stats.protocol_errors += 1
            log.warning("%s: bad CONNECT phase 0x%02X: %s", conn.peer, ev.reason_code, ev.message)
            if ev.reason_code == 0x84:
                # Unsupported protocol level: CONNACK 0x84 (3.1.1 form: return
                # code 1) then close [MQTT-3.1.2-2].
                conn.write(encode(Connack(False, 0x84), 4))
            conn.close(None, ev.message)
            return
        conn.will_on_close = True
        self.core.protocol_error(conn, ev.reason_code, ev.message)

    async def _connect(self, conn: ServerConnection, pkt, link: _Link) -> bool:
        cfg = self.config
        if cfg.max_connections is not None and self.stats.clients_connected >= cfg.max_connections:
            self.core.reject(conn, 0x89 if pkt.protocol_level == 5 else 0x88, "server busy")
            return False
        # The authenticator may wait (a plug-in asking a server): nothing may
        # stay held back by this reader meanwhile.
        link.holding = False
        try:
            rc = await self.authenticator.authenticate(pkt.client_id, pkt.username, pkt.password, pkt)
        except Exception:
            log.exception("authenticator failed for %r", pkt.client_id)
            rc = 0x80
        link.holding = True
        if rc:
            log.info("%s: client %r refused: 0x%02X", conn.peer, pkt.client_id, rc)
            self.core.reject(conn, rc, "not authorized" if rc == 0x87 else "authentication failed")
            return False
        if conn.closing:
            return False
        ok = self.core.connect(conn, pkt, time.time())
        if ok:
            log.info("client %s connected from %s (MQTT %s, keep alive %d, clean %s)",
                     conn.client_id, conn.peer, "5.0" if conn.version == 5 else "3.1.1"
                     if conn.version == 4 else "3.1", conn.keep_alive, pkt.clean_start)
        else:
            log.info("%s: client %r refused (%s)", conn.peer, pkt.client_id, conn.close_reason)
        return ok

    def _flush_all(self, touched: list) -> None:
        """Stop collecting other connections' output and flush each of them
        (see _Link.__call__); a failed send ends that connection as its writer
        would have."""
        self._touched = None
        if not touched:
            return
        links = touched[:]
        touched.clear()
        for other in links:
            self._flush(other)
            self._end_if_closed(other)

    def _end_if_closed(self, link: _Link) -> None:
        """After a direct send from outside the connection's own tasks: if it
        failed (and no writer runs), the connection is over, as at the end
        of a writer."""
        conn = link.conn
        if conn.closing and not link.writing:
            if conn.failed:
                self._lost(conn)
            link.stop_reader()

    def _send_now(self, link: _Link, data: bytes) -> bool:
        """One non-blocking send of ``data``; True if the socket took it all.
        A partial send hands the rest to a writer (in order); a failed one
        marks the connection failed."""
        conn = link.conn
        try:
            sent = link.stream.try_send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            conn.close_reason = conn.close_reason or f"connection lost: {exc}"
            conn.send_failed()
            return False
        self.stats.bytes_sent += sent
        if sent < len(data):
            conn.write(data[sent:])  # starts a writer for the rest, in order
            return False
        return True

    def _flush(self, link: _Link) -> None:
        """End the reader's hold on its connection's output: send it now, in
        one non-blocking call, when no writer is running and the socket takes
        all of it; otherwise (partial send, durable acknowledgements to wait
        for, a transport without ``try_send``) hand it to a writer task."""
        link.holding = False
        if link.writing:
            return
        conn = link.conn
        if not conn.outbox:
            if conn.acks:
                self._acks_later(link)
            return
        if not link.direct:
            link()
            return
        if not self._send_now(link, conn.take_output()):
            return
        link.last_done = trio.current_time()
        if link.waiters is not None and link.waiters:
            link.waiters.unpark(count=WAKE_READERS)
        cs = conn.client
        if cs is not None and cs.queue and not conn.closing:
            self.core.pump(cs, time.time())  # more output starts a writer
        if conn.acks and not link.writing:
            self._acks_later(link)

    def _acks_later(self, link: _Link) -> None:
        """PUBACK/PUBREC that wait for the store: have the store call
        :meth:`_durable_acks` once they are durable (a plain-TCP connection
        with a store that offers ``when_durable``), rather than start a writer
        task that waits for them."""
        if link.writing:
            return  # the writer sends them
        when = self._when_durable
        if when is None or not link.direct:
            link()
            return
        conn = link.conn
        ticket = conn.ack_ticket
        marks = link.ack_marks
        if not marks or marks[-1][1] != ticket:
            marks.append((len(conn.acks), ticket))
        if link.acks_waiting:
            return  # the callback sends them
        link.acks_waiting = True
        if not when(ticket, functools.partial(self._durable_acks, link)):
            # Durable already, or the store failed: decide now.
            self._durable_acks(link)

    def _durable_acks(self, link: _Link) -> None:
        """Send the acknowledgements the store has made durable, in one
        non-blocking send (the rest, if any, through a writer)."""
        link.acks_waiting = False
        conn = link.conn
        acks = conn.acks
        marks = link.ack_marks
        if link.writing or not acks:
            marks.clear()
            return  # a writer took them over
        committed = self.store.committed
        if conn.ack_ticket <= committed:
            n = len(acks)
            marks.clear()
        else:
            # Some of them: those up to the last mark the store covers.
            n = i = 0
            while i < len(marks) and marks[i][1] <= committed:
                n = marks[i][0]
                i += 1
            if i:
                marks[:] = [(k - n, t) for k, t in marks[i:]]
        if not n:
            # Not durable: the store failed or closed. The writer finds out in
            # durable() and ends the connection, as it always has.
            link()
            return
        if conn.closing:
            link()  # as for any closing connection: a writer flushes, then ends it
            return
        data = conn.take_acks_upto(n)
        if not self._send_now(link, data):
            # A writer sends the rest, then later acks; or the send failed.
            self._end_if_closed(link)
            return
        if acks:
            self._acks_later(link)

    async def _writer(self, link: _Link) -> None:
        """Send everything queued on the connection, then end (see :class:`_Link`)."""
        conn = link.conn
        stream = link.stream
        stats = self.stats
        store = self.store
        core = self.core
        timeout = self.config.slow_consumer_timeout
        current_time = trio.current_time
        try:
            # The deadline is "now + slow_consumer_timeout" while a send is under
            # way and inf while waiting for the store.
            with trio.CancelScope() as ws:
                while conn.outbox or conn.acks:
                    data = conn.take_output()
                    if data:
                        ws.deadline = current_time() + timeout
                        await stream.send_all(data)
                        link.last_done = current_time()
                        if link.waiters is not None and link.waiters:
                            # Let in a few held-back publishers, not all: each
                            # may add about one read's worth of output.
                            link.waiters.unpark(count=WAKE_READERS)
                        stats.bytes_sent += len(data)
                        cs_state = conn.client
                        if cs_state is not None and cs_state.queue and not conn.closing:
                            core.pump(cs_state, time.time())
                    if conn.acks:
                        link.ack_marks.clear()
                        ticket, data = conn.take_acks()
                        if ticket:
                            ws.deadline = math.inf
                            await store.durable(ticket)
                        ws.deadline = current_time() + timeout
                        await stream.send_all(data)
                        stats.bytes_sent += len(data)
            if ws.cancelled_caught:
                log.warning("client %s: slow consumer, nothing written for %.0fs;"
                            " disconnecting", conn.client_id, timeout)
                stats.drop("slow_consumer")
                conn.close_reason = "slow consumer"
                conn.send_failed()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            conn.send_failed()
        except Exception:
            log.exception("client %s: writer failed", conn.client_id)
            conn.send_failed()
        finally:
            link.writing = False
            if conn.closing:
                # Flushed (or failed): the connection is over; stop its reader.
                if conn.failed:
                    self._lost(conn)
                link.stop_reader()
            if link.done is not None:
                link.done.set()

    # -------------------------------------------------------------- run loop

    async def _housekeeping(self) -> None:
        cfg = self.config
        sys_pub = None
        if cfg.sys_interval and cfg.sys_interval > 0:
            from .sys_topics import SysTopics

            sys_pub = SysTopics(self.core, self.stats, __version__)
        next_sys = trio.current_time()
        while True:
            now = time.time()
            try:
                self.core.tick(now)
                # The first $SYS values go out at start-up (retained), not a
                # sys_interval later: a client that subscribes at once gets
                # them retained, as from Mosquitto.
                if sys_pub is not None and trio.current_time() >= next_sys:
                    sys_pub.publish(now)
                    next_sys = trio.current_time() + cfg.sys_interval
            except Exception:
                log.exception("housekeeping failed")
            await trio.sleep(1.0)

    def reloaded(self) -> None:
        """Run after the password/ACL files were reloaded (SIGHUP): drop the
        subscriptions the new rules no longer allow (see
        :meth:`BrokerCore.drop_stale_subscriptions`)."""
        n = self.core.drop_stale_subscriptions()
        if n:
            log.info("ACL reload: %d subscription(s) no longer allowed were removed", n)

    async def aclose(self) -> None:
        """Graceful shutdown: v5 clients get DISCONNECT 0x8B, queued bytes are
        flushed (bounded by a short timeout), then the listeners close."""
        if self.closing:
            return
        self.closing = True
        log.info("shutting down")
        self.core.shutdown()
        for conn in list(self.connections):
            conn.close(None, "server shutting down")
        with trio.move_on_after(FLUSH_TIMEOUT):
            await self._idle.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _peer_name(stream) -> str:
    try:
        inner = stream
        for attr in ("transport_stream", "transport_stream"):
            inner = getattr(inner, attr, inner)
        sock = getattr(inner, "socket", None)
        if sock is not None:
            host, port = sock.getpeername()[:2]
            return f"{host}:{port}"
    except Exception:
        pass
    return "?"


async def serve(config: BrokerConfig | None = None, *,
                task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Run a broker until cancelled (or until ``Broker.aclose()``).

    Args:
        config: settings; default: everything default (port 1883, persistence on).
        task_status: receives the :class:`Broker` once every listener is bound
            (``broker.ports`` has the real ports when 0 was asked for).

    Raises:
        OSError: a listener cannot bind.
    """
    config = config or BrokerConfig()
    stats = Stats()
    stats.started_at = time.time()
    store = _open_store(config, stats)
    snapshot = store.open()
    try:
        authenticator, authorizer = _build_security(config)
        history = _open_history(config, store)
        core = BrokerCore(config, store, authorizer, stats, history)
        core.restore(snapshot, time.time())
        if snapshot.sessions or snapshot.retained:
            log.info("restored %d sessions and %d retained messages from the store",
                     len(snapshot.sessions), len(snapshot.retained))
        broker = Broker(config, core, store, authenticator, stats)
        from .listeners import serve_listener

        async with trio.open_nursery() as nursery:
            broker._nursery = nursery
            for lc in config.listener_configs():
                spec = _listener_spec(lc, config)
                host, port = await nursery.start(functools.partial(
                    serve_listener, spec, broker.handle_connection, stats=stats))
                broker.ports.append(port)
                broker.addresses.append((lc.type, host, port))
                log.info("listening on %s://%s:%d", lc.type, host, port)
            if config.metrics_port is not None:
                try:
                    from .metrics import serve_metrics
                except ImportError:  # TEMPORARY: until fastmqtt.broker.metrics lands
                    log.warning("metrics requested but fastmqtt.broker.metrics is missing")
                else:
                    bound = await nursery.start(functools.partial(
                        serve_metrics, stats, config.metrics_host, config.metrics_port))
                    log.info("metrics on http://%s:%s/metrics", config.metrics_host,
                             bound[1] if isinstance(bound, tuple) else config.metrics_port)
            nursery.start_soon(broker._housekeeping)
            if threading.current_thread() is threading.main_thread():
                try:
                    from .security import sighup_reloader
                except ImportError:  # TEMPORARY guard, like the other plug-ins
                    pass
                else:
                    # After a reload, subscriptions the new ACL refuses are removed.
                    await nursery.start(sighup_reloader, authenticator, authorizer,
                                        broker.reloaded)
            task_status.started(broker)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await store.aclose()
            except Exception:
                log.exception("closing the store failed")
