"""fastmqtt: a compiled MQTT 5.0 / 3.1.1 codec and topic trie, a trio broker and a trio client.

Names are loaded on first use, so ``import fastmqtt`` stays cheap and a
program that only needs the codec never imports trio.
"""

from .enums import PacketType, PropertyId, ReasonCode
from .errors import MalformedPacket

__version__ = "0.1.0"

_LAZY = {
    **{name: "codec" for name in (
        "Will Connect Connack Publish Puback Pubrec Pubrel Pubcomp Subscription Subscribe "
        "Suback Unsubscribe Unsuback Pingreq Pingresp Disconnect Auth encode decode "
        "PublishTemplate Decoder").split()},
    "TopicTrie": "trie",
    "RetainedStore": "trie",
    "Client": "client",
    "Message": "client",
}

__all__ = ["PacketType", "PropertyId", "ReasonCode", "MalformedPacket", "__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmqtt' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
