"""MQTT over WebSocket (``--ws-port``), driven by paho's websocket transport and
compared with Mosquitto's ``protocol websockets`` listener. A WebSocket client
and a TCP client share one broker: messages cross between them."""

from __future__ import annotations

import pytest

from fixtures_broker import BrokerProcess, free_port, unique, wait_port

pytestmark = pytest.mark.integration


class _WsEndpoint:
    """``host``/``port`` view of a broker's WebSocket listener for PahoClient."""

    def __init__(self, broker, port):
        self.host, self.port, self.impl = broker.host, port, broker.impl


@pytest.fixture(scope="module", params=["fastmqtt", "mosquitto"])
def ws_broker(request, tmp_path_factory):
    ws_port = free_port()
    d = tmp_path_factory.mktemp(f"ws-{request.param}")
    if request.param == "fastmqtt":
        b = BrokerProcess("fastmqtt", d, args=["--ws-port", str(ws_port)])
    else:
        b = BrokerProcess("mosquitto", d, mosquitto_conf=[f"listener {ws_port} 127.0.0.1", "protocol websockets"])
    try:
        b.start()
        if b.impl == "fastmqtt":
            assert b.wait_for_log(rf"listening on ws://\S+:{ws_port}", timeout=10), b.log()
        wait_port(b.host, ws_port)
        yield b, _WsEndpoint(b, ws_port)
    finally:
        b.kill()


def ws_client(paho, endpoint, version, **kw):
    c = paho(endpoint, version, connect=False, **kw)
    c.client._transport = "websockets"  # paho 2.x: set before connect
    c.client.ws_set_options(path="/mqtt")
    c.connect()
    return c


@pytest.mark.parametrize("version", [4, 5])
def test_websocket_to_tcp_and_back(ws_broker, paho, version):
    broker, ws = ws_broker
    topic = unique("ws")
    web = ws_client(paho, ws, version)
    tcp = paho(broker, version)
    assert web.subscribe(topic + "/down", 1) == [1]
    assert tcp.subscribe(topic + "/up", 1) == [1]
    web.publish(topic + "/up", b"from the browser", qos=1)
    assert tcp.get().payload == b"from the browser"
    tcp.publish(topic + "/down", b"to the browser", qos=1)
    m = web.get()
    assert (m.topic, m.payload, m.qos) == (topic + "/down", b"to the browser", 1)


def test_websocket_large_message(ws_broker, paho):
    # A message larger than one WebSocket frame a client would typically send.
    broker, ws = ws_broker
    topic = unique("wsbig")
    web = ws_client(paho, ws, 5)
    web.subscribe(topic, 1)
    big = bytes(range(256)) * 1024  # 256 KiB
    paho(broker, 5).publish(topic, big, qos=1, timeout=10)
    assert web.get(timeout=10).payload == big


def test_websocket_will_on_drop(ws_broker, paho):
    broker, ws = ws_broker
    topic = unique("wswill")
    watcher = paho(broker, 5)
    watcher.subscribe(topic, 1)
    web = ws_client(paho, ws, 5, will=(topic, b"tab closed", 1, False))
    web.drop()
    assert watcher.get().payload == b"tab closed"
