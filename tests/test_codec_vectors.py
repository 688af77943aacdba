"""Byte-exact vectors for every packet type, MQTT 5.0, 3.1.1 and a 3.1 CONNECT.

Each row is (name, protocol version, packet builder, annotated hex). The hex is
written by hand from the specification's packet layouts (OASIS MQTT 5.0 chapter
3, MQTT 3.1.1 chapter 3), not produced by either codec. Every row gives three
tests per codec: decode(hex) == packet, encode(packet) == hex, and a round trip.
Properties are written in ascending identifier order, as both encoders do.

Asymmetric rows follow: forms that decode but that the encoder writes shorter
(DECODE_ONLY), and 3.1.1 encodings that drop MQTT 5.0 fields (ENCODE_ONLY).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest

from fastmqtt.enums import EMPTY_PROPERTIES, PropertyId as P

# An exception a compiled function swallows ("Exception ignored in ...") is a
# bug even when the result looks right: fail the test instead of warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")



def h(annotated: str) -> bytes:
    """Bytes from annotated hex: everything after '#' on a line is a comment."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in annotated.splitlines()))


class Vector(NamedTuple):
    name: str
    version: int
    build: Callable  # codec module -> packet
    hex: str


VECTORS = [
    # ------------------------------------------------------------------ MQTT 5.0
    Vector("v5-connect-minimal", 5, lambda c: c.Connect("", True, 60, protocol_level=5), """
        10 0d               # CONNECT, remaining length 13
        00 04 4d 51 54 54   # protocol name "MQTT"
        05                  # protocol level 5
        02                  # connect flags: clean start
        00 3c               # keep alive 60 s
        00                  # property length 0
        00 00               # client identifier "" (server assigns one)
    """),
    Vector("v5-connect-full", 5, lambda c: c.Connect(
        "cid", False, 30, "user", b"pw",
        c.Will("st/u1", b"offline", 1, True, {
            P.WILL_DELAY_INTERVAL: 10, P.PAYLOAD_FORMAT_INDICATOR: 1,
            P.MESSAGE_EXPIRY_INTERVAL: 3600, P.CONTENT_TYPE: "json", P.RESPONSE_TOPIC: "r/t",
            P.CORRELATION_DATA: b"\x01\x02", P.USER_PROPERTY: (("k", "v"),)}),
        {P.SESSION_EXPIRY_INTERVAL: 300, P.RECEIVE_MAXIMUM: 20,
         P.MAXIMUM_PACKET_SIZE: 1048576, P.TOPIC_ALIAS_MAXIMUM: 10,
         P.REQUEST_RESPONSE_INFORMATION: 1, P.REQUEST_PROBLEM_INFORMATION: 0,
         P.USER_PROPERTY: (("app", "chat"), ("app", "x")),
         P.AUTHENTICATION_METHOD: "SCRAM", P.AUTHENTICATION_DATA: b"\xab"},
        protocol_level=5), """
        10 85 01            # CONNECT, remaining length 133 (two-byte varint)
        00 04 4d 51 54 54   # protocol name "MQTT"
        05                  # protocol level 5
        ec                  # flags: user name, password, will retain, will QoS 1, will
        00 1e               # keep alive 30 s
        35                  # property length 53
        11 00 00 01 2c      #   session expiry interval 300 (four-byte integer)
        15 00 05 53 43 52 41 4d  # authentication method "SCRAM" (UTF-8 string)
        16 00 01 ab         #   authentication data 0xab (binary data)
        17 00               #   request problem information 0 (byte)
        19 01               #   request response information 1 (byte)
        21 00 14            #   receive maximum 20 (two-byte integer)
        22 00 0a            #   topic alias maximum 10
        26 00 03 61 70 70 00 04 63 68 61 74  # user property ("app", "chat") (string pair)
        26 00 03 61 70 70 00 01 78           # user property ("app", "x"): repeats keep order
        27 00 10 00 00      #   maximum packet size 1048576
        00 03 63 69 64      # client identifier "cid"
        25                  # will property length 37
        01 01               #   payload format indicator 1 (UTF-8)
        02 00 00 0e 10      #   message expiry interval 3600
        03 00 04 6a 73 6f 6e  # content type "json"
        08 00 03 72 2f 74   #   response topic "r/t"
        09 00 02 01 02      #   correlation data 01 02
        18 00 00 00 0a      #   will delay interval 10
        26 00 01 6b 00 01 76  # user property ("k", "v")
        00 05 73 74 2f 75 31  # will topic "st/u1"
        00 07 6f 66 66 6c 69 6e 65  # will payload "offline"
        00 04 75 73 65 72   # user name "user"
        00 02 70 77         # password "pw"
    """),
    Vector("v5-connack-minimal", 5, lambda c: c.Connack(False, 0), """
        20 03               # CONNACK, remaining length 3
        00                  # acknowledge flags: no session present
        00                  # reason code 0x00 success
        00                  # property length 0
    """),
    Vector("v5-connack-refused", 5, lambda c: c.Connack(False, 0x87), """
        20 03 00
        87                  # reason code 0x87 not authorized
        00
    """),
    Vector("v5-connack-all-properties", 5, lambda c: c.Connack(True, 0, {
        P.SESSION_EXPIRY_INTERVAL: 0xFFFFFFFF, P.ASSIGNED_CLIENT_IDENTIFIER: "auto-1",
        P.SERVER_KEEP_ALIVE: 120, P.AUTHENTICATION_METHOD: "SCRAM", P.AUTHENTICATION_DATA: b"",
        P.RESPONSE_INFORMATION: "resp/", P.SERVER_REFERENCE: "other:1883",
        P.REASON_STRING: "ok", P.RECEIVE_MAXIMUM: 65535, P.TOPIC_ALIAS_MAXIMUM: 0,
        P.MAXIMUM_QOS: 1, P.RETAIN_AVAILABLE: 0, P.USER_PROPERTY: (("a", "b"),),
        P.MAXIMUM_PACKET_SIZE: 0x10000004, P.WILDCARD_SUBSCRIPTION_AVAILABLE: 1,
        P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 0, P.SHARED_SUBSCRIPTION_AVAILABLE: 1}), """
        20 55               # CONNACK, remaining length 85
        01                  # acknowledge flags: session present
        00                  # reason code success
        52                  # property length 82
        11 ff ff ff ff      #   session expiry interval 0xFFFFFFFF (never expires)
        12 00 06 61 75 74 6f 2d 31  # assigned client identifier "auto-1"
        13 00 78            #   server keep alive 120
        15 00 05 53 43 52 41 4d  # authentication method "SCRAM"
        16 00 00            #   authentication data b"" (empty binary)
        1a 00 05 72 65 73 70 2f  # response information "resp/"
        1c 00 0a 6f 74 68 65 72 3a 31 38 38 33  # server reference "other:1883"
        1f 00 02 6f 6b      #   reason string "ok"
        21 ff ff            #   receive maximum 65535
        22 00 00            #   topic alias maximum 0 (no aliases)
        24 01               #   maximum QoS 1
        25 00               #   retain available 0
        26 00 01 61 00 01 62  # user property ("a", "b")
        27 10 00 00 04      #   maximum packet size 268435460
        28 01               #   wildcard subscription available 1
        29 00               #   subscription identifiers available 0
        2a 01               #   shared subscription available 1
    """),
    Vector("v5-publish-qos0", 5, lambda c: c.Publish("a/b", b"hi"), """
        30 08               # PUBLISH QoS 0, remaining length 8
        00 03 61 2f 62      # topic name "a/b" (no packet identifier at QoS 0)
        00                  # property length 0
        68 69               # payload "hi"
    """),
    Vector("v5-publish-qos1-all-properties", 5, lambda c: c.Publish(
        "chat/ws1/channel/7", b'{"t":1}', 1, True, True, 0x1234, {
            P.PAYLOAD_FORMAT_INDICATOR: 1, P.MESSAGE_EXPIRY_INTERVAL: 60,
            P.CONTENT_TYPE: "application/json", P.RESPONSE_TOPIC: "reply/1",
            P.CORRELATION_DATA: b"id7", P.USER_PROPERTY: (("x", "1"),),
            P.SUBSCRIPTION_IDENTIFIER: (1, 200, 268435455)}), """
        3b                  # PUBLISH, DUP, QoS 1, RETAIN
        59                  # remaining length 89
        00 12 63 68 61 74 2f 77 73 31 2f 63 68 61 6e 6e 65 6c 2f 37  # "chat/ws1/channel/7"
        12 34               # packet identifier 0x1234
        3b                  # property length 59
        01 01               #   payload format indicator 1
        02 00 00 00 3c      #   message expiry interval 60
        03 00 10 61 70 70 6c 69 63 61 74 69 6f 6e 2f 6a 73 6f 6e  # content type
        08 00 07 72 65 70 6c 79 2f 31  # response topic "reply/1"
        09 00 03 69 64 37   #   correlation data "id7"
        0b 01               #   subscription identifier 1 (variable byte integer)
        0b c8 01            #   subscription identifier 200 (two-byte varint)
        0b ff ff ff 7f      #   subscription identifier 268435455 (largest varint)
        26 00 01 78 00 01 31  # user property ("x", "1")
        7b 22 74 22 3a 31 7d  # payload {"t":1}
    """),
    Vector("v5-publish-qos2-topic-alias", 5, lambda c: c.Publish(
        "", b"", 2, packet_id=65535, properties={P.TOPIC_ALIAS: 5}), """
        34 08               # PUBLISH QoS 2, remaining length 8
        00 00               # topic name "" (taken from the topic alias)
        ff ff               # packet identifier 65535
        03                  # property length 3
        23 00 05            #   topic alias 5 (two-byte integer)
                            # empty payload
    """),
    Vector("v5-puback-short", 5, lambda c: c.Puback(1), """
        40 02               # PUBACK, remaining length 2: reason 0, no properties
        00 01               # packet identifier 1
    """),
    Vector("v5-puback-reason", 5, lambda c: c.Puback(2, 0x10), """
        40 03               # PUBACK, remaining length 3
        00 02               # packet identifier 2
        10                  # reason code 0x10 no matching subscribers (no property length)
    """),
    Vector("v5-pubrec-properties", 5, lambda c: c.Pubrec(3, 0x80, {P.REASON_STRING: "no"}), """
        50 09               # PUBREC, remaining length 9
        00 03               # packet identifier 3
        80                  # reason code 0x80 unspecified error
        05                  # property length 5
        1f 00 02 6e 6f      #   reason string "no"
    """),
    Vector("v5-pubrel-short", 5, lambda c: c.Pubrel(4), """
        62 02               # PUBREL (flags 0010), remaining length 2
        00 04               # packet identifier 4
    """),
    Vector("v5-pubrel-reason", 5, lambda c: c.Pubrel(5, 0x92), """
        62 03 00 05
        92                  # reason code 0x92 packet identifier not found
    """),
    Vector("v5-pubcomp-user-property", 5, lambda c: c.Pubcomp(
        6, 0, {P.USER_PROPERTY: (("a", ""),)}), """
        70 0a               # PUBCOMP, remaining length 10
        00 06               # packet identifier 6
        00                  # reason code success (needed: properties follow)
        06                  # property length 6
        26 00 01 61 00 00   #   user property ("a", "")
    """),
    Vector("v5-subscribe-all-options", 5, lambda c: c.Subscribe(10, [
        c.Subscription("a/+/c", 2, True, True, 2),
        c.Subscription("$share/g/x/#", 1, False, False, 1),
        c.Subscription("#", 0)],
        {P.SUBSCRIPTION_IDENTIFIER: (268435455,), P.USER_PROPERTY: (("k", "v"),)}), """
        82 2a               # SUBSCRIBE (flags 0010), remaining length 42
        00 0a               # packet identifier 10
        0c                  # property length 12
        0b ff ff ff 7f      #   subscription identifier 268435455
        26 00 01 6b 00 01 76  # user property ("k", "v")
        00 05 61 2f 2b 2f 63  # topic filter "a/+/c"
        2e                  # options: retain handling 2, RAP, no local, QoS 2
        00 0c 24 73 68 61 72 65 2f 67 2f 78 2f 23  # "$share/g/x/#"
        11                  # options: retain handling 1, QoS 1
        00 01 23            # topic filter "#"
        00                  # options: all 0
    """),
    Vector("v5-suback", 5, lambda c: c.Suback(
        10, [2, 1, 0x80, 0x9E, 0xA2], {P.REASON_STRING: "partial"}), """
        90 12               # SUBACK, remaining length 18
        00 0a               # packet identifier 10
        0a                  # property length 10
        1f 00 07 70 61 72 74 69 61 6c  # reason string "partial"
        02 01               # granted QoS 2, granted QoS 1
        80 9e a2            # unspecified error, shared subs / wildcards not supported
    """),
    Vector("v5-unsubscribe", 5, lambda c: c.Unsubscribe(
        11, ["a/+", "$share/g/b"], {P.USER_PROPERTY: (("u", "1"),)}), """
        a2 1b               # UNSUBSCRIBE (flags 0010), remaining length 27
        00 0b               # packet identifier 11
        07                  # property length 7
        26 00 01 75 00 01 31  # user property ("u", "1")
        00 03 61 2f 2b      # topic filter "a/+"
        00 0a 24 73 68 61 72 65 2f 67 2f 62  # topic filter "$share/g/b"
    """),
    Vector("v5-unsuback", 5, lambda c: c.Unsuback(
        11, [0x00, 0x11, 0x87], {P.REASON_STRING: "x"}), """
        b0 0a               # UNSUBACK, remaining length 10
        00 0b               # packet identifier 11
        04                  # property length 4
        1f 00 01 78         #   reason string "x"
        00 11 87            # success, no subscription existed, not authorized
    """),
    Vector("v5-pingreq", 5, lambda c: c.Pingreq(), "c0 00  # PINGREQ, remaining length 0"),
    Vector("v5-pingresp", 5, lambda c: c.Pingresp(), "d0 00  # PINGRESP, remaining length 0"),
    Vector("v5-disconnect-short", 5, lambda c: c.Disconnect(), """
        e0 00               # DISCONNECT, remaining length 0: normal disconnection
    """),
    Vector("v5-disconnect-reason", 5, lambda c: c.Disconnect(0x8E), """
        e0 01               # DISCONNECT, remaining length 1
        8e                  # reason code 0x8e session taken over (no property length)
    """),
    Vector("v5-disconnect-properties", 5, lambda c: c.Disconnect(0x9C, {
        P.SESSION_EXPIRY_INTERVAL: 0, P.REASON_STRING: "move",
        P.SERVER_REFERENCE: "b:1883"}), """
        e0 17               # DISCONNECT, remaining length 23
        9c                  # reason code 0x9c use another server
        15                  # property length 21
        11 00 00 00 00      #   session expiry interval 0
        1c 00 06 62 3a 31 38 38 33  # server reference "b:1883"
        1f 00 04 6d 6f 76 65  # reason string "move"
    """),
    Vector("v5-auth-short", 5, lambda c: c.Auth(), """
        f0 00               # AUTH, remaining length 0: success
    """),
    Vector("v5-auth-reason", 5, lambda c: c.Auth(0x19), """
        f0 02               # AUTH, remaining length 2
        19                  # reason code 0x19 re-authenticate
        00                  # property length 0: only "both omitted" is allowed (3.15.2)
    """),
    Vector("v5-auth-properties", 5, lambda c: c.Auth(0x18, {
        P.AUTHENTICATION_METHOD: "SCRAM", P.AUTHENTICATION_DATA: b"\x00\xff",
        P.REASON_STRING: "more", P.USER_PROPERTY: (("a", "b"),)}), """
        f0 1d               # AUTH, remaining length 29
        18                  # reason code 0x18 continue authentication
        1b                  # property length 27
        15 00 05 53 43 52 41 4d  # authentication method "SCRAM"
        16 00 02 00 ff      #   authentication data 00 ff
        1f 00 04 6d 6f 72 65  # reason string "more"
        26 00 01 61 00 01 62  # user property ("a", "b")
    """),
    # ---------------------------------------------------------------- MQTT 3.1.1
    Vector("v4-connect-will-credentials", 4, lambda c: c.Connect(
        "client-1", True, 60, "u", b"p", c.Will("w", b"gone", 2, False), protocol_level=4), """
        10 23               # CONNECT, remaining length 35
        00 04 4d 51 54 54   # protocol name "MQTT"
        04                  # protocol level 4 (3.1.1)
        d6                  # flags: user name, password, will QoS 2, will, clean session
        00 3c               # keep alive 60
        00 08 63 6c 69 65 6e 74 2d 31  # client identifier "client-1"
        00 01 77            # will topic "w"
        00 04 67 6f 6e 65   # will message "gone"
        00 01 75            # user name "u"
        00 01 70            # password "p"
    """),
    Vector("v4-connect-username-only", 4, lambda c: c.Connect(
        "x", False, 0, "name", protocol_level=4), """
        10 13               # CONNECT, remaining length 19
        00 04 4d 51 54 54 04  # "MQTT" level 4
        80                  # flags: user name only, clean session 0
        00 00               # keep alive 0 (disabled)
        00 01 78            # client identifier "x"
        00 04 6e 61 6d 65   # user name "name"
    """),
    Vector("v3-connect-mqisdp", 3, lambda c: c.Connect("c31", False, 10, protocol_level=3), """
        10 11               # CONNECT, remaining length 17
        00 06 4d 51 49 73 64 70  # protocol name "MQIsdp" (MQTT 3.1)
        03                  # protocol level 3
        00                  # flags: none
        00 0a               # keep alive 10
        00 03 63 33 31      # client identifier "c31"
    """),
    Vector("v4-connack-session-present", 4, lambda c: c.Connack(True, 0), """
        20 02               # CONNACK, remaining length 2 (no properties in 3.1.1)
        01                  # session present
        00                  # return code 0 accepted
    """),
    Vector("v4-connack-bad-credentials", 4, lambda c: c.Connack(False, 0x86), """
        20 02 00
        04                  # return code 4 bad user name or password (v5 0x86)
    """),
    Vector("v4-connack-identifier-rejected", 4, lambda c: c.Connack(False, 0x85), """
        20 02 00
        02                  # return code 2 identifier rejected (v5 0x85)
    """),
    Vector("v4-publish-qos1", 4, lambda c: c.Publish("a/b", b"x", 1, packet_id=10), """
        32 08               # PUBLISH QoS 1, remaining length 8
        00 03 61 2f 62      # topic name "a/b"
        00 0a               # packet identifier 10 (no properties in 3.1.1)
        78                  # payload "x"
    """),
    Vector("v4-publish-qos0-retain", 4, lambda c: c.Publish("$SYS/x", b"", 0, True), """
        31 08               # PUBLISH QoS 0 RETAIN, remaining length 8
        00 06 24 53 59 53 2f 78  # topic name "$SYS/x", empty payload
    """),
    Vector("v4-puback", 4, lambda c: c.Puback(7), "40 02 00 07  # PUBACK id 7"),
    Vector("v4-pubrec", 4, lambda c: c.Pubrec(8), "50 02 00 08  # PUBREC id 8"),
    Vector("v4-pubrel", 4, lambda c: c.Pubrel(9), "62 02 00 09  # PUBREL (flags 0010) id 9"),
    Vector("v4-pubcomp", 4, lambda c: c.Pubcomp(0xFFFF), "70 02 ff ff  # PUBCOMP id 65535"),
    Vector("v4-subscribe", 4, lambda c: c.Subscribe(
        1, [c.Subscription("a/#", 1), c.Subscription("b", 2)]), """
        82 0c               # SUBSCRIBE (flags 0010), remaining length 12
        00 01               # packet identifier 1
        00 03 61 2f 23 01   # "a/#" requested QoS 1
        00 01 62 02         # "b" requested QoS 2
    """),
    Vector("v4-suback", 4, lambda c: c.Suback(1, [1, 2, 0x80]), """
        90 05               # SUBACK, remaining length 5
        00 01               # packet identifier 1
        01 02 80            # granted QoS 1, granted QoS 2, failure
    """),
    Vector("v4-unsubscribe", 4, lambda c: c.Unsubscribe(2, ["a/#"]), """
        a2 07               # UNSUBSCRIBE (flags 0010), remaining length 7
        00 02               # packet identifier 2
        00 03 61 2f 23      # topic filter "a/#"
    """),
    Vector("v4-unsuback", 4, lambda c: c.Unsuback(2), """
        b0 02 00 02         # UNSUBACK id 2 (no reason codes in 3.1.1)
    """),
    Vector("v4-pingreq", 4, lambda c: c.Pingreq(), "c0 00"),
    Vector("v4-pingresp", 4, lambda c: c.Pingresp(), "d0 00"),
    Vector("v4-disconnect", 4, lambda c: c.Disconnect(), "e0 00  # DISCONNECT"),
    Vector("v3-publish", 3, lambda c: c.Publish("t", b"1", 2, packet_id=3), """
        34 06               # PUBLISH QoS 2: 3.1 has the 3.1.1 layout
        00 01 74 00 03 31   # topic "t", packet identifier 3, payload "1"
    """),
]

