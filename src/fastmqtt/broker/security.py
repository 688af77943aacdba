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
import signal
import threading
from typing import Any

import trio

__all__ = ["RateLimiter", "build_security", "load_object", "reload_security", "sighup_reloader"]

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
        # The epsilon absorbs float error: 0.1 s at 10/s must buy a whole token.
        if self._tokens >= 0.999999999:
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


def _make_plugin(spec: Any, config: Any) -> Any:
    """Instantiate a plug-in given as a dotted path, a factory or an object."""
    if isinstance(spec, str):
        spec = load_object(spec)
    if callable(spec) and not hasattr(spec, "authenticate") and not hasattr(spec, "can_publish"):
        return spec(config)
    if isinstance(spec, type):
        return spec(config)
    return spec


def build_security(config: Any) -> tuple[Any, Any]:
    """Build the broker's authenticator and authorizer from its config.

    Reads these attributes of ``config`` (missing ones count as None):

    * ``allow_anonymous``: accept clients without a user name; None means
      "yes unless a password file or an auth plug-in is configured".
    * ``password_file``: Mosquitto-compatible password file
      (:mod:`fastmqtt.broker.auth`).
    * ``auth_plugin``: dotted path (``pkg.mod:factory`` or ``pkg.mod.factory``)
      to a class or factory called with ``config`` that returns an
      :class:`~fastmqtt.broker.interfaces.Authenticator`. It is asked after
      the password file; when anonymous clients are refused it is also asked
      about them (a token may travel in the password alone). Its
      ``authenticate`` coroutine must not block the loop.
    * ``acl_file``: Mosquitto-compatible ACL file (:mod:`fastmqtt.broker.acl`).
    * ``acl_plugin``: dotted path to a class or factory called with ``config``
      returning an :class:`~fastmqtt.broker.interfaces.Authorizer`; its
      methods may return None to defer to the ACL file. Asked before the file.

    Returns:
        ``(authenticator, authorizer)``. Each is an
        :class:`~fastmqtt.broker.interfaces.AllowAll` instance when nothing
        restricts it, so the core can skip checks with ``isinstance``. Both
        other kinds have ``reload()`` (call on SIGHUP); the authorizer also has
        ``generation`` (bumped when rules changed).

    Raises:
        OSError, ValueError, ImportError: a file cannot be read or parsed, or a
            plug-in cannot be imported.
    """
    from .acl import AclAuthorizer, ChainAuthorizer
    from .auth import ChainAuthenticator, PasswordFileAuthenticator
    from .interfaces import AllowAll

    get = lambda name: getattr(config, name, None)  # noqa: E731
    password_file = get("password_file")
    auth_plugin = get("auth_plugin")
    allow_anonymous = get("allow_anonymous")
    if allow_anonymous is None:
        allow_anonymous = not password_file and not auth_plugin

    authenticators: list[Any] = []
    plugins: list[Any] = []
    if password_file:
        authenticators.append(PasswordFileAuthenticator(password_file))
    if auth_plugin:
        plugin = _make_plugin(auth_plugin, config)
        authenticators.append(plugin)
        plugins.append(plugin)
    if not authenticators and allow_anonymous:
        authenticator: Any = AllowAll()
    else:
        authenticator = ChainAuthenticator(authenticators, bool(allow_anonymous), plugins)

    authorizers: list[Any] = []
    if get("acl_plugin"):
        authorizers.append(_make_plugin(get("acl_plugin"), config))
    if get("acl_file"):
        authorizers.append(AclAuthorizer(get("acl_file")))
    if not authorizers:
        authorizer: Any = AllowAll()
    elif len(authorizers) == 1 and isinstance(authorizers[0], AclAuthorizer):
        authorizer = authorizers[0]
    else:
        authorizer = ChainAuthorizer(authorizers)
    log.info("security: anonymous %s, password file %s, auth plug-in %s, ACL %s",
             "allowed" if allow_anonymous else "refused", password_file or "-",
             auth_plugin or "-", "on" if authorizers else "off")
    return authenticator, authorizer


def reload_security(authenticator: Any, authorizer: Any) -> None:
    """Re-read the password and ACL files (what SIGHUP does).

    A file that cannot be read or parsed keeps its old contents in force (the
    error is logged), so a typo never locks everyone out or opens everything.

    Args:
        authenticator: from :func:`build_security`.
        authorizer: from :func:`build_security`.
    """
    for obj in (authenticator, authorizer):
        reload = getattr(obj, "reload", None)
        if reload is not None:
            reload()
    log.info("security configuration reloaded")


async def sighup_reloader(authenticator: Any, authorizer: Any, on_reload: Any = None, *,
                          task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Reload security files and TLS certificates on every SIGHUP until
    cancelled (a trio task).

    The broker's server starts it next to its listeners::

        nursery.start_soon(sighup_reloader, authenticator, authorizer, core_hook)

    Args:
        authenticator: from :func:`build_security`.
        authorizer: from :func:`build_security`.
        on_reload: optional callable run after each reload, e.g. one that calls
            ``authorizer.can_subscribe`` over every session's subscriptions
            (:func:`fastmqtt.broker.acl.stale_subscriptions`) and removes the
            ones no longer allowed. Delivery is checked by ``can_receive``
            either way, so a stale subscription never leaks a message.
        task_status: trio task status; ``started()`` once the handler is set.
    """
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None or threading.current_thread() is not threading.main_thread():
        # Signals reach only the main thread (and Windows has no SIGHUP): an
        # embedded broker calls reload_security() itself.
        log.debug("SIGHUP reload unavailable here; call reload_security() instead")
        task_status.started()
        return
    with trio.open_signal_receiver(sighup) as signals:
        task_status.started()
        async for _ in signals:
            try:
                reload_security(authenticator, authorizer)
                from .listeners import reload_certificates

                reload_certificates()
                if on_reload is not None:
                    on_reload()
            except Exception:  # a reload must never take the broker down
                log.exception("reload after SIGHUP failed")
