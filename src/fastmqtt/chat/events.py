"""Typed chat events in one JSON envelope.

Wire format (UTF-8 JSON, compact separators)::

    {"type":"chat.message","id":"01JD3...","ts":1732400000123,"from":"alice",
     "data":{"message_id":"m1","grouping_id":"alice~bob","text":"hi"}}

``type`` names the event (the integer code from :data:`TYPE_CODES` is accepted
too, for apps that use numbers); ``id`` is unique per event and time-ordered
(:func:`new_event_id`: 48-bit milliseconds + 80 random bits, Crockford base32,
26 characters), so it doubles as a de-duplication key and a history cursor;
``ts`` is milliseconds since the epoch; ``from`` the sender's user id; ``data``
the type's own fields. Unknown types decode to :class:`UnknownEvent` and
unknown fields are ignored, so old clients survive new servers.

Each event class is a slotted dataclass with keyword-only fields; ``TYPE`` is
its wire name and ``QOS`` the QoS it should be published with (typing at 0,
everything else at 1, see shared CHAT.md). ``EPHEMERAL`` events (typing) are
dropped rather than queued while offline.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

__all__ = [
    "Event", "UnknownEvent", "EventDecodeError", "new_event_id", "encode_event", "decode_event",
    "EVENT_TYPES", "TYPE_CODES",
    "Post", "PostReaction", "PostComment", "CommentReaction", "ChannelTyping",
    "ChatMessage", "ChatReaction", "ChatComment", "ChatTyping",
    "UserEmojiStatus", "UserStatus", "UserDevice",
    "TaskComment", "TaskCommentReaction", "DocumentComment", "DocumentCommentReaction",
    "Activity", "ChannelCall", "ChatCall",
]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_event_id(now_ms: int | None = None) -> str:
    """A unique, time-ordered event id (26 chars; sorts by creation time)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def _now_ms() -> int:
    return int(time.time() * 1000)


class EventDecodeError(ValueError):
    """A payload that is not a valid event envelope."""


@dataclass(slots=True, kw_only=True)
class Event:
    """Fields every event has.

    Attributes:
        id: unique event id (generated when not given).
        ts: milliseconds since the epoch (now when not given).
        sender: user id of the author ("from" on the wire).
    """

    TYPE: ClassVar[str] = ""
    CODE: ClassVar[int] = 0
    QOS: ClassVar[int] = 1
    EPHEMERAL: ClassVar[bool] = False

    id: str = field(default_factory=new_event_id)
    ts: int = field(default_factory=_now_ms)
    sender: str = ""


_BASE_FIELDS = ("id", "ts", "sender")


# ------------------------------------------------------------------ channels

@dataclass(slots=True, kw_only=True)
class Post(Event):
    TYPE: ClassVar[str] = "post"
    CODE: ClassVar[int] = 1
    post_id: str
    channel_id: str
    text: str = ""
    attachments: list = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class PostReaction(Event):
    TYPE: ClassVar[str] = "post.reaction"
    CODE: ClassVar[int] = 2
    post_id: str
    emoji: str
    action: str = "add"  # "add" | "remove"


@dataclass(slots=True, kw_only=True)
class PostComment(Event):
    TYPE: ClassVar[str] = "post.comment"
    CODE: ClassVar[int] = 3
    post_id: str
    comment_id: str
    text: str = ""


@dataclass(slots=True, kw_only=True)
class CommentReaction(Event):
    TYPE: ClassVar[str] = "comment.reaction"
    CODE: ClassVar[int] = 4
    comment_id: str
    emoji: str
    action: str = "add"


@dataclass(slots=True, kw_only=True)
class ChannelTyping(Event):
    TYPE: ClassVar[str] = "channel.typing"
    CODE: ClassVar[int] = 5
    QOS: ClassVar[int] = 0
    EPHEMERAL: ClassVar[bool] = True
    channel_id: str
    typing: bool = True


# --------------------------------------------------------------- direct chat

@dataclass(slots=True, kw_only=True)
class ChatMessage(Event):
    TYPE: ClassVar[str] = "chat.message"
    CODE: ClassVar[int] = 6
    message_id: str
    grouping_id: str
    text: str = ""
    reply_to: str | None = None
    attachments: list = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class ChatReaction(Event):
    TYPE: ClassVar[str] = "chat.reaction"
    CODE: ClassVar[int] = 7
    message_id: str
    emoji: str
    action: str = "add"


@dataclass(slots=True, kw_only=True)
class ChatComment(Event):
    TYPE: ClassVar[str] = "chat.comment"
    CODE: ClassVar[int] = 8
    message_id: str
    comment_id: str
    text: str = ""


@dataclass(slots=True, kw_only=True)
class ChatTyping(Event):
    TYPE: ClassVar[str] = "chat.typing"
    CODE: ClassVar[int] = 9
    QOS: ClassVar[int] = 0
    EPHEMERAL: ClassVar[bool] = True
    grouping_id: str
    typing: bool = True


# ---------------------------------------------------------------------- users

@dataclass(slots=True, kw_only=True)
class UserEmojiStatus(Event):
    TYPE: ClassVar[str] = "user.emoji_status"
    CODE: ClassVar[int] = 10
    user_id: str
    emoji: str = ""
    text: str = ""
    expires_at: int | None = None  # ms since the epoch


@dataclass(slots=True, kw_only=True)
class UserStatus(Event):
    """Presence: published retained on the presence topic of each device."""

    TYPE: ClassVar[str] = "user.status"
    CODE: ClassVar[int] = 11
    user_id: str
    status: str = "online"  # "online" | "away" | "offline"
    device_id: str | None = None


@dataclass(slots=True, kw_only=True)
class UserDevice(Event):
    TYPE: ClassVar[str] = "user.device"
    CODE: ClassVar[int] = 12
    user_id: str
    device_id: str
    action: str = "added"  # "added" | "removed"
    platform: str = ""