#: Wire forms a decoder must accept that the encoder writes shorter.
DECODE_ONLY = [
    Vector("v5-puback-explicit-success", 5, lambda c: c.Puback(1), """
        40 03 00 01
        00                  # reason code 0 written out, no property length
    """),
    Vector("v5-puback-empty-properties", 5, lambda c: c.Puback(1), """
        40 04 00 01 00
        00                  # property length 0 written out
    """),
    Vector("v5-pubrel-explicit-success", 5, lambda c: c.Pubrel(1), "62 03 00 01 00"),
    Vector("v5-disconnect-explicit-success", 5, lambda c: c.Disconnect(), "e0 01 00"),
    Vector("v5-disconnect-empty-properties", 5, lambda c: c.Disconnect(), "e0 02 00 00"),
    Vector("v5-auth-explicit-success", 5, lambda c: c.Auth(), "f0 01 00"),
    Vector("v5-auth-reason-without-property-length", 5, lambda c: c.Auth(0x18), """
        f0 01 18            # accepted as DISCONNECT's rule would (lenient reading)
    """),
    Vector("v4-connect-in-v5-decoder", 5, lambda c: c.Connect("x", True, 0, protocol_level=4), """
        10 0d 00 04 4d 51 54 54
        04                  # a CONNECT carries its own level, whatever the decoder's
        02 00 00 00 01 78
    """),
]

