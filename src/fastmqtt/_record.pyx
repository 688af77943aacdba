# cython: language_level=3
"""The SQLite store's change recorder: the mutators a PUBLISH to a persistent
session calls (``put_message``, ``add_delivery``, ``update_delivery``,
``remove_delivery``), the batch the colder mutators fill, and the decoder of
what the hot ones write.

The hot mutators run on the broker's trio thread for every stored message,
under the store's lock. They append each change as a few bytes to an *op
buffer* (see "Ops" below), which the flush hands to the log as it is; the
net effect (a delivery added and acknowledged again cancels out) is worked
out later, by :func:`decode_ops`, in the compactor and at recovery. Which
clients have a delivery of each message (a message one client has costs no
object: see the message index in :class:`Recorder`) and the released
messages kept for a re-delivery stay here (see :mod:`fastmqtt.store.sqlite`).
The colder mutators stay in Python, fill a :class:`Batch` (net effects keyed
by primary key) and take the same lock (:class:`Lock`, usable as ``with
store._lock:``).

Ops, little endian, back to back::

    1 MSG     u64 msg_id, f64 expires_at (NaN: none), u32 n, n bytes (stored PUBLISH)
    2 MSGDEL  u64 msg_id                   (its last delivery went)
    3 ADD     str client, u64 msg_id, u8 fresh, u64 seq, u8 qos, u16 packet_id,
              str8 state, u32 n (0xFFFFFFFF: none), n bytes extra (UTF-8)
    4 UPD     str client, u64 msg_id, u8 qos, u16 packet_id, str8 state
    5 DEL     str client, u64 msg_id
    6 CASCADE str client                   (delete_session: the client's
                                            earlier delivery changes go)
    7 MSGF    u64 msg_id, f64 expires_at, u8 qos | retain << 2, str topic,
              u32 n, n bytes payload   (a message without properties, as its
                                        fields; decoded into what MSG holds)

``str`` is a u16 length and UTF-8, ``str8`` a u8 length and ASCII. ``fresh``:
the client had no delivery of that message (else the add may replace a row
in the tables).

A message without properties (most chat messages) is recorded as MSGF, its
topic and payload copied as they are: :func:`decode_ops` writes its stored
form (an encoded PUBLISH) from them, in the compactor and at recovery, not
on the broker's event loop. Other messages are encoded when recorded (MSG).
"""

cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.math cimport NAN, isnan
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_trylock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)

#: Delivery change kinds (the first item of a batch's delivery entry).
DEF HELD_MIN = 64  # see _Held
DEF IX_GAP = 4096  # see Recorder's message index
DEF IX_SPARSE = 4096
DEF IX_MIN = 4096
DEF ADD = 0   # new row, not in the tables: an add followed by a remove cancels out
DEF ADDR = 1  # add over a row that may be in the tables (re-add): insert or replace
DEF UPD = 2   # update of a row in the tables
DEF DEL = 3   # delete of a row in the tables

DEF OP_MSG = 1
DEF OP_MSGDEL = 2
DEF OP_ADD = 3
DEF OP_UPD = 4
DEF OP_DEL = 5
DEF OP_CASCADE = 6
DEF OP_MSGF = 7

cdef class Lock:
    """A mutex for ``with lock:`` in Python that the recorder takes directly.
    Waiting for it releases the GIL. Released by the thread that took it.

    A pthread mutex rather than a Python lock: on Python 3.11 every acquire
    of a Python lock, even one that does not wait, reads the monotonic clock
    first (to compute a deadline it then does not use), and the recorder
    takes this lock for every change it records (perf: 0.1 µs per message
    on the online persistence benchmark went to that clock)."""

    cdef pthread_mutex_t mu

    def __cinit__(self):
        pthread_mutex_init(&self.mu, NULL)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mu)

    cdef inline void take(self):
        if pthread_mutex_trylock(&self.mu) != 0:
            with nogil:
                pthread_mutex_lock(&self.mu)

    cdef inline void give(self):
        pthread_mutex_unlock(&self.mu)

    def __enter__(self):
        self.take()
        return self

    def __exit__(self, *exc):
        self.give()
        return False


cdef class Batch:
    """Net effect of changes (see :mod:`fastmqtt.store.sqlite`): messages,
    deliveries, sessions, ... keyed by primary key. The colder mutators fill
    one per flush (``Publish`` objects for retained messages, wills and
    history, encoded at the flush); :func:`decode_ops` adds the hot ones
    (messages already in their stored form)."""

    cdef public long long ops
    cdef public long long dels     # DEL and MSGDEL ops decoded into it
    cdef public long long seq
    cdef public long long lsn
    cdef public set cascade
    cdef public dict sessions
    cdef public dict subs
    cdef public dict deliv
    cdef public dict qos2
    cdef public dict messages
    cdef public set msg_del
    cdef public set reput          # messages put over a row that may be in the tables
    cdef public dict retained
    cdef public dict wills
    cdef public dict hist_put
    cdef public set hist_del

    def __init__(self):
        self.ops = self.dels = self.seq = self.lsn = 0
        self.cascade = set()
        self.sessions = {}
        self.subs = {}
        self.deliv = {}
        self.qos2 = {}
        self.messages = {}
        self.msg_del = set()
        self.reput = set()
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


@cython.no_gc  # refers to strings, bytes, a set of strings and a properties dict: no cycle
@cython.final
cdef class _Msg:
    """A stored message, as the broker holds it (its fields, sharing the
    payload with the broker's own copy rather than keeping the encoded form),
    and the clients with a delivery of it: ``first`` (or None) and the
    ``others`` (a set, or None: most messages have one persistent receiver),
    ``refs`` of them. Encoded again only if it is stored again after its last
    delivery went (a re-delivery under the same id).

    A *ghost* (``stored`` false, no fields) stands for a message that
    deliveries name but that was never stored (reported when they were
    added): it only keeps their count, so its MSGDEL comes with the last."""
    cdef object topic, payload, props, expires_at
    cdef object first
    cdef set others
    cdef int qos
    cdef bint retain, stored
    cdef Py_ssize_t refs


cdef inline _Msg _new_msg(topic, payload, int qos, bint retain, props, expires_at):
    cdef _Msg m = _Msg.__new__(_Msg)
    m.topic = topic
    m.payload = payload
    m.qos = qos
    m.retain = retain
    m.props = props
    m.expires_at = expires_at
    m.first = None
    m.others = None
    m.stored = True
    m.refs = 0
    return m


