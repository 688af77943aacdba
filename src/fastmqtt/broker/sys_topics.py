"""``$SYS/broker/...`` topics with Mosquitto's names, published retained.

Every ``sys_interval`` seconds the server calls :meth:`SysTopics.publish`,
which routes one retained QoS 0 message per topic through the core (so a
subscriber to ``$SYS/#`` gets them live, and a late subscriber gets the last
values as retained messages). Values are ASCII decimal text, as Mosquitto
sends them. Load averages are exponentially weighted moving averages of the
per-minute rates over 1, 5 and 15 minutes, updated once per publish.
"""

from __future__ import annotations

import math
import time

__all__ = ["SysTopics"]

_LOADS = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))
_LOAD_COUNTERS = (
    ("messages/received", "messages_received"),
    ("messages/sent", "messages_sent"),
    ("bytes/received", "bytes_received"),
    ("bytes/sent", "bytes_sent"),
    ("connections", "connections_total"),
)


class SysTopics:
    """Publishes the ``$SYS`` tree.

    Args:
        core: the broker core (``publish`` and ``clients``).
        stats: the counters.
        version: broker version string.
    """

    def __init__(self, core, stats, version: str) -> None:
        self.core = core
        self.stats = stats
        self.version = version
        self._last: float | None = None
        self._prev: dict[str, int] = {}
        self._loads: dict[tuple[str, str], float] = {}

    def values(self, now: float) -> dict[str, str]:
        """Topic -> text value for every ``$SYS`` topic (also used by tests)."""
        st = self.stats
        core = self.core
        connected = st.clients_connected
        total = len(core.clients)
        out = {
            "$SYS/broker/version": f"fastmqtt {self.version}",
            "$SYS/broker/uptime": f"{int(now - st.started_at)} seconds",
            "$SYS/broker/clients/connected": connected,
            "$SYS/broker/clients/active": connected,
            "$SYS/broker/clients/disconnected": total - connected,
            "$SYS/broker/clients/inactive": total - connected,
            "$SYS/broker/clients/total": total,
            "$SYS/broker/clients/maximum": st.clients_maximum,
            "$SYS/broker/messages/received": st.messages_received,
            "$SYS/broker/messages/sent": st.messages_sent,
            "$SYS/broker/messages/stored": len(core.retained) + st.queued_messages,
            "$SYS/broker/store/messages/count": len(core.retained) + st.queued_messages,
            "$SYS/broker/publish/messages/dropped": sum(st.publish_dropped.values()),
            "$SYS/broker/publish/messages/received": st.messages_received,
            "$SYS/broker/publish/messages/sent": st.messages_sent,
            "$SYS/broker/bytes/received": st.bytes_received,
            "$SYS/broker/bytes/sent": st.bytes_sent,
            "$SYS/broker/retained messages/count": len(core.retained),
            "$SYS/broker/subscriptions/count": len(core.trie),
            "$SYS/broker/heap/current": 0,
        }
        for (name, window), value in self._loads.items():
            out[f"$SYS/broker/load/{name}/{window}"] = f"{value:.2f}"
        return {k: str(v) for k, v in out.items()}

    def _update_loads(self, now: float) -> None:
        st = self.stats
        if self._last is None:
            self._last = now
            self._prev = {n: getattr(st, a, 0) for n, a in _LOAD_COUNTERS}
            for n, _ in _LOAD_COUNTERS:
                for w, _ in _LOADS:
                    self._loads[(n, w)] = 0.0
            return
        dt = now - self._last
        if dt <= 0:
            return
        self._last = now
        for name, attr in _LOAD_COUNTERS:
            cur = getattr(st, attr, 0)
            rate = (cur - self._prev.get(name, 0)) * 60.0 / dt  # per minute
            self._prev[name] = cur
            for window, span in _LOADS:
                k = math.exp(-dt / span)
                old = self._loads.get((name, window), 0.0)
                self._loads[(name, window)] = old * k + rate * (1 - k)

    def publish(self, now: float | None = None) -> None:
        """Route the current values as retained QoS 0 messages."""
        now = time.time() if now is None else now
        self._update_loads(now)
        publish = self.core.publish
        for topic, value in self.values(now).items():
            publish(topic, value.encode(), 0, True, None, now)
