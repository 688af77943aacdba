"""Security wiring for the broker: who may connect, what they may touch, how fast.

* :func:`build_security` turns the broker config into an
  ``(Authenticator, Authorizer)`` pair (``interfaces.py`` protocols). When
  nothing is configured it returns :class:`~fastmqtt.broker.interfaces.AllowAll`
  instances, so the core can test ``isinstance(x, AllowAll)`` and skip checks.
* :class:`RateLimiter` is the token bucket used for connection rates (per
  listener) and publish rates (per client, v5 reason 0x96).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__all__ = ["RateLimiter", "build_security", "load_object"]

log = logging.getLogger("fastmqtt.broker.security")


class RateLimiter:
    """Token bucket: on average ``rate`` events per second, bursts up to ``burst``.

    The caller passes the clock (``trio.current_time()`` or ``time.monotonic()``)
    so the class stays synchronous and testable. One ``allow`` is a handful of
    float operations, cheap enough for every PUBLISH.

    Args:
        rate: tokens added per second (must be > 0).
        burst: bucket size; defaults to ``max(1, rate)`` (one second's worth).

    Raises:
        ValueError: when ``rate`` or ``burst`` is not positive.
    """

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if burst is None:
            burst = max(1.0, float(rate))
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        """Take one token if there is one.

        Args:
            now: current time in seconds on a monotonic clock.

        Returns:
            True when the event is within the rate, False when it must be refused.
        """
        last = self._last
        if last is not None and now > last:
            tokens = self._tokens + (now - last) * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst
        if last is None or now > last:
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def load_object(dotted: str) -> Any:
    """Import ``package.module:attr`` or ``package.module.attr``.

    Args:
        dotted: the path; a ``:`` separates module and attribute explicitly.

    Returns:
        The attribute.

    Raises:
        ImportError: when the module or attribute does not exist.
    """
    if ":" in dotted:
        mod_name, _, attr = dotted.partition(":")
    else:
        mod_name, _, attr = dotted.rpartition(".")
    if not mod_name or not attr:
        raise ImportError(f"not a dotted path: {dotted!r}")
    module = importlib.import_module(mod_name)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ImportError(f"{dotted!r}: {exc}") from None
    return obj
