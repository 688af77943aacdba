"""Listeners with a trivial handler: TCP, TLS, WebSocket, WSS, limits, failures.

Every test binds 127.0.0.1 port 0 and runs under ``trio.fail_after``.
"""

import ssl

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from fastmqtt.broker.interfaces import Stats
from fastmqtt.broker.listeners import ListenerSpec, WebSocketStream, serve_listener

TIMEOUT = 10


async def echo(stream, spec):
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        await stream.send_all(data)


async def recv_exactly(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    return buf


async def closed_by_peer(stream) -> bool:
    """True when the server closed the connection (EOF or reset) without data."""
    try:
        return await stream.receive_some(10) == b""
    except trio.BrokenResourceError:
        return True


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca, tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, cafile = d / "server.pem", d / "server.key", d / "ca.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    ca.cert_pem.write_to_path(str(cafile))
    return {"certfile": str(certfile), "keyfile": str(keyfile), "cafile": str(cafile)}


def client_ctx(ca, client_cert=None):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if client_cert is not None:
        client_cert.configure_cert(ctx)
    return ctx


async def start(nursery, handler=echo, stats=None, **kw):
    spec = ListenerSpec(host="127.0.0.1", port=0, **kw)
    host, port = await nursery.start(lambda task_status: serve_listener(
        spec, handler, stats=stats, task_status=task_status))
    assert host == "127.0.0.1" and port > 0
    return port


# ------------------------------------------------------------------ TCP

async def test_tcp_echo_and_real_port():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n)
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"\x10\x00hello")
            assert await recv_exactly(s, 7) == b"\x10\x00hello"
            await s.aclose()
            n.cancel_scope.cancel()


async def test_handler_errors_stay_in_their_connection():
    calls = []

    async def flaky(stream, spec):
        calls.append(spec.type)
        if len(calls) == 1:
            raise RuntimeError("boom")
        await echo(stream, spec)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, flaky)
            s1 = await trio.open_tcp_stream("127.0.0.1", port)
            assert await closed_by_peer(s1)  # closed after the handler raised
            s2 = await trio.open_tcp_stream("127.0.0.1", port)
            await s2.send_all(b"ok")
            assert await recv_exactly(s2, 2) == b"ok"
            n.cancel_scope.cancel()


async def test_max_connections():
    stats = Stats()
    released = trio.Event()
    finished = trio.Semaphore(0)

    async def hold(stream, spec):
        await stream.send_all(b"hi")
        try:
            await stream.receive_some(10)
        finally:
            finished.release()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, hold, stats=stats, max_connections=2)
            a = await trio.open_tcp_stream("127.0.0.1", port)
            b = await trio.open_tcp_stream("127.0.0.1", port)
            assert await recv_exactly(a, 2) == b"hi" and await recv_exactly(b, 2) == b"hi"
            c = await trio.open_tcp_stream("127.0.0.1", port)
            assert await closed_by_peer(c)  # over the limit: closed without a byte
            assert stats.connections_rejected == {"max_connections": 1}
            await a.aclose()
            await finished.acquire()  # a's handler is done: its slot is free again
            d = await trio.open_tcp_stream("127.0.0.1", port)
            assert await recv_exactly(d, 2) == b"hi"
            released.set()
            n.cancel_scope.cancel()


async def test_connection_rate():
    stats = Stats()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            # 0.01/s gives a burst of one connection, then none for 100 s.
            port = await start(n, stats=stats, connection_rate=0.01)
            a = await trio.open_tcp_stream("127.0.0.1", port)
            await a.send_all(b"x")
            assert await recv_exactly(a, 1) == b"x"
            b = await trio.open_tcp_stream("127.0.0.1", port)
            assert await closed_by_peer(b)
            assert stats.connections_rejected == {"connection_rate": 1}
            n.cancel_scope.cancel()


@pytest.mark.parametrize("kw", [
    {"type": "udp"}, {"type": "tls"}, {"require_certificate": True},
    {"max_connections": -1}, {"connection_rate": 0},
])
def test_spec_validation(kw):
    with pytest.raises(ValueError):
        ListenerSpec(**kw)


async def test_bind_conflict_raises():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n)
            with pytest.raises(OSError):
                await n.start(serve_listener, ListenerSpec(host="127.0.0.1", port=port), echo)
            n.cancel_scope.cancel()


# ------------------------------------------------------------------ TLS

