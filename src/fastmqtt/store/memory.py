"""An in-process :class:`~fastmqtt.broker.interfaces.Store` that keeps state in
dicts: nothing survives the process, but everything survives ``aclose()`` and a
second ``open()`` of the same object. Tests use it to exercise the broker's
restore path without a disk; it also is the reference the SQLite store is
checked against (same calls, same snapshot).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ..broker.interfaces import DeliveryRecord, Snapshot, SubscriptionRecord
from .base import StoreError, build_snapshot, message_expired, session_expired

__all__ = ["MemoryStore"]


class MemoryStore:
    """Store that keeps everything in memory; every change is "durable" at once.

    Args:
        clock: wall-clock source for expiry in :meth:`open` (``time.time``).
    """

    persistent = False

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._seq = 0
        self._closed = False
        self.sessions: dict[str, tuple[int, int, float | None, str | None]] = {}
        self.subs: dict[str, dict[str, SubscriptionRecord]] = {}
        self.deliveries: dict[str, dict[int, tuple[int, DeliveryRecord]]] = {}
        self.qos2: dict[str, set[int]] = {}
        self.messages: dict[int, tuple[Any, float | None]] = {}
        self.refs: dict[int, int] = {}
        self.retained: dict[str, tuple[Any, float | None]] = {}
        self.wills: dict[str, tuple[Any, float]] = {}
        self.history: dict[int, tuple[str, float, float | None, Any]] = {}
        self._released: dict[int, tuple[Any, float | None]] = {}  # see SqliteStore

    # ------------------------------------------------------------- lifecycle

    def open(self, now: float | None = None) -> Snapshot:
        """Return what was recorded so far, minus what has expired (which is
        also forgotten). May be called again after :meth:`aclose`."""
        now = self._clock() if now is None else now
        self._closed = False
        high = max(self.messages, default=0)
        self.purge_expired(now)
        snap = build_snapshot(
            self.sessions, self.subs,
            {c: list(d.values()) for c, d in self.deliveries.items()},
            self.qos2, self.messages, self.retained, self.wills, now)
        snap.next_msg_id = max(snap.next_msg_id, high + 1)
        return snap

    def mark(self) -> int:
        return self._seq

    async def durable(self, ticket: int) -> None:
        if self._closed:
            raise StoreError("store is closed")

    async def aclose(self) -> None:
        self._closed = True

    def close(self) -> None:
        self._closed = True

    def purge_expired(self, now: float) -> int:
        """Forget expired sessions, queued copies of expired messages and expired
        retained messages. Returns how many sessions were removed."""
        dead = [c for c, (e, _, d, _u) in self.sessions.items() if session_expired(e, d, now)]
        for c in dead:
            will = self.wills.get(c)
            self.delete_session(c)
            if will is not None:  # a will outlives its session: owed at session end
                self.wills[c] = will
        for c, dl in self.deliveries.items():
            for mid in [m for m, (_, d) in dl.items() if m not in self.messages or (
                    d.state == "queued" and message_expired(self.messages[m][1], now))]:
                self.remove_delivery(c, mid)
        for t in [t for t, (_, e) in self.retained.items() if message_expired(e, now)]:
            self.delete_retained(t)
        for mid in [m for m in self.messages if not self.refs.get(m)]:
            del self.messages[mid]  # no delivery refers to it
            self.refs.pop(mid, None)
        return len(dead)

    # -------------------------------------------------------------- sessions

    def put_session(self, client_id: str, expiry_interval: int, protocol_level: int,
                    disconnected_at: float | None, username: str | None = None) -> None:
        self._seq += 1
        self.sessions[client_id] = (expiry_interval, protocol_level, disconnected_at, username)

    def delete_session(self, client_id: str) -> None:
        self._seq += 1
        self.sessions.pop(client_id, None)
        self.subs.pop(client_id, None)
        self.qos2.pop(client_id, None)
        self.wills.pop(client_id, None)
        for mid in list(self.deliveries.get(client_id, ())):
            self.remove_delivery(client_id, mid)
        self.deliveries.pop(client_id, None)

    def put_subscription(self, client_id: str, sub: SubscriptionRecord) -> None:
        self._seq += 1
        self.subs.setdefault(client_id, {})[sub.topic_filter] = SubscriptionRecord(**vars(sub))

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        self._seq += 1
        self.subs.get(client_id, {}).pop(topic_filter, None)

    # -------------------------------------------------------------- messages

    def put_message(self, msg_id: int, publish: Any, expires_at: float | None) -> None:
        self._seq += 1
        self.messages[msg_id] = (publish, expires_at)
        self.refs.setdefault(msg_id, 0)
        self._released.pop(msg_id, None)

    def add_delivery(self, client_id: str, delivery: DeliveryRecord) -> None:
        self._seq += 1
        dl = self.deliveries.setdefault(client_id, {})
        if delivery.msg_id not in dl:
            if delivery.msg_id not in self.messages and delivery.msg_id in self._released:
                self.messages[delivery.msg_id] = self._released.pop(delivery.msg_id)
            self.refs[delivery.msg_id] = self.refs.get(delivery.msg_id, 0) + 1
        dl[delivery.msg_id] = (self._seq, dataclasses.replace(delivery))  # a copy

    def update_delivery(self, client_id: str, delivery: DeliveryRecord) -> None:
        self._seq += 1
        dl = self.deliveries.get(client_id, {})
        old = dl.get(delivery.msg_id)
        if old is not None:
            # As the SQLite store: the state changes, what it is sent with
            # (retain, subscription ids) stays as added.
            o = old[1]
            dl[delivery.msg_id] = (old[0], DeliveryRecord(
                delivery.msg_id, delivery.qos, delivery.packet_id, delivery.state,
                o.retain, o.subids))

    def remove_delivery(self, client_id: str, msg_id: int) -> None:
        self._seq += 1
        if self.deliveries.get(client_id, {}).pop(msg_id, None) is None:
            return
        n = self.refs.get(msg_id, 1) - 1
        if n <= 0:
            self.refs.pop(msg_id, None)
            entry = self.messages.pop(msg_id, None)
            if entry is not None:
                self._released[msg_id] = entry
                if len(self._released) > 10_000:
                    del self._released[next(iter(self._released))]
        else:
            self.refs[msg_id] = n

    def put_incoming_qos2(self, client_id: str, packet_id: int) -> None:
        self._seq += 1
        self.qos2.setdefault(client_id, set()).add(packet_id)

    def delete_incoming_qos2(self, client_id: str, packet_id: int) -> None:
        self._seq += 1
        self.qos2.get(client_id, set()).discard(packet_id)

    def put_retained(self, topic: str, publish: Any, expires_at: float | None) -> None:
        self._seq += 1
        self.retained[topic] = (publish, expires_at)

    def delete_retained(self, topic: str) -> None:
        self._seq += 1
        self.retained.pop(topic, None)

    def put_will(self, client_id: str, publish: Any, due_at: float) -> None:
        self._seq += 1
        self.wills[client_id] = (publish, due_at)

    def delete_will(self, client_id: str) -> None:
        self._seq += 1
        self.wills.pop(client_id, None)

    # --------------------------------------------------------------- history

    def put_history(self, hist_id: int, topic: str, ts: float, expires_at: float | None,
                    publish: Any) -> None:
        self._seq += 1
        self.history[hist_id] = (topic, ts, expires_at, publish)

    def delete_history(self, hist_ids) -> None:
        self._seq += 1
        for h in hist_ids:
            self.history.pop(h, None)

    def load_history(self) -> list[tuple[int, str, float, float | None, Any]]:
        return [(h, *v) for h, v in sorted(self.history.items())]
