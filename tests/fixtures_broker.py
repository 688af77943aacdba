"""Black-box broker fixtures: real broker processes, real clients, raw bytes.

Theory of operation
-------------------
Every integration test talks to a broker running as a *separate process* on
127.0.0.1, exactly as a user would run it, so a test can only observe what is
on the wire (and in the broker's log). Two implementations share one
interface, :class:`BrokerProcess`:

* ``fastmqtt`` — ``python -m fastmqtt.broker --host 127.0.0.1 -p 0 --data-dir
  DIR``. Readiness is the ``listening on tcp://127.0.0.1:PORT`` line the broker
  logs on stderr once it is bound (the real port is read from it). A restart
  reuses that port and the data directory.
* ``mosquitto`` — Debian's ``/usr/sbin/mosquitto`` with a generated
  ``mosquitto.conf`` (a free port chosen by binding port 0 first). Readiness is
  a successful TCP connect, tried in a bounded loop.

The broker's stderr is read by a thread into a list of lines guarded by a
condition variable, so :meth:`BrokerProcess.wait_for_log` wakes as soon as a
matching line arrives (no polling sleeps), and tests can assert on log text.

Clients, from the most realistic to the most exact:

* :class:`PahoClient` — paho-mqtt 2.x (v3.1.1 or v5) with its network thread;
  every wait is bounded and messages land in a thread-safe queue.
* :class:`MosquittoSub` / :func:`mosquitto_pub` — the mosquitto command line
  clients, started with ``-C N -W T`` so they always stop by themselves.
* :class:`RawClient` — a blocking socket that sends hand-made bytes and reads
  whole packets with a deadline. The builders and the parser below
  (``connect_bytes`` ... ``parse_packet``) are a deliberately small, separate
  MQTT codec: the broker is tested against an oracle that shares no code with
  ``fastmqtt.codec``.

Fixtures: ``broker`` (fresh fastmqtt per test), ``shared_broker`` (one per
module, for tests that do not interfere), ``mosquitto`` (fresh), ``broker_impl``
(module-scoped, parametrised "fastmqtt"/"mosquitto"), ``broker_factory`` (any
implementation with custom args/config), ``paho`` (client factory),
``raw`` (raw client factory).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pytest

from fastmqtt.enums import PROPERTY_TYPES, PropType

HOST = "127.0.0.1"
MOSQUITTO = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else (shutil.which("mosquitto") or "mosquitto")
START_TIMEOUT = 15.0  # a cold Python start on a loaded 2-core machine can be slow
LISTENING_RE = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)")
IMPLS = ("fastmqtt", "mosquitto")


try:  # loaded before any fork: the child must not import anything
    import ctypes

    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not glibc Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies, so a
    killed or crashed pytest run leaves no broker behind (PR_SET_PDEATHSIG)."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGKILL))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to 0)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait (bounded) until a TCP connect to ``host:port`` succeeds.

    Raises:
        TimeoutError: still refused at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not accepting after {timeout}s") from None
            # Nothing to wait on but the port itself: retry after a short pause.
            time.sleep(0.05)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def to_toml(config: dict) -> str:
    """Write a (one level of tables deep) dict as TOML text."""
    lines, tables = [], []
    for k, v in config.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        for k, v in table.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- brokers

class BrokerProcess:
    """One broker process (fastmqtt or mosquitto) on 127.0.0.1.

    Args:
        impl: "fastmqtt" or "mosquitto".
        workdir: directory for the data dir, config files; created if needed.
        args: extra command line arguments (fastmqtt only).
        config: TOML config for fastmqtt (a dict or the text), passed with ``-c``.
        mosquitto_conf: extra lines for the generated mosquitto.conf.
        persistence: mosquitto only: keep state in ``data_dir`` across restarts.
        env: extra environment variables.
        port: fixed port; 0 lets fastmqtt choose (and picks one for mosquitto).
        mosquitto_log_types: Mosquitto ``log_type`` values; "all" (the default)
            logs every packet, which tests like and benchmarks must avoid.
    """

    def __init__(self, impl: str = "fastmqtt", workdir: str | os.PathLike = ".", *,
                 args: Iterable[str] = (), config: dict | str | None = None,
                 mosquitto_conf: Iterable[str] = (), persistence: bool = False,
                 env: dict | None = None, port: int = 0,
                 mosquitto_log_types: Iterable[str] = ("all",)) -> None:
        if impl not in IMPLS:
            raise ValueError(impl)
        self.impl = impl
        self.host = HOST
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.args = list(args)
        self.config = config
        self.mosquitto_conf = list(mosquitto_conf)
        self.persistence = persistence
        self.env = dict(env or {})
        self.mosquitto_log_types = list(mosquitto_log_types)
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._log_ended = False  # set by the reader when the current process's log ends
        self.run_start = 0  # index into the log lines where the current run began

    # -- command lines
    def command(self) -> list[str]:
        if self.impl == "fastmqtt":
            cmd = [sys.executable, "-m", "fastmqtt.broker", "--host", HOST, "-p", str(self.port),
                   "--data-dir", str(self.data_dir)]
            if self.config is not None:
                path = self.workdir / "fastmqtt.toml"
                text = self.config if isinstance(self.config, str) else to_toml(self.config)
                path.write_text(text)
                cmd += ["-c", str(path)]
            return cmd + self.args
        if not self.port:
            self.port = free_port()
        conf = [
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            "log_dest stderr",
            *(f"log_type {t}" for t in self.mosquitto_log_types),
            "user root" if os.geteuid() == 0 else "",
        ]
        if self.persistence:
            conf += ["persistence true", f"persistence_location {self.data_dir}/", "autosave_interval 1"]
        else:
            conf += ["persistence false"]
        conf += self.mosquitto_conf
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(line for line in conf if line) + "\n")
        return [MOSQUITTO, "-c", str(path)] + self.args

    # -- life cycle
    def start(self, timeout: float = START_TIMEOUT) -> "BrokerProcess":
        """Start the process and return once it accepts connections.

        Raises:
            RuntimeError: the process exited or did not become ready in time.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        cmd = self.command()
        with self._cond:
            self.run_start = len(self._lines)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self._log_ended = False
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        if self.impl == "fastmqtt":
            m = self.wait_for_log(LISTENING_RE, timeout=timeout, since=self.run_start)
            if m is None:
                self.kill()
                raise RuntimeError(f"fastmqtt broker did not report listening within {timeout}s:\n{self.log()}")
            self.port = int(m.group(1))
        else:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    socket.create_connection((HOST, self.port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise RuntimeError(f"mosquitto not accepting within {timeout}s:\n{self.log()}")
                    # Nothing to wait on but the socket itself: retry the connect
                    # after a short pause, within the deadline.
                    self._wait_lines(0.05)
        return self

    def _read_log(self, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        proc.stdout.close()
        with self._cond:
            # Set under the lock before the last wake-up, so a waiter never
            # misses the end of the log (the thread may still look alive).
            if proc is self.proc:  # not a previous run's reader finishing late
                self._log_ended = True
            self._cond.notify_all()

    def _wait_lines(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Send SIGTERM (graceful shutdown), wait for exit and return the exit code.

        Kills the process and returns None if it does not exit within ``timeout``.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        self._join_reader()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process (a crash: no chance to clean up) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._join_reader()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5)

    def restart(self, timeout: float = START_TIMEOUT) -> "BrokerProcess":
        """Graceful stop, then start again on the same port and data directory."""
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs
    def log(self, since: int = 0) -> str:
        """The captured stderr (all runs), from line ``since``."""
        with self._cond:
            return "\n".join(self._lines[since:])

    def mark(self) -> int:
        """Current number of log lines, to wait only for lines logged after now."""
        with self._cond:
            return len(self._lines)

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = 5.0, since: int = 0) -> re.Match | None:
        """Wait until a log line from index ``since`` matches ``pattern``.

        Returns:
            The match, or None on timeout or when the process's log ended.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = since
        with self._cond:
            while True:
                while checked < len(self._lines):
                    m = rx.search(self._lines[checked])
                    checked += 1
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if self._log_ended:
                    return None
                self._cond.wait(left)

    def __repr__(self) -> str:
        return f"<BrokerProcess {self.impl} {self.host}:{self.port}>"


TEST_WATCHDOG = 120.0  # seconds; far above any test here


@pytest.fixture
def _watchdog():
    """If a test that uses these fixtures runs far too long, dump every thread's
    stack and exit, instead of hanging a CI job silently."""
    import faulthandler

    faulthandler.dump_traceback_later(TEST_WATCHDOG, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def broker_factory(tmp_path, _watchdog):
    """Start brokers with custom arguments; all are killed at teardown.

    Usage: ``broker_factory("fastmqtt", args=["--max-keepalive", "5"], config={...})``.
    The process is started unless ``start=False``.
    """
    made: list[BrokerProcess] = []

    def make(impl: str = "fastmqtt", *, start: bool = True, **kw) -> BrokerProcess:
        b = BrokerProcess(impl, tmp_path / f"{impl}-{len(made)}", **kw)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture
def broker(broker_factory) -> BrokerProcess:
    """A fresh fastmqtt broker with default arguments."""
    return broker_factory("fastmqtt")


@pytest.fixture
def mosquitto(broker_factory) -> BrokerProcess:
    """A fresh Mosquitto broker (same interface as ``broker``)."""
    return broker_factory("mosquitto")


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory):
    """One fastmqtt broker for a whole module (tests must use distinct topics/ids)."""
    b = BrokerProcess("fastmqtt", tmp_path_factory.mktemp("shared-fastmqtt"))
    try:
        b.start()
        yield b
    finally:
        b.kill()


@pytest.fixture(scope="module", params=IMPLS)
def broker_impl(request, tmp_path_factory):
    """A module-scoped broker of each implementation in turn (ids fastmqtt/mosquitto)."""
    b = BrokerProcess(request.param, tmp_path_factory.mktemp(f"shared-{request.param}"))
    try:
        b.start()
        yield b
    finally:
        b.kill()


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    """The implementation name, for tests that start their own broker with
    implementation-specific configuration (via ``broker_factory``)."""
    return request.param


_uid_lock = threading.Lock()
_uid = [0]


def unique(prefix: str = "t") -> str:
    """A process-unique name for client ids and topics on shared brokers."""
    with _uid_lock:
        _uid[0] += 1
        return f"{prefix}-{os.getpid()}-{_uid[0]}"


# --------------------------------------------------------------- paho client

@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any = None
    mid: int = 0
    dup: bool = False


class PahoClient:
    """paho-mqtt 2.x client with bounded waits and no automatic reconnect.

    Args:
        broker: anything with ``host`` and ``port``.
        version: 5 or 4 (3.1.1) or 3 (3.1).
        client_id: "" asks the server to assign one (v5) / requires clean (3.1.1).
        clean: clean start (v5) / clean session (3.1.1).
        session_expiry: v5 Session Expiry Interval in CONNECT (None: absent).
        will: (topic, payload, qos, retain[, properties]) or None.
        connect_properties: extra v5 CONNECT properties as ``{attr: value}``
            (paho attribute names, e.g. ``{"ReceiveMaximum": 10}``).
    """

    def __init__(self, broker, *, version: int = 5, client_id: str = "", clean: bool = True,
                 keepalive: int = 60, session_expiry: int | None = None, will: tuple | None = None,
                 username: str | None = None, password: str | None = None,
                 connect_properties: dict | None = None, manual_ack: bool = False) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._mqtt = mqtt
        self._Properties = Properties
        self._PacketTypes = PacketTypes
        self.broker = broker
        self.version = version
        self.keepalive = keepalive
        self.clean = clean
        protocol = {5: mqtt.MQTTv5, 4: mqtt.MQTTv311, 3: mqtt.MQTTv31}[version]
        kw = {} if version == 5 else {"clean_session": clean}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, reconnect_on_failure=False,
                                  manual_ack=manual_ack, **kw)
        self.session_expiry = session_expiry
        self.connect_properties = dict(connect_properties or {})
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain, *rest = will
            props = None
            if rest and rest[0]:
                props = Properties(PacketTypes.WILLMESSAGE)
                for k, v in rest[0].items():
                    setattr(props, k, v)
            self.client.will_set(topic, payload, qos, retain, properties=props)
        self.messages: "queue.Queue[Message]" = queue.Queue()
        self.connack: Any = None
        self.disconnect_reason: Any = None
        self.disconnect_properties: Any = None
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._ack_cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_publish = self._on_publish

    # callbacks run on paho's thread
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags, reason_code, properties)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_reason = reason_code
        self.disconnect_properties = properties
        self._connected.set()  # unblock a waiting connect() (refused)
        self._disconnected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                                  getattr(msg, "properties", None), msg.mid, bool(msg.dup)))

    def _ack(self, mid, value):
        with self._ack_cond:
            self._acks[mid] = value
            self._ack_cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._ack(mid, [getattr(rc, "value", rc) for rc in reason_codes])

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        self._ack(mid, [getattr(rc, "value", rc) for rc in (reason_codes or [])])

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._ack(mid, getattr(reason_code, "value", reason_code))

    def _wait_ack(self, mid: int, timeout: float):
        deadline = time.monotonic() + timeout
        with self._ack_cond:
            while mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no acknowledgement for mid {mid} within {timeout}s")
                self._ack_cond.wait(left)
            return self._acks.pop(mid)

    def props(self, packet_type: str, **values):
        """Build a paho Properties object, e.g. ``props("PUBLISH", MessageExpiryInterval=5)``."""
        p = self._Properties(getattr(self._PacketTypes, packet_type))
        for k, v in values.items():
            setattr(p, k, v)
        return p

    # public API
    def connect(self, timeout: float = 5.0, check: bool = True):
        """Connect and wait for CONNACK.

        Returns:
            (flags, reason_code, properties) as paho reports them.
        Raises:
            TimeoutError: no CONNACK in time. AssertionError: refused and ``check``.
        """
        kw = {}
        if self.version == 5:
            props = None
            if self.session_expiry is not None or self.connect_properties:
                props = self._Properties(self._PacketTypes.CONNECT)
                if self.session_expiry is not None:
                    props.SessionExpiryInterval = self.session_expiry
                for k, v in self.connect_properties.items():
                    setattr(props, k, v)
            kw = {"clean_start": self.clean, "properties": props}
        self._connected.clear()
        self._disconnected.clear()
        self.client.connect(self.broker.host, self.broker.port, self.keepalive, **kw)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError("no CONNACK")
        if check:
            assert self.connack is not None, f"connection closed: {self.disconnect_reason}"
            rc = self.connack[1]
            assert not rc.is_failure, f"CONNECT refused: {rc}"
        return self.connack

    @property
    def session_present(self) -> bool:
        return bool(self.connack[0].session_present)

    @property
    def connack_properties(self):
        return self.connack[2]

    def subscribe(self, topic, qos: int = 0, timeout: float = 5.0, options=None, properties=None, **opts) -> list:
        """Subscribe and wait for SUBACK; returns the granted QoS / reason codes.

        ``opts`` (v5): no_local, retain_as_published, retain_handling.
        ``topic`` may be a list of (filter, qos) pairs.
        """
        mqtt = self._mqtt
        if self.version == 5 and not isinstance(topic, list):
            options = options or mqtt.SubscribeOptions(qos=qos, noLocal=opts.get("no_local", False),
                                                       retainAsPublished=opts.get("retain_as_published", False),
                                                       retainHandling=opts.get("retain_handling", 0))
            rc, mid = self.client.subscribe(topic, options=options, properties=properties)
        elif isinstance(topic, list) and self.version == 5:
            rc, mid = self.client.subscribe([(t, mqtt.SubscribeOptions(qos=q)) for t, q in topic],
                                            properties=properties)
        else:
            rc, mid = self.client.subscribe(topic, qos)
        assert rc == 0, rc
        return self._wait_ack(mid, timeout)

    def unsubscribe(self, topic, timeout: float = 5.0) -> list:
        rc, mid = self.client.unsubscribe(topic)
        assert rc == 0, rc
        return self._wait_ack(mid, timeout)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
                properties=None, wait: bool = True, timeout: float = 5.0, **props):
        """Publish; with ``wait`` (and QoS > 0) wait for the PUBACK/PUBCOMP.

        ``props`` are v5 PUBLISH properties by paho attribute name.
        Returns the paho MQTTMessageInfo.
        """
        if props:
            properties = self.props("PUBLISH", **props)
        info = self.client.publish(topic, payload, qos, retain, properties=properties)
        if wait:
            if qos == 0:
                info.wait_for_publish(timeout)
            else:
                self._wait_ack(info.mid, timeout)
        return info

    def get(self, timeout: float = 5.0) -> Message:
        """Next received message; raises queue.Empty after ``timeout``."""
        return self.messages.get(timeout=timeout)

    def get_n(self, n: int, timeout: float = 5.0) -> list[Message]:
        deadline = time.monotonic() + timeout
        return [self.messages.get(timeout=max(0.001, deadline - time.monotonic())) for _ in range(n)]

    def expect_nothing(self, timeout: float = 0.5) -> None:
        """Assert no message arrives within ``timeout`` (a bounded negative check)."""
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {m}")

    def wait_disconnected(self, timeout: float = 5.0) -> bool:
        return self._disconnected.wait(timeout)

    def _stop_loop(self, timeout: float = 5.0) -> None:
        # paho's loop_stop() joins its thread without a timeout; bound it.
        t = getattr(self.client, "_thread", None)
        self.client._thread_terminate = True
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def disconnect(self, reason_code: int | None = None, properties=None) -> None:
        """Send DISCONNECT (v5 reason code optional) and stop the network thread."""
        kw = {}
        if reason_code is not None and self.version == 5:
            from paho.mqtt.reasoncodes import ReasonCode
            rc = ReasonCode(self._PacketTypes.DISCONNECT)
            rc.value = reason_code
            kw["reasoncode"] = rc
        if properties is not None:
            kw["properties"] = properties
        self.client.disconnect(**kw)
        self._disconnected.wait(5)
        self._stop_loop()

    def drop(self) -> None:
        """Close the TCP connection without DISCONNECT (abnormal close: will fires)."""
        sock = self.client.socket()
        sock = getattr(sock, "_socket", sock)  # the TCP socket under paho's WebSocket wrapper
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._disconnected.wait(5)
        self._stop_loop()

    def close(self) -> None:
        try:
            if self.client.is_connected():
                self.client.disconnect()
        except Exception:
            pass
        self._stop_loop()


@pytest.fixture
def paho(_watchdog):
    """Factory ``paho(broker, version=5, **kw)`` returning a *connected* PahoClient
    (pass ``connect=False`` to get it unconnected). All are closed at teardown."""
    made: list[PahoClient] = []

    def make(broker, version: int = 5, connect: bool = True, **kw) -> PahoClient:
        c = PahoClient(broker, version=version, **kw)
        made.append(c)
        if connect:
            c.connect()
        return c

    yield make
    for c in made:
        c.close()


# -------------------------------------------------------- mosquitto clients

def _version_flag(version: int) -> str:
    return {5: "mqttv5", 4: "mqttv311", 3: "mqttv31"}[version]


def mosquitto_pub(broker, topic: str, message: str | bytes = "", *, qos: int = 0, version: int = 5,
                  retain: bool = False, extra: Iterable[str] = (), timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run mosquitto_pub once (``-h 127.0.0.1 -p PORT -V ...``) and return its result."""
    cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", _version_flag(version),
           "-t", topic, "-q", str(qos)]
    if isinstance(message, bytes):
        cmd += ["-s"]
        inp = message
    else:
        cmd += ["-m", message]
        inp = None
    if retain:
        cmd.append("-r")
    cmd += list(extra)
    return subprocess.run(cmd, input=inp, capture_output=True, timeout=timeout)


class MosquittoSub:
    """mosquitto_sub in the background: ``-C count -W timeout`` bound its life.

    Output lines are parsed from ``-F 'MSG<TAB>%r<TAB>%q<TAB>%t<TAB>%x'`` (hex payload);
    ``-d`` debug lines tell when the SUBACK came back.
    """

    def __init__(self, broker, topics: str | list[str], *, count: int = 1, qos: int = 0, version: int = 5,
                 timeout: int = 10, extra: Iterable[str] = ()) -> None:
        topics = [topics] if isinstance(topics, str) else topics
        cmd = ["mosquitto_sub", "-d", "-h", broker.host, "-p", str(broker.port), "-V", _version_flag(version),
               "-q", str(qos), "-C", str(count), "-W", str(timeout),
               "-F", "MSG\t%r\t%q\t%t\t%x"]
        for t in topics:
            cmd += ["-t", t]
        cmd += list(extra)
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL"] + cmd  # line-buffer stdout: debug lines arrive as they happen
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for raw in iter(self.proc.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_subscribed(self, timeout: float = 5.0) -> None:
        """Wait for the SUBACK (mosquitto_sub -d prints "Subscribed (mid: ...")."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any("Subscribed (mid" in l or "received SUBACK" in l for l in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    raise TimeoutError("mosquitto_sub not subscribed:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def wait(self, timeout: float = 15.0) -> list[Message]:
        """Wait for exit (count reached or -W timeout) and return the messages."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(5)
        return self.messages()

    def messages(self) -> list[Message]:
        out = []
        with self._cond:
            for line in self.lines:
                if line.startswith("MSG\t"):
                    _, retain, qos, topic, hexpayload = line.split("\t", 4)
                    out.append(Message(topic, bytes.fromhex(hexpayload), int(qos), retain == "1"))
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def mosquitto_sub(_watchdog):
    """Factory for background :class:`MosquittoSub`, all killed at teardown."""
    made: list[MosquittoSub] = []

    def make(broker, topics, **kw) -> MosquittoSub:
        s = MosquittoSub(broker, topics, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


# ------------------------------------------------- minimal independent codec

def varint(n: int) -> bytes:
    """MQTT Variable Byte Integer (1.5.5)."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mstr(s: str | bytes) -> bytes:
    """UTF-8 Encoded String / Binary Data: two-byte length then the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def props_bytes(props: dict | list | None) -> bytes:
    """Encode v5 properties: ``{id: value}`` or a list of (id, value) pairs (repeats allowed)."""
    if not props:
        return b"\x00"
    items = props.items() if isinstance(props, dict) else props
    body = bytearray()
    for pid, value in items:
        t = PROPERTY_TYPES[pid]
        values = value if (t == PropType.UTF8_PAIR and value and isinstance(value[0], tuple)) else [value]
        for v in values:
            body += varint(int(pid))
            if t == PropType.BYTE:
                body += bytes([v])
            elif t == PropType.TWO_BYTE_INT:
                body += struct.pack("!H", v)
            elif t == PropType.FOUR_BYTE_INT:
                body += struct.pack("!I", v)
            elif t == PropType.VARIABLE_BYTE_INT:
                body += varint(v)
            elif t in (PropType.UTF8_STRING, PropType.BINARY):
                body += mstr(v)
            else:
                body += mstr(v[0]) + mstr(v[1])
    return varint(len(body)) + bytes(body)


def packet(first_byte: int, body: bytes) -> bytes:
    """Fixed header (type/flags byte + Remaining Length) + body."""
    return bytes([first_byte]) + varint(len(body)) + body


def connect_bytes(client_id: str = "", *, version: int = 5, clean: bool = True, keepalive: int = 60,
                  will: tuple | None = None, username: str | None = None, password: bytes | None = None,
                  props: dict | list | None = None, protocol_name: str | None = None,
                  flags: int | None = None) -> bytes:
    """A CONNECT packet (3.1). ``will`` is (topic, payload, qos, retain[, will_props]).

    ``flags`` overrides the computed Connect Flags byte (to build invalid ones).
    """
    name = protocol_name or ("MQIsdp" if version == 3 else "MQTT")
    f = 0x02 if clean else 0
    payload = mstr(client_id)
    if will is not None:
        wtopic, wpayload, wqos, wretain, *rest = will
        f |= 0x04 | (wqos << 3) | (0x20 if wretain else 0)
        if version == 5:
            payload += props_bytes(rest[0] if rest else None)
        payload += mstr(wtopic) + mstr(wpayload if isinstance(wpayload, bytes) else wpayload.encode())
    if username is not None:
        f |= 0x80
        payload += mstr(username)
    if password is not None:
        f |= 0x40
        payload += mstr(password)
    if flags is not None:
        f = flags
    var = mstr(name) + bytes([version, f]) + struct.pack("!H", keepalive)
    if version == 5:
        var += props_bytes(props)
    return packet(0x10, var + payload)


def publish_bytes(topic: str | bytes, payload: bytes = b"", *, qos: int = 0, retain: bool = False, dup: bool = False,
                  packet_id: int = 0, version: int = 5, props: dict | list | None = None) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = mstr(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if version == 5:
        body += props_bytes(props)
    return packet(first, body + payload)


def subscribe_bytes(packet_id: int, subs: list[tuple[str, int]], *, version: int = 5,
                    props: dict | list | None = None) -> bytes:
    """SUBSCRIBE; each entry is (filter, options byte) — for 3.1.1 the byte is the QoS."""
    body = struct.pack("!H", packet_id)
    if version == 5:
        body += props_bytes(props)
    for flt, opts in subs:
        body += mstr(flt) + bytes([opts])
    return packet(0x82, body)


def sub_options(qos: int = 0, no_local: bool = False, rap: bool = False, rh: int = 0) -> int:
    """v5 Subscription Options byte (3.8.3.1)."""
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (rh << 4)


def unsubscribe_bytes(packet_id: int, filters: list[str], *, version: int = 5) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == 5:
        body += b"\x00"
    for flt in filters:
        body += mstr(flt)
    return packet(0xA2, body)


ACK_FIRST = {"PUBACK": 0x40, "PUBREC": 0x50, "PUBREL": 0x62, "PUBCOMP": 0x70}


def ack_bytes(kind: str, packet_id: int, reason: int | None = None) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP; ``reason`` adds a v5 reason code."""
    body = struct.pack("!H", packet_id)
    if reason is not None:
        body += bytes([reason])
    return packet(ACK_FIRST[kind], body)


def disconnect_bytes(version: int = 5, reason: int = 0, props: dict | list | None = None) -> bytes:
    if version != 5:
        return b"\xe0\x00"
    if reason == 0 and not props:
        return b"\xe0\x00"
    return packet(0xE0, bytes([reason]) + props_bytes(props))


PINGREQ = b"\xc0\x00"

TYPE_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
              8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
              14: "DISCONNECT", 15: "AUTH"}


@dataclass
class Pkt:
    """A parsed packet; fields depend on the type (see :func:`parse_packet`)."""
    type: str
    flags: int
    raw: bytes
    packet_id: int = 0
    reason_code: int = 0
    reason_codes: list = field(default_factory=list)
    session_present: bool = False
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    properties: dict = field(default_factory=dict)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    mult, value = 1, 0
    for _ in range(4):
        b = data[i]
        i += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, i
        mult *= 128
    raise ValueError("varint longer than 4 bytes")


def _read_props(data: bytes, i: int) -> tuple[dict, int]:
    n, i = _read_varint(data, i)
    end = i + n
    props: dict = {}
    while i < end:
        pid, i = _read_varint(data, i)
        t = PROPERTY_TYPES[pid]
        if t == PropType.BYTE:
            v = data[i]; i += 1
        elif t == PropType.TWO_BYTE_INT:
            v = struct.unpack_from("!H", data, i)[0]; i += 2
        elif t == PropType.FOUR_BYTE_INT:
            v = struct.unpack_from("!I", data, i)[0]; i += 4
        elif t == PropType.VARIABLE_BYTE_INT:
            v, i = _read_varint(data, i)
        elif t in (PropType.UTF8_STRING, PropType.BINARY):
            ln = struct.unpack_from("!H", data, i)[0]
            v = data[i + 2:i + 2 + ln]; i += 2 + ln
            if t == PropType.UTF8_STRING:
                v = v.decode()
        else:
            ln = struct.unpack_from("!H", data, i)[0]
            k = data[i + 2:i + 2 + ln].decode(); i += 2 + ln
            ln = struct.unpack_from("!H", data, i)[0]
            v = (k, data[i + 2:i + 2 + ln].decode()); i += 2 + ln
        if pid in (0x26, 0x0B):
            props.setdefault(pid, []).append(v)
        else:
            props[pid] = v
    return props, end


def parse_packet(data: bytes, version: int = 5) -> Pkt:
    """Parse one whole packet as the broker sends it (server -> client types)."""
    first = data[0]
    ptype = first >> 4
    _, i = _read_varint(data, 1)
    body_end = len(data)
    p = Pkt(TYPE_NAMES.get(ptype, str(ptype)), first & 0x0F, bytes(data))
    v5 = version == 5
    if ptype == 2:  # CONNACK
        p.session_present = bool(data[i] & 1)
        p.reason_code = data[i + 1]
        if v5 and body_end > i + 2:
            p.properties, _ = _read_props(data, i + 2)
    elif ptype == 3:
        p.qos = (first >> 1) & 3
        p.retain = bool(first & 1)
        p.dup = bool(first & 8)
        ln = struct.unpack_from("!H", data, i)[0]
        p.topic = data[i + 2:i + 2 + ln].decode()
        i += 2 + ln
        if p.qos:
            p.packet_id = struct.unpack_from("!H", data, i)[0]
            i += 2
        if v5:
            p.properties, i = _read_props(data, i)
        p.payload = bytes(data[i:])
    elif ptype in (4, 5, 6, 7):
        p.packet_id = struct.unpack_from("!H", data, i)[0]
        if v5 and body_end > i + 2:
            p.reason_code = data[i + 2]
            if body_end > i + 3:
                p.properties, _ = _read_props(data, i + 3)
    elif ptype in (9, 11):
        p.packet_id = struct.unpack_from("!H", data, i)[0]
        i += 2
        if v5:
            p.properties, i = _read_props(data, i)
        p.reason_codes = list(data[i:])
    elif ptype == 14:
        if body_end > i:
            p.reason_code = data[i]
            if body_end > i + 1:
                p.properties, _ = _read_props(data, i + 1)
    return p


class Closed(Exception):
    """The peer closed the connection."""


class RawClient:
    """Blocking TCP client for byte-level tests; every read has a deadline.

    Args:
        broker: anything with ``host`` and ``port``.
        version: protocol level used to parse replies (5 parses properties).
    """

    def __init__(self, broker, version: int = 5, timeout: float = 5.0) -> None:
        self.version = version
        self.timeout = timeout
        self.sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.inbox: list[Pkt] = []
        self.closed = False

    @classmethod
    def from_socket(cls, sock: socket.socket, version: int = 5, timeout: float = 5.0) -> "RawClient":
        """Wrap an already connected socket (e.g. one with tuned buffer sizes)."""
        self = cls.__new__(cls)
        self.version, self.timeout, self.sock = version, timeout, sock
        self.buf, self.inbox, self.closed = bytearray(), [], False
        return self

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for data (have {bytes(self.buf)!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"timed out waiting for data (have {bytes(self.buf)!r})") from None
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.closed = True
                raise Closed(bytes(self.buf))
            self.buf += chunk

    def recv_raw(self, timeout: float | None = None) -> bytes:
        """Read one whole packet's bytes. Raises Closed or TimeoutError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(2, deadline)
        i = 1
        while True:
            self._fill(i + 1, deadline)
            if not self.buf[i] & 0x80 or i == 4:
                break
            i += 1
        length, start = _read_varint(bytes(self.buf[:i + 1]), 1)
        self._fill(start + length, deadline)
        data = bytes(self.buf[:start + length])
        del self.buf[:start + length]
        return data

    def recv(self, timeout: float | None = None) -> Pkt:
        """Next packet: one set aside by :meth:`recv_type` first, else read and
        parse one from the socket. Raises Closed or TimeoutError."""
        if self.inbox:
            return self.inbox.pop(0)
        return parse_packet(self.recv_raw(timeout), self.version)

    def recv_type(self, ptype: str, timeout: float | None = None) -> Pkt:
        """The next packet of type ``ptype``. Packets of other types that arrive
        first (e.g. a PUBLISH before our PUBACK) are set aside for :meth:`recv`."""
        for i, p in enumerate(self.inbox):
            if p.type == ptype:
                return self.inbox.pop(i)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            p = parse_packet(self.recv_raw(max(0.001, deadline - time.monotonic())), self.version)
            if p.type == ptype:
                return p
            self.inbox.append(p)

    def expect_closed(self, timeout: float | None = None) -> list[Pkt]:
        """Read until the peer closes; return the packets received before the close.

        Raises:
            TimeoutError: the connection is still open at the deadline.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = []
        while True:
            try:
                got.append(self.recv(max(0.001, deadline - time.monotonic())))
            except Closed:
                return got

    def expect_silence(self, timeout: float = 0.5) -> None:
        """Assert nothing arrives (and the connection stays open) for ``timeout``."""
        assert not self.inbox, self.inbox
        try:
            p = self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet {p}")

    def connect(self, client_id: str = "", **kw) -> Pkt:
        """Send CONNECT (see :func:`connect_bytes`) and return the CONNACK."""
        kw.setdefault("version", self.version)
        self.send(connect_bytes(client_id, **kw))
        return self.recv_type("CONNACK")

    def subscribe(self, flt: str, qos: int = 0, packet_id: int = 1, *, options: int | None = None,
                  props: dict | list | None = None) -> Pkt:
        """Subscribe to one filter and return the SUBACK."""
        opts = qos if options is None else options
        self.send(subscribe_bytes(packet_id, [(flt, opts)], version=self.version, props=props))
        return self.recv_type("SUBACK")

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, packet_id: int = 0, **kw) -> Pkt | None:
        """Publish; for QoS 1 return the PUBACK, for QoS 2 run the PUBREC/PUBREL/PUBCOMP flow."""
        self.send(publish_bytes(topic, payload, qos=qos, packet_id=packet_id, version=self.version, **kw))
        if qos == 1:
            return self.recv_type("PUBACK")
        if qos == 2:
            rec = self.recv_type("PUBREC")
            self.send(ack_bytes("PUBREL", packet_id))
            self.recv_type("PUBCOMP")
            return rec
        return None

    def ping(self) -> Pkt:
        self.send(PINGREQ)
        return self.recv_type("PINGRESP")

    def disconnect(self, reason: int = 0, props=None) -> None:
        try:
            self.send(disconnect_bytes(self.version, reason, props))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def raw(_watchdog):
    """Factory ``raw(broker, version=5)`` for :class:`RawClient`; all closed at teardown."""
    made: list[RawClient] = []

    def make(broker, version: int = 5, timeout: float = 5.0) -> RawClient:
        c = RawClient(broker, version, timeout)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
