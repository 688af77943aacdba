"""Guard against a silent fallback: in a normal install the compiled modules load
and the public modules use them (a failed build would otherwise pass every test
through the pure-Python references, only slower)."""

def test_codec_is_compiled():
    import fastmqtt._codec as compiled
    from fastmqtt import codec

    assert codec.COMPILED is True
    assert codec.IMPLEMENTATION is compiled
    assert codec.encode is compiled.encode
    assert codec.decode is compiled.decode
    assert codec.Decoder is compiled.Decoder
    assert codec.Publish is compiled.Publish
    assert compiled.__file__.endswith((".so", ".pyd"))


def test_trie_is_compiled():
    import fastmqtt._trie as compiled
    from fastmqtt import trie

    assert trie.COMPILED is True
    assert trie.IMPLEMENTATION is compiled
    assert trie.TopicTrie is compiled.TopicTrie
    assert trie.RetainedStore is compiled.RetainedStore
    assert compiled.__file__.endswith((".so", ".pyd"))


def test_package_exports_the_compiled_codec():
    import fastmqtt
    import fastmqtt._codec as compiled

    assert fastmqtt.Publish is compiled.Publish
    assert fastmqtt.Decoder is compiled.Decoder


def test_no_extensions_switch_selects_the_python_references():
    """FASTMQTT_NO_EXTENSIONS=1 is the documented way to run on the references."""
    import os
    import subprocess
    import sys

    code = (
        "import fastmqtt.codec as c, fastmqtt._codec_py as p, fastmqtt.trie as t\n"
        "assert c.COMPILED is False and c.encode is p.encode and c.Decoder is p.Decoder\n"
        "assert t.COMPILED is False and t.IMPLEMENTATION.__name__ == 'fastmqtt._trie_py'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTMQTT_NO_EXTENSIONS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_broker_core_uses_the_compiled_untrack():
    """The core takes queued messages out of the cyclic GC with _gcutil's
    untrack (a no-op stand-in only when the extensions are switched off)."""
    import fastmqtt._gcutil as compiled
    from fastmqtt.broker import core

    assert core._untrack is compiled.untrack
    assert compiled.__file__.endswith((".so", ".pyd"))
