"""Broker follow-ups, in-process on 127.0.0.1 port 0: per-client publish rate
limit, ACL checks on ``$history/`` requests, stale subscriptions after a
SIGHUP reload of the ACL, and WebSocket messages as large as the broker's
maximum packet size."""

import json
import os
import signal
import time

import pytest
import trio

from fastmqtt.broker.cli import build_parser, config_from_args
from fastmqtt.broker.config import BrokerConfig, config_from_dict
from fastmqtt.broker.core import BrokerCore
from fastmqtt.broker.interfaces import Stats
from fastmqtt.broker.server import serve
from fastmqtt.codec import Connect, Decoder, Publish, Will, encode
from fastmqtt.enums import PropertyId
from inprocess import Raw, config

RATE_TOO_HIGH = 0x96
NOT_AUTHORIZED = 0x87


# ------------------------------------------------------------ publish rate


def test_publish_rate_config_and_flag():
    assert BrokerConfig().max_publish_rate == 0  # off by default
    args = build_parser().parse_args(["--max-publish-rate", "20"])
    assert config_from_args(args).max_publish_rate == 20
    cfg = config_from_dict({"max_publish_rate": 5, "publish_rate_burst": 50})
    assert (cfg.max_publish_rate, cfg.publish_rate_burst) == (5, 50)
    with pytest.raises(ValueError, match="max_publish_rate"):
        config_from_dict({"max_publish_rate": -1})
    with pytest.raises(ValueError, match="publish_rate_burst"):
        config_from_dict({"max_publish_rate": 5, "publish_rate_burst": 0})


@pytest.mark.parametrize("version", [4, 5])
async def test_publish_rate_exceeded_closes_connection(version):
    # Burst 3 at 1/s: 10 PUBLISHes sent at once let 3 through, the 4th breaks
    # the limit. v5: DISCONNECT 0x96 Message rate too high, then the
    # connection closes [MQTT-3.14.4-2]; 3.1.1 has no server DISCONNECT.
    # Not a normal DISCONNECT, so the will goes out [MQTT-3.1.2-8].
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config(max_publish_rate=1, publish_rate_burst=3))
            port = broker.ports[0]
            sub = await Raw.open(port)
            await sub.connect("watcher")
            assert await sub.subscribe("rl/#", qos=0) == [0]
            pub = await Raw.open(port, version)
            await pub.connect("flood", will=Will("rl/will", b"gone", 0))
            await pub.send(*[Publish("rl/t", b"%d" % i, 0) for i in range(10)])
            if version == 5:
                d = await pub.next()
                assert (d.packet_type, d.reason_code) == (14, RATE_TOO_HIGH)
            assert await pub.next() is None
            got = [(await sub.next()) for _ in range(4)]
            assert [(p.topic, p.payload) for p in got] == [
                ("rl/t", b"0"), ("rl/t", b"1"), ("rl/t", b"2"), ("rl/will", b"gone")]
            assert broker.stats.publish_dropped.get("rate_limited") == 1
            await broker.aclose()


async def test_publish_rate_off_by_default():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            port = broker.ports[0]
            sub = await Raw.open(port)
            await sub.connect("watcher")
            await sub.subscribe("rl/#", qos=0)
            pub = await Raw.open(port)
            await pub.connect("fast")
            await pub.send(*[Publish("rl/t", b"%d" % i, 0) for i in range(200)])
            got = [(await sub.next()).payload for _ in range(200)]
            assert got == [b"%d" % i for i in range(200)]
            assert "rate_limited" not in broker.stats.publish_dropped
            await broker.aclose()


# ------------------------------------------------------------ $history and the ACL


