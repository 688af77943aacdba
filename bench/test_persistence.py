"""Persistence benchmark: QoS 1 throughput into persistent sessions with the
SQLite store in ``sync`` and ``batch`` durability, next to in-memory storage,
and as a ratio to the in-memory figure.

Three levels, each measured side by side in the same run:

* **store**: the broker's store calls without a network. 50 trio tasks play
  publishers; each message is ``put_message`` plus two ``add_delivery`` (one
  persistent subscriber offline, one online), then ``await durable(mark())``
  (the PUBACK), then the online subscriber's ack (``update_delivery`` +
  ``remove_delivery``). Implementations: ``NullStore`` (in memory, nothing
  kept: the baseline), ``MemoryStore``, SQLite ``batch`` and ``sync``. The
  SQLite runs end with ``compact()``: folding the log into the tables (which
  the store otherwise does in the background about once a second) is timed
  too. Fifty publishers in lock step make this level latency bound (each
  round waits for a commit, and in ``sync`` an fsync); its ratios measure the
  store's cost against a store that does nothing.
* **broker**: ``fastmqtt-broker`` as a subprocess with ``--no-persistence``,
  ``--durability batch`` and ``--durability sync``; an offline persistent QoS 1
  subscriber; 4 publisher connections each keeping 64 QoS 1 PUBLISHes in
  flight, counting PUBACKs. Every message is queued (and stored) for the
  subscriber; rounds are long enough (200,000 messages) that the store's
  background compactions fall within them, as under sustained load.
  Next to them, ``floor``: the broker with a store that claims to be
  persistent but keeps nothing, every ticket durable at once
  (``floor_broker.py``): the core's own cost of persistent sessions, the
  ceiling for any store.
* **online**: the same broker and publishers, with the persistent subscriber
  connected and acknowledging as it goes (each message stored for it, then
  removed on its PUBACK: a chat client that is online), timed until it has
  every message.

* **paired**: the in-memory, ``batch`` and ``sync`` brokers side by side,
  offline and online, one round on each in turn (the order rotating), for
  several rounds; each round's ratio is taken against the in-memory round
  next to it, and the median of those ratios printed. On a shared machine
  whose speed drifts over tens of seconds, rounds run next to each other
  see the same machine: this ratio moves less between runs than the ratio
  of the separate medians above. Every round has fresh brokers (started,
  warmed up with 4,000 messages and killed outside the timing) and is
  600,000 messages long, several compaction periods: no broker folds its
  log during another's round, and the folding a round leaves past its end
  is a small part of it.

Speed is never asserted; a table of messages/s and ratios is printed at the
end. With ``CI=true`` the workloads are scaled down.

Short (CI) run::

    python -m pytest bench/test_persistence.py -q --benchmark-min-rounds=1 \
        --benchmark-max-time=0.02 --benchmark-warmup=off
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import trio

from fastmqtt.broker.interfaces import DeliveryRecord, NullStore
from fastmqtt.codec import Connect, Decoder, Puback, Publish, Subscribe, Subscription, encode
from fastmqtt.store import MemoryStore, SqliteStore

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STORE_MESSAGES = 2_000 if CI else 20_000
# Full mode: rounds of 200,000 messages (one to two seconds each with a
# store), so the store's compactions (about one a second, folding the log
# into the tables) fall inside every timed round, as under sustained load;
# shorter rounds could miss them and overstate the persistent figures. Five
# rounds, the median: on a shared machine one round can be off by a fifth.
BROKER_MESSAGES = 2_000 if CI else 200_000
ROUNDS = 1 if CI else 5
PUBLISHERS = 50
PAYLOAD = b'{"type":"post","id":"0123456789abcdef","text":"hello from the benchmark"}'

STORE_IMPLS = ["null", "memory", "sqlite-batch", "sqlite-sync"]
BROKER_IMPLS = ["memory", "floor", "batch", "sync"]
FLOOR_BROKER = os.path.join(os.path.dirname(__file__), "floor_broker.py")


def _loop_cpu(pid: int) -> float | None:
    """CPU seconds used so far by the broker's main thread (its event loop;
    Linux only): steadier than throughput on a shared machine, and where the
    store's cost per message shows (the log writer and compactor run
    elsewhere)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Table:
    def __init__(self) -> None:
        self.rates: dict[tuple[str, str], float] = {}
        self.loop_us: dict[tuple[str, str], float] = {}
        self.paired: dict[tuple[str, str], list[float]] = {}

    def add(self, level: str, impl: str, seconds: float, messages: int) -> None:
        if seconds > 0:
            self.rates[(level, impl)] = messages / seconds

    def add_loop_cpu(self, level: str, impl: str, samples: list[float]) -> None:
        """Median event-loop CPU per message (µs) over the rounds."""
        if samples:
            self.loop_us[(level, impl)] = sorted(samples)[len(samples) // 2]

    def add_paired(self, level: str, impl: str, ratios: list[float]) -> None:
        """Per-round ratios to the in-memory round next to each."""
        self.paired[(level, impl)] = sorted(ratios)

    def render(self) -> str:
        lines = ["", "persistent QoS 1 throughput (median of rounds; higher is better;",
                 "loop: the broker's event-loop CPU per message, lower is better)",
                 f"{'level':<8} {'storage':<14} {'msgs/s':>12} {'vs in-memory':>13}"
                 f" {'loop µs/msg':>12}",
                 "-" * 63]
        for level, impls, base in (("store", STORE_IMPLS, "null"),
                                   ("broker", BROKER_IMPLS, "memory"),
                                   ("online", BROKER_IMPLS, "memory")):
            ref = self.rates.get((level, base))
            for impl in impls:
                rate = self.rates.get((level, impl))
                if rate is None:
                    continue
                ratio = f"{rate / ref:>12.2f}x" if ref else f"{'-':>13}"
                loop = self.loop_us.get((level, impl))
                loop_s = f"{loop:>12.2f}" if loop is not None else f"{'-':>12}"
                lines.append(f"{level:<8} {impl:<14} {rate:>12,.0f} {ratio} {loop_s}")
        if self.paired:
            lines += ["", "paired rounds: each round's ratio to the in-memory round next to it",
                      f"{'level':<8} {'storage':<14} {'median':>8} {'quartiles':>13} {'rounds':>7}",
                      "-" * 54]
            for (level, impl), r in self.paired.items():
                q = len(r) // 4
                lines.append(f"{level:<8} {impl:<14} {r[len(r) // 2]:>7.2f}x"
                             f" {r[q]:>6.2f}-{r[-q - 1]:.2f} {len(r):>7}")
        return "\n".join(lines)


@pytest.fixture(scope="module")
def table(request):
    t = _Table()
    yield t
    if t.rates or t.paired:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        with capture.global_and_fixture_disabled():
            for line in t.render().splitlines():
                reporter.write_line(line)


# ------------------------------------------------------------------ store level

def make_store(impl: str, path: str):
    if impl == "null":
        return NullStore()
    if impl == "memory":
        return MemoryStore()
    return SqliteStore(path, durability=impl.split("-")[1], batch_interval_ms=10)


async def store_workload(store, n_messages: int) -> int:
    store.put_session("offline", 0xFFFFFFFF, 5, 1.0)
    store.put_session("online", 0xFFFFFFFF, 5, None)
    publish = Publish("chat/acme/channel/42", PAYLOAD, 1, False, False, 1)
    counter = iter(range(1, n_messages + 1))
    acked = 0

    async def publisher():
        nonlocal acked
        for msg_id in counter:
            store.put_message(msg_id, publish, None)
            store.add_delivery("offline", DeliveryRecord(msg_id, 1))
            store.add_delivery("online", DeliveryRecord(msg_id, 1, msg_id & 0xFFFF or 1, "sent"))
            await store.durable(store.mark())  # the PUBACK to the publisher
            acked += 1
            # The online subscriber's PUBACK arrives.
            store.remove_delivery("online", msg_id)

    async with trio.open_nursery() as nursery:
        for _ in range(PUBLISHERS):
            nursery.start_soon(publisher)
    await store.durable(store.mark())
    if hasattr(store, "compact"):
        # The SQLite store appends to its log and folds it into the tables
        # later (about once a second); the timed run includes that work.
        await trio.to_thread.run_sync(store.compact)
    return acked


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.benchmark(group="persistence store"))
                                  for i in STORE_IMPLS])
