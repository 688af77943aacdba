"""Topic names, topic filters and shared subscriptions (MQTT 5.0 section 4.7, 4.8).

A *topic name* is what a PUBLISH is sent to: no wildcards [MQTT-3.3.2-2].
A *topic filter* is what a SUBSCRIBE asks for: levels separated by ``/``, where
``+`` stands for exactly one whole level [MQTT-4.7.1-2] and ``#`` for any number
of trailing levels, including none, and must be the last level [MQTT-4.7.1-1].
A *shared* filter ``$share/{ShareName}/{filter}`` spreads matching messages over
the group of subscribers with the same ShareName [MQTT-4.8.2-1] [MQTT-4.8.2-2].

These checks are in pure Python on purpose: they are called once per SUBSCRIBE
or per PUBLISH topic that is new to a broker, and :func:`topic_matches` is the
slow, obviously-correct oracle that the compiled trie is tested against.
"""

from __future__ import annotations

from .errors import MalformedPacket

__all__ = [
    "validate_topic_name",
    "validate_topic_filter",
    "split_shared",
    "topic_matches",
    "SHARE_PREFIX",
]

#: Prefix that marks a shared subscription filter.
SHARE_PREFIX = "$share/"

_MAX_TOPIC_BYTES = 65535
_TOPIC_NAME_INVALID = 0x90
_TOPIC_FILTER_INVALID = 0x8F


def _check_string(value: str, kind: str, reason: int) -> None:
    # Rules common to names and filters: a UTF-8 string of 1..65535 bytes
    # without U+0000 [MQTT-4.7.3-1] [MQTT-4.7.3-2] [MQTT-4.7.3-3].
    if not isinstance(value, str):
        raise MalformedPacket(f"{kind} must be a str, not {type(value).__name__}", reason)
    if not value:
        raise MalformedPacket(f"{kind} is empty [MQTT-4.7.3-1]", reason)
    if "\x00" in value:
        raise MalformedPacket(f"{kind} contains U+0000 [MQTT-4.7.3-2]", reason)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedPacket(f"{kind} is not well-formed UTF-8 [MQTT-1.5.4-1]", reason) from None
    if size > _MAX_TOPIC_BYTES:
        raise MalformedPacket(f"{kind} is longer than 65535 bytes [MQTT-4.7.3-3]", reason)


def validate_topic_name(topic: str) -> None:
    """Check a topic name that a PUBLISH (or a will) is sent to.

    Args:
        topic: the topic name.

    Raises:
        MalformedPacket: reason code 0x90 (Topic Name invalid) if the name is
            empty, contains ``+`` or ``#`` [MQTT-3.3.2-2], contains U+0000 or is
            longer than 65535 UTF-8 bytes.
    """
    _check_string(topic, "topic name", _TOPIC_NAME_INVALID)
    for wildcard in "+#":
        if wildcard in topic:
            raise MalformedPacket(
                f"topic name contains wildcard {wildcard!r} [MQTT-3.3.2-2]", _TOPIC_NAME_INVALID
            )


def _check_plain_filter(topic_filter: str, kind: str) -> None:
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            # '#' must be a whole level and the last one [MQTT-4.7.1-1].
            if level != "#" or i != last:
                raise MalformedPacket(
                    f"{kind} {topic_filter!r}: '#' must be the last level on its own [MQTT-4.7.1-1]",
                    _TOPIC_FILTER_INVALID,
                )
        elif "+" in level and level != "+":
            # '+' must occupy an entire level [MQTT-4.7.1-2].
            raise MalformedPacket(
                f"{kind} {topic_filter!r}: '+' must occupy a whole level [MQTT-4.7.1-2]",
                _TOPIC_FILTER_INVALID,
            )


def validate_topic_filter(topic_filter: str) -> None:
    """Check a topic filter of a SUBSCRIBE or UNSUBSCRIBE, shared or not.

    Args:
        topic_filter: the filter, e.g. ``"chat/+/channel/#"`` or
            ``"$share/workers/jobs/#"``.

    Raises:
        MalformedPacket: reason code 0x8F (Topic Filter invalid) if the filter
            is empty [MQTT-4.7.3-1], has ``#`` anywhere but as the whole last
            level [MQTT-4.7.1-1], has ``+`` sharing a level with other characters
            [MQTT-4.7.1-2], or is a shared filter whose ShareName is empty or
            contains ``/``, ``+`` or ``#`` [MQTT-4.8.2-1], or whose filter part is
            missing or empty [MQTT-4.8.2-2].
    """
    _check_string(topic_filter, "topic filter", _TOPIC_FILTER_INVALID)
    if topic_filter.startswith(SHARE_PREFIX):
        rest = topic_filter[len(SHARE_PREFIX):]
        name, slash, inner = rest.partition("/")
        if not name:
            raise MalformedPacket(
                f"shared subscription {topic_filter!r} has an empty ShareName [MQTT-4.8.2-1]",
                _TOPIC_FILTER_INVALID,
            )
        if "+" in name or "#" in name:
            raise MalformedPacket(
                f"shared subscription {topic_filter!r}: ShareName contains a wildcard [MQTT-4.8.2-1]",
                _TOPIC_FILTER_INVALID,
            )
        if not slash or not inner:
            raise MalformedPacket(
                f"shared subscription {topic_filter!r} has no topic filter after the ShareName "
                "[MQTT-4.8.2-2]",
                _TOPIC_FILTER_INVALID,
            )
        _check_plain_filter(inner, "shared subscription topic filter")
    else:
        _check_plain_filter(topic_filter, "topic filter")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split a shared subscription filter into its ShareName and its filter.

    The input is assumed to have passed :func:`validate_topic_filter`.

    Args:
        topic_filter: a topic filter.

    Returns:
        ``(share_name, filter)`` for ``$share/{share_name}/{filter}``, and
        ``(None, topic_filter)`` for a normal (non-shared) filter.
    """
    if topic_filter.startswith(SHARE_PREFIX):
        name, _, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
        return name, inner
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a topic name matches a topic filter, decided level by level.

    Written straight from the specification's wording (section 4.7) and kept
    naive on purpose: it is the oracle the trie is tested against. A shared
    filter ``$share/{name}/{filter}`` matches what its ``{filter}`` matches.

    Args:
        topic_filter: a valid topic filter (see :func:`validate_topic_filter`).
        topic: a valid topic name (see :func:`validate_topic_name`).

    Returns:
        True if a subscription with ``topic_filter`` receives messages
        published to ``topic``.
    """
    _, topic_filter = split_shared(topic_filter)
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    # A filter starting with a wildcard does not match a topic starting with
    # '$' (e.g. $SYS/...) [MQTT-4.7.2-1].
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            # '#' matches the parent level and any number of children:
            # "sport/#" matches "sport" and "sport/tennis/player1" (4.7.1.2).
            return True
        if i >= len(topic_levels):
            return False
        if level == "+":
            # '+' matches exactly one level, which may be empty (4.7.1.3).
            continue
        if level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)