async def test_tls_echo(ca, certs):
    seen = []

    async def h(stream, spec):
        seen.append(type(stream).__name__)
        await echo(stream, spec)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, h, type="tls", certfile=certs["certfile"], keyfile=certs["keyfile"])
            s = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_ctx(ca))
            await s.send_all(b"secure")
            assert await recv_exactly(s, 6) == b"secure"
            assert seen == ["SSLStream"]
            n.cancel_scope.cancel()


async def test_tls_bad_handshake_is_dropped(ca, certs):
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="tls", handshake_timeout=1.0, **{
                k: certs[k] for k in ("certfile", "keyfile")})
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            await raw.send_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")  # plain MQTT
            assert await closed_by_peer(raw)
            silent = await trio.open_tcp_stream("127.0.0.1", port)  # says nothing at all
            assert await closed_by_peer(silent)  # handshake_timeout
            # An untrusting client fails too, and the listener keeps serving.
            with pytest.raises(trio.BrokenResourceError):
                bad = await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", port, ssl_context=ssl.create_default_context())
                await bad.do_handshake()
            good = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_ctx(ca))
            await good.send_all(b"still")
            assert await recv_exactly(good, 5) == b"still"
            n.cancel_scope.cancel()


async def test_tls_client_certificates(ca, certs):
    peers = []

    async def h(stream, spec):
        peers.append(stream.getpeercert())
        await echo(stream, spec)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, h, type="tls", require_certificate=True, **certs)
            # no client certificate: refused during the handshake
            s = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_ctx(ca))
            with pytest.raises(trio.BrokenResourceError):
                # TLS 1.3 reports the refusal on the first read
                await s.send_all(b"x")
                await s.receive_some(10)
            other_ca = trustme.CA()
            s = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=client_ctx(ca, other_ca.issue_cert("mallory@example.com")))
            with pytest.raises(trio.BrokenResourceError):
                await s.send_all(b"x")
                await s.receive_some(10)
            assert peers == []
            # signed by our CA: accepted, and the handler can read the certificate
            s = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=client_ctx(ca, ca.issue_cert("alice@example.com")))
            await s.send_all(b"me")
            assert await recv_exactly(s, 2) == b"me"
            assert peers and peers[0]["subjectAltName"] == (("email", "alice@example.com"),)
            n.cancel_scope.cancel()


# ------------------------------------------------------------------ WebSocket

async def test_ws_binary_frames_and_subprotocol():
    got = []

    async def collect(stream, spec):
        assert isinstance(stream, WebSocketStream)
        # Three packets arrive in two messages: one split, two joined [MQTT-6.0.0-2].
        got.append(await recv_exactly(stream, 12))
        await stream.send_all(b"\x20\x02\x00\x00")
        await stream.send_all(b"\xd0\x00")
        await stream.receive_some()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, collect, type="ws")
            async with open_websocket_url(f"ws://127.0.0.1:{port}/mqtt",
                                          subprotocols=["mqtt"]) as ws:
                assert ws.subprotocol == "mqtt"  # [MQTT-6.0.0-4]
                await ws.send_message(b"\xc0\x00\x30\x06\x00\x01")
                await ws.send_message(b"tabc\xc0\x00")
                assert await ws.get_message() == b"\x20\x02\x00\x00"  # one send_all, one message
                assert await ws.get_message() == b"\xd0\x00"
            assert got == [b"\xc0\x00\x30\x06\x00\x01tabc\xc0\x00"]
            n.cancel_scope.cancel()


@pytest.mark.parametrize("url_path", ["/", "/mqtt", "/anything?x=1"])
async def test_ws_any_path_by_default(url_path):
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="ws")
            async with open_websocket_url(f"ws://127.0.0.1:{port}{url_path}",
                                          subprotocols=["mqtt"]) as ws:
                await ws.send_message(b"\xc0\x00")
                assert await ws.get_message() == b"\xc0\x00"
            n.cancel_scope.cancel()


async def test_ws_fixed_path():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="ws", path="/mqtt")
            with pytest.raises(ConnectionRejected) as exc:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/other", subprotocols=["mqtt"]):
                    pass
            assert exc.value.status_code == 404
            async with open_websocket_url(f"ws://127.0.0.1:{port}/mqtt?token=1",
                                          subprotocols=["mqtt"]) as ws:
                await ws.send_message(b"\xc0\x00")
                assert await ws.get_message() == b"\xc0\x00"
            n.cancel_scope.cancel()


@pytest.mark.parametrize("offered,chosen", [
    (["mqttv3.1"], "mqttv3.1"), (["foo", "mqtt"], "mqtt"), ([], None), (["MQTT"], "MQTT")])
