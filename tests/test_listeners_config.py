"""The README's "Production configuration" must be a config the broker accepts
and that works: parsed with the broker's own loader, then run (ports, hosts
and paths swapped for test ones) with clients on every kind of listener."""

import dataclasses
import re
import ssl
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import trustme

from fastmqtt.broker import passwd
from fastmqtt.broker.acl import parse_acl
from fastmqtt.broker.config import config_from_dict
from fastmqtt.broker.listeners import ListenerSpec

README = Path(__file__).resolve().parent.parent / "README.md"


def production_section() -> str:
    text = README.read_text()
    start = text.index("## Production configuration")
    nxt = text.find("\n## ", start + 10)
    return text[start:nxt if nxt != -1 else None]


def block(lang: str, marker: str) -> str:
    for m in re.finditer(rf"```{lang}\n(.*?)```", production_section(), re.S):
        if marker in m.group(1):
            return m.group(1)
    raise AssertionError(f"no ```{lang} block with {marker!r} in the README section")


def test_readme_config_is_valid():
    import tomllib

    cfg = config_from_dict(tomllib.loads(block("toml", "[[listener]]")))
    kinds = [lc.type for lc in cfg.listener_configs()]
    assert sorted(set(kinds)) == ["tcp", "tls", "wss"]
    assert cfg.password_file and cfg.acl_file and cfg.allow_anonymous is False
    assert cfg.metrics_port
    for lc in cfg.listener_configs():
        spec = ListenerSpec(**dataclasses.asdict(lc))  # every key means something to the listener
        assert spec.port > 0


def test_readme_acl_is_valid():
    acl = parse_acl(block("text", "pattern"))
    assert set(acl.users) == {"backend", "dashboard"}
    assert acl.anonymous and acl.patterns


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("prod-tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(d / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "fullchain.pem"))
    device_ca = trustme.CA()
    device_ca.cert_pem.write_to_path(str(d / "device-ca.pem"))
    return SimpleNamespace(ca=ca, device_ca=device_ca, dir=d)


def client_ctx(pki, cert=None):
    ctx = ssl.create_default_context()
    pki.ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


@pytest.mark.integration
def test_readme_config_runs(broker_factory, paho, tmp_path, pki):
    import paho.mqtt.client as mqtt

    text = block("toml", "[[listener]]")
    text = text.replace("/etc/fastmqtt/tls/", f"{pki.dir}/").replace("/etc/fastmqtt/", f"{tmp_path}/")
    text = text.replace("/var/lib/fastmqtt", str(tmp_path / "data"))
    text = re.sub(r'host = "[^"]*"', 'host = "127.0.0.1"', text)
    text = re.sub(r"^port = \d+", "port = 0", text, flags=re.M)
    text = re.sub(r"^metrics_port = \d+", "metrics_port = 0", text, flags=re.M)
    passwd.main(["-c", "-b", str(tmp_path / "passwd"), "backend", "backend-pw"])
    passwd.main(["-b", str(tmp_path / "passwd"), "alice", "alice-pw"])
    passwd.main(["-b", str(tmp_path / "passwd"), "sensor", "sensor-pw"])
    (tmp_path / "acl").write_text(block("text", "pattern"))
    b = broker_factory("fastmqtt", config=text)
    for line in (r"listening on tls://", r"listening on wss://", r"metrics on http://"):
        assert b.wait_for_log(line, timeout=10, since=b.run_start), b.log()
    log = b.log(b.run_start)
    tls_ports = [int(p) for p in re.findall(r"listening on tls://127\.0\.0\.1:(\d+)", log)]
    wss_port = int(re.search(r"listening on wss://127\.0\.0\.1:(\d+)", log).group(1))
    metrics_port = int(re.search(r"metrics on http://[\d.]+:(\d+)/metrics", log).group(1))
    assert len(tls_ports) == 2

    # A browser-like client: MQTT over WebSocket over TLS on /mqtt, as alice.
    alice = paho(b, connect=False, client_id="alice-browser", username="alice", password="alice-pw")
    ws = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alice-browser",
                     protocol=mqtt.MQTTv5, transport="websockets", reconnect_on_failure=False)
    for name in ("on_connect", "on_disconnect", "on_message", "on_subscribe", "on_unsubscribe",
                 "on_publish"):
        setattr(ws, name, getattr(alice.client, name))
    ws.username_pw_set("alice", "alice-pw")
    ws.ws_set_options(path="/mqtt")
    ws.tls_set_context(client_ctx(pki))
    alice.client = ws
    alice.broker = SimpleNamespace(host="127.0.0.1", port=wss_port)
    alice.connect()
    assert alice.subscribe("chat/acme/user/alice", qos=1) == [1]
    assert alice.subscribe("chat/#", qos=1) == [0x87]  # only the pattern is allowed

    # The back end over plain TCP publishes to alice's user topic.
    backend = paho(b, username="backend", password="backend-pw")
    backend.publish("chat/acme/user/alice", b'{"type":"post"}', qos=1)
    assert alice.get(10).payload == b'{"type":"post"}'

    # A device over TLS; and on the client-certificate listener only with a
    # certificate from the device CA.
    dev = paho(SimpleNamespace(host="127.0.0.1", port=tls_ports[0]), connect=False,
               client_id="sensor-1", username="sensor", password="sensor-pw")
    dev.client.tls_set_context(client_ctx(pki))
    dev.connect()
    assert dev.subscribe("device/sensor-1/command", qos=1) == [1]  # pattern device/%c/#
    certified = paho(SimpleNamespace(host="127.0.0.1", port=tls_ports[1]), connect=False,
                     client_id="sensor-2", username="sensor", password="sensor-pw")
    certified.client.tls_set_context(client_ctx(pki, pki.device_ca.issue_cert("sensor-2")))
    certified.connect()

    # Anonymous clients are refused; metrics are served.
    anon = paho(b, connect=False)
    anon.connect(check=False)
    assert anon.connack is not None and anon.connack[1].value == 0x87
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    assert b"fastmqtt_clients_connected 4.0" in body
