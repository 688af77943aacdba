"""The topic trie in use: the compiled ``_trie`` unless FASTMQTT_NO_EXTENSIONS=1
or it failed to build, in which case the pure-Python ``_trie_py`` (same API)."""

import os

_NAMES = ["TopicTrie", "RetainedStore"]

if os.environ.get("FASTMQTT_NO_EXTENSIONS") == "1":
    from . import _trie_py as _impl

    COMPILED = False
else:
    try:
        from . import _trie as _impl

        COMPILED = True
    except ImportError:  # pragma: no cover
        from . import _trie_py as _impl

        COMPILED = False

globals().update({name: getattr(_impl, name) for name in _NAMES})
IMPLEMENTATION = _impl

__all__ = [*_NAMES, "COMPILED", "IMPLEMENTATION"]
