"""Authentication and ACLs with Mosquitto's own file formats, compared with
Mosquitto: the same password file (made by ``mosquitto_passwd``) and ACL file
are given to both brokers."""

from __future__ import annotations

import subprocess

import pytest

from fixtures_broker import BrokerProcess, connect_bytes, subscribe_bytes, unique

pytestmark = pytest.mark.integration

ACL = """\
# anonymous block (unused: anonymous clients are refused)
user alice
topic readwrite alice/#
topic read public/#
user bob
topic readwrite bob/#
topic write public/#
pattern readwrite clients/%c/#
"""


@pytest.fixture(scope="module", params=["fastmqtt", "mosquitto"])
def secured(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"auth-{request.param}")
    pw = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "alice", "alice-secret"], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "bob", "bob-secret"], check=True,
                   capture_output=True, timeout=30)
    acl = d / "acl"
    acl.write_text(ACL)
    if request.param == "fastmqtt":
        b = BrokerProcess("fastmqtt", d / "b", args=["--password-file", str(pw), "--acl-file", str(acl),
                                                     "--no-allow-anonymous"])
    else:
        b = BrokerProcess("mosquitto", d / "b", mosquitto_conf=[f"password_file {pw}", f"acl_file {acl}"])
        # The generated config says "allow_anonymous true"; a later line wins.
        b.mosquitto_conf.append("allow_anonymous false")
    try:
        b.start()
        yield b
    finally:
        b.kill()


@pytest.mark.parametrize("version", [4, 5])
def test_good_credentials_accepted(secured, raw, version):
    c = raw(secured, version)
    assert c.connect(unique("a"), username="alice", password=b"alice-secret").reason_code == 0


@pytest.mark.parametrize("version,codes", [(4, {4, 5}), (5, {0x86, 0x87})])
def test_bad_password_refused_MQTT_3_2_2_6(secured, raw, version, codes):
    # CONNACK refusal, then close [MQTT-3.2.2-6]: "bad user name or password"
    # (fastmqtt) or "not authorized" (Mosquitto 2.0.11).
    c = raw(secured, version)
    c.send(connect_bytes(unique("a"), version=version, username="alice", password=b"wrong"))
    got = c.expect_closed()
    assert len(got) == 1 and got[0].type == "CONNACK" and got[0].reason_code in codes, got
    if secured.impl == "fastmqtt":
        assert got[0].reason_code == min(codes)


@pytest.mark.parametrize("version,codes", [(4, {5}), (5, {0x87, 0x86})])
def test_anonymous_refused(secured, raw, version, codes):
    c = raw(secured, version)
    c.send(connect_bytes(unique("anon"), version=version))
    got = c.expect_closed()
    assert len(got) == 1 and got[0].type == "CONNACK" and got[0].reason_code in codes, got


@pytest.mark.parametrize("version,denied", [(4, 0x80), (5, 0x87)])
def test_subscribe_outside_acl_refused(secured, raw, version, denied):
    c = raw(secured, version)
    c.connect(unique("a"), username="alice", password=b"alice-secret")
    inbox = unique("inbox")
    c.send(subscribe_bytes(1, [(f"alice/{inbox}", 1), (f"bob/{inbox}", 1), ("public/news", 1)], version=version))
    codes = c.recv_type("SUBACK").reason_codes
    if secured.impl == "fastmqtt":
        assert codes == [1, denied, 1]
    else:
        # Mosquitto 2.0.11 grants the subscription and filters at delivery.
        assert codes[0] == codes[2] == 1 and codes[1] in (1, denied)
    # Either way nothing from bob/... reaches alice.
    bob = raw(secured, 5)
    bob.connect(unique("b"), username="bob", password=b"bob-secret")
    bob.publish(f"bob/{inbox}", b"private", qos=1, packet_id=1)
    c.expect_silence(0.5)


def test_publish_outside_acl_not_delivered(secured, raw):
    topic_ok, topic_bad = "bob/" + unique("x"), "alice/" + unique("x")
    alice = raw(secured, 5)
    alice.connect(unique("a"), username="alice", password=b"alice-secret")
    alice.subscribe(topic_bad, 1)
    bob = raw(secured, 5)
    bob.connect(unique("b"), username="bob", password=b"bob-secret")
    bob.subscribe(topic_ok, 1, packet_id=2)
    ack = bob.publish(topic_bad, b"intrusion", qos=1, packet_id=1)
    assert ack.reason_code in (0x87, 0x00, 0x10)  # v5 may say "not authorized"; Mosquitto 2.0.11 does not
    bob.publish(topic_ok, b"mine", qos=1, packet_id=2)
    assert bob.recv_type("PUBLISH").payload == b"mine"
    alice.expect_silence(0.5)


def test_read_only_topic_delivered_write_only_not(secured, raw):
    # bob may write public/#, alice may read it: bob -> alice works.
    topic = "public/" + unique("n")
    alice = raw(secured, 5)
    alice.connect(unique("a"), username="alice", password=b"alice-secret")
    assert alice.subscribe(topic, 1).reason_codes == [1]
    bob = raw(secured, 5)
    bob.connect(unique("b"), username="bob", password=b"bob-secret")
    bob.publish(topic, b"news", qos=1, packet_id=1)
    assert alice.recv_type("PUBLISH").payload == b"news"
    # alice may not write public/#
    alice.publish(topic, b"forged", qos=1, packet_id=2)
    alice.expect_silence(0.5)


def test_pattern_with_client_id(secured, raw):
    cid = unique("pc")
    c = raw(secured, 5)
    c.connect(cid, username="bob", password=b"bob-secret")
    assert c.subscribe(f"clients/{cid}/#", 1).reason_codes == [1]
    c.publish(f"clients/{cid}/x", b"self", qos=1, packet_id=1)
    assert c.recv_type("PUBLISH").payload == b"self"
    c.send(subscribe_bytes(2, [("clients/someone-else/#", 1)]))
    code = c.recv_type("SUBACK").reason_codes[0]
    assert code == 0x87 if secured.impl == "fastmqtt" else code in (1, 0x87)