async def test_ws_subprotocol_choice(offered, chosen):
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="ws")
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=offered) as ws:
                assert ws.subprotocol == chosen
                await ws.send_message(b"\xc0\x00")
                assert await ws.get_message() == b"\xc0\x00"
            n.cancel_scope.cancel()


async def test_ws_foreign_subprotocol_rejected():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="ws")
            with pytest.raises(ConnectionRejected) as exc:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=["stomp"]):
                    pass
            assert exc.value.status_code == 400
            n.cancel_scope.cancel()


async def test_ws_text_frame_closes_connection():
    """[MQTT-6.0.0-1]: a non-binary data frame closes the network connection."""
    ended = trio.Event()

    async def h(stream, spec):
        try:
            assert await stream.receive_some() == b""
        finally:
            ended.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, h, type="ws")
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=["mqtt"]) as ws:
                await ws.send_message("\u00c0 text")
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.get_message()
                assert exc.value.reason.code == 1003
            await ended.wait()
            n.cancel_scope.cancel()


async def test_ws_plain_http_request_is_dropped():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="ws", handshake_timeout=2)
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                try:
                    chunk = await s.receive_some()
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                data += chunk
            assert not data.startswith(b"HTTP/1.1 101")
            # and the listener is still fine
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=["mqtt"]) as ws:
                await ws.send_message(b"\xc0\x00")
                assert await ws.get_message() == b"\xc0\x00"
            n.cancel_scope.cancel()


async def test_ws_server_close_reaches_client():
    async def once(stream, spec):
        await stream.send_all(await stream.receive_some())
        await stream.aclose()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, once, type="ws")
            async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=["mqtt"]) as ws:
                await ws.send_message(b"\xe0\x00")
                assert await ws.get_message() == b"\xe0\x00"
                with pytest.raises(ConnectionClosed) as exc:
                    await ws.get_message()
                assert exc.value.reason.code == 1000  # a clean close
            n.cancel_scope.cancel()


async def test_wss_echo_and_limit(ca, certs):
    stats = Stats()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, stats=stats, type="wss", max_connections=1,
                               certfile=certs["certfile"], keyfile=certs["keyfile"])
            async with open_websocket_url(f"wss://127.0.0.1:{port}/mqtt", client_ctx(ca),
                                          subprotocols=["mqtt"]) as ws:
                assert ws.subprotocol == "mqtt"
                await ws.send_message(b"\xc0\x00")
                assert await ws.get_message() == b"\xc0\x00"
                raw = await trio.open_tcp_stream("127.0.0.1", port)
                assert await closed_by_peer(raw)
                assert stats.connections_rejected == {"max_connections": 1}
            n.cancel_scope.cancel()


