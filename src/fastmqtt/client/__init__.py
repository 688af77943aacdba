"""The trio MQTT client: ``async with fastmqtt.Client(host) as client``.

See :class:`Client`. The sans-IO protocol underneath is
:class:`fastmqtt.client.protocol.ClientProtocol`.
"""

from .errors import (ClientClosed, ClientError, ConnectError, MessageExpired, PublishError,
                     RequestTimeout, SubscribeError)
from .manager import Backoff, Client, ConnectionInfo, PublishResult
from .outbox import MemoryOutbox, OutboxFull, SQLiteOutbox
from .router import HandlerRoute, Message, MessageStream, Router

__all__ = [
    "Client", "Message", "Backoff", "PublishResult", "ConnectionInfo", "MessageStream",
    "HandlerRoute", "Router", "MemoryOutbox", "SQLiteOutbox", "OutboxFull",
    "ClientError", "ConnectError", "ClientClosed", "PublishError", "SubscribeError",
    "RequestTimeout", "MessageExpired",
]
