"""In-process broker helpers shared by the trio tests: a config for a
throw-away broker on 127.0.0.1 and a minimal raw MQTT client on our codec."""

import trio

from fastmqtt.broker.config import BrokerConfig
from fastmqtt.codec import Connect, Decoder, Subscribe, Subscription, encode


def config(**kw):
    kw.setdefault("host", "127.0.0.1")
    kw.setdefault("port", 0)
    kw.setdefault("persistence", False)
    kw.setdefault("sys_interval", 0)
    return BrokerConfig(**kw)


class Raw:
    """A minimal trio MQTT client speaking through our codec."""

    def __init__(self, stream, version):
        self.stream = stream
        self.version = version
        self.decoder = Decoder(version)
        self.pending = []

    @classmethod
    async def open(cls, port, version=5):
        return cls(await trio.open_tcp_stream("127.0.0.1", port), version)

    async def send(self, *packets):
        await self.stream.send_all(b"".join(encode(p, self.version) for p in packets))

    async def next(self):
        """Next packet, or None at EOF."""
        while not self.pending:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    async def connect(self, cid, **kw):
        await self.send(Connect(cid, protocol_level=self.version, **kw))
        ack = await self.next()
        assert ack.packet_type == 2 and ack.reason_code == 0
        return ack

    async def subscribe(self, *filters, qos=1, packet_id=1):
        await self.send(Subscribe(packet_id, [Subscription(f, qos) for f in filters]))
        ack = await self.next()
        assert ack.packet_type == 9
        return list(ack.reason_codes)
