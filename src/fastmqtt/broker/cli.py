"""``fastmqtt-broker`` command line: flags over a TOML config file over defaults."""

from __future__ import annotations

import argparse
import gc
import io
import logging
import signal
import sys
import time

import trio

from .. import __version__
from .config import BrokerConfig, load_config

__all__ = ["main", "build_parser", "config_from_args"]

log = logging.getLogger("fastmqtt.broker")


class _LogHandler(logging.StreamHandler):
    """stderr handler that buffers routine lines and flushes them a few times a
    second: a line-buffered stderr costs one write system call per connect and
    disconnect, a measurable share of the connect rate. Warnings and errors,
    and the start-up lines that people and tests wait for ("listening on",
    "metrics on"), are flushed at once."""

    _URGENT = ("listening on", "metrics on", "starting", "stopped", "shutting down")

    def __init__(self) -> None:
        try:
            raw = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
            stream = io.TextIOWrapper(io.BufferedWriter(raw, 65536), encoding="utf-8",
                                      errors="replace", line_buffering=False)
        except (AttributeError, OSError, ValueError):  # no real stderr (embedded, tests)
            stream = sys.stderr
        super().__init__(stream)
        self._urgent: dict[str, bool] = {}  # format string -> flush at once?

    def _is_urgent(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        fmt = record.msg if isinstance(record.msg, str) else str(record.msg)
        urgent = self._urgent.get(fmt)
        if urgent is None:  # decided once per format string, not per line
            urgent = any(u in fmt for u in self._URGENT)
            if len(self._urgent) < 1000:
                self._urgent[fmt] = urgent
        return urgent

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            with self.lock:
                self.stream.write(msg + "\n")
                if self._is_urgent(record):
                    self.stream.flush()
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s``, with the date and
    time text made once per second instead of once per line
    (``time.strftime`` is a good part of the cost of a log line, and the
    broker logs one per connect and disconnect)."""

    _second = -1
    _text = ""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)


def _lean_records() -> None:
    """Skip what every log record would otherwise compute and the broker's
    format never shows: the caller's file and line (a stack walk), thread,
    process and task names (the "Optimization" table of the logging HOWTO)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _tune_gc() -> None:
    """Make full (oldest generation) garbage collections ten times rarer.

    Every live connection is a few dozen objects the cyclic collector walks in
    each full collection, and a burst of connects triggers one every few
    thousand clients: with the default thresholds the collector took about
    60 us per connect+disconnect, with this about 15-20 us. The broker leaves
    little cyclic garbage behind (a closed connection is freed by reference
    counting), so collecting it less often costs little memory."""
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 100)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag overrides the config file)."""
    p = argparse.ArgumentParser(prog="fastmqtt-broker",
                                description="fastmqtt MQTT 5.0 / 3.1.1 broker")
    a = p.add_argument
    a("-c", "--config", metavar="FILE.toml", help="TOML config file (see examples/fastmqtt.toml)")
    a("-p", "--port", type=int, help="TCP port (default 1883; 0 = any free port)")
    a("--host", help="address to bind (default all interfaces)")
    a("--ws-port", type=int, metavar="PORT", help="also listen for MQTT over WebSocket")
    a("--tls-port", type=int, metavar="PORT", help="also listen for MQTT over TLS")
    a("--wss-port", type=int, metavar="PORT", help="also listen for MQTT over secure WebSocket")
    a("--certfile", help="PEM certificate for TLS listeners")
    a("--keyfile", help="PEM key for TLS listeners")
    a("--cafile", help="PEM CA bundle to verify client certificates")
    a("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port")
    a("--data-dir", metavar="DIR", help="where persistent state lives (default ./fastmqtt-data)")
    a("--no-persistence", action="store_true", help="keep all state in memory only")
    a("--durability", choices=("sync", "batch"), help="fsync before acking (sync) or batch commits")
    a("--max-keepalive", type=int, metavar="SECONDS",
      help="largest keep alive allowed (v5 clients get Server Keep Alive)")
    a("--max-publish-rate", type=float, metavar="N",
      help="PUBLISH packets per second allowed per client (0 = no limit); over it:"
           " v5 DISCONNECT 0x96, 3.1.1 closed")
    a("--password-file", metavar="F", help="Mosquitto-style password file")
    a("--acl-file", metavar="F", help="Mosquitto-style ACL file")
    a("--allow-anonymous", action=argparse.BooleanOptionalAction, default=None,
      help="accept clients without a user name (default: yes unless a password file is set)")
    a("--sys-interval", type=float, metavar="SECONDS", help="$SYS publish interval (0 = off)")
    a("-v", "--verbose", action="store_true", help="debug logs")
    a("--version", action="version", version=f"fastmqtt-broker {__version__}")
    return p


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    """Load ``--config`` (if any) and apply the flags given on top.

    Raises:
        OSError, ValueError: the config file cannot be read or is invalid.
    """
    cfg = load_config(args.config) if args.config else BrokerConfig()
    changes = {}
    for flag, key in (("port", "port"), ("host", "host"), ("ws_port", "ws_port"),
                      ("tls_port", "tls_port"), ("wss_port", "wss_port"),
                      ("certfile", "certfile"), ("keyfile", "keyfile"), ("cafile", "cafile"),
                      ("metrics_port", "metrics_port"), ("data_dir", "data_dir"),
                      ("durability", "durability"), ("max_keepalive", "max_keepalive"),
                      ("max_publish_rate", "max_publish_rate"),
                      ("password_file", "password_file"), ("acl_file", "acl_file"),
                      ("allow_anonymous", "allow_anonymous"), ("sys_interval", "sys_interval")):
        value = getattr(args, flag)
        if value is not None:
            changes[key] = value
    if args.no_persistence:
        changes["persistence"] = False
    if args.verbose:
        changes["verbose"] = True
    cfg = cfg.replace(**changes)
    if ("port" in changes or "host" in changes) and cfg.listeners:
        # -p/--host on the command line replace the file's first TCP listener.
        first = cfg.listeners[0]
        if "port" in changes:
            first.port = changes["port"]
        if "host" in changes:
            first.host = changes["host"]
    return cfg


async def _flush_logs() -> None:
    while True:
        await trio.sleep(0.2)
        for handler in logging.getLogger().handlers:
            handler.flush()


async def _run(cfg: BrokerConfig) -> None:
    from .server import serve

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_flush_logs)
        broker = await nursery.start(serve, cfg)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                await broker.aclose()
                break
        nursery.cancel_scope.cancel()


def _os_errors(exc: BaseException) -> list[OSError] | None:
    """The OSErrors ``exc`` consists of (flattening exception groups), or None
    when anything else is in it."""
    if isinstance(exc, OSError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[OSError] = []
        for sub in exc.exceptions:
            errors = _os_errors(sub)
            if errors is None:
                return None
            found.extend(errors)
        return found
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastmqtt-broker`` and ``python -m fastmqtt.broker``.

    Returns:
        The exit status: 0 after a signal-driven shutdown, 1 on a start-up error.
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"fastmqtt-broker: bad configuration: {exc}", file=sys.stderr)
        return 2
    handler = _LogHandler()
    handler.setFormatter(_Formatter())
    _lean_records()
    _tune_gc()
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO,
                        handlers=[handler])
    log.info("fastmqtt-broker %s starting", __version__)
    try:
        trio.run(_run, cfg)
    except KeyboardInterrupt:
        return 0
    except (OSError, BaseExceptionGroup) as exc:
        # A listener that cannot bind (port in use, no permission) reaches us
        # inside trio's exception group: report it in one line, not a trace.
        errors = _os_errors(exc)
        if errors is None:
            raise
        for err in errors:
            log.error("cannot start: %s", err)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
