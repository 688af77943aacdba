"""MQTT.js (npm ``mqtt``, under node) against fastmqtt-broker over ws:// and wss://,
cross-checked with paho-mqtt over TCP on the same broker.

MQTT.js is what browser chat clients use; browser dashboards connect to
``ws://host:9001`` with no path, MQTT.js examples to ``/mqtt`` — both must work.
The node side is ``tests/js/client.mjs`` (a scripted client printing one JSON
event per line); ``scripts/test.sh`` installs MQTT.js from ``tests/js/package.json``.
"""

import json
import os
import re
import selectors
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
import trustme

from fastmqtt.broker.auth import hash_password

pytestmark = pytest.mark.integration

JS_DIR = os.path.join(os.path.dirname(__file__), "js")
NODE = shutil.which("node") or "node"


class JsClient:
    """One ``node client.mjs`` process; events are read with deadlines."""

    def __init__(self, cfg: dict) -> None:
        self.proc = subprocess.Popen([NODE, os.path.join(JS_DIR, "client.mjs"), json.dumps(cfg)],
                                     cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[dict] = []
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout.fileno(), selectors.EVENT_READ)

    def _read_event(self, deadline: float) -> dict | None:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise TimeoutError(f"node client: no event in time; so far {self.events}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        ev = json.loads(line)
        self.events.append(ev)
        return ev

    def wait(self, name: str, timeout: float = 15.0) -> dict:
        """Events up to and including the first one called ``name``."""
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev["event"] == name:
                return ev
        while True:
            ev = self._read_event(deadline)
            if ev is None:
                raise AssertionError(f"node client exited before {name!r}: {self.events} "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            if ev["event"] == name:
                return ev

    def finish(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self._read_event(deadline) is not None:
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def of(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]


@pytest.fixture
def js():
    made = []

    def make(cfg):
        c = JsClient(cfg)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()


def listener_ports(b) -> dict:
    """type -> bound port, from the broker's 'listening on TYPE://HOST:PORT' lines."""
    ports = {}
    for kind, port in re.findall(r"listening on (\w+)://127\.0\.0\.1:(\d+)", b.log(b.run_start)):
        ports.setdefault(kind, int(port))
    return ports


def start(broker_factory, listeners: list[dict], top: str = "") -> tuple:
    text = "persistence = false\nsys_interval = 0\n" + top + "\n"
    text += '[[listener]]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
    for lst in listeners:
        text += "\n[[listener]]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in {"host": "127.0.0.1", "port": 0, **lst}.items())
    b = broker_factory("fastmqtt", config=text)
    want = {"tcp"} | {lst["type"] for lst in listeners}
    for kind in want:
        assert b.wait_for_log(rf"listening on {kind}://", timeout=10, since=b.run_start), b.log()
    return b, listener_ports(b)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("wss-certs")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return SimpleNamespace(ca=ca, certfile=str(d / "cert.pem"), keyfile=str(d / "key.pem"),
                           cafile=str(d / "ca.pem"))


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("path", ["/mqtt", ""])
def test_mqttjs_ws_both_directions_with_paho(broker_factory, paho, js, path, version):
    """MQTT.js over ws receives what paho publishes over TCP, and its own
    publishes reach paho, for /mqtt and for no path, v3.1.1 and v5."""
    b, ports = start(broker_factory, [{"type": "ws"}])
    watcher = paho(b, version=version)
    assert watcher.subscribe("chat/out", qos=1) == [1]
    node = js({"url": f"ws://127.0.0.1:{ports['ws']}{path}",
               "options": {"protocolVersion": version, "clientId": f"js-{version}"},
               "subscribe": [["chat/in", 1]], "echo": {"from": "chat/in", "to": "chat/out"},
               "expect": 2, "timeout_ms": 15000})
    assert node.wait("connect")["reasonCode"] == 0
    assert node.wait("suback")["granted"] == [1]
    node.wait("ready")
    sender = paho(b, version=version)
    sender.publish("chat/in", b'{"type":"post","id":1}', qos=1)
    sender.publish("chat/in", "ünïcode ✓".encode(), qos=0)
    got = watcher.get_n(2, timeout=15)
    assert sorted(m.payload for m in got) == sorted([b'{"type":"post","id":1}', "ünïcode ✓".encode()])
    assert node.finish() == 0
    assert [e["payload"] for e in node.of("message")] == ['{"type":"post","id":1}', "ünïcode ✓"]


def test_mqttjs_large_message_over_ws(broker_factory, paho, js):
    """A payload much larger than one TCP segment or WS frame buffer arrives whole."""
    b, ports = start(broker_factory, [{"type": "ws"}])
    big = "x" * 300_000
    node = js({"url": f"ws://127.0.0.1:{ports['ws']}/mqtt", "options": {"protocolVersion": 5},
               "subscribe": [["big/#", 1]], "publish": [{"topic": "big/1", "payload": "x", "repeat": len(big), "qos": 1}],
               "expect": 1, "timeout_ms": 15000})
    assert node.finish() == 0
    assert [len(m["payload"]) for m in node.of("message")] == [len(big)], [
        {k: (v if k != "payload" else len(v)) for k, v in e.items()} for e in node.events]
    assert node.of("message")[0]["payload"] == big


@pytest.mark.parametrize("listener_path,url_path", [("/mqtt", "/mqtt"), (None, "")])
def test_mqttjs_wss(broker_factory, paho, js, certs, listener_path, url_path):
    lst = {"type": "wss", "certfile": certs.certfile, "keyfile": certs.keyfile}
    if listener_path:
        lst["path"] = listener_path
    b, ports = start(broker_factory, [lst])
    watcher = paho(b)
    watcher.subscribe("secure/#", qos=1)
    node = js({"url": f"wss://127.0.0.1:{ports['wss']}{url_path}", "ca": certs.cafile,
               "options": {"protocolVersion": 5},
               "subscribe": [["secure/#", 1]],
               "publish": [{"topic": "secure/a", "payload": "over tls", "qos": 1}],
               "expect": 1, "timeout_ms": 15000})
    assert node.finish() == 0
    assert node.of("message")[0]["payload"] == "over tls"
    assert watcher.get(10).payload == b"over tls"


def test_mqttjs_wss_untrusted_certificate_fails(broker_factory, js, certs):
    b, ports = start(broker_factory, [{"type": "wss", "certfile": certs.certfile,
                                       "keyfile": certs.keyfile}])
    node = js({"url": f"wss://127.0.0.1:{ports['wss']}/", "options": {"rejectUnauthorized": True},
               "timeout_ms": 10000})
    assert node.finish() == 1
    assert node.of("error") and not node.of("connect")


def test_mqttjs_fixed_path_refuses_others(broker_factory, js):
    b, ports = start(broker_factory, [{"type": "ws", "path": "/mqtt"}])
    node = js({"url": f"ws://127.0.0.1:{ports['ws']}/other", "timeout_ms": 10000})
    assert node.finish() == 1
    assert not node.of("connect")
    ok = js({"url": f"ws://127.0.0.1:{ports['ws']}/mqtt", "timeout_ms": 10000})
    assert ok.finish() == 0 and ok.of("connect")


@pytest.mark.parametrize("version,bad_code", [(5, 134), (4, 4)])
def test_mqttjs_password_file(broker_factory, js, tmp_path, version, bad_code):
    pw = tmp_path / "passwd"
    pw.write_text(f"alice:{hash_password('wonderland')}\n")
    b, ports = start(broker_factory, [{"type": "ws"}], f'password_file = "{pw}"\n')
    url = f"ws://127.0.0.1:{ports['ws']}/mqtt"
    good = js({"url": url, "options": {"protocolVersion": version, "username": "alice",
                                       "password": "wonderland"}, "timeout_ms": 10000})
    assert good.finish() == 0 and good.wait("connect")["reasonCode"] == 0
    bad = js({"url": url, "options": {"protocolVersion": version, "username": "alice",
                                      "password": "nope"}, "timeout_ms": 10000})
    assert bad.finish() == 1
    assert bad.of("error")[0]["code"] == bad_code  # 0x86 / 3.1.1 return code 4


def test_mqttjs_acl_denials(broker_factory, js, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic read app/ws/channel/+\npattern readwrite app/ws/user/%c\n")
    b, ports = start(broker_factory, [{"type": "ws"}], f'acl_file = "{acl}"\n')
    node = js({"url": f"ws://127.0.0.1:{ports['ws']}/mqtt",
               "options": {"protocolVersion": 5, "clientId": "u1"},
               "subscribe": [["app/ws/channel/general", 1], ["app/ws/#", 1], ["app/ws/user/u1", 1]],
               "publish": [{"topic": "app/ws/channel/general", "payload": "read-only", "qos": 1},
                           {"topic": "app/ws/user/u1", "payload": "mine", "qos": 1}],
               "expect": 1, "timeout_ms": 15000})
    assert node.finish() == 0, node.events
    denied, allowed = node.of("published")
    assert denied["code"] == 0x87 and "error" in denied  # v5 PUBACK 0x87
    assert "error" not in allowed
    assert [m["payload"] for m in node.of("message")] == ["mine"]
    subacks = {e["filter"]: e for e in node.of("suback")}
    assert subacks["app/ws/channel/general"]["granted"] == [1]
    # 'topic read app/ws/channel/+' does not cover 'app/ws/#': SUBACK 0x87
    assert "Not authorized" in subacks["app/ws/#"]["error"]
    assert subacks["app/ws/user/u1"]["granted"] == [1]
    assert node.of("message")[0]["payload"] == "mine"


def test_ws_port_flag(broker_factory, js):
    """--ws-port adds a WebSocket listener (any path) next to TCP."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = broker_factory("fastmqtt", args=["--no-persistence", "--ws-port", str(port)])
    assert b.wait_for_log(rf"listening on ws://127\.0\.0\.1:{port}", timeout=10, since=b.run_start)
    node = js({"url": f"ws://127.0.0.1:{port}", "subscribe": [["f/#", 0]],
               "publish": [{"topic": "f/1", "payload": "flag", "qos": 0}], "expect": 1})
    assert node.finish() == 0
    assert node.of("message")[0]["payload"] == "flag"