#: 3.1.1 encodings that drop or map MQTT 5.0-only fields.
ENCODE_ONLY = [
    Vector("v4-puback-drops-reason-and-properties", 4,
           lambda c: c.Puback(1, 0x10, {P.REASON_STRING: "x"}), "40 02 00 01"),
    Vector("v4-pubrel-drops-reason", 4, lambda c: c.Pubrel(1, 0x92), "62 02 00 01"),
    Vector("v4-connack-maps-banned", 4, lambda c: c.Connack(False, 0x8A), """
        20 02 00
        05                  # 0x8a banned -> 5 not authorized
    """),
    Vector("v4-connack-maps-server-busy", 4, lambda c: c.Connack(False, 0x89), """
        20 02 00
        03                  # 0x89 server busy -> 3 server unavailable
    """),
    Vector("v4-disconnect-drops-reason", 4,
           lambda c: c.Disconnect(0x8E, {P.REASON_STRING: "bye"}), "e0 00"),
    Vector("v4-unsuback-drops-codes", 4, lambda c: c.Unsuback(3, [0x11]), "b0 02 00 03"),
    Vector("v4-subscribe-keeps-only-qos", 4, lambda c: c.Subscribe(
        1, [c.Subscription("a", 1, True, True, 2)], {P.SUBSCRIPTION_IDENTIFIER: 4}), """
        82 06 00 01
        00 01 61
        01                  # QoS 1; no local, RAP, retain handling are v5-only
    """),
    Vector("v4-publish-drops-properties", 4, lambda c: c.Publish(
        "a", b"", 0, properties={P.MESSAGE_EXPIRY_INTERVAL: 5}), "30 03 00 01 61"),
    Vector("v4-connect-level-from-version", 4, lambda c: c.Connect(
        "x", True, 0, properties={P.SESSION_EXPIRY_INTERVAL: 9}), """
        10 0d 00 04 4d 51 54 54
        04                  # protocol_level 0: encode()'s version, properties dropped
        02 00 00 00 01 78
    """),
    Vector("v3-connect-level-from-version", 3, lambda c: c.Connect("x", True, 0), """
        10 0f
        00 06 4d 51 49 73 64 70 03  # version 3 writes "MQIsdp" level 3
        02 00 00 00 01 78
    """),
]


