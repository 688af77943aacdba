"""Broker URLs and Client address handling."""

from __future__ import annotations

import pytest

from fastmqtt.client import Client
from fastmqtt.client.connection import BrokerURL, parse_url


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker", BrokerURL("tcp", "broker", 1883, False)),
    ("tcp://10.0.0.1:1884", BrokerURL("tcp", "10.0.0.1", 1884, False)),
    ("mqtts://broker", BrokerURL("tcp", "broker", 8883, True)),
    ("ssl://broker:9000", BrokerURL("tcp", "broker", 9000, True)),
    ("ws://broker:8080", BrokerURL("ws", "broker", 8080, False, "/mqtt")),
    ("wss://broker/custom/path?x=1", BrokerURL("ws", "broker", 443, True, "/custom/path?x=1")),
    ("mqtt://u%40x:p%3Aw@broker", BrokerURL("tcp", "broker", 1883, False, "/mqtt", "u@x", "p:w")),
    ("mqtt://[::1]:1883", BrokerURL("tcp", "::1", 1883, False)),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://broker", "mqtt://", "broker:1883"])
def test_parse_url_rejects(url):
    with pytest.raises(ValueError):
        parse_url(url)


def test_str_round_trip():
    for url in ["mqtt://h:1", "mqtts://h:2", "ws://h:3/mqtt", "wss://h:4/x"]:
        assert str(parse_url(url)) == url


def test_client_address_forms():
    c = Client("h", urls=["ws://other:8080/mqtt"], transport="websockets", tls=True, ws_path="/m")
    assert c.urls == [BrokerURL("ws", "h", 443, True, "/m"), BrokerURL("ws", "other", 8080, False)]
    c = Client("mqtt://user:secret@h:1999")
    assert c.urls[0].port == 1999 and c._protocol.username == "user"
    assert c._protocol.password == b"secret"
    assert Client("h").client_id.startswith("fastmqtt-")
    with pytest.raises(ValueError):
        Client()
