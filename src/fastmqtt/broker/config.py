"""Broker configuration: every setting and limit, its default, and TOML loading.

One flat :class:`BrokerConfig` dataclass holds everything; ``[[listener]]``
tables become :class:`ListenerConfig` entries. ``load_config`` reads a TOML
file (``tomllib``), rejects unknown keys (a typo must not silently fall back
to a default), and the CLI then overrides single fields from flags. Every key
is documented in ``examples/fastmqtt.toml``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BrokerConfig", "ListenerConfig", "load_config", "config_from_dict"]

DAY = 86_400


@dataclass
class ListenerConfig:
    """One ``[[listener]]`` table (see ``fastmqtt.broker.listeners.ListenerSpec``)."""

    type: str = "tcp"  # tcp | tls | ws | wss
    host: str = "0.0.0.0"
    port: int = 1883
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    require_certificate: bool = False
    path: str | None = None  # WebSocket request path; None = any
    max_connections: int | None = None
    connection_rate: float | None = None  # new connections per second
    handshake_timeout: float = 10.0
    name: str | None = None


@dataclass
class BrokerConfig:
    """All broker settings. Times are seconds unless the name says otherwise."""

    # --- listeners ------------------------------------------------------------
    host: str = "0.0.0.0"  # default TCP listener (used when ``listeners`` is empty)
    port: int = 1883
    listeners: list[ListenerConfig] = field(default_factory=list)
    ws_port: int | None = None  # extra WebSocket listener on ``host``
    tls_port: int | None = None  # extra TLS listener on ``host`` (needs certfile)
    wss_port: int | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics; None = off
    metrics_host: str = "127.0.0.1"

    # --- persistence ----------------------------------------------------------
    persistence: bool = True
    data_dir: str = "./fastmqtt-data"
    durability: str = "sync"  # "sync" (fsync before PUBACK) | "batch"
    batch_interval_ms: int = 10
    store_backend: str = "sqlite"  # "sqlite" | "memory" (tests)

    # --- chat history ---------------------------------------------------------
    history: list[str] = field(default_factory=list)  # topic filters; empty = off
    history_max_messages: int = 100  # per topic
    history_max_days: float | None = None

    # --- security -------------------------------------------------------------
    allow_anonymous: bool | None = None  # None: allowed iff no password_file
    password_file: str | None = None
    acl_file: str | None = None
    auth_plugin: str | None = None  # dotted path "pkg.mod:factory" -> Authenticator
    acl_plugin: str | None = None  # dotted path "pkg.mod:factory" -> Authorizer

    # --- protocol -------------------------------------------------------------
    max_keepalive: int = 65535  # v5: larger (or 0) client keepalive -> Server Keep Alive
    keepalive_grace: float = 1.5  # close after grace * keepalive without a packet [MQTT-3.1.2-24]
    connect_timeout: float = 10.0  # drop a connection that sends no CONNECT in time
    max_packet_size: int = 268_435_460  # inbound, whole packet; announced in CONNACK (v5)
    receive_maximum: int = 1024  # inbound QoS>0 in flight per client; more -> 0x93
    max_inflight_messages: int = 100  # outbound window cap (also bounded by client's Receive Maximum)
    max_qos: int = 2
    retain_available: bool = True
    wildcard_subscriptions: bool = True
    shared_subscriptions: bool = True
    subscription_identifiers: bool = True
    topic_alias_maximum: int = 10  # aliases a v5 client may use towards us
    outbound_topic_aliases: bool = True  # assign aliases on messages we send (up to the client's max)
    share_policy: str = "round_robin"  # round_robin | random
    max_client_id_length: int = 65535
    max_publish_rate: float = 0.0  # inbound PUBLISH per second per connection; 0 = no limit
    publish_rate_burst: float | None = None  # token bucket size; None = max(1, max_publish_rate)

    # --- sessions and queues --------------------------------------------------
    max_session_expiry: int = 7 * DAY  # cap on a v5 client's Session Expiry Interval
    persistent_session_expiry: int = 7 * DAY  # 3.1.1 clean-session-0 sessions
    max_queued_messages: int = 1000  # per session (offline queue + waiting for window); 0 = no limit
    max_queued_bytes: int = 16 * 1024 * 1024  # per session; 0 = no limit
    queue_qos0_messages: bool = False  # keep QoS 0 for offline persistent sessions
    max_outgoing_bytes: int = 1024 * 1024  # per connection write buffer before it counts as slow
    slow_consumer_timeout: float = 30.0  # disconnect a client whose socket accepts nothing this long
    max_connections: int | None = None

    # --- retained -------------------------------------------------------------
    max_retained_messages: int = 100_000  # new retained topics beyond this are not stored
    max_retained_bytes: int = 256 * 1024 * 1024  # total retained payload bytes

    # --- $SYS and logs --------------------------------------------------------
    sys_interval: float = 10.0  # 0 = no $SYS topics
    verbose: bool = False

    def __post_init__(self) -> None:
        # Checked here, not only in config_from_dict, so CLI flags and
        # in-process configs get the same errors.
        if self.max_publish_rate < 0:
            raise ValueError("max_publish_rate must be >= 0 (0 = no limit)")
        if self.publish_rate_burst is not None and self.publish_rate_burst < 1:
            raise ValueError("publish_rate_burst must be >= 1")

    def listener_configs(self) -> list[ListenerConfig]:
        """The listeners to open: the ``[[listener]]`` tables, or one TCP listener
        on ``host``/``port``, plus the ``ws_port``/``tls_port``/``wss_port`` extras."""
        out = list(self.listeners) or [ListenerConfig("tcp", self.host, self.port)]
        for kind, port in (("ws", self.ws_port), ("tls", self.tls_port), ("wss", self.wss_port)):
            if port is not None:
                out.append(ListenerConfig(kind, self.host, port, certfile=self.certfile,
                                          keyfile=self.keyfile, cafile=self.cafile))
        return out

    def replace(self, **changes: Any) -> "BrokerConfig":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in dataclasses.fields(BrokerConfig)}
_LISTENER_FIELDS = {f.name for f in dataclasses.fields(ListenerConfig)}


def config_from_dict(data: dict[str, Any]) -> BrokerConfig:
    """Build a config from a parsed TOML document.

    Args:
        data: top-level keys of :class:`BrokerConfig`; ``listener`` is a list of
            tables with the keys of :class:`ListenerConfig`.

    Returns:
        The config, defaults filled in.

    Raises:
        ValueError: an unknown key or a value of the wrong kind.
    """
    data = dict(data)
    listeners = data.pop("listener", data.pop("listeners", []))
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    specs = []
    for table in listeners:
        bad = set(table) - _LISTENER_FIELDS
        if bad:
            raise ValueError(f"unknown [[listener]] keys: {', '.join(sorted(bad))}")
        specs.append(ListenerConfig(**table))
    cfg = BrokerConfig(**data, listeners=specs)
    if cfg.durability not in ("sync", "batch"):
        raise ValueError("durability must be 'sync' or 'batch'")
    if cfg.max_qos not in (0, 1, 2):
        raise ValueError("max_qos must be 0, 1 or 2")
    if not 1 <= cfg.receive_maximum <= 65535:
        raise ValueError("receive_maximum must be in 1..65535")
    if not 0 <= cfg.topic_alias_maximum <= 65535:
        raise ValueError("topic_alias_maximum must be in 0..65535")
    return cfg


def load_config(path: str) -> BrokerConfig:
    """Read a TOML config file.

    Args:
        path: the file.

    Returns:
        The config.

    Raises:
        OSError: the file cannot be read.
        tomllib.TOMLDecodeError: not valid TOML.
        ValueError: unknown keys or bad values.
    """
    with open(path, "rb") as f:
        return config_from_dict(tomllib.load(f))
