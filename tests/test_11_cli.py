"""The ``fastmqtt-broker`` command: --version, -p 0, TOML config, flags over
the file, graceful SIGTERM/SIGINT (v5 clients get DISCONNECT 0x8B), bad config."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

import fastmqtt
from fixtures_broker import BrokerProcess, unique

pytestmark = pytest.mark.integration

SERVER_KEEP_ALIVE = 0x13
RECEIVE_MAXIMUM = 0x21


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "fastmqtt.broker", "--version"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.strip() == f"fastmqtt-broker {fastmqtt.__version__}"


def test_console_script_version():
    exe = shutil.which("fastmqtt-broker")
    assert exe, "the fastmqtt-broker console script is installed by pip install -e ."
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.strip().startswith("fastmqtt-broker ")


def test_help_lists_flags():
    out = subprocess.run([sys.executable, "-m", "fastmqtt.broker", "--help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for flag in ("--config", "--port", "--host", "--data-dir", "--no-persistence", "--max-keepalive",
                 "--durability", "--password-file", "--acl-file", "--allow-anonymous", "--ws-port",
                 "--tls-port", "--certfile", "--keyfile", "--cafile", "--metrics-port", "--version"):
        assert flag in out.stdout, flag


def test_port_zero_logs_real_port(broker, raw):
    # The fixture read the port from "listening on tcp://127.0.0.1:PORT".
    assert broker.port > 0
    assert f"listening on tcp://127.0.0.1:{broker.port}" in broker.log()
    assert raw(broker, 5).connect(unique("p0")).reason_code == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_v5_disconnect_0x8b(broker, raw, sig):
    v5 = raw(broker, 5)
    v5.connect(unique("sd5"))
    v4 = raw(broker, 4)
    v4.connect(unique("sd4"))
    assert broker.stop(sig=sig) == 0
    got = v5.expect_closed()
    assert [(p.type, p.reason_code) for p in got] == [("DISCONNECT", 0x8B)]
    assert v4.expect_closed() == []  # 3.1.1 has no server DISCONNECT


def test_config_file(broker_factory, raw):
    b = broker_factory("fastmqtt", config={"max_keepalive": 7, "receive_maximum": 33})
    ack = raw(b, 5).connect(unique("cfg"), keepalive=60)
    assert ack.properties.get(SERVER_KEEP_ALIVE) == 7
    assert ack.properties.get(RECEIVE_MAXIMUM) == 33


def test_flags_override_config_file(broker_factory, raw):
    b = broker_factory("fastmqtt", config={"max_keepalive": 7}, args=["--max-keepalive", "9"])
    ack = raw(b, 5).connect(unique("ovr"), keepalive=60)
    assert ack.properties.get(SERVER_KEEP_ALIVE) == 9


def test_config_file_port_overridden_by_flag(broker_factory, raw):
    # The file says 1; -p 0 on the command line wins (else the bind would fail).
    b = broker_factory("fastmqtt", config={"port": 1, "host": "127.0.0.1"})
    assert b.port not in (0, 1)
    assert raw(b, 4).connect(unique("po")).reason_code == 0


@pytest.mark.parametrize("text,needle", [
    ("max_keepalive = [", "config"),
    ("no_such_key = 1\n", "no_such_key"),
    ('durability = "sometimes"\n', "durability"),
], ids=["bad_toml", "unknown_key", "bad_value"])
def test_bad_config_file_fails_fast(tmp_path, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    out = subprocess.run([sys.executable, "-m", "fastmqtt.broker", "--host", "127.0.0.1", "-p", "0",
                          "--data-dir", str(tmp_path / "d"), "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert needle.lower() in (out.stderr + out.stdout).lower()


def test_missing_config_file_fails_fast(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastmqtt.broker", "-p", "0", "-c", str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "nope.toml" in out.stderr


def test_port_in_use_fails(broker, tmp_path):
    other = BrokerProcess("fastmqtt", tmp_path / "other", port=broker.port)
    with pytest.raises(RuntimeError):
        other.start(timeout=15)
    assert other.proc.returncode not in (None, 0)
    # One clear line, not a traceback.
    assert "cannot start" in other.log() and "Traceback" not in other.log(), other.log()


def test_verbose_logs_debug(broker_factory, raw):
    b = broker_factory("fastmqtt", args=["-v"])
    mark = b.mark()
    raw(b, 5).connect(unique("verbose"))
    assert b.wait_for_log(r"DEBUG", since=0, timeout=5) is not None, b.log(mark)


def test_no_persistence_forgets_sessions(broker_factory, raw):
    b = broker_factory("fastmqtt", args=["--no-persistence"])
    cid = unique("np")
    c = raw(b, 5)
    c.connect(cid, clean=False, props={0x11: 300})
    c.subscribe("np/t", 1)
    c.disconnect()
    b.restart()
    assert raw(b, 5).connect(cid, clean=False, props={0x11: 300}).session_present is False


def test_persistence_keeps_sessions_across_restart(broker, raw):
    cid = unique("ps")
    c = raw(broker, 5)
    c.connect(cid, clean=False, props={0x11: 300})
    c.subscribe("ps/t", 1)
    c.disconnect()
    broker.restart()
    assert raw(broker, 5).connect(cid, clean=False, props={0x11: 300}).session_present is True


def test_sigterm_exit_code_with_busy_clients(broker, raw, paho):
    # Shutdown while messages are flowing still exits 0.
    sub = paho(broker, 5)
    sub.subscribe("busy/#", 1)
    pub = raw(broker, 5)
    pub.connect(unique("busy"))
    for i in range(50):
        pub.publish(f"busy/{i}", b"x" * 1000, qos=1, packet_id=i + 1)
    assert broker.stop() == 0
    assert sub.wait_disconnected(5)