def test_store_throughput(benchmark, table, impl):
    dirs: list[str] = []
    opened: list = []

    def setup():
        for s in opened:
            s.close() if hasattr(s, "close") else None
        opened.clear()
        d = tempfile.mkdtemp(prefix="fastmqtt-bench-")
        dirs.append(d)
        store = make_store(impl, d)
        store.open()
        opened.append(store)
        return (store,), {}

    def run(store):
        return trio.run(store_workload, store, STORE_MESSAGES)

    try:
        acked = benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        for s in opened:
            s.close() if hasattr(s, "close") else None
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert acked == STORE_MESSAGES
    if benchmark.stats is not None:
        table.add("store", impl, benchmark.stats.stats.median, STORE_MESSAGES)


# ----------------------------------------------------------------- broker level

LISTENING = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)")


class BrokerProc:
    def __init__(self, impl: str, data_dir: str) -> None:
        args = {"memory": ["--no-persistence"], "floor": []}.get(impl, ["--durability", impl])
        # floor: a store that is "persistent" but keeps nothing (floor_broker.py)
        entry = [FLOOR_BROKER] if impl == "floor" else ["-m", "fastmqtt.broker"]
        # No queue limit: every message must really be queued (and stored) for
        # the offline subscriber, not dropped as "queue full".
        os.makedirs(data_dir, exist_ok=True)
        conf = os.path.join(data_dir, "bench.toml")
        with open(conf, "w") as f:
            f.write("max_queued_messages = 0\nmax_queued_bytes = 0\n")
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "-c", conf, "--host", "127.0.0.1",
             "-p", "0", "--data-dir", data_dir, "--sys-interval", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.port = None
        deadline = time.monotonic() + 20
        for line in self.proc.stdout:
            m = LISTENING.search(line)
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            self.close()
            raise RuntimeError("broker did not start")
        # Keep draining the log so the broker never blocks on a full pipe.
        threading.Thread(target=lambda: [print(l, end="") if "persistence" in l else None for l in self.proc.stdout], daemon=True).start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _session(port: int, client_id: str, clean: bool, expiry: int | None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    props = {0x11: expiry} if expiry else None
    sock.sendall(encode(Connect(client_id, clean, 60, properties=props), 5))
    dec = Decoder(5)
    return sock, dec


def _make_persistent_subscriber(port: int) -> None:
    """Session "bench-sub" (expiry 1 h) subscribed to bench/persist at QoS 1,
    then disconnected."""
    sock, dec = _session(port, "bench-sub", False, 3600)
    _read_packets(sock, dec, 2, 1)
    sock.sendall(encode(Subscribe(1, [Subscription("bench/persist", 1)]), 5))
    _read_packets(sock, dec, 9, 1)
    sock.close()


def _read_packets(sock, dec, n_type: int, count: int) -> list:
    got = []
    while len(got) < count:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("broker closed the connection")
        got += [p for p in dec.feed(data) if p.packet_type == n_type]
    return got


def _publisher(port: int, index: int, n: int, window: int, errors: list) -> None:
    try:
        sock, dec = _session(port, f"bench-pub-{index}", True, None)
        _read_packets(sock, dec, 2, 1)
        sent = acked = 0
        pid = 0
        while acked < n:
            burst = []
            while sent < n and sent - acked < window:
                pid = pid % 65535 + 1
                burst.append(encode(Publish("bench/persist", PAYLOAD, 1, False, False, pid), 5))
                sent += 1
            if burst:
                sock.sendall(b"".join(burst))
            acked += len(_read_packets(sock, dec, 4, 1)) if acked < sent else 0
            # Drain whatever else is already there without blocking for more.
            sock.setblocking(False)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed")
                    acked += sum(1 for p in dec.feed(data) if p.packet_type == 4)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
        sock.close()
    except Exception as e:  # reported by the main thread
        errors.append(e)


def broker_run(port: int, n_messages: int) -> None:
    per = n_messages // 4
    errors: list = []
    threads = [threading.Thread(target=_publisher, args=(port, i, per, 64, errors))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.benchmark(group="persistence broker"))
                                  for i in BROKER_IMPLS])