cdef inline _Msg _ghost():
    cdef _Msg m = _Msg.__new__(_Msg)
    m.first = None
    m.others = None
    m.stored = False
    m.refs = 0
    return m


cdef inline bint _same(a, client_id) except -1:
    """``a`` (a client id, or None) is ``client_id``. The broker passes the
    same string object for a client every time: an identity test, mostly."""
    return a is client_id or (a is not None and a == client_id)


cdef inline bint _holds(_Msg m, client_id) except -1:
    """``client_id`` has a delivery of ``m``."""
    return _same(m.first, client_id) or (m.others is not None and client_id in m.others)


cdef inline int _hold(_Msg m, client_id) except -1:
    """``client_id`` (not holding ``m``) has a delivery of it now."""
    if m.first is None:
        m.first = client_id
    else:
        if m.others is None:
            m.others = set()
        m.others.add(client_id)
    m.refs += 1
    return 0


cdef inline int _unhold(_Msg m, client_id) except -1:
    """``client_id`` (holding ``m``) has no delivery of it any more."""
    if _same(m.first, client_id):
        m.first = None
    else:
        m.others.discard(client_id)
    m.refs -= 1
    return 0


cdef inline bint _entry_holds(entry, client_id) except -1:
    """``client_id`` has a delivery of the message whose index entry is
    ``entry`` (a _Msg, or a lite entry: the one client's id)."""
    if type(entry) is str:
        return _same(entry, client_id)
    return _holds(<_Msg>entry, client_id)


cdef inline int _take_over(_Msg m, old) except -1:
    """``m`` replaces the entry ``old`` (a _Msg, or a lite entry: the one
    client's id): its clients carry over."""
    if type(old) is str:
        m.first = old
        m.others = None
        m.refs = 1
    else:
        m.first = (<_Msg>old).first
        m.others = (<_Msg>old).others
        m.refs = (<_Msg>old).refs
    return 0


cdef inline _Msg _from_src(src):
    """A stored message's _Msg with the fields of ``src`` (the broker's
    message: topic, payload, qos, retain, props, expires_at), or without
    fields if None (then it cannot be stored again once released)."""
    if src is None:
        return _new_msg(None, None, 0, False, None, None)
    return _new_msg(src.topic, src.payload, src.qos, src.retain, src.props, src.expires_at)


@cython.final
cdef class _Held:
    """The message ids a client was given deliveries of, for delete_session:
    appended to as deliveries are added, never removed from as they go (a
    message's own ``first``/``others`` say whether the client still has it),
    filtered once it reaches ``limit`` entries (then twice what is left, at
    least HELD_MIN). An append per delivery, a decrement per
    acknowledgement; filtering, on average at most two lookups per
    delivery, is skipped while ``count`` (the messages the client holds)
    says every entry is one it holds, once (a client that keeps its
    messages, offline: the list only doubles its limit). delete_session
    visits only what the client was given. A client keeps at most about
    HELD_MIN ids it no longer has (some 2.5 KB) beyond twice those it has."""
    cdef list mids
    cdef Py_ssize_t limit
    cdef Py_ssize_t count


cdef inline _Held _new_held(list mids):
    cdef _Held h = _Held.__new__(_Held)
    h.mids = mids
    h.limit = max(HELD_MIN, 2 * len(mids))
    h.count = len(mids)  # each held (callers pass held ids, once each)
    return h


