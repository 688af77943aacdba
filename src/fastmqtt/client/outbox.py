"""Outboxes: the client's queue of messages not yet fully acknowledged.

Every PUBLISH the application makes goes through the outbox (QoS 0 only while
something is queued ahead of it or the client is offline). An entry lives from
``put`` until the server acknowledged it (PUBACK, PUBCOMP, or a failing
PUBREC), moving through three states:

``queued``   not written yet (offline, or the server's Receive Maximum is full)
``publish``  PUBLISH written with ``packet_id``, waiting for PUBACK/PUBREC
``pubrel``   QoS 2: PUBREC received, PUBREL written, waiting for PUBCOMP

:class:`MemoryOutbox` keeps entries in a dict; :class:`SQLiteOutbox` mirrors the
same dict in an SQLite table so that unacknowledged messages survive a process
restart: on the next start the client restores ``publish``/``pubrel`` entries
into the session with their original packet ids (resent after CONNACK,
[MQTT-4.4.0-1]) and sends ``queued`` ones as new messages. Entries store the
PUBLISH encoded with the MQTT 5.0 codec, so properties (user properties,
expiry, correlation data) round-trip exactly.

Both are bounded: ``put`` beyond ``max_messages`` raises :class:`OutboxFull`
rather than growing without limit or silently dropping (paho's in-memory queue
does the latter).
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from .. import codec

__all__ = ["OutboxEntry", "Outbox", "MemoryOutbox", "SQLiteOutbox", "OutboxFull"]


class OutboxFull(Exception):
    """The outbox already holds ``max_messages`` unacknowledged messages."""


@dataclass(slots=True)
class OutboxEntry:
    seq: int
    publish: Any  # codec.Publish (packet id 0, full topic)
    created: float  # time.time() when put: message expiry counts from here
    state: str = "queued"
    packet_id: int = 0


class MemoryOutbox:
    """Bounded in-memory outbox (lost when the process exits).

    Args:
        max_messages: most entries held at once.
    """

    persistent = False

    def __init__(self, max_messages: int = 10_000) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self.max_messages = max_messages
        self._entries: OrderedDict[int, OutboxEntry] = OrderedDict()
        self._queued: OrderedDict[int, None] = OrderedDict()
        self._next_seq = 1

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queued(self) -> int:
        """Entries not written yet."""
        return len(self._queued)

    def entries(self) -> list[OutboxEntry]:
        """Every entry in ``put`` order."""
        return list(self._entries.values())

    def put(self, publish: Any, created: float | None = None) -> OutboxEntry:
        """Queue a message.

        Raises:
            OutboxFull: ``max_messages`` entries are held already.
        """
        if len(self._entries) >= self.max_messages:
            raise OutboxFull(f"outbox holds {len(self._entries)} messages")
        entry = OutboxEntry(self._next_seq, publish, time.time() if created is None else created)
        self._next_seq += 1
        self._entries[entry.seq] = entry
        self._queued[entry.seq] = None
        self._save(entry)
        return entry

    def peek_queued(self) -> OutboxEntry | None:
        """The oldest entry not written yet."""
        for seq in self._queued:
            return self._entries[seq]
        return None

    def iter_queued(self) -> Iterator[OutboxEntry]:
        for seq in list(self._queued):
            yield self._entries[seq]

    def mark_sent(self, entry: OutboxEntry, packet_id: int) -> None:
        """The entry's PUBLISH was handed to the session under ``packet_id``."""
        self._queued.pop(entry.seq, None)
        entry.state = "publish"
        entry.packet_id = packet_id
        self._update(entry)

    def mark_released(self, entry: OutboxEntry) -> None:
        """QoS 2: PUBREC arrived and PUBREL is on its way."""
        entry.state = "pubrel"
        self._update(entry)

    def remove(self, entry: OutboxEntry) -> None:
        """The flow is complete (or the message is dropped)."""
        self._entries.pop(entry.seq, None)
        self._queued.pop(entry.seq, None)
        self._delete(entry)

    def get(self, seq: int) -> OutboxEntry | None:
        return self._entries.get(seq)

    def close(self) -> None:
        pass

    # persistence hooks (no-ops here)
    def _save(self, entry: OutboxEntry) -> None:
        pass

    def _update(self, entry: OutboxEntry) -> None:
        pass

    def _delete(self, entry: OutboxEntry) -> None:
        pass


#: Anything with MemoryOutbox's interface.
Outbox = MemoryOutbox


class SQLiteOutbox(MemoryOutbox):
    """Outbox kept in an SQLite file so that it survives a process restart.

    Every change is committed before the call returns (WAL journal;
    ``synchronous=NORMAL`` by default: safe against a process crash, and
    ``durable=True`` sets ``FULL`` to survive power loss too). Writes are small
    and local, so they run on the event loop's thread.

    Args:
        path: database file (created if missing).
        max_messages: most entries held at once.
        durable: fsync each commit (``PRAGMA synchronous=FULL``).
    """

    persistent = True

    def __init__(self, path: str, max_messages: int = 10_000, durable: bool = False) -> None:
        super().__init__(max_messages)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " seq INTEGER PRIMARY KEY, packet BLOB NOT NULL, created REAL NOT NULL,"
            " state TEXT NOT NULL, packet_id INTEGER NOT NULL)")
        for seq, blob, created, state, packet_id in self._db.execute(
                "SELECT seq, packet, created, state, packet_id FROM outbox ORDER BY seq"):
            p = codec.decode(bytes(blob), 5)
            pub = codec.Publish(p.topic, p.payload, p.qos, p.retain, False, 0, p.properties)
            entry = OutboxEntry(seq, pub, created, state, packet_id)
            self._entries[seq] = entry
            if state == "queued":
                self._queued[seq] = None
            self._next_seq = max(self._next_seq, seq + 1)

    def _save(self, entry: OutboxEntry) -> None:
        pub = entry.publish
        # Stored with a placeholder packet id so QoS 1/2 encode (0 is invalid).
        blob = codec.encode(codec.Publish(pub.topic, pub.payload, pub.qos, pub.retain, False,
                                          1 if pub.qos else 0, pub.properties), 5)
        self._db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?, ?)",
                         (entry.seq, blob, entry.created, entry.state, entry.packet_id))

    def _update(self, entry: OutboxEntry) -> None:
        self._db.execute("UPDATE outbox SET state = ?, packet_id = ? WHERE seq = ?",
                         (entry.state, entry.packet_id, entry.seq))

    def _delete(self, entry: OutboxEntry) -> None:
        self._db.execute("DELETE FROM outbox WHERE seq = ?", (entry.seq,))

    def close(self) -> None:
        self._db.close()
