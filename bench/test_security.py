"""Cost of security and transports, each next to its baseline in the same run.

* **acl**: ``can_receive`` (checked on every delivery) over chat topics with a
  realistic ACL (40 users, patterns): ``AllowAll`` (what the core skips to),
  the cached ``AclAuthorizer`` (steady state) and the uncached rule walk.
* **ratelimit**: ``RateLimiter.allow`` (per PUBLISH when a rate is set) next
  to an empty call.
* **password**: a CONNECT's password check: the success cache vs PBKDF2.
* **transport**: round trips of 64-byte messages through ``serve_listener``
  with an echo handler over TCP, TLS, WebSocket and WSS (one client).

Nothing is asserted about speed; a table with ratios is printed at the end.
Short run::

    python -m pytest bench/test_security.py -q --benchmark-min-rounds=1 \
        --benchmark-max-time=0.05 --benchmark-warmup=off
"""

from __future__ import annotations

import os
import ssl
import time

import pytest
import trio

from fastmqtt.broker.acl import AclAuthorizer, parse_acl
from fastmqtt.broker.auth import PasswordFileAuthenticator, hash_password
from fastmqtt.broker.interfaces import AllowAll
from fastmqtt.broker.listeners import ListenerSpec, serve_listener
from fastmqtt.broker.security import RateLimiter

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOPICS = [f"chat/acme/channel/{i % 50}" if i % 3 else f"chat/acme/user/u{i % 40}" for i in range(1000)]
ROUND_TRIPS = 200 if CI else 2000

_results: dict[tuple[str, str], float] = {}


def _acl_text() -> str:
    lines = ["topic read public/#"]
    for u in range(40):
        lines += [f"user u{u}", "topic read chat/acme/channel/+", f"topic write chat/acme/dm/u{u}/#",
                  "topic deny chat/acme/channel/secret"]
    lines += ["pattern read chat/acme/user/%u", "pattern readwrite devices/%c/#"]
    return "\n".join(lines) + "\n"


def _record(group: str, name: str, ops: float) -> None:
    _results[(group, name)] = ops


def _per_second(benchmark, n: int) -> float:
    return n / benchmark.stats.stats.mean


@pytest.mark.benchmark(group="acl")
@pytest.mark.parametrize("impl", ["allow-all", "acl-cached", "acl-uncached"])
def test_acl_can_receive(benchmark, impl):
    az = AclAuthorizer(acl=parse_acl(_acl_text()))
    if impl == "allow-all":
        check = AllowAll().can_receive
    elif impl == "acl-cached":
        check = az.can_receive
        for t in TOPICS:  # warm the cache: the steady state of a running broker
            check("c7", "u7", t)
    else:
        def check(cid, user, topic, _check=az.check):
            return _check(1, cid, user, topic)

    def run():
        for t in TOPICS:
            check("c7", "u7", t)

    benchmark(run)
    _record("acl", impl, _per_second(benchmark, len(TOPICS)))


@pytest.mark.benchmark(group="ratelimit")
@pytest.mark.parametrize("impl", ["empty-call", "token-bucket"])
def test_rate_limiter(benchmark, impl):
    rl = RateLimiter(1e9, burst=1e9)
    allow = rl.allow if impl == "token-bucket" else (lambda now: True)
    nows = [i * 1e-6 for i in range(1000)]

    def run():
        for now in nows:
            allow(now)

    benchmark(run)
    _record("ratelimit", impl, _per_second(benchmark, len(nows)))


@pytest.mark.benchmark(group="password")
@pytest.mark.parametrize("impl", ["cached", "pbkdf2-1000"])
def test_password_check(benchmark, impl, tmp_path):
    """50 CONNECT checks through ``authenticate`` in one trio run: with the
    success cache warm, and with no cache (PBKDF2 in a worker thread each time)."""
    path = tmp_path / "pw"
    path.write_text(f"alice:{hash_password('secret')}\n")
    auth = PasswordFileAuthenticator(str(path), cache_size=1024 if impl == "cached" else 0)
    n = 50

    async def many():
        for _ in range(n):
            assert await auth.authenticate("c", "alice", b"secret", None) == 0

    trio.run(many)  # warm up (fills the cache when there is one)
    benchmark(trio.run, many)
    _record("password", impl, _per_second(benchmark, n))


def _certs(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), ctx


async def _echo(stream, spec):
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        await stream.send_all(data)


async def _round_trips(kind: str, certfile, keyfile, ctx, n: int) -> float:
    from trio_websocket import open_websocket_url

    msg = b"\x30\x3e\x00\x0cchat/acme/42" + b"x" * 48
    tls = kind in ("tls", "wss")
    spec = ListenerSpec(type=kind, host="127.0.0.1", port=0,
                        certfile=certfile if tls else None, keyfile=keyfile if tls else None)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_listener, spec, _echo)
        if kind in ("ws", "wss"):
            scheme = "wss" if tls else "ws"
            async with open_websocket_url(f"{scheme}://127.0.0.1:{port}/mqtt", ctx if tls else None,
                                          subprotocols=["mqtt"]) as ws:
                t0 = time.perf_counter()
                for _ in range(n):
                    await ws.send_message(msg)
                    await ws.get_message()
                elapsed = time.perf_counter() - t0
        else:
            if tls:
                s = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
            else:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            t0 = time.perf_counter()
            for _ in range(n):
                await s.send_all(msg)
                got = 0
                while got < len(msg):
                    got += len(await s.receive_some(65536))
            elapsed = time.perf_counter() - t0
            await s.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