# ------------------------------------------------------- tasks and documents

@dataclass(slots=True, kw_only=True)
class TaskComment(Event):
    TYPE: ClassVar[str] = "task.comment"
    CODE: ClassVar[int] = 13
    task_id: str
    comment_id: str
    text: str = ""


@dataclass(slots=True, kw_only=True)
class TaskCommentReaction(Event):
    TYPE: ClassVar[str] = "task.comment.reaction"
    CODE: ClassVar[int] = 14
    comment_id: str
    emoji: str
    action: str = "add"


@dataclass(slots=True, kw_only=True)
class DocumentComment(Event):
    TYPE: ClassVar[str] = "document.comment"
    CODE: ClassVar[int] = 15
    document_id: str
    comment_id: str
    text: str = ""


@dataclass(slots=True, kw_only=True)
class DocumentCommentReaction(Event):
    TYPE: ClassVar[str] = "document.comment.reaction"
    CODE: ClassVar[int] = 16
    comment_id: str
    emoji: str
    action: str = "add"


@dataclass(slots=True, kw_only=True)
class Activity(Event):
    TYPE: ClassVar[str] = "activity"
    CODE: ClassVar[int] = 17
    kind: str  # "mention", "assigned", "invited", ...
    target: str = ""
    text: str = ""


# ---------------------------------------------------------------------- calls

@dataclass(slots=True, kw_only=True)
class ChannelCall(Event):
    TYPE: ClassVar[str] = "channel.call"
    CODE: ClassVar[int] = 18
    call_id: str
    channel_id: str
    action: str  # "start" | "join" | "leave" | "end" | "signal"
    signal: dict = field(default_factory=dict)  # SDP offer/answer, ICE candidate


@dataclass(slots=True, kw_only=True)
class ChatCall(Event):
    TYPE: ClassVar[str] = "chat.call"
    CODE: ClassVar[int] = 19
    call_id: str
    grouping_id: str
    action: str
    signal: dict = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class UnknownEvent(Event):
    """An event whose type this client does not know (kept, not dropped)."""

    type: str | int = ""
    data: dict = field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls for cls in (
        Post, PostReaction, PostComment, CommentReaction, ChannelTyping,
        ChatMessage, ChatReaction, ChatComment, ChatTyping,
        UserEmojiStatus, UserStatus, UserDevice,
        TaskComment, TaskCommentReaction, DocumentComment, DocumentCommentReaction,
        Activity, ChannelCall, ChatCall,
    )
}
TYPE_CODES: dict[int, type[Event]] = {cls.CODE: cls for cls in EVENT_TYPES.values()}

# Per class: its own field names (not the envelope's), computed once so that
# encoding and decoding do no reflection per event.
_OWN_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.name not in _BASE_FIELDS)
    for cls in EVENT_TYPES.values()
}
_REQUIRED: dict[type, frozenset] = {
    cls: frozenset(f.name for f in fields(cls) if f.name not in _BASE_FIELDS
                   and f.default is MISSING and f.default_factory is MISSING)
    for cls in EVENT_TYPES.values()
}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def encode_event(event: Event) -> bytes:
    """Serialise an event to its JSON envelope (UTF-8 bytes).

    Raises:
        TypeError: a field holds something JSON cannot represent.
    """
    cls = type(event)
    if cls is UnknownEvent:
        type_, data = event.type, event.data
    else:
        type_ = cls.TYPE
        data = {name: getattr(event, name) for name in _OWN_FIELDS[cls]}
    return _dumps({"type": type_, "id": event.id, "ts": event.ts, "from": event.sender,
                   "data": data}).encode("utf-8")


def decode_event(payload: bytes | str) -> Event:
    """Parse a JSON envelope into its event class.

    Returns:
        The typed event, or :class:`UnknownEvent` for a type not known here.
    Raises:
        EventDecodeError: not JSON, not an object, or missing/invalid
            ``type``, ``id``, ``data`` or a field the type requires.
    """
    try:
        obj = _loads(payload)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise EventDecodeError(f"not JSON: {exc}") from None
    if type(obj) is not dict:
        raise EventDecodeError("envelope is not a JSON object")
    get = obj.get
    type_ = get("type")
    event_id = get("id")
    data = get("data", _NO_DATA)
    ts = get("ts", 0)
    sender = get("from", "")
    if type(event_id) is not str or not event_id:
        raise EventDecodeError("envelope has no string 'id'")
    if type(data) is not dict:
        raise EventDecodeError("'data' is not an object")
    if type(ts) is not int:
        raise EventDecodeError("'ts' is not an integer")
    if type(sender) is not str:
        raise EventDecodeError("'from' is not a string")
    if type(type_) is str:
        cls = EVENT_TYPES.get(type_)
    elif type(type_) is int:
        cls = TYPE_CODES.get(type_)
    else:
        raise EventDecodeError("envelope has no 'type'")
    if cls is None:
        return UnknownEvent(id=event_id, ts=ts, sender=sender, type=type_, data=data)
    try:
        # Fast path: exactly the fields this class knows.
        return cls(id=event_id, ts=ts, sender=sender, **data)
    except TypeError:
        pass
    # Slow path: drop fields from a newer schema, report missing ones.
    own = _OWN_FIELDS[cls]
    kwargs = {name: data[name] for name in own if name in data}
    missing = [name for name in _REQUIRED[cls] if name not in kwargs]
    if missing:
        raise EventDecodeError(f"{cls.TYPE} event lacks {', '.join(sorted(missing))}")
    try:
        return cls(id=event_id, ts=ts, sender=sender, **kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise EventDecodeError(str(exc)) from None


_NO_DATA: dict = {}
