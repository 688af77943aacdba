"""Exceptions raised by :class:`fastmqtt.Client`."""

from __future__ import annotations

from typing import Any, Mapping

from ..enums import EMPTY_PROPERTIES, ReasonCode

__all__ = [
    "ClientError", "ConnectError", "ClientClosed", "PublishError", "SubscribeError",
    "RequestTimeout", "MessageExpired",
]


def _rc_name(code: int) -> str:
    try:
        return ReasonCode(code).name
    except ValueError:
        return hex(code)


class ClientError(Exception):
    """Base class of the client's errors."""


class ConnectError(ClientError):
    """The client could not connect, or gave up reconnecting.

    Attributes:
        reason_code: the CONNACK reason code when the broker refused (else None).
        last_error: the exception of the last failed attempt (else None).
    """

    def __init__(self, message: str, reason_code: int | None = None,
                 last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.last_error = last_error


class ClientClosed(ClientError):
    """The client was closed before the operation completed."""


class PublishError(ClientError):
    """The broker answered a QoS 1/2 PUBLISH with a reason code >= 0x80.

    Attributes:
        reason_code: e.g. 0x87 Not authorized, 0x97 Quota exceeded.
        properties: the acknowledgement's properties (REASON_STRING, ...).
    """

    def __init__(self, reason_code: int, properties: Mapping[int, Any] = EMPTY_PROPERTIES) -> None:
        super().__init__(f"publish refused: {_rc_name(reason_code)} (0x{reason_code:02X})")
        self.reason_code = reason_code
        self.properties = properties


class SubscribeError(ClientError):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""

    def __init__(self, topic_filter: str, reason_code: int) -> None:
        super().__init__(f"subscription to {topic_filter!r} refused: {_rc_name(reason_code)} "
                         f"(0x{reason_code:02X})")
        self.topic_filter = topic_filter
        self.reason_code = reason_code


class RequestTimeout(ClientError, TimeoutError):
    """No response arrived for a request within its timeout."""


class MessageExpired(ClientError):
    """A queued message's Message Expiry Interval ran out before it could be sent."""