@pytest.mark.benchmark(group="transport")
@pytest.mark.parametrize("kind", ["tcp", "tls", "ws", "wss"])
def test_transport_round_trips(benchmark, kind, tmp_path):
    certfile, keyfile, ctx = _certs(tmp_path)
    elapsed = benchmark.pedantic(
        lambda: trio.run(_round_trips, kind, certfile, keyfile, ctx, ROUND_TRIPS),
        rounds=1 if CI else 3, iterations=1)
    del elapsed
    _record("transport", kind, _per_second(benchmark, ROUND_TRIPS))


BASELINES = {"acl": "allow-all", "ratelimit": "empty-call", "password": "pbkdf2-1000",
             "transport": "tcp"}


def teardown_module(module):
    if not _results:
        return
    print("\n\nsecurity and transport benchmark (operations/s, ratio to the group's baseline)")
    for group, base in BASELINES.items():
        base_ops = _results.get((group, base))
        for (g, name), ops in sorted(_results.items()):
            if g != group:
                continue
            ratio = f"{ops / base_ops:8.2f}x" if base_ops else ""
            print(f"  {group:10s} {name:14s} {ops:14,.0f}/s {ratio}")


# ----------------------------------------------------------------- broker level
#
# The same chat fan-out through ``fastmqtt-broker`` without security and with
# a password file and an ACL (every PUBLISH and every delivery checked): one
# QoS 1 publisher (64 in flight) to 10 channels, 5 subscribers on
# ``chat/acme/channel/+`` acknowledging QoS 1 deliveries.

import re as _re  # noqa: E402
import socket as _socket  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import threading as _threading  # noqa: E402

from fastmqtt.codec import Connect, Decoder, Publish, Subscribe, Subscription, encode  # noqa: E402

BROKER_MESSAGES = 1_000 if CI else 20_000
SUBSCRIBERS = 5


class _Broker:
    def __init__(self, workdir, secure: bool) -> None:
        conf = workdir / "bench.toml"
        text = "persistence = false\nsys_interval = 0\nmax_queued_messages = 0\nmax_queued_bytes = 0\n"
        if secure:
            (workdir / "passwd").write_text("".join(
                f"{u}:{hash_password(u + '-pw')}\n" for u in ["pub"] + [f"s{i}" for i in range(SUBSCRIBERS)]))
            acl = ["user pub", "topic write chat/acme/channel/+"]
            for i in range(SUBSCRIBERS):
                acl += [f"user s{i}", "topic read chat/acme/channel/+", "topic deny chat/acme/channel/secret"]
            (workdir / "acl").write_text("\n".join(acl) + "\n")
            text += f'password_file = "{workdir}/passwd"\nacl_file = "{workdir}/acl"\n'
        conf.write_text(text)
        self.proc = _subprocess.Popen(
            [_sys.executable, "-m", "fastmqtt.broker", "-c", str(conf), "--host", "127.0.0.1", "-p", "0"],
            stdout=_subprocess.PIPE, stderr=_subprocess.STDOUT, stdin=_subprocess.DEVNULL, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.port = None
        for line in self.proc.stdout:
            m = _re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        _threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        if self.port is None:
            self.close()
            raise RuntimeError("broker did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _client(port, cid, user):
    s = _socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    s.sendall(encode(Connect(cid, True, 60, username=user, password=(user + "-pw").encode()), 5))
    dec = Decoder(5)
    while True:
        pk = dec.feed(s.recv(65536))
        if pk:
            assert pk[0].packet_type == 2 and pk[0].reason_code == 0, pk
            return s, dec, pk[1:]


def _subscriber(port, i, ready, counts):
    s, dec, _ = _client(port, f"sub{i}", f"s{i}")
    s.sendall(encode(Subscribe(1, [Subscription("chat/acme/channel/+", 1)]), 5))
    got = 0
    subacked = False
    while got < BROKER_MESSAGES:
        acks = []
        for p in dec.feed(s.recv(65536)):
            if p.packet_type == 9 and not subacked:
                subacked = True
                ready.release()
            elif p.packet_type == 3:
                got += 1
                acks.append(bytes([0x40, 2]) + p.packet_id.to_bytes(2, "big"))
        if acks:
            s.sendall(b"".join(acks))
    counts[i] = got
    s.close()


def _fanout_run(port) -> None:
    ready = _threading.Semaphore(0)
    counts = [0] * SUBSCRIBERS
    subs = [_threading.Thread(target=_subscriber, args=(port, i, ready, counts)) for i in range(SUBSCRIBERS)]
    for t in subs:
        t.start()
    for _ in subs:
        ready.acquire(timeout=60)
    s, dec, _ = _client(port, "pub", "pub")
    payload = b'{"type":"post","id":"0123456789abcdef","text":"hello"}'
    sent = acked = 0
    while acked < BROKER_MESSAGES:
        burst = []
        while sent < BROKER_MESSAGES and sent - acked < 64:
            burst.append(encode(Publish(f"chat/acme/channel/{sent % 10}", payload, 1, False, False,
                                        sent % 65535 + 1), 5))
            sent += 1
        if burst:
            s.sendall(b"".join(burst))
        acked += sum(1 for p in dec.feed(s.recv(65536)) if p.packet_type == 4)
    for t in subs:
        t.join(120)
    s.close()
    assert counts == [BROKER_MESSAGES] * SUBSCRIBERS, counts


@pytest.mark.benchmark(group="broker-fanout")
@pytest.mark.parametrize("mode", ["open", "password+acl"])
def test_broker_fanout_with_security(benchmark, mode, tmp_path):
    broker = _Broker(tmp_path, secure=mode != "open")
    try:
        benchmark.pedantic(_fanout_run, args=(broker.port,), rounds=1 if CI else 3, iterations=1)
    finally:
        broker.close()
    _record("broker-fanout", mode, _per_second(benchmark, BROKER_MESSAGES * SUBSCRIBERS))


BASELINES["broker-fanout"] = "open"