def test_broker_throughput(benchmark, table, impl, tmp_path):
    broker = BrokerProc(impl, str(tmp_path / "data"))
    try:
        # An offline persistent QoS 1 subscriber: every message must be stored.
        _make_persistent_subscriber(broker.port)
        n = BROKER_MESSAGES
        loop: list[float] = []

        def run():
            c0 = _loop_cpu(broker.proc.pid)
            broker_run(broker.port, n)
            c1 = _loop_cpu(broker.proc.pid)
            if c0 is not None and c1 is not None:
                loop.append(1e6 * (c1 - c0) / n)

        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
        if benchmark.stats is not None:
            table.add("broker", impl, benchmark.stats.stats.median, n)
            table.add_loop_cpu("broker", impl, loop)
    finally:
        broker.close()


def _acking_subscriber(port: int, n: int, ready, done) -> None:
    """In its own process (so it never competes with the publisher threads
    for a GIL): resume the persistent session, read ``n`` QoS 1 PUBLISHes and
    acknowledge them (one PUBACK each, sent per read), then report."""
    try:
        sock, dec = _session(port, "bench-sub", False, 3600)
        _read_packets(sock, dec, 2, 1)
        ready.put(True)
        got = 0
        while got < n:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the subscriber")
            acks = [encode(Puback(p.packet_id), 5) for p in dec.feed(data)
                    if p.packet_type == 3]
            if acks:
                sock.sendall(b"".join(acks))
                got += len(acks)
        sock.close()
        done.put(None)
    except Exception as e:
        done.put(repr(e))


