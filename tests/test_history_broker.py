"""Chat history through a real broker: ``$history/<topic>`` requests from MQTT
5.0 and 3.1.1 clients (paho), answered on the response topic."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

CONFIG = {"history": ["chat/+/channel/+", "chat/+/dm/+"], "history_max_messages": 50}
CH = "chat/acme/channel/general"


@pytest.fixture
def hbroker(broker_factory):
    return broker_factory("fastmqtt", config=CONFIG)


def ask_v5(client, topic, body, response_topic="hist/resp", correlation=b"corr"):
    client.publish("$history/" + topic, json.dumps(body) if body is not None else b"", qos=1,
                   ResponseTopic=response_topic, CorrelationData=correlation)
    m = client.get(10)
    assert m.topic == response_topic
    assert m.properties.CorrelationData == correlation  # [MQTT-4.10]
    assert m.properties.ContentType == "application/json"
    return json.loads(m.payload)


def test_v5_client_pages_through_history(hbroker, paho):
    pub = paho(hbroker, client_id="h-pub")
    for i in range(12):
        pub.publish(CH, json.dumps({"type": "post", "id": i}), qos=1)
    pub.publish(CH, json.dumps({"type": "typing"}), qos=0)  # QoS 0: not kept
    pub.publish("chat/acme/user/u1", b"status", qos=1)  # not a history topic
    cli = paho(hbroker, client_id="h-cli")
    cli.subscribe("hist/resp", qos=1)
    ids, cursor = [], None
    for _ in range(5):
        body = {"limit": 5} if cursor is None else {"limit": 5, "before": cursor}
        page = ask_v5(cli, CH, body)
        ids = [json.loads(m["payload"])["id"] for m in page["messages"]] + ids
        cursor = page["next"]
        if cursor is None:
            break
    assert ids == list(range(12))
    empty = ask_v5(cli, "chat/acme/user/u1", None)
    assert empty["error"] == "no history" and empty["messages"] == []


def test_v311_client_names_response_topic_in_payload(hbroker, paho):
    pub = paho(hbroker, version=4, client_id="h3-pub")
    for i in range(3):
        pub.publish("chat/acme/dm/d1", json.dumps({"i": i}), qos=1)
    cli = paho(hbroker, version=4, client_id="h3-cli")
    cli.subscribe("h3/resp", qos=1)
    cli.publish("$history/chat/acme/dm/d1",
                json.dumps({"response_topic": "h3/resp", "correlation": "abc", "limit": 2}), qos=1)
    m = cli.get(10)
    body = json.loads(m.payload)
    assert m.topic == "h3/resp" and body["correlation"] == "abc"
    assert [json.loads(x["payload"])["i"] for x in body["messages"]] == [1, 2]
    assert body["next"] is not None


def test_history_is_off_without_configuration(broker, paho):
    pub = paho(broker, client_id="off-pub")
    pub.publish(CH, b"x", qos=1)
    cli = paho(broker, client_id="off-cli")
    cli.subscribe("off/resp", qos=1)
    cli.publish("$history/" + CH, b"", qos=1, ResponseTopic="off/resp", CorrelationData=b"1")
    cli.expect_nothing(0.5)
