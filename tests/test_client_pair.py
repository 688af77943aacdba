"""The client protocol wired to the broker's sans-IO server side and core, in
memory (h11's ConnectionPair idea): no sockets, no clock, and hypothesis
chooses where the network breaks.

A publisher and a subscriber (both :class:`ClientProtocol`, persistent v5
sessions) talk to one :class:`BrokerCore` through
:class:`~fastmqtt.session.ServerConnection` objects. Bytes move in explicit
steps; a "cut" drops whatever is in transit in both directions and ends both
connections, and the clients reconnect with Clean Start 0. Whatever the cut
points, every QoS 1 message reaches the subscriber at least once, every QoS 2
message exactly once, and every publish completes [MQTT-4.4.0-1]
[MQTT-4.3.3-10].
"""

from __future__ import annotations

from hypothesis import event, given, settings, strategies as st

from fastmqtt.client.protocol import (ClientProtocol, Connected, MessageReceived,
                                      PublishCompleted)

from fastmqtt import codec
from fastmqtt.broker import core as core_mod
from fastmqtt.session import ProtocolViolation, ServerConnection


class Link:
    """One client's connection to the core: two byte queues."""

    def __init__(self, core, proto: ClientProtocol, now: float) -> None:
        self.core = core
        self.proto = proto
        cfg = core.config  # as the trio edge builds it (broker/server.py)
        self.server = ServerConnection(
            now, max_packet_size=cfg.max_packet_size, topic_alias_maximum=cfg.topic_alias_maximum,
            connect_timeout=cfg.connect_timeout, keepalive_grace=cfg.keepalive_grace,
            max_qos=cfg.max_qos, retain_available=cfg.retain_available)
        self.to_server = bytearray(proto.start(now))
        self.to_client = bytearray()
        self.up = True

    def pump(self, now: float, events: list) -> None:
        """Deliver everything in transit, both ways, until quiet."""
        for _ in range(100):
            moved = False
            if self.to_server:
                data = bytes(self.to_server)
                self.to_server.clear()
                moved = True
                for ev in self.server.receive_data(data, now):
                    assert not isinstance(ev, ProtocolViolation), ev
                    if ev.packet_type == 1:
                        assert self.core.connect(self.server, ev, now)
                    else:
                        self.core.handle(self.server, ev, now)
            out = self.server.take_output() + self.server.take_acks()[1]
            if out:
                self.to_client += out
            if self.to_client:
                data = bytes(self.to_client)
                self.to_client.clear()
                moved = True
                evs = self.proto.receive_data(data, now)
                for ev in evs:
                    if isinstance(ev, Connected):
                        self.to_server += b"".join(ev.resend)
                events.extend(evs)
                self.to_server += self.proto.data_to_send()
            if not moved:
                return
        raise AssertionError("no quiescence")

    def cut(self, now: float) -> None:
        self.to_server.clear()
        self.to_client.clear()
        self.core.connection_lost(self.server, now)
        self.proto.connection_lost()
        self.up = False


OPS = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.sampled_from([1, 2])),
    st.tuples(st.just("step_pub"), st.integers(1, 40)),
    st.tuples(st.just("step_sub"), st.integers(1, 40)),
    st.tuples(st.just("cut"), st.sampled_from(["pub", "sub"])),
), min_size=1, max_size=30)


def _partial(link: Link, nbytes: int, now: float, events: list) -> None:
    """Move at most ``nbytes`` in each direction (a packet may stay half sent)."""
    if link.to_server:
        chunk = bytes(link.to_server[:nbytes])
        del link.to_server[:nbytes]
        for ev in link.server.receive_data(chunk, now):
            assert not isinstance(ev, ProtocolViolation), ev
            if ev.packet_type == 1:
                assert link.core.connect(link.server, ev, now)
            else:
                link.core.handle(link.server, ev, now)
    link.to_client += link.server.take_output() + link.server.take_acks()[1]
    if link.to_client:
        chunk = bytes(link.to_client[:nbytes])
        del link.to_client[:nbytes]
        evs = link.proto.receive_data(chunk, now)
        for ev in evs:
            if isinstance(ev, Connected):
                link.to_server += b"".join(ev.resend)
        events.extend(evs)
        link.to_server += link.proto.data_to_send()


@settings(max_examples=120, deadline=None)
@given(ops=OPS)
def test_no_message_lost_or_duplicated_beyond_qos_whatever_the_cut_points(ops):
    core = core_mod.BrokerCore()
    now = 1000.0
    pub = ClientProtocol("pub", session_expiry=600, clean_start=True)
    sub = ClientProtocol("sub", session_expiry=600, clean_start=True)
    pub_events: list = []
    sub_events: list = []
    lp = Link(core, pub, now)
    ls = Link(core, sub, now)
    lp.pump(now, pub_events)
    ls.pump(now, sub_events)
    pid, data = sub.subscribe([codec.Subscription("t/#", 2)])
    ls.to_server += data
    ls.pump(now, sub_events)

    sent: dict[int, int] = {}  # packet id -> qos, per publish (payload = index)
    payloads: dict[bytes, int] = {}
    for op, arg in ops:
        now += 1
        if op == "publish":
            if not lp.up or not pub.connected or pub.send_quota <= 0:
                continue
            payload = str(len(payloads)).encode()
            payloads[payload] = arg
            pid, data = pub.publish("t/x", payload, arg)
            lp.to_server += data
        elif op == "step_pub" and lp.up:
            _partial(lp, arg, now, pub_events)
        elif op == "step_sub" and ls.up:
            _partial(ls, arg, now, sub_events)
        elif op == "cut":
            link = lp if arg == "pub" else ls
            if link.up:
                event(f"cut {arg} with {min(link.proto.inflight, 2)}+ in flight")
                link.cut(now)
    # Heal: reconnect whoever is down and let everything settle.
    for _ in range(3):
        now += 1
        if not lp.up:
            lp = Link(core, pub, now)
        if not ls.up:
            ls = Link(core, sub, now)
        lp.pump(now, pub_events)
        ls.pump(now, sub_events)
        lp.pump(now, pub_events)
    completed = [e for e in pub_events if isinstance(e, PublishCompleted)]
    assert pub.inflight == 0, pub.inflight_messages()
    assert sorted(e.publish.payload for e in completed) == sorted(payloads)
    assert all(e.reason_code < 0x80 for e in completed)
    got: dict[bytes, int] = {}
    for e in sub_events:
        if isinstance(e, MessageReceived):
            got[e.publish.payload] = got.get(e.publish.payload, 0) + 1
    for payload, qos in payloads.items():
        assert got.get(payload, 0) >= 1, (payload, qos)
        if qos == 2:
            assert got[payload] == 1, (payload, got[payload])
