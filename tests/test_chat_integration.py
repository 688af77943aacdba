"""ChatSession through real brokers: messages, de-duplication, presence with
a will, and history catch-up after a reconnect (fastmqtt-broker's
``$history`` API; Mosquitto has none and the session carries on without)."""

from __future__ import annotations

import pytest
import trio

from fastmqtt.chat import ChatMessage, ChatSession, ChatTopics, ChatTyping, encode_event
from fastmqtt.client import Backoff, Client

from fixtures_clients import uid

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)
WS = "acme"
GID = ChatTopics.dm_grouping_id("alice", "bob")


def chat_client(target, user, device="d1", **kw) -> Client:
    return Client(target.host, target.port, client_id=uid(user), backoff=FAST,
                  will=ChatSession.will(WS, user, device), **kw)


async def next_of(session, cls, timeout=10):
    with trio.fail_after(timeout):
        while True:
            d = await session.next_event()
            if isinstance(d.event, cls):
                return d


async def test_dm_message_typing_and_dedup(any_broker):
    with trio.fail_after(30):
        async with chat_client(any_broker, "alice") as ca, chat_client(any_broker, "bob") as cb:
            alice = ChatSession(ca, workspace=WS, user_id="alice", catch_up=False)
            bob = ChatSession(cb, workspace=WS, user_id="bob", catch_up=False)
            dm = alice.topics.dm(WS, GID)
            for s in (alice, bob):
                await s.start()
                await s.join(dm)
            ev = ChatMessage(message_id="m1", grouping_id=GID, text="hi bob")
            await alice.send(dm, ev)
            got = await next_of(bob, ChatMessage)
            assert got.event == ev and got.event.sender == "alice" and not got.from_history
            assert got.topic.kind == "dm" and got.topic.id == GID
            # The same event again (e.g. a retry by another path) is dropped...
            await ca.publish(dm, encode_event(ev), qos=1)
            await alice.send(dm, ChatTyping(grouping_id=GID))
            typing = await next_of(bob, ChatTyping)
            assert typing.message.qos == 0
            await alice.send(dm, ChatMessage(message_id="m2", grouping_id=GID, text="2"))
            second = await next_of(bob, ChatMessage)
            assert second.event.message_id == "m2"  # ...so m1 did not come twice
            assert bob.dedup.duplicates >= 1
            # Alice does not get her own message back.
            with trio.move_on_after(0.3):
                d = await next_of(alice, ChatMessage)
                pytest.fail(f"own echo delivered: {d}")


async def test_presence_online_and_will_marks_offline(any_broker, mqtt_proxy):
    proxy = await mqtt_proxy(any_broker)
    with trio.fail_after(30):
        async with chat_client(any_broker, "alice") as ca:
            alice = ChatSession(ca, workspace=WS, user_id="alice", catch_up=False)
            await alice.start()
            async with chat_client(proxy, "bob", device="phone", keep_alive=5) as cb:
                bob = ChatSession(cb, workspace=WS, user_id="bob", device_id="phone",
                                  catch_up=False)
                await bob.start()
                while alice.status_of("bob") != "online":
                    await alice.next_event()
                proxy.accepting = False
                proxy.sever()  # no DISCONNECT: the broker publishes bob's will
                while alice.status_of("bob") != "offline":
                    await alice.next_event()
                assert alice.tracker.devices("bob") == {"phone": "offline"}


async def test_reconnect_catches_up_from_history(broker_factory, mqtt_proxy):
    b = broker_factory("fastmqtt", config={"history": ["chat/+/dm/+", "chat/+/channel/+"]})
    proxy = await mqtt_proxy(b)
    with trio.fail_after(40):
        async with chat_client(b, "alice") as ca, chat_client(proxy, "bob") as cb:
            alice = ChatSession(ca, workspace=WS, user_id="alice", catch_up=False)
            bob = ChatSession(cb, workspace=WS, user_id="bob", history_timeout=5)
            dm = alice.topics.dm(WS, GID)
            await alice.start()
            await bob.start()
            await alice.join(dm)
            await bob.join(dm)
            await alice.send(dm, ChatMessage(message_id="live", grouping_id=GID, text="0"))
            assert (await next_of(bob, ChatMessage)).event.message_id == "live"
            # Bob drops off (clean session: the broker queues nothing for him).
            proxy.accepting = False
            proxy.sever()
            await cb.wait_disconnected()
            for i in range(3):
                await alice.send(dm, ChatMessage(message_id=f"missed{i}", grouping_id=GID,
                                                 text=str(i)))
            proxy.accepting = True
            got = [await next_of(bob, ChatMessage) for _ in range(3)]
            assert [d.event.message_id for d in got] == ["missed0", "missed1", "missed2"]
            assert all(d.from_history for d in got)
            assert bob.history_available is True
            # Nothing more: "live" was known and stopped the walk back.
            with trio.move_on_after(0.5):
                d = await next_of(bob, ChatMessage)
                pytest.fail(f"duplicate delivered: {d}")
            # A member joining later loads the recent conversation.
            async with chat_client(b, "carol") as cc:
                carol = ChatSession(cc, workspace=WS, user_id="carol")
                await carol.join(dm, load_history=10)
                loaded = [await next_of(carol, ChatMessage) for _ in range(4)]
                assert [d.event.message_id for d in loaded] == [
                    "live", "missed0", "missed1", "missed2"]


async def test_catch_up_without_history_api_times_out_quietly(broker_factory):
    b = broker_factory("mosquitto")
    with trio.fail_after(20):
        async with chat_client(b, "bob") as cb:
            bob = ChatSession(cb, workspace=WS, user_id="bob", history_timeout=0.3)
            dm = bob.topics.dm(WS, GID)
            await bob.join(dm)
            assert await bob.catch_up(dm) == 0
            assert bob.history_available is False


@pytest.mark.parametrize("version", [4, 5])
async def test_fetch_history_pages(broker_factory, version):
    from fastmqtt.chat import HistoryError, fetch_history, iter_history

    b = broker_factory("fastmqtt", config={"history": ["chat/+/channel/+"]})
    topic = ChatTopics().channel(WS, "general")
    with trio.fail_after(30):
        async with Client(b.host, b.port, backoff=FAST, version=version) as c:
            for i in range(5):
                await c.publish(topic, encode_event(ChatMessage(message_id=f"p{i}",
                                                                grouping_id="-", text=str(i))))
            page = await fetch_history(c, topic, limit=2)
            assert [m.payload for m in page.messages][-1].endswith(b'"text":"4","reply_to":null,"attachments":[]}}')
            pages = [p async for p in iter_history(c, topic, limit=2)]
            texts = [m.payload for p in pages for m in p.messages]
            assert len(texts) == 5 and [len(p.messages) for p in pages] == [2, 2, 1]
            with pytest.raises(HistoryError):
                await fetch_history(c, ChatTopics().dm(WS, "x"), limit=2)  # not recorded
