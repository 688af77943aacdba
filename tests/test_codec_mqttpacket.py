"""Cross-check both codecs against mqtt-packet, the JavaScript codec under
MQTT.js and aedes (installed with MQTT.js by scripts/test.sh into tests/js).

tests/js/codec_crosscheck.mjs runs mqtt-packet on batches of JSON requests:
packets we encode are parsed by mqtt-packet and give the same fields, and
packets mqtt-packet generates from the same fields decode with ours to the same
packet, in MQTT 5.0 and 3.1.1.

mqtt-packet models User Properties as an object (name -> value or list of
values), so pairs are compared grouped by name in first-appearance order; that
is the only liberty taken. Known gaps of mqtt-packet 9, avoided and not counted
against us: it cannot parse an AUTH of remaining length 0 (3.15.2 allows it);
it loses a repeated User Property name's earlier value when that value is "";
a "__proto__" User Property name is not an ordinary key in its object; and it
refuses to write a password without a user name in MQTT 5.0, or an empty client
id without clean start or in 3.1 (client rules; the codec leaves them to the
server). User Property names that look like array indexes come first in a
JavaScript object, so the grouping follows that order on both sides.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from codec_strategies import normalise, packets
from fastmqtt.enums import (
    BOOLEAN_PROPERTIES, CONNACK_V5_TO_V311, CONNACK_V311_TO_V5, PropertyId as P,
)

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

JS_DIR = Path(__file__).parent / "js"
HELPER = JS_DIR / "codec_crosscheck.mjs"
# Each example is one batch of 40 packets through one node process; shrinking
# would rerun node hundreds of times, so failures report the packet instead.
SETTINGS = settings(max_examples=3, deadline=None, phases=[Phase.generate], database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])

NAMES = {
    P.PAYLOAD_FORMAT_INDICATOR: "payloadFormatIndicator",
    P.MESSAGE_EXPIRY_INTERVAL: "messageExpiryInterval",
    P.CONTENT_TYPE: "contentType",
    P.RESPONSE_TOPIC: "responseTopic",
    P.CORRELATION_DATA: "correlationData",
    P.SUBSCRIPTION_IDENTIFIER: "subscriptionIdentifier",
    P.SESSION_EXPIRY_INTERVAL: "sessionExpiryInterval",
    P.ASSIGNED_CLIENT_IDENTIFIER: "assignedClientIdentifier",
    P.SERVER_KEEP_ALIVE: "serverKeepAlive",
    P.AUTHENTICATION_METHOD: "authenticationMethod",
    P.AUTHENTICATION_DATA: "authenticationData",
    P.REQUEST_PROBLEM_INFORMATION: "requestProblemInformation",
    P.WILL_DELAY_INTERVAL: "willDelayInterval",
    P.REQUEST_RESPONSE_INFORMATION: "requestResponseInformation",
    P.RESPONSE_INFORMATION: "responseInformation",
    P.SERVER_REFERENCE: "serverReference",
    P.REASON_STRING: "reasonString",
    P.RECEIVE_MAXIMUM: "receiveMaximum",
    P.TOPIC_ALIAS_MAXIMUM: "topicAliasMaximum",
    P.TOPIC_ALIAS: "topicAlias",
    P.MAXIMUM_QOS: "maximumQoS",
    P.RETAIN_AVAILABLE: "retainAvailable",
    P.USER_PROPERTY: "userProperties",
    P.MAXIMUM_PACKET_SIZE: "maximumPacketSize",
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: "wildcardSubscriptionAvailable",
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: "subscriptionIdentifiersAvailable",
    P.SHARED_SUBSCRIPTION_AVAILABLE: "sharedSubscriptionAvailable",
}
IDS = {name: ident for ident, name in NAMES.items()}
CMDS = {"Connect": "connect", "Connack": "connack", "Publish": "publish", "Puback": "puback",
        "Pubrec": "pubrec", "Pubrel": "pubrel", "Pubcomp": "pubcomp",
        "Subscribe": "subscribe", "Suback": "suback", "Unsubscribe": "unsubscribe",
        "Unsuback": "unsuback", "Pingreq": "pingreq", "Pingresp": "pingresp",
        "Disconnect": "disconnect", "Auth": "auth"}
CLASSES = {cmd: cls for cls, cmd in CMDS.items()}


def _run_helper(requests: list[dict]) -> list[dict]:
    node = shutil.which("node")
    assert node, "node missing"
    assert (JS_DIR / "node_modules" / "mqtt-packet").is_dir(), (
        "mqtt-packet missing: run scripts/test.sh (it installs tests/js)")
    proc = subprocess.run([node, str(HELPER)], input="\n".join(map(json.dumps, requests)),
                          capture_output=True, text=True, timeout=60, cwd=JS_DIR)
    assert proc.returncode == 0, proc.stderr
    # split("\n"), not splitlines(): JSON text may hold U+2028 or U+0085 unescaped.
    answers = [json.loads(line) for line in proc.stdout.split("\n") if line]
    assert len(answers) == len(requests)
    return answers


# -- our packets <-> mqtt-packet objects --------------------------------------


def _props_to_js(props, packet_cmd: str) -> dict:
    out: dict = {}
    for ident, value in props.items():
        name = NAMES[ident]
        if ident == P.USER_PROPERTY:
            grouped: dict = {}
            for key, val in value:
                grouped.setdefault(key, []).append(val)
            out[name] = {k: (v[0] if len(v) == 1 else v) for k, v in grouped.items()}
        elif ident == P.SUBSCRIPTION_IDENTIFIER:
            out[name] = list(value) if packet_cmd == "publish" and len(value) > 1 else value[0]
        elif isinstance(value, bytes):
            out[name] = {"hex": value.hex()}
        elif ident in BOOLEAN_PROPERTIES and ident != P.MAXIMUM_QOS:
            out[name] = bool(value)  # mqtt-packet takes these as JavaScript booleans
        else:
            out[name] = value
    return out


def _props_from_js(obj) -> dict:
    out = {}
    for name, value in (obj or {}).items():
        ident = IDS[name]
        if ident == P.USER_PROPERTY:
            pairs = []
            for key, val in value.items():
                for item in (val if isinstance(val, list) else [val]):
                    pairs.append((key, item))
            value = tuple(pairs)
        elif ident == P.SUBSCRIPTION_IDENTIFIER:
            value = tuple(value) if isinstance(value, list) else (value,)
        elif isinstance(value, dict) and "hex" in value:
            value = bytes.fromhex(value["hex"])
        elif isinstance(value, bool):
            value = int(value)
        out[ident] = value
    return out


def _is_array_index(key: str) -> bool:
    return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") \
        and int(key) < 2**32 - 1


def _canon_props(props) -> dict:
    """Properties with User Properties grouped by name as a JavaScript object
    holds them: array-index names first in numeric order, then the others in
    first-appearance order (mqtt-packet's model)."""
    props = dict(props)
    if P.USER_PROPERTY in props:
        grouped: dict = {}
        for key, val in props[P.USER_PROPERTY]:
            grouped.setdefault(key, []).append(val)
        order = sorted((k for k in grouped if _is_array_index(k)), key=int) + [
            k for k in grouped if not _is_array_index(k)]
        props[P.USER_PROPERTY] = tuple((k, v) for k in order for v in grouped[k])
    return props


def canon(packet) -> tuple:
    """A packet as plain comparable values, User Properties grouped by name."""
    name = type(packet).__name__
    fields = []
    for field in ("client_id", "clean_start", "keep_alive", "username", "password",
                  "protocol_level", "session_present", "reason_code", "topic", "payload",
                  "qos", "retain", "dup", "packet_id", "reason_codes", "topic_filters"):
        if hasattr(packet, field):
            fields.append((field, getattr(packet, field)))
    if hasattr(packet, "properties"):
        fields.append(("properties", _canon_props(packet.properties)))
    will = getattr(packet, "will", None)
    if will is not None:
        fields.append(("will", (will.topic, will.payload, will.qos, bool(will.retain),
                                _canon_props(will.properties))))
    for sub in getattr(packet, "subscriptions", ()):
        fields.append(("sub", (sub.topic_filter, sub.qos, bool(sub.no_local),
                               bool(sub.retain_as_published), sub.retain_handling)))
    return (name, tuple((k, v) for k, v in fields))


def to_js(packet, version: int) -> dict:
    name = type(packet).__name__
    cmd = CMDS[name]
    obj: dict = {"cmd": cmd}
    props = getattr(packet, "properties", None)
    if version == 5 and props:
        obj["properties"] = _props_to_js(props, cmd)
    if name == "Connect":
        level = packet.protocol_level or version
        obj.update(protocolId="MQIsdp" if level == 3 else "MQTT", protocolVersion=level,
                   clean=bool(packet.clean_start), clientId=packet.client_id,
                   keepalive=packet.keep_alive)
        if level != 5:
            obj.pop("properties", None)
        if packet.username is not None:
            obj["username"] = packet.username
        if packet.password is not None:
            obj["password"] = {"hex": packet.password.hex()}
        if packet.will is not None:
            w = packet.will
            obj["will"] = {"topic": w.topic, "payload": {"hex": w.payload.hex()},
                           "qos": w.qos, "retain": bool(w.retain)}
            if level == 5 and w.properties:
                obj["will"]["properties"] = _props_to_js(w.properties, "will")
    elif name == "Connack":
        obj["sessionPresent"] = bool(packet.session_present)
        if version == 5:
            obj["reasonCode"] = packet.reason_code
        else:
            obj["returnCode"] = CONNACK_V5_TO_V311[packet.reason_code]
    elif name == "Publish":
        obj.update(topic=packet.topic, payload={"hex": packet.payload.hex()}, qos=packet.qos,
                   retain=bool(packet.retain), dup=bool(packet.dup))
        if packet.qos:
            obj["messageId"] = packet.packet_id
    elif name in ("Puback", "Pubrec", "Pubrel", "Pubcomp"):
        obj["messageId"] = packet.packet_id
        if version == 5:
            obj["reasonCode"] = packet.reason_code
    elif name == "Subscribe":
        obj["messageId"] = packet.packet_id
        obj["subscriptions"] = [
            {"topic": s.topic_filter, "qos": s.qos, "nl": bool(s.no_local),
             "rap": bool(s.retain_as_published), "rh": s.retain_handling}
            for s in packet.subscriptions]
    elif name in ("Suback", "Unsuback"):
        obj["messageId"] = packet.packet_id
        if name == "Suback" or version == 5:
            obj["granted"] = list(packet.reason_codes)
    elif name == "Unsubscribe":
        obj["messageId"] = packet.packet_id
        obj["unsubscriptions"] = list(packet.topic_filters)
    elif name in ("Disconnect", "Auth"):
        if version == 5:
            obj["reasonCode"] = packet.reason_code
    return obj


def from_js(codec, obj: dict, version: int):
    c = codec
    cls = CLASSES[obj["cmd"]]
    props = _props_from_js(obj.get("properties")) or None
    if cls == "Connect":
        will = None
        if obj.get("will"):
            w = obj["will"]
            will = c.Will(w["topic"], bytes.fromhex(w["payload"]["hex"]), w["qos"],
                          w["retain"], _props_from_js(w.get("properties")) or None)
        password = obj.get("password")
        return c.Connect(obj["clientId"], obj["clean"], obj["keepalive"], obj.get("username"),
                         bytes.fromhex(password["hex"]) if password else None, will, props,
                         obj["protocolVersion"])
    if cls == "Connack":
        code = obj["reasonCode"] if version == 5 else CONNACK_V311_TO_V5[obj["returnCode"]]
        return c.Connack(obj["sessionPresent"], code, props)
    if cls == "Publish":
        return c.Publish(obj["topic"], bytes.fromhex(obj["payload"]["hex"]), obj["qos"],
                         obj["retain"], obj["dup"], obj.get("messageId") or 0, props)
    if cls in ("Puback", "Pubrec", "Pubrel", "Pubcomp"):
        return getattr(c, cls)(obj["messageId"], obj.get("reasonCode", 0), props)
    if cls == "Subscribe":
        subs = [c.Subscription(s["topic"], s["qos"], s.get("nl", False), s.get("rap", False),
                               s.get("rh", 0)) for s in obj["subscriptions"]]
        return c.Subscribe(obj["messageId"], subs, props)
    if cls in ("Suback", "Unsuback"):
        return getattr(c, cls)(obj["messageId"], obj.get("granted", ()), props)
    if cls == "Unsubscribe":
        return c.Unsubscribe(obj["messageId"], obj["unsubscriptions"], props)
    if cls in ("Disconnect", "Auth"):
        return getattr(c, cls)(obj.get("reasonCode", 0), props)
    return getattr(c, cls)()


def _comparable(packet) -> bool:
    # mqtt-packet cannot parse the zero-length AUTH (a gap on its side), and
    # keeps User Properties in a plain JavaScript object, where a "__proto__"
    # name is not an ordinary key.
    if type(packet).__name__ == "Auth" and packet.reason_code == 0 and not packet.properties:
        return False
    for props in (getattr(packet, "properties", {}),
                  getattr(getattr(packet, "will", None), "properties", {})):
        pairs = props.get(P.USER_PROPERTY, ())
        if any(k == "__proto__" for k, _ in pairs):
            return False
        # Its parser drops a repeated name's earlier value when that value is ""
        # (a truthiness test where a presence test was meant).
        names = [k for k, _ in pairs]
        if any(v == "" and names.count(k) > 1 for k, v in pairs):
            return False
    return True


# -- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [5, 4])
@SETTINGS
@given(data=st.data())
def test_ours_parsed_by_mqtt_packet(codec, version, data):
    batch = [p for p in data.draw(st.lists(packets(codec, version), min_size=40, max_size=40))
             if _comparable(p)]
    answers = _run_helper([{"op": "parse", "version": version,
                            "hex": codec.encode(p, version).hex()} for p in batch])
    for packet, answer in zip(batch, answers):
        assert "error" not in answer, (packet, answer)
        [obj] = answer["packets"]
        expected = normalise(codec, packet, version)
        got = from_js(codec, obj, expected.protocol_level if hasattr(expected, "protocol_level")
                      else version)
        assert canon(got) == canon(expected), (packet, obj)


@pytest.mark.parametrize("version", [5, 4])
@SETTINGS
@given(data=st.data())
def test_mqtt_packet_generated_read_by_ours(codec, version, data):
    batch = [p for p in data.draw(st.lists(packets(codec, version), min_size=40, max_size=40))
             if _comparable(p)]
    # mqtt-packet refuses to write an empty client id without clean start (a
    # client rule of 3.1.1 [MQTT-3.1.3-7]; the server decides, not the codec).
    # It also wants a user name with any password, in MQTT 5.0 too (a 3.1.1
    # rule, [MQTT-3.1.2-22], that 5.0 dropped).
    batch = [p for p in batch if not (type(p).__name__ == "Connect" and (
        (not p.client_id and (not p.clean_start or p.protocol_level == 3))
        or (p.password is not None and p.username is None)))]
    answers = _run_helper([{"op": "generate", "version": version, "packet": to_js(p, version)}
                           for p in batch])
    decoder = codec.Decoder(version)
    for packet, answer in zip(batch, answers):
        assert "error" not in answer, (packet, answer)
        [got] = decoder.feed(bytes.fromhex(answer["hex"]))
        assert canon(got) == canon(normalise(codec, packet, version)), (packet, answer)
