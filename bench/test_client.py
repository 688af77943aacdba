"""Client-side hot paths: sans-IO protocol, router and chat envelope.

Each group pairs our code with a baseline in the same run: the protocol on the
compiled codec vs on the pure-Python reference codec, the trie-backed router
vs a naive scan of every filter, and the chat envelope codec vs a naive
``dataclasses.asdict`` + ``json.dumps``. Nothing is asserted about speed;
results are checked for correctness and a table of operations/s with ratios is
printed at the end.

    python -m pytest bench/test_client.py
    python -m pytest bench/test_client.py -q --benchmark-min-rounds=1 \
        --benchmark-max-time=0.02 --benchmark-warmup=off      # short run

The end-to-end group publishes QoS 1 messages to a Mosquitto process with
ten in flight and waits for every PUBACK: fastmqtt.Client against
paho-mqtt 2.x (threaded). ``FASTMQTT_BENCH_FULL=1`` uses 20,000 messages
instead of 1,000.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pytest
import trio

from fastmqtt import _codec, _codec_py
from fastmqtt.chat import ChatMessage, ChatTopics, decode_event, encode_event
from fastmqtt.client import Message
from fastmqtt.client import protocol as protocol_mod
from fastmqtt.client.router import Router
from fastmqtt.enums import PropertyId
from fastmqtt.topics import topic_matches

N = 1000
_results: dict[tuple[str, str], float] = {}  # (group, impl) -> operations/s


def _record(benchmark, group: str, impl: str, ops: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    if median > 0:
        _results[(group, impl)] = ops / median


@pytest.fixture(scope="module", autouse=True)
def _table(request):
    yield
    groups = sorted({g for g, _ in _results})
    if not groups:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    lines = [""]
    write = lines.append
    write("")
    write("client hot paths, operations/s (median of rounds; higher is better)")
    head = f"{'group':<22} {'ours':>12} {'baseline':>12} {'ratio':>7}"
    write(head)
    write("-" * len(head))
    for g in groups:
        ours, base = _results.get((g, "ours")), _results.get((g, "baseline"))
        ratio = f"{ours / base:6.1f}x" if ours and base else "     -"
        write(f"{g:<22} {ours or 0:>12,.0f} {base or 0:>12,.0f} {ratio:>7}")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


# ------------------------------------------------------------------ protocol

CHAT_PAYLOAD = encode_event(ChatMessage(message_id="m-1", grouping_id="alice~bob",
                                        text="Lunch at 12:30? I booked the usual place.",
                                        sender="alice"))


def _connected(codec_mod):
    protocol_mod.codec = codec_mod
    proto = protocol_mod.ClientProtocol("bench", version=5)
    proto.start(0.0)
    proto.receive_data(codec_mod.encode(codec_mod.Connack(False, 0), 5), 0.0)
    return proto


def _inbound_stream(codec_mod) -> bytes:
    props = {PropertyId.USER_PROPERTY: (("app", "chat"),)}
    return b"".join(
        codec_mod.encode(codec_mod.Publish(f"chat/acme/dm/g{i % 50}", CHAT_PAYLOAD, 1, False,
                                           False, i % 65535 + 1, props), 5)
        for i in range(N))


@pytest.mark.benchmark(group="protocol inbound qos1")
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_protocol_inbound(benchmark, impl):
    codec_mod = _codec if impl == "ours" else _codec_py
    stream = _inbound_stream(codec_mod)

    def run():
        proto = _connected(codec_mod)
        events = proto.receive_data(stream, 1.0)
        acks = proto.data_to_send()
        return events, acks

    try:
        events, acks = benchmark(run)
    finally:
        protocol_mod.codec = __import__("fastmqtt.codec", fromlist=["x"])
    assert len(events) == N and len(acks) == 4 * N
    _record(benchmark, "protocol inbound qos1", impl, N)


@pytest.mark.benchmark(group="protocol outbound qos1")
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_protocol_outbound(benchmark, impl):
    codec_mod = _codec if impl == "ours" else _codec_py

    def run():
        proto = _connected(codec_mod)
        out = []
        for i in range(N):
            out.append(proto.publish("chat/acme/dm/alice~bob", CHAT_PAYLOAD, 1)[1])
        acks = b"".join(codec_mod.encode(codec_mod.Puback(pid), 5) for pid in range(1, N + 1))
        return out, proto.receive_data(acks, 1.0)

    try:
        out, done = benchmark(run)
    finally:
        protocol_mod.codec = __import__("fastmqtt.codec", fromlist=["x"])
    assert len(out) == N and len(done) == N
    _record(benchmark, "protocol outbound qos1", impl, N)


# -------------------------------------------------------------------- router

TOPICS = ChatTopics("chat")
FILTERS = ([TOPICS.dm("acme", f"g{i}") for i in range(400)]
           + [TOPICS.channel("acme", f"c{i}") for i in range(400)]
           + [TOPICS.filter("acme", "presence"), "chat/acme/#", "chat/+/dm/+"])
MESSAGES = [Message(TOPICS.dm("acme", f"g{i % 500}"), b"") for i in range(N)]


@pytest.mark.benchmark(group="router dispatch")
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_router_dispatch(benchmark, impl):
    if impl == "ours":
        router = Router()
        streams = [router.stream(f, buffer=10) for f in FILTERS]

        def run():
            return sum(router.dispatch(m) for m in MESSAGES)
    else:
        def run():
            return sum(1 for m in MESSAGES for f in FILTERS if topic_matches(f, m.topic))

    matched = benchmark(run)
    assert matched == N * 2 + sum(1 for m in MESSAGES if int(m.topic.rsplit("g", 1)[1]) < 400)
    _record(benchmark, "router dispatch", impl, N)


# ------------------------------------------------------------------ envelope

EVENT = decode_event(CHAT_PAYLOAD)


def _naive_encode(ev) -> bytes:
    d = dataclasses.asdict(ev)
    return json.dumps({"type": ev.TYPE, "id": d.pop("id"), "ts": d.pop("ts"),
                       "from": d.pop("sender"), "data": d}).encode()


def _naive_decode(data: bytes):
    obj = json.loads(data)
    return ChatMessage(id=obj["id"], ts=obj["ts"], sender=obj["from"], **obj["data"])


@pytest.mark.benchmark(group="envelope encode")
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_envelope_encode(benchmark, impl):
    fn = encode_event if impl == "ours" else _naive_encode
    out = benchmark(lambda: [fn(EVENT) for _ in range(N)])
    assert decode_event(out[0]) == EVENT
    _record(benchmark, "envelope encode", impl, N)


@pytest.mark.benchmark(group="envelope decode")
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_envelope_decode(benchmark, impl):
    fn = decode_event if impl == "ours" else _naive_decode
    out = benchmark(lambda: [fn(CHAT_PAYLOAD) for _ in range(N)])
    assert out[0] == EVENT
    _record(benchmark, "envelope decode", impl, N)


# --------------------------------------------------------------- end to end

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
E2E_N = 20_000 if os.environ.get("FASTMQTT_BENCH_FULL") == "1" else 1_000
WINDOW = 10


@pytest.fixture(scope="module")
def mosquitto_proc(tmp_path_factory):
    from fixtures_broker import BrokerProcess

    b = BrokerProcess("mosquitto", tmp_path_factory.mktemp("bench-mosquitto"))
    b.start()
    yield b
    b.kill()


def _ours_qos1(broker) -> int:
    from fastmqtt.client import Client

    async def main():
        async with Client(broker.host, broker.port, version=5) as c:
            done = 0

            async def worker(n):
                nonlocal done
                for _ in range(n):
                    r = await c.publish("bench/e2e", CHAT_PAYLOAD, qos=1)
                    done += r is not None

            async with trio.open_nursery() as nursery:
                for _ in range(WINDOW):
                    nursery.start_soon(worker, E2E_N // WINDOW)
            return done

    return trio.run(main)


def _paho_qos1(broker) -> int:
    import paho.mqtt.client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(WINDOW)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        infos = [c.publish("bench/e2e", CHAT_PAYLOAD, qos=1) for _ in range(E2E_N)]
        deadline = time.monotonic() + 120
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        return sum(1 for info in infos if info.is_published())
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.benchmark(group="e2e qos1 publish")
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_e2e_qos1_publish_mosquitto(benchmark, mosquitto_proc, impl):
    fn = _ours_qos1 if impl == "ours" else _paho_qos1
    acked = benchmark.pedantic(fn, args=(mosquitto_proc,), rounds=1, iterations=1)
    assert acked == E2E_N
    _record(benchmark, "e2e qos1 (vs paho)", impl, E2E_N)
