"""Presence: who is online, kept by the broker itself.

Each device of a user owns one retained topic,
``{app}/{workspace}/presence/{user_id}/{device_id}``, holding a
:class:`~fastmqtt.chat.events.UserStatus` event. The device publishes
"online" (retained, QoS 1) when it connects and registers a will with
"offline" (retained, QoS 1) in its CONNECT, so the broker itself marks the
device offline when the connection dies without a DISCONNECT
[MQTT-3.1.2-8]. A clean shutdown publishes "offline" before disconnecting,
because a normal DISCONNECT discards the will [MQTT-3.14.4-3].

A user is as present as their most present device (online > away >
offline): :class:`PresenceTracker` folds the per-device retained messages
that a subscription to ``presence_filter`` delivers (all of them at once on
subscribe, as retained messages, then each change).
"""

from __future__ import annotations

from typing import Any

from .. import codec
from .events import EventDecodeError, UserStatus, decode_event, encode_event
from .topics import ChatTopics

__all__ = ["presence_will", "Presence", "PresenceTracker", "STATUS_RANK"]

#: Order used to fold several devices into one status.
STATUS_RANK = {"offline": 0, "away": 1, "online": 2}


def presence_will(topics: ChatTopics, workspace: str, user_id: str, device_id: str, *,
                  delay: int = 0) -> Any:
    """The will to pass as ``Client(will=...)``: this device goes "offline".

    Args:
        delay: v5 Will Delay Interval (seconds): a reconnect within it
            suppresses the will [MQTT-3.1.3-9], so a flaky network does not make
            the user flicker offline.
    """
    payload = encode_event(UserStatus(user_id=user_id, status="offline", device_id=device_id,
                                      sender=user_id))
    props = {0x18: delay} if delay else None  # WILL_DELAY_INTERVAL
    return codec.Will(topics.presence(workspace, user_id, device_id), payload, 1, True, props)


class Presence:
    """Publishes this device's status.

    Args:
        client: a connected :class:`fastmqtt.Client`.
        topics, workspace, user_id, device_id: where the status lives.
    """

    def __init__(self, client, topics: ChatTopics, workspace: str, user_id: str,
                 device_id: str) -> None:
        self.client = client
        self.user_id = user_id
        self.device_id = device_id
        self.topic = topics.presence(workspace, user_id, device_id)
        self.status = "offline"

    async def set_status(self, status: str = "online") -> None:
        """Publish ``status`` ("online", "away" or "offline") retained at QoS 1."""
        if status not in STATUS_RANK:
            raise ValueError(f"status must be one of {sorted(STATUS_RANK)}")
        ev = UserStatus(user_id=self.user_id, status=status, device_id=self.device_id,
                        sender=self.user_id)
        await self.client.publish(self.topic, encode_event(ev), qos=1, retain=True)
        self.status = status

    async def go_offline(self) -> None:
        """Publish "offline" (call before a clean disconnect)."""
        await self.set_status("offline")


class PresenceTracker:
    """Folds per-device presence messages into one status per user."""

    def __init__(self, topics: ChatTopics) -> None:
        self.topics = topics
        self._devices: dict[str, dict[str, str]] = {}

    def update(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """Apply one presence message.

        Returns:
            ``(user_id, folded status)`` when ``topic`` is a presence topic,
            else None. An empty payload (retained message cleared) removes the
            device.
        """
        try:
            t = self.topics.parse(topic)
        except ValueError:
            return None
        if t.kind != "presence":
            return None
        devices = self._devices.setdefault(t.id, {})
        if not payload:
            devices.pop(t.device, None)
        else:
            try:
                ev = decode_event(payload)
            except EventDecodeError:
                return None
            if not isinstance(ev, UserStatus) or ev.status not in STATUS_RANK:
                return None
            devices[t.device] = ev.status
        return t.id, self.status(t.id)

    def status(self, user_id: str) -> str:
        """"online", "away" or "offline" (unknown users are offline)."""
        devices = self._devices.get(user_id)
        if not devices:
            return "offline"
        return max(devices.values(), key=STATUS_RANK.__getitem__)

    def devices(self, user_id: str) -> dict[str, str]:
        return dict(self._devices.get(user_id, {}))

    def online(self) -> list[str]:
        """Users with at least one device online or away."""
        return sorted(u for u in self._devices if self.status(u) != "offline")
