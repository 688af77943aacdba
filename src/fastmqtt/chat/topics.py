"""The chat topic scheme: builders and a parser.

One topic tree per app, one namespace per workspace::

    {app}/{workspace}/channel/{channel_id}      public channel: posts, comments, reactions, typing
    {app}/{workspace}/dm/{grouping_id}          direct or group conversation
    {app}/{workspace}/user/{user_id}            per-user events: status, device, activity
    {app}/{workspace}/presence/{user_id}/{device_id}   retained presence, one per device

Every id becomes exactly one topic level, so an id must not be able to change
the level structure: ``/`` would split it, ``+`` and ``#`` are wildcards that
make a topic name invalid [MQTT-4.7.1-1] [MQTT-3.3.2-2], U+0000 is forbidden
in any MQTT string [MQTT-1.5.4-2], an empty id would make an empty level that
a ``+`` subscription also matches, and a leading ``$`` would make the *app*
level a server topic that ``#`` subscriptions never match [MQTT-4.7.2-1].
Presence lives in its own subtree so an ACL can let everyone read presence
while only the user reads ``user/{user_id}``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChatTopics", "ChatTopic", "InvalidChatId", "validate_id", "KINDS"]

#: Topic kinds in the scheme.
KINDS = ("channel", "dm", "user", "presence")
_MAX_ID_BYTES = 1024


class InvalidChatId(ValueError):
    """An id (app, workspace, channel, user...) that cannot be a topic level."""


def validate_id(value: str, what: str = "id") -> str:
    """Check that ``value`` can be one topic level of the chat scheme.

    Returns:
        ``value`` unchanged.
    Raises:
        InvalidChatId: not a str, empty, containing ``/``, ``+``, ``#`` or
            U+0000, starting with ``$``, or longer than 1024 UTF-8 bytes.
    """
    if not isinstance(value, str):
        raise InvalidChatId(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidChatId(f"{what} is empty")
    for bad in ("/", "+", "#", "\x00"):
        if bad in value:
            raise InvalidChatId(f"{what} {value!r} contains {bad!r}")
    if value[0] == "$":
        raise InvalidChatId(f"{what} {value!r} starts with '$'")
    try:
        if len(value.encode("utf-8")) > _MAX_ID_BYTES:
            raise InvalidChatId(f"{what} is longer than {_MAX_ID_BYTES} bytes")
    except UnicodeEncodeError:
        raise InvalidChatId(f"{what} {value!r} is not valid UTF-8 (lone surrogate)") from None
    return value


@dataclass(frozen=True, slots=True)
class ChatTopic:
    """A parsed chat topic.

    Attributes:
        kind: "channel", "dm", "user" or "presence".
        workspace: the workspace id.
        id: channel id, grouping id or user id.
        device: the device id (presence topics only).
    """

    kind: str
    workspace: str
    id: str
    device: str | None = None


class ChatTopics:
    """Builds and parses topics for one app prefix.

    Args:
        app: the app prefix; one or more levels (``"acme"`` or ``"acme/chat"``),
            each a valid id.
    """

    __slots__ = ("app", "_levels", "_prefix")

    def __init__(self, app: str = "chat") -> None:
        if not isinstance(app, str) or not app:
            raise InvalidChatId("app prefix is empty")
        for level in app.split("/"):
            validate_id(level, "app prefix level")
        self.app = app
        self._levels = app.count("/") + 1
        self._prefix = app + "/"

    def channel(self, workspace: str, channel_id: str) -> str:
        """``{app}/{workspace}/channel/{channel_id}``."""
        return (f"{self._prefix}{validate_id(workspace, 'workspace')}/channel/"
                f"{validate_id(channel_id, 'channel id')}")

    def dm(self, workspace: str, grouping_id: str) -> str:
        """``{app}/{workspace}/dm/{grouping_id}``."""
        return (f"{self._prefix}{validate_id(workspace, 'workspace')}/dm/"
                f"{validate_id(grouping_id, 'grouping id')}")

    def user(self, workspace: str, user_id: str) -> str:
        """``{app}/{workspace}/user/{user_id}``."""
        return (f"{self._prefix}{validate_id(workspace, 'workspace')}/user/"
                f"{validate_id(user_id, 'user id')}")

    def presence(self, workspace: str, user_id: str, device_id: str) -> str:
        """``{app}/{workspace}/presence/{user_id}/{device_id}`` (retained)."""
        return (f"{self._prefix}{validate_id(workspace, 'workspace')}/presence/"
                f"{validate_id(user_id, 'user id')}/{validate_id(device_id, 'device id')}")

    def presence_filter(self, workspace: str, user_id: str | None = None) -> str:
        """Filter for the presence of one user (all devices) or everyone."""
        who = "+" if user_id is None else validate_id(user_id, "user id")
        return f"{self._prefix}{validate_id(workspace, 'workspace')}/presence/{who}/+"

    def filter(self, workspace: str, kind: str) -> str:
        """Filter for every topic of one kind in a workspace, e.g. all channels."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        tail = "+/+" if kind == "presence" else "+"
        return f"{self._prefix}{validate_id(workspace, 'workspace')}/{kind}/{tail}"

    @staticmethod
    def dm_grouping_id(*user_ids: str) -> str:
        """A stable grouping id for a direct conversation between users: the
        sorted, de-duplicated ids joined with ``~`` (the same for every member)."""
        ids = sorted({validate_id(u, "user id") for u in user_ids})
        if len(ids) < 2:
            raise InvalidChatId("a conversation needs two different users")
        return validate_id("~".join(ids), "grouping id")

    def parse(self, topic: str) -> ChatTopic:
        """Split a topic of this scheme into its parts.

        Raises:
            ValueError: the topic is not one of this app's chat topics.
        """
        if not topic.startswith(self._prefix):
            raise ValueError(f"{topic!r} is not under {self.app!r}")
        rest = topic[len(self._prefix):].split("/")
        if len(rest) == 3 and rest[1] in ("channel", "dm", "user"):
            workspace, kind, ident = rest
            device = None
        elif len(rest) == 4 and rest[1] == "presence":
            workspace, kind, ident, device = rest
        else:
            raise ValueError(f"{topic!r} is not a chat topic")
        for part in (workspace, ident) + ((device,) if device is not None else ()):
            try:
                validate_id(part)
            except InvalidChatId as exc:
                raise ValueError(f"{topic!r}: {exc}") from None
        return ChatTopic(kind, workspace, ident, device)

    def build(self, t: ChatTopic) -> str:
        """The inverse of :meth:`parse`."""
        if t.kind == "presence":
            return self.presence(t.workspace, t.id, t.device or "")
        return getattr(self, t.kind)(t.workspace, t.id)