cdef class Recorder:
    """Base class of :class:`~fastmqtt.store.sqlite.SqliteStore`: its state of
    record and the hot mutators. The subclass provides ``_schedule()`` (called,
    lock held, by the first change of a batch), ``_unknown_message(msg_id)``
    (a delivery names a message the store does not have),
    ``_blob(kind, key, publish)`` (encodes a message that ``_encode`` could
    not, or logs why and returns None), ``_unstorable(kind, key, error)``
    (logs that a message cannot be stored) and sets ``_extra``
    (``delivery_extra``), ``_encode`` (``encode_publish``) and
    ``_encode_fields`` (the same from a message's fields)."""

    cdef public Lock _lock
    cdef public Batch _batch
    cdef public long long _seq     # last recorded change
    cdef public long long _first   # seq of the first change of the current batch
    cdef public long long _arm     # the change that schedules a flush (normally _first)
    cdef public long long _dseq    # delivery order base (after recovered ones)
    # The message index: msg_id -> _Msg (its fields and the clients with a
    # delivery of it) while stored or named by a delivery, or -> the
    # client's id (a *lite* entry: a message stored with its first delivery
    # and a ``src``, which that one client has; no object of its own, and
    # nothing kept once it is released: a later delivery brings its src
    # again). (Lite entries, paired against full entries for every message:
    # 1.027x offline, 1.052x online.)
    #
    # Message ids are given out in order, and most go in the order they
    # came, so the index is a window of slots, one per id from the oldest
    # still there (``_slots[i]`` holds id ``_base + i``, a new reference or
    # NULL; ids ``_base + _head`` up to ``_base + _n`` are in the window,
    # ``_slots[_head]`` is the oldest entry), and a dict, ``_spill``, for
    # the rest: ids below the window (stored again after a while, recovered
    # out of order, or moved out of a sparse window). Every id in
    # ``_spill`` is below ``_base + _head``. 8 bytes a slot instead of a
    # dict entry (its 24-byte entry and its index, in a table that doubles
    # and is copied as it grows). A window sparser than one live entry in 4
    # slots (from IX_SPARSE slots) gives its oldest entries to ``_spill``
    # as new ones come; an id more than IX_GAP (or the window's length)
    # past its end moves the window there. Nothing in it is walked by the
    # cyclic GC (entries refer to no container that could lead back).
    # ``_msgs`` is a dict copy, for tests.
    cdef PyObject** _slots
    cdef long long _base
    cdef Py_ssize_t _head, _n, _slots_cap, _live
    cdef dict _spill
    # client_id -> _Held (what delete_session releases), and the last one
    # looked up (the broker passes the same string for a client each time).
    cdef public dict _held
    cdef object _last_cid
    cdef _Held _last_held
    # Entries _still_held has looked at (tests: filtering is skipped while
    # a client holds everything it was given).
    cdef public long long _held_scanned
    # Messages whose last delivery went, msg_id -> _Msg, kept a
    # while for a re-delivery under the same id: two generations of plain
    # dicts; once the newer holds _released_kept, it becomes the older and
    # the older is dropped (between _released_kept and twice that are kept;
    # cheaper per message than an OrderedDict's eviction).
    cdef public dict _released
    cdef public dict _released_old
    cdef public Py_ssize_t _released_kept
    cdef public object _extra
    cdef public object _encode
    cdef public object _encode_fields
    cdef char* _buf                # ops of the current batch
    cdef Py_ssize_t _len, _cap

    def __cinit__(self, *args, **kwargs):
        self._lock = Lock()
        self._batch = Batch()
        self._seq = 0
        self._first = self._arm = 1
        self._dseq = 0
        self._slots = NULL
        self._base = 0
        self._head = self._n = self._slots_cap = self._live = 0
        self._spill = {}
        self._held = {}
        self._last_cid = None
        self._last_held = None
        self._released = {}
        self._released_old = {}
        self._released_kept = 10_000
        self._buf = NULL
        self._len = self._cap = 0

    def __dealloc__(self):
        free(self._buf)
        self._ix_clear()

    # ------------------------------------------------------- message index

    cdef void _ix_clear(self):
        cdef Py_ssize_t i
        for i in range(self._head, self._n):
            Py_XDECREF(self._slots[i])
        free(self._slots)
        self._slots = NULL
        self._base = 0
        self._head = self._n = self._slots_cap = self._live = 0

    cdef inline object _iget(self, mid):
        """The entry for ``mid``, or None."""
        cdef long long i = <long long>mid - self._base
        cdef PyObject* p
        if i >= self._head:
            if i < self._n:
                p = self._slots[i]
                if p != NULL:
                    return <object>p
            return None  # (every id in _spill is below the window)
        if self._spill:
            return self._spill.get(mid)
        return None

    cdef int _iset(self, mid, entry) except -1:
        """``mid``'s entry is ``entry`` (in place of any it had)."""
        cdef long long k = <long long>mid
        cdef long long i = k - self._base
        cdef PyObject* old
        if i < self._head:
            self._spill[mid] = entry
            return 0
        if i < self._n:
            old = self._slots[i]
            Py_INCREF(entry)
            self._slots[i] = <PyObject*>entry
            if old == NULL:
                self._live += 1
            else:
                Py_XDECREF(old)
            return 0
        # past the window's end
        if self._live == 0:
            self._head = self._n = 0  # start it at mid
            self._base = k
            if self._slots_cap > 16 * IX_MIN:
                self._resize(IX_MIN)
        elif i - self._n > max(<long long>IX_GAP, <long long>(self._n - self._head)):
            self._ix_spill_all()
            self._base = k
        i = k - self._base
        if i >= self._slots_cap:
            self._make_room(i + 1)
            i = k - self._base  # (_make_room may move the window down)
        if i > self._n:
            memset(&self._slots[self._n], 0, (i - self._n) * sizeof(PyObject*))
        Py_INCREF(entry)
        self._slots[i] = <PyObject*>entry
        self._n = i + 1
        self._live += 1
        if self._n - self._head > IX_SPARSE and self._live * 4 < self._n - self._head:
            self._ix_spill_oldest()
        return 0

    cdef int _idel(self, mid) except -1:
        """``mid``'s entry goes (KeyError if it has none)."""
        cdef long long i = <long long>mid - self._base
        cdef PyObject* old
        if self._head <= i < self._n and self._slots[i] != NULL:
            old = self._slots[i]
            self._slots[i] = NULL
            self._live -= 1
            if i == self._head:
                self._ix_advance()
            Py_XDECREF(old)
            return 0
        del self._spill[mid]
        return 0

    cdef inline void _ix_advance(self):
        """_head past empty slots (to _n if the window is empty)."""
        while self._head < self._n and self._slots[self._head] == NULL:
            self._head += 1

    cdef int _ix_spill_oldest(self) except -1:
        """The window's oldest entry goes to ``_spill`` (a sparse window)."""
        cdef PyObject* p = self._slots[self._head]
        self._spill[self._base + self._head] = <object>p
        self._slots[self._head] = NULL
        self._live -= 1
        Py_XDECREF(p)
        self._ix_advance()
        return 0

    cdef int _ix_spill_all(self) except -1:
        """Every entry in the window goes to ``_spill`` (an id far past it)."""
        while self._live:
            self._ix_spill_oldest()
        self._head = self._n = 0
        return 0

    cdef int _make_room(self, Py_ssize_t need) except -1:
        """Slots up to ``need`` (relative to _base): the window moved down
        to slot 0 if half of it is free, else more slots."""
        cdef Py_ssize_t used = self._n - self._head
        if self._head and self._head >= used:
            memmove(self._slots, &self._slots[self._head], used * sizeof(PyObject*))
            self._base += self._head
            need -= self._head
            self._n = used
            self._head = 0
            if need <= self._slots_cap:
                return 0
        cdef Py_ssize_t cap = max(<Py_ssize_t>IX_MIN, self._slots_cap + self._slots_cap // 2)
        while cap < need:
            cap += cap // 2
        return self._resize(cap)

    cdef int _resize(self, Py_ssize_t cap) except -1:
        cdef PyObject** grown = <PyObject**>realloc(self._slots, cap * sizeof(PyObject*))
        if grown == NULL:
            raise MemoryError()
        self._slots = grown
        self._slots_cap = cap
        return 0

    @property
    def _msgs(self) -> dict:
        """The message index as a dict {msg_id: entry} (a copy, for tests)."""
        cdef Py_ssize_t i
        out = dict(self._spill)
        for i in range(self._head, self._n):
            if self._slots[i] != NULL:
                out[self._base + i] = <object>self._slots[i]
        return out

    @property
    def index_sizes(self) -> tuple:
        """(slots in the window, entries in it, entries in the spill dict,
        slots allocated): tests of the index's memory."""
        return (self._n - self._head, self._live, len(self._spill), self._slots_cap)

    # ------------------------------------------------------------ op buffer

    cdef char* _room(self, Py_ssize_t n) except NULL:
        cdef Py_ssize_t cap
        cdef char* grown
        if self._len + n > self._cap:
            cap = self._cap * 2 if self._cap else 65536
            while cap < self._len + n:
                cap *= 2
            grown = <char*>realloc(self._buf, cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = cap
        cdef char* w = self._buf + self._len
        self._len += n
        return w

    cdef int _str(self, s, int width) except -1:
        cdef Py_ssize_t n
        cdef const char* u = PyUnicode_AsUTF8AndSize(s, &n)
        if <unsigned long long>n >= (<unsigned long long>1) << (8 * width):
            raise ValueError(f"{s[:40]!r}... is too long to store")
        cdef char* w = self._room(width + n)
        _put_uint(w, n, width)
        memcpy(w + width, u, n)
        return 0

    cdef int _op_msg(self, msg_id, bytes blob, exp) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(blob)
        cdef char* w = self._room(21 + n)
        w[0] = OP_MSG
        _put_uint(w + 1, msg_id, 8)
        _put_f64(w + 9, NAN if exp is None else <double>exp)
        _put_uint(w + 17, n, 4)
        memcpy(w + 21, PyBytes_AS_STRING(blob), n)
        return 0

    cdef int _op_msgf(self, msg_id, const char* t, Py_ssize_t tn, _Msg m) except -1:
        cdef Py_ssize_t pn = PyBytes_GET_SIZE(m.payload)
        cdef char* w = self._room(24 + tn + pn)
        w[0] = OP_MSGF
        _put_uint(w + 1, msg_id, 8)
        _put_f64(w + 9, NAN if m.expires_at is None else <double>m.expires_at)
        w[17] = <char>((m.qos & 3) | (4 if m.retain else 0))
        _put_uint(w + 18, tn, 2)
        memcpy(w + 20, t, tn)
        _put_uint(w + 20 + tn, pn, 4)
        memcpy(w + 24 + tn, PyBytes_AS_STRING(m.payload), pn)
        return 0

    cdef int _op_client(self, unsigned char op, client_id, msg_id) except -1:
        self._room(1)[0] = op
        self._str(client_id, 2)
        if msg_id is not None:
            _put_uint(self._room(8), msg_id, 8)
        return 0

    cdef int _op_state(self, qos, pid, state) except -1:
        cdef char* w = self._room(3)
        w[0] = <unsigned char>qos
        _put_uint(w + 1, pid, 2)
        self._str(state, 1)
        return 0

    def take_ops(self) -> bytes:
        """The ops recorded since the last call (lock held by the caller)."""
        out = PyBytes_FromStringAndSize(self._buf, self._len)
        self._len = 0
        if self._cap > (1 << 22):  # a burst grew it: give the memory back
            free(self._buf)
            self._buf = NULL
            self._cap = 0
        return out

    @property
    def ops_size(self) -> int:
        """Bytes of ops recorded since the last :meth:`take_ops`."""
        return self._len

    def _op_cascade(self, client_id) -> None:
        """delete_session's op (lock held): the client's earlier delivery
        changes in this batch go."""
        self._op_client(OP_CASCADE, client_id, None)

    def mark(self) -> int:
        """Ticket covering every change recorded so far (for ``durable``)."""
        return self._seq

    # ------------------------------------------------------------ mutators

    def put_message(self, msg_id, publish, expires_at) -> None:
        try:
            blob = self._encode(publish)
        except Exception:
            blob = self._blob("message", msg_id, publish)  # logs why
            if blob is None:
                return
        self._put(msg_id, blob, _new_msg(publish.topic, publish.payload, publish.qos,
                                         publish.retain, publish.properties, expires_at))

    def put_message_fields(self, msg_id, topic, payload, qos, retain, properties,
                           expires_at) -> None:
        """:meth:`put_message` of ``Publish(topic, payload, qos, retain, False,
        0, properties)`` without building it (the broker core's hot path)."""
        self._put_fields(msg_id, topic, payload, qos, retain, properties, expires_at)

    def put_message_add_delivery(self, msg_id, topic, payload, qos, retain, properties,
                                 expires_at, client_id, dqos, packet_id, state,
                                 dretain=False, subids=(), src=None) -> None:
        """:meth:`put_message_fields` then :meth:`add_delivery_fields` in one
        call: a message's first persistent receiver (the broker core's
        hottest path).

        ``src``: the broker's own object for the message, with these fields
        as attributes (``topic``, ``payload``, ``qos``, ``retain``, ``props``,
        ``expires_at``), which the caller passes again with each later
        delivery of it (:meth:`add_delivery_fields`). With it, a message
        that one client has a delivery of is kept as a *lite* entry (that
        client's id, nothing allocated); the fields are taken from ``src``
        when a second client gets it or it is stored again after its last
        delivery went."""
        cdef Py_ssize_t tn, pn, cn, sn
        cdef const char* t = NULL
        cdef const char* c
        cdef const char* st
        cdef char* w
        cdef int q, dq, pid
        cdef bint fresh
        cdef _Msg m
        # One pass, one lock, one _room for both ops when the message goes as
        # MSGF and the delivery has no extra; the rest as two calls. (Writing
        # the MSGF op with _op_msgf instead, a _room of its own: +290
        # instructions a call, callgrind.)
        if (not properties and not dretain and not subids and type(topic) is str
                and type(payload) is bytes and type(client_id) is str and type(state) is str):
            t = _utf8_or_null(topic, &tn)
        if t == NULL or not _msgf_topic(t, tn):
            self._put_fields(msg_id, topic, payload, qos, retain, properties, expires_at)
            self._add(client_id, msg_id, dqos, packet_id, state, dretain, subids, src)
            return
        q = qos
        dq = dqos
        pid = packet_id
        pn = PyBytes_GET_SIZE(payload)
        c = PyUnicode_AsUTF8AndSize(client_id, &cn)
        st = PyUnicode_AsUTF8AndSize(state, &sn)
        if (not 0 <= q <= 2 or not 0 <= dq <= 255 or not 0 <= pid <= 0xFFFF
                or pn >= 0x10000000 or cn >= 0x10000 or sn >= 0x100):
            self._put_fields(msg_id, topic, payload, qos, retain, properties, expires_at)
            self._add(client_id, msg_id, dqos, packet_id, state, dretain, subids, src)
            return
        self._lock.take()
        try:
            if src is not None and self._iget(msg_id) is None:
                # New: a lite entry (nothing was kept under that id).
                self._iset(msg_id, client_id)
                self._forget_released(msg_id)
                fresh = True
                self._note(client_id, msg_id)
            else:
                m = _new_msg(topic, payload, q, retain, properties, expires_at)
                self._keep(msg_id, m)
                fresh = not _holds(m, client_id)  # held already: stored again
                if fresh:
                    _hold(m, client_id)
                    self._note(client_id, msg_id)
            self._seq += 2
            # MSGF (see _op_msgf), then ADD as _add writes it (no extra)
            w = self._room(24 + tn + pn + 28 + cn + sn)
            w[0] = OP_MSGF
            _put_uint(w + 1, msg_id, 8)
            _put_f64(w + 9, NAN if expires_at is None else <double>expires_at)
            w[17] = <char>(q | (4 if retain else 0))
            _put_uint(w + 18, tn, 2)
            memcpy(w + 20, t, tn)
            _put_uint(w + 20 + tn, pn, 4)
            memcpy(w + 24 + tn, PyBytes_AS_STRING(payload), pn)
            w += 24 + tn + pn
            w[0] = OP_ADD
            _put_uint(w + 1, cn, 2)
            memcpy(w + 3, c, cn)
            w += 3 + cn
            _put_uint(w, msg_id, 8)
            w[8] = fresh
            _put_uint(w + 9, self._dseq + self._seq, 8)
            w[17] = <char>dq
            _put_uint(w + 18, pid, 2)
            w[20] = <char>sn
            memcpy(w + 21, st, sn)
            _put_uint(w + 21 + sn, 0xFFFFFFFF, 4)
            if self._seq - 1 <= self._arm <= self._seq:
                self._schedule()
        finally:
            self._lock.give()

    cdef int _put_fields(self, msg_id, topic, payload, qos, retain, properties,
                         expires_at) except -1:
        cdef Py_ssize_t tn
        cdef const char* t
        if (not properties and type(topic) is str and type(payload) is bytes
                and (qos == 0 or qos == 1 or qos == 2)):
            # Its fields as they are (MSGF): decode_ops encodes it, off the
            # loop. Only what the encoder takes: a non-empty topic name
            # without wildcards or U+0000, in UTF-8, that fits its u16
            # length; anything else is encoded here (and refused if bad).
            t = _utf8_or_null(topic, &tn)
            if t != NULL and _msgf_topic(t, tn) and PyBytes_GET_SIZE(payload) < 0x10000000:
                self._put_raw(msg_id, t, tn,
                              _new_msg(topic, payload, qos, retain, properties, expires_at))
                return 0
        # A message that cannot be encoded is logged and not stored (a
        # delivery naming it is then reported as for any unknown message).
        try:
            blob = self._encode_fields(topic, payload, qos, retain, properties)
        except Exception as e:
            self._unstorable("message", msg_id, e)
            return 0
        self._put(msg_id, blob, _new_msg(topic, payload, qos, retain, properties, expires_at))
        return 0

    cdef int _put(self, msg_id, bytes blob, _Msg m) except -1:
        self._lock.take()
        try:
            self._seq += 1
            self._keep(msg_id, m)
            self._op_msg(msg_id, blob, m.expires_at)
            if self._seq == self._arm:
                self._schedule()
        finally:
            self._lock.give()
        return 0

    cdef int _put_raw(self, msg_id, const char* topic, Py_ssize_t tn, _Msg m) except -1:
        """:meth:`_put` recording an MSGF op (the message's fields, ``topic``
        its UTF-8, checked for the encoder) rather than an MSG op."""
        self._lock.take()
        try:
            self._seq += 1
            self._keep(msg_id, m)
            self._op_msgf(msg_id, topic, tn, m)
            if self._seq == self._arm:
                self._schedule()
        finally:
            self._lock.give()
        return 0

    cdef inline int _keep(self, msg_id, _Msg m) except -1:
        """``m`` is the message stored under ``msg_id`` (lock held)."""
        old = self._iget(msg_id)
        if old is not None:
            # Stored again, or deliveries named it before it was stored (a
            # ghost): its deliveries carry over.
            if type(old) is str or (<_Msg>old).stored:
                # Its row may be in the tables: its delete goes first, so
                # decode_ops takes the put that follows as one over a row
                # (Batch.reput) and a later MSGDEL still removes the row
                # rather than just cancelling this put.
                self._op_msgdel(msg_id)
            _take_over(m, old)
            self._iset(msg_id, m)
        else:
            self._iset(msg_id, m)
            self._forget_released(msg_id)
        return 0

    cdef inline int _forget_released(self, msg_id) except -1:
        """``msg_id`` is stored anew: not kept as released any more."""
        if self._released:
            self._released.pop(msg_id, None)
        if self._released_old:
            self._released_old.pop(msg_id, None)
        return 0

    def add_delivery(self, client_id, delivery) -> None:
        self._add(client_id, delivery.msg_id, delivery.qos, delivery.packet_id, delivery.state,
                  delivery.retain, delivery.subids, None)

    def add_delivery_fields(self, client_id, msg_id, qos, packet_id, state, retain=False,
                            subids=(), src=None) -> None:
        """:meth:`add_delivery` with the record's fields as arguments (the
        broker core's hot path: no DeliveryRecord to build). ``src``: see
        :meth:`put_message_add_delivery`."""
        self._add(client_id, msg_id, qos, packet_id, state, retain, subids, src)

    def update_delivery_fields(self, client_id, msg_id, qos, packet_id, state) -> None:
        """:meth:`update_delivery` with the record's fields as arguments."""
        self._update(client_id, msg_id, qos, packet_id, state)

    cdef int _add(self, client_id, mid, qos, pid, state, retain, subids, src) except -1:
        cdef char* w
        cdef bint fresh
        extra = self._extra(retain, subids) if retain or subids else None
        self._lock.take()
        try:
            self._seq += 1
            m = self._iget(mid)
            if m is None:
                m = self._revive(mid, src)
                fresh = True
            elif type(m) is str:  # lite
                fresh = not _same(m, client_id)  # else a re-add
                if fresh:  # a second client: a full entry from here on
                    m = self._full(mid, m, src)
            else:  # else a re-add: a row may be in the tables
                fresh = not _holds(<_Msg>m, client_id)
                if fresh and not (<_Msg>m).stored:
                    self._unknown_message(mid)
            if fresh:
                _hold(<_Msg>m, client_id)
                self._note(client_id, mid)
            self._op_client(OP_ADD, client_id, mid)
            w = self._room(9)
            w[0] = fresh
            # Queue order: the change's seq, after everything recovered.
            _put_uint(w + 1, self._dseq + self._seq, 8)
            self._op_state(qos, pid, state)
            if extra is None:
                _put_uint(self._room(4), 0xFFFFFFFF, 4)
            else:
                self._str(extra, 4)
            if self._seq == self._arm:
                self._schedule()
        finally:
            self._lock.give()
        return 0

    def update_delivery(self, client_id, delivery) -> None:
        self._update(client_id, delivery.msg_id, delivery.qos, delivery.packet_id,
                     delivery.state)

    cdef int _update(self, client_id, mid, qos, pid, state) except -1:
        self._lock.take()
        try:
            self._seq += 1
            m = self._iget(mid)
            if m is not None and _entry_holds(m, client_id):
                self._op_client(OP_UPD, client_id, mid)
                self._op_state(qos, pid, state)
            # else: unknown delivery, nothing to update
            if self._seq == self._arm:
                self._schedule()
        finally:
            self._lock.give()
        return 0

    def remove_delivery(self, client_id, msg_id) -> None:
        self._lock.take()
        try:
            self._seq += 1
            m = self._iget(msg_id)
            if m is not None and _entry_holds(m, client_id):
                self._unnote(client_id)
                self._op_client(OP_DEL, client_id, msg_id)
                self._let_go(msg_id, m, client_id)
            if self._seq == self._arm:
                self._schedule()
        finally:
            self._lock.give()

    @cython.final
    cdef inline _Held _held_of(self, client_id, bint create):
        """``client_id``'s _Held (made if ``create``, else None if it has
        none), through the last-client cache."""
        if client_id is self._last_cid:
            return self._last_held
        h = self._held.get(client_id)
        if h is None:
            if not create:
                return None
            h = self._held[client_id] = _new_held([])
        self._last_cid = client_id
        self._last_held = <_Held>h
        return <_Held>h

    cdef int _note(self, client_id, mid) except -1:
        """``client_id`` was given a delivery of ``mid`` (see _Held)."""
        cdef _Held h = self._held_of(client_id, True)
        h.mids.append(mid)
        h.count += 1
        if len(h.mids) >= h.limit:
            if h.count != len(h.mids):  # else nothing to drop
                h.mids = self._still_held(client_id, h.mids)
            h.limit = max(HELD_MIN, 2 * len(h.mids))
        return 0

    cdef inline int _unnote(self, client_id) except -1:
        """``client_id`` no longer has a delivery it had (see _Held)."""
        cdef _Held h = self._held_of(client_id, False)
        if h is not None:
            h.count -= 1
        return 0

    cdef list _still_held(self, client_id, list mids):
        """``mids`` that ``client_id`` still has a delivery of, once each."""
        cdef list out = []
        cdef set seen = set()
        self._held_scanned += len(mids)
        for mid in mids:
            m = self._iget(mid)
            if m is not None and mid not in seen and _entry_holds(m, client_id):
                seen.add(mid)
                out.append(mid)
        return out

    def _drop_client(self, client_id) -> None:
        """``client_id`` has no delivery any more (``delete_session``, lock
        held, its CASCADE op recorded): messages whose last delivery that was
        go."""
        self._last_cid = None
        self._last_held = None
        h = self._held.pop(client_id, None)
        if h is None:
            return
        for mid in self._still_held(client_id, (<_Held>h).mids):
            self._let_go(mid, self._iget(mid), client_id)

    @property
    def held_sizes(self) -> dict:
        """{client_id: entries in its _Held list} (tests: memory stays bounded)."""
        return {c: len((<_Held>h).mids) for c, h in self._held.items()}

    cdef int _release(self, msg_id, _Msg m) except -1:
        """``m``'s last delivery went: its row goes (MSGDEL), and a stored
        message is kept a while for a re-delivery under its id."""
        self._idel(msg_id)
        if m.stored and m.topic is not None:  # (else it cannot be stored again)
            released = self._released
            released[msg_id] = m
            if len(released) >= self._released_kept:
                self._released_old = released
                self._released = {}
        return self._op_msgdel(msg_id)

    cdef inline int _let_go(self, msg_id, entry, client_id) except -1:
        """``client_id``, which had a delivery of ``msg_id`` (its index
        entry), has none now: the message is released if that was its last.
        A lite entry's row goes with its one delivery (nothing is kept for a
        re-delivery: that one brings its ``src`` again)."""
        if type(entry) is str:
            self._idel(msg_id)
            return self._op_msgdel(msg_id)
        _unhold(<_Msg>entry, client_id)
        if (<_Msg>entry).refs == 0:
            self._release(msg_id, <_Msg>entry)
        return 0

    cdef int _op_msgdel(self, msg_id) except -1:
        cdef char* w = self._room(9)
        w[0] = OP_MSGDEL
        _put_uint(w + 1, msg_id, 8)
        return 0

    cdef _Msg _full(self, msg_id, str client, src):
        """The full entry for a lite one (``client``'s), with ``src``'s
        fields (without them if None: then it cannot be stored again once
        released), in its place in the index."""
        cdef _Msg m = _from_src(src)
        _take_over(m, client)
        self._iset(msg_id, m)
        return m

    cdef _Msg _revive(self, msg_id, src):
        """A delivery names a message not in the index: store it again if its
        row was dropped a while ago (its last delivery went; its _Msg is
        still kept) or the delivery brings it (``src``), else report it and
        put a ghost in its place (lock held)."""
        m = self._released.pop(msg_id, None)
        if m is None and self._released_old:
            m = self._released_old.pop(msg_id, None)
        if m is None and src is not None:
            m = _from_src(src)  # the caller's message: stored again from it
        if m is not None:
            blob = self._stored_form(msg_id, <_Msg>m)
            if blob is not None:
                self._op_msg(msg_id, blob, (<_Msg>m).expires_at)
                self._iset(msg_id, m)
                return <_Msg>m
            # cannot be encoded (logged): not stored
        else:
            self._unknown_message(msg_id)
        m = _ghost()
        self._iset(msg_id, m)
        return <_Msg>m

    cdef object _stored_form(self, msg_id, _Msg m):
        """``m`` encoded again (a released message stored anew), or None
        (logged)."""
        try:
            return self._encode_fields(m.topic, m.payload, m.qos, m.retain, m.props)
        except Exception as e:
            self._unstorable("message", msg_id, e)
            return None

    def _restore(self, dict messages, dict client_msgs) -> None:
        """After recovery: ``messages`` {msg_id: (Publish, expires_at)},
        ``client_msgs`` {client_id: msg_ids delivered}."""
        cdef dict msgs = {mid: _new_msg(p.topic, p.payload, p.qos, p.retain, p.properties, exp)
                          for mid, (p, exp) in messages.items()}
        cdef _Held h
        self._held = {}
        self._last_cid = None
        self._last_held = None
        for cid, mids in client_msgs.items():
            h = self._held[cid] = _new_held(list(set(mids)))  # all held, once
            for mid in h.mids:
                m = msgs.get(mid)
                if m is None:
                    m = msgs[mid] = _ghost()
                _hold(<_Msg>m, cid)
        self._ix_clear()
        self._spill = {}
        for mid in sorted(msgs):
            self._iset(mid, msgs[mid])
        self._released.clear()
        self._released_old.clear()


cdef extern from "Python.h":
    # Without Cython's exception check: NULL (error cleared by the caller).
    const char* _PyUnicode_AsUTF8AndSize_raw "PyUnicode_AsUTF8AndSize" (object, Py_ssize_t*)
    void PyErr_Clear()


cdef inline const char* _utf8_or_null(s, Py_ssize_t* n):
    """``s``'s UTF-8, or NULL if it has none (a lone surrogate), no exception
    raised (a try block costs the hot path more than this)."""
    cdef const char* u = _PyUnicode_AsUTF8AndSize_raw(s, n)
    if u == NULL:
        PyErr_Clear()
    return u


cdef inline bint _msgf_topic(const char* t, Py_ssize_t n):
    """A topic name the stored form's encoder takes (UTF-8 ``t``): not empty,
    fits its u16 length, no wildcard, no U+0000."""
    cdef Py_ssize_t i
    cdef char ch
    if not 0 < n < 0x10000:
        return False
    for i in range(n):
        ch = t[i]
        if ch == b'+' or ch == b'#' or ch == 0:
            return False
    return True


cdef inline void _put_uint(char* w, unsigned long long v, int width):
    cdef int i
    for i in range(width):
        w[i] = <char>(v & 0xFF)
        v >>= 8


cdef inline void _put_f64(char* w, double v):
    memcpy(w, &v, 8)  # IEEE 754, little endian on every platform CPython runs on


cdef inline unsigned long long _get_uint(const unsigned char* r, int width):
    cdef unsigned long long v = 0
    cdef int i
    for i in range(width - 1, -1, -1):
        v = (v << 8) | r[i]
    return v


cdef class _Cursor:
    cdef const unsigned char* p
    cdef Py_ssize_t off, end

    cdef const unsigned char* take(self, Py_ssize_t n) except NULL:
        if n < 0 or self.off + n > self.end:
            raise ValueError(f"ops cut short at byte {self.off}")
        cdef const unsigned char* r = self.p + self.off
        self.off += n
        return r

    cdef unsigned long long uint(self, int width) except? 0xFFFFFFFFFFFFFFFF:
        return _get_uint(self.take(width), width)

    cdef str text(self, int width):
        cdef Py_ssize_t n = <Py_ssize_t>self.uint(width)
        return PyUnicode_DecodeUTF8(<const char*>self.take(n), n, NULL)


cdef dict _STATES = {}


def decode_ops(const unsigned char[::1] data, Batch b) -> None:
    """Apply recorded ops (see the module docstring) to batch ``b``, after
    whatever it holds, keeping it the net effect: a delivery added and
    removed again, or a message put and released again, cancels out.

    Raises:
        ValueError: the ops are damaged.
    """
    cdef _Cursor c = _Cursor()
    cdef unsigned char op
    cdef unsigned char flags
    cdef dict dl = None  # the last client's delivery changes (ops come in runs)
    cdef const unsigned char* cid_raw = NULL
    cdef Py_ssize_t cid_n = -1
    cdef const unsigned char* r
    cdef list e
    cdef double exp
    cdef Py_ssize_t n, tn
    cdef const unsigned char* t
    cdef int kind
    if data.shape[0] == 0:
        return
    c.p = &data[0]
    c.off = 0
    c.end = data.shape[0]
    while c.off < c.end:
        op = c.take(1)[0]
        if op == OP_MSG:
            mid = c.uint(8)
            memcpy(&exp, c.take(8), 8)
            n = <Py_ssize_t>c.uint(4)
            # bytearray: the sqlite3 module binds it without its adapter
            # lookup (see _apply_tables); the stored form is read as any bytes.
            blob = PyByteArray_FromStringAndSize(<const char*>c.take(n), n)
            b.messages[mid] = (blob, None if isnan(exp) else exp)
            if b.msg_del and mid in b.msg_del:
                b.msg_del.discard(mid)  # the insert replaces the row
                b.reput.add(mid)
        elif op == OP_MSGF:
            mid = c.uint(8)
            memcpy(&exp, c.take(8), 8)
            flags = c.take(1)[0]
            if flags & 3 == 3 or flags > 7:
                raise ValueError(f"bad message flags {flags} at byte {c.off - 1}")
            tn = <Py_ssize_t>c.uint(2)
            t = c.take(tn)
            n = <Py_ssize_t>c.uint(4)
            # Its stored form at once, in one allocation: cheaper than the
            # topic, payload and tuple it used to be decoded into (and then
            # encoded from, for the messages left once the ops are net).
            b.messages[mid] = (_stored_msgf(t, tn, c.take(n), n, flags),
                               None if isnan(exp) else exp)
            if b.msg_del and mid in b.msg_del:
                b.msg_del.discard(mid)  # the insert replaces the row
                b.reput.add(mid)
        elif op == OP_MSGDEL:
            mid = c.uint(8)
            b.dels += 1
            # A message put in this batch cancels out, unless the put was
            # over a row (released earlier, then stored again): that row goes.
            if b.messages.pop(mid, None) is None or (b.reput and mid in b.reput):
                b.msg_del.add(mid)
        elif op == OP_CASCADE:
            b.deliv.pop(c.text(2), None)
            dl = None
        elif op == OP_ADD or op == OP_UPD or op == OP_DEL:
            n = <Py_ssize_t>c.uint(2)
            r = c.take(n)
            if dl is None or n != cid_n or memcmp(r, cid_raw, n) != 0:
                dl = _deliveries(b, PyUnicode_DecodeUTF8(<const char*>r, n, NULL))
                cid_raw = r
                cid_n = n
            mid = c.uint(8)
            old = dl.get(mid)
            if op == OP_ADD:
                fresh = c.take(1)[0]
                seq = c.uint(8)
                qos = c.take(1)[0]
                pid = c.uint(2)
                state = _state(c)
                n = <Py_ssize_t>c.uint(4)
                if n == 0xFFFFFFFF:
                    extra = None
                else:
                    extra = PyUnicode_DecodeUTF8(<const char*>c.take(n), n, NULL)
                kind = ADD if fresh and (old is None or (<list>old)[0] == ADD) else ADDR
                dl[mid] = [kind, seq, qos, pid, state, extra]
            elif op == OP_UPD:
                qos = c.take(1)[0]
                pid = c.uint(2)
                state = _state(c)
                if old is not None and (<list>old)[0] != DEL:
                    e = <list>old
                    e[2] = qos
                    e[3] = pid
                    e[4] = state
                else:
                    dl[mid] = [UPD, 0, qos, pid, state]
            else:
                b.dels += 1
                if old is not None and (<list>old)[0] == ADD:
                    del dl[mid]  # added and acknowledged before reaching the tables
                else:
                    dl[mid] = [DEL]
        else:
            raise ValueError(f"unknown op {op} at byte {c.off - 1}")


DEF REMAINING_MAX = 268435455  # the largest Remaining Length (MQTT 2.1.4)


cdef object _stored_msgf(const unsigned char* t, Py_ssize_t tn, const unsigned char* p,
                         Py_ssize_t pn, int flags):
    """The stored form (a bytearray) of an MSGF op's message: what
    ``encode_stored_fields(topic, payload, qos, retain)`` makes (the flag
    byte, then the MQTT 5 PUBLISH: fixed header, topic, packet id 1 for QoS
    1 and 2 with flag 1 saying it has none, an empty property list, the
    payload), written from the op's bytes. The recorder wrote MSGF only for
    a topic that encoder takes (see _msgf_topic); the tests hold the two to
    the same bytes."""
    cdef int qos = flags & 3
    cdef Py_ssize_t body = 2 + tn + (2 if qos else 0) + 1 + pn  # the Remaining Length
    cdef Py_ssize_t rl = body
    if rl > REMAINING_MAX:
        raise ValueError(f"a message of {pn} bytes is too large to store")
    cdef unsigned char head[8]
    cdef Py_ssize_t h = 2
    head[0] = 1 if qos else 0
    head[1] = 0x30 | (qos << 1) | (1 if flags & 4 else 0)
    while True:  # Remaining Length, variable byte integer (MQTT 1.5.5)
        head[h] = rl & 0x7F
        rl >>= 7
        if rl:
            head[h] |= 0x80
            h += 1
        else:
            h += 1
            break
    out = PyByteArray_FromStringAndSize(NULL, h + body)
    cdef unsigned char* w = <unsigned char*>PyByteArray_AS_STRING(out)
    memcpy(w, head, h)
    w += h
    w[0] = <unsigned char>(tn >> 8)
    w[1] = <unsigned char>(tn & 0xFF)
    memcpy(w + 2, t, tn)
    w += 2 + tn
    if qos:
        w[0] = 0
        w[1] = 1
        w += 2
    w[0] = 0  # no properties
    memcpy(w + 1, p, pn)
    return out


def message_rows(dict messages, list flat, list timed) -> None:
    """The rows of a batch's messages, for the compactor's INSERTs: each
    message without an expiry as ``msg_id, stored form`` appended to
    ``flat``, the others as ``(msg_id, stored form, expires_at)`` to
    ``timed``."""
    for mid, v in messages.items():
        data = (<tuple>v)[0]
        exp = (<tuple>v)[1]
        if exp is None:
            flat.append(mid)
            flat.append(data)
        else:
            timed.append((mid, data, exp))


def delivery_rows(client_id, dict changes, list flat, list shared,
                  Py_ssize_t min_shared) -> int:
    """The rows to insert for one client's delivery changes (``changes``,
    as :func:`decode_ops` leaves them), for the compactor.

    Adds without extra data (no RETAIN flag, no subscription ids): those
    with the first one's ``(qos, packet_id, state)`` (an offline queue's:
    all of them), when there are at least ``min_shared``, go to ``shared``
    as one ``(client_id, qos, packet_id, state, [msg_id, seq, ...])``: one
    statement binds the four once for every row. The rest go to ``flat`` as
    ``client_id, msg_id, seq, qos, packet_id, state``.

    Returns how many changes are left for the caller: adds with extra
    data, updates and deletes."""
    cdef list e
    cdef list common = []
    cdef Py_ssize_t rest = 0, i
    cdef object qos = None, pid = None, state = None
    cdef bint first = True
    for mid, v in changes.items():
        e = <list>v
        if (<int>e[0]) > ADDR or e[5] is not None:
            rest += 1
            continue
        if first:
            qos, pid, state = e[2], e[3], e[4]
            first = False
        elif not (e[2] == qos and e[3] == pid and e[4] == state):
            flat += (client_id, mid, e[1], e[2], e[3], e[4])
            continue
        common.append(mid)
        common.append(e[1])
    if len(common) >= 2 * min_shared:
        shared.append((client_id, qos, pid, state, common))
    else:
        for i in range(0, len(common), 2):
            flat += (client_id, common[i], common[i + 1], qos, pid, state)
    return rest


cdef str _state(_Cursor c):
    cdef Py_ssize_t n = <Py_ssize_t>c.uint(1)
    cdef const unsigned char* r = c.take(n)
    # The broker's three states without building anything.
    if n == 6 and memcmp(r, b"queued", 6) == 0:
        return "queued"
    if n == 4 and memcmp(r, b"sent", 4) == 0:
        return "sent"
    if n == 8 and memcmp(r, b"released", 8) == 0:
        return "released"
    key = PyBytes_FromStringAndSize(<const char*>r, n)
    s = _STATES.get(key)
    if s is None:
        s = key.decode("ascii")
        if len(_STATES) < 64:
            _STATES[key] = s
    return s
