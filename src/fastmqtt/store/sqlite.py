"""SQLite store: the broker's default persistence (stdlib ``sqlite3``, WAL).

Theory of operation
-------------------
The broker core is synchronous and runs on the trio thread; it must never
wait for the disk. So every mutator (``put_session``, ``add_delivery``, ...)
only records its change in the *current batch* (a few dicts) and returns.

The state is in two places:

* ``fastmqtt.db``, the *tables* (SQLite, WAL mode): one row per session,
  subscription, message, delivery, ... (the layout in ``_SCHEMA``), plus
  ``compacted_lsn`` in ``meta``: the last log record whose changes the tables
  contain;
* the *log*: segment files ``fastmqtt-log.<first lsn in hex>``, records back to
  back, one per flush: a frame (length, lsn) and the flush's changes as one
  blob with its CRC-32 (see :func:`_encode_parts`).

The hot mutators (``put_message``, ``add_delivery``, ``update_delivery``,
``remove_delivery``, compiled in :mod:`fastmqtt._record`) append each change
as a few bytes to an *op buffer*; the others fill a *batch* (a net effect,
see below). A *flush* takes both (under the store's lock), encodes them as one
record (the batch pickled, empty most of the time, then the ops as they are)
and hands the parts to the log writer (:class:`fastmqtt._wal.LogWriter`). The
first change of a batch schedules the flush on the trio loop (the first time
with ``run_sync_soon``, then by waking a parked flush task), so every change
the loop records until it gets there rides along; outside trio a flusher
thread does it.

The log writer is compiled and runs on its own thread without the GIL: it
swaps the appended bytes for an empty buffer, puts each record's CRC-32 in
front of it, writes them to the current
segment, fsyncs them (``fdatasync``) per the durability mode, announces how far it
got on an ``eventfd``. A trio system task waits on that fd and wakes the tasks
blocked in :meth:`SqliteStore.durable`. While one write (and its fsync) runs,
new records pile up in the buffer: that is group commit, and it is why one
fsync can cover hundreds of PUBLISHes from many publishers. ``mark()`` is the
sequence number of the last recorded change; the broker sends PUBACK/PUBREC
once ``await durable(mark())`` returns.

Why a log, and why this writer: row-at-a-time work for each message and
delivery (B-tree inserts in four tables, the parameters built in Python) used
to cost the trio thread as much as the broker's own work, and a Python writer
thread had to win the GIL back from the busy trio thread after every system
call, while the trio thread waited for the GIL the writer held. One record per
flush, one ``write`` per group of records, and no Python on the writer thread
leave the trio thread alone.

The compactor folds the log into the tables. It runs in a process of its own
(``fastmqtt.store.compactor``; ``compactor="thread"`` keeps it in a thread of
the broker): folding is Python work, and in a thread it took the GIL from the
event loop each time the loop made a system call, which cost the loop more
than the folding itself (offline throughput rose by half when it moved out).
A compactor thread in the broker decides when: every ``COMPACT_PERIOD``
seconds or ``COMPACT_OPS`` changes, it asks the process to fold the records
written so far (the tables never get ahead of the log). The process reads
them back from the segment files, merges them into one net effect (a delivery
added in one record and acknowledged in a later one cancels out before it
ever reaches the tables) and applies that in one transaction that also sets
``compacted_lsn`` to the last record it covers. The thread then deletes the
segments whose records are all at or below that. If the process dies, the
compaction fails and the retry starts another; it is killed with the broker
(a compaction cut short is rolled back). That
transaction is the only link between the tables and the log, so a segment may
be deleted late or not at all (records at or below ``compacted_lsn`` are
skipped) and a compaction cut short by a crash simply did not happen: recovery
replays the log records after ``compacted_lsn``, in order, onto the tables.
Replaying is idempotent because each record holds final values ("row X is now
Y", "row X is gone"), never increments.

Batches are *net effects*, keyed by primary key, so later changes overwrite
earlier ones in the same batch. Ops become one when a record is decoded
(:func:`fastmqtt._record.decode_ops`, in the compactor and at recovery), by
the same rules. The one order-sensitive change,
``delete_session`` (which removes every row of a client), is applied first in
the transaction and drops that client's earlier entries from the batch, so
changes made after it still land after it. :func:`_merge` applies the same
rules across batches.

Coalescing: a delivery added and removed before the compactor folds them (in
one record or across several) never reaches the tables, and neither does its
message once no delivery refers to it; the log has them until its segment is
deleted. A fast subscriber's messages cost an append to the log, no table
rows. (Until this version the trio thread worked the net effect out itself,
in dicts, and an acknowledged delivery never reached the log at all: that
cost the loop more than appending the ops costs the writer.)

Message rows are reference counted in memory (deliveries per message), so the
row goes in the same batch as its last delivery; messages that end up with no
delivery (and any left over by a crash) are removed at start-up.

Durability modes
----------------
A ``write`` puts the records in the OS page cache: a ``kill -9`` of the broker
loses nothing written.

``sync`` (default): ``durable()`` returns only once an ``fdatasync`` that
followed the write has returned: nothing acknowledged is lost, even on power
failure.

``batch``: ``durable()`` returns after the write (announced before any
fsync that follows it); the writer fsyncs at most every ``batch_interval``:
a power failure or kernel crash loses at most that window, a process crash
nothing. A flush on the trio thread writes its record there itself when the
writer is idle (``LogWriter.write_record``: a page-cache write) and commits
its ticket at once, waking the waiters it covers without the writer's
round trip.

A new segment is begun once the current one holds ``SEGMENT_BYTES``; the old
one is fsynced and closed first, the data directory fsynced after the new
file is created. The new file is a folded segment kept for reuse when there
is one (``SPARE_SEGMENTS``), written over from its start; a segment so
reused is cut at the end of its own records when it is left, so only the
last segment can hold older records after its own. The tables are written
with ``synchronous=FULL`` (the compactor waits for its own fsync; nobody
else does), so a segment is deleted only once its changes are on disk in
the tables. Checkpoints (WAL into the database file) run in the compactor,
after a compaction. A write that fails is retried a few times (a full disk
may clear up); after that, or after any failed fsync (the kernel may have
dropped the pages), the store fails: ``durable()`` raises, since nothing
later could honestly be called durable.

Start-up
--------
``open()`` takes an exclusive lock file in the data directory (two brokers on
one directory would corrupt each other's view), runs ``PRAGMA quick_check`` on
the tables, replays the log into them (one transaction; the SQLite log of
earlier versions, ``fastmqtt-log.db``, first if there is one), removes the
segments and begins a fresh one, loads everything, drops what expired while
the broker was down and returns a
:class:`~fastmqtt.broker.interfaces.Snapshot`. A last record cut short (a
crash during an append, which nobody was told was durable) is logged and
ignored, as are the older records a reused last segment still holds after
its own; the first damaged record of the last segment ends the log (logged
as an error, the segment copied aside: see :func:`_read_segments`). A file
SQLite cannot read, that fails the check, that has a newer schema, or whose
log has a damaged record in an earlier segment or a gap is logged and
renamed, with its partner, to ``fastmqtt.db.corrupt-<UTC timestamp>`` (with
its ``-wal``/``-shm``), each log segment likewise, and a fresh database is
created: the broker starts, the evidence is kept, nothing is silently
overwritten. A single undecodable message row is logged and dropped.
"""

from __future__ import annotations

import fcntl
import heapq
import io
import os
import pickle
import queue
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from itertools import chain
from typing import Any

import trio

from .._record import Batch as _Batch
from .._record import Recorder, decode_ops
from .._record import delivery_rows as _delivery_rows
from .._record import message_rows as _message_rows
from .._wal import LogWriter
from ..broker.interfaces import DeliveryRecord, Snapshot, SubscriptionRecord
from .base import (StoreError, build_snapshot, decode_publish, delivery_extra,
                   encode_publish, log, parse_delivery_extra, publish_encoder,
                   publish_fields_encoder)

__all__ = ["SqliteStore", "DB_NAME", "SEGMENT_PREFIX", "SCHEMA_VERSION"]

DB_NAME = "fastmqtt.db"
#: The log's segment files: ``fastmqtt-log.<first record's lsn, 16 hex digits>``.
SEGMENT_PREFIX = "fastmqtt-log."
#: A segment is closed (and a new one begun) once it holds this much; a
#: closed segment is deleted once the tables hold all its records.
SEGMENT_BYTES = 16 * 1024 * 1024
#: Segments whose records the tables all have are kept for reuse, up to
#: ``SPARE_SEGMENTS`` of them, renamed ``fastmqtt-spare.<hex>``: the next
#: segment is one of them renamed and written over from its start (see
#: ``LogWriter.rotate``). Its pages are in the page cache already and its
#: blocks allocated, where a new file costs the broker's thread a page
#: allocation for every 4 KiB it writes (batch) and each fdatasync the
#: block allocation (sync). Persistence benchmark, offline, paired against
#: new files: after 2,000,000 messages (most segments reused), batch 1.029x
#: (5 pairs, the event loop's CPU 3.71 -> 3.50 us a message); on a fresh
#: broker, where about half the switches find a spare, batch 1.001-1.006x
#: and sync 1.034x (5 pairs each). Readers tell what such a file held
#: before from its records (see _read_segments). Four: a fold frees two or
#: three segments at a time under load.
SPARE_PREFIX = "fastmqtt-spare."
SPARE_SEGMENTS = 4
#: The log of brokers before 0.x segment files (a SQLite database, one row per
#: record): replayed at start-up if present, then removed.
LOG_NAME = "fastmqtt-log.db"
LOCK_NAME = "fastmqtt.lock"
#: 2: the log file and ``compacted_lsn``. A version 1 database (no log) is
#: upgraded in place; an older broker refuses (moves aside) a version 2 one,
#: as it would ignore the log. 3: ``sessions.username`` and ``deliveries.extra``
#: (RETAIN flag and subscription ids), added in place to a version 2 database
#: (NULL there: anonymous, not retained, no ids).
SCHEMA_VERSION = 3
LOG_SCHEMA_VERSION = 1
#: The compactor folds the log into the tables this often (seconds) while
#: there is something to fold, or sooner once this many changes are waiting.
#: Longer periods cancel more (an acknowledged delivery never reaches the
#: tables) and make fewer, larger transactions; recovery after a crash replays
#: at most about this much log.
COMPACT_PERIOD = 1.0
#: (A message queued for one subscriber and acknowledged is five changes, so
#: at 100,000 a second the period decides; fewer would cut the window a
#: subscriber less than a second behind needs for its deliveries to cancel
#: out. The compactor holds two such windows decoded: tens of MB.)
COMPACT_OPS = 400_000
#: Size of the tables' WAL that triggers a checkpoint (looked at after each
#: compaction, by the compactor).
CHECKPOINT_BYTES = 8 * 1024 * 1024
#: Page size of a new tables database (SQLite's default is 4096). The
#: compactor appends rows in bulk: with 16 KiB pages it writes a quarter as
#: many WAL frames (a header and a checksum each, two ``pwrite`` calls) and
#: splits B-tree pages a quarter as often. Folding an offline queue of
#: 300,000 messages took 14 % less SQLite time (inserts, commit and
#: checkpoint), and the persistence benchmark's offline level rose 1.4 to
#: 3.8 % (4 pairs each, 900,000-message rounds); online it was unchanged.
#: A database created with another page size keeps it.
PAGE_SIZE = 16384
#: Released messages remembered for a re-delivery under the same msg_id.
RELEASED_KEPT = 10_000
#: Records appended but not yet written (bytes) above which flushes stop
#: until the writer catches up (to half of it): while the disk stalls, changes
#: stay in the current batch, a net effect that does not grow with traffic
#: (a message queued and dropped again cancels out), instead of piling up as
#: records. Publishers keep waiting for their PUBACKs meanwhile.
PENDING_LIMIT = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS sessions(
    client_id TEXT PRIMARY KEY, expiry_interval INTEGER NOT NULL,
    protocol_level INTEGER NOT NULL, disconnected_at REAL, username TEXT);