async def test_ws_close_does_not_wait_forever_for_a_silent_peer(monkeypatch):
    """A client that never answers the close frame cannot pin the connection."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    monkeypatch.setattr(WebSocketStream, "close_timeout", 0.2)
    done = trio.Event()

    async def close_at_once(stream, spec):
        await stream.aclose()
        done.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, close_at_once, type="ws")
            s = await trio.open_tcp_stream("127.0.0.1", port)
            client = WSConnection(ConnectionType.CLIENT)
            await s.send_all(client.send(Request(host="127.0.0.1", target="/mqtt",
                                                 subprotocols=["mqtt"])))
            accepted = False
            while not accepted:
                client.receive_data(await s.receive_some())
                accepted = any(isinstance(e, AcceptConnection) for e in client.events())
            await done.wait()  # returns although we never send a close frame back
            # and the server has dropped the TCP connection
            while True:
                try:
                    if not await s.receive_some():
                        break
                except trio.BrokenResourceError:
                    break
            n.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["ws", "tls", "wss"])
@pytest.mark.parametrize("junk", [
    b"\x00" * 64,
    bytes(range(256)) * 8,
    b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" + b"X-Long: " + b"a" * 200_000,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\xff" * 500,  # a broken ClientHello
    b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",  # plain MQTT CONNECT
], ids=["zeros", "all-bytes", "endless-header", "broken-client-hello", "plain-mqtt"])
async def test_garbage_before_handshake(certs, ca, kind, junk):
    """Bad input before or instead of a handshake closes that connection only:
    nothing reaches the handler, nothing escapes to the listener, memory stays
    bounded (an endless header is refused, not buffered)."""
    reached = []

    async def h(stream, spec):
        reached.append(stream)
        await echo(stream, spec)

    tls = {"certfile": certs["certfile"], "keyfile": certs["keyfile"]} if kind != "ws" else {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, h, type=kind, handshake_timeout=2, **tls)
            s = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await s.send_all(junk)
            except trio.BrokenResourceError:
                pass
            while True:  # the server answers (an error) and closes, or just closes
                try:
                    if not await s.receive_some(65536):
                        break
                except trio.BrokenResourceError:
                    break
            assert reached == []
            # the listener still serves a proper client
            if kind == "ws":
                async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=["mqtt"]) as ws:
                    await ws.send_message(b"\xc0\x00")
                    assert await ws.get_message() == b"\xc0\x00"
            elif kind == "wss":
                async with open_websocket_url(f"wss://127.0.0.1:{port}/", client_ctx(ca),
                                              subprotocols=["mqtt"]) as ws:
                    await ws.send_message(b"\xc0\x00")
                    assert await ws.get_message() == b"\xc0\x00"
            else:
                good = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_ctx(ca))
                await good.send_all(b"ok")
                assert await recv_exactly(good, 2) == b"ok"
            n.cancel_scope.cancel()


async def test_certificates_reload(tmp_path):
    """reload_certificates() (SIGHUP) puts renewed certificate files into use
    for new connections; unreadable files keep the old ones."""
    from fastmqtt.broker.listeners import reload_certificates

    old_ca, new_ca = trustme.CA(), trustme.CA()
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(ca):
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))

    async def works(ca, port):
        try:
            s = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client_ctx(ca))
            await s.send_all(b"hi")
            return await recv_exactly(s, 2) == b"hi"
        except trio.BrokenResourceError:
            return False

    install(old_ca)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            port = await start(n, type="tls", certfile=str(certfile), keyfile=str(keyfile))
            assert await works(old_ca, port)
            install(new_ca)
            assert await works(old_ca, port)  # nothing changes before the reload
            assert reload_certificates() >= 1
            assert await works(new_ca, port) and not await works(old_ca, port)
            keyfile.write_text("not a key")
            reload_certificates()  # logged, old context kept
            assert await works(new_ca, port)
            n.cancel_scope.cancel()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=4096))
def test_ws_stream_is_the_concatenation_of_messages(chunks, read_size):
    """However MQTT bytes are cut into WebSocket messages, and however much the
    broker asks for per read, it sees exactly the concatenated bytes [MQTT-6.0.0-2]."""
    want = b"".join(chunks)
    got = []

    async def collect(stream, spec):
        buf = b""
        while len(buf) < len(want):
            data = await stream.receive_some(read_size)
            assert data and len(data) <= read_size
            buf += data
        got.append(buf)
        await stream.send_all(b"done")

    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as n:
                port = await start(n, collect, type="ws")
                async with open_websocket_url(f"ws://127.0.0.1:{port}/", subprotocols=["mqtt"]) as ws:
                    for c in chunks:
                        await ws.send_message(c)
                    assert await ws.get_message() == b"done"
                n.cancel_scope.cancel()

    trio.run(main)
    assert got == [want]


async def test_connection_info_reaches_the_handler_task(ca, certs):
    """Code the handler runs in its own task (the broker's authenticate) sees
    the peer address, the verified client certificate and the WebSocket path."""
    from fastmqtt.broker.listeners import connection_info

    seen = []

    async def h(stream, spec):
        seen.append(connection_info.get())
        await echo(stream, spec)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            tls_port = await start(n, h, type="tls", **certs)  # cafile: certificates optional
            ws_port = await start(n, h, type="ws")
            s = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", tls_port, ssl_context=client_ctx(ca, ca.issue_cert("device-7", common_name="device-7")))
            await s.send_all(b"x")
            await recv_exactly(s, 1)
            s2 = await trio.open_ssl_over_tcp_stream("127.0.0.1", tls_port, ssl_context=client_ctx(ca))
            await s2.send_all(b"x")
            await recv_exactly(s2, 1)
            async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/mqtt?x=1",
                                          subprotocols=["mqtt"]) as ws:
                await ws.send_message(b"y")
                await ws.get_message()
            n.cancel_scope.cancel()
    with_cert, without_cert, over_ws = seen
    assert with_cert.listener.type == "tls" and with_cert.peer[0] == "127.0.0.1"
    assert with_cert.certificate_common_name == "device-7"
    assert without_cert.certificate is None
    assert over_ws.listener.type == "ws" and over_ws.path == "/mqtt" and over_ws.certificate is None
