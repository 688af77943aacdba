# cython: language_level=3
"""The SQLite store's change recorder: the batch it fills and the mutators a
PUBLISH to a persistent session calls (``put_message``, ``add_delivery``,
``update_delivery``, ``remove_delivery``).

These run on the broker's trio thread for every stored message, under the
store's lock; written in Python they cost the broker about as much as routing
the message did. The logic is exactly that described in
:mod:`fastmqtt.store.sqlite` (net effects keyed by primary key, reference
counts per message, released messages kept for a re-delivery); only the
interpreter overhead is gone. The colder mutators stay in Python and take the
same lock (:class:`Lock`, usable as ``with store._lock:``).
"""

from collections import OrderedDict

from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)

#: Delivery change kinds (the first item of a batch's delivery entry).
DEF ADD = 0   # new row, not in the tables: an add followed by a remove cancels out
DEF ADDR = 1  # add over a row that may be in the tables (re-add): insert or replace
DEF UPD = 2   # update of a row in the tables
DEF DEL = 3   # delete of a row in the tables


cdef class Lock:
    """A mutex for ``with lock:`` in Python that the recorder takes directly.
    Waiting for it releases the GIL."""

    cdef PyThread_type_lock lk

    def __cinit__(self):
        self.lk = PyThread_allocate_lock()
        if self.lk == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.lk != NULL:
            PyThread_free_lock(self.lk)

    cdef inline void take(self):
        if not PyThread_acquire_lock(self.lk, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.lk, WAIT_LOCK)

    cdef inline void give(self):
        PyThread_release_lock(self.lk)

    def __enter__(self):
        self.take()
        return self

    def __exit__(self, *exc):
        self.give()
        return False


cdef class Batch:
    """Net effect of the changes recorded since the last swap (see
    :mod:`fastmqtt.store.sqlite`): messages, deliveries, sessions, ... keyed
    by primary key. Mutators fill it with ``Publish`` objects; the log record
    holds their stored form (blobs) instead."""

    cdef public long long ops
    cdef public long long seq
    cdef public long long lsn
    cdef public set cascade
    cdef public dict sessions
    cdef public dict subs
    cdef public dict deliv
    cdef public dict qos2
    cdef public dict messages
    cdef public set msg_del
    cdef public dict retained
    cdef public dict wills
    cdef public dict hist_put
    cdef public set hist_del

    def __init__(self):
        self.ops = self.seq = self.lsn = 0
        self.cascade = set()
        self.sessions = {}
        self.subs = {}
        self.deliv = {}
        self.qos2 = {}
        self.messages = {}
        self.msg_del = set()
        self.retained = {}
        self.wills = {}
        self.hist_put = {}
        self.hist_del = set()

    def empty(self) -> bool:
        """Nothing to write (everything recorded cancelled out)."""
        return not (self.cascade or self.sessions or self.messages or self.msg_del
                    or self.retained or self.wills or self.hist_put or self.hist_del
                    or any(self.deliv.values()) or any(self.subs.values())
                    or any(self.qos2.values()))


cdef inline dict _deliveries(Batch b, client_id):
    """The batch's delivery changes of one client (created empty)."""
    cdef dict dl = b.deliv.get(client_id)
    if dl is None:
        dl = b.deliv[client_id] = {}
    return dl


