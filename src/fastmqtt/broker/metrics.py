"""Prometheus ``/metrics`` endpoint over the broker's :class:`Stats`.

Theory of operation: the broker core already keeps plain integer counters in
``interfaces.Stats`` (they feed ``$SYS`` too). Nothing here runs per message:
a custom prometheus-client Collector reads those attributes when Prometheus
scrapes, and prometheus-client renders the text exposition format. The HTTP
side is a deliberately tiny HTTP/1.1 server on a trio socket (one request per
connection, bounded header size and time) so no thread or second event loop
is needed next to the broker.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["StatsCollector", "make_registry", "render_metrics", "serve_metrics"]

log = logging.getLogger("fastmqtt.broker.metrics")

_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0


class StatsCollector:
    """A prometheus-client collector reading an ``interfaces.Stats`` at scrape time.

    Args:
        stats: the broker's counters.
        prefix: metric name prefix.
    """

    def __init__(self, stats: Any, prefix: str = "fastmqtt") -> None:
        self.stats = stats
        self.prefix = prefix

    def describe(self) -> list:
        # An empty description keeps registration from calling collect()
        # before the broker has started.
        return []

    def collect(self) -> Iterator[Any]:
        s = self.stats
        p = self.prefix
        g = lambda name: getattr(s, name, 0) or 0  # noqa: E731

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{p}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{p}_{name}", doc, value=value)

        yield gauge("clients_connected", "Clients connected now.", g("clients_connected"))
        yield gauge("clients_maximum", "Most clients connected at once since start.",
                    g("clients_maximum"))
        yield counter("connections", "CONNECTs accepted since start.", g("connections_total"))
        rejected = CounterMetricFamily(f"{p}_connections_rejected",
                                       "Connections refused by a listener limit, by reason.",
                                       labels=["reason"])
        for reason, n in sorted((getattr(s, "connections_rejected", None) or {}).items()):
            rejected.add_metric([reason], n)
        yield rejected
        from .listeners import listener_connections

        per_listener = GaugeMetricFamily(f"{p}_listener_connections",
                                         "Open network connections per listener.",
                                         labels=["listener", "type"])
        for label, kind, n in listener_connections():
            per_listener.add_metric([label, kind], n)
        yield per_listener
        yield gauge("sessions", "Sessions: connected plus persistent disconnected.",
                    g("sessions_total"))
        yield counter("messages_received", "PUBLISH packets received.", g("messages_received"))
        yield counter("messages_sent", "PUBLISH packets sent.", g("messages_sent"))
        yield counter("bytes_received", "Bytes received.", g("bytes_received"))
        yield counter("bytes_sent", "Bytes sent.", g("bytes_sent"))
        dropped = CounterMetricFamily(f"{p}_messages_dropped",
                                      "Messages dropped, by reason.", labels=["reason"])
        for reason, n in sorted((getattr(s, "publish_dropped", None) or {}).items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield counter("protocol_errors", "Connections closed for protocol errors.",
                      g("protocol_errors"))
        yield gauge("retained_messages", "Retained messages stored.", g("retained_messages"))
        yield gauge("subscriptions", "Subscriptions across all sessions.", g("subscriptions"))
        yield gauge("queued_messages", "Messages queued for sessions, not yet sent.",
                    g("queued_messages"))
        yield gauge("inflight_messages", "QoS 1/2 messages sent and not yet acknowledged.",
                    g("inflight_messages"))
        yield SummaryMetricFamily(f"{p}_store_commit_seconds",
                                  "Time spent committing store batches.",
                                  count_value=g("store_commits"), sum_value=g("store_commit_seconds"))
        started = g("started_at")
        if started:
            yield gauge("start_time_seconds", "Broker start, Unix time.", started)
            yield gauge("uptime_seconds", "Seconds since the broker started.",
                        max(0.0, time.time() - started))


def make_registry(stats: Any) -> CollectorRegistry:
    """A registry holding only the broker's collector (no global state).

    Args:
        stats: the broker's ``Stats``.

    Returns:
        A ``CollectorRegistry``; also gets prometheus-client's process
        collector (CPU, memory, open files) where the platform supports it.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    try:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    except Exception:  # pragma: no cover - platforms without /proc
        pass
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (what ``GET /metrics`` returns)."""
    return generate_latest(registry)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head: bool = False) -> bytes:
    header = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    return header if head else header + body


async def _handle_http(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    try:
        data = b""
        with trio.move_on_after(_REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < _MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        line = data.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3:
            reply = _response("400 Bad Request", b"bad request\n")
        else:
            method, target, _ = parts
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                reply = _response("405 Method Not Allowed", b"GET only\n")
            elif path != "/metrics":
                reply = _response("404 Not Found", b"try /metrics\n")
            else:
                # Rendering is a few dozen lines of text: cheap enough to do
                # on the loop, and it reads the counters without a lock.
                body = render_metrics(registry)
                reply = _response("200 OK", body, CONTENT_TYPE_LATEST, head=method == "HEAD")
        await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:
        log.exception("metrics request failed")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(stats: Any, host: str, port: int, *,
                        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` (Prometheus text format) until cancelled.

    Args:
        stats: the broker's ``interfaces.Stats``, read at each scrape.
        host: address to bind.
        port: port to bind; 0 picks a free one.
        task_status: receives ``(host, port)`` once bound.

    Raises:
        OSError: when the address cannot be bound.
    """
    registry = make_registry(stats)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound = listeners[0].socket.getsockname()
    log.debug("metrics on http://%s:%d/metrics", bound[0], bound[1])
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_http, listener, registry, nursery)
        task_status.started((bound[0], bound[1]))


async def _accept_http(listener: trio.SocketListener, registry: CollectorRegistry,
                       nursery: trio.Nursery) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("metrics accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_handle_http, stream, registry)
