"""Prometheus /metrics: exposition read back with prometheus_client's parser,
in-process over Stats and on a running broker."""

import re
import time
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from fastmqtt.broker.interfaces import Stats
from fastmqtt.broker.metrics import serve_metrics

TIMEOUT = 10


async def http(port, request: bytes) -> tuple[int, dict, bytes]:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(request)
    data = b""
    while True:
        chunk = await s.receive_some()
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} from exposition text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def busy_stats() -> Stats:
    st = Stats()
    st.started_at = time.time() - 5
    st.clients_connected = 3
    st.clients_maximum = 7
    st.connections_total = 11
    st.sessions_total = 4
    st.messages_received = 100
    st.messages_sent = 250
    st.bytes_received = 12345
    st.bytes_sent = 54321
    st.drop("queue_full", 2)
    st.drop("not_authorized")
    st.connections_rejected["connection_rate"] = 5
    st.protocol_errors = 1
    st.retained_messages = 9
    st.subscriptions = 12
    st.queued_messages = 6
    st.inflight_messages = 2
    st.store_commits = 40
    st.store_commit_seconds = 0.5
    return st


async def test_metrics_exposition():
    st = busy_stats()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            host, port = await n.start(serve_metrics, st, "127.0.0.1", 0)
            assert host == "127.0.0.1" and port > 0
            status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            assert int(headers["content-length"]) == len(body)
            got = samples(body.decode())
            e = frozenset()
            assert got[("fastmqtt_clients_connected", e)] == 3
            assert got[("fastmqtt_clients_maximum", e)] == 7
            assert got[("fastmqtt_connections_total", e)] == 11
            assert got[("fastmqtt_sessions", e)] == 4
            assert got[("fastmqtt_messages_received_total", e)] == 100
            assert got[("fastmqtt_messages_sent_total", e)] == 250
            assert got[("fastmqtt_bytes_received_total", e)] == 12345
            assert got[("fastmqtt_bytes_sent_total", e)] == 54321
            assert got[("fastmqtt_messages_dropped_total", frozenset({("reason", "queue_full")}))] == 2
            assert got[("fastmqtt_messages_dropped_total", frozenset({("reason", "not_authorized")}))] == 1
            assert got[("fastmqtt_connections_rejected_total",
                        frozenset({("reason", "connection_rate")}))] == 5
            assert got[("fastmqtt_protocol_errors_total", e)] == 1
            assert got[("fastmqtt_retained_messages", e)] == 9
            assert got[("fastmqtt_subscriptions", e)] == 12
            assert got[("fastmqtt_queued_messages", e)] == 6
            assert got[("fastmqtt_inflight_messages", e)] == 2
            assert got[("fastmqtt_store_commit_seconds_count", e)] == 40
            assert got[("fastmqtt_store_commit_seconds_sum", e)] == 0.5
            assert 4 <= got[("fastmqtt_uptime_seconds", e)] < 60
            # Read at scrape time: a change shows up in the next scrape.
            st.messages_received += 1
            st.drop("queue_full")
            _, _, body = await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            got = samples(body.decode())
            assert got[("fastmqtt_messages_received_total", e)] == 101
            assert got[("fastmqtt_messages_dropped_total", frozenset({("reason", "queue_full")}))] == 3
            n.cancel_scope.cancel()


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"garbage\r\n\r\n", 400),
    (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", 200),
])
async def test_metrics_http_errors(request_bytes, status):
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            _, port = await n.start(serve_metrics, Stats(), "127.0.0.1", 0)
            assert (await http(port, request_bytes))[0] == status
            n.cancel_scope.cancel()


async def test_metrics_head_and_slow_client():
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            _, port = await n.start(serve_metrics, Stats(), "127.0.0.1", 0)
            # A client that connects and says nothing must not block a scrape.
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            status, headers, body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 0
            status, _, body = await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and b"fastmqtt_clients_connected" in body
            await idle.aclose()
            n.cancel_scope.cancel()


async def test_metrics_without_start_time():
    """Before the broker sets started_at there is no uptime, and nothing breaks."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            _, port = await n.start(serve_metrics, Stats(), "127.0.0.1", 0)
            _, _, body = await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
            got = samples(body.decode())
            assert not any(name == "fastmqtt_uptime_seconds" for name, _ in got)
            n.cancel_scope.cancel()


@pytest.mark.integration
def test_broker_metrics_endpoint(broker_factory, paho):
    """A running broker's /metrics follows connections and traffic."""
    config = ("persistence = false\nsys_interval = 0\nmetrics_port = 0\n"
              '[[listener]]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 0\n')
    b = broker_factory("fastmqtt", config=config)
    m = b.wait_for_log(r"metrics on http://[\d.]+:(\d+)/metrics", timeout=10, since=b.run_start)
    assert m, b.log()
    url = f"http://127.0.0.1:{m.group(1)}/metrics"

    def scrape():
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            return samples(resp.read().decode())

    e = frozenset()
    before = scrape()
    assert before[("fastmqtt_clients_connected", e)] == 0
    sub = paho(b)
    sub.subscribe("m/#", qos=1)
    pub = paho(b)
    for i in range(5):
        pub.publish("m/x", b"payload-%d" % i, qos=1)
    sub.get_n(5, timeout=10)
    after = scrape()
    assert after[("fastmqtt_clients_connected", e)] == 2
    assert after[("fastmqtt_connections_total", e)] >= 2
    assert after[("fastmqtt_messages_received_total", e)] >= 5
    assert after[("fastmqtt_messages_sent_total", e)] >= 5
    assert after[("fastmqtt_bytes_received_total", e)] > before[("fastmqtt_bytes_received_total", e)]
    assert after[("fastmqtt_subscriptions", e)] == 1
    per_listener = {dict(labels)["listener"]: v for (name, labels), v in after.items()
                    if name == "fastmqtt_listener_connections"}
    assert per_listener == {f"tcp:{b.port}": 2}  # labelled with the real port, not 0
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=5)
    assert exc.value.code == 404
    assert re.search(r"process_cpu_seconds_total", urllib.request.urlopen(url, timeout=5).read().decode())


@pytest.mark.integration
def test_metrics_port_flag(broker_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = broker_factory("fastmqtt", args=["--no-persistence", "--metrics-port", str(port)])
    assert b.wait_for_log(r"metrics on http://", timeout=10, since=b.run_start), b.log()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert samples(body)[("fastmqtt_clients_connected", frozenset())] == 0
