"""Error vectors: bytes both decoders must refuse, and packets both encoders must
refuse, each with the exact reason code and a distinctive part of the message.

Reason codes (decided for both codecs): 0x81 for the byte layout (lengths,
trailing bytes, varints, reserved bits, UTF-8, unknown or misplaced properties,
CONNECT flag rules), 0x82 where the specification says "Protocol Error"
(repeated properties, zero values that must be non-zero, packet id 0, empty
SUBSCRIBE/UNSUBSCRIBE, reason codes not valid for the packet, AUTH in 3.1.1),
0x84 unknown protocol, 0x90 bad topic name, 0x8F bad topic filter.

The message pattern is a case-insensitive regular expression: the statement
number where the specification has one (3.1.1 numbers are accepted too where
they differ), otherwise words any honest message would contain.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import pytest

from fastmqtt.enums import PacketType, PropertyId as P
from fastmqtt.errors import MalformedPacket

# An exception a compiled function swallows ("Exception ignored in ...") is a
# bug even when the result looks right: fail the test instead of warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")



def h(annotated: str) -> bytes:
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in annotated.splitlines()))


class Bad(NamedTuple):
    name: str
    version: int
    hex: str
    reason: int
    pattern: str


OVERRUN = r"overrun|exceed|truncat|incomplete|short|beyond|past|length|need|remain"
PROPERTY = r"propert"
TWICE = r"more than once|twice|duplicate|repeat|again|already"
REASON = r"reason|return code"
PID0 = r"MQTT-2\.2\.1-3"

DECODE_ERRORS = [
    # -- byte layout: 0x81 ---------------------------------------------------
    Bad("truncated-publish", 5, "30 05 00 03 61", 0x81, OVERRUN),
    Bad("trailing-bytes", 5, "c0 00 00", 0x81, r"trailing|extra|remain|length"),
    Bad("pingreq-with-body", 4, "c0 01 00", 0x81, r"trailing|extra|remain|length"),
    Bad("varint-five-bytes", 5, "30 80 80 80 80 01", 0x81, r"MQTT-1\.5\.5-1"),
    Bad("topic-length-overruns", 5, "30 03 00 05 61", 0x81, OVERRUN),
    Bad("property-length-overruns-packet", 5, "30 05 00 01 61 05 01", 0x81, OVERRUN),
    Bad("property-value-overruns-property-block", 5, """
        30 06 00 01 61
        02                  # property length 2
        02 00               # message expiry interval needs 4 bytes
    """, 0x81, OVERRUN),
    Bad("packet-type-0", 5, "00 00", 0x81, r"type|reserved"),
    *[Bad(f"reserved-flags-{name}-v{v}", v, hexs, 0x81, r"MQTT-2\.1\.3-1|MQTT-2\.2\.2-[12]")
      for v in (5, 4) for name, hexs in [
          ("connect", "11 00"), ("connack", "21 02 00 00"), ("puback", "41 02 00 01"),
          ("pubrec", "52 02 00 01"), ("pubrel", "60 02 00 01"), ("pubcomp", "78 02 00 01"),
          ("subscribe", "80 06 00 01 00 01 61 00"), ("suback", "92 03 00 01 00"),
          ("unsubscribe", "a0 05 00 01 00 01 61"), ("unsuback", "b1 02 00 01"),
          ("pingreq", "c1 00"), ("pingresp", "d4 00"), ("disconnect", "e2 00")]],
    Bad("reserved-flags-auth", 5, "f8 00", 0x81, r"MQTT-2\.1\.3-1"),
    Bad("publish-qos3-v5", 5, "36 04 00 01 61 00", 0x81, r"MQTT-3\.3\.1-4"),
    Bad("publish-qos3-v4", 4, "36 03 00 01 61", 0x81, r"MQTT-3\.3\.1-4"),
    Bad("publish-dup-qos0-v5", 5, "38 04 00 01 61 00", 0x81, r"MQTT-3\.3\.1-2"),
    Bad("publish-dup-qos0-v4", 4, "38 03 00 01 61", 0x81, r"MQTT-3\.3\.1-2"),
    Bad("topic-invalid-utf8", 5, "30 04 00 01 ff 00", 0x81, r"MQTT-1\.5\.4-1"),
    Bad("topic-utf16-surrogate", 4, "30 05 00 03 ed a0 80", 0x81, r"MQTT-1\.5\.4-1"),
    Bad("topic-overlong-utf8", 5, "30 05 00 02 c0 af 00", 0x81, r"MQTT-1\.5\.4-1"),
    Bad("topic-nul", 5, "30 06 00 03 61 00 62 00", 0x81, r"MQTT-1\.5\.4-2"),
    Bad("client-id-nul", 4, """
        10 0d 00 04 4d 51 54 54 04 02 00 00
        00 01 00            # client identifier "\\0"
    """, 0x81, r"MQTT-1\.5\.4-2"),
    Bad("user-property-invalid-utf8", 5, """
        40 0b 00 01 00
        07 26 00 01 fe 00 01 61  # user property name 0xfe
    """, 0x81, r"MQTT-1\.5\.4-1"),
    Bad("unknown-property", 5, "30 06 00 01 61 02 04 00", 0x81, PROPERTY),
    Bad("property-not-allowed-in-publish", 5, """
        30 09 00 01 61
        05 11 00 00 00 01   # session expiry interval: CONNECT/CONNACK/DISCONNECT only
    """, 0x81, PROPERTY),
    Bad("will-delay-in-connect-properties", 5, """
        10 12 00 04 4d 51 54 54 05 02 00 00
        05 18 00 00 00 01   # will delay interval belongs in the will properties
        00 00
    """, 0x81, PROPERTY),
    Bad("reason-string-in-publish", 5, "30 08 00 01 61 04 1f 00 01 78", 0x81, PROPERTY),
    Bad("connect-reserved-flag-v5", 5, "10 0d 00 04 4d 51 54 54 05 03 00 00 00 00 00", 0x81,
        r"MQTT-3\.1\.2-3"),
    Bad("connect-reserved-flag-v4", 4, "10 0c 00 04 4d 51 54 54 04 03 00 00 00 00", 0x81,
        r"MQTT-3\.1\.2-3"),
    Bad("will-qos-without-will-v5", 5, "10 0d 00 04 4d 51 54 54 05 0a 00 00 00 00 00", 0x81,
        r"MQTT-3\.1\.2-11"),
    Bad("will-qos-without-will-v4", 4, "10 0c 00 04 4d 51 54 54 04 0a 00 00 00 00", 0x81,
        r"MQTT-3\.1\.2-(11|13)"),
    Bad("will-qos-3-v5", 5, """
        10 13 00 04 4d 51 54 54 05
        1e                  # will flag, will QoS 3, clean start
        00 00 00 00 00
        00 00 01 74 00 00   # will properties, will topic "t", empty will payload
    """, 0x81, r"MQTT-3\.1\.2-12"),
    Bad("will-qos-3-v4", 4, "10 11 00 04 4d 51 54 54 04 1e 00 00 00 00 00 01 74 00 00", 0x81,
        r"MQTT-3\.1\.2-(12|14)"),
    Bad("will-retain-without-will-v5", 5, "10 0d 00 04 4d 51 54 54 05 22 00 00 00 00 00",
        0x81, r"MQTT-3\.1\.2-13"),
    Bad("will-retain-without-will-v4", 4, "10 0c 00 04 4d 51 54 54 04 22 00 00 00 00", 0x81,
        r"MQTT-3\.1\.2-(13|15)"),
    Bad("password-without-username-v4", 4, """
        10 0f 00 04 4d 51 54 54 04
        42                  # password flag without user name flag, clean session
        00 00 00 00 00 01 70
    """, 0x81, r"MQTT-3\.1\.2-22"),
    Bad("connect-missing-password", 5, "10 0d 00 04 4d 51 54 54 05 42 00 00 00 00 00", 0x81,
        OVERRUN),
    Bad("connack-reserved-flags", 5, "20 03 02 00 00", 0x81, r"MQTT-3\.2\.2-1|reserved"),
    Bad("connack-v4-return-code-6", 4, "20 02 00 06", 0x81, REASON),
    # -- Protocol Error: 0x82 ------------------------------------------------
    Bad("property-twice", 5, """
        30 0e 00 01 61
        0a                  # property length 10
        02 00 00 00 01      # message expiry interval 1
        02 00 00 00 02      # message expiry interval again
    """, 0x82, TWICE),
    Bad("subscription-identifier-twice-in-subscribe", 5, """
        82 0b 00 01
        04 0b 01 0b 02      # two subscription identifiers: PUBLISH only may repeat it
        00 01 61 00
    """, 0x82, TWICE),
    Bad("receive-maximum-0", 5, "10 10 00 04 4d 51 54 54 05 02 00 00 03 21 00 00 00 00", 0x82,
        r"RECEIVE|receive"),
    Bad("maximum-packet-size-0", 5, "20 08 00 00 05 27 00 00 00 00", 0x82, r"MAXIMUM|maximum"),
    Bad("topic-alias-0", 5, "30 07 00 01 61 03 23 00 00", 0x82, r"alias"),
    Bad("subscription-identifier-0", 5, "30 06 00 01 61 02 0b 00", 0x82, r"identifier"),
    Bad("payload-format-indicator-2", 5, "30 06 00 01 61 02 01 02", 0x82, r"format|0 or 1|boolean"),
    Bad("maximum-qos-2", 5, "20 05 00 00 02 24 02", 0x82, r"qos|0 or 1|boolean"),
    Bad("retain-handling-3", 5, "82 07 00 01 00 00 01 61 30", 0x82, r"retain"),
    Bad("subscription-option-reserved-bits-v5", 5, "82 07 00 01 00 00 01 61 40", 0x82,
        r"MQTT-3\.8\.3-5"),
    Bad("subscription-qos-3-v5", 5, "82 07 00 01 00 00 01 61 03", 0x82, r"qos"),
    # 3.1.1 calls a non-zero reserved bit or QoS 3 in the requested-QoS byte
    # malformed [MQTT-3-8.3-4] (numbered "3.8.3-4" in 3.1.1): the layout code.
    Bad("subscription-reserved-bits-v4", 4, "82 06 00 01 00 01 61 04", 0x81,
        r"MQTT-3[.-]8\.3-4"),
    Bad("subscription-qos-3-v4", 4, "82 06 00 01 00 01 61 03", 0x81, r"MQTT-3[.-]8\.3-4|qos"),
    Bad("no-local-on-shared-subscription", 5, """
        82 10 00 01 00
        00 0a 24 73 68 61 72 65 2f 67 2f 61  # "$share/g/a"
        04                  # no local
    """, 0x82, r"MQTT-3\.8\.3-4"),
    Bad("publish-packet-id-0-v5", 5, "32 06 00 01 61 00 00 00", 0x82, PID0),
    Bad("publish-packet-id-0-v4", 4, "34 05 00 01 61 00 00", 0x82, PID0),
    Bad("puback-packet-id-0", 5, "40 02 00 00", 0x82, PID0),
    Bad("pubrec-packet-id-0", 4, "50 02 00 00", 0x82, PID0),
    Bad("pubrel-packet-id-0", 5, "62 02 00 00", 0x82, PID0),
    Bad("pubcomp-packet-id-0", 4, "70 02 00 00", 0x82, PID0),
    Bad("subscribe-packet-id-0", 4, "82 06 00 00 00 01 61 00", 0x82, PID0),
    Bad("suback-packet-id-0", 5, "90 04 00 00 00 00", 0x82, PID0),
    Bad("unsubscribe-packet-id-0", 5, "a2 06 00 00 00 00 01 61", 0x82, PID0),
    Bad("unsuback-packet-id-0", 4, "b0 02 00 00", 0x82, PID0),
    Bad("subscribe-no-filter-v5", 5, "82 03 00 01 00", 0x82, r"MQTT-3\.8\.3-3"),
    Bad("subscribe-no-filter-v4", 4, "82 02 00 01", 0x82, r"MQTT-3\.8\.3-3"),
    Bad("unsubscribe-no-filter-v5", 5, "a2 03 00 01 00", 0x82, r"MQTT-3\.10\.3-2"),
    Bad("unsubscribe-no-filter-v4", 4, "a2 02 00 01", 0x82, r"MQTT-3\.10\.3-2"),
    Bad("auth-in-v4", 4, "f0 00", 0x82, r"AUTH"),
    # 3.1.2.11.10 / 3.15.2.2.3: "It is a Protocol Error to include
    # Authentication Data if there is no Authentication Method".
    Bad("auth-data-without-method-auth", 5, """
        f0 06 18            # AUTH, continue authentication
        04 16 00 01 78      # properties: AUTHENTICATION_DATA "x" only
    """, 0x82, r"AUTHENTICATION_METHOD"),
    Bad("auth-data-without-method-connack", 5, """
        20 07 00 00         # CONNACK, session present 0, success
        04 16 00 01 78      # properties: AUTHENTICATION_DATA "x" only
    """, 0x82, r"AUTHENTICATION_METHOD"),
    Bad("publish-response-topic-wildcard", 5, """
        30 0a 00 01 61
        06 08 00 03 61 2f 2b  # RESPONSE_TOPIC "a/+"
    """, 0x82, r"MQTT-3\.3\.2-14"),
    Bad("will-response-topic-wildcard", 5, """
        10 1a 00 04 4d 51 54 54 05
        06 00 00 00           # will flag, clean start; keep alive 0; no properties
        00 01 63              # client id "c"
        06 08 00 03 61 2f 23  # will properties: RESPONSE_TOPIC "a/#"
        00 01 77 00 00        # will topic "w", empty payload
    """, 0x82, r"MQTT-3\.3\.2-14"),
    Bad("puback-reason-0x92", 5, "40 03 00 01 92", 0x82, REASON),
    Bad("pubrel-reason-0x10", 5, "62 03 00 01 10", 0x82, REASON),
    Bad("connack-reason-0x01", 5, "20 03 00 01 00", 0x82, REASON),
    Bad("suback-reason-0x03", 5, "90 04 00 01 00 03", 0x82, REASON),
    Bad("suback-v4-code-0x9e", 4, "90 03 00 01 9e", 0x82, REASON),
    Bad("unsuback-reason-0x01", 5, "b0 04 00 01 00 01", 0x82, REASON),
    Bad("disconnect-reason-0x01", 5, "e0 01 01", 0x82, REASON),
    Bad("auth-reason-0x04", 5, "f0 01 04", 0x82, REASON),
    # -- Unsupported protocol version: 0x84 -----------------------------------
    Bad("connect-level-6", 5, "10 0d 00 04 4d 51 54 54 06 02 00 00 00 00 00", 0x84, r"protocol"),
    Bad("connect-mqisdp-level-4", 4, """
        10 0e 00 06 4d 51 49 73 64 70
        04                  # "MQIsdp" is 3.1 only
        02 00 00 00 00
    """, 0x84, r"protocol"),
    Bad("connect-unknown-name", 4, "10 0c 00 04 4d 51 54 58 04 02 00 00 00 00", 0x84,
        r"protocol"),
    # -- Topic name invalid: 0x90 ---------------------------------------------
    Bad("publish-topic-plus-v5", 5, "30 06 00 03 61 2f 2b 00", 0x90, r"MQTT-3\.3\.2-2"),
    Bad("publish-topic-hash-v4", 4, "30 03 00 01 23", 0x90, r"MQTT-3\.3\.2-2"),
    Bad("publish-topic-empty-without-alias-v5", 5, "30 03 00 00 00", 0x90,
        r"empty|MQTT-4\.7\.3-1|alias"),
    Bad("publish-topic-empty-v4", 4, "30 02 00 00", 0x90, r"empty|MQTT-4\.7\.3-1"),
    # -- Topic filter invalid: 0x8F -------------------------------------------
    *[Bad(f"filter-{name}-{kind}-v{v}", v,
          (("82" if kind == "subscribe" else "a2")
           + f" {2 + (1 if v == 5 else 0) + 2 + len(flt) + (1 if kind == 'subscribe' else 0):02x}"
           + " 00 01" + (" 00" if v == 5 else "")
           + f" {len(flt):04x}" + flt.encode().hex()
           + (" 00" if kind == "subscribe" else "")),
          0x8F, pattern)
      for v in (5, 4) for kind in ("subscribe", "unsubscribe")
      for name, flt, pattern in [
          ("hash-not-last", "a/#/b", r"MQTT-4\.7\.1-1"),
          ("hash-in-level", "a/b#", r"MQTT-4\.7\.1-1"),
          ("plus-in-level", "a/b+", r"MQTT-4\.7\.1-2"),
          ("empty", "", r"MQTT-4\.7\.3-1"),
          ("share-empty-name", "$share//a", r"MQTT-4\.8\.2-1"),
          ("share-wildcard-name", "$share/g+/a", r"MQTT-4\.8\.2-1"),
          ("share-no-filter", "$share/g", r"MQTT-4\.8\.2-2"),
          ("share-empty-filter", "$share/g/", r"MQTT-4\.8\.2-2"),
      ]],
]


@pytest.mark.parametrize("row", DECODE_ERRORS, ids=[r.name for r in DECODE_ERRORS])
def test_decode_error(codec, row):
    data = h(row.hex)
    with pytest.raises(MalformedPacket) as info:
        codec.decode(data, row.version)
    assert info.value.reason_code == row.reason, str(info.value)
    assert re.search(row.pattern, str(info.value), re.I), str(info.value)


@pytest.mark.parametrize("row", DECODE_ERRORS, ids=[r.name for r in DECODE_ERRORS])
def test_decode_error_names_the_packet(codec, row):
    """A message a person reads in a log names the packet type it is about."""
    data = h(row.hex)
    with pytest.raises(MalformedPacket) as info:
        codec.decode(data, row.version)
    name = "packet type 0" if data[0] >> 4 == 0 else PacketType(data[0] >> 4).name
    assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("row", DECODE_ERRORS, ids=[r.name for r in DECODE_ERRORS])
def test_stream_decoder_error(codec, row):
    """The streaming decoder refuses the same bytes with the same reason code
    (a truncated packet is just incomplete there, and trailing bytes are the
    start of the next packet)."""
    if row.name in ("truncated-publish", "topic-length-overruns", "trailing-bytes"):
        return
    decoder = codec.Decoder(row.version)
    with pytest.raises(MalformedPacket) as info:
        decoder.feed(h(row.hex))
    assert info.value.reason_code == row.reason, str(info.value)


def test_v5_allows_password_without_username(codec):
    """[MQTT-3.1.2-22] is a 3.1.1 rule; MQTT 5.0 dropped it (3.1.2.9)."""
    packet = codec.decode(h("10 10 00 04 4d 51 54 54 05 42 00 00 00 00 00 00 01 70"), 5)
    assert packet.username is None and packet.password == b"p"


def test_flags_bytes_are_checked_before_the_body(codec):
    """A PUBREL with flags 0000 is refused even with a valid body [MQTT-2.1.3-1]."""
    with pytest.raises(MalformedPacket) as info:
        codec.decode(h("60 02 00 01"), 5)
    assert info.value.reason_code == 0x81


class Refused(NamedTuple):
    name: str
    version: int
    build: Callable
    reason: int
    pattern: str


ENCODE_ERRORS = [
    Refused("publish-topic-plus", 5, lambda c: c.Publish("a/+"), 0x90, r"MQTT-3\.3\.2-2"),
    Refused("publish-topic-hash-v4", 4, lambda c: c.Publish("#"), 0x90, r"MQTT-3\.3\.2-2"),
    Refused("publish-topic-empty", 5, lambda c: c.Publish(""), 0x90, r"empty|MQTT-4\.7\.3-1|alias"),
    Refused("publish-topic-empty-alias-v4", 4,
            lambda c: c.Publish("", properties={P.TOPIC_ALIAS: 1}), 0x90, r"empty|MQTT-4\.7\.3-1"),
    Refused("publish-qos3", 5, lambda c: c.Publish("a", b"", 3, packet_id=1), 0x81,
            r"MQTT-3\.3\.1-4"),
    Refused("publish-dup-qos0", 4, lambda c: c.Publish("a", b"", 0, dup=True), 0x81,
            r"MQTT-3\.3\.1-2"),
    Refused("publish-packet-id-0", 5, lambda c: c.Publish("a", b"", 1), 0x82, PID0),
    Refused("publish-packet-id-65536", 4, lambda c: c.Publish("a", b"", 2, packet_id=65536),
            0x82, PID0),
    Refused("puback-packet-id-0", 5, lambda c: c.Puback(0), 0x82, PID0),
    Refused("pubrel-packet-id-0-v4", 4, lambda c: c.Pubrel(0), 0x82, PID0),
    Refused("subscribe-packet-id-0", 5, lambda c: c.Subscribe(0, [c.Subscription("a")]), 0x82,
            PID0),
    Refused("unsuback-packet-id-0", 4, lambda c: c.Unsuback(0), 0x82, PID0),
    Refused("subscribe-empty", 5, lambda c: c.Subscribe(1, []), 0x82, r"MQTT-3\.8\.3-3"),
    Refused("unsubscribe-empty", 4, lambda c: c.Unsubscribe(1, []), 0x82, r"MQTT-3\.10\.3-2"),
    Refused("subscribe-bad-filter", 5, lambda c: c.Subscribe(1, [c.Subscription("a/b#")]), 0x8F,
            r"MQTT-4\.7\.1-1"),
    Refused("subscribe-bad-filter-v4", 4, lambda c: c.Subscribe(1, [c.Subscription("a+")]),
            0x8F, r"MQTT-4\.7\.1-2"),
    Refused("unsubscribe-bad-share", 5, lambda c: c.Unsubscribe(1, ["$share/g"]), 0x8F,
            r"MQTT-4\.8\.2-2"),
    Refused("no-local-on-shared", 5,
            lambda c: c.Subscribe(1, [c.Subscription("$share/g/a", 0, True)]), 0x82,
            r"MQTT-3\.8\.3-4"),
    Refused("retain-handling-3", 5,
            lambda c: c.Subscribe(1, [c.Subscription("a", 0, False, False, 3)]), 0x82, r"retain"),
    Refused("subscription-qos-3", 5, lambda c: c.Subscribe(1, [c.Subscription("a", 3)]), 0x82,
            r"qos"),
    Refused("property-not-allowed", 5,
            lambda c: c.Publish("a", properties={P.SESSION_EXPIRY_INTERVAL: 1}), 0x81, PROPERTY),
    Refused("will-delay-in-connect", 5,
            lambda c: c.Connect("a", properties={P.WILL_DELAY_INTERVAL: 1}), 0x81, PROPERTY),
    Refused("unknown-property", 5, lambda c: c.Disconnect(0, {0x05: 1}), 0x81, PROPERTY),
    Refused("property-wrong-type", 5,
            lambda c: c.Publish("a", properties={P.MESSAGE_EXPIRY_INTERVAL: "60"}), 0x81,
            PROPERTY),
    Refused("property-out-of-range", 5,
            lambda c: c.Connect("a", properties={P.RECEIVE_MAXIMUM: 70000}), 0x81, PROPERTY),
    Refused("receive-maximum-0", 5, lambda c: c.Connect("a", properties={P.RECEIVE_MAXIMUM: 0}),
            0x82, r"receive"),
    Refused("topic-alias-0", 5, lambda c: c.Publish("a", properties={P.TOPIC_ALIAS: 0}), 0x82,
            r"alias"),
    Refused("subscription-identifier-0", 5,
            lambda c: c.Publish("a", properties={P.SUBSCRIPTION_IDENTIFIER: (0,)}), 0x82,
            r"identifier"),
    Refused("payload-format-indicator-2", 5,
            lambda c: c.Publish("a", properties={P.PAYLOAD_FORMAT_INDICATOR: 2}), 0x82,
            r"format|0 or 1|boolean"),
    Refused("two-subscription-identifiers-in-subscribe", 5,
            lambda c: c.Subscribe(1, [c.Subscription("a")], {P.SUBSCRIPTION_IDENTIFIER: (1, 2)}),
            0x82, TWICE),
    Refused("client-id-too-long", 4, lambda c: c.Connect("x" * 65536), 0x81, r"65535|long"),
    Refused("user-property-too-long", 5,
            lambda c: c.Disconnect(0, {P.USER_PROPERTY: (("k", "v" * 65536),)}), 0x81,
            r"65535|long"),
    Refused("string-with-nul", 4, lambda c: c.Connect("a\x00b"), 0x81, r"MQTT-1\.5\.4-2"),
    Refused("string-with-surrogate", 5, lambda c: c.Connect("\ud800"), 0x81, r"MQTT-1\.5\.4-1"),
    Refused("password-without-username-v4", 4, lambda c: c.Connect("a", password=b"p"), 0x81,
            r"MQTT-3\.1\.2-22"),
    Refused("will-qos-3", 5, lambda c: c.Connect("a", will=c.Will("w", b"", 3)), 0x81,
            r"MQTT-3\.1\.2-(12|14)"),
    Refused("connect-level-6", 5, lambda c: c.Connect("a", protocol_level=6), 0x84, r"protocol|level"),
    Refused("connack-reason-0x01", 5, lambda c: c.Connack(False, 0x01), 0x82, REASON),
    Refused("suback-v5-only-code-in-v4", 4, lambda c: c.Suback(1, [0x9E]), 0x82, REASON),
    Refused("suback-code-0x03", 5, lambda c: c.Suback(1, [0x03]), 0x82, REASON),
    Refused("puback-reason-0x92", 5, lambda c: c.Puback(1, 0x92), 0x82, REASON),
    Refused("disconnect-reason-0x01", 5, lambda c: c.Disconnect(0x01), 0x82, REASON),
    Refused("auth-in-v4", 4, lambda c: c.Auth(), 0x82, r"AUTH"),
    Refused("auth-data-without-method", 5,
            lambda c: c.Auth(0x18, {P.AUTHENTICATION_DATA: b"x"}), 0x82,
            r"AUTHENTICATION_METHOD"),
    Refused("connect-auth-data-without-method", 5,
            lambda c: c.Connect("c", properties={0x16: b"x"}), 0x82,
            r"AUTHENTICATION_METHOD"),
    Refused("auth-in-v3", 3, lambda c: c.Auth(0x18), 0x82, r"AUTH"),
    Refused("publish-response-topic-wildcard", 5,
            lambda c: c.Publish("a", b"", 1, packet_id=1, properties={P.RESPONSE_TOPIC: "r/+"}),
            0x82, r"MQTT-3\.3\.2-14"),
    Refused("will-response-topic-wildcard", 5,
            lambda c: c.Connect("a", will=c.Will("w", b"", 0, False, {P.RESPONSE_TOPIC: "r/#"})),
            0x82, r"MQTT-3\.3\.2-14"),
]


@pytest.mark.parametrize("row", ENCODE_ERRORS, ids=[r.name for r in ENCODE_ERRORS])
def test_encode_refuses(codec, row):
    packet = row.build(codec)
    with pytest.raises(MalformedPacket) as info:
        codec.encode(packet, row.version)
    assert info.value.reason_code == row.reason, str(info.value)
    assert re.search(row.pattern, str(info.value), re.I), str(info.value)


def test_v5_encodes_password_without_username(codec):
    data = codec.encode(codec.Connect("a", password=b"p", protocol_level=5), 5)
    assert codec.decode(data, 5).password == b"p"


def test_publish_template_refusals(codec):
    c = codec
    template = c.PublishTemplate(c.Publish("a", b"x", 1), 5)
    for bad in (0, 65536, -1):
        with pytest.raises(MalformedPacket) as info:
            template.with_packet_id(bad)
        assert info.value.reason_code == 0x82
    qos0 = c.PublishTemplate(c.Publish("a", b"x", 0), 5)
    with pytest.raises(MalformedPacket) as info:
        qos0.with_packet_id(1, dup=True)
    assert info.value.reason_code == 0x81
    assert re.search(r"MQTT-3\.3\.1-2", str(info.value))
    with pytest.raises(MalformedPacket) as info:
        c.PublishTemplate(c.Publish("a/+", b"x", 1), 4)
    assert info.value.reason_code == 0x90


def test_malformed_packet_pickles_with_reason_code():
    import pickle

    exc = pickle.loads(pickle.dumps(MalformedPacket("x [MQTT-1.5.4-2]", 0x82)))
    assert exc.reason_code == 0x82 and "MQTT-1.5.4-2" in str(exc)
