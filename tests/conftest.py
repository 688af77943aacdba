"""Shared fixtures. Each area keeps its own fixtures in tests/fixtures_<area>.py
and lists it in ``pytest_plugins`` below."""

import importlib
import os

import pytest
from hypothesis import settings

# Hypothesis profiles. Every property test states its own example count, so a
# profile changes only what a test leaves unset:
#   ci  (CI=true): no per-example deadline (a shared 2-core runner makes wall
#       clock timings meaningless), no example database (a fresh clone has none
#       to replay and nothing would keep it), and a failure prints the
#       @reproduce_failure blob so it can be replayed from the CI log alone.
# HYPOTHESIS_PROFILE=name picks one explicitly (e.g. "ci" locally).
settings.register_profile("ci", deadline=None, database=None, print_blob=True)
_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _CI else "default"))

pytest_plugins = [
    name
    for name in ("fixtures_broker", "fixtures_clients")
    if os.path.exists(os.path.join(os.path.dirname(__file__), name + ".py"))
]


def _impls(kind):
    """(id, module) pairs: the compiled module and the pure-Python reference."""
    return [(f"{kind}-c", f"fastmqtt._{kind}"), (f"{kind}-py", f"fastmqtt._{kind}_py")]


@pytest.fixture(params=[m for _, m in _impls("codec")], ids=[i for i, _ in _impls("codec")])
def codec(request):
    """Each codec implementation in turn; a missing compiled module is a failure."""
    return importlib.import_module(request.param)


@pytest.fixture(params=[m for _, m in _impls("trie")], ids=[i for i, _ in _impls("trie")])
def trie(request):
    """Each trie implementation in turn; a missing compiled module is a failure."""
    return importlib.import_module(request.param)
