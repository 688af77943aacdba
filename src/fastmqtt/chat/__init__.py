"""The chat layer: topic scheme, typed JSON events, de-duplication, presence
and history catch-up on top of :class:`fastmqtt.Client` (see shared CHAT.md).
"""

from .dedup import Deduplicator
from .events import *  # noqa: F401,F403
from .events import __all__ as _events_all
from .history import (HistoryError, HistoryMessage, HistoryPage, HistoryUnavailable,
                      fetch_history, iter_history)
from .presence import Presence, PresenceTracker, presence_will
from .session import ChatDelivery, ChatSession
from .topics import ChatTopic, ChatTopics, InvalidChatId, validate_id

__all__ = [
    *_events_all, "Deduplicator", "HistoryError", "HistoryMessage", "HistoryPage",
    "HistoryUnavailable", "fetch_history", "iter_history", "Presence", "PresenceTracker",
    "presence_will", "ChatDelivery", "ChatSession", "ChatTopic", "ChatTopics", "InvalidChatId",
    "validate_id",
]
