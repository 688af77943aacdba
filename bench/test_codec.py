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

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, float]] = {}

    def add(self, workload: str, operation: str, impl: str, seconds: float, packets: int) -> None:
        if seconds > 0:
            self.rows.setdefault((workload, operation), {})[impl] = packets / seconds

    def render(self) -> str:
        head = (f"{'workload':<20} {'op':<7} {'ours pkt/s':>12} {'python':>11} {'mqtt5':>11} "
                f"{'vs mqtt5':>9} {'vs py':>8}")
        lines = ["", "codec packets/s (median of rounds; higher is better)", head, "-" * len(head)]
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
    table = _Table()
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


@pytest.mark.parametrize(("workload", "operation", "impl"), CASES)
def test_codec(benchmark, codec_table, workload, operation, impl):
    function, argument, packets, check = corpus.case(workload, operation, impl)
    result = benchmark(function, argument)
    check(result)
    stats = benchmark.stats
    if stats is not None:  # None under --benchmark-disable
        codec_table.add(workload, operation, impl, stats.stats.median, packets)
