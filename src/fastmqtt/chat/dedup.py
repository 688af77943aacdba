"""De-duplication of chat events by event id.

The same event can reach a client twice: from the history fetched after a
reconnect and live over MQTT, or as a QoS 1 redelivery (at-least-once, with
DUP set or not). :class:`Deduplicator` remembers recently seen ids in an
insertion-ordered dict used as an LRU, bounded both in size (``max_size``) and,
optionally, in age (``ttl`` seconds): an id is forgotten when either bound
pushes it out, so memory stays bounded however long the client runs.
"""

from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["Deduplicator"]


class Deduplicator:
    """Bounded set of recently seen event ids.

    Args:
        max_size: most ids remembered (least recently seen forgotten first).
        ttl: seconds an id is remembered after it was last seen (None: no
            time limit).
        clock: time source for ``ttl`` (default ``time.monotonic``).
    """

    __slots__ = ("max_size", "ttl", "_clock", "_seen", "duplicates")

    def __init__(self, max_size: int = 10_000, ttl: float | None = None, clock=time.monotonic) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self.ttl = ttl
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self.duplicates = 0  # how many ids were reported as already seen

    def seen(self, event_id: str) -> bool:
        """Record ``event_id``; return True if it was already remembered (a
        duplicate to drop), False if it is new."""
        seen = self._seen
        now = self._clock() if self.ttl is not None else 0.0
        if self.ttl is not None:
            limit = now - self.ttl
            while seen:
                oldest, t = next(iter(seen.items()))
                if t > limit:
                    break
                del seen[oldest]
        if event_id in seen:
            seen[event_id] = now
            seen.move_to_end(event_id)
            self.duplicates += 1
            return True
        seen[event_id] = now
        if len(seen) > self.max_size:
            seen.popitem(last=False)
        return False

    def __contains__(self, event_id: str) -> bool:
        if event_id not in self._seen:
            return False
        if self.ttl is None:
            return True
        return self._seen[event_id] > self._clock() - self.ttl

    def forget(self, event_id: str) -> None:
        self._seen.pop(event_id, None)

    def __len__(self) -> int:
        return len(self._seen)