cdef class Recorder:
    """Base class of :class:`~fastmqtt.store.sqlite.SqliteStore`: its state of
    record and the hot mutators. The subclass provides ``_schedule()`` (called,
    lock held, by the first change of a batch), ``_unknown_message(msg_id)``
    (a delivery names a message the store does not have) and sets
    ``_extra`` (``delivery_extra``)."""

    cdef public Lock _lock
    cdef public Batch _batch
    cdef public long long _seq     # last recorded change
    cdef public long long _first   # seq of the first change of the current batch
    cdef public long long _dseq    # delivery order base (after recovered ones)
    cdef public dict _refs         # msg_id -> deliveries referring to it
    cdef public dict _client_msgs  # client_id -> set of msg_ids delivered
    cdef public dict _msgs         # msg_id -> (Publish, expires_at) while stored
    cdef public object _released   # OrderedDict msg_id -> entry, newest last
    cdef public Py_ssize_t _released_kept
    cdef public object _extra
    # Changes in the current batch that put a message in flight to a
    # connected subscriber (state "sent"): its PUBACK may cancel them out.
    cdef public long long _sent
    # Deliveries added and acknowledged within the current batch (cancelled).
    cdef public long long _cancelled

    def __cinit__(self, *args, **kwargs):
        self._lock = Lock()
        self._batch = Batch()
        self._seq = 0
        self._first = 1
        self._dseq = 0
        self._refs = {}
        self._client_msgs = {}
        self._msgs = {}
        self._released = OrderedDict()
        self._released_kept = 10_000

    def put_message(self, msg_id, publish, expires_at) -> None:
        cdef Batch b
        entry = (publish, expires_at)
        self._lock.take()
        try:
            self._seq += 1
            b = self._batch
            b.messages[msg_id] = entry
            self._msgs[msg_id] = entry
            if b.msg_del:
                b.msg_del.discard(msg_id)
            if self._released:
                self._released.pop(msg_id, None)
            if self._seq == self._first:
                self._schedule()
        finally:
            self._lock.give()

    def add_delivery(self, client_id, delivery) -> None:
        cdef Batch b
        cdef int kind
        cdef dict dl
        cdef set ms
        mid = delivery.msg_id
        qos = delivery.qos
        pid = delivery.packet_id
        state = delivery.state
        retain = delivery.retain
        subids = delivery.subids
        extra = self._extra(retain, subids) if retain or subids else None
        self._lock.take()
        try:
            self._seq += 1
            b = self._batch
            ms = self._client_msgs.get(client_id)
            if ms is None:
                ms = self._client_msgs[client_id] = set()
            dl = _deliveries(b, client_id)
            if mid in ms:  # re-add: a row may be on disk
                kind = ADDR
            else:
                ms.add(mid)
                n = self._refs.get(mid, 0)
                if not n and mid not in self._msgs:
                    self._revive(b, mid)
                self._refs[mid] = n + 1
                old = dl.get(mid)
                kind = ADD if old is None or (<list>old)[0] == ADD else ADDR
            # Queue order: the change's seq, after everything recovered.
            dl[mid] = [kind, self._dseq + self._seq, qos, pid, state, extra]
            if state == "sent":
                self._sent += 1
            if self._seq == self._first:
                self._schedule()
        finally:
            self._lock.give()

    def update_delivery(self, client_id, delivery) -> None:
        cdef Batch b
        cdef dict dl
        cdef list e
        mid = delivery.msg_id
        qos = delivery.qos
        pid = delivery.packet_id
        state = delivery.state
        self._lock.take()
        try:
            self._seq += 1
            b = self._batch
            ms = self._client_msgs.get(client_id)
            if ms is not None and mid in <set>ms:
                dl = _deliveries(b, client_id)
                e = dl.get(mid)
                if e is not None and e[0] != DEL:
                    e[2] = qos
                    e[3] = pid
                    e[4] = state
                else:
                    dl[mid] = [UPD, 0, qos, pid, state]
                if state == "sent":
                    self._sent += 1
            # else: unknown delivery, nothing to update
            if self._seq == self._first:
                self._schedule()
        finally:
            self._lock.give()

    def remove_delivery(self, client_id, msg_id) -> None:
        cdef Batch b
        cdef dict dl
        cdef list e
        self._lock.take()
        try:
            self._seq += 1
            b = self._batch
            ms = self._client_msgs.get(client_id)
            if ms is not None and msg_id in <set>ms:
                (<set>ms).discard(msg_id)
                dl = _deliveries(b, client_id)
                e = dl.get(msg_id)
                if e is not None and e[0] == ADD:
                    del dl[msg_id]  # added and acknowledged within one batch
                    self._cancelled += 1
                else:
                    dl[msg_id] = [DEL]
                self._decref(b, msg_id)
            if self._seq == self._first:
                self._schedule()
        finally:
            self._lock.give()

    def _decref(self, Batch b, msg_id) -> None:
        """One delivery of ``msg_id`` fewer; the row goes with the last one
        (lock held)."""
        n = self._refs.get(msg_id, 1) - 1
        if n > 0:
            self._refs[msg_id] = n
            return
        self._refs.pop(msg_id, None)
        entry = self._msgs.pop(msg_id, None)
        if entry is not None:
            released = self._released
            released[msg_id] = entry
            if len(released) > self._released_kept:
                released.popitem(last=False)
        if b.messages.pop(msg_id, None) is None:
            b.msg_del.add(msg_id)

    def _revive(self, Batch b, msg_id) -> None:
        """A delivery names a message whose row was dropped (its last delivery
        went): store it again if it is still known, else report it (lock
        held)."""
        entry = self._released.pop(msg_id, None)
        if entry is not None:
            self._msgs[msg_id] = entry
            b.messages[msg_id] = entry
            b.msg_del.discard(msg_id)
        else:
            self._unknown_message(msg_id)


def encode_messages(dict messages, encode, blob) -> dict:
    """``{msg_id: (Publish, expires_at)}`` -> ``{msg_id: (blob, expires_at)}``
    with ``encode(publish)``; a message that cannot be encoded goes through
    ``blob("message", msg_id, publish)`` (which logs why and may return None:
    left out)."""
    cdef dict out = {}
    cdef tuple v
    for mid, v in messages.items():
        p = v[0]
        try:
            out[mid] = (encode(p), v[1])
        except Exception:
            data = blob("message", mid, p)
            if data is not None:  # pragma: no cover - it failed just now
                out[mid] = (data, v[1])
    return out
