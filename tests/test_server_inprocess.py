"""In-process server tests: ``serve()`` on 127.0.0.1 port 0, real sockets.

paho-mqtt (threaded, run through ``trio.to_thread``) checks interoperability
for 3.1.1 and 5; a small trio raw client (our codec over a TCP stream) checks
timeouts, shutdown and slow consumers where exact packets matter.
"""

import queue
import threading

import paho.mqtt.client as mqtt
import pytest
import trio
import trio.testing

from fastmqtt.broker.server import serve
from fastmqtt.codec import (Disconnect, Pingreq, Puback, Publish, Subscribe, Subscription, encode,
                            Will)
from fastmqtt.enums import PropertyId
from inprocess import Raw, config


def paho_roundtrip(port, version):
    """Subscriber + publisher over paho: QoS 0/1/2 and a retained message."""
    proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
    got = queue.Queue()
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub{version}", protocol=proto)
    sub.on_message = lambda c, u, m: got.put((m.topic, m.payload, m.qos, m.retain))
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub{version}", protocol=proto)
    try:
        sub.subscribe("a/#", 2)
        assert subscribed.wait(5)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        for qos in (0, 1, 2):
            assert pub.publish("a/b", f"q{qos}".encode(), qos).wait_for_publish(5) is None
        pub.publish("a/r", b"kept", 1, retain=True).wait_for_publish(5)
        out = [got.get(timeout=5) for _ in range(4)]
        # a late subscriber gets the retained message with RETAIN=1 [MQTT-3.3.1-9]
        late_q = queue.Queue()
        late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late{version}",
                           protocol=proto)
        late.on_message = lambda c, u, m: late_q.put((m.topic, m.payload, m.retain))
        late.connect("127.0.0.1", port)
        late.loop_start()
        late.subscribe("a/r", 1)
        retained = late_q.get(timeout=5)
        late.disconnect()
        late.loop_stop()
        return out, retained
    finally:
        pub.disconnect()
        sub.disconnect()
        pub.loop_stop()
        sub.loop_stop()


@pytest.mark.parametrize("version", [4, 5])
async def test_paho_publish_subscribe_retained(version):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            out, retained = await trio.to_thread.run_sync(paho_roundtrip, broker.ports[0], version)
            # sorted: paho hands a QoS 2 message to the application only at
            # PUBREL, so it may overtake nothing but be overtaken by later QoS 1
            assert sorted(out) == [("a/b", b"q0", 0, False), ("a/b", b"q1", 1, False),
                                   ("a/b", b"q2", 2, False), ("a/r", b"kept", 1, False)]
            assert retained == ("a/r", b"kept", True)
            assert broker.stats.messages_received == 4
            await broker.aclose()


async def test_connection_without_connect_is_dropped():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config(connect_timeout=0.3))
            raw = await Raw.open(broker.ports[0])
            assert await raw.next() is None  # closed by the server, nothing sent
            await broker.aclose()


async def test_shutdown_sends_0x8B_to_v5_clients():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            raw = await Raw.open(broker.ports[0])
            await raw.connect("c")
            nursery.start_soon(broker.aclose)
            pkt = await raw.next()
            assert isinstance(pkt, Disconnect) and pkt.reason_code == 0x8B
            assert await raw.next() is None


async def test_malformed_packet_closes_only_that_client():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            good = await Raw.open(broker.ports[0])
            await good.connect("good")
            bad = await Raw.open(broker.ports[0])
            await bad.connect("bad")
            await bad.stream.send_all(b"\xc0\x01\x00")  # PINGREQ with a body
            pkt = await bad.next()
            assert isinstance(pkt, Disconnect) and pkt.reason_code == 0x81
            assert await bad.next() is None
            await good.send(Pingreq())
            assert (await good.next()).packet_type == 13
            assert broker.stats.protocol_errors == 1
            await broker.aclose()


async def test_keepalive_timeout_publishes_will():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            watcher = await Raw.open(broker.ports[0])
            await watcher.connect("watcher")
            await watcher.send(Subscribe(1, [Subscription("will/#", 0)]))
            assert (await watcher.next()).packet_type == 9
            quiet = await Raw.open(broker.ports[0])
            await quiet.connect("quiet", keep_alive=1,
                                will=Will("will/quiet", b"timeout", 0))
            # 1.5 x 1 s without a packet [MQTT-3.1.2-24]: DISCONNECT 0x8D, then the will
            pkt = await quiet.next()
            assert isinstance(pkt, Disconnect) and pkt.reason_code == 0x8D
            will = await watcher.next()
            assert isinstance(will, Publish) and will.payload == b"timeout"
            await broker.aclose()


