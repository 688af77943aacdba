"""Broker load benchmark: fastmqtt-broker against Debian Mosquitto, same run.

Each scenario runs once per broker on a freshly started process (so no state
or warmed-up heap carries over) and records its figure; at the end of the
module a table prints both brokers, the ratio and the goal from the issue.
Nothing is asserted about speed.

Short mode (default, and what CI runs with
``--benchmark-min-rounds=1 --benchmark-max-time=0.02 --benchmark-warmup=off``)
scales counts far down so the whole module takes well under two minutes; it
checks the machinery and gives rough ratios. ``FASTMQTT_BENCH_FULL=1`` runs the
real sizes (about a minute per broker)::

    FASTMQTT_BENCH_FULL=1 python -m pytest bench/test_broker.py -q -s

fastmqtt runs with ``--no-persistence`` for the comparison, because Mosquitto
here keeps its state in memory too; the ``persistent`` rows show fastmqtt with
its SQLite store (``sync`` = fsync before every acknowledgement, ``batch``).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import loadgen  # noqa: E402
from fixtures_broker import BrokerProcess  # noqa: E402

FULL = os.environ.get("FASTMQTT_BENCH_FULL") == "1" and os.environ.get("CI", "").lower() != "true"

SIZES = {
    # scenario: (full, short)
    "one_to_one": (200_000, 3_000),
    "fanout_subs": (100, 20),
    "fanout_msgs": (5_000, 100),
    "fanin_pubs": (50, 10),
    "fanin_msgs": (4_000, 200),
    "qos1_msgs": (100_000, 2_000),
    "latency_seconds": (5.0, 0.3),
    "idle_conns": (5_000, 300),
    "connect_clients": (5_000, 300),
}


def size(name):
    full, short = SIZES[name]
    return full if FULL else short


IMPLS = ["mosquitto", "fastmqtt"]

# scenario -> (unit, better, goal text, goal check on ratio/value)
SCENARIOS = {
    "1->1 QoS 0": ("msg/s", "higher", ">= 1.0x Mosquitto"),
    "fan-out 1->N QoS 0": ("deliveries/s", "higher", ">= 1.0x Mosquitto"),
    "fan-in N->1 QoS 0": ("msg/s", "higher", ">= 1.0x Mosquitto"),
    "QoS 1 window 100": ("msg/s", "higher", ">= 1.0x Mosquitto"),
    "latency p50 @5k/s": ("us", "lower", ""),
    "latency p99 @5k/s": ("us", "lower", "<= 2x Mosquitto"),
    "idle memory": ("KiB/conn", "lower", "<= 8 KiB/conn"),
    "connect+subscribe": ("clients/s", "higher", ">= 0.5x Mosquitto"),
}

RESULTS: dict[str, dict[str, float]] = {}
LOSS: dict[str, dict[str, float]] = {}  # throughput scenarios: fraction of deliveries missing
EXTRA_ROWS: list[tuple[str, str, float]] = []  # (label, unit, value) for fastmqtt-only variants


def raise_fd_limit(want: int = 65536) -> None:
    """Idle-connection scenarios need thousands of sockets in the generator and
    the broker (a child inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.fixture
def fresh_broker(tmp_path):
    raise_fd_limit()
    made = []

    def start(impl, args=None, **kw):
        if args is None:
            args = ["--no-persistence"] if impl == "fastmqtt" else []
        if impl == "mosquitto":
            # Connection-level logging like fastmqtt's INFO; not a line per packet.
            kw.setdefault("mosquitto_log_types", ["error", "warning", "notice", "information"])
        b = BrokerProcess(impl, tmp_path / f"{impl}-{len(made)}", args=args, **kw)
        made.append(b)
        return b.start()

    yield start
    for b in made:
        b.kill()


@pytest.fixture(scope="module", autouse=True)
def broker_bench_table(request):
    yield
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print_table(request)
    else:
        print_table(request)


def print_table(request):
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    write = tr.write_line if tr is not None else print
    mode = "FULL" if FULL else "short (CI) mode: tiny counts, rough figures"
    write("")
    write(f"broker benchmark, {mode}")
    header = (f"{'scenario':<22} {'unit':<13} {'mosquitto':>12} {'fastmqtt':>12} {'ratio f/m':>10}"
              f"  {'loss m/f':<13} goal")
    write(header)
    write("-" * len(header))
    for name, (unit, better, goal) in SCENARIOS.items():
        row = RESULTS.get(name, {})
        m, f = row.get("mosquitto"), row.get("fastmqtt")
        ratio = f / m if (m and f is not None) else float("nan")
        fmt = (lambda v: "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:,.2f}"))
        loss = LOSS.get(name)
        loss_txt = (f"{loss.get('mosquitto', 0):.1%}/{loss.get('fastmqtt', 0):.1%}" if loss else "")
        write(f"{name:<22} {unit:<13} {fmt(m):>12} {fmt(f):>12} {ratio:>9.2f}x  {loss_txt:<13} {goal}")
    for label, unit, value in EXTRA_ROWS:
        write(f"{label:<22} {unit:<13} {'':>12} {value:>12,.0f}")


