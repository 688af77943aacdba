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
"""

from __future__ import annotations

import dataclasses
import json

import pytest

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