async def test_slow_consumer_is_disconnected_others_unaffected():
    cfg = config(slow_consumer_timeout=0.5, max_outgoing_bytes=64 * 1024)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, cfg)
            port = broker.ports[0]
            # a small receive buffer, set before connecting so the TCP window
            # stays small: the kernel cannot absorb the flood for the slow reader
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            slow = Raw(trio.SocketStream(sock), 5)
            await slow.connect("slow")
            await slow.send(Subscribe(1, [Subscription("t", 0)]))
            assert (await slow.next()).packet_type == 9
            fast = await Raw.open(port)
            await fast.connect("fast")
            # QoS 1 for the healthy reader: nothing of its may be dropped
            await fast.send(Subscribe(1, [Subscription("t", 1)]))
            assert (await fast.next()).packet_type == 9
            pub = await Raw.open(port)
            await pub.connect("pub")
            payload = b"x" * 60_000
            n = 150  # 9 MB: far more than the slow socket's buffers hold
            received = 0

            async def drain_fast():
                nonlocal received
                while received < n:
                    pkt = await fast.next()
                    assert isinstance(pkt, Publish) and pkt.qos == 1
                    await fast.send(Puback(pkt.packet_id))
                    received += 1

            async with trio.open_nursery() as inner:
                inner.start_soon(drain_fast)
                for i in range(n):
                    await pub.send(Publish("t", payload, 1, packet_id=i + 1))
                    if i % 20 == 0:
                        await trio.sleep(0)
            # the slow one never read: it was dropped, not waited for
            assert received == n
            while "slow" in broker.core.clients:
                await trio.sleep(0.05)
            assert broker.stats.publish_dropped.get("slow_consumer", 0) == 1
            await broker.aclose()


async def test_fan_in_burst_to_a_reading_subscriber_drops_nothing():
    # Many publishers whose reads each hold far more than the receiver's soft
    # limit of unsent bytes (half of max_outgoing_bytes) become readable at
    # once. The receiver reads: its publishers must wait for its writer in the
    # middle of a read rather than overflow its buffer, so no QoS 0 message
    # is dropped (drops are for receivers that stop reading).
    import socket

    from fastmqtt.codec import Connect, encode

    n_pubs, per_pub = 20, 800
    cfg = config(max_outgoing_bytes=64 * 1024)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, cfg)
            port = broker.ports[0]
            sub = await Raw.open(port)
            await sub.connect("fanin-sub")
            await sub.subscribe("fanin", qos=0)
            burst = encode(Publish("fanin", b"m" * 64), 5) * per_pub  # about 60 KB
            pubs = []
            # Plain blocking sockets, written without giving the broker a turn:
            # every publisher's CONNECT and burst is waiting when it runs.
            for i in range(n_pubs):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(encode(Connect(f"fanin-p{i}"), 5) + burst + encode(Pingreq(), 5))
                pubs.append(s)
            received = 0

            async def drain():
                nonlocal received
                while received < n_pubs * per_pub:
                    pkt = await sub.next()
                    assert isinstance(pkt, Publish), pkt
                    received += 1

            async with trio.open_nursery() as inner:
                inner.start_soon(drain)
                # PINGRESP on every publisher: the broker has routed its burst.
                for s in pubs:
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(s))
                    reply = b""
                    while not reply.endswith(b"\xd0\x00"):
                        chunk = await stream.receive_some(4096)
                        assert chunk, "publisher disconnected"
                        reply += chunk
                    assert reply[:1] == b"\x20"  # CONNACK first, then the PINGRESP
                assert broker.stats.publish_dropped == {}
            assert received == n_pubs * per_pub
            for s in pubs:
                s.close()
            await broker.aclose()


async def test_closed_connection_is_freed_without_the_cyclic_gc():
    # A connection's state must not outlive it in a reference cycle: with the
    # cyclic collector off, nothing of a closed connection may remain.
    import gc

    from fastmqtt.session import ServerConnection

    def alive():
        return [o for o in gc.get_objects() if type(o) is ServerConnection]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            gc.collect()
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                for i in range(3):
                    c = await Raw.open(broker.ports[0])
                    await c.connect(f"freed{i}")
                    await c.subscribe("freed/#")
                    await c.send(Disconnect(0))
                    # EOF: the broker closed it, after its handler returned
                    assert await c.next() is None
                    await c.stream.aclose()
                await trio.testing.wait_all_tasks_blocked()
                assert not broker.connections
                assert alive() == []
            finally:
                if was_enabled:
                    gc.enable()
            await broker.aclose()


