"""MQTT over TLS: paho-mqtt against fastmqtt-broker and Mosquitto with the same
certificates (made by trustme), server-only and with client certificates."""

import socket
import ssl
from types import SimpleNamespace

import pytest
import trustme

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    d = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_pem.write_to_path(str(d / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return SimpleNamespace(ca=ca, certfile=str(d / "server.pem"), keyfile=str(d / "server.key"),
                           cafile=str(d / "ca.pem"))


def start_tls(broker_factory, impl, pki, require_certificate=False):
    """A broker whose TLS listener uses ``pki``; returns an address object."""
    if impl == "mosquitto":
        lines = [f"certfile {pki.certfile}", f"keyfile {pki.keyfile}"]
        if require_certificate:
            lines += [f"cafile {pki.cafile}", "require_certificate true"]
        b = broker_factory("mosquitto", mosquitto_conf=lines, start=False)
        # The harness's readiness check is a plain TCP connect, which a TLS
        # listener accepts too.
        b.start()
        return SimpleNamespace(host=b.host, port=b.port, broker=b)
    extra = ""
    if require_certificate:
        extra = f'cafile = "{pki.cafile}"\nrequire_certificate = true\n'
    config = (
        "persistence = false\nsys_interval = 0\n"
        '[[listener]]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listener]]\ntype = "tls"\nhost = "127.0.0.1"\nport = 0\n'
        f'certfile = "{pki.certfile}"\nkeyfile = "{pki.keyfile}"\n{extra}')
    b = broker_factory("fastmqtt", config=config)
    m = b.wait_for_log(r"listening on tls://127\.0\.0\.1:(\d+)", timeout=10, since=b.run_start)
    assert m, b.log()
    return SimpleNamespace(host=b.host, port=int(m.group(1)), broker=b)


def client_context(pki, cert=None):
    ctx = ssl.create_default_context()
    pki.ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def tls_client(paho, addr, ctx, version=5, **kw):
    c = paho(addr, version=version, connect=False, **kw)
    c.client.tls_set_context(ctx)
    return c


def refused(client) -> bool:
    """Try to connect; True when the TLS or MQTT connection was refused."""
    try:
        client.connect(timeout=5, check=False)
    except (ssl.SSLError, OSError, TimeoutError):
        return True
    return client.connack is None or client.connack[1].is_failure or client.wait_disconnected(1)


@pytest.mark.parametrize("version", [4, 5])
def test_tls_publish_subscribe(broker_factory, paho, impl, pki, version):
    addr = start_tls(broker_factory, impl, pki)
    sub = tls_client(paho, addr, client_context(pki), version=version)
    sub.connect()
    assert sub.subscribe("tls/#", qos=1) == [1]
    pub = tls_client(paho, addr, client_context(pki), version=version)
    pub.connect()
    pub.publish("tls/a", b"secret", qos=1)
    m = sub.get(10)
    assert (m.topic, m.payload, m.qos) == ("tls/a", b"secret", 1)


def test_tls_untrusted_server_refused_by_client(broker_factory, paho, impl, pki):
    addr = start_tls(broker_factory, impl, pki)
    c = tls_client(paho, addr, ssl.create_default_context())  # does not trust our CA
    with pytest.raises(ssl.SSLError):
        c.connect(timeout=5)


def test_tls_client_certificate_required(broker_factory, paho, impl, pki):
    addr = start_tls(broker_factory, impl, pki, require_certificate=True)
    assert refused(tls_client(paho, addr, client_context(pki)))
    stranger = trustme.CA().issue_cert("mallory@example.com")
    assert refused(tls_client(paho, addr, client_context(pki, stranger)))
    good = tls_client(paho, addr, client_context(pki, pki.ca.issue_cert("alice@example.com")))
    good.connect()
    assert good.subscribe("cert/#", qos=1) == [1]
    good.publish("cert/x", b"ok", qos=1)
    assert good.get(10).payload == b"ok"


def test_plain_mqtt_on_tls_port_is_dropped(broker_factory, raw, paho, pki):
    """A client speaking plain MQTT to the TLS port fails the handshake and is
    closed; the listener keeps serving TLS clients."""
    addr = start_tls(broker_factory, "fastmqtt", pki)
    r = raw(addr, version=4)
    r.send(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
    packets = []
    try:
        packets = r.expect_closed(timeout=10)
    except Exception as exc:  # a TLS alert is not an MQTT packet
        assert not isinstance(exc, TimeoutError), exc
    assert all(p.type != "CONNACK" for p in packets)
    assert addr.broker.wait_for_log("TLS handshake failed", timeout=5)
    ok = tls_client(paho, addr, client_context(pki))
    ok.connect()


def test_tls_flags_on_the_command_line(broker_factory, paho, pki):
    """--tls-port/--certfile/--keyfile add a TLS listener next to TCP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = broker_factory("fastmqtt", args=["--no-persistence", "--tls-port", str(port),
                                         "--certfile", pki.certfile, "--keyfile", pki.keyfile])
    assert b.wait_for_log(rf"listening on tls://127\.0\.0\.1:{port}", timeout=10, since=b.run_start)
    tls = tls_client(paho, SimpleNamespace(host="127.0.0.1", port=port), client_context(pki))
    tls.connect()
    assert tls.subscribe("mix/#", qos=1) == [1]
    plain = paho(b)  # the TCP listener still works, and both see each other
    plain.publish("mix/a", b"from tcp", qos=1)
    assert tls.get(10).payload == b"from tcp"


class CertificateUser:
    """Example auth plug-in (used by the broker process below through
    ``auth_plugin = "test_tls:CertificateUser"``): the user name must be the
    commonName of the verified client certificate, read from
    ``fastmqtt.broker.listeners.connection_info``."""

    def __init__(self, config):
        pass

    async def authenticate(self, client_id, username, password, connect):
        from fastmqtt.broker.listeners import connection_info

        info = connection_info.get()
        cn = info.certificate_common_name if info is not None else None
        if cn is None:
            return 0x87
        return 0 if username == cn else 0x86


def test_certificate_identity_plugin(broker_factory, paho, pki):
    """A client certificate's commonName vouches for the user name, through an
    auth plug-in reading the listener's connection_info."""
    tests_dir = str(__import__("pathlib").Path(__file__).resolve().parent)
    config = (
        "persistence = false\nsys_interval = 0\n"
        'auth_plugin = "test_tls:CertificateUser"\n'
        '[[listener]]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listener]]\ntype = "tls"\nhost = "127.0.0.1"\nport = 0\n'
        f'certfile = "{pki.certfile}"\nkeyfile = "{pki.keyfile}"\n'
        f'cafile = "{pki.cafile}"\n')
    b = broker_factory("fastmqtt", config=config, env={"PYTHONPATH": tests_dir})
    m = b.wait_for_log(r"listening on tls://127\.0\.0\.1:(\d+)", timeout=10, since=b.run_start)
    assert m, b.log()
    addr = SimpleNamespace(host="127.0.0.1", port=int(m.group(1)))
    cert = pki.ca.issue_cert("sensor-9", common_name="sensor-9")
    good = tls_client(paho, addr, client_context(pki, cert), client_id="s9", username="sensor-9")
    good.connect()
    liar = tls_client(paho, addr, client_context(pki, cert), client_id="s10", username="sensor-10")
    liar.connect(check=False)
    assert liar.connack[1].value == 0x86
    no_cert = tls_client(paho, addr, client_context(pki), client_id="s11", username="sensor-9")
    no_cert.connect(check=False)
    assert no_cert.connack[1].value == 0x87
    plain = paho(b, connect=False, client_id="s12", username="sensor-9")  # TCP: no certificate
    plain.connect(check=False)
    assert plain.connack[1].value == 0x87