def record(benchmark, scenario, impl, value, info):
    RESULTS.setdefault(scenario, {})[impl] = value
    if "loss" in info:
        LOSS.setdefault(scenario, {})[impl] = info["loss"]
    benchmark.extra_info.update({k: v for k, v in info.items() if isinstance(v, (int, float, str))})
    benchmark.extra_info["figure"] = value


def once(benchmark, fn):
    """Run ``fn`` exactly once under pytest-benchmark's timer and return its result."""
    out = {}

    def run():
        out.update(fn())

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-1to1-qos0")
def test_one_to_one_qos0(benchmark, fresh_broker, impl):
    b = fresh_broker(impl)
    r = once(benchmark, lambda: loadgen.run_throughput(
        b.host, b.port, messages_per_publisher=size("one_to_one"), topic="b/1to1"))
    record(benchmark, "1->1 QoS 0", impl, r["rate"], r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-fanout")
def test_fanout(benchmark, fresh_broker, impl):
    b = fresh_broker(impl)
    r = once(benchmark, lambda: loadgen.run_throughput(
        b.host, b.port, subscribers=size("fanout_subs"), sub_procs=2 if FULL else 1,
        messages_per_publisher=size("fanout_msgs"), topic="b/fanout"))
    record(benchmark, "fan-out 1->N QoS 0", impl, r["rate"], r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-fanin")
def test_fanin(benchmark, fresh_broker, impl):
    b = fresh_broker(impl)
    r = once(benchmark, lambda: loadgen.run_throughput(
        b.host, b.port, publishers=size("fanin_pubs"), pub_procs=2 if FULL else 1,
        messages_per_publisher=size("fanin_msgs"), topic="b/fanin"))
    record(benchmark, "fan-in N->1 QoS 0", impl, r["rate"], r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-qos1-window100")
def test_qos1_window(benchmark, fresh_broker, impl):
    b = fresh_broker(impl)
    r = once(benchmark, lambda: loadgen.run_throughput(
        b.host, b.port, messages_per_publisher=size("qos1_msgs"), qos=1, window=100, topic="b/qos1"))
    record(benchmark, "QoS 1 window 100", impl, r["rate"], r)


@pytest.mark.parametrize("durability", ["sync", "batch"])
@pytest.mark.benchmark(group="broker-qos1-window100")
def test_qos1_window_persistent_fastmqtt(benchmark, fresh_broker, durability):
    # fastmqtt's own store, acknowledging only what is durable (issue 5).
    b = fresh_broker("fastmqtt", args=["--durability", durability])
    r = once(benchmark, lambda: loadgen.run_throughput(
        b.host, b.port, messages_per_publisher=size("qos1_msgs") // 4, qos=1, window=100, topic="b/qos1p"))
    EXTRA_ROWS.append((f"QoS 1 w100 {durability}", "msg/s", r["rate"]))
    benchmark.extra_info.update(r)


LATENCY_ROUNDS = 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-latency-5k")
def test_latency_at_5k(benchmark, fresh_broker, impl):
    # One p99 comes from the slowest 1 % of a run, so one pause of the
    # (virtual) machine moves it a lot: the figure is the median over a few
    # rounds on the same broker, for both brokers alike.
    b = fresh_broker(impl)

    def rounds():
        runs = [loadgen.run_latency(b.host, b.port, rate=5000, seconds=size("latency_seconds"),
                                    tag=f"lat{k}x")
                for k in range(LATENCY_ROUNDS)]
        med = {key: statistics.median(r[key] for r in runs) for key in ("p50_us", "p99_us")}
        return {**runs[-1], **med, "p99_rounds": ", ".join(f"{r['p99_us']:.0f}" for r in runs)}

    r = once(benchmark, rounds)
    record(benchmark, "latency p50 @5k/s", impl, r["p50_us"], r)
    record(benchmark, "latency p99 @5k/s", impl, r["p99_us"], r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-idle-memory")
def test_idle_memory(benchmark, fresh_broker, impl):
    b = fresh_broker(impl)
    r = once(benchmark, lambda: loadgen.run_idle_memory(b.host, b.port, b.proc.pid,
                                                        connections=size("idle_conns")))
    record(benchmark, "idle memory", impl, r["kib_per_conn"], r)


CONNECT_ROUNDS = 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.benchmark(group="broker-connect-rate")
def test_connect_rate(benchmark, fresh_broker, impl):
    # A round lasts under a second, so one busy moment elsewhere on the machine
    # moves it a lot: the figure is the best of a few rounds on the same broker.
    # Each round starts once the broker has gone idle, i.e. has finished with
    # the disconnects of the round before (about 1 s of CPU time at most).
    b = fresh_broker(impl)

    def rounds():
        runs = []
        for k in range(CONNECT_ROUNDS):
            loadgen.wait_idle(b.proc.pid)
            runs.append(loadgen.run_connect_rate(b.host, b.port, clients=size("connect_clients"),
                                                 procs=2, tag=f"cr{k}x"))
        best = max(runs, key=lambda r: r["rate"])
        return {**best, "rates": ", ".join(f"{r['rate']:.0f}" for r in runs)}

    r = once(benchmark, rounds)
    record(benchmark, "connect+subscribe", impl, r["rate"], r)
