"""Cross-check both codecs against Mosquitto's own client library (libmosquitto,
through the mosquitto_pub / mosquitto_sub programs that scripts/test.sh installs).

Each test plays a scripted server on 127.0.0.1: it decodes what the Mosquitto
client sends with our Decoder and answers with packets our encoder made. The
client exiting with status 0 (and, for mosquitto_sub, printing the message we
sent) shows that libmosquitto accepted our CONNACK, PUBACK, SUBACK and PUBLISH.
MQTT 5.0, 3.1.1 and 3.1 are all covered.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio

from fastmqtt.enums import PropertyId as P

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

VERSIONS = [(5, "mqttv5"), (4, "mqttv311"), (3, "mqttv31")]


class ScriptedServer:
    """One accepted connection, decoded with ``codec.Decoder`` (learning the
    version from the CONNECT, as a broker does)."""

    def __init__(self, codec, stream: trio.abc.Stream) -> None:
        self.codec = codec
        self.stream = stream
        self.decoder = codec.Decoder(None)
        self.pending: list = []

    async def receive(self):
        while not self.pending:
            data = await self.stream.receive_some(65536)
            assert data, "client closed the connection early"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    async def send(self, packet) -> None:
        await self.stream.send_all(self.codec.encode(packet, self.decoder.version))


async def _run_against(codec, argv: list[str], script) -> subprocess.CompletedProcess:
    """Start ``argv`` (with -h/-p of a fresh listener appended), run ``script``
    on its connection, and return the finished process."""
    assert shutil.which(argv[0]), f"{argv[0]} missing: run scripts/test.sh to install it"
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    result: dict = {}

    async def run_client():
        result["proc"] = await trio.run_process(
            [*argv, "-h", "127.0.0.1", "-p", str(port)], capture_stdout=True,
            capture_stderr=True, check=False)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_client)
            stream = await listeners[0].accept()
            async with stream:
                await script(ScriptedServer(codec, stream))
            # The script has seen the client's DISCONNECT; wait for it to exit.
        await listeners[0].aclose()
    return result["proc"]


@pytest.mark.parametrize(("version", "flag"), VERSIONS, ids=[f for _, f in VERSIONS])
async def test_mosquitto_pub_qos1_with_will(codec, version, flag):
    c = codec
    argv = ["mosquitto_pub", "-V", flag, "-i", "pub-1", "-u", "alice", "-P", "pw",
            "-k", "30", "-q", "1", "-r", "-t", "chat/ws/channel/1", "-m", '{"type":"post"}',
            "--will-topic", "presence/pub-1", "--will-payload", "offline", "--will-qos", "1",
            "--will-retain"]
    if version == 5:
        argv += ["-D", "connect", "session-expiry-interval", "60",
                 "-D", "connect", "receive-maximum", "20",
                 "-D", "will", "will-delay-interval", "5",
                 "-D", "publish", "user-property", "type", "post",
                 "-D", "publish", "content-type", "application/json",
                 "-D", "publish", "message-expiry-interval", "300"]

    async def script(server: ScriptedServer):
        connect = await server.receive()
        assert isinstance(connect, c.Connect)
        assert connect.protocol_level == version
        assert (connect.client_id, connect.username, connect.password, connect.keep_alive) == (
            "pub-1", "alice", b"pw", 30)
        will = connect.will
        assert (will.topic, will.payload, will.qos, will.retain) == (
            "presence/pub-1", b"offline", 1, True)
        if version == 5:
            assert connect.properties[P.SESSION_EXPIRY_INTERVAL] == 60
            assert connect.properties[P.RECEIVE_MAXIMUM] == 20
            assert will.properties[P.WILL_DELAY_INTERVAL] == 5
        await server.send(c.Connack(False, 0))
        publish = await server.receive()
        assert isinstance(publish, c.Publish)
        assert (publish.topic, publish.payload, publish.qos, publish.retain) == (
            "chat/ws/channel/1", b'{"type":"post"}', 1, True)
        assert publish.packet_id != 0
        if version == 5:
            assert publish.properties[P.USER_PROPERTY] == (("type", "post"),)
            assert publish.properties[P.CONTENT_TYPE] == "application/json"
            assert publish.properties[P.MESSAGE_EXPIRY_INTERVAL] == 300
        await server.send(c.Puback(publish.packet_id))
        assert isinstance(await server.receive(), c.Disconnect)

    proc = await _run_against(codec, argv, script)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("version", "flag"), VERSIONS, ids=[f for _, f in VERSIONS])
async def test_mosquitto_sub_receives_our_publish(codec, version, flag):
    c = codec
    argv = ["mosquitto_sub", "-V", flag, "-i", "sub-1", "-q", "2", "-C", "1",
            "-t", "chat/+/channel/#", "-F", "%t|%q|%r|%p"]
    if version == 5:
        argv += ["-D", "subscribe", "subscription-identifier", "7",
                 "-F", "%t|%q|%r|%p|%C|%S|%P"]

    async def script(server: ScriptedServer):
        connect = await server.receive()
        assert connect.client_id == "sub-1" and connect.protocol_level == version
        await server.send(c.Connack(False, 0))
        subscribe = await server.receive()
        assert isinstance(subscribe, c.Subscribe)
        [sub] = subscribe.subscriptions
        assert (sub.topic_filter, sub.qos) == ("chat/+/channel/#", 2)
        if version == 5:
            assert subscribe.properties[P.SUBSCRIPTION_IDENTIFIER] == (7,)
        await server.send(c.Suback(subscribe.packet_id, [1]))
        props = None
        if version == 5:
            props = {P.CONTENT_TYPE: "text/plain", P.SUBSCRIPTION_IDENTIFIER: (7,),
                     P.USER_PROPERTY: (("k", "v"),)}
        await server.send(c.Publish("chat/ws1/channel/9", b"hello \xe2\x82\xac", 1, True,
                                    packet_id=321, properties=props))
        puback = await server.receive()
        assert isinstance(puback, c.Puback) and puback.packet_id == 321
        assert isinstance(await server.receive(), c.Disconnect)

    proc = await _run_against(codec, argv, script)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.decode("utf-8").strip()
    fields = line.split("|")
    assert fields[:4] == ["chat/ws1/channel/9", "1", "1", "hello €"]
    if version == 5:
        assert fields[4] == "text/plain"
        assert fields[5] == "7"
        assert "k" in fields[6] and "v" in fields[6]


async def test_mosquitto_sub_v5_shared_filter_and_topic_alias(codec):
    """A shared filter, a partly refused SUBACK and a PUBLISH by topic alias."""
    c = codec
    argv = ["mosquitto_sub", "-V", "mqttv5", "-i", "sub-2", "-q", "1", "-C", "1",
            "-t", "$share/g/jobs/#", "-t", "a/b", "--retained-only", "-W", "10"]

    async def script(server: ScriptedServer):
        await server.receive()
        await server.send(c.Connack(False, 0, {P.MAXIMUM_QOS: 1, P.TOPIC_ALIAS_MAXIMUM: 10}))
        subscribe = await server.receive()
        filters = [s.topic_filter for s in subscribe.subscriptions]
        assert filters == ["$share/g/jobs/#", "a/b"]
        assert all(s.qos == 1 and not s.no_local for s in subscribe.subscriptions)
        await server.send(c.Suback(subscribe.packet_id, [1, 0x9E]))
        # A retained message on a topic alias: the client must map alias 3.
        await server.send(c.Publish("a/b", b"kept", 0, True, properties={P.TOPIC_ALIAS: 3}))
        assert isinstance(await server.receive(), c.Disconnect)

    proc = await _run_against(codec, argv + ["-F", "%t|%p|%r"], script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == "a/b|kept|1"