def _ids(rows):
    return [row.name for row in rows]


@pytest.mark.parametrize("row", VECTORS, ids=_ids(VECTORS))
def test_decode(codec, row):
    packet = codec.decode(h(row.hex), row.version)
    assert packet == row.build(codec)


@pytest.mark.parametrize("row", VECTORS, ids=_ids(VECTORS))
def test_encode(codec, row):
    assert codec.encode(row.build(codec), row.version).hex(" ") == h(row.hex).hex(" ")


@pytest.mark.parametrize("row", VECTORS, ids=_ids(VECTORS))
def test_round_trip(codec, row):
    packet = row.build(codec)
    assert codec.decode(codec.encode(packet, row.version), row.version) == packet


@pytest.mark.parametrize("row", VECTORS, ids=_ids(VECTORS))
def test_stream_decoder(codec, row):
    """The streaming decoder agrees with decode(), fed the vector in one piece."""
    version = row.version
    decoder = codec.Decoder(version)
    assert decoder.feed(h(row.hex)) == [row.build(codec)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("row", DECODE_ONLY, ids=_ids(DECODE_ONLY))
def test_decode_only(codec, row):
    assert codec.decode(h(row.hex), row.version) == row.build(codec)


@pytest.mark.parametrize("row", ENCODE_ONLY, ids=_ids(ENCODE_ONLY))
def test_encode_only(codec, row):
    assert codec.encode(row.build(codec), row.version).hex(" ") == h(row.hex).hex(" ")


def test_vectors_cover_every_packet_type_and_property(codec):
    """Guard the table itself: each type in v5 and 3.1.1, each property once."""
    from fastmqtt.enums import PacketType, PropertyId

    seen_types = {5: set(), 4: set()}
    seen_props = set()
    for row in VECTORS:
        packet = row.build(codec)
        seen_types[5 if row.version == 5 else 4].add(packet.packet_type)
        props = [getattr(packet, "properties", EMPTY_PROPERTIES)]
        if getattr(packet, "will", None) is not None:
            props.append(packet.will.properties)
        for mapping in props:
            seen_props.update(mapping)
    assert seen_types[5] == set(PacketType)
    assert seen_types[4] == set(PacketType) - {PacketType.AUTH}
    assert seen_props == set(PropertyId)


def test_packet_classes_are_immutable_and_compare_all_fields(codec):
    c = codec
    publish = c.Publish("a", b"x", 1, packet_id=1)
    with pytest.raises(AttributeError):
        publish.topic = "b"
    assert publish == c.Publish("a", b"x", 1, packet_id=1)
    assert publish != c.Publish("a", b"x", 1, packet_id=2)
    assert publish != c.Publish("a", b"x", 1, packet_id=1, properties={P.TOPIC_ALIAS: 1})
    assert c.Puback(1) != c.Pubrec(1)  # same fields, different packet
    assert "topic='a'" in repr(publish) or "'a'" in repr(publish)
    assert c.Publish.packet_type == 3 and c.Pubcomp.packet_type == 7
    assert c.Publish("a").properties is EMPTY_PROPERTIES
    assert c.Subscribe(1, [c.Subscription("a")]).subscriptions == (c.Subscription("a"),)


def test_decoded_empty_properties_are_the_shared_object(codec):
    assert codec.decode(h("30 04 00 01 61 00"), 5).properties is EMPTY_PROPERTIES
    assert codec.decode(h("40 02 00 01"), 5).properties is EMPTY_PROPERTIES
    assert codec.decode(h("32 05 00 01 61 00 01"), 4).properties is EMPTY_PROPERTIES


def test_encoder_accepts_lists_and_bare_subscription_identifier(codec):
    c = codec
    from_lists = c.Publish("a", b"", 0, properties={
        P.USER_PROPERTY: [("k", "v")], P.SUBSCRIPTION_IDENTIFIER: [7]})
    bare = c.Publish("a", b"", 0, properties={
        P.USER_PROPERTY: (("k", "v"),), P.SUBSCRIPTION_IDENTIFIER: 7})
    expected = h("30 0d 00 01 61 09 0b 07 26 00 01 6b 00 01 76")
    assert c.encode(from_lists) == expected
    assert c.encode(bare) == expected
    decoded = c.decode(expected)
    assert decoded.properties[P.SUBSCRIPTION_IDENTIFIER] == (7,)
    assert decoded.properties[P.USER_PROPERTY] == (("k", "v"),)


@pytest.mark.parametrize("row", VECTORS, ids=_ids(VECTORS))
def test_packets_pickle(codec, row):
    """Packets survive pickling (a store or a worker process may need it)."""
    import pickle

    packet = row.build(codec)
    assert pickle.loads(pickle.dumps(packet)) == packet
