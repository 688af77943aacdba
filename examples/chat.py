"""Terminal chat between two users through an MQTT broker.

Run the broker, then one terminal per user::

    fastmqtt-broker                                   # or mosquitto
    python examples/chat.py --user alice --peer bob
    python examples/chat.py --user bob --peer alice

Type a line and press Enter to send it. ``/who`` shows presence, ``/quit``
(or end of input) leaves. Received messages print as ``<alice> text``; the
peer's presence changes print as ``* bob is online``. With fastmqtt-broker
configured with ``history = ["chat/+/dm/+"]`` a client that reconnects fetches
what it missed (marked ``(history)``).

Everything interesting is in the library: ``ChatSession`` subscribes to the
conversation, the user topic and presence, publishes a retained status with a
will that marks the device offline, drops duplicates by event id, and catches
up after reconnects; ``Client`` reconnects with backoff and keeps QoS 1
messages typed while offline in its outbox.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

from fastmqtt.chat import ChatMessage, ChatSession, ChatTopics, ChatTyping, UserStatus, new_event_id
from fastmqtt.client import Client


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--user", required=True, help="your user id")
    p.add_argument("--peer", required=True, help="who you talk to")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--url", help="broker URL instead of host/port (mqtt://, mqtts://, ws://, wss://)")
    p.add_argument("--workspace", default="demo")
    p.add_argument("--app", default="chat")
    p.add_argument("--device", default="terminal")
    return p.parse_args(argv)


def say(line: str) -> None:
    print(line, flush=True)


async def read_lines(send_channel: trio.MemorySendChannel) -> None:
    """Lines from stdin without blocking the event loop."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with send_channel, stdin:
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                if buf:
                    await send_channel.send(buf.decode("utf-8", "replace"))
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                await send_channel.send(line.decode("utf-8", "replace").rstrip("\r"))


async def show_events(chat: ChatSession, peer: str) -> None:
    async for d in chat.events():
        ev = d.event
        if isinstance(ev, ChatMessage):
            mark = " (history)" if d.from_history else ""
            say(f"<{ev.sender}> {ev.text}{mark}")
        elif isinstance(ev, ChatTyping) and ev.sender == peer and ev.typing:
            say(f"* {peer} is typing")
        elif isinstance(ev, UserStatus) and ev.user_id == peer:
            say(f"* {peer} is {chat.status_of(peer)}")


async def main(argv=None) -> None:
    args = parse_args(argv)
    topics = ChatTopics(args.app)
    grouping = ChatTopics.dm_grouping_id(args.user, args.peer)
    dm = topics.dm(args.workspace, grouping)
    will = ChatSession.will(args.workspace, args.user, args.device, app=args.app)
    target = dict(host=args.url) if args.url else dict(host=args.host, port=args.port)
    async with Client(**target, client_id=f"{args.user}-{args.device}", will=will,
                      keep_alive=30) as client:
        chat = ChatSession(client, workspace=args.workspace, user_id=args.user,
                           device_id=args.device, app=args.app)
        await chat.start()
        await chat.join(dm)
        say(f"* joined {dm} as {args.user}; {args.peer} is {chat.status_of(args.peer)}")
        send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_lines, send)
            nursery.start_soon(show_events, chat, args.peer)
            async with receive:
                async for line in receive:
                    if line.strip() == "/quit":
                        break
                    if line.strip() == "/who":
                        say(f"* {args.peer} is {chat.status_of(args.peer)}")
                        continue
                    if not line.strip():
                        continue
                    await chat.send(dm, ChatTyping(grouping_id=grouping, typing=False))
                    await chat.send(dm, ChatMessage(message_id=new_event_id(),
                                                    grouping_id=grouping, text=line))
            await client.drain(timeout=10)
            await chat.close()
            nursery.cancel_scope.cancel()
    say("* bye")


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
