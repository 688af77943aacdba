"""SQLite store: the broker's default persistence (stdlib ``sqlite3``, WAL).

Theory of operation
-------------------
The broker core is synchronous and runs on the trio thread; it must never
wait for the disk. So every mutator (``put_session``, ``add_delivery``, ...)
only records its change in the *current batch* (a few dicts) and returns.
A dedicated writer thread owns the one ``sqlite3`` connection. It loops:

1. wait until the current batch is non-empty,
2. swap it for a fresh one (under a ``threading.Lock`` held for a few
   dictionary operations, never across I/O),
3. apply the whole batch in one transaction (``executemany`` per statement
   kind) and ``COMMIT``,
4. publish the sequence number of the last change in that batch as
   ``committed`` and wake trio tasks blocked in :meth:`SqliteStore.durable`
   (``TrioToken.run_sync_soon``, which never blocks the writer).

While one commit (and its fsync) runs, new changes pile up in the next batch:
that is group commit, and it is why one fsync can cover hundreds of PUBLISHes
from many publishers. ``mark()`` is the sequence number of the last recorded
change; the broker sends PUBACK/PUBREC once ``await durable(mark())`` returns.

Batches are *net effects*, keyed by primary key, so later changes overwrite
earlier ones in the same batch. The one order-sensitive change,
``delete_session`` (which removes every row of a client), is applied first in
the transaction and drops that client's earlier entries from the batch, so
changes made after it still land after it.

Coalescing: a delivery added and removed within the same batch never reaches
the disk, and neither does its message once no delivery refers to it. This is
safe: the publisher's PUBACK waits for a ticket that covers the add, and the
batch that covers the add also covers the remove, which means the subscriber
has already acknowledged the message; nothing is owed to anyone, so there is
nothing to survive a crash. A fast subscriber's messages cost no disk I/O.

Message rows are reference counted in memory (deliveries per message), so the
row goes in the same batch as its last delivery; messages that end up with no
delivery (and any left over by a crash) are removed at start-up.

Durability modes
----------------
Commits use ``PRAGMA synchronous=NORMAL`` in WAL mode: COMMIT appends the
batch to the WAL (the OS page cache has it, so a ``kill -9`` of the broker
loses nothing) without an fsync. A third thread, the flusher, fsyncs the WAL.

``sync`` (default): ``durable()`` returns only once an fsync that *started
after* the commit has finished: nothing acknowledged is lost, even on power
failure. The flusher runs fsyncs back to back while the writer commits the
next batch, so the disk flush and the next commit overlap (as a database's log
writer and log flusher do) and each fsync covers every commit made during the
previous one. This is what ``synchronous=FULL`` guarantees, without holding
the writer inside COMMIT for the fsync.

``batch``: ``durable()`` returns after the commit; the flusher fsyncs the WAL
at most every ``batch_interval_ms``: a power failure or kernel crash loses at
most that window, a process crash nothing.

Checkpoints (WAL into the database file) run on their own thread and
connection, so they never stall a commit either. A failed fsync makes the
store fail (``durable()`` raises): after one, the kernel may have dropped the
pages, so nothing later could honestly be called durable.

Start-up
--------
``open()`` takes an exclusive lock file in the data directory (two brokers on
one directory would corrupt each other's view), runs ``PRAGMA quick_check``,
loads everything, drops what expired while the broker was down and returns a
:class:`~fastmqtt.broker.interfaces.Snapshot`. A file SQLite cannot read, that
fails the check, or that has a newer schema is logged and renamed to
``fastmqtt.db.corrupt-<UTC timestamp>`` (with its ``-wal``/``-shm``) and a fresh
database is created: the broker starts, the evidence is kept, nothing is
silently overwritten. A single undecodable message row is logged and dropped.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Any

import trio

from ..broker.interfaces import DeliveryRecord, Snapshot, SubscriptionRecord
from .base import StoreError, build_snapshot, decode_publish, encode_publish, log

__all__ = ["SqliteStore", "DB_NAME", "SCHEMA_VERSION"]

DB_NAME = "fastmqtt.db"
LOCK_NAME = "fastmqtt.lock"
SCHEMA_VERSION = 1
#: How long the writer may hold back a batch nobody waits for yet (seconds),
#: hoping to fold more into one commit. 0: commit as soon as there is work.
#: Waiting measured no better on the end-to-end benchmark, and a prompt commit
#: keeps short the window in which state the broker does not wait for (a new
#: subscription, a session's disconnect time) is not yet on disk.
FLUSH_DELAY = 0.0
#: WAL size that triggers a checkpoint, and how often the size is looked at.
CHECKPOINT_BYTES = 8 * 1024 * 1024
CHECKPOINT_PERIOD = 0.25
#: Released messages remembered for a re-delivery under the same msg_id.
RELEASED_KEPT = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS sessions(
    client_id TEXT PRIMARY KEY, expiry_interval INTEGER NOT NULL,
    protocol_level INTEGER NOT NULL, disconnected_at REAL);
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
    PRIMARY KEY(client_id, msg_id)) WITHOUT ROWID;
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

_CLIENT_TABLES = ("sessions", "subscriptions", "deliveries", "incoming_qos2", "wills")

# Delivery entry kinds inside a batch.
_ADD = 0  # new row, not on disk: an add followed by a remove cancels out
_ADDR = 1  # add over a row that may be on disk (re-add): insert or replace
_UPD = 2  # update of a row on disk
_DEL = 3  # delete of a row on disk


# Set-based statements for the tables every PUBLISH touches. ``executemany``
# makes one sqlite3_step per row and the sqlite3 module drops and retakes the
# GIL around each: with the trio thread busy, every retake waits, and a commit
# of a few hundred rows took milliseconds. Passing the rows as one JSON array
# (and the message blobs as one concatenated blob sliced with substr) makes the
# whole table change a single step: one GIL hand-off per statement.
_BULK_MIN = 4
_MSG_INS_BULK = (
    "INSERT OR REPLACE INTO messages(msg_id, publish, expires_at) "
    "SELECT value->>0, substr(?1, value->>1, value->>2), value->>3 FROM json_each(?2)")
_DELIV_INS_BULK = (
    "INSERT OR REPLACE INTO deliveries(client_id, msg_id, seq, qos, packet_id, state) "
    "SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5 FROM json_each(?)")
# An update of rows known to exist; written as an upsert so it needs no join
# plan. (seq is not touched: the row keeps its queue position.)
_DELIV_UPD_BULK = (
    "INSERT INTO deliveries(client_id, msg_id, seq, qos, packet_id, state) "
    "SELECT value->>0, value->>1, 0, value->>2, value->>3, value->>4 FROM json_each(?) WHERE true "
    "ON CONFLICT(client_id, msg_id) DO UPDATE SET qos=excluded.qos, "
    "packet_id=excluded.packet_id, state=excluded.state")
# Per client, so the primary key (client_id, msg_id) is used for every id.
_DELIV_DEL_BULK = (
    "DELETE FROM deliveries WHERE client_id=? AND msg_id IN (SELECT value FROM json_each(?))")
_MSG_DEL_BULK = "DELETE FROM messages WHERE msg_id IN (SELECT value FROM json_each(?))"
_HIST_INS_BULK = (
    "INSERT OR REPLACE INTO history(hist_id, topic, ts, expires_at, publish) "
    "SELECT value->>0, value->>1, value->>2, value->>3, substr(?1, value->>4, value->>5) "
    "FROM json_each(?2)")
_HIST_DEL_BULK = "DELETE FROM history WHERE hist_id IN (SELECT value FROM json_each(?))"
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _pack_blobs(rows, blob_index: int):
    """(one blob, rows with the blob replaced by its 1-based offset and length)."""
    parts = []
    meta = []
    offset = 1
    for row in rows:
        blob = row[blob_index]
        parts.append(blob)
        meta.append((*row[:blob_index], offset, len(blob), *row[blob_index + 1:]))
        offset += len(blob)
    return b"".join(parts), meta


class _Unusable(Exception):
    """The database file cannot be used as it is (corrupt, foreign, newer)."""


class _Batch:
    """Net effect of the changes recorded since the last swap."""

    __slots__ = ("ops", "seq", "cascade", "sessions", "subs", "deliv", "qos2", "messages",
                 "msg_del", "retained", "wills", "hist_put", "hist_del")

    def __init__(self) -> None:
        self.ops = 0
        self.seq = 0
        self.cascade: set[str] = set()
        self.sessions: dict[str, tuple] = {}
        self.subs: dict[str, dict[str, SubscriptionRecord | None]] = {}
        self.deliv: dict[str, dict[int, list]] = {}
        self.qos2: dict[str, dict[int, bool]] = {}
        self.messages: dict[int, tuple[Any, float | None]] = {}
        self.msg_del: set[int] = set()
        self.retained: dict[str, tuple | None] = {}
        self.wills: dict[str, tuple | None] = {}
        self.hist_put: dict[int, tuple] = {}
        self.hist_del: set[int] = set()


class SqliteStore:
    """Crash-safe store in ``<data_dir>/fastmqtt.db`` with group commit.

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
                 batch_interval_ms: int = 10, clock=time.time, stats=None) -> None:
        if durability not in ("sync", "batch"):
            raise ValueError(f"durability must be 'sync' or 'batch', not {durability!r}")
        self.data_dir = os.fspath(data_dir)
        self.path = os.path.join(self.data_dir, DB_NAME)
        self.durability = durability
        # ->> needs SQLite 3.38; older libraries get executemany.
        self._bulk = sqlite3.sqlite_version_info >= (3, 38, 0)
        self.batch_interval = max(0, batch_interval_ms) / 1000.0
        self.stats = stats
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()  # someone waits in durable(): commit now
        self._pending = threading.Event()  # the current batch is not empty
        self._unsynced = threading.Event()  # batch mode: commits not yet fsynced
        self._stop_wait = threading.Event()
        self._fsync_stop = False
        self._batch = _Batch()
        self._seq = 0  # last recorded change
        self._committed = 0  # last change durable per the mode
        self._written = 0  # last change committed to the WAL (maybe not fsynced)
        self._dseq = 0  # delivery order counter
        self._refs: dict[int, int] = {}  # msg_id -> deliveries referring to it
        self._client_msgs: dict[str, set[int]] = {}  # client_id -> msg_ids delivered
        self._msgs: dict[int, tuple] = {}  # msg_id -> (Publish, expires_at) while stored
        # Messages whose last delivery went, newest last: a broker that hands
        # the same msg_id out again (a retained message sent to a second
        # subscriber later) gets the row back instead of a dangling delivery.
        self._released: OrderedDict[int, tuple] = OrderedDict()
        self._warned_unknown = 0
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._waiters: list[tuple[int, int, trio.Event]] = []  # heap by ticket
        self._waiter_count = 0
        self._lockfile: int | None = None
        self._history_rows: list = []
        self.moved_aside: str | None = None  # where a bad database went, if any
        self.commits = 0
        self.commit_seconds = 0.0
        #: waits between attempts at a failing commit (disk full may clear up);
        #: after the last one the store fails and ``durable()`` raises.
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
        self._closing = self._fsync_stop = False
        self._pending.clear()
        self._wake.clear()
        self._stop_wait.clear()
        self._unsynced.clear()
        self._thread = threading.Thread(target=self._writer, name="fastmqtt-store-writer",
                                        daemon=True)
        self._thread.start()
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        return snap

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
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = f"{self.path}.corrupt-{stamp}"
        n = 1
        while os.path.exists(dest):
            n += 1
            dest = f"{self.path}.corrupt-{stamp}-{n}"
        try:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, dest + suffix)
        except OSError as e:
            raise StoreError(f"{self.path} is unusable ({reason}) and cannot be moved "
                             f"aside: {e}") from e
        self.moved_aside = dest
        log.error("persistence: %s is unusable (%s); moved it to %s and starting with an "
                  "empty store", self.path, reason, dest)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=0.5)
        # NORMAL in both modes: COMMIT only writes the WAL; the flusher thread
        # fsyncs it (see _fsyncer), before durable() returns in sync mode.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA temp_store=MEMORY")
        # Checkpoints (copying the WAL into the database, with their own
        # fsyncs) run on a separate thread and connection, never inside a
        # commit that a publisher is waiting for.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA cache_size=-16000")
        # Checkpoints reset the WAL; this caps the file it leaves behind.
        conn.execute("PRAGMA journal_size_limit=67108864")
        return conn

    def _load(self, now: float) -> Snapshot:
        conn = None
        try:
            try:
                conn = self._connect()
                check = conn.execute("PRAGMA quick_check").fetchall()
                if check != [("ok",)]:
                    raise _Unusable("integrity check failed: " +
                                    "; ".join(str(r[0]) for r in check[:5]))
                has_meta = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
                if has_meta:
                    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                    if row is None:
                        raise _Unusable("no schema_version in meta")
                    if int(row[0]) > SCHEMA_VERSION:
                        raise _Unusable(f"schema version {row[0]} is newer than {SCHEMA_VERSION}")
                else:
                    others = conn.execute(
                        "SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                    if others:
                        raise _Unusable("not a fastmqtt database (no meta table)")
                # Only now that the file is known to be ours may it change
                # (switching to WAL rewrites the header of a foreign file).
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise _Unusable(f"cannot switch to WAL mode (got {mode!r})")
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta VALUES('schema_version', ?)",
                             (SCHEMA_VERSION,))
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
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        return snap

    def _recover(self, conn: sqlite3.Connection, now: float) -> Snapshot:
        bad_msgs: list[int] = []

        def decode(kind, key, blob):
            try:
                return decode_publish(blob)
            except Exception as e:  # one bad row must not cost the rest
                log.error("persistence: dropping undecodable %s %r: %s", kind, key, e)
                return None

        sessions = {c: (e, lvl, d) for c, e, lvl, d in conn.execute("SELECT * FROM sessions")}
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
        for c, mid, seq, q, pid, st in conn.execute("SELECT * FROM deliveries"):
            max_seq = max(max_seq, seq)
            all_deliv.add((c, mid))
            deliveries.setdefault(c, []).append((seq, DeliveryRecord(mid, q, pid, st)))
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

        self._refs = {}
        self._client_msgs = {}
        self._msgs = dict(snap.messages)
        self._released.clear()
        for s in snap.sessions:
            ms = self._client_msgs[s.client_id] = set()
            for d in s.deliveries:
                ms.add(d.msg_id)
                self._refs[d.msg_id] = self._refs.get(d.msg_id, 0) + 1
        self._dseq = max_seq
        self._history_rows = hist
        return snap

    def mark(self) -> int:
        """Ticket covering every change recorded so far (for :meth:`durable`)."""
        return self._seq

    async def durable(self, ticket: int) -> None:
        """Wait until every change up to ``ticket`` is committed (``sync``:
        fsynced). Never blocks the trio thread.

        Raises:
            StoreError: the writer failed or the store was closed first.
        """
        if self._committed >= ticket:
            return
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        while self._committed < ticket:
            if self._error is not None:
                raise StoreError(f"persistence failed: {self._error}") from self._error
            if self._thread is None:
                raise StoreError("store is not open")
            if ticket > self._written:
                self._wake.set()  # a publisher waits: the writer commits now
            # No await between the check above and the push: the wake-up
            # (run on this thread) cannot slip in between.
            ev = trio.Event()
            self._waiter_count += 1
            heapq.heappush(self._waiters, (ticket, self._waiter_count, ev))
            await ev.wait()

    def _notify(self) -> None:
        # Runs on the trio thread (run_sync_soon). Wakes only the waiters whose
        # ticket is now committed (a heap ordered by ticket), so a commit costs
        # O(woken), not O(waiting), with thousands of connections waiting.
        waiters = self._waiters
        if self._error is not None or self._thread is None:
            limit = float("inf")  # failed or closed: everyone must look
        else:
            limit = self._committed
        while waiters and waiters[0][0] <= limit:
            heapq.heappop(waiters)[2].set()

    def _post_notify(self) -> None:
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._notify)
        except trio.RunFinishedError:
            self._token = None

    async def aclose(self) -> None:
        """Commit what is pending, stop the writer and close the database."""
        thread = self._stop_writer()
        if thread is not None:
            await trio.to_thread.run_sync(thread.join)
        self._finish_close()

    def close(self) -> None:
        """Synchronous :meth:`aclose` for code outside trio."""
        thread = self._stop_writer()
        if thread is not None:
            thread.join()
        self._finish_close()

    def _stop_writer(self):
        thread = self._thread
        if thread is not None:
            self._closing = True
            self._pending.set()
            self._wake.set()
            self._stop_wait.set()
        return thread

    def _finish_close(self) -> None:
        if self._thread is not None and self.commits:
            log.info("persistence: %d commits, %.2f ms each on average", self.commits,
                     1000 * self.commit_seconds / self.commits)
        self._thread = None
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error as e:  # pragma: no cover
                log.warning("persistence: closing database: %s", e)
            self._conn = None
        self._release_lockfile()
        self._notify()  # anyone still waiting gets "not open"

    # ============================================================ mutators
    # Each records its change in the current batch. The writer is woken only
    # by the first change of a batch: later ones ride along.

    def _begin(self) -> _Batch:
        self._seq += 1
        b = self._batch
        b.seq = self._seq
        b.ops += 1
        if b.ops == 1:
            self._pending.set()
        return b

    def put_session(self, client_id: str, expiry_interval: int, protocol_level: int,
                    disconnected_at: float | None) -> None:
        with self._lock:
            b = self._begin()
            b.sessions[client_id] = (client_id, expiry_interval, protocol_level, disconnected_at)

    def delete_session(self, client_id: str) -> None:
        with self._lock:
            b = self._begin()
            b.cascade.add(client_id)
            for d in (b.sessions, b.subs, b.deliv, b.qos2, b.wills):
                d.pop(client_id, None)
            for mid in self._client_msgs.pop(client_id, ()):
                self._decref(b, mid)

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

    def put_message(self, msg_id: int, publish: Any, expires_at: float | None) -> None:
        with self._lock:
            b = self._begin()
            b.messages[msg_id] = self._msgs[msg_id] = (publish, expires_at)
            b.msg_del.discard(msg_id)
            self._released.pop(msg_id, None)

    def add_delivery(self, client_id: str, delivery: DeliveryRecord) -> None:
        mid = delivery.msg_id
        with self._lock:
            b = self._begin()
            ms = self._client_msgs.get(client_id)
            if ms is None:
                ms = self._client_msgs[client_id] = set()
            dl = b.deliv.get(client_id)
            if dl is None:
                dl = b.deliv[client_id] = {}
            self._dseq += 1
            if mid in ms:  # re-add: a row may be on disk
                kind = _ADDR
            else:
                ms.add(mid)
                n = self._refs.get(mid, 0)
                if not n and mid not in self._msgs:
                    self._revive(b, mid)
                self._refs[mid] = n + 1
                old = dl.get(mid)
                kind = _ADD if old is None or old[0] == _ADD else _ADDR
            dl[mid] = [kind, self._dseq, delivery.qos, delivery.packet_id, delivery.state]

    def update_delivery(self, client_id: str, delivery: DeliveryRecord) -> None:
        mid = delivery.msg_id
        with self._lock:
            b = self._begin()
            ms = self._client_msgs.get(client_id)
            if ms is None or mid not in ms:
                return  # unknown delivery: nothing to update
            dl = b.deliv.get(client_id)
            if dl is None:
                dl = b.deliv[client_id] = {}
            e = dl.get(mid)
            if e is not None and e[0] != _DEL:
                e[2] = delivery.qos
                e[3] = delivery.packet_id
                e[4] = delivery.state
            else:
                dl[mid] = [_UPD, 0, delivery.qos, delivery.packet_id, delivery.state]

    def remove_delivery(self, client_id: str, msg_id: int) -> None:
        with self._lock:
            b = self._begin()
            ms = self._client_msgs.get(client_id)
            if ms is None or msg_id not in ms:
                return
            ms.discard(msg_id)
            dl = b.deliv.get(client_id)
            if dl is None:
                dl = b.deliv[client_id] = {}
            e = dl.get(msg_id)
            if e is not None and e[0] == _ADD:
                del dl[msg_id]  # added and acknowledged within one batch
            else:
                dl[msg_id] = [_DEL]
            self._decref(b, msg_id)

    def _decref(self, b: _Batch, msg_id: int) -> None:
        n = self._refs.get(msg_id, 1) - 1
        if n > 0:
            self._refs[msg_id] = n
            return
        self._refs.pop(msg_id, None)
        entry = self._msgs.pop(msg_id, None)
        if entry is not None:
            self._released[msg_id] = entry
            if len(self._released) > RELEASED_KEPT:
                self._released.popitem(last=False)
        if b.messages.pop(msg_id, None) is None:
            b.msg_del.add(msg_id)

    def _revive(self, b: _Batch, msg_id: int) -> None:
        """A delivery names a message whose row was dropped (its last delivery
        went): store it again if it is still known, else warn."""
        entry = self._released.pop(msg_id, None)
        if entry is not None:
            self._msgs[msg_id] = entry
            b.messages[msg_id] = entry
            b.msg_del.discard(msg_id)
        elif self._warned_unknown < 10:
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

    # ============================================================ writer thread

    def _writer(self) -> None:
        checkpointer = threading.Thread(target=self._checkpointer,
                                        name="fastmqtt-store-checkpoint", daemon=True)
        checkpointer.start()
        fsyncer = threading.Thread(target=self._fsyncer, name="fastmqtt-store-fsync",
                                   daemon=True)
        fsyncer.start()
        sync = self.durability == "sync"
        try:
            while True:
                # Commit once there is work; with FLUSH_DELAY, not before
                # someone waits in durable() or the delay has passed.
                self._pending.wait()
                if FLUSH_DELAY and not self._closing:
                    self._wake.wait(FLUSH_DELAY)
                self._wake.clear()
                self._pending.clear()
                fresh = _Batch()  # built outside the lock: the swap is two stores
                with self._lock:
                    batch = self._batch
                    if batch.ops:
                        self._batch = fresh
                if batch.ops:
                    wrote = self._commit(batch)
                    self._written = batch.seq
                    if sync:
                        # Durable once the flusher's next fsync is done.
                        self._unsynced.set()
                    else:
                        self._committed = batch.seq
                        self._post_notify()
                        if wrote:
                            self._unsynced.set()
                if self._closing and not self._batch.ops:
                    break
        except BaseException as e:  # the writer must never die silently
            log.exception("persistence: writer failed; no further changes are saved")
            self._error = e
            self._post_notify()
        finally:
            self._fsync_stop = True
            self._unsynced.set()
            fsyncer.join()
            self._stop_wait.set()
            checkpointer.join()

    def _fsyncer(self) -> None:
        """Flusher thread: fsync the WAL, then (``sync``) declare durable what
        was committed before the fsync began.

        Commits are made with ``synchronous=NORMAL`` (no fsync inside COMMIT)
        and this thread does the fsync, so the writer already commits the next
        batch while the disk flushes the previous one: each fsync covers every
        commit made while the last one ran. In ``batch`` mode fsyncs are spaced
        at least ``batch_interval`` apart and nobody waits for them.
        """
        fd = None
        sync = self.durability == "sync"
        try:
            while True:
                self._unsynced.wait()
                self._unsynced.clear()
                seq = self._written
                fd = self._fsync_wal(fd, sync)
                if sync:
                    self._committed = seq
                    self._post_notify()
                if self._fsync_stop and self._written == seq:
                    break
                if not sync:
                    # Rate limit: this wait returns early only to stop.
                    self._stop_wait.wait(self.batch_interval)
        except BaseException as e:
            # After a failed fsync the kernel may have dropped the dirty pages:
            # nothing written since can be called durable.
            log.error("persistence: fsync of the WAL failed (%s); no further changes are "
                      "acknowledged", e)
            self._error = e
            self._post_notify()
        finally:
            if fd is not None:
                os.close(fd)

    def _checkpointer(self) -> None:
        """Copy the WAL into the database (PASSIVE: alongside the writer) when
        it has grown past ``CHECKPOINT_BYTES`` or has been idle with unsaved
        frames for a while, so the WAL stays bounded without ever stalling a
        commit."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=5)
            conn.execute("PRAGMA synchronous=NORMAL")  # checkpoints fsync WAL and database
        except sqlite3.Error as e:  # pragma: no cover - the writer's open just worked
            log.warning("persistence: no checkpoint connection (%s); the WAL will grow", e)
            return
        wal = self.path + "-wal"
        done_at = self.commits
        try:
            while not self._stop_wait.wait(CHECKPOINT_PERIOD):
                if self.commits == done_at:
                    continue
                try:
                    size = os.path.getsize(wal)
                except OSError:
                    continue
                idle = self._committed == self._seq
                if size < CHECKPOINT_BYTES and not idle:
                    continue
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    done_at = self.commits
                except sqlite3.Error as e:
                    log.warning("persistence: checkpoint failed: %s", e)
        finally:
            conn.close()

    def _fsync_wal(self, fd, strict: bool = False):
        """fsync the WAL file (opened once). ``strict``: raise on failure."""
        try:
            if fd is None:
                try:
                    fd = os.open(self.path + "-wal", os.O_RDONLY)
                except FileNotFoundError:
                    return None  # nothing written yet: nothing to flush
            os.fsync(fd)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            if strict:
                raise
            log.warning("persistence: fsync of the WAL failed: %s", e)
            fd = None
        return fd

    def _commit(self, b: _Batch) -> bool:
        """Apply one batch in one transaction; retry transient failures."""
        delays = self.retry_delays
        for attempt in range(len(delays) + 1):
            t0 = time.perf_counter()
            try:
                wrote = self._apply(b)
            except sqlite3.Error as e:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if attempt == len(delays):
                    raise
                log.warning("persistence: commit failed (%s); retrying in %.2fs", e,
                            delays[attempt])
                time.sleep(delays[attempt])
                continue
            if not wrote:
                return False
            dt = time.perf_counter() - t0
            self.commits += 1
            self.commit_seconds += dt
            if self.stats is not None:
                self.stats.store_commits += 1
                self.stats.store_commit_seconds += dt
            return True
        return False

    def _blob(self, kind: str, key, publish) -> bytes | None:
        try:
            return encode_publish(publish)
        except Exception as e:
            log.error("persistence: cannot store %s %r: %s", kind, key, e)
            return None

    def _apply(self, b: _Batch) -> bool:
        """One transaction with the batch's net effect. Runs on the writer thread."""
        c = self._conn
        if c is None:
            raise sqlite3.ProgrammingError("database closed")
        sessions = list(b.sessions.values())
        sub_put, sub_del = [], []
        for cid, d in b.subs.items():
            for f, row in d.items():
                if row is None:
                    sub_del.append((cid, f))
                else:
                    sub_put.append(row)
        d_ins, d_upd, d_del = [], [], []
        for cid, d in b.deliv.items():
            for mid, e in d.items():
                kind = e[0]
                if kind == _DEL:
                    d_del.append((cid, mid))
                elif kind == _UPD:
                    d_upd.append((e[2], e[3], e[4], cid, mid))
                else:
                    d_ins.append((cid, mid, e[1], e[2], e[3], e[4]))
        q_put, q_del = [], []
        for cid, d in b.qos2.items():
            for pid, put in d.items():
                (q_put if put else q_del).append((cid, pid))
        msgs = []
        for mid, (p, exp) in b.messages.items():
            blob = self._blob("message", mid, p)
            if blob is not None:
                msgs.append((mid, blob, exp))
        r_put, r_del = [], []
        for t, v in b.retained.items():
            if v is None:
                r_del.append((t,))
            else:
                blob = self._blob("retained message", t, v[0])
                if blob is not None:
                    r_put.append((t, blob, v[1]))
        w_put, w_del = [], []
        for cid, v in b.wills.items():
            if v is None:
                w_del.append((cid,))
            else:
                blob = self._blob("will of", cid, v[0])
                if blob is not None:
                    w_put.append((cid, blob, v[1]))
        h_put = []
        for hid, t, ts, exp, p in b.hist_put.values():
            blob = self._blob("history entry", hid, p)
            if blob is not None:
                h_put.append((hid, t, ts, exp, blob))
        if not (b.cascade or sessions or sub_put or sub_del or d_ins or d_upd or d_del
                or q_put or q_del or msgs or b.msg_del or r_put or r_del or w_put or w_del
                or h_put or b.hist_del):
            return False  # everything cancelled out: nothing to write, nothing to fsync

        ex = c.executemany
        bulk = self._bulk
        c.execute("BEGIN IMMEDIATE")
        if b.cascade:
            gone = [(cid,) for cid in b.cascade]
            for table in _CLIENT_TABLES:
                ex(f"DELETE FROM {table} WHERE client_id=?", gone)
        if sessions:
            ex("INSERT OR REPLACE INTO sessions VALUES(?,?,?,?)", sessions)
        if sub_put:
            ex("INSERT OR REPLACE INTO subscriptions VALUES(?,?,?,?,?,?,?)", sub_put)
        if sub_del:
            ex("DELETE FROM subscriptions WHERE client_id=? AND topic_filter=?", sub_del)
        # The hot tables: one statement each, whatever the number of rows.
        if msgs:
            if bulk and len(msgs) >= _BULK_MIN:
                blob, meta = _pack_blobs(msgs, 1)
                c.execute(_MSG_INS_BULK, (blob, _dumps(meta)))
            else:
                ex("INSERT OR REPLACE INTO messages VALUES(?,?,?)", msgs)
        if d_ins:
            if bulk and len(d_ins) >= _BULK_MIN:
                c.execute(_DELIV_INS_BULK, (_dumps(d_ins),))
            else:
                ex("INSERT OR REPLACE INTO deliveries VALUES(?,?,?,?,?,?)", d_ins)
        if d_upd:
            if bulk and len(d_upd) >= _BULK_MIN:
                c.execute(_DELIV_UPD_BULK, (_dumps([(cid, mid, q, pid, st)
                                                    for q, pid, st, cid, mid in d_upd]),))
            else:
                ex("UPDATE deliveries SET qos=?, packet_id=?, state=? "
                   "WHERE client_id=? AND msg_id=?", d_upd)
        if d_del:
            if bulk and len(d_del) >= _BULK_MIN:
                per_client: dict[str, list[int]] = {}
                for cid, mid in d_del:
                    per_client.setdefault(cid, []).append(mid)
                ex(_DELIV_DEL_BULK, [(cid, _dumps(mids)) for cid, mids in per_client.items()])
            else:
                ex("DELETE FROM deliveries WHERE client_id=? AND msg_id=?", d_del)
        if b.msg_del:
            if bulk and len(b.msg_del) >= _BULK_MIN:
                c.execute(_MSG_DEL_BULK, (_dumps(list(b.msg_del)),))
            else:
                ex("DELETE FROM messages WHERE msg_id=?", [(m,) for m in b.msg_del])
        if q_put:
            ex("INSERT OR IGNORE INTO incoming_qos2 VALUES(?,?)", q_put)
        if q_del:
            ex("DELETE FROM incoming_qos2 WHERE client_id=? AND packet_id=?", q_del)
        if r_put:
            ex("INSERT OR REPLACE INTO retained VALUES(?,?,?)", r_put)
        if r_del:
            ex("DELETE FROM retained WHERE topic=?", r_del)
        if w_put:
            ex("INSERT OR REPLACE INTO wills VALUES(?,?,?)", w_put)
        if w_del:
            ex("DELETE FROM wills WHERE client_id=?", w_del)
        if h_put:
            if bulk and len(h_put) >= _BULK_MIN:
                blob, meta = _pack_blobs(h_put, 4)
                c.execute(_HIST_INS_BULK, (blob, _dumps(meta)))
            else:
                ex("INSERT OR REPLACE INTO history VALUES(?,?,?,?,?)", h_put)
        if b.hist_del:
            if bulk and len(b.hist_del) >= _BULK_MIN:
                c.execute(_HIST_DEL_BULK, (_dumps(list(b.hist_del)),))
            else:
                ex("DELETE FROM history WHERE hist_id=?", [(h,) for h in b.hist_del])
        c.execute("COMMIT")
        return True
