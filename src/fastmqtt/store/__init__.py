"""Persistence for the broker: sessions, queues, in-flight state, retained
messages, wills and chat history.

``open_store(config)`` picks the implementation from the broker config:

* ``persistence = false`` → :class:`~fastmqtt.broker.interfaces.NullStore`
  (nothing survives; the broker's own memory is the only state);
* otherwise → :class:`~fastmqtt.store.sqlite.SqliteStore` in ``data_dir``
  (default ``./fastmqtt-data``) with the configured ``durability``.

``open_history(config, store)`` builds the chat-history service (None when no
history filters are configured). :class:`~fastmqtt.store.memory.MemoryStore` is
an in-memory store whose state survives ``aclose``/``open`` of the same object
(tests of the broker's restore path).
"""

from __future__ import annotations

from typing import Any

from ..broker.interfaces import NullStore
from .base import StoreError
from .history import HISTORY_PREFIX, HistoryService, is_history_request
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "open_store", "open_history", "SqliteStore", "MemoryStore", "NullStore", "StoreError",
    "HistoryService", "HISTORY_PREFIX", "is_history_request", "DEFAULT_DATA_DIR",
]

DEFAULT_DATA_DIR = "./fastmqtt-data"


def open_store(config: Any, stats: Any = None):
    """Build (but do not open) the store the config asks for.

    Args:
        config: an object with ``persistence`` (bool), ``data_dir``,
            ``durability`` ("sync" | "batch") and ``batch_interval_ms``; missing
            attributes take their defaults (persistent, ``./fastmqtt-data``,
            sync, 10 ms).
        stats: optional ``Stats`` to count commits in.

    Returns:
        a :class:`~fastmqtt.broker.interfaces.Store`. Call its blocking
        ``open()`` once before serving to get the recovered ``Snapshot``.

    Raises:
        ValueError: unknown durability mode.
    """
    if not getattr(config, "persistence", True):
        return NullStore()
    if getattr(config, "store_backend", None) == "memory":
        return MemoryStore()
    return SqliteStore(
        getattr(config, "data_dir", None) or DEFAULT_DATA_DIR,
        durability=getattr(config, "durability", "sync") or "sync",
        batch_interval_ms=int(getattr(config, "batch_interval_ms", 10) or 10),
        stats=stats,
    )


def open_history(config: Any, store: Any = None, authorize=None) -> HistoryService | None:
    """Build the chat-history service from ``history``, ``history_max_messages``
    and ``history_max_days`` (None when ``history`` is empty).

    Args:
        config: the broker config.
        store: the store from :func:`open_store`; the SQLite store keeps
            history across restarts.
        authorize: optional ``authorize(client_id, topic) -> bool`` ACL hook.
    """
    filters = list(getattr(config, "history", None) or [])
    if not filters:
        return None
    return HistoryService(filters, getattr(config, "history_max_messages", 100) or 100,
                          getattr(config, "history_max_days", None), store=store,
                          authorize=authorize)