async def test_plain_tcp_stream_try_receive_try_send_and_close():
    # What the broker's reader relies on in listeners.TcpStream: try_receive
    # never waits (None = nothing yet, b"" = end of stream), try_send sends
    # what the socket takes, and close wakes a task waiting on the socket.
    from fastmqtt.broker.listeners import ListenerSpec, TcpStream, serve_listener

    seen = []
    done = trio.Event()

    async def handler(stream, spec):
        assert isinstance(stream, TcpStream) and stream.peer[0] == "127.0.0.1"
        seen.append(stream.try_receive())  # the client has not written yet
        data = await stream.receive_some(100)
        assert stream.try_send(data.upper()) == len(data)
        assert await stream.receive_some(100) == b""  # client shut down writing
        seen.append(stream.try_receive())
        stream.close()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(100)
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_listener, ListenerSpec(host="127.0.0.1", port=0),
                                          handler)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(b"hello")
            assert await client.receive_some(100) == b"HELLO"
            await client.send_eof()
            await done.wait()
            assert seen == [None, b""]
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_v5_topic_alias_and_expiry_through_the_socket():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config(topic_alias_maximum=2))
            sub = await Raw.open(broker.ports[0])
            await sub.connect("s")
            await sub.send(Subscribe(1, [Subscription("x/#", 1)]))
            await sub.next()
            pub = await Raw.open(broker.ports[0])
            await pub.connect("p")
            props = {PropertyId.TOPIC_ALIAS: 1, PropertyId.MESSAGE_EXPIRY_INTERVAL: 60}
            await pub.send(Publish("x/y", b"1", 0, properties=props),
                           Publish("", b"2", 0, properties={PropertyId.TOPIC_ALIAS: 1}))
            a, b = await sub.next(), await sub.next()
            assert (a.topic, b.topic) == ("x/y", "x/y")
            assert a.properties[PropertyId.MESSAGE_EXPIRY_INTERVAL] <= 60
            await broker.aclose()


async def test_receiver_reset_while_others_route_to_it():
    # A publisher's reader sends what it routes to other clients directly
    # (Broker._flush_all). A receiver whose connection was reset must be ended
    # whichever notices first, its own reader or a publisher's direct send:
    # its will goes out once, the publisher and the others carry on.
    import socket as _socket
    import struct

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve, config())
            port = broker.ports[0]
            watcher = await Raw.open(port)
            await watcher.connect("watcher")
            await watcher.subscribe("will/#", "t/#", qos=0)
            pub = await Raw.open(port)
            await pub.connect("pub")
            for round_ in range(5):
                victim = await Raw.open(port)
                await victim.connect(f"victim{round_}",
                                     will=Will(f"will/{round_}", b"gone", 0))
                await victim.subscribe("t/#", qos=0)
                sock = victim.stream.socket
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()      # RST: the broker's next send to it fails
                for i in range(20):
                    await pub.send(Publish("t/x", b"%d" % i, 1, packet_id=i + 1))
                acks = 0
                while acks < 20:
                    acks += isinstance(await pub.next(), Puback)
                got, wills = 0, 0
                while got < 20 or wills < 1:
                    p = await watcher.next()
                    assert isinstance(p, Publish)
                    if p.topic == f"will/{round_}":
                        wills += 1
                    else:
                        got += 1
                assert broker.core.clients.get(f"victim{round_}") is None or \
                    broker.core.clients[f"victim{round_}"].conn is None
            # Exactly one will per victim: nothing more is queued for the watcher.
            await pub.send(Publish("t/end", b"end", 1, packet_id=99))
            assert isinstance(await pub.next(), Puback)
            assert (await watcher.next()).topic == "t/end"
            await broker.aclose()


async def _stored_broker(nursery, tmp_path, durability):
    """A broker with the SQLite store in ``tmp_path``, started in ``nursery``."""
    return await nursery.start(serve, config(persistence=True, data_dir=str(tmp_path),
                                             durability=durability))


async def _keeper_and_publisher(broker):
    """A connected persistent QoS 1 subscriber to "t" ("keeper") and a
    publisher ("pub"), both settled."""
    sub = await Raw.open(broker.ports[0])
    await sub.connect("keeper", clean_start=False,
                      properties={PropertyId.SESSION_EXPIRY_INTERVAL: 3600})
    await sub.send(Subscribe(1, [Subscription("t", 1)]))
    assert (await sub.next()).packet_type == 9
    return sub, await _publisher(broker, "pub")


