"""fastmqtt.Client against real brokers (Mosquitto and fastmqtt-broker, as
subprocesses on 127.0.0.1) and against scripted servers.

Reconnect tests cut the connection at exact points with :class:`MqttProxy`
(fixtures_clients) and check that no acknowledged message is lost and none is
duplicated beyond what its QoS allows.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fastmqtt import codec
from fastmqtt.client import (Backoff, Client, ConnectError, PublishError, RequestTimeout,
                             SQLiteOutbox, SubscribeError)
from fastmqtt.enums import PropertyId as P

from fixtures_broker import free_port
from fixtures_clients import collect, uid

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)


def client(target, **kw) -> Client:
    kw.setdefault("backoff", FAST)
    kw.setdefault("connect_timeout", 5)
    return Client(target.host, target.port, **kw)


@pytest.mark.parametrize("version", [4, 5])
async def test_pubsub_all_qos(any_broker, version):
    with trio.fail_after(20):
        async with client(any_broker, version=version) as c:
            stream = c.messages("it/+/x")
            assert await c.subscribe("it/+/x", qos=2) == 2
            for q in (0, 1, 2):
                r = await c.publish("it/a/x", f"m{q}", qos=q)
                assert (r is None) if q == 0 else (r.reason_code in (0, 0x10))
            got = await collect(stream, 3)
            assert [(m.topic, m.payload, m.qos) for m in got] == [
                ("it/a/x", b"m0", 0), ("it/a/x", b"m1", 1), ("it/a/x", b"m2", 2)]


@pytest.mark.parametrize("version", [4, 5])
async def test_subscribe_many_one_packet(any_broker, mqtt_proxy, version):
    proxy = await mqtt_proxy(any_broker)
    with trio.fail_after(20):
        async with client(proxy, version=version) as c:
            stream = c.messages("many-subs/#")
            granted = await c.subscribe_many(["many-subs/a", ("many-subs/b", 0), "many-subs/c/#"])
            assert granted == [1, 0, 1]
            assert len(proxy.packets("to_broker", "SUBSCRIBE")) == 1
            await c.publish("many-subs/c/1", "x")
            assert (await stream.receive()).topic == "many-subs/c/1"


async def test_v5_properties_round_trip(any_broker):
    with trio.fail_after(20):
        async with client(any_broker) as c:
            stream = c.messages("props/t")
            await c.subscribe("props/t")
            await c.publish("props/t", b"{}", user_properties=[("k", "v"), ("k", "w")],
                            content_type="application/json", message_expiry=60,
                            response_topic="props/reply", correlation_data=b"\x01\x02")
            (m,) = await collect(stream, 1)
            assert m.user_properties == (("k", "v"), ("k", "w"))
            assert m.content_type == "application/json"
            assert m.response_topic == "props/reply" and m.correlation_data == b"\x01\x02"
            assert 0 < m.properties[P.MESSAGE_EXPIRY_INTERVAL] <= 60


async def test_topic_alias_outbound_delivers_full_topic(any_broker, mqtt_proxy):
    # The publisher sends the topic once, then only the alias [MQTT-3.3.2-12];
    # the receiver sees full topics.
    proxy = await mqtt_proxy(any_broker)
    with trio.fail_after(20):
        async with client(any_broker) as sub, client(proxy) as pub:
            granted = pub.protocol.server_properties.get(P.TOPIC_ALIAS_MAXIMUM, 0)
            stream = sub.messages("alias/#")
            await sub.subscribe("alias/#")
            for i in range(5):
                await pub.publish("alias/long/topic/name", str(i), qos=1)
            got = await collect(stream, 5)
            assert {m.topic for m in got} == {"alias/long/topic/name"}
            assert [m.payload for m in got] == [b"0", b"1", b"2", b"3", b"4"]
            sent = [codec.decode(raw, 5) for raw in proxy.packets("to_broker", "PUBLISH")]
            if granted:
                assert sent[0].topic == "alias/long/topic/name"
                assert all(p.topic == "" and p.properties[P.TOPIC_ALIAS] == 1 for p in sent[1:])
            else:
                assert all(P.TOPIC_ALIAS not in p.properties for p in sent)


async def test_handlers_and_overlapping_filters(any_broker):
    seen: dict[str, list] = {"a": [], "b": []}
    done = trio.Event()
    with trio.fail_after(20):
        async with client(any_broker) as c:
            @c.on_message("h/+/temp")
            async def a(m):
                seen["a"].append(m.topic)

            @c.on_message("h/#")
            def b(m):
                seen["b"].append(m.topic)
                if len(seen["b"]) == 2:
                    done.set()

            await c.subscribe("h/#")
            await c.publish("h/1/temp", "x")
            await c.publish("h/1/hum", "y")
            await done.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert seen == {"a": ["h/1/temp"], "b": ["h/1/temp", "h/1/hum"]}


async def test_request_response(any_broker):
    with trio.fail_after(20):
        async with client(any_broker) as server, client(any_broker) as requester:
            async def serve():
                async for req in server.messages("svc/echo"):
                    await server.respond(req, b"echo:" + req.payload)

            await server.subscribe("svc/echo")
            async with trio.open_nursery() as n:
                n.start_soon(serve)
                reply = await requester.request("svc/echo", b"ping", timeout=10)
                assert reply.payload == b"echo:ping"
                with pytest.raises(RequestTimeout):
                    await requester.request("svc/nobody", b"x", timeout=0.5)
                n.cancel_scope.cancel()


async def test_wait_for_publish_while_offline_then_connects(any_broker):
    # Publishing before the broker is reachable does not hang forever or
    # fail: the message waits in the outbox and the call returns on PUBACK.
    dead = free_port()
    with trio.fail_after(30):
        async with client(any_broker) as sub:
            stream = sub.messages("late/#")
            await sub.subscribe("late/#")
            c = Client("127.0.0.1", dead, urls=[f"mqtt://{any_broker.host}:{any_broker.port}"],
                       backoff=FAST, wait_connected=False)
            async with c:
                r = await c.publish("late/1", "x", qos=1)
                assert r.reason_code in (0, 0x10)
            assert (await collect(stream, 1))[0].payload == b"x"


async def test_queued_message_expiry_counts_while_offline(any_broker):
    """A message queued while offline is sent with its remaining lifetime
    [MQTT-3.3.2-6], or not at all once expired."""
    import time

    from fastmqtt.client import MemoryOutbox

    outbox = MemoryOutbox()
    long_ago = time.time() - 100
    outbox.put(codec.Publish("exp/gone", b"expired", 1, properties={P.MESSAGE_EXPIRY_INTERVAL: 10}),
               created=long_ago)
    outbox.put(codec.Publish("exp/kept", b"kept", 1, properties={P.MESSAGE_EXPIRY_INTERVAL: 1000}),
               created=long_ago)
    with trio.fail_after(20):
        async with client(any_broker) as sub:
            stream = sub.messages("exp/#")
            await sub.subscribe("exp/#")
            async with client(any_broker, outbox=outbox) as c:
                await c.drain(timeout=10)
            (m,) = await collect(stream, 1)
            assert m.topic == "exp/kept"
            assert 850 <= m.properties[P.MESSAGE_EXPIRY_INTERVAL] <= 900
            with trio.move_on_after(0.3):
                extra = await stream.receive()
                pytest.fail(f"expired message delivered: {extra}")


async def test_several_urls_tried_in_turn(any_broker):
    dead = free_port()
    with trio.fail_after(20):
        async with Client(f"mqtt://127.0.0.1:{dead}",
                          urls=[f"mqtt://{any_broker.host}:{any_broker.port}"],
                          backoff=FAST) as c:
            assert c.is_connected and c.connections == 1
            assert isinstance(c.last_error, OSError)


async def test_gives_up_with_clear_error():
    dead = free_port()
    with trio.fail_after(20):
        with pytest.raises(ConnectError) as err:
            async with Client("127.0.0.1", dead, backoff=FAST, connect_attempts=3):
                pass
        assert "could not connect" in str(err.value) and err.value.last_error is not None


def test_backoff_grows_caps_and_jitters():
    import random

    b = Backoff(initial=0.1, maximum=1.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(1, 8)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert all(cap * 0.5 <= d <= cap for d, cap in zip(delays, caps))
    assert len({round(b.delay(3, rng), 6) for _ in range(20)}) > 1  # jittered
    assert Backoff(jitter=0).delay(1) == Backoff().initial


async def test_gives_up_after_losing_the_broker(broker_factory):
    b = broker_factory("mosquitto")
    with trio.fail_after(30):
        async with client(b, max_reconnect_attempts=2) as c:
            await c.subscribe("gone/#")
            await trio.to_thread.run_sync(b.kill)
            await c.wait_disconnected()
            with pytest.raises(ConnectError) as err:
                await c.publish("gone/x", "never acknowledged", qos=1)
            assert isinstance(err.value.last_error, OSError)
            with pytest.raises(ConnectError):
                await c.wait_connected()


async def test_unsubscribe_stops_delivery_and_resubscription(any_broker, mqtt_proxy):
    proxy = await mqtt_proxy(any_broker)
    with trio.fail_after(20):
        async with client(proxy) as c, client(any_broker) as pub:
            stream = c.messages("un/#")
            await c.subscribe("un/a")
            await c.subscribe("un/b")
            await c.unsubscribe("un/a")
            assert list(c.subscriptions) == ["un/b"]
            proxy.sever()
            await c.wait_disconnected()
            await c.wait_connected()
            await c.subscribe("un/b")  # returns once the resubscription is acknowledged
            await pub.publish("un/a", "no")
            await pub.publish("un/b", "yes")
            assert (await stream.receive()).payload == b"yes"
            with trio.move_on_after(0.3):
                m = await stream.receive()
                pytest.fail(f"unsubscribed topic delivered: {m}")


async def test_bad_credentials_give_up_at_once(broker_factory, tmp_path):
    b = broker_factory("mosquitto", mosquitto_conf=["allow_anonymous false"])
    with trio.fail_after(20):
        with pytest.raises(ConnectError) as err:
            async with client(b, connect_attempts=None):
                pass
    assert err.value.reason_code in (0x86, 0x87)


async def test_on_connect_hook_and_resubscribe_after_sever(any_broker, mqtt_proxy):
    proxy = await mqtt_proxy(any_broker)
    infos = []
    with trio.fail_after(30):
        async with client(proxy, on_connect=lambda c, info: infos.append(info)) as c, \
                client(any_broker) as pub:
            stream = c.messages("rs/#")
            await c.subscribe("rs/#", qos=1)
            proxy.sever()
            await c.wait_disconnected()
            await c.wait_connected()
            # Session Present 0 -> the client sent the SUBSCRIBE again by itself.
            assert await c.subscribe("rs/#", qos=1) == 1  # waits for that SUBACK
            assert len(proxy.packets("to_broker", "SUBSCRIBE")) == 2
            await pub.publish("rs/1", "after", qos=1)
            assert (await collect(stream, 1))[0].payload == b"after"
    assert [i.connection_number for i in infos] == [1, 2]
    assert infos[1].session_present is False


async def test_keepalive_detects_dead_connection(any_broker, mqtt_proxy):
    proxy = await mqtt_proxy(any_broker)
    with trio.fail_after(30):
        async with client(proxy, keep_alive=2, ping_timeout=0.3) as c:
            proxy.freeze()  # packets vanish, the socket stays open
            await c.wait_disconnected()
            proxy.freeze(False)
            await c.wait_connected()
            assert c.connections == 2
            assert "PINGRESP" in repr(c.last_error)


def persistent(version: int) -> dict:
    """Client options for a session the broker keeps across connections."""
    if version == 5:
        return dict(version=5, session_expiry=300)
    return dict(version=4, clean_start=False)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [1, 2])
async def test_publisher_cut_before_ack_resends_with_dup(any_broker, mqtt_proxy, qos, version):
    """PUBLISH reaches the broker, its PUBACK/PUBREC is lost with the connection:
    the client resends with DUP and the same id [MQTT-4.4.0-1]; QoS 2 is
    still delivered once."""
    proxy = await mqtt_proxy(any_broker)
    ack = "PUBACK" if qos == 1 else "PUBREC"
    rule = proxy.cut_on("to_client", ack)
    with trio.fail_after(30):
        async with client(any_broker) as sub, \
                client(proxy, client_id=uid("pub"), **persistent(version)) as pub:
            stream = sub.messages("cut/#")
            await sub.subscribe("cut/#", qos=2)
            r = await pub.publish("cut/x", b"payload", qos=qos)
            assert rule.fired.is_set() and r.reason_code in (0, 0x10)
            assert pub.connections == 2
            publishes = [codec.decode(raw, version)
                         for raw in proxy.packets("to_broker", "PUBLISH")]
            assert len(publishes) == 2
            assert publishes[1].dup and publishes[1].packet_id == publishes[0].packet_id
            got = [await stream.receive()]
            with trio.move_on_after(0.5):  # QoS 1 may bring a second copy
                got.append(await stream.receive())
            assert all(m.payload == b"payload" for m in got)
            if qos == 2:
                assert len(got) == 1


async def test_qos2_cut_before_pubcomp_resends_pubrel(any_broker, mqtt_proxy):
    proxy = await mqtt_proxy(any_broker)
    rule = proxy.cut_on("to_client", "PUBCOMP")
    with trio.fail_after(30):
        async with client(any_broker) as sub, \
                client(proxy, client_id=uid("pub"), session_expiry=300) as pub:
            stream = sub.messages("cut2/#")
            await sub.subscribe("cut2/#", qos=2)
            await pub.publish("cut2/x", b"once", qos=2)
            assert rule.fired.is_set()
            rels = proxy.packets("to_broker", "PUBREL")
            assert len(rels) == 2 and rels[0] == rels[1]
            assert len(proxy.packets("to_broker", "PUBLISH")) == 1
            got = [await stream.receive()]
            with trio.move_on_after(0.5):
                got.append(await stream.receive())
            assert [m.payload for m in got] == [b"once"]


@pytest.mark.parametrize("version", [4, 5])
async def test_subscriber_cut_before_pubrec_gets_qos2_once(any_broker, mqtt_proxy, version):
    """Our PUBREC is lost: the broker resends the PUBLISH with DUP on the new
    connection; the client acknowledges it but does not deliver it again
    [MQTT-4.3.3-10]."""
    proxy = await mqtt_proxy(any_broker)
    rule = proxy.cut_on("to_broker", "PUBREC")
    with trio.fail_after(30):
        async with client(proxy, client_id=uid("sub"), **persistent(version)) as sub, \
                client(any_broker) as pub:
            stream = sub.messages("cut3/#")
            await sub.subscribe("cut3/#", qos=2)
            await pub.publish("cut3/x", b"exactly-once", qos=2)
            first = await stream.receive()
            await rule.fired.wait()
            await sub.wait_connected()
            # The broker resends its unfinished PUBLISH before anything newer
            # [MQTT-4.6.0-2], so once "next" is here the resend has been seen.
            await pub.publish("cut3/y", b"next", qos=2)
            second = await stream.receive()
            assert codec.decode(proxy.packets("to_client", "PUBLISH")[1], version).dup
            assert (first.payload, second.payload) == (b"exactly-once", b"next")


async def test_many_in_flight_across_repeated_cuts(any_broker, mqtt_proxy):
    """Publish 60 QoS 1 and 60 QoS 2 messages while the publisher's link is
    severed every 15 acknowledgements: every message arrives, QoS 2 ones once."""
    proxy = await mqtt_proxy(any_broker)
    for n in (15, 30, 45):
        proxy.cut_on("to_client", "PUBACK", count=n, drop=True)
    with trio.fail_after(60):
        async with client(any_broker) as sub, \
                client(proxy, client_id=uid("pub"), session_expiry=300) as pub:
            stream = sub.messages("many/#", buffer=1000)
            await sub.subscribe("many/#", qos=2)
            async with trio.open_nursery() as n:
                for i in range(60):
                    n.start_soon(pub.publish, "many/q1", f"{i}", 1)
                    n.start_soon(pub.publish, "many/q2", f"{i}", 2)
            assert len(pub.outbox) == 0
            got = []
            with trio.move_on_after(1.5):
                while True:
                    got.append(await stream.receive())
            q1 = [m.payload for m in got if m.topic == "many/q1"]
            q2 = [m.payload for m in got if m.topic == "many/q2"]
            assert set(q1) == {str(i).encode() for i in range(60)}
            assert sorted(q2) == sorted(str(i).encode() for i in range(60))
            assert pub.connections >= 2


@pytest.mark.parametrize("qos", [1, 2])
async def test_broker_restart_loses_no_acknowledged_message(impl, broker_factory, mqtt_proxy, qos):
    """The broker restarts in the middle of a run of publishes; the publisher's
    outbox resends what was not acknowledged and the subscriber resubscribes
    by itself, so every message arrives (QoS 2: exactly once).

    Mosquitto 2.0 does not restore v5 sessions from its database (CONNACK
    Session Present 0 after the restart), so messages published before the
    subscriber is back would have no subscriber: the publisher reaches the
    broker through a proxy that admits it only after the subscriber has
    resubscribed. fastmqtt keeps the session, and the gate changes nothing."""
    b = broker_factory(impl, persistence=True) if impl == "mosquitto" else broker_factory(impl)
    proxy = await mqtt_proxy(b)
    n_msgs = 40
    with trio.fail_after(60):
        async with client(b, client_id=uid("rsub"), session_expiry=600) as sub, \
                client(proxy, client_id=uid("rpub"), session_expiry=600) as pub:
            stream = sub.messages("rst/#", buffer=1000)
            await sub.subscribe("rst/#", qos=2)
            restarted = trio.Event()

            async def publisher():
                for i in range(n_msgs):
                    await pub.publish("rst/t", str(i), qos=qos)
                    if i == n_msgs // 2:
                        restarted.set()

            async with trio.open_nursery() as n:
                n.start_soon(publisher)
                await restarted.wait()
                proxy.accepting = False
                await trio.to_thread.run_sync(b.restart)
                await sub.wait_connected()
                await sub.subscribe("rst/#", qos=2)  # returns on the resubscription's SUBACK
                proxy.accepting = True
            # Read until every message has arrived once (bounded): a duplicate
            # received on the way stays in ``got`` and fails QoS 2's count.
            got = []
            with trio.move_on_after(10):
                while len(set(got)) < n_msgs:
                    got.append((await stream.receive()).payload)
            want = {str(i).encode() for i in range(n_msgs)}
            assert set(got) == want
            if qos == 2:
                assert len(got) == n_msgs
            assert pub.connections >= 2 and sub.connections >= 2


async def test_sqlite_outbox_survives_client_restart(any_broker, tmp_path):
    db = tmp_path / "outbox.db"
    dead = free_port()
    with trio.fail_after(30):
        # Process 1: the broker is unreachable; messages wait in SQLite.
        async with Client("127.0.0.1", dead, client_id="persist-1", wait_connected=False,
                          outbox=SQLiteOutbox(db), backoff=FAST) as c1:
            for i in range(5):
                await c1.publish("ob/t", f"m{i}", qos=1, wait=False)
            assert len(c1.outbox) == 5
        async with client(any_broker) as sub:
            stream = sub.messages("ob/#")
            await sub.subscribe("ob/#")
            # Process 2: same outbox file, reachable broker.
            async with client(any_broker, client_id="persist-1",
                              outbox=SQLiteOutbox(db)) as c2:
                await c2.drain(timeout=10)
            got = await collect(stream, 5)
            assert [m.payload for m in got] == [f"m{i}".encode() for i in range(5)]
    assert len(SQLiteOutbox(db)) == 0


async def test_sqlite_outbox_resumes_inflight_after_restart(any_broker, mqtt_proxy, tmp_path):
    """The PUBACK is lost and the process exits before reconnecting: the next
    process restores the flow with its packet id and resends it with DUP."""
    db = tmp_path / "outbox.db"
    proxy = await mqtt_proxy(any_broker)
    rule = proxy.cut_on("to_client", "PUBACK")
    with trio.fail_after(30):
        async with client(any_broker) as sub:
            stream = sub.messages("ob2/#")
            await sub.subscribe("ob2/#")
            async with client(proxy, client_id="persist-2", session_expiry=600,
                              outbox=SQLiteOutbox(db)) as c1:
                proxy.accepting = False
                with trio.move_on_after(0.3):
                    await c1.publish("ob2/t", "inflight", qos=1)
                assert rule.fired.is_set()
            (entry,) = SQLiteOutbox(db).entries()
            assert entry.state == "publish" and entry.packet_id
            proxy.accepting = True
            async with client(proxy, client_id="persist-2", session_expiry=600,
                              clean_start=False, outbox=SQLiteOutbox(db)) as c2:
                await c2.drain(timeout=10)
            resent = codec.decode(proxy.packets("to_broker", "PUBLISH")[-1], 5)
            assert resent.dup and resent.packet_id == entry.packet_id
            assert (await stream.receive()).payload == b"inflight"


# ------------------------------------------------------------ scripted brokers

async def _handshake(conn, session_present=False, props=None):
    await conn.recv_type(conn.codec.Connect)
    await conn.send(conn.codec.Connack(session_present, 0, props))


async def test_negative_puback_raises_publish_error(scripted_broker):
    async def script(conn):
        await _handshake(conn)
        while True:
            p = await conn.recv_type(conn.codec.Publish)
            await conn.send(conn.codec.Puback(p.packet_id, 0x87, {P.REASON_STRING: "no"}))

    b = await scripted_broker(script)
    with trio.fail_after(10):
        async with client(b) as c:
            with pytest.raises(PublishError) as err:
                await c.publish("x", b"y", qos=1)
    assert err.value.reason_code == 0x87 and err.value.properties[P.REASON_STRING] == "no"


async def test_refused_subscription_raises(scripted_broker):
    async def script(conn):
        await _handshake(conn)
        s = await conn.recv_type(conn.codec.Subscribe)
        await conn.send(conn.codec.Suback(s.packet_id, [0x87]))
        await conn.recv()

    b = await scripted_broker(script)
    with trio.fail_after(10):
        async with client(b) as c:
            with pytest.raises(SubscribeError) as err:
                await c.subscribe("secret/#")
            assert err.value.reason_code == 0x87 and "secret/#" not in c.subscriptions


async def test_receive_maximum_respected(scripted_broker):
    """With Receive Maximum 2 the client never has more than 2 QoS 1 messages
    unacknowledged [MQTT-4.9.0-2]."""
    max_seen = 0

    async def script(conn):
        nonlocal max_seen
        await _handshake(conn, props={P.RECEIVE_MAXIMUM: 2})
        pending = []
        while True:
            p = await conn.recv()
            if isinstance(p, conn.codec.Publish):
                pending.append(p.packet_id)
                max_seen = max(max_seen, len(pending))
                if len(pending) == 2:
                    await conn.send(*[conn.codec.Puback(i) for i in pending])
                    pending.clear()

    b = await scripted_broker(script)
    with trio.fail_after(10):
        async with client(b) as c:
            async with trio.open_nursery() as n:
                for i in range(10):
                    n.start_soon(c.publish, "rm", str(i), 1)
    assert max_seen == 2


async def test_server_disconnect_triggers_reconnect(scripted_broker):
    async def script(conn):
        await _handshake(conn)
        if b.connections == 1:
            await conn.send(conn.codec.Disconnect(0x8B))  # server shutting down
            return
        while True:
            await conn.recv()

    b = await scripted_broker(script)
    with trio.fail_after(10):
        async with client(b) as c:
            await c.wait_disconnected()
            await c.wait_connected()
            assert c.connections == 2 and "0x8B" in str(c.last_error)


async def test_enhanced_authentication_challenge_response(scripted_broker):
    """v5 enhanced authentication (4.12): CONNECT carries the method, the
    server challenges with AUTH 0x18, the client answers, then CONNACK."""
    seen = {}

    async def script(conn):
        c = await conn.recv_type(conn.codec.Connect)
        seen["connect"] = dict(c.properties)
        await conn.send(conn.codec.Auth(0x18, {P.AUTHENTICATION_METHOD: "SCRAM-ish",
                                               P.AUTHENTICATION_DATA: b"nonce"}))
        a = await conn.recv_type(conn.codec.Auth)
        seen["answer"] = (a.reason_code, dict(a.properties))
        ok = a.properties.get(P.AUTHENTICATION_DATA) == b"proof(nonce)"
        await conn.send(conn.codec.Connack(False, 0 if ok else 0x86,
                                           {P.AUTHENTICATION_METHOD: "SCRAM-ish"}))
        while True:
            await conn.recv()

    b = await scripted_broker(script)

    async def on_auth(props):
        return b"proof(" + props[P.AUTHENTICATION_DATA] + b")"

    with trio.fail_after(10):
        async with client(b, auth_method="SCRAM-ish", auth_data=b"client-first",
                          on_auth=on_auth) as c:
            assert c.is_connected
    assert seen["connect"][P.AUTHENTICATION_METHOD] == "SCRAM-ish"
    assert seen["connect"][P.AUTHENTICATION_DATA] == b"client-first"
    assert seen["answer"][0] == 0x18


async def test_server_reference_redirect(scripted_broker, any_broker):
    """CONNACK "Use another server" with a Server Reference: the client goes
    there next (MQTT 5.0, 4.11)."""
    async def script(conn):
        await conn.recv_type(conn.codec.Connect)
        await conn.send(conn.codec.Connack(False, 0x9C, {
            P.SERVER_REFERENCE: f"{any_broker.host}:{any_broker.port}"}))

    redirector = await scripted_broker(script)
    with trio.fail_after(20):
        async with client(redirector) as c:
            assert c.is_connected and redirector.connections == 1
            await c.subscribe("redir/#")
            stream = c.messages("redir/#")
            await c.publish("redir/x", "moved")
            assert (await stream.receive()).payload == b"moved"


# ------------------------------------------------------------ TLS, WebSocket

@pytest.fixture
def tls_certs(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return ca, paths


async def test_tls_against_mosquitto(broker_factory, tls_certs):
    import ssl

    ca, paths = tls_certs
    port = free_port()
    b = broker_factory("mosquitto", mosquitto_conf=[
        f"listener {port} 127.0.0.1", f"cafile {paths['ca']}", f"certfile {paths['cert']}",
        f"keyfile {paths['key']}"])
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with trio.fail_after(20):
        async with Client(f"mqtts://127.0.0.1:{port}", tls=ctx, backoff=FAST) as c:
            stream = c.messages("tls/#")
            await c.subscribe("tls/#")
            await c.publish("tls/x", "secure", qos=1)
            assert (await collect(stream, 1))[0].payload == b"secure"


@pytest.mark.parametrize("secure", [False, True])
async def test_websocket_against_fastmqtt(broker_factory, tls_certs, secure):
    import ssl

    ca, paths = tls_certs
    port = free_port()
    if secure:
        args = ["--wss-port", str(port), "--certfile", str(paths["cert"]),
                "--keyfile", str(paths["key"])]
    else:
        args = ["--ws-port", str(port)]
    b = broker_factory("fastmqtt", args=args)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    scheme = "wss" if secure else "ws"
    with trio.fail_after(20):
        async with Client(f"{scheme}://127.0.0.1:{port}/mqtt", tls=ctx, backoff=FAST) as c, \
                client(b) as tcp:
            stream = c.messages("ws/#")
            await c.subscribe("ws/#", qos=1)
            await tcp.publish("ws/x", "over websocket", qos=1)
            assert (await collect(stream, 1))[0].payload == b"over websocket"
            await c.publish("ws/y", "back", qos=2)
