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