async def _publisher(broker, client_id):
    """A connected client ``client_id``, settled."""
    pub = await Raw.open(broker.ports[0])
    await pub.connect(client_id)
    await trio.testing.wait_all_tasks_blocked()
    return pub


@pytest.mark.parametrize("durability", ["sync", "batch"])
async def test_puback_waits_for_the_store_then_goes_out(tmp_path, durability):
    """PUBACK only once the message is durable [issue 5]: with the log writer
    held, the broker handles the PUBLISH and sends nothing; released, the
    PUBACK follows (sent by the store's callback, no writer task)."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await _stored_broker(nursery, tmp_path, durability)
            sub, pub = await _keeper_and_publisher(broker)
            broker.store._wal.pause(True)
            sent_before = broker.stats.bytes_sent
            await pub.send(Publish("t", b"m", 1, False, False, 7))
            await trio.testing.wait_all_tasks_blocked()
            # Handled (queued for the subscriber, who got it: it is online)...
            got = await sub.next()
            assert isinstance(got, Publish) and got.payload == b"m"
            # ...but the publisher has no PUBACK while the store holds back.
            await trio.testing.wait_all_tasks_blocked()
            assert broker.stats.bytes_sent == sent_before + len(encode(got, 5))
            broker.store._wal.pause(False)
            ack = await pub.next()
            assert isinstance(ack, Puback) and ack.packet_id == 7
            await broker.aclose()


@pytest.mark.parametrize("second", ["same publisher", "another publisher"])
async def test_acks_go_out_as_far_as_the_store_has_committed(tmp_path, monkeypatch, second):
    """PUBACKs of an earlier read go out once their own changes are durable,
    not only when a later read's are [MQTT-4.6.0-2: in order]: the store is
    made to report the first read's changes as committed, and only that
    PUBACK is sent; the second follows once its changes are. The second
    read comes from the same publisher or from another one (two connections
    waiting for the store) [issue 5]."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await _stored_broker(nursery, tmp_path, "batch")
            store = broker.store
            sub, pub = await _keeper_and_publisher(broker)
            pub2 = pub if second == "same publisher" else await _publisher(broker, "pub2")
            store._wal.pause(True)
            await pub.send(Publish("t", b"m7", 1, False, False, 7))
            await trio.testing.wait_all_tasks_blocked()
            first = store.mark()  # covers the first read's changes
            await pub2.send(Publish("t", b"m8", 1, False, False, 8))
            await trio.testing.wait_all_tasks_blocked()
            assert store.mark() > first
            limit = [first]
            real = type(store)._catch_up

            def catch_up(wal):
                real(store, wal)
                store._committed = min(store._committed, limit[0])

            monkeypatch.setattr(store, "_catch_up", catch_up)
            sent_before = broker.stats.bytes_sent
            store._wal.pause(False)
            ack = await pub.next()
            assert isinstance(ack, Puback) and ack.packet_id == 7
            await trio.testing.wait_all_tasks_blocked()
            assert broker.stats.bytes_sent == sent_before + len(encode(ack, 5))
            limit[0] = float("inf")
            store._progress(store._wal)
            ack = await pub2.next()
            assert isinstance(ack, Puback) and ack.packet_id == 8
            await broker.aclose()


async def test_waiting_acks_are_never_sent_when_the_store_fails(tmp_path):
    """The log writer fails while PUBACKs wait for it: no PUBACK is sent
    (the message is not durable) and the waiting publishers' connections
    end [issue 5]; the broker itself goes on."""
    import errno

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await _stored_broker(nursery, tmp_path, "batch")
            store = broker.store
            sub, pub = await _keeper_and_publisher(broker)
            pub2 = await _publisher(broker, "pub2")
            store._wal.retry_scale = 0.0
            store._wal.inject_failure(errno.EIO, writes=100)
            store._wal.pause(True)
            await pub.send(Publish("t", b"a", 1, False, False, 7))
            await pub2.send(Publish("t", b"b", 1, False, False, 9))
            await trio.testing.wait_all_tasks_blocked()
            store._wal.pause(False)
            assert await pub.next() is None  # closed, no PUBACK first
            assert await pub2.next() is None
            # The subscriber, which waits for nothing from the store, goes on.
            await sub.send(Pingreq())
            while (got := await sub.next()) is not None and got.packet_type != 13:
                assert isinstance(got, Publish)
            assert got is not None
            await broker.aclose()
