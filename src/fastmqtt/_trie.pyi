"""Type stubs for ``fastmqtt._trie`` (compiled) — also the contract that the
pure-Python reference ``fastmqtt._trie_py`` implements name for name.

Invalid filters and topics raise ``fastmqtt.errors.MalformedPacket`` (reason
0x8F Topic Filter invalid / 0x90 Topic Name invalid / 0x82 for no-local on a
shared subscription [MQTT-3.8.3-4]).
"""

from typing import Any, Callable, Hashable, Sequence

Delivery = tuple[Hashable, int, bool, tuple[int, ...]]
# (subscriber, qos, retain_as_published, subscription_ids)

SharePolicy = Callable[[str, str, Sequence[Hashable]], Hashable | None]
# (share_name, topic_filter, members in subscription order) -> chosen member,
# or None to skip the group for this message.

class TopicTrie:
    def __init__(self) -> None: ...
    def subscribe(self, subscriber: Hashable, topic_filter: str, qos: int = 0,
                  no_local: bool = False, retain_as_published: bool = False,
                  retain_handling: int = 0, subscription_id: int = 0) -> bool:
        """Add or replace [MQTT-3.8.4-3]; True when the subscription is new.
        ``$share/{name}/{filter}`` joins a shared group."""
    def unsubscribe(self, subscriber: Hashable, topic_filter: str) -> bool: ...
    def remove_subscriber(self, subscriber: Hashable) -> int:
        """Drop every subscription of ``subscriber``; returns how many."""
    def subscriptions(self, subscriber: Hashable) -> list[tuple[str, int, bool, bool, int, int]]:
        """(topic_filter, qos, no_local, retain_as_published, retain_handling, subscription_id)."""
    def match(self, topic: str, publisher: Hashable | None = None) -> list[Delivery]:
        """One delivery per subscriber over its normal subscriptions, merged: the
        highest QoS, retain_as_published if any says so, every non-zero
        subscription id [MQTT-3.3.4-3..5]; subscriptions with no_local are
        skipped when ``publisher == subscriber``. Then one delivery per matching
        shared group (policy-chosen member), listed after the normal ones."""
    def set_share_policy(self, policy: str | SharePolicy) -> None:
        """"round_robin" (default), "random", or a callable."""
    def node_count(self) -> int:
        """Trie nodes below the root, shared-group nodes not counted (introspection:
        emptied nodes are pruned, so unsubscribing everything returns it to 0)."""
    def __len__(self) -> int: ...

class RetainedStore:
    """Latest retained message per topic; values are opaque objects."""
    def __init__(self) -> None: ...
    def set(self, topic: str, message: Any, expires_at: float | None = None) -> None: ...
    def delete(self, topic: str) -> bool: ...
    def get(self, topic: str, now: float | None = None) -> Any | None: ...
    def match(self, topic_filter: str, now: float | None = None) -> list[tuple[str, Any]]:
        """(topic, message) for every retained topic the filter matches, found by
        walking the tree; expired entries (expires_at <= now) are skipped and removed."""
    def purge_expired(self, now: float) -> int: ...
    def items(self) -> list[tuple[str, Any, float | None]]: ...
    def node_count(self) -> int:
        """Tree nodes below the root (introspection: emptied nodes are pruned)."""
    def __len__(self) -> int: ...
