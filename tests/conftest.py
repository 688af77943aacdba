"""Shared fixtures. Each area keeps its own fixtures in tests/fixtures_<area>.py
and lists it in ``pytest_plugins`` below."""

import importlib
import os

import pytest

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