def _start_acking(ctx, port: int, n: int):
    """Start :func:`_acking_subscriber` in its own process and wait (untimed)
    until it has resumed its session. Returns (process, its done queue)."""
    ready, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_acking_subscriber, args=(port, n, ready, done), daemon=True)
    proc.start()
    ready.get(timeout=60)
    return proc, done


def _end_acking(proc, err) -> None:
    """Reap the subscriber's process; raise what it reported."""
    proc.join(30)
    if err:
        raise RuntimeError(f"subscriber failed: {err}")


@pytest.mark.parametrize("impl", [pytest.param(i, marks=pytest.mark.benchmark(group="persistence online"))
                                  for i in BROKER_IMPLS])
def test_broker_throughput_online(benchmark, table, impl, tmp_path):
    # The same publishers, but the persistent subscriber is connected and
    # acknowledges as it goes (a chat client that is online): each message
    # is stored for it and removed again once it has its PUBACK. Timed until
    # the subscriber has every message.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    broker = BrokerProc(impl, str(tmp_path / "data"))
    try:
        _make_persistent_subscriber(broker.port)
        n = BROKER_MESSAGES

        def setup():
            # Untimed: the subscriber's process starts and resumes its session.
            return _start_acking(ctx, broker.port, n), {}

        loop: list[float] = []

        def run(proc, done):
            c0 = _loop_cpu(broker.proc.pid)
            broker_run(broker.port, n)
            err = done.get(timeout=300)
            c1 = _loop_cpu(broker.proc.pid)
            _end_acking(proc, err)
            if c0 is not None and c1 is not None:
                loop.append(1e6 * (c1 - c0) / n)

        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
        if benchmark.stats is not None:
            table.add("online", impl, benchmark.stats.stats.median, n)
            table.add_loop_cpu("online", impl, loop)
    finally:
        broker.close()


PAIRED_IMPLS = ["memory", "batch", "sync"]
# Fresh brokers for every round, and rounds several compaction periods long:
# a broker left running between rounds folds what it was sent during the
# next broker's round (taking CPU from it), and a short round leaves the
# last second's folding past its end, both of which flattered or hurt a
# store by chance.
PAIRED_MESSAGES = 2_000 if CI else 600_000
PAIRED_WARMUP = 200 if CI else 4_000
PAIRED_ROUNDS = 1 if CI else 7


@pytest.mark.benchmark(group="persistence paired")
@pytest.mark.timeout(1800)  # full mode: 42 rounds of 600,000 messages
def test_broker_paired_ratios(benchmark, table, tmp_path):
    """The three brokers side by side, offline and online, a round on each
    in turn (a fresh broker each, started, warmed up and killed untimed):
    the ratio of ``batch`` and ``sync`` to in memory, per round."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    n = PAIRED_MESSAGES

    def offline(port: int) -> float:
        broker_run(port, PAIRED_WARMUP)
        t0 = time.perf_counter()
        broker_run(port, n)
        return n / (time.perf_counter() - t0)

    def online(port: int) -> float:
        proc, done = _start_acking(ctx, port, PAIRED_WARMUP + n)  # untimed
        broker_run(port, PAIRED_WARMUP)
        t0 = time.perf_counter()
        broker_run(port, n)
        err = done.get(timeout=600)
        rate = n / (time.perf_counter() - t0)
        _end_acking(proc, err)
        return rate

    def measure(level: str, impl: str, i: int) -> float:
        data = tmp_path / f"{level}-{impl}-{i}"
        broker = BrokerProc(impl, str(data))
        try:
            _make_persistent_subscriber(broker.port)
            return (offline if level == "offline" else online)(broker.port)
        finally:
            broker.close()
            shutil.rmtree(data, ignore_errors=True)

    ratios: dict[tuple[str, str], list[float]] = {}

    def run():
        for level in ("offline", "online"):
            for i in range(PAIRED_ROUNDS):
                k = i % len(PAIRED_IMPLS)
                order = PAIRED_IMPLS[k:] + PAIRED_IMPLS[:k]  # rotating
                rates = {impl: measure(level, impl, i) for impl in order}
                for impl in PAIRED_IMPLS[1:]:
                    ratios.setdefault((level, impl), []).append(rates[impl] / rates["memory"])

    benchmark.pedantic(run, rounds=1, iterations=1)
    for (level, impl), r in ratios.items():
        table.add_paired(level, impl, r)