CREATE TABLE IF NOT EXISTS subscriptions(
    client_id TEXT NOT NULL, topic_filter TEXT NOT NULL, qos INTEGER NOT NULL,
    no_local INTEGER NOT NULL, retain_as_published INTEGER NOT NULL,
    retain_handling INTEGER NOT NULL, subscription_id INTEGER NOT NULL,
    PRIMARY KEY(client_id, topic_filter)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages(
    msg_id INTEGER PRIMARY KEY, publish BLOB NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS deliveries(
    client_id TEXT NOT NULL, msg_id INTEGER NOT NULL, seq INTEGER NOT NULL,
    qos INTEGER NOT NULL, packet_id INTEGER NOT NULL, state TEXT NOT NULL,
    extra TEXT, PRIMARY KEY(client_id, msg_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS incoming_qos2(
    client_id TEXT NOT NULL, packet_id INTEGER NOT NULL,
    PRIMARY KEY(client_id, packet_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained(
    topic TEXT PRIMARY KEY, publish BLOB NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS wills(
    client_id TEXT PRIMARY KEY, publish BLOB NOT NULL, due_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history(
    hist_id INTEGER PRIMARY KEY, topic TEXT NOT NULL, ts REAL NOT NULL,
    expires_at REAL, publish BLOB NOT NULL);
"""

_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS log(lsn INTEGER PRIMARY KEY, rec BLOB NOT NULL);
"""
#: A segment holds records back to back, each framed by this header: the
#: length of what follows and the record's lsn; then the record itself (its
#: own CRC-32 first, see _encode_parts).
_FRAME = struct.Struct("<IQ")


def _segment_path(data_dir: str, first_lsn: int) -> str:
    return os.path.join(data_dir, f"{SEGMENT_PREFIX}{first_lsn:016x}")


def _list_segments(data_dir: str) -> list[tuple[int, str]]:
    """``[(first lsn, path)]`` of the log's segment files, oldest first."""
    out = []
    for name in os.listdir(data_dir):
        tail = name[len(SEGMENT_PREFIX):]
        if name.startswith(SEGMENT_PREFIX) and len(tail) == 16:
            try:
                out.append((int(tail, 16), os.path.join(data_dir, name)))
            except ValueError:
                continue
    out.sort()
    return out


def _frame_at(data: bytes, off: int):
    """``(lsn, record, end)`` of a complete frame at ``off`` whose record's
    CRC-32 is right, else None."""
    if len(data) - off < _FRAME.size:
        return None
    n, lsn = _FRAME.unpack_from(data, off)
    end = off + _FRAME.size + n
    if n < 5 or end > len(data):
        return None
    rec = data[off + _FRAME.size:end]
    if int.from_bytes(rec[:4], "little") != _crc32(memoryview(rec)[4:]):
        return None
    return lsn, rec, end


def _later_record(data: bytes, off: int, expected: int) -> int | None:
    """The lsn of an intact record among the next few of this log
    (``expected + 1`` ... ``+ 8``) anywhere in ``data`` after ``off``, or None."""
    for lsn in range(expected + 1, expected + 9):
        key = _FRAME.pack(0, lsn)[4:]
        at = data.find(key, off)
        while at >= 0:
            f = _frame_at(data, at - 4) if at >= 4 else None
            if f is not None and f[0] == lsn:
                return lsn
            at = data.find(key, at + 1)
    return None


def _keep_damaged(path: str) -> str:
    """Copy a segment whose records ended at damage to
    ``<path>.damaged-<UTC time>``; the copy's name (or why there is none)."""
    dest = path + time.strftime(".damaged-%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        shutil.copyfile(path, dest)
    except OSError as e:
        return f"(not kept: {e})"
    return dest


def _read_segments(segments: list[tuple[int, str]]):
    """Yield ``(lsn, record, where)`` from the segment files, in order.

    The last segment's records end at the first frame that is not one of
    them: the end of the file, what a reused segment held before (frames
    of older lsns, or bytes that are not a frame where its records end), or
    a record cut short by a crash in the middle of an append (never
    acknowledged, as ``durable()`` waits for the whole append; logged and
    left out).

    That holds even when intact records of the log follow the bad frame
    (as in PostgreSQL's WAL, the first invalid record ends the log). A
    reused segment is written over in place, and a power failure during a
    write may leave a later page of it on disk and an earlier one not: the
    records of that write were not acknowledged (``sync``: its fdatasync
    never returned) or are within the loss ``batch`` allows. Moving the
    whole store aside for it would lose everything acknowledged before. It
    is logged as an error, and the segment is copied to
    ``<name>.damaged-<UTC time>`` (the evidence, should it be damage after
    all), which start-up leaves alone.

    Earlier segments were fsynced and cut at their end before the next was
    begun: in them anything short or damaged is damage (``_Unusable``), as
    is a missing record anywhere (the caller's check).
    """
    for i, (first, path) in enumerate(segments):
        last_segment = i == len(segments) - 1
        with open(path, "rb") as f:
            data = f.read()
        name = os.path.basename(path)
        off = 0
        expected = first
        end_of_data = len(data)
        while off < end_of_data:
            frame = _frame_at(data, off)
            if frame is not None and frame[0] >= first:
                lsn, rec, end = frame
                yield lsn, rec, name
                expected = lsn + 1
                off = end
                continue
            # Not a record of this segment.
            if not last_segment:
                if end_of_data - off < _FRAME.size:
                    raise _Unusable(f"{name}: a record header is cut short at byte {off}")
                raise _Unusable(f"{name}: record {_FRAME.unpack_from(data, off)[1]} at byte "
                                f"{off} is cut short or damaged")
            lsn = _FRAME.unpack_from(data, off)[1] if end_of_data - off >= _FRAME.size else None
            later = _later_record(data, off, expected)
            if later is not None:
                kept = _keep_damaged(path)
                log.error("persistence: the log ends before record %d: the frame at byte %d of %s "
                          "is damaged (checksum, length or lsn) and record %d follows it. A "
                          "power failure during a write over a reused segment leaves this "
                          "(nothing it drops was acknowledged as durable); anything else is "
                          "damage. The segment is kept as %s", expected, off, name, later, kept)
            elif frame is None and (lsn is None or lsn == expected):
                log.warning("persistence: the log ends with %s cut short (at byte %d of %s): "
                            "an append that a crash interrupted, never acknowledged; ignored",
                            "a record header" if lsn is None else f"record {lsn}", off, name)
            # else: what the reused file held before its records
            return


class _Due:
    """Records appended and written, to be folded: the last one's lsn and the
    changes they hold (the compactor thread's view)."""

    __slots__ = ("lsn", "ops")

    def __init__(self) -> None:
        self.lsn = 0
        self.ops = 0


class _LogReader:
    """The compactor's cursor in the log: yields the records after the last
    one it returned, in order, following the segments as they are begun. It
    reads only records the writer has written (the caller says how far), so a
    frame is never found half there."""

    def __init__(self, data_dir: str, after_lsn: int) -> None:
        self.data_dir = data_dir
        self.last = after_lsn  # last record returned
        self._fd: int | None = None
        self._name = ""
        self._off = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, path: str) -> None:
        self.close()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._name = os.path.basename(path)
        self._off = 0

    def read(self, upto: int):
        """Yield ``(lsn, record)`` for records ``last + 1`` .. ``upto``.

        Raises:
            ValueError: a record is missing or cut short (damage, or a caller
                that asked for records not written yet).
        """
        if (self._fd is not None and self.last < upto
                and not os.path.exists(os.path.join(self.data_dir, self._name))):
            # Its segment was folded and deleted, or kept to be written over
            # as a later one (SPARE_SEGMENTS): what follows is in the next.
            self.close()
        if self._fd is None and self.last < upto:
            # The segment holding last + 1: the newest one starting at or before it.
            older = [(first, path) for first, path in _list_segments(self.data_dir)
                     if first <= self.last + 1]
            if not older:
                raise ValueError(f"no log segment holds record {self.last + 1}")
            self._open(older[-1][1])
        while self.last < upto:
            head = os.pread(self._fd, _FRAME.size, self._off)
            if not head:
                # The end of this segment: the next record begins the next one.
                path = _segment_path(self.data_dir, self.last + 1)
                if os.path.basename(path) == self._name or not os.path.exists(path):
                    raise ValueError(f"log record {self.last + 1} is not in the log "
                                     f"({self._name} ends at byte {self._off})")
                self._open(path)
                continue
            if len(head) < _FRAME.size:
                raise ValueError(f"{self._name}: a record header is cut short at byte {self._off}")
            n, lsn = _FRAME.unpack(head)
            rec = os.pread(self._fd, n, self._off + _FRAME.size)
            if len(rec) < n:
                raise ValueError(f"{self._name}: record {lsn} is cut short at byte {self._off}")
            self._off += _FRAME.size + n
            if lsn <= self.last:
                continue  # the tables have it already
            if lsn != self.last + 1:
                raise ValueError(f"{self._name}: log record {self.last + 1} is missing "
                                 f"(next is {lsn})")
            self.last = lsn
            yield lsn, rec


class _Folder:
    """Folds log records into the tables (see the module docstring): the
    compactor's work, in the compactor process (``fastmqtt.store.compactor``)
    or, with ``compactor="thread"``, in a thread of the broker. It reads the
    records back from the segment files rather than taking the flushed batches
    from memory, so the broker keeps nothing for it."""

    def __init__(self, conn: sqlite3.Connection, data_dir: str, path: str) -> None:
        self.conn = conn
        self.path = path
        row = conn.execute("SELECT value FROM meta WHERE key='compacted_lsn'").fetchone()
        self.compacted = int(row[0]) if row is not None else 0
        self.reader = _LogReader(data_dir, self.compacted)
        self.dirty = _Batch()  # read, not yet in the tables (kept across failures)
        self.held = _Batch()  # read by the last fold(hold=True), folded by the next

    def fold(self, upto: int, hold: bool = False) -> tuple[int, int]:
        """Fold every record up to ``upto`` (written by the log writer) into the
        tables in one transaction, then checkpoint the tables' WAL if it has
        grown.

        ``hold``: fold only the records the previous call held back, and hold
        back the ones read now. What they undo of the folded ones, those never
        reach the tables: a delivery added then acknowledged a moment later (a
        connected subscriber that is a fold's worth behind) costs neither an
        insert nor a delete, only its records, which recovery replays after
        the compacted lsn anyway (a delete of a row that is not there changes
        nothing). Only worth it while deliveries are being acknowledged: when
        the records read now delete less than a quarter as many as they store
        (subscribers offline, queues growing), nothing would be undone, and
        everything is folded at once as without ``hold``.

        Returns:
            ``(compacted lsn, changes folded)``.

        Raises:
            sqlite3.Error: the transaction failed (retry: what was read is kept).
            ValueError: a record is missing or damaged.
        """
        dirty = self.dirty
        new = _Batch()
        for lsn, rec in self.reader.read(upto):
            _decode_into(new, rec)
            new.lsn = lsn
        held = self.held
        if hold and new.dels * 4 < len(new.messages):
            hold = False
        if hold:
            _cancel_ahead(held, new)
            self.held = new
            new = held
        else:
            if held.lsn:
                _merge(dirty, held)
            self.held = _Batch()
        if new.lsn:
            _merge(dirty, new)
        if dirty.lsn <= self.compacted:
            return self.compacted, 0
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            _apply_tables(conn, dirty)
            conn.execute("INSERT OR REPLACE INTO meta VALUES('compacted_lsn', ?)", (dirty.lsn,))
            conn.execute("COMMIT")  # synchronous=FULL: on disk when this returns
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        self.compacted = dirty.lsn
        self.dirty = _Batch()
        _checkpoint(conn, self.path)
        return self.compacted, dirty.ops

    def close(self) -> None:
        self.reader.close()


def _checkpoint(conn: sqlite3.Connection, path: str) -> None:
    """Copy the tables' WAL into the database (PASSIVE) once it has grown
    past ``CHECKPOINT_BYTES``."""
    try:
        if os.path.getsize(path + "-wal") < CHECKPOINT_BYTES:
            return
    except OSError:
        return
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as e:
        log.warning("persistence: checkpoint of %s failed: %s", path, e)


def _connect(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=0.5)
    # Tables: FULL, a compaction is on disk before its segments are
    # deleted. (NORMAL only for the SQLite log of earlier versions, which
    # is read once and removed.)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA temp_store=MEMORY")
    # Checkpoints (copying the WAL into the database, with their own
    # fsyncs) run in the compactor, never inside an append that a
    # publisher is waiting for.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("PRAGMA cache_size=-16000")
    # Checkpoints reset the WAL; this caps the file it leaves behind.
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


_CLIENT_TABLES = ("sessions", "subscriptions", "deliveries", "incoming_qos2", "wills")

# Delivery entry kinds inside a batch.
# Delivery change kinds; the same values as in fastmqtt._record (ADD, ...).
_ADD = 0  # new row, not in the tables: an add followed by a remove cancels out
_ADDR = 1  # add over a row that may be in the tables (re-add): insert or replace
_UPD = 2  # update of a row in the tables
_DEL = 3  # delete of a row in the tables


# Statements for many rows at once. ``executemany`` makes one sqlite3_step per
# row, and the sqlite3 module drops and retakes the GIL around each: with the
# trio thread busy, every retake waits. One statement with ``_CHUNK`` rows of
# placeholders (``VALUES (?,?),(?,?),...``) binds them all in C and steps once:
# one GIL hand-off per hundred rows, and about half the cost per row of
# passing them as JSON to json_each (measured). Rows that do not fill a chunk
# go in statements of 64, 32, ... 1 rows, so a handful of SQL texts cover
# every size and stay in the statement cache.
_CHUNK = 128
#: A client's delivery rows that share qos, packet id and state go as one
#: group (see _write_rows' ``shared``) from this many.
_SHARED_MIN = 16
_SQL_CACHE: dict[tuple, str] = {}


def _rows_sql(head: str, width: int, n: int, tail: str = "", k: int = 0) -> str:
    """``head VALUES`` ``n`` rows of ``width`` placeholders ``tail``; with
    ``k``, each row starts with the same ``k`` numbered placeholders
    (``?1``..``?k``, bound once) before its own."""
    key = (head, width, n, tail, k)
    sql = _SQL_CACHE.get(key)
    if sql is None:
        if k:
            first = "".join(f"?{i}," for i in range(1, k + 1))
            rows = [f"({first}{','.join(f'?{p}' for p in range(j, j + width))})"
                    for j in range(k + 1, k + 1 + n * width, width)]
        else:
            rows = ["(" + ",".join("?" * width) + ")"] * n
        sql = _SQL_CACHE[key] = f"{head} VALUES {','.join(rows)} {tail}"
    return sql


def _write_rows(c: sqlite3.Connection, head: str, width: int, rows: list,
                tail: str = "", flat: list | None = None, shared: tuple = ()) -> None:
    """``head VALUES (row),(row),... tail`` for every row, ``_CHUNK`` a
    statement; ``flat``: the rows' values one after the other instead.

    ``shared``: values that begin every row, bound once per statement (then
    ``width`` counts each row's own values only). The delivery rows of an
    offline queue differ only in msg_id and seq: binding the client id,
    qos, packet id and state once instead of with every row made the
    deliveries' inserts 40 % cheaper."""
    if flat is None:
        flat = list(chain.from_iterable(rows))
    k = len(shared)
    step = width * _CHUNK
    full = len(flat) // step * step
    if full:
        c.executemany(_rows_sql(head, width, _CHUNK, tail, k),
                      [(*shared, *flat[i:i + step]) if k else flat[i:i + step]
                       for i in range(0, full, step)])
    i = full
    n = _CHUNK // 2
    while i < len(flat):
        if (len(flat) - i) // width >= n:
            part = flat[i:i + n * width]
            c.execute(_rows_sql(head, width, n, tail, k), (*shared, *part) if k else part)
            i += n * width
        n //= 2


def _delete_ids(c: sqlite3.Connection, head: str, ids: list, *before) -> None:
    """``head IN (?,?,...)`` for every id, ``_CHUNK`` ids a statement; ``before``
    are bound ahead of the ids (e.g. the client id)."""
    i = 0
    n = _CHUNK
    while i < len(ids):
        if len(ids) - i >= n:
            c.execute(f"{head} IN ({','.join('?' * n)})", (*before, *ids[i:i + n]))
            i += n
        else:
            n //= 2


class _Signal:
    """Wake-up flag for one waiting thread. ``threading.Event.set`` runs a
    Python-level Condition (lock, notify, waiter list) on the setting thread,
    here the trio thread once per batch; this is one C call (a SimpleQueue
    put). ``wait`` returns at once if set since the last ``clear``."""

    __slots__ = ("_q", "set")

    def __init__(self) -> None:
        self._q = queue.SimpleQueue()
        self.set = lambda put=self._q.put: put(None)

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._q.get(timeout=timeout)
        except queue.Empty:
            return False
        self._q.put(None)  # stays set until clear()
        return True

    def clear(self) -> None:
        get = self._q.get_nowait
        try:
            while True:
                get()
        except queue.Empty:
            pass


class _Unusable(Exception):
    """The database file cannot be used as it is (corrupt, foreign, newer)."""


# ----------------------------------------------------------------- log records
#
# A record is a 4-byte CRC-32 (little endian) of the rest, then a pickle
# (protocol 5) of one tuple of plain builtins: ints, floats, str, bytes, None,
# bools, tuples, lists, dicts and sets, never a class, so it loads with an
# unpickler that refuses every global (_PlainUnpickler). Pickle rather than
# JSON: it takes the dicts of the batch as they are (int keys, bytes values)
# in one C call, several times faster than building JSON, and its format is
# stable across Python versions (unlike marshal).

#: 2: a version byte and the length of the pickled batch (u32), the batch
#: (may be empty), then the ops (fastmqtt._record). 1 (still read): the
#: pickled batch alone, its first byte pickle's 0x80.
_RECORD_VERSION = 2
_RECORD_HEAD = struct.Struct("<BI")
_crc32 = zlib.crc32


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # pragma: no cover - only on corruption
        raise pickle.UnpicklingError(f"log record names {module}.{name}")


def _stored_form(changes: dict, kind: str, blob) -> dict:
    """``{key: None (deleted) | (publish, time)}`` with each publish encoded;
    an entry that cannot be encoded is left out (``blob`` logged why)."""
    out = {}
    for key, v in changes.items():
        if v is None:
            out[key] = None
        else:
            data = blob(kind, key, v[0])
            if data is not None:
                out[key] = (data, v[1])
    return out


def _encode_parts(b: _Batch, blob) -> tuple[bytes, bytes]:
    """A flush as the parts of a log record: the head and the colder
    mutators' batch ``b`` (turned into its stored form; pickled, empty when
    nothing changed there). The hot mutators' ops follow them, and
    ``LogWriter.append_record`` frames the three and puts the CRC-32 of
    their concatenation in front (on the writer thread).

    ``blob(kind, key, publish)`` encodes one message (None: cannot be stored,
    already logged; the entry is left out)."""
    if b.empty():
        cold = b""
    else:
        if b.retained:
            b.retained = _stored_form(b.retained, "retained message", blob)
        if b.wills:
            b.wills = _stored_form(b.wills, "will of", blob)
        if b.hist_put:
            hist = {}
            for hid, (_, t, ts, exp, p) in b.hist_put.items():
                data = blob("history entry", hid, p)
                if data is not None:
                    hist[hid] = (hid, t, ts, exp, data)
            b.hist_put = hist
        # Messages and deliveries in b come from ops folded in while the disk
        # stalled: decode_ops gave them their stored form.
        cold = pickle.dumps((1, b.cascade, b.sessions, b.subs, b.deliv, b.qos2, b.messages,
                             b.msg_del, b.retained, b.wills, b.hist_put, b.hist_del,
                             b.reput), 5)
    return _RECORD_HEAD.pack(_RECORD_VERSION, len(cold)), cold


def _decode_record(rec: bytes, into: _Batch | None = None) -> _Batch:
    """Inverse of :func:`_encode_parts` (with the ops and the CRC-32): the
    net effect of the record, in stored form. Version 1 records (a pickled
    batch, before ops) too. With ``into`` (see :func:`_decode_into`), a
    record of ops alone is decoded into ``into``, which is returned.

    Raises:
        ValueError: the record is damaged (checksum, structure) or unknown.
    """
    rec = bytes(rec)
    if len(rec) < 5 or int.from_bytes(rec[:4], "little") != _crc32(memoryview(rec)[4:]):
        raise ValueError("checksum mismatch")
    try:
        if rec[4] == _RECORD_VERSION:
            if len(rec) < 4 + _RECORD_HEAD.size:
                raise ValueError("record header cut short")
            _, n = _RECORD_HEAD.unpack_from(rec, 4)
            start = 4 + _RECORD_HEAD.size
            if n:
                b = _decode_cold(rec[start:start + n])
            else:
                b = _Batch() if into is None else into
            decode_ops(memoryview(rec)[start + n:], b)
            return b
        return _decode_cold(rec[4:])
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e


def _decode_into(into: _Batch, rec: bytes) -> None:
    """Fold the record ``rec`` (recorded after everything in ``into``) into
    ``into``: ``_merge(into, _decode_record(rec))``, except that a record of
    ops alone (no pickled part: nearly every one) is decoded straight into
    ``into``, as :func:`decode_ops` keeps a batch net by the same rules, with
    no batch of its own to build, merge and free. (Folding an offline queue:
    about 0.2 us a message less.)

    Raises:
        ValueError: as :func:`_decode_record` (``into`` may then hold part of
            the record).
    """
    b = _decode_record(rec, into)
    if b is not into:
        _merge(into, b)


def _decode_cold(data: bytes) -> _Batch:
    t = _PlainUnpickler(io.BytesIO(data)).load()
    if not isinstance(t, tuple) or not t or t[0] != 1:
        raise ValueError(f"unknown record version {t[0] if isinstance(t, tuple) and t else t!r}")
    b = _Batch()
    # Records written before batches kept reput have 12 fields.
    (_, b.cascade, b.sessions, b.subs, b.deliv, b.qos2, b.messages, b.msg_del,
     b.retained, b.wills, b.hist_put, b.hist_del) = t[:12]
    if len(t) > 12:
        b.reput = t[12]
    for d in b.deliv.values():
        for e in d.values():
            if len(e) == 5:
                e.append(None)  # written before deliveries kept RETAIN and ids
    return b


def _merge(into: _Batch, b: _Batch) -> None:
    """Fold batch ``b`` (recorded after everything in ``into``) into ``into``,
    keeping ``into`` the net effect of both on the tables. ``b`` must not be
    used afterwards (its dicts may be taken over)."""
    into.ops += b.ops
    into.dels += b.dels
    into.seq = b.seq
    into.lsn = b.lsn
    for cid in b.cascade:
        # Every row of the client goes first; what b records for it came after.
        into.cascade.add(cid)
        for d in (into.sessions, into.subs, into.deliv, into.qos2, into.wills):
            d.pop(cid, None)
    if b.sessions:
        into.sessions.update(b.sessions)
    for src, dst in ((b.subs, into.subs), (b.qos2, into.qos2)):
        for cid, d in src.items():
            t = dst.get(cid)
            if t is None:
                dst[cid] = d
            else:
                t.update(d)
    deliv = into.deliv
    for cid, d in b.deliv.items():
        t = deliv.get(cid)
        if t is None:
            deliv[cid] = d
            continue
        if t.keys().isdisjoint(d):
            t.update(d)  # only new keys (the usual case): no rule applies
            continue
        for mid, e in d.items():
            old = t.get(mid)
            if old is None:
                t[mid] = e
                continue
            kind = e[0]
            ok = old[0]
            if kind == _DEL:
                if ok == _ADD:
                    del t[mid]  # added and acknowledged before reaching the tables
                else:
                    t[mid] = e
            elif kind == _UPD:
                if ok == _DEL:  # not expected (an update names a live row)
                    t[mid] = e
                else:
                    old[2] = e[2]
                    old[3] = e[3]
                    old[4] = e[4]  # keeps old's kind and queue position
            else:
                # An add: it stays cancellable only if the row never reached
                # the tables (old is an add too); otherwise it replaces a row.
                e[0] = _ADD if ok == _ADD else _ADDR
                t[mid] = e
    msgs = into.messages
    reput = into.reput
    for mid in b.msg_del:
        # Cancels a put in ``into``, unless that put was over a row.
        if msgs.pop(mid, None) is None or mid in reput:
            into.msg_del.add(mid)
    if b.reput:
        reput.update(b.reput)
    if b.messages:
        msgs.update(b.messages)
        if into.msg_del:
            over = into.msg_del.intersection(b.messages)
            if over:  # put again after a delete: the insert replaces the row
                reput.update(over)
                into.msg_del.difference_update(over)
    if b.retained:
        into.retained.update(b.retained)
    if b.wills:
        into.wills.update(b.wills)
    for h in b.hist_del:
        if into.hist_put.pop(h, None) is None:
            into.hist_del.add(h)
    if b.hist_put:
        into.hist_put.update(b.hist_put)
        into.hist_del.difference_update(b.hist_put)


def _cancel_ahead(done: _Batch, ahead: _Batch) -> None:
    """Drop from ``done`` (about to be folded) the delivery changes and stored
    messages that ``ahead`` (recorded after it, folded later) deletes. A
    delivery ``done`` adds as new (never in the tables) and its delete in
    ``ahead`` both go; for one that may be in the tables, the delete stays.
    A message and its MSGDEL both go, as they do inside one batch, unless
    the message was put over a row (``reput``): then the delete stays."""
    deliv = done.deliv
    if deliv:
        for cid, d in ahead.deliv.items():
            t = deliv.get(cid)
            if not t:
                continue
            gone = [mid for mid, e in d.items() if e[0] == _DEL and mid in t]
            for mid in gone:
                if t.pop(mid)[0] == _ADD:
                    del d[mid]
    msgs = done.messages
    if msgs and ahead.msg_del:
        gone = [mid for mid in ahead.msg_del if mid in msgs]
        for mid in gone:
            del msgs[mid]
        # A put over a row (see Batch.reput): the row still goes.
        ahead.msg_del.difference_update([m for m in gone if m not in done.reput])


def _put_or_delete(c: sqlite3.Connection, table: str, key: str, changes: dict) -> None:
    """Write stored-form ``{key: None (deleted) | (blob, time)}`` changes to a
    ``(key, publish, time)`` table."""
    puts = [(k, v[0], v[1]) for k, v in changes.items() if v is not None]
    if puts:
        _write_rows(c, f"INSERT OR REPLACE INTO {table}", 3, puts)
    dels = [(k,) for k, v in changes.items() if v is None]
    if dels:
        c.executemany(f"DELETE FROM {table} WHERE {key}=?", dels)


def _apply_tables(c: sqlite3.Connection, b: _Batch) -> None:
    """Write a batch into the tables, inside the caller's transaction."""
    # Records written before sessions kept a username have 4 fields.
    sessions = [s if len(s) == 5 else (*s, None) for s in b.sessions.values()]
    sub_put, sub_del = [], []
    for cid, d in b.subs.items():
        for f, row in d.items():
            if row is None:
                sub_del.append((cid, f))
            else:
                sub_put.append(row)
    # Rows go to SQLite as ints, floats, str and bytearray only: the sqlite3
    # module runs its adapter lookup for any other value (None, bytes), which
    # costs about as much as binding the rest of the row (measured: 370 ns a
    # delivery row, 670 with a None in it). A NULL column is left out of the
    # column list instead (its default is NULL), and message_rows gives the
    # messages as bytearray.
    d_ins, d_shared, d_ins_x, d_upd = [], [], [], []
    d_del: dict[str, list[int]] = {}
    for cid, d in b.deliv.items():
        # Adds with no RETAIN flag or subscription ids, by far the most
        # entries, in one pass in C (delivery_rows): a client's many with
        # the same qos, packet id and state (an offline queue) as one group.
        if _delivery_rows(cid, d, d_ins, d_shared, _SHARED_MIN):
            d_ins_x += [(cid, mid, e[1], e[2], e[3], e[4], e[5]) for mid, e in d.items()
                        if e[0] <= _ADDR and e[5] is not None]
            d_upd += [(cid, mid, 0, e[2], e[3], e[4]) for mid, e in d.items() if e[0] == _UPD]
            dels = [mid for mid, e in d.items() if e[0] == _DEL]
            if dels:
                d_del[cid] = dels
    q_put, q_del = [], []
    for cid, d in b.qos2.items():
        for pid, put in d.items():
            (q_put if put else q_del).append((cid, pid))
    msgs: list = []
    msgs_exp: list = []
    if b.messages:
        _message_rows(b.messages, msgs, msgs_exp)
    h_put = list(b.hist_put.values())

    ex = c.executemany
    if b.cascade:
        gone = [(cid,) for cid in b.cascade]
        for table in _CLIENT_TABLES:
            ex(f"DELETE FROM {table} WHERE client_id=?", gone)
    if sessions:
        _write_rows(c, "INSERT OR REPLACE INTO sessions", 5, sessions)
    if sub_put:
        _write_rows(c, "INSERT OR REPLACE INTO subscriptions", 7, sub_put)
    if sub_del:
        ex("DELETE FROM subscriptions WHERE client_id=? AND topic_filter=?", sub_del)
    if msgs:
        _write_rows(c, "INSERT OR REPLACE INTO messages(msg_id, publish)", 2, [], flat=msgs)
    if msgs_exp:
        _write_rows(c, "INSERT OR REPLACE INTO messages", 3, msgs_exp)
    if d_ins:
        _write_rows(c, "INSERT OR REPLACE INTO deliveries"
                    "(client_id, msg_id, seq, qos, packet_id, state)", 6, [], flat=d_ins)
    for cid, qos, pid, state, flat in d_shared:
        _write_rows(c, "INSERT OR REPLACE INTO deliveries"
                    "(client_id, qos, packet_id, state, msg_id, seq)", 2, [], flat=flat,
                    shared=(cid, qos, pid, state))
    if d_ins_x:
        _write_rows(c, "INSERT OR REPLACE INTO deliveries", 7, d_ins_x)
    if d_upd:
        # Rows known to exist; an upsert keeps their seq (queue position).
        _write_rows(c, "INSERT INTO deliveries(client_id, msg_id, seq, qos, packet_id, state)",
                    6, d_upd,
                    "ON CONFLICT(client_id, msg_id) DO UPDATE SET qos=excluded.qos, "
                    "packet_id=excluded.packet_id, state=excluded.state")
    for cid, mids in d_del.items():
        _delete_ids(c, "DELETE FROM deliveries WHERE client_id=? AND msg_id", mids, cid)
    if b.msg_del:
        _delete_ids(c, "DELETE FROM messages WHERE msg_id", list(b.msg_del))
    if q_put:
        _write_rows(c, "INSERT OR IGNORE INTO incoming_qos2", 2, q_put)
    if q_del:
        ex("DELETE FROM incoming_qos2 WHERE client_id=? AND packet_id=?", q_del)
    if b.retained:
        _put_or_delete(c, "retained", "topic", b.retained)
    if b.wills:
        _put_or_delete(c, "wills", "client_id", b.wills)
    if h_put:
        _write_rows(c, "INSERT OR REPLACE INTO history", 5, h_put)
    if b.hist_del:
        _delete_ids(c, "DELETE FROM history WHERE hist_id", list(b.hist_del))


class SqliteStore(Recorder):
    """Crash-safe store in ``<data_dir>/fastmqtt.db`` (tables) and
    ``fastmqtt-log.db`` (log) with group commit.

    Args:
        data_dir: directory for the database (created if missing).
        durability: ``"sync"`` (fsync every commit) or ``"batch"`` (fsync at
            most every ``batch_interval_ms``; nothing lost on a process crash).
        batch_interval_ms: the fsync period of ``batch`` mode.
        clock: wall-clock source for expiry at :meth:`open`.
        stats: optional :class:`~fastmqtt.broker.interfaces.Stats`; commit
            count and time are added to it.

    Raises:
        ValueError: unknown durability mode.
    """

    persistent = True

    def __init__(self, data_dir: str | os.PathLike = "fastmqtt-data", durability: str = "sync",
                 batch_interval_ms: int = 10, clock=time.time, stats=None,
                 compactor: str = "process") -> None:
        if durability not in ("sync", "batch"):
            raise ValueError(f"durability must be 'sync' or 'batch', not {durability!r}")
        if compactor not in ("process", "thread"):
            raise ValueError(f"compactor must be 'process' or 'thread', not {compactor!r}")
        self.compactor = compactor
        self.data_dir = os.fspath(data_dir)
        self.path = os.path.join(self.data_dir, DB_NAME)
        self.log_path = os.path.join(self.data_dir, LOG_NAME)
        self.durability = durability
        self.batch_interval = max(0, batch_interval_ms) / 1000.0
        # batch: the trio thread writes each record itself when the writer
        # thread is idle (a page-cache write; the disk is the writer's).
        self._direct = durability == "batch"
        self.stats = stats
        self._clock = clock
        # Recorder: _lock (the current batch; flushes, in append order),
        # _batch, _seq (last recorded change), _first (seq of the first change
        # of the current batch, to come), _dseq, _msgs, _held,
        # _released: see fastmqtt._record.
        self._extra = delivery_extra
        self._encode = publish_encoder()
        self._encode_fields = publish_fields_encoder()
        self._released_kept = RELEASED_KEPT
        self._pending = _Signal()  # outside trio: the flusher thread has work
        self._committed = 0  # last change durable per the mode
        self._lsn = 0  # last log record appended
        self._warned_unknown = 0
        self._conn: sqlite3.Connection | None = None  # tables: recovery's, compactor="thread"
        self._wal: LogWriter | None = None
        self._dirfd: int | None = None
        self._segments: list[tuple[int, str]] = []  # (first lsn, path), under _compact_cv
        self._spares: list[str] = []  # folded segments to reuse (SPARE_PREFIX), likewise
        self._seg_bytes = 0  # in the newest segment
        self._thread: threading.Thread | None = None  # the log writer's
        self._threads: list[threading.Thread] = []  # compactor, flusher
        self._watching: trio.lowlevel.TrioToken | None = None
        self._flush_held = False  # a flush waits for the writer (PENDING_LIMIT)
        self._flush_scheduled = False
        self._flush_task = None  # trio task doing scheduled flushes, parked between
        self._flush_parked = False
        self._trio_ident: int | None = None  # the thread it runs on
        self._closing = False
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # the loop flushes run on
        self._waiters: list[tuple[int, int, Any]] = []  # heap by ticket: callbacks
        self._waiter_count = 0
        self._lockfile: int | None = None
        self._history_rows: list = []
        # Flush -> compactor hand-off: appended batches, oldest first.
        self._compact_cv = threading.Condition(threading.Lock())
        # (seq, lsn, changes) of each record appended, oldest first.
        self._compact_queue: list[tuple[int, int, int]] = []
        self._compact_queued_ops = 0
        self._compact_idle = False  # the compactor waits for the next record
        self._compact_now = False  # compact() asked for it
        self._compact_stop = False
        self._compactor_failed = False
        self._compacted_lsn = 0  # last record whose changes are in the tables
        self._folder: _Folder | None = None  # compactor="thread"
        self._child: subprocess.Popen | None = None  # compactor="process"
        self.moved_aside: str | None = None  # where a bad database went, if any
        self.commits = 0
        self.commit_seconds = 0.0
        self.compactions = 0
        #: waits between attempts at a failing compaction (disk full may clear
        #: up; the log keeps everything meanwhile). Failing log writes are
        #: retried by the writer itself (``fastmqtt._wal``), then the store
        #: fails and ``durable()`` raises.
        self.retry_delays: tuple[float, ...] = (0.05, 0.15, 0.45, 1.35, 2.0)

    # ============================================================ lifecycle

    def open(self, now: float | None = None) -> Snapshot:
        """Open (or create) the database, recover, purge expired state and start
        the writer thread. Blocking; call once before serving.

        Returns:
            the recovered :class:`Snapshot`.

        Raises:
            StoreError: the data directory is locked by another process, cannot
                be created, or the database file cannot be opened at all (the
                file may be fine: nothing is moved aside then).
        """
        if self._thread is not None:
            raise StoreError("store already open")
        now = self._clock() if now is None else now
        try:
            os.makedirs(self.data_dir, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create data directory {self.data_dir!r}: {e}") from e
        self._take_lockfile()
        try:
            try:
                snap = self._load(now)
            except _Unusable as e:
                self._move_aside(str(e))
                try:
                    snap = self._load(now)
                except _Unusable as e2:  # a fresh file must work
                    raise StoreError(f"cannot create {self.path}: {e2}") from e2
        except BaseException:
            self._release_lockfile()
            raise
        self._closing = self._compact_stop = self._compact_now = False
        self._compactor_failed = False
        self._compact_queue = []
        self._compact_queued_ops = 0
        self._pending.clear()
        self._error = None
        try:
            self._start_log()
        except OSError as e:
            self._finish_close()
            raise StoreError(f"cannot create the log in {self.data_dir!r}: {e}") from e
        self._thread = threading.Thread(target=self._wal.run, name="fastmqtt-store-writer",
                                        daemon=True)
        self._threads = [
            threading.Thread(target=self._compactor, name="fastmqtt-store-compact", daemon=True),
            threading.Thread(target=self._flusher, name="fastmqtt-store-flush", daemon=True)]
        for t in (self._thread, *self._threads):
            t.start()
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._token = None
        return snap

    def _start_log(self) -> None:
        """Remove the replayed segments and begin a fresh one after the last
        lsn (the tables hold everything now)."""
        self._dirfd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        for _, path in _list_segments(self.data_dir):
            os.unlink(path)
        self._remove_spares()
        first = self._lsn + 1
        path = _segment_path(self.data_dir, first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.fsync(self._dirfd)
            self._wal = LogWriter(fd, self._dirfd, self.durability == "sync",
                                  self.batch_interval)
        except BaseException:
            os.close(fd)
            raise
        self._segments = [(first, path)]
        self._seg_bytes = 0

    def _take_lockfile(self) -> None:
        if self._lockfile is not None:
            return
        try:
            fd = os.open(os.path.join(self.data_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create the lock file in {self.data_dir!r}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"data directory {self.data_dir!r} is in use by another process") from None
        self._lockfile = fd

    def _release_lockfile(self) -> None:
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def _move_aside(self, reason: str) -> None:
        """Rename the tables and the log (a set: the log only makes sense on
        top of its tables) to ``<name>.corrupt-<stamp>``."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        segments = [p for _, p in _list_segments(self.data_dir)]
        tag = f".corrupt-{stamp}"
        n = 1
        while any(os.path.exists(p + tag) for p in (self.path, self.log_path, *segments)):
            n += 1
            tag = f".corrupt-{stamp}-{n}"
        try:
            for path in (self.path, self.log_path):
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.replace(path + suffix, path + tag + suffix)
            for path in segments:
                os.replace(path, path + tag)
        except OSError as e:
            raise StoreError(f"{self.path} is unusable ({reason}) and cannot be moved "
                             f"aside: {e}") from e
        dest = self.path + tag
        self.moved_aside = dest
        log.error("persistence: %s is unusable (%s); moved it (and its log) to %s and "
                  "starting with an empty store", self.path, reason, dest)

    def _open_checked(self, path: str, schema: str, version: int, synchronous: str,
                      what: str, page_size: int = 0) -> sqlite3.Connection:
        """Connect, check integrity and ownership, switch to WAL, create the
        schema. Raises _Unusable, StoreError or sqlite3.DatabaseError."""
        conn = _connect(path, synchronous)
        try:
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise _Unusable(f"{what}: integrity check failed: " +
                                "; ".join(str(r[0]) for r in check[:5]))
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            row = None
            if has_meta:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    raise _Unusable(f"{what}: no schema_version in meta")
                if int(row[0]) > version:
                    raise _Unusable(f"{what}: schema version {row[0]} is newer than {version}")
            else:
                others = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if others:
                    raise _Unusable(f"{what}: not a fastmqtt database (no meta table)")
            # Only now that the file is known to be ours may it change
            # (switching to WAL rewrites the header of a foreign file).
            if not has_meta and page_size:
                # A new file: its page size can still be chosen (an existing
                # one keeps its own; WAL mode cannot change it).
                conn.execute(f"PRAGMA page_size={int(page_size)}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise _Unusable(f"{what}: cannot switch to WAL mode (got {mode!r})")
            conn.executescript(schema)
            if row is None or int(row[0]) != version:
                # New, or older (version 1 had no log): nothing else to convert.
                # Written only then: a file that turns out to be unusable
                # (its log is damaged) is moved aside exactly as it was found.
                conn.execute("INSERT OR REPLACE INTO meta VALUES('schema_version', ?)",
                             (version,))
        except BaseException:
            conn.close()
            raise
        return conn

    def _load(self, now: float) -> Snapshot:
        conn = logc = None
        self._lsn = self._compacted_lsn = 0
        try:
            try:
                conn = self._open_checked(self.path, _SCHEMA, SCHEMA_VERSION, "FULL", DB_NAME,
                                           PAGE_SIZE)
                if "username" not in {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}:
                    # Schema 2 -> 3: sessions remember their username...
                    conn.execute("ALTER TABLE sessions ADD COLUMN username TEXT")
                if "extra" not in {r[1] for r in conn.execute("PRAGMA table_info(deliveries)")}:
                    # ... and deliveries their RETAIN flag and subscription ids.
                    conn.execute("ALTER TABLE deliveries ADD COLUMN extra TEXT")
                if os.path.exists(self.log_path):
                    # The log as SQLite database of earlier versions.
                    logc = self._open_checked(self.log_path, _LOG_SCHEMA, LOG_SCHEMA_VERSION,
                                              "NORMAL", LOG_NAME)
                self._replay(conn, logc)
                if logc is not None:
                    logc.close()
                    logc = None
                    for suffix in ("", "-wal", "-shm"):
                        if os.path.exists(self.log_path + suffix):
                            os.unlink(self.log_path + suffix)
                snap = self._recover(conn, now)
            except sqlite3.DatabaseError as e:
                text = str(e).lower()
                if isinstance(e, sqlite3.OperationalError) and any(
                        w in text for w in ("unable to open", "locked", "readonly", "read-only",
                                            "disk i/o", "permission")):
                    # The file may be fine; the environment is not. Moving it
                    # aside would hide good data: refuse to start instead.
                    raise StoreError(f"cannot use {self.path}: {e}") from e
                raise _Unusable(f"{type(e).__name__}: {e}") from e
        except (_Unusable, StoreError):
            for c in (conn, logc):
                if c is not None:
                    c.close()
            raise
        self._conn = conn
        return snap

    def _replay(self, conn: sqlite3.Connection, logc: sqlite3.Connection | None) -> None:
        """Recovery, step one: fold the log records after ``compacted_lsn``
        into the tables (one transaction, which also advances
        ``compacted_lsn``). The segments are removed only afterwards (by
        :meth:`_start_log`), so a crash anywhere in here leaves either the old
        set or the new one: running it again is the same."""
        row = conn.execute("SELECT value FROM meta WHERE key='compacted_lsn'").fetchone()
        compacted = int(row[0]) if row is not None else 0
        merged = _Batch()
        last = compacted
        records = 0
        sources = []
        if logc is not None:
            sources.append((lsn, rec, LOG_NAME) for lsn, rec in logc.execute(
                "SELECT lsn, rec FROM log WHERE lsn > ? ORDER BY lsn", (compacted,)))
        sources.append(_read_segments(_list_segments(self.data_dir)))
        for lsn, rec, where in chain.from_iterable(sources):
            if lsn <= compacted:
                continue  # the tables have it (its segment was not deleted yet)
            if lsn != last + 1:
                raise _Unusable(f"{where}: log record {last + 1} is missing "
                                f"(next is {lsn}; the tables end at {compacted})")
            try:
                _decode_into(merged, rec)
            except ValueError as e:
                raise _Unusable(f"{where}: log record {lsn} is damaged: {e}") from e
            merged.lsn = lsn
            last = lsn
            records += 1
        if records:
            conn.execute("BEGIN IMMEDIATE")
            _apply_tables(conn, merged)
            conn.execute("INSERT OR REPLACE INTO meta VALUES('compacted_lsn', ?)", (last,))
            conn.execute("COMMIT")
            log.info("persistence: replayed %d log records (%d..%d) into the tables",
                     records, compacted + 1, last)
        self._lsn = self._compacted_lsn = last

    def _recover(self, conn: sqlite3.Connection, now: float) -> Snapshot:
        bad_msgs: list[int] = []

        def decode(kind, key, blob):
            try:
                return decode_publish(blob)
            except Exception as e:  # one bad row must not cost the rest
                log.error("persistence: dropping undecodable %s %r: %s", kind, key, e)
                return None

        sessions = {c: (e, lvl, d, u) for c, e, lvl, d, u in conn.execute(
            "SELECT client_id, expiry_interval, protocol_level, disconnected_at, username"
            " FROM sessions")}
        subs: dict[str, dict] = {}
        for c, f, q, nl, rap, rh, sid in conn.execute("SELECT * FROM subscriptions"):
            subs.setdefault(c, {})[f] = SubscriptionRecord(f, q, bool(nl), bool(rap), rh, sid)
        messages = {}
        max_msg = 0
        for mid, blob, exp in conn.execute("SELECT * FROM messages"):
            max_msg = max(max_msg, mid)
            p = decode("message", mid, blob)
            if p is None:
                bad_msgs.append(mid)
            else:
                messages[mid] = (p, exp)
        deliveries: dict[str, list] = {}
        all_deliv = set()
        max_seq = 0
        for c, mid, seq, q, pid, st, extra in conn.execute(
                "SELECT client_id, msg_id, seq, qos, packet_id, state, extra FROM deliveries"):
            max_seq = max(max_seq, seq)
            all_deliv.add((c, mid))
            deliveries.setdefault(c, []).append(
                (seq, DeliveryRecord(mid, q, pid, st, *parse_delivery_extra(extra))))
        qos2: dict[str, set] = {}
        for c, pid in conn.execute("SELECT * FROM incoming_qos2"):
            qos2.setdefault(c, set()).add(pid)
        retained = {}
        bad_retained = []
        for t, blob, exp in conn.execute("SELECT * FROM retained"):
            p = decode("retained message", t, blob)
            if p is None:
                bad_retained.append(t)
            else:
                retained[t] = (p, exp)
        wills = {}
        bad_wills = []
        for c, blob, due in conn.execute("SELECT * FROM wills"):
            p = decode("will of", c, blob)
            if p is None:
                bad_wills.append(c)
            else:
                wills[c] = (p, due)
        hist = []
        bad_hist = []
        for hid, t, ts, exp, blob in conn.execute("SELECT * FROM history ORDER BY hist_id"):
            p = decode("history entry", hid, blob)
            if p is None:
                bad_hist.append(hid)
            else:
                hist.append((hid, t, ts, exp, p))

        snap = build_snapshot(sessions, subs, deliveries, qos2, messages, retained, wills, now)
        snap.next_msg_id = max(snap.next_msg_id, max_msg + 1)

        # Make the disk agree with the snapshot: one transaction removing what
        # expired or cannot be read, so the next start does not meet it again.
        alive = {s.client_id for s in snap.sessions}
        kept = {(s.client_id, d.msg_id) for s in snap.sessions for d in s.deliveries}
        dead_sessions = [(c,) for c in set(sessions) | set(subs) | set(deliveries) | set(qos2)
                         if c not in alive]
        dead_deliv = [k for k in all_deliv if k not in kept and k[0] in alive]
        dead_msgs = [(m,) for m in set(messages) | set(bad_msgs) if m not in snap.messages]
        live_retained = {t for t, _, _ in snap.retained}
        dead_retained = [(t,) for t in set(retained) | set(bad_retained) if t not in live_retained]
        conn.execute("BEGIN IMMEDIATE")
        for table in _CLIENT_TABLES:
            if table == "wills":
                continue  # a will outlives its session: it is owed at session end
            conn.executemany(f"DELETE FROM {table} WHERE client_id=?", dead_sessions)
        conn.executemany("DELETE FROM deliveries WHERE client_id=? AND msg_id=?", dead_deliv)
        conn.executemany("DELETE FROM messages WHERE msg_id=?", dead_msgs)
        conn.executemany("DELETE FROM retained WHERE topic=?", dead_retained)
        conn.executemany("DELETE FROM wills WHERE client_id=?", [(c,) for c in bad_wills])
        conn.executemany("DELETE FROM history WHERE hist_id=?", [(h,) for h in bad_hist])
        conn.execute("COMMIT")
        if dead_sessions or dead_deliv or dead_msgs or dead_retained:
            log.info("persistence: purged %d expired sessions, %d deliveries, %d messages, "
                     "%d retained messages", len(dead_sessions), len(dead_deliv),
                     len(dead_msgs), len(dead_retained))

        self._restore(snap.messages,
                      {s.client_id: [d.msg_id for d in s.deliveries] for s in snap.sessions})
        self._dseq = max_seq
        self._history_rows = hist
        return snap

    async def durable(self, ticket: int) -> None:
        """Wait until every change up to ``ticket`` is committed (``sync``:
        fsynced). Never blocks the trio thread.

        Raises:
            StoreError: the writer failed or the store was closed first.
        """
        if self._committed >= ticket:
            return
        while self._committed < ticket:
            if self._error is not None:
                raise StoreError(f"persistence failed: {self._error}") from self._error
            if self._thread is None:
                raise StoreError("store is not open")
            ev = trio.Event()
            if self._wait(ticket, ev.set):
                await ev.wait()

    @property
    def committed(self) -> int:
        """The last ticket known to be durable (trio thread's view)."""
        return self._committed

    def when_durable(self, ticket: int, callback) -> bool:
        """Call ``callback()`` on the trio thread once every change up to
        ``ticket`` is durable, or once the store has failed or closed (compare
        :attr:`committed`; :meth:`durable` raises then). For the broker's
        acknowledgements: no task waits.

        Returns:
            False if nothing was registered: the ticket is durable already,
            or the store has failed or is closed.
        """
        if self._committed >= ticket or self._error is not None or self._thread is None:
            return False
        return self._wait(ticket, callback)

    def _wait(self, ticket: int, callback) -> bool:
        """Register ``callback`` for ``ticket``; False (nothing registered)
        if the flush done here made it durable already."""
        self._ensure_watch()
        if ticket >= self._first and not self._flush_scheduled:
            self._flush()  # recorded while no flush could be scheduled
            if self._committed >= ticket:
                return False
        self._waiter_count += 1
        heapq.heappush(self._waiters, (ticket, self._waiter_count, callback))
        return True

    def wait_durable(self, ticket: int | None = None, timeout: float = 10.0) -> bool:
        """:meth:`durable` for code outside trio (tools, tests): blocking.

        Args:
            ticket: from :meth:`mark`; default: every change recorded so far.

        Returns:
            True once committed; False on timeout, failure or a closed store.
        """
        ticket = self._seq if ticket is None else ticket
        self._flush(force=True)
        deadline = time.monotonic() + timeout
        while True:
            wal = self._wal
            if wal is None:
                return self._committed >= ticket
            self._catch_up(wal)
            if self._committed >= ticket:
                return True
            if wal.error or time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def _ensure_watch(self) -> None:
        """Start the commit watcher in the running trio loop (trio thread)."""
        token = trio.lowlevel.current_trio_token()
        if self._token is not token:
            self._token = token
        if self._watching is not token and self._wal is not None:
            self._watching = token
            trio.lowlevel.spawn_system_task(self._watch, self._wal,
                                            name="fastmqtt-store-watch")

    async def _watch(self, wal: LogWriter) -> None:
        """Trio system task: each time the log writer steps forward (its
        eventfd), move ``_committed`` along and wake the waiters it covers."""
        fd = wal.notify_fd
        try:
            while self._wal is wal:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                self._progress(wal)
        except trio.Cancelled:
            raise
        except BaseException:  # pragma: no cover - a bug; durable() must not hang
            log.exception("persistence: the commit watcher failed")
            self._error = self._error or StoreError("commit watcher failed")
            self._notify()
        finally:
            if self._watching is self._token:
                self._watching = None

    def _progress(self, wal: LogWriter) -> None:
        if self._flush_held and wal.pending <= PENDING_LIMIT // 2:
            self._flush_held = False
            self._flush()
        self._catch_up(wal)
        self._notify()

    def _catch_up(self, wal: LogWriter) -> None:
        """Take the writer's progress (``sync``: fsynced, ``batch``: written)
        as committed, and its failure as the store's."""
        committed = wal.synced if self.durability == "sync" else wal.written
        if committed > self._committed:
            self._committed = committed
        if wal.error and self._error is None:
            self._error = OSError(wal.error, os.strerror(wal.error))
            log.error("persistence: writing the log failed (%s); no further changes are "
                      "acknowledged", self._error)

    def _notify(self) -> None:
        # Trio thread. Wakes only the waiters whose ticket is now committed (a
        # heap ordered by ticket), so a commit costs O(woken), not
        # O(waiting), with thousands of connections waiting.
        waiters = self._waiters
        if self._error is not None or self._thread is None:
            limit = float("inf")  # failed or closed: everyone must look
        else:
            limit = self._committed
        while waiters and waiters[0][0] <= limit:
            try:
                heapq.heappop(waiters)[2]()
            except Exception:  # pragma: no cover - a bug in a callback
                log.exception("persistence: a durable() callback failed")

    async def aclose(self) -> None:
        """Commit what is pending, stop the writer and close the database."""
        if self._thread is not None:
            await trio.to_thread.run_sync(self._shutdown)
        self._finish_close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` for code outside trio."""
        if self._thread is not None:
            self._shutdown()
        self._finish_close()

    def _shutdown(self) -> None:
        """Append what is pending, let the writer write and fsync it, then let
        the compactor fold everything into the tables (blocking)."""
        self._closing = True
        self._flush(force=True)
        wal = self._wal
        if wal is not None:
            wal.stop()
        self._pending.set()
        if self._thread is not None:
            self._thread.join()
        if wal is not None:
            self._catch_up(wal)
        with self._compact_cv:
            self._compact_stop = True
            self._compact_cv.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        if self._error is None and not self._compactor_failed and \
                self._compacted_lsn == self._lsn:
            # A clean close leaves no log: the tables have every record.
            self._trim_segments(everything=True)
            self._remove_spares()

    def _finish_close(self) -> None:
        if self._thread is not None and self.commits:
            log.info("persistence: %d log records, %.3f ms each to encode and append on "
                     "average", self.commits, 1000 * self.commit_seconds / self.commits)
        self._thread = None
        self._wal = None
        self._watching = None
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error as e:  # pragma: no cover
                log.warning("persistence: closing database: %s", e)
            self._conn = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None
        self._release_lockfile()
        self._notify()  # anyone still waiting gets "not open"

    # ============================================================ mutators
    # Each records its change in the current batch. The writer is woken only
    # by the first change of a batch: later ones ride along.

    def _begin(self) -> _Batch:
        # Inlined in the hot mutators below. The batch's seq and ops are
        # worked out at the swap (_take_batch), not counted per change.
        self._seq += 1
        if self._seq == self._arm:
            self._schedule()
        return self._batch

    def put_session(self, client_id: str, expiry_interval: int, protocol_level: int,
                    disconnected_at: float | None, username: str | None = None) -> None:
        with self._lock:
            b = self._begin()
            b.sessions[client_id] = (client_id, expiry_interval, protocol_level, disconnected_at,
                                     username)

    def delete_session(self, client_id: str) -> None:
        with self._lock:
            b = self._begin()
            b.cascade.add(client_id)
            for d in (b.sessions, b.subs, b.deliv, b.qos2, b.wills):
                d.pop(client_id, None)
            self._op_cascade(client_id)
            self._drop_client(client_id)

    def put_subscription(self, client_id: str, sub: SubscriptionRecord) -> None:
        with self._lock:
            b = self._begin()
            b.subs.setdefault(client_id, {})[sub.topic_filter] = (
                client_id, sub.topic_filter, sub.qos, int(sub.no_local),
                int(sub.retain_as_published), sub.retain_handling, sub.subscription_id)

    def delete_subscription(self, client_id: str, topic_filter: str) -> None:
        with self._lock:
            b = self._begin()
            b.subs.setdefault(client_id, {})[topic_filter] = None

    # put_message, add_delivery, update_delivery and remove_delivery are
    # Recorder's (compiled: they run for every stored message). Messages
    # whose last delivery went are kept a while (_released, newest last): a
    # broker that hands the same msg_id out again (a retained message sent to
    # a second subscriber later) gets the row back, not a dangling delivery.

    def _unknown_message(self, msg_id: int) -> None:
        if self._warned_unknown < 10:
            self._warned_unknown += 1
            log.warning("persistence: delivery of message %d, which was never stored or "
                        "was released long ago (put_message it again); it will not "
                        "survive a restart", msg_id)

    def put_incoming_qos2(self, client_id: str, packet_id: int) -> None:
        with self._lock:
            b = self._begin()
            b.qos2.setdefault(client_id, {})[packet_id] = True

    def delete_incoming_qos2(self, client_id: str, packet_id: int) -> None:
        with self._lock:
            b = self._begin()
            b.qos2.setdefault(client_id, {})[packet_id] = False

    def put_retained(self, topic: str, publish: Any, expires_at: float | None) -> None:
        with self._lock:
            b = self._begin()
            b.retained[topic] = (publish, expires_at)

    def delete_retained(self, topic: str) -> None:
        with self._lock:
            b = self._begin()
            b.retained[topic] = None

    def put_will(self, client_id: str, publish: Any, due_at: float) -> None:
        with self._lock:
            b = self._begin()
            b.wills[client_id] = (publish, due_at)

    def delete_will(self, client_id: str) -> None:
        with self._lock:
            b = self._begin()
            b.wills[client_id] = None

    # --------------------------------------------------------------- history

    def put_history(self, hist_id: int, topic: str, ts: float, expires_at: float | None,
                    publish: Any) -> None:
        """Record one chat-history entry (see :mod:`fastmqtt.store.history`)."""
        with self._lock:
            b = self._begin()
            b.hist_put[hist_id] = (hist_id, topic, ts, expires_at, publish)

    def delete_history(self, hist_ids) -> None:
        """Forget history entries (trimmed by count or age)."""
        with self._lock:
            b = self._begin()
            for h in hist_ids:
                if b.hist_put.pop(h, None) is None:
                    b.hist_del.add(h)

    def load_history(self) -> list[tuple[int, str, float, float | None, Any]]:
        """History entries read by :meth:`open`: (id, topic, ts, expires_at,
        Publish), oldest first. No I/O."""
        rows, self._history_rows = self._history_rows, []
        return rows

    # ================================================================ flushes
    # A flush swaps the current batch for a fresh one, encodes it as one log
    # record and appends that to the log writer (fastmqtt._wal), all under
    # _lock, so records reach the log in lsn order. It runs on the trio thread
    # (scheduled with run_sync_soon by the first change of a batch, so every
    # change made until the loop gets to it rides along), or, for a store used
    # outside trio, on the flusher thread.

    def _schedule(self) -> None:
        # Called by the first change of a batch, with _lock held. On the trio
        # thread, once the flush task runs: wake it (no system call; the
        # loop's run_sync_soon writes to its wake-up socket each time).
        if self._flush_parked and threading.get_ident() == self._trio_ident:
            self._flush_parked = False
            trio.lowlevel.reschedule(self._flush_task)
            self._flush_scheduled = True
            return
        token = self._token
        if token is None:
            try:
                token = self._token = trio.lowlevel.current_trio_token()
            except RuntimeError:
                pass  # not in trio: the flusher thread does it
        if token is not None:
            try:
                token.run_sync_soon(self._flush_soon)
                self._flush_scheduled = True
                return
            except trio.RunFinishedError:
                self._token = None
        self._pending.set()

    def _flush_soon(self) -> None:
        """The scheduled flush (trio thread, through run_sync_soon): the first
        one in a loop starts the flush task, which does the later ones."""
        self._flush()
        if self._flush_task is None:
            trio.lowlevel.spawn_system_task(self._flush_loop, name="fastmqtt-store-flush")

    async def _flush_loop(self) -> None:
        self._flush_task = trio.lowlevel.current_task()
        self._trio_ident = threading.get_ident()
        try:
            while True:
                self._flush_parked = True
                await trio.lowlevel.wait_task_rescheduled(
                    lambda _: trio.lowlevel.Abort.SUCCEEDED)
                try:
                    self._flush()
                except Exception:  # pragma: no cover - a bug; the next change retries
                    log.exception("persistence: flush failed")
        finally:  # the loop ends (or the store is closed): run_sync_soon again
            self._flush_parked = False
            self._flush_task = None
            self._trio_ident = None

    def _flush(self, force: bool = False) -> None:
        """Turn the current batch into a log record. On the trio thread
        (``force`` False) in ``batch`` mode the record is written there and
        then, when the writer is idle (:meth:`LogWriter.write_record`): its
        ticket is committed at once and the waiters it covers are woken
        here, with no round trip through the writer thread."""
        done = self._flush_locked(force)
        if done > self._committed:
            self._committed = done
            self._notify()

    def _flush_locked(self, force: bool) -> int:
        """:meth:`_flush` under the lock; the ticket written (0: none)."""
        direct = self._direct and not force
        with self._lock:
            self._flush_scheduled = False
            seq = self._seq
            if seq < self._first:
                return 0  # nothing recorded since the last flush
            wal = self._wal
            if wal is not None and not force and wal.pending > PENDING_LIMIT:
                # _progress flushes once the writer catches up. (Never held
                # outside trio: those flushes are forced.) Meanwhile the ops
                # are folded into the batch each turn of the loop, a net
                # effect that does not grow with traffic (a message queued
                # and acknowledged again cancels out).
                decode_ops(self.take_ops(), self._batch)
                self._arm = seq + 1  # the next change schedules this again
                self._flush_held = True
                self._ensure_watch()
                return 0
            b = self._batch
            self._batch = _Batch()
            ops = self.take_ops()
            b.ops = seq - self._first + 1
            b.seq = seq
            self._first = self._arm = seq + 1
            if wal is None or self._error is not None:
                return 0  # closed or failed: nothing is written any more
            t0 = time.perf_counter()
            done = 0
            try:
                if not ops and b.empty():
                    # All cancelled out: only the ticket.
                    if direct:
                        return seq if wal.advance(seq) else 0
                    wal.append(b"", seq)
                    return 0
                head, cold = _encode_parts(b, self._blob)
                b.lsn = lsn = self._lsn + 1
                if self._seg_bytes >= SEGMENT_BYTES:
                    path = _segment_path(self.data_dir, lsn)
                    with self._compact_cv:
                        spare = self._spares.pop() if self._spares else None
                    if wal.rotate(os.fsencode(path), spare and os.fsencode(spare)):
                        with self._compact_cv:
                            self._segments.append((lsn, path))
                        self._seg_bytes = 0
                    elif spare is not None:
                        with self._compact_cv:
                            self._spares.append(spare)
                if direct:
                    if wal.write_record(lsn, head, cold, ops, seq):
                        done = seq
                else:
                    wal.append_record(lsn, head, cold, ops, seq)
            except OSError:
                return 0  # the writer failed; the watcher reports it
            self._lsn = lsn
            self._seg_bytes += _FRAME.size + 4 + len(head) + len(cold) + len(ops)
            dt = time.perf_counter() - t0
            self.commits += 1
            self.commit_seconds += dt
            if self.stats is not None:
                self.stats.store_commits += 1
                self.stats.store_commit_seconds += dt
            self._to_compactor(b)
            return done

    def _flusher(self) -> None:
        """Flusher thread, for changes recorded while no trio loop is known
        (a store used from plain threads, or before the broker's loop runs)."""
        while True:
            self._pending.wait()
            self._pending.clear()
            if self._closing:
                return
            try:
                self._flush(force=True)  # no watcher outside trio to resume a held one
            except Exception:  # pragma: no cover - a bug
                log.exception("persistence: flush failed")

    def _blob(self, kind: str, key, publish) -> bytes | None:
        try:
            return encode_publish(publish)
        except Exception as e:
            self._unstorable(kind, key, e)
            return None

    def _unstorable(self, kind: str, key, error: BaseException) -> None:
        log.error("persistence: cannot store %s %r: %s", kind, key, error)

    def _to_compactor(self, batch: _Batch) -> None:
        if self._compactor_failed:
            return  # nobody would take it: the log keeps it for the next start
        with self._compact_cv:
            self._compact_queue.append((batch.seq, batch.lsn, batch.ops))
            self._compact_queued_ops += batch.ops
            if self._compact_idle or self._compact_queued_ops >= COMPACT_OPS:
                self._compact_cv.notify()

    def _trim_segments(self, everything: bool = False) -> None:
        """Delete the segments whose records the tables all have (compactor
        thread, or the closing thread once the writer has stopped)."""
        upto = self._compacted_lsn
        with self._compact_cv:
            segs = self._segments
            n = len(segs) if everything else 0
            while n < len(segs) - 1 and segs[n + 1][0] <= upto + 1:
                n += 1
            dead, self._segments = segs[:n], segs[n:]
            keep = 0 if everything else max(0, SPARE_SEGMENTS - len(self._spares))
        for first, path in dead:
            try:
                if keep:
                    # Kept for reuse. (The compactor's reader looks again
                    # for the segment it reads from before each fold: see
                    # _LogReader.read.)
                    spare = os.path.join(self.data_dir, f"{SPARE_PREFIX}{first:016x}")
                    os.rename(path, spare)
                    keep -= 1
                    with self._compact_cv:
                        self._spares.append(spare)
                    continue
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:  # harmless: recovery skips what the tables have
                log.warning("persistence: cannot delete or reuse log segment %s: %s", path, e)

    def _remove_spares(self) -> None:
        with self._compact_cv:
            self._spares = []
        for name in os.listdir(self.data_dir):
            if name.startswith(SPARE_PREFIX):
                try:
                    os.unlink(os.path.join(self.data_dir, name))
                except OSError as e:  # harmless: removed at the next start
                    log.warning("persistence: cannot delete %s: %s", name, e)

    # ============================================= compactor thread and process

    def _compactor(self) -> None:
        """Compactor thread: have the written records folded into the tables
        (see the module docstring; the folding itself runs in the compactor
        process, or here with ``compactor="thread"``), then delete the
        segments they cover."""
        conn = self._conn
        wal = self._wal
        due = _Due()
        first_at = 0.0  # when due got its first record
        delays = self.retry_delays
        failures = 0
        retry_at = 0.0
        try:
            while True:
                with self._compact_cv:
                    pending = self._compact_queue
                    if not ((pending and pending[0][0] <= wal.written)
                            or self._compact_stop or self._compact_now):
                        # Nothing queued: the next record wakes it. Queued
                        # but not written yet: look again soon.
                        timeout = 0.01 if pending else None
                        if due.lsn:
                            due_at = max(first_at + COMPACT_PERIOD, retry_at)
                            timeout = max(0.0, due_at - time.monotonic())
                        # Only a wait with no end needs the next record to
                        # wake it; otherwise records queue up unannounced
                        # (a wake-up per flush would take the GIL from the
                        # trio thread hundreds of times a second for nothing).
                        self._compact_idle = timeout is None
                        self._compact_cv.wait(timeout)
                        self._compact_idle = False
                    # Only what the log has: the tables never get ahead of it.
                    written = wal.written
                    pending = self._compact_queue
                    n = 0
                    while n < len(pending) and pending[n][0] <= written:
                        n += 1
                    start_child = bool(n or pending)
                    if n:
                        if not due.lsn:
                            first_at = time.monotonic()
                        ops = sum(p[2] for p in pending[:n])
                        due.lsn = pending[n - 1][1]
                        due.ops += ops
                        self._compact_queue = pending[n:]
                        self._compact_queued_ops -= ops
                    stop = self._compact_stop
                    now_asked = self._compact_now
                    self._compact_now = False  # compact() asks again if not done
                if start_child and self._child is None:
                    self._ensure_child()
                t = time.monotonic()
                ready = (stop or now_asked or due.ops >= COMPACT_OPS
                         or (due.lsn and t - first_at >= COMPACT_PERIOD))
                if due.lsn and ready and (t >= retry_at or stop or now_asked):
                    try:
                        # Periodic folds hold the newest records back for the
                        # next (see _Folder.fold); asked or stopping, all go.
                        lsn = self._compact(conn, due, hold=not (stop or now_asked))
                    except (sqlite3.Error, ValueError, OSError) as e:
                        failures += 1
                        delay = delays[min(failures, len(delays)) - 1] if delays else 0.0
                        log.warning("persistence: compaction failed (%s); the log keeps "
                                    "everything, retrying in %.2fs", e, delay)
                        retry_at = time.monotonic() + delay
                        if stop:
                            break  # the log has it all; recovery replays it
                    else:
                        failures = 0
                        held = due.lsn if lsn < due.lsn else 0
                        due = _Due()
                        if held:  # folded by the next fold, a period from now at the latest
                            due.lsn = held
                            first_at = time.monotonic()
                        self._trim_segments()
                if now_asked:
                    with self._compact_cv:
                        self._compact_cv.notify_all()
                if stop:
                    with self._compact_cv:
                        if not self._compact_queue or wal.error:
                            break
                    continue
        except BaseException as e:  # pragma: no cover - a bug: say so, keep the log
            self._compactor_failed = True
            log.exception("persistence: compactor failed; the log keeps growing until "
                          "the next start replays it: %s", e)
        finally:
            self._stop_folding()
            with self._compact_cv:
                self._compact_cv.notify_all()

    def _compact(self, conn: sqlite3.Connection, due: "_Due", hold: bool = False) -> int:
        """Fold the records up to ``due.lsn`` into the tables (compactor
        thread; ``hold``: see :meth:`_Folder.fold`). Returns the lsn the
        tables now have. Raises sqlite3.Error, ValueError or OSError on
        failure."""
        t0 = time.perf_counter()
        if self._child is None:
            self._ensure_child()
        if self.compactor == "thread":
            if self._folder is None:
                self._folder = _Folder(conn, self.data_dir, self.path)
            lsn, _ = self._folder.fold(due.lsn, hold)
        else:
            lsn = self._child_fold(due.lsn, hold)
        if lsn < due.lsn and not hold:  # pragma: no cover - a bug
            raise ValueError(f"folded up to record {lsn}, not {due.lsn}")
        self._compacted_lsn = lsn
        self.compactions += 1
        log.debug("persistence: compacted up to record %d (%d changes) in %.1f ms",
                  lsn, due.ops, 1000 * (time.perf_counter() - t0))
        return lsn

    def _child_fold(self, upto: int, hold: bool = False) -> int:
        child = self._start_child()
        try:
            child.stdin.write(b"fold %d%s\n" % (upto, b" hold" if hold else b""))
            child.stdin.flush()
            reply = child.stdout.readline().decode("ascii", "replace").strip()
        except OSError as e:
            reply = f"fail {e}"
        word, _, rest = reply.partition(" ")
        if word == "done":
            return int(rest.split()[0])
        if not reply:
            child.kill()
            child.wait()
            self._child = None
            raise OSError(f"the compactor process exited ({child.returncode})")
        raise sqlite3.OperationalError(rest)

    def _ensure_child(self) -> None:
        """Start the compactor process (compactor="process"). When none can be
        started (no interpreter to run: an embedded or frozen Python), say so
        and fold in this thread from now on, as compactor="thread" does."""
        if self.compactor != "process":
            return
        try:
            self._start_child()
        except OSError as e:
            log.warning("persistence: cannot start the compactor process (%s); "
                        "compacting in a thread of the broker instead", e)
            self.compactor = "thread"

    def _start_child(self) -> subprocess.Popen:
        """The compactor process, started if it is not running (compactor
        thread: the first record starts it, so its start-up overlaps the wait
        for the first compaction)."""
        child = self._child
        if child is None or child.poll() is not None:
            if child is not None:
                log.warning("persistence: the compactor process exited (%s); starting "
                            "another", child.returncode)
            pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            # Started from this (the compactor) thread: PR_SET_PDEATHSIG in
            # the child follows the thread that started it, which lives as
            # long as the store is open.
            self._child = None
            child = self._child = subprocess.Popen(
                [sys.executable, "-m", "fastmqtt.store.compactor", self.data_dir, self.path,
                 str(os.getpid()), str(CHECKPOINT_BYTES)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        return child

    def _stop_folding(self) -> None:
        """End the compactor process (or the thread's folder)."""
        if self._folder is not None:
            self._folder.close()
            self._folder = None
        child, self._child = self._child, None
        if child is not None:
            try:
                child.stdin.close()
            except OSError:
                pass
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                child.kill()
                child.wait()
            child.stdout.close()

    def compact(self, timeout: float = 30.0) -> bool:
        """Fold every change recorded so far into the tables now and wait for
        it. Blocking (not for the trio thread in production; tests and tools).

        Returns:
            True once the tables hold every record; False on timeout, when the
            store failed or is not open.
        """
        if self._thread is None:
            return False
        self._flush(force=True)
        target = self._lsn
        deadline = time.monotonic() + timeout
        with self._compact_cv:
            self._compact_now = True
            self._compact_cv.notify_all()
            while self._compacted_lsn < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or self._error is not None:
                    return False
                self._compact_cv.wait(min(left, 0.05))
                if not self._compact_now and self._compacted_lsn < target:
                    self._compact_now = True
                    self._compact_cv.notify_all()
        return True
