"""Codec benchmark: our compiled codec vs the pure-Python reference vs ``mqtt5`` (Rust).

Every workload x operation is one pytest-benchmark group holding the three
implementations, so each run compares them on the same machine at the same
moment. Speed is never asserted; results are checked for correctness (a fast
wrong answer fails) and a table of packets/s and ratios is printed at the end
of the session.

Full run::

    python -m pytest bench/test_codec.py

Short (CI) run, still prints the table::

    python -m pytest bench -q --benchmark-min-rounds=1 --benchmark-max-time=0.02 \
        --benchmark-warmup=off
"""

from __future__ import annotations

import pytest

import codec_corpus as corpus
from fastmqtt import codec as selected

CASES = [
    pytest.param(workload, operation, impl,
                 marks=pytest.mark.benchmark(group=f"codec {workload} {operation}"),
                 id=f"{workload}-{operation}-{impl}")
    for workload in corpus.WORKLOADS
    for operation in corpus.OPERATIONS
    for impl in corpus.IMPLS
]


class _Table:
    """Median seconds per call collected from each benchmark, printed as
    packets/s with ratios (ours / mqtt5, ours / pure Python). The median, not
    the mean: the machine is shared and a few preempted rounds would otherwise
    decide the ratio."""

    def __init__(self, short: bool = False) -> None:
        self.rows: dict[tuple[str, str], dict[str, float]] = {}
        self.short = short

    def add(self, workload: str, operation: str, impl: str, seconds: float, packets: int) -> None:
        if seconds > 0:
            self.rows.setdefault((workload, operation), {})[impl] = packets / seconds

    def render(self) -> str:
        head = (f"{'workload':<20} {'op':<7} {'ours pkt/s':>12} {'python':>11} {'mqtt5':>11} "
                f"{'vs mqtt5':>9} {'vs py':>8}")
        lines = ["", "codec packets/s (median of rounds; higher is better)", head, "-" * len(head)]
        if self.short:
            lines.insert(2, "(short run: few rounds, the batch rows especially are only indicative)")
        for workload in corpus.WORKLOADS:
            for operation in corpus.OPERATIONS:
                rates = self.rows.get((workload, operation))
                if not rates:
                    continue
                ours, py, theirs = (rates.get(i) for i in corpus.IMPLS)

                def fmt(rate):
                    return f"{rate:>11,.0f}" if rate else f"{'-':>11}"

                def ratio(a, b):
                    return f"{a / b:>8.2f}x" if a and b else f"{'-':>9}"

                lines.append(f"{workload:<20} {operation:<7} {fmt(ours):>12} {fmt(py)} "
                             f"{fmt(theirs)} {ratio(ours, theirs)} {ratio(ours, py):>8}")
        return "\n".join(lines)


@pytest.fixture(scope="session")
def codec_table(request):
    max_time = float(request.config.getoption("benchmark_max_time", 1.0) or 1.0)
    table = _Table(short=max_time < 0.1)
    yield table
    if table.rows:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        with capture.global_and_fixture_disabled():
            for line in table.render().splitlines():
                reporter.write_line(line)


def test_compiled_codec_loaded():
    """The numbers below are only ours if the extension is what got imported."""
    assert selected.COMPILED, "fastmqtt._codec did not load; rebuild with pip install -e ."


def _plan(request, function, argument) -> tuple[int, int]:
    """(iterations, rounds) so that one round lasts about 20 us and the rounds
    fill ``--benchmark-max-time``.

    pytest-benchmark's own calibration sometimes settles on one call per round
    for sub-microsecond functions, and then the timer's own cost (tens of ns)
    is part of every sample and squeezes the ratios; fixing the iterations
    per round from a quick estimate keeps that cost below 1%.
    """
    from time import perf_counter

    function(argument)
    n = 1
    while True:
        start = perf_counter()
        for _ in range(n):
            function(argument)
        elapsed = perf_counter() - start
        if elapsed > 2e-4 or n >= 1 << 16:
            break
        n *= 4
    per_call = max(elapsed / n, 1e-9)
    iterations = max(1, min(100_000, int(20e-6 / per_call)))
    max_time = float(request.config.getoption("benchmark_max_time", 1.0) or 1.0)
    min_rounds = int(request.config.getoption("benchmark_min_rounds", 5) or 1)
    rounds = int(max_time / (iterations * per_call))
    return iterations, max(min_rounds, min(rounds, 2000))


@pytest.mark.parametrize(("workload", "operation", "impl"), CASES)
def test_codec(benchmark, codec_table, request, workload, operation, impl):
    function, argument, packets, check = corpus.case(workload, operation, impl)
    check(function(argument))
    iterations, rounds = _plan(request, function, argument)
    result = benchmark.pedantic(function, args=(argument,), iterations=iterations,
                                rounds=rounds)
    check(result)
    stats = benchmark.stats
    if stats is not None:  # None under --benchmark-disable
        codec_table.add(workload, operation, impl, stats.stats.median, packets)