async def test_history_request_respects_acl(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user admin\ntopic readwrite #\n"
                   "user alice\ntopic readwrite chat/acme/channel/open\n"
                   "topic write $history/#\ntopic read resp/alice\n")
    cfg = config(acl_file=str(acl), history=["chat/+/channel/+"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, cfg)
            port = broker.ports[0]
            admin = await Raw.open(port)
            await admin.connect("admin", username="admin")
            for i, topic in enumerate(("chat/acme/channel/open", "chat/acme/channel/secret")):
                await admin.send(Publish(topic, b"hello " + topic.encode(), 1, packet_id=i + 1))
                ack = await admin.next()
                assert ack.packet_type == 4 and ack.reason_code < 0x80
            alice = await Raw.open(port)
            await alice.connect("alice", username="alice")
            assert await alice.subscribe("resp/alice") == [1]
            # A live subscription to the secret channel is refused...
            assert await alice.subscribe("chat/acme/channel/secret",
                                         packet_id=2) == [NOT_AUTHORIZED]

            async def ask(topic, corr):
                props = {PropertyId.RESPONSE_TOPIC: "resp/alice",
                         PropertyId.CORRELATION_DATA: corr}
                await alice.send(Publish("$history/" + topic, b"", 1, packet_id=10 + corr[0],
                                         properties=props))
                body = None
                while body is None:  # the PUBACK and the response, in either order
                    p = await alice.next()
                    if p.packet_type == 3:
                        assert p.properties[PropertyId.CORRELATION_DATA] == corr
                        body = json.loads(p.payload)
                return body

            body = await ask("chat/acme/channel/open", b"\x01")
            assert [m["payload"] for m in body["messages"]] == ["hello chat/acme/channel/open"]
            assert "error" not in body
            # ...and so is its history.
            body = await ask("chat/acme/channel/secret", b"\x02")
            assert body["messages"] == [] and body["error"] == "not authorized"
            await broker.aclose()


# ------------------------------------------------------------ SIGHUP reload


async def test_sighup_acl_reload_removes_stale_subscriptions(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("user admin\ntopic readwrite #\nuser alice\ntopic readwrite a/#\n"
                   "topic readwrite b/#\n")
    cfg = config(acl_file=str(acl))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, cfg)
            port = broker.ports[0]
            alice = await Raw.open(port)
            await alice.connect("alice", username="alice")
            assert await alice.subscribe("a/#", "b/#") == [1, 1]
            core = broker.core
            cs = core.clients["alice"]
            assert sorted(s[0] for s in core.trie.subscriptions(cs)) == ["a/#", "b/#"]
            acl.write_text("user admin\ntopic readwrite #\nuser alice\ntopic readwrite b/#\n")
            # The reload runs in the broker's SIGHUP task (serve() runs in the
            # main thread here, so it installed the handler).
            os.kill(os.getpid(), signal.SIGHUP)
            while len(core.trie) != 1:
                await trio.sleep(0.01)
            assert [s[0] for s in core.trie.subscriptions(cs)] == ["b/#"]
            assert broker.stats.subscriptions == 1
            # The remaining subscription still delivers.
            admin = await Raw.open(port)
            await admin.connect("admin", username="admin")
            await admin.send(Publish("a/x", b"no", 0), Publish("b/x", b"yes", 0))
            assert (await alice.next()).payload == b"yes"
            await broker.aclose()


async def test_acl_reload_removes_stale_subscriptions_of_persistent_sessions(tmp_path):
    # The same sweep (what the SIGHUP task runs after the reload) also removes
    # the subscription from the store, so it does not come back after a
    # restart. A session restored from the store is judged as the user it
    # last connected as (the store keeps the user name): alice keeps b/#,
    # which an anonymous client would lose.
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\ntopic readwrite b/#\n")
    cfg = config(acl_file=str(acl), persistence=True, store_backend="memory")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, cfg)
            alice = await Raw.open(broker.ports[0])
            await alice.connect("alice", username="alice", clean_start=False,
                                properties={PropertyId.SESSION_EXPIRY_INTERVAL: 3600})
            assert await alice.subscribe("a/#", "b/#") == [1, 1]
            store = broker.store
            assert sorted(store.subs["alice"]) == ["a/#", "b/#"]
            acl.write_text("user alice\ntopic readwrite b/#\n")
            authorizer = broker.core.authorizer
            authorizer.reload()
            broker.reloaded()
            core = broker.core
            assert [s[0] for s in core.trie.subscriptions(core.clients["alice"])] == ["b/#"]
            assert sorted(store.subs["alice"]) == ["b/#"]
            await broker.aclose()

    restarted = BrokerCore(cfg, store, authorizer, Stats())
    restarted.restore(store.open(), time.time())
    assert restarted.drop_stale_subscriptions() == 0
    assert [s[0] for s in restarted.trie.subscriptions(restarted.clients["alice"])] == ["b/#"]


# ------------------------------------------------------------ WebSocket size


async def test_websocket_message_up_to_max_packet_size():
    # A 17 MiB PUBLISH in one WebSocket message (as MQTT.js sends it) fits,
    # because the listener's message limit follows max_packet_size.
    from trio_websocket import open_websocket

    big = b"x" * (17 * 1024 * 1024)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config(ws_port=0))
            ws_port = broker.ports[1]
            async with open_websocket("127.0.0.1", ws_port, "/mqtt", use_ssl=False,
                                      subprotocols=["mqtt"]) as ws:
                dec = Decoder(5)

                async def next_packet():
                    pending = []
                    while not pending:
                        pending = dec.feed(await ws.get_message())
                    return pending[0]

                await ws.send_message(encode(Connect("web", protocol_level=5), 5))
                assert (await next_packet()).reason_code == 0
                await ws.send_message(encode(Publish("big/t", big, 1, packet_id=1), 5))
                ack = await next_packet()
                assert ack.packet_type == 4 and ack.packet_id == 1
            await broker.aclose()


# ------------------------------------------------------------ idle memory


async def test_idle_connection_keeps_no_lazy_structures():
    # Per-connection objects most clients never use are created on first use
    # (idle memory per connection, bench/test_broker.py idle scenario).
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            client = await Raw.open(broker.ports[0])
            await client.connect("idle")
            (conn,) = broker.connections
            assert conn.in_aliases is None and conn.out_aliases is None
            assert conn.on_output.waiters is None
            # Topic aliases still work once used [MQTT-3.3.2-12].
            assert await client.subscribe("al/#", qos=0) == [0]
            await client.send(
                Publish("al/x", b"1", 0, properties={PropertyId.TOPIC_ALIAS: 1}),
                Publish("", b"2", 0, properties={PropertyId.TOPIC_ALIAS: 1}))
            got = [await client.next() for _ in range(2)]
            assert [(p.topic, p.payload) for p in got] == [("al/x", b"1"), ("al/x", b"2")]
            assert conn.in_aliases == {1: "al/x"}
            await broker.aclose()
