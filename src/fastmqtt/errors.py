"""The one exception type fastmqtt's codec and trie raise for bad input."""

from __future__ import annotations

__all__ = ["MalformedPacket"]


class MalformedPacket(ValueError):
    """Input that breaks the MQTT wire format or a rule of the specification.

    Raised by every decoder, encoder and topic check in fastmqtt, and by
    nothing else, so ``except MalformedPacket`` is the one place a connection
    handler needs.

    Attributes:
        reason_code: the MQTT 5.0 reason code a server (or client) should put in
            the DISCONNECT or CONNACK it sends before closing: ``0x81`` Malformed
            Packet, ``0x82`` Protocol Error, ``0x84`` Unsupported Protocol
            Version, ``0x8F``/``0x90`` Topic Filter/Name invalid, ``0x95``
            Packet too large, and so on.
        packets: packets that a :class:`~fastmqtt.Decoder` completed in the same
            ``feed`` call before the bad one (empty elsewhere), so a server can
            still handle what arrived intact.
    """

    def __init__(self, message: str, reason_code: int = 0x81) -> None:
        super().__init__(message)
        self.reason_code = int(reason_code)
        self.packets: list = []

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.reason_code))
