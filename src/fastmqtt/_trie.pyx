# cython: language_level=3
"""Compiled topic trie and retained store (API: ``_trie.pyi``; reference: ``_trie_py``).

Theory of operation
-------------------
Everything lives in C structs allocated with PyMem; there is no Python object
per node or per subscription, because memory per subscription is what limits
a chat broker with a million of them, and pointer-chasing is what limits
matching.

*Nodes.* One ``Node`` per topic-filter level: a 37-byte header, then the
level's UTF-8 bytes inline (a UUID level fits pymalloc's 80-byte class).
Children, the ``+`` and ``#`` children included, are in ``table``: a plain
array while there are at most ``LINEAR_MAX``, then an open-addressing hash
table (linear probing, backward-shift deletion, load <= 1/2). Hashes are not
stored; they are recomputed from the key when a table is rebuilt. Flag bits
on the parent say whether a ``+``/``#`` child or shared groups exist, so
matching looks those up only when they are there. Nodes that become empty are
freed at once, walking back up the parents, so memory follows the live
subscriptions.

*Subscribers.* A subscriber (any hashable) is interned to a small integer
``sid`` through an open-addressing table of sids keyed by the object's hash
(plus a one-entry identity cache, since a SUBSCRIBE carries several filters of
one client). One 32-byte ``Sub`` record per sid (the array is cache-line aligned, so
a record is one line) holds the object, the match scratch (generation stamp,
accumulator slot) and the subscriber's ``Ref`` list (node, index of its entry
there; its capacity class shares a word with the stamp). Each node holds an ``Entry`` array (sid,
subscription identifier, options and the index of the matching Ref in one
word). Entry and Ref point at each other, so removing a subscription is O(1)
once found. unsubscribe() finds the filter among a client's few Refs by
checking each Ref's node path upward (their nodes load together), instead of
a walk from the root that costs a dependent cache miss per level; a client
with many subscriptions walks, then scans whichever of the node's entries or
its refs is shorter. That is 24 bytes per subscription plus array
slack (arrays grow ~1.25x and fill their allocator size class).

*Cache misses* are what a million subscriptions cost, so the code overlaps
them: the subscriber lookup is started (prefetch) before parsing and walking
and finished after; match() prefetches every reached subscriber record, then
every subscriber object, a whole batch at a time. User ``__eq__`` can run
during a lookup; a ``mutations`` counter tells the caller to walk again if it
changed anything.

*Shared groups.* ``$share/{name}/{filter}`` is a group node (``F_GROUP``,
keyed by the share name, salted hash) in the children table of the filter's
node; its entries are the members in subscription order (removal keeps the
order, so round robin is deterministic) and its ``nchildren`` field is the
round-robin cursor, since a group node has no children.

*Matching.* The topic is validated and split once into levels with their
hashes, then an explicit-stack DFS follows, per level, the literal child and
the ``+`` child, and collects the ``#`` child (which also matches the parent
level, [MQTT-4.7.1-2]). At the root a topic starting with ``$`` skips the
wildcard children [MQTT-4.7.2-1]. Deliveries are merged per subscriber with
a generation stamp per sid; scratch words and subscriber objects are
prefetched a node's worth at a time so their cache misses overlap. Cost:
depth x branching + matches, independent of the subscription count.

*Retained store.* The same node type with only literal children; ``entries``
points at a ``RetVal`` (message, expiry). A filter walks only the branches it
can reach.
"""

cimport cython
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.object cimport (PyObject_Hash, PyObject_RichCompareBool, Py_EQ, PyTypeObject,
                             traverseproc, visitproc, inquiry)
from libc.string cimport memcmp, memcpy, memmove, memset, memchr
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport qsort

from fastmqtt.errors import MalformedPacket as _MalformedPacket
import os as _os
import random as _random

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    object PyUnicode_DecodeUTF8(const char*, Py_ssize_t, const char*)

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    struct FmqNode;
    typedef struct FmqEntry {
        uint32_t sid;
        uint32_t subid;
        uint32_t meta;       /* options in the low byte, index of the owner's Ref above */
    } FmqEntry;
    typedef struct FmqNode {
        struct FmqNode *parent;
        uint64_t *table;         /* tagged child pointers: array, or hash table when cap > LINEAR_MAX */
        FmqEntry *entries;       /* retained store: FmqRetVal* */
        uint32_t nchildren;      /* group node: round-robin cursor */
        uint32_t nentries;
        uint16_t keylen;
        uint8_t tlog;            /* table capacity 1 << tlog; 0 = no table */
        uint8_t ecls;            /* entry capacity class, see ECAP */
        uint8_t flags;
        char key[1];             /* keylen bytes, no terminator */
    } __attribute__((packed)) FmqNode;
    #define FMQ_NODE_HEAD offsetof(FmqNode, key)
    #define fmq_prefetch(p) __builtin_prefetch((const void *)(p))
    /* One delivery tuple (obj, qos, rap, ids) from borrowed references, with
       no argument parsing or conversion calls: qos, rap and ids are shared
       cached objects (small ints, bools, the empty tuple) or a new ids tuple
       (stolen when steal_ids). */
    static PyObject *fmq_delivery(PyObject *obj, PyObject *qos, PyObject *rap,
                                  PyObject *ids, int steal_ids) {
        PyObject *t = PyTuple_New(4);
        if (t == NULL) {
            if (steal_ids) { Py_DECREF(ids); }
            return NULL;
        }
        Py_INCREF(obj); PyTuple_SET_ITEM(t, 0, obj);
        Py_INCREF(qos); PyTuple_SET_ITEM(t, 1, qos);
        Py_INCREF(rap); PyTuple_SET_ITEM(t, 2, rap);
        if (!steal_ids) { Py_INCREF(ids); }
        PyTuple_SET_ITEM(t, 3, ids);
        return t;
    }
    static PyObject *fmq_one_id(uint32_t subid) {
        PyObject *v = PyLong_FromUnsignedLong(subid);
        PyObject *t;
        if (v == NULL) return NULL;
        t = PyTuple_New(1);
        if (t == NULL) { Py_DECREF(v); return NULL; }
        PyTuple_SET_ITEM(t, 0, v);
        return t;
    }
    """
    ctypedef struct Entry "FmqEntry":
        uint32_t sid
        uint32_t subid
        uint32_t meta
    ctypedef struct Node "FmqNode":
        Node* parent
        uint64_t* table
        Entry* entries
        uint32_t nchildren
        uint32_t nentries
        uint16_t keylen
        uint8_t tlog
        uint8_t ecls
        uint8_t flags
        char key[1]
    size_t FMQ_NODE_HEAD
    void fmq_prefetch(const void*) noexcept nogil
    PyObject* fmq_delivery(PyObject* obj, PyObject* qos, PyObject* rap, PyObject* ids,
                           int steal_ids) except NULL
    PyObject* fmq_one_id(uint32_t subid) except NULL
    PyObject* PyList_New(Py_ssize_t n) except NULL
    void PyList_SET_ITEM(PyObject* l, Py_ssize_t i, PyObject* v) noexcept

# Shared objects of delivery tuples (index: qos; rap; the empty ids tuple).
cdef object _QOS0 = 0, _QOS1 = 1, _QOS2 = 2
cdef PyObject* QOS_OBJ[4]
QOS_OBJ[0] = <PyObject*>_QOS0
QOS_OBJ[1] = <PyObject*>_QOS1
QOS_OBJ[2] = <PyObject*>_QOS2
QOS_OBJ[3] = <PyObject*>_QOS0     # unused (qos <= 2)
cdef object _TRUE = True, _FALSE = False, _NO_IDS = ()
cdef PyObject* RAP_OBJ[2]
RAP_OBJ[0] = <PyObject*>_FALSE
RAP_OBJ[1] = <PyObject*>_TRUE

cdef object MalformedPacket = _MalformedPacket

cdef int FILTER_INVALID = 0x8F
cdef int NAME_INVALID = 0x90
cdef int PROTOCOL_ERROR = 0x82
cdef Py_ssize_t MAX_UTF8 = 65535
cdef uint32_t MAX_SUBSCRIPTION_ID = 268435455
cdef uint32_t LINEAR_MAX = 8
cdef uint32_t REF_SCAN = 16      # unsubscribe: scan the subscriber's Refs up to this many
cdef uint32_t MAX_REFS = 1 << 24   # refpos lives in 24 bits of Entry.meta
cdef uint32_t NO_SID = 0xFFFFFFFFu
cdef uint32_t STAMP_MASK = 0xFFFFFFu   # Sub.stamp: generation bits (the rest: refs class)
cdef uint32_t GROUP_SALT = 0x9E3779B9u
cdef uint64_t PTR_MASK = 0x0000FFFFFFFFFFFFu

cdef enum:
    F_GROUP = 1         # this node is a shared group
    F_PLUS = 2          # has a '+' child
    F_MULTI = 4         # has a '#' child
    F_GROUPS = 8        # has shared-group children
    F_HAS_EXP = 16      # retained value has an expiry
    LOCAL_LEVELS = 32

# Entry.meta bits
cdef enum:
    M_QOS = 0x3
    M_NL = 0x4
    M_RAP = 0x8
    M_RH_SHIFT = 4
    M_OPTS = 0xFF
    M_REF_SHIFT = 8

cdef packed struct Ref:
    Node* node
    uint32_t pos         # index of the Entry in node.entries

cdef struct Sub:
    PyObject* obj        # strong reference; NULL when the sid is free
    Ref* refs            # this subscriber's subscriptions
    uint32_t nrefs
    uint32_t stamp       # low 24 bits: match generation that last reached this
                         # subscriber; top 8: capacity class of refs (ECAP)
    uint32_t slot        # its accumulator index in that match; next free sid when free
    uint32_t hash        # low 32 bits of hash(obj)

cdef struct RetVal:
    PyObject* msg
    double expires

cdef struct Acc:
    uint32_t sid
    uint32_t qos_rap
    uint32_t subid
    uint32_t nsubids
    PyObject* obj

cdef struct Levels:
    const char* buf
    uint32_t n
    uint32_t* off
    uint32_t* len
    uint32_t* hash
    uint32_t local_off[LOCAL_LEVELS]
    uint32_t local_len[LOCAL_LEVELS]
    uint32_t local_hash[LOCAL_LEVELS]
    int dollar           # first byte is '$'
    # shared subscription name (filters only)
    const char* share
    uint32_t share_len

# Entry array capacities by class: growth ~x1.25 (a node's array wastes at
# most about a fifth; the class fits in one byte), each capacity rounded up to
# fill its 16-byte allocator size class, since those bytes are spent anyway.
cdef uint32_t ECAP[128]
cdef int NECAP = 0


cdef void _init_ecap() noexcept:
    global NECAP
    cdef uint64_t c = 0
    cdef int k = 0
    while k < 128 and c < 0xFFFFFFFFu:
        ECAP[k] = <uint32_t>c
        k += 1
        c = c + 1 if c < 4 else c + (c >> 2)
        c = fill_class(c, sizeof(Entry))
    NECAP = k


cdef inline uint64_t fill_class(uint64_t cap, size_t item) noexcept:
    """The largest capacity whose array fits the 16-byte size class of cap items."""
    return ((cap * item + 15) // 16 * 16) // item


_init_ecap()


# Ref array capacities by class: ~x1.5 (fewer reallocations than entries: a
# client's refs grow as it subscribes, and each step left a freed block in the
# allocator's pools), also filled to the size class. Same index byte scheme.
cdef uint32_t RCAP[128]


cdef void _init_rcap() noexcept:
    cdef uint64_t c = 0
    cdef int k = 0
    while k < 128:
        RCAP[k] = <uint32_t>c if c < 0xFFFFFFFFu else 0xFFFFFFFFu
        k += 1
        c = fill_class(c + (c >> 1) + 1, sizeof(Ref))


_init_rcap()


# ---------------------------------------------------------------------------
# hashing and levels

def _hash_seed():
    """The child-table hash key: random per process, or derived from an integer
    PYTHONHASHSEED (reproducible table layouts for debugging)."""
    seed = _os.environ.get("PYTHONHASHSEED", "")
    if seed.isdigit():
        return (int(seed) * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return _random.SystemRandom().getrandbits(64)


cdef uint64_t HASH_SEED = _hash_seed()


cdef inline uint32_t hash_bytes(const char* p, uint32_t n) noexcept nogil:
    # Eight bytes per step (levels are often 36-byte UUIDs), then murmur3's
    # 64-bit finaliser so the low bits (the table index) and the top 16 (the
    # pointer tag) depend on every byte. Keyed with a per-process random seed:
    # levels are client input, and a client that could compute colliding
    # levels offline would lengthen the probe chains of a node other clients
    # share (say chat/{ws}/channel), slowing every publish under it.
    cdef uint64_t h = HASH_SEED ^ n
    cdef uint64_t w
    cdef uint32_t total = n, i
    while n >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * 0xff51afd7ed558ccdu
        h ^= h >> 29
        p += 8
        n -= 8
    if n:
        # The tail without a variable-length memcpy call: one 8-byte load
        # ending at the last byte (shifted down to the same value) when the
        # key is that long, else byte by byte.
        if total >= 8:
            memcpy(&w, p + n - 8, 8)
            w >>= (8 - n) * 8
        else:
            w = 0
            for i in range(n):
                w |= (<uint64_t>(<const uint8_t*>p)[i]) << (8 * i)
        h = (h ^ w) * 0xff51afd7ed558ccdu
        h ^= h >> 29
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53u
    h ^= h >> 33
    return <uint32_t>h


cdef inline void levels_init(Levels* lv) noexcept:
    lv.off = lv.local_off
    lv.len = lv.local_len
    lv.hash = lv.local_hash
    lv.n = 0
    lv.share = NULL
    lv.share_len = 0
    lv.dollar = 0


cdef inline void levels_free(Levels* lv) noexcept:
    if lv.off != lv.local_off:
        PyMem_Free(lv.off)
        PyMem_Free(lv.len)
        PyMem_Free(lv.hash)
    lv.off = lv.local_off
    lv.len = lv.local_len
    lv.hash = lv.local_hash


cdef int levels_split(Levels* lv, const char* s, Py_ssize_t n) except -1:
    """Split s[0:n] on '/' into lv (offsets, lengths, hashes)."""
    cdef Py_ssize_t count = 1, start = 0, i
    cdef const char* p = s
    cdef const char* end = s + n
    cdef const char* q
    # Count levels with memchr (vectorised) only when the local arrays may
    # not do; most topics have a handful of levels.
    if n >= LOCAL_LEVELS:
        while True:
            q = <const char*>memchr(p, b'/', end - p)
            if q == NULL:
                break
            count += 1
            p = q + 1
        if count > LOCAL_LEVELS:
            lv.off = <uint32_t*>PyMem_Malloc(count * sizeof(uint32_t))
            lv.len = <uint32_t*>PyMem_Malloc(count * sizeof(uint32_t))
            lv.hash = <uint32_t*>PyMem_Malloc(count * sizeof(uint32_t))
            if lv.off == NULL or lv.len == NULL or lv.hash == NULL:
                PyMem_Free(lv.off); PyMem_Free(lv.len); PyMem_Free(lv.hash)
                lv.off = lv.local_off
                lv.len = lv.local_len
                lv.hash = lv.local_hash
                raise MemoryError()
    lv.buf = s
    count = 0
    p = s
    while True:
        q = <const char*>memchr(p, b'/', end - p)
        if q == NULL:
            q = end
        lv.off[count] = <uint32_t>(p - s)
        lv.len[count] = <uint32_t>(q - p)
        lv.hash[count] = hash_bytes(p, <uint32_t>(q - p))
        count += 1
        if q == end:
            break
        p = q + 1
    lv.n = <uint32_t>count
    return 0


cdef const char* utf8_of(object text, Py_ssize_t* n, int code, str what) except NULL:
    if not isinstance(text, str):
        # Same error as fastmqtt.topics, so callers need one except clause.
        raise MalformedPacket(f"{what} must be str, not {type(text).__name__}", code)
    cdef const char* s
    try:
        s = PyUnicode_AsUTF8AndSize(text, n)
    except UnicodeEncodeError:
        # Lone surrogates: not well-formed UTF-8 [MQTT-1.5.4-1].
        raise MalformedPacket(f"{what} is not well-formed UTF-8", code) from None
    if n[0] == 0:
        raise MalformedPacket(f"{what} is empty [MQTT-4.7.3-1]", code)
    if n[0] > MAX_UTF8:
        raise MalformedPacket(f"{what} is longer than 65535 bytes [MQTT-4.7.3-3]", code)
    return s


cdef int parse_topic(Levels* lv, object topic) except -1:
    """Validate a topic name and split it: 0x90 on any rule broken."""
    cdef Py_ssize_t n, i
    cdef const char* s = utf8_of(topic, &n, NAME_INVALID, "topic name")
    cdef char c
    cdef uint8_t bad = 0
    # One branch-free pass; the three characters are rare.
    for i in range(n):
        c = s[i]
        bad |= (c == 0) | (c == b'+') | (c == b'#')
    if bad:
        if memchr(s, 0, n) != NULL:
            raise MalformedPacket("topic name contains U+0000 [MQTT-4.7.3-2]", NAME_INVALID)
        raise MalformedPacket("wildcard in a topic name [MQTT-3.3.2-2]", NAME_INVALID)
    levels_split(lv, s, n)
    lv.dollar = s[0] == b'$'
    return 0


cdef int parse_filter(Levels* lv, object topic_filter) except -1:
    """Validate a topic filter (and ``$share/`` prefix) and split the filter proper.

    Sets lv.share/lv.share_len for a shared subscription. 0x8F on any rule broken.
    """
    cdef Py_ssize_t n, i, start, slash
    cdef const char* s = utf8_of(topic_filter, &n, FILTER_INVALID, "topic filter")
    cdef char c
    cdef uint8_t seen = 0
    # One branch-free pass; most filters have no wildcard, so the level
    # checks below are skipped.
    for i in range(n):
        c = s[i]
        seen |= (c == 0) | (((c == b'+') | (c == b'#')) << 1)
    if seen & 1:
        raise MalformedPacket("topic filter contains U+0000 [MQTT-4.7.3-2]", FILTER_INVALID)
    start = 0
    lv.share = NULL
    lv.share_len = 0
    if n >= 7 and memcmp(s, b"$share/", 7) == 0:
        slash = -1
        for i in range(7, n):
            c = s[i]
            if c == b'/':
                slash = i
                break
            if c == b'+' or c == b'#':
                raise MalformedPacket("ShareName contains a wildcard [MQTT-4.8.2-2]",
                                      FILTER_INVALID)
        if slash == 7 or (slash < 0 and n == 7):
            raise MalformedPacket("empty ShareName [MQTT-4.8.2-1]", FILTER_INVALID)
        if slash < 0 or slash == n - 1:
            raise MalformedPacket("ShareName not followed by '/' and a Topic Filter "
                                  "[MQTT-4.8.2-2]", FILTER_INVALID)
        lv.share = s + 7
        lv.share_len = <uint32_t>(slash - 7)
        start = slash + 1
    # Wildcards occupy whole levels; '#' only as the last level
    # [MQTT-4.7.1-2], [MQTT-4.7.1-3].
    for i in range(start, n if seen & 2 else start):
        c = s[i]
        if c == b'+' or c == b'#':
            if (i > start and s[i - 1] != b'/') or (i + 1 < n and s[i + 1] != b'/'):
                if c == b'+':
                    raise MalformedPacket("'+' must be a whole level [MQTT-4.7.1-3]",
                                          FILTER_INVALID)
                raise MalformedPacket("'#' must be the whole last level [MQTT-4.7.1-2]",
                                      FILTER_INVALID)
            if c == b'#' and i + 1 != n:
                raise MalformedPacket("'#' must be the whole last level [MQTT-4.7.1-2]",
                                      FILTER_INVALID)
    levels_split(lv, s + start, n - start)
    return 0


# ---------------------------------------------------------------------------
# nodes

cdef uint32_t HASH_PLUS = hash_bytes(b"+", 1)
cdef uint32_t HASH_MULTI = hash_bytes(b"#", 1)


cdef inline bint is_level(Levels* lv, uint32_t i, char c) noexcept:
    return lv.len[i] == 1 and lv.buf[lv.off[i]] == c


cdef inline uint32_t tcap_of(Node* n) noexcept:
    return 0 if n.tlog == 0 else (<uint32_t>1) << n.tlog


cdef inline uint32_t node_hash(Node* c) noexcept:
    cdef uint32_t h = hash_bytes(c.key, c.keylen)
    return h ^ GROUP_SALT if c.flags & F_GROUP else h


cdef Node* node_new(Node* parent, const char* key, uint32_t keylen) except NULL:
    cdef Node* n = <Node*>PyMem_Malloc(FMQ_NODE_HEAD + keylen)
    if n == NULL:
        raise MemoryError()
    memset(n, 0, FMQ_NODE_HEAD)
    n.parent = parent
    n.keylen = <uint16_t>keylen
    if keylen:
        memcpy(n.key, key, keylen)
    return n


cdef inline bint node_is(Node* c, const char* k, uint32_t klen, uint8_t group) noexcept:
    return (c.keylen == klen and (c.flags & F_GROUP) == group
            and memcmp(c.key, k, klen) == 0)


cdef inline uint64_t tag_of(uint32_t h) noexcept:
    # Table slots keep 16 hash bits in the pointer's unused top bits, so a
    # lookup dereferences only the child that (almost surely) matches.
    return (<uint64_t>(h >> 16)) << 48


cdef inline Node* slot_node(uint64_t v) noexcept:
    return <Node*><uintptr_t>(v & PTR_MASK)


cdef inline Node* child_find(Node* n, const char* k, uint32_t klen, uint32_t h,
                             uint8_t group) noexcept:
    """The child with key k (a shared group when group == F_GROUP), or NULL.

    h is hash_bytes(k), already salted for a group.
    """
    cdef uint64_t* t = n.table
    cdef uint64_t v, tag = tag_of(h)
    cdef Node* c
    cdef uint32_t i, mask
    if n.tlog <= 3:      # linear array (capacity <= LINEAR_MAX)
        for i in range(n.nchildren):
            v = t[i]
            if (v & ~PTR_MASK) == tag:
                c = slot_node(v)
                if node_is(c, k, klen, group):
                    return c
        return NULL
    mask = ((<uint32_t>1) << n.tlog) - 1
    i = h & mask
    while True:
        v = t[i]
        if v == 0:
            return NULL
        if (v & ~PTR_MASK) == tag:
            c = slot_node(v)
            if node_is(c, k, klen, group):
                return c
        i = (i + 1) & mask


cdef inline void table_put(uint64_t* t, uint32_t cap, uint64_t v, uint32_t h) noexcept:
    cdef uint32_t mask = cap - 1
    cdef uint32_t i = h & mask
    while t[i] != 0:
        i = (i + 1) & mask
    t[i] = v


cdef inline uint8_t log2_of(uint32_t cap) noexcept:
    cdef uint8_t k = 0
    while ((<uint32_t>1) << k) < cap:
        k += 1
    return k


cdef int table_resize(Node* n, uint32_t newcap) except -1:
    """Rebuild n's child table with capacity newcap (a power of two; linear
    when <= LINEAR_MAX, none when 0)."""
    cdef uint64_t* old = n.table
    cdef uint32_t oldcap = tcap_of(n), i, k = 0, nold
    cdef uint64_t* t = NULL
    cdef uint64_t v
    if newcap:
        t = <uint64_t*>PyMem_Malloc(newcap * sizeof(uint64_t))
        if t == NULL:
            raise MemoryError()
        memset(t, 0, newcap * sizeof(uint64_t))
        nold = n.nchildren if oldcap <= LINEAR_MAX else oldcap
        for i in range(nold):
            v = old[i]
            if v == 0:
                continue
            if newcap <= LINEAR_MAX:
                t[k] = v
                k += 1
            else:
                table_put(t, newcap, v, node_hash(slot_node(v)))
    PyMem_Free(old)
    n.table = t
    n.tlog = log2_of(newcap) if newcap else 0
    return 0


cdef int child_add(Node* n, Node* c, uint32_t h) except -1:
    """Insert c (whose key hashes to h, salted for a group) into n's table."""
    cdef uint32_t cap = tcap_of(n)
    cdef uint64_t v = <uint64_t><uintptr_t>c
    if v & ~PTR_MASK:
        raise MemoryError("pointer above 2**48: tagged child tables unsupported here")
    v |= tag_of(h)
    if cap <= LINEAR_MAX:
        if n.nchildren == cap:
            table_resize(n, LINEAR_MAX * 4 if cap == LINEAR_MAX else (2 if cap == 0 else cap * 2))
    elif (n.nchildren + 1) * 2 > cap:
        table_resize(n, cap * 2)
    if n.tlog <= 3:
        n.table[n.nchildren] = v
    else:
        table_put(n.table, tcap_of(n), v, h)
    n.nchildren += 1
    return 0


cdef void child_remove(Node* n, Node* c) noexcept:
    cdef uint64_t* t = n.table
    cdef uint32_t i, j, k, mask, cap = tcap_of(n)
    if cap <= LINEAR_MAX:
        for i in range(n.nchildren):
            if slot_node(t[i]) == c:
                t[i] = t[n.nchildren - 1]
                t[n.nchildren - 1] = 0
                break
        n.nchildren -= 1
        if n.nchildren == 0:
            PyMem_Free(t)
            n.table = NULL
            n.tlog = 0
        return
    mask = cap - 1
    i = node_hash(c) & mask
    while slot_node(t[i]) != c:
        i = (i + 1) & mask
    t[i] = 0
    # Backward-shift deletion keeps every probe chain unbroken.
    j = i
    while True:
        j = (j + 1) & mask
        if t[j] == 0:
            break
        k = node_hash(slot_node(t[j])) & mask
        if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
            continue
        t[i] = t[j]
        t[j] = 0
        i = j
    n.nchildren -= 1
    if n.nchildren * 8 < cap:
        # On MemoryError the old, larger table simply stays.
        try:
            table_resize(n, cap // 4 if cap // 4 > LINEAR_MAX else LINEAR_MAX)
        except MemoryError:
            pass


cdef inline bint node_empty(Node* n) noexcept:
    # A group node's nchildren is its round-robin cursor, not a child count.
    return n.entries == NULL and ((n.flags & F_GROUP) or n.nchildren == 0)


cdef inline Node* node_child_at(Node* n, uint32_t i) noexcept:
    """Slot i of n's table (NULL for an empty hash slot)."""
    return slot_node(n.table[i])


cdef inline uint32_t node_slots(Node* n) noexcept:
    """How many table slots to scan to see every child."""
    if n.flags & F_GROUP:
        return 0
    return n.nchildren if n.tlog <= 3 else tcap_of(n)


cdef void node_detach(Node* p, Node* n) noexcept:
    cdef uint32_t i
    cdef Node* c
    child_remove(p, n)
    if n.flags & F_GROUP:
        for i in range(node_slots(p)):
            c = node_child_at(p, i)
            if c != NULL and (c.flags & F_GROUP):
                return
        p.flags &= ~F_GROUPS
    elif n.keylen == 1 and n.key[0] == b'+':
        p.flags &= ~F_PLUS
    elif n.keylen == 1 and n.key[0] == b'#':
        p.flags &= ~F_MULTI


cdef void node_prune(Node* n) noexcept:
    """Free n and then its ancestors for as long as they are empty (never the root)."""
    cdef Node* p
    while n.parent != NULL and node_empty(n):
        p = n.parent
        node_detach(p, n)
        PyMem_Free(n.entries)
        PyMem_Free(n.table if not (n.flags & F_GROUP) else NULL)
        PyMem_Free(n)
        n = p


cdef bint node_path_is(Node* n, Levels* lv, Node* root) noexcept:
    """Whether n (a filter's node, or its shared group node) stands for lv's filter."""
    cdef int i = <int>lv.n - 1
    if lv.share != NULL:
        if not node_is(n, lv.share, lv.share_len, F_GROUP):
            return False
        n = n.parent
    while i >= 0:
        if n == NULL or n == root or (n.flags & F_GROUP):
            return False
        if not node_is(n, lv.buf + lv.off[i], lv.len[i], 0):
            return False
        n = n.parent
        i -= 1
    return n == root


cdef object node_text(Node* n):
    """The filter (or topic) a node stands for, rebuilt from the parents."""
    cdef Node* p = n
    cdef Py_ssize_t total = 0, pos
    cdef bint group = n.flags & F_GROUP
    if group:
        p = n.parent
    cdef Node* q = p
    while q.parent != NULL:
        total += q.keylen + 1
        q = q.parent
    total -= 1
    if group:
        total += 7 + n.keylen + 1
    cdef char* buf = <char*>PyMem_Malloc(total + 1)
    if buf == NULL:
        raise MemoryError()
    try:
        pos = total
        q = p
        while q.parent != NULL:
            pos -= q.keylen
            memcpy(buf + pos, q.key, q.keylen)
            if pos > 0:
                pos -= 1
                buf[pos] = b'/'
            q = q.parent
        if group:
            memcpy(buf, b"$share/", 7)
            memcpy(buf + 7, n.key, n.keylen)
        return PyUnicode_DecodeUTF8(buf, total, NULL)
    finally:
        PyMem_Free(buf)


cdef inline object key_text(Node* n):
    return PyUnicode_DecodeUTF8(n.key, n.keylen, NULL)


cdef inline uint32_t grow(uint32_t cap) noexcept:
    return cap + (cap >> 1) + 1


cdef int qsort_u64(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0], y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


ctypedef int (*node_fn)(Node* n, void* arg) noexcept


cdef int nodes_walk(Node* root, node_fn fn, void* arg) noexcept:
    """Call fn on every node of a tree, each after its children are on the
    explicit stack (filters can be 32k levels deep), so fn may free it. Stops
    at the first non-zero fn result and returns it; gives up (returns 0) if
    the stack cannot grow."""
    cdef Node** stack
    cdef Node** bigger
    cdef Node* n
    cdef Node* c
    cdef uint32_t sp, cap = 64, i, slots
    cdef int r = 0
    stack = <Node**>PyMem_Malloc(cap * sizeof(Node*))
    if stack == NULL:
        return 0
    stack[0] = root
    sp = 1
    while sp and not r:
        sp -= 1
        n = stack[sp]
        slots = node_slots(n)
        if sp + slots >= cap:
            cap = (sp + slots) * 2
            bigger = <Node**>PyMem_Realloc(stack, cap * sizeof(Node*))
            if bigger == NULL:
                break
            stack = bigger
        for i in range(slots):
            c = node_child_at(n, i)
            if c != NULL:
                stack[sp] = c
                sp += 1
        r = fn(n, arg)
    PyMem_Free(stack)
    return r


cdef int _free_node(Node* n, void* retained) noexcept:
    if retained != NULL and n.entries != NULL:
        Py_XDECREF((<RetVal*>n.entries).msg)
    PyMem_Free(n.entries)
    if not (n.flags & F_GROUP):
        PyMem_Free(n.table)
    PyMem_Free(n)
    return 0


cdef void nodes_free(Node* root, bint retained) noexcept:
    """Free a whole tree (leaks it rather than crash when out of memory)."""
    nodes_walk(root, _free_node, <void*>1 if retained else NULL)


# ---------------------------------------------------------------------------
# the subscription trie

@cython.final
cdef class TopicTrie:
    """Subscriptions by topic filter, with per-subscriber options and shared groups.

    A subscriber is any hashable object (a client id, a session object). See
    the module docstring for the memory layout.
    """

    cdef Node* root
    # subscribers, indexed by sid
    cdef Sub* subs              # object, refs and match scratch: one cache-line visit
    cdef char* subs_raw         # the allocation subs lies in (subs: its first 64-byte boundary)
    cdef uint32_t sid_cap
    cdef uint32_t sid_used      # high-water mark
    cdef uint32_t free_sid      # head of the free list, NO_SID when empty
    cdef uint32_t* stab         # open addressing: sid + 1, 0 = empty
    cdef uint32_t stab_cap
    cdef uint32_t nsubscribers
    cdef uint64_t version       # bumped when stab changes (guards user __eq__)
    cdef PyObject* last_obj     # identity cache for sid_of (borrowed; cleared on release)
    cdef uint64_t mutations     # bumped by every change and every collect(): lets a caller
                                # that ran user __eq__ know its node pointers may be stale
    cdef uint32_t last_sid
    cdef Py_ssize_t count
    cdef uint32_t stamp
    cdef int policy_kind        # 0 round robin, 1 random, 2 callable
    cdef object policy
    cdef uint64_t rng
    # match scratch, kept between calls to avoid allocation
    cdef Node** stk_node
    cdef uint32_t* stk_level
    cdef uint32_t stk_cap
    cdef Node** hits
    cdef uint32_t hits_cap
    cdef Acc* acc
    cdef uint32_t acc_cap
    cdef uint64_t* xs
    cdef uint32_t xs_cap

    def __cinit__(self):
        self.root = node_new(NULL, NULL, 0)
        self.free_sid = NO_SID
        self.rng = (<uint64_t>_random.getrandbits(63)) | 1

    def __init__(self) -> None:
        """Create an empty trie (round-robin share policy)."""

    def __dealloc__(self):
        cdef uint32_t i
        if self.root != NULL:
            nodes_free(self.root, False)
            self.root = NULL
        if self.subs != NULL:
            for i in range(self.sid_used):
                if self.subs[i].obj != NULL:
                    Py_DECREF(<object>self.subs[i].obj)
                    PyMem_Free(self.subs[i].refs)
        PyMem_Free(self.subs_raw)
        PyMem_Free(self.stab)
        PyMem_Free(self.stk_node)
        PyMem_Free(self.stk_level)
        PyMem_Free(self.hits)
        PyMem_Free(self.acc)
        PyMem_Free(self.xs)

    cdef int clear_all(self) except -1:
        """Drop every subscription and subscriber (tp_clear, to break cycles)."""
        cdef list held = []
        cdef uint32_t i
        cdef Node* root
        if self.root != NULL:
            root = node_new(NULL, NULL, 0)
            nodes_free(self.root, False)
            self.root = root
        if self.subs != NULL:
            for i in range(self.sid_used):
                if self.subs[i].obj != NULL:
                    held.append(<object>self.subs[i].obj)
                    Py_DECREF(<object>self.subs[i].obj)
                    PyMem_Free(self.subs[i].refs)
            PyMem_Free(self.subs_raw)
            self.subs_raw = NULL
            self.subs = NULL
        PyMem_Free(self.stab)
        self.stab = NULL
        self.stab_cap = 0
        self.sid_cap = 0
        self.sid_used = 0
        self.free_sid = NO_SID
        self.nsubscribers = 0
        self.count = 0
        self.last_obj = NULL
        self.version += 1
        self.mutations += 1
        del held        # last: releasing may run arbitrary code
        return 0

    # -- subscriber ids ----------------------------------------------------

    cdef uint32_t sid_find(self, object obj, Py_hash_t h) except? 0xFFFFFFFE:
        """The sid of obj, or NO_SID."""
        cdef uint32_t mask, i, v, sid
        cdef uint64_t ver
        cdef PyObject* o
        cdef int eq
        while True:
            if self.stab_cap == 0:
                return NO_SID
            mask = self.stab_cap - 1
            i = (<uint32_t>h) & mask
            while True:
                v = self.stab[i]
                if v == 0:
                    return NO_SID
                sid = v - 1
                if self.subs[sid].hash == <uint32_t>h:
                    o = self.subs[sid].obj
                    if o == <PyObject*>obj:
                        return sid
                    ver = self.version
                    eq = PyObject_RichCompareBool(<object>o, obj, Py_EQ)
                    if ver != self.version:
                        break       # __eq__ changed the table: look again
                    if eq:
                        return sid
                i = (i + 1) & mask

    cdef int stab_resize(self, uint32_t cap) except -1:
        cdef uint32_t* t = <uint32_t*>PyMem_Malloc(cap * sizeof(uint32_t))
        cdef uint32_t i, j, mask = cap - 1, v
        if t == NULL:
            raise MemoryError()
        memset(t, 0, cap * sizeof(uint32_t))
        for i in range(self.stab_cap):
            v = self.stab[i]
            if v:
                j = (<uint32_t>self.subs[v - 1].hash) & mask
                while t[j]:
                    j = (j + 1) & mask
                t[j] = v
        PyMem_Free(self.stab)
        self.stab = t
        self.stab_cap = cap
        self.version += 1
        return 0

    cdef uint32_t sid_new(self, object obj, Py_hash_t h) except? 0xFFFFFFFE:
        """Intern obj (known to be absent) and return its new sid."""
        cdef uint32_t sid, newcap, i, mask
        cdef Py_ssize_t off, newoff
        cdef void* p
        if (self.nsubscribers + 1) * 2 > self.stab_cap:
            self.stab_resize(self.stab_cap * 2 if self.stab_cap else 16)
        if self.free_sid != NO_SID:
            sid = self.free_sid
            self.free_sid = self.subs[sid].slot
        else:
            if self.sid_used == self.sid_cap:
                newcap = grow(self.sid_cap) + 15
                # Cache-line aligned, so a 32-byte record never straddles two
                # lines (match() touches obj and stamp of one record: one miss).
                # Grown with realloc (large arrays move by remapping, leaving
                # no freed copies behind), 64 bytes over so the records can
                # start on a line boundary; moved only if that offset changed.
                off = <char*>self.subs - self.subs_raw if self.subs != NULL else 0
                p = PyMem_Realloc(self.subs_raw, newcap * sizeof(Sub) + 64)
                if p == NULL:
                    raise MemoryError()
                self.subs_raw = <char*>p
                newoff = (64 - (<uintptr_t>p & 63)) & 63
                if self.sid_used and newoff != off:
                    memmove(<char*>p + newoff, <char*>p + off, self.sid_used * sizeof(Sub))
                self.subs = <Sub*>(<char*>p + newoff)
                self.sid_cap = newcap
            sid = self.sid_used
            self.sid_used += 1
        memset(&self.subs[sid], 0, sizeof(Sub))
        self.subs[sid].hash = <uint32_t>h
        self.mutations += 1
        Py_INCREF(obj)
        self.subs[sid].obj = <PyObject*>obj
        mask = self.stab_cap - 1
        i = (<uint32_t>h) & mask
        while self.stab[i]:
            i = (i + 1) & mask
        self.stab[i] = sid + 1
        self.nsubscribers += 1
        self.version += 1
        return sid

    cdef void sid_release(self, uint32_t sid) noexcept:
        cdef uint32_t mask = self.stab_cap - 1, i, j, k
        cdef PyObject* obj = self.subs[sid].obj
        i = (<uint32_t>self.subs[sid].hash) & mask
        while self.stab[i] != sid + 1:
            i = (i + 1) & mask
        self.stab[i] = 0
        j = i
        while True:
            j = (j + 1) & mask
            if self.stab[j] == 0:
                break
            k = (<uint32_t>self.subs[self.stab[j] - 1].hash) & mask
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            self.stab[i] = self.stab[j]
            self.stab[j] = 0
            i = j
        PyMem_Free(self.subs[sid].refs)
        self.subs[sid].refs = NULL
        self.subs[sid].stamp = 0    # refs class 0: no array
        self.subs[sid].nrefs = 0
        self.subs[sid].slot = self.free_sid
        self.free_sid = sid
        self.subs[sid].obj = NULL
        if self.last_sid == sid:
            self.last_obj = NULL
        self.nsubscribers -= 1
        self.version += 1
        self.mutations += 1
        Py_DECREF(<object>obj)   # last: may run arbitrary __del__ code

    cdef inline void stab_prefetch_slot(self, Py_hash_t h) noexcept:
        if self.stab_cap:
            fmq_prefetch(&self.stab[(<uint32_t>h) & (self.stab_cap - 1)])

    cdef inline void stab_prefetch_record(self, Py_hash_t h) noexcept:
        # Second step: the slot has had time to arrive; start loading the
        # subscriber record it names while the caller walks the trie.
        cdef uint32_t v
        if self.stab_cap:
            v = self.stab[(<uint32_t>h) & (self.stab_cap - 1)]
            if v:
                fmq_prefetch(&self.subs[v - 1])

    cdef uint32_t sid_of(self, object obj) except? 0xFFFFFFFE:
        # One SUBSCRIBE packet usually carries several filters for the same
        # client: remember the last subscriber looked up, by the identity of
        # the object the trie stores (never the argument, which may be an
        # equal temporary whose address is reused once it is freed); the
        # trie's own reference keeps that address from being reused.
        cdef uint32_t sid
        if <PyObject*>obj == self.last_obj:
            return self.last_sid
        sid = self.sid_find(obj, PyObject_Hash(obj))
        if sid != NO_SID:
            self.last_obj = self.subs[sid].obj
            self.last_sid = sid
        return sid

    # -- entries -----------------------------------------------------------

    cdef Py_ssize_t entry_find(self, Node* t, uint32_t sid) noexcept:
        cdef Sub* rec = &self.subs[sid]
        cdef uint32_t i
        if t.nentries <= rec.nrefs:
            for i in range(t.nentries):
                if t.entries[i].sid == sid:
                    return i
        else:
            for i in range(rec.nrefs):
                if rec.refs[i].node == t:
                    return rec.refs[i].pos
        return -1

    cdef int entry_add(self, Node* t, uint32_t sid, uint32_t opts, uint32_t subid) except -1:
        cdef Sub* rec = &self.subs[sid]
        cdef uint32_t cap
        cdef Entry* e
        cdef Ref* r
        if rec.nrefs >= MAX_REFS:
            raise MemoryError("too many subscriptions for one subscriber")
        if t.nentries == ECAP[t.ecls]:
            if t.ecls + 1 >= NECAP:
                raise MemoryError("too many subscribers on one topic filter")
            e = <Entry*>PyMem_Realloc(t.entries, ECAP[t.ecls + 1] * sizeof(Entry))
            if e == NULL:
                raise MemoryError()
            t.entries = e
            t.ecls += 1
        if rec.nrefs == RCAP[rec.stamp >> 24]:
            # The capacity class (RCAP) lives in the top byte of stamp.
            cap = (rec.stamp >> 24) + 1
            r = <Ref*>PyMem_Realloc(rec.refs, RCAP[cap] * sizeof(Ref))
            if r == NULL:
                raise MemoryError()
            rec.refs = r
            rec.stamp = (rec.stamp & STAMP_MASK) | (cap << 24)
        e = &t.entries[t.nentries]
        e.sid = sid
        e.subid = subid
        e.meta = opts | (rec.nrefs << M_REF_SHIFT)
        r = &rec.refs[rec.nrefs]
        r.node = t
        r.pos = t.nentries
        t.nentries += 1
        rec.nrefs += 1
        self.count += 1
        self.mutations += 1
        return 0

    cdef void entry_remove(self, Node* t, uint32_t i) noexcept:
        """Remove entry i of t and its Ref; the caller prunes and releases the sid."""
        cdef Entry e = t.entries[i]
        cdef uint32_t refpos = e.meta >> M_REF_SHIFT
        cdef Sub* rec = &self.subs[e.sid]
        cdef uint32_t last = rec.nrefs - 1, j, want
        cdef int c
        cdef Ref* moved
        cdef Entry* m
        cdef Node* far_node = NULL
        cdef Sub* far_sub = NULL
        self.mutations += 1
        # Two fix-ups follow, each two dependent cache misses away (the Ref
        # moved into our Ref's place -> its node -> its entry; the Entry moved
        # into our entry's place -> its Sub -> its Ref). Start both chains
        # together so they cost two miss latencies, not four.
        if refpos != last:
            far_node = rec.refs[last].node
            fmq_prefetch(far_node)
        if not (t.flags & F_GROUP) and i + 1 != t.nentries:
            far_sub = &self.subs[t.entries[t.nentries - 1].sid]
            fmq_prefetch(far_sub)
        if far_node != NULL:
            fmq_prefetch(&far_node.entries[rec.refs[last].pos])
        if far_sub != NULL:
            fmq_prefetch(&far_sub.refs[t.entries[t.nentries - 1].meta >> M_REF_SHIFT])
        if refpos != last:
            rec.refs[refpos] = rec.refs[last]
            moved = &rec.refs[refpos]
            m = &moved.node.entries[moved.pos]
            m.meta = (m.meta & M_OPTS) | (refpos << M_REF_SHIFT)
        rec.nrefs = last
        c = rec.stamp >> 24
        if last * 4 < RCAP[c] and RCAP[c] > 8:
            want = last * 2
            while c > 0 and RCAP[c - 1] >= want:
                c -= 1
            moved = <Ref*>PyMem_Realloc(rec.refs, RCAP[c] * sizeof(Ref))
            if moved != NULL:
                rec.refs = moved
                rec.stamp = (rec.stamp & STAMP_MASK) | (<uint32_t>c << 24)
        last = t.nentries - 1
        if t.flags & F_GROUP:
            # Members keep subscription order, so round robin stays predictable.
            memmove(&t.entries[i], &t.entries[i + 1], (last - i) * sizeof(Entry))
            for j in range(i, last):
                m = &t.entries[j]
                self.subs[m.sid].refs[m.meta >> M_REF_SHIFT].pos = j
        elif i != last:
            t.entries[i] = t.entries[last]
            m = &t.entries[i]
            self.subs[m.sid].refs[m.meta >> M_REF_SHIFT].pos = i
        t.nentries = last
        if last == 0:
            PyMem_Free(t.entries)
            t.entries = NULL
            t.ecls = 0
        elif last * 2 < ECAP[t.ecls] and t.ecls > 4:
            want = last + (last >> 2)
            c = t.ecls
            while c > 0 and ECAP[c - 1] >= want:
                c -= 1
            m = <Entry*>PyMem_Realloc(t.entries, ECAP[c] * sizeof(Entry))
            if m != NULL:
                t.entries = m
                t.ecls = <uint8_t>c
        self.count -= 1

    # -- walking -------------------------------------------------------------

    cdef Node* find_node(self, Levels* lv, bint create) except? NULL:
        """The node (or shared group node) for a parsed filter; NULL if absent."""
        cdef Node* n = self.root
        cdef Node* c
        cdef uint32_t i, h
        cdef const char* k
        cdef uint8_t flag
        for i in range(lv.n):
            k = lv.buf + lv.off[i]
            c = child_find(n, k, lv.len[i], lv.hash[i], 0)
            if c == NULL:
                if not create:
                    return NULL
                c = node_new(n, k, lv.len[i])
                try:
                    child_add(n, c, lv.hash[i])
                except MemoryError:
                    PyMem_Free(c)
                    node_prune(n)
                    raise
                if is_level(lv, i, b'+'):
                    n.flags |= F_PLUS
                elif is_level(lv, i, b'#'):
                    n.flags |= F_MULTI
            n = c
        if lv.share == NULL:
            return n
        h = hash_bytes(lv.share, lv.share_len) ^ GROUP_SALT
        c = child_find(n, lv.share, lv.share_len, h, F_GROUP)
        if c != NULL or not create:
            return c
        c = node_new(n, lv.share, lv.share_len)
        c.flags = F_GROUP
        try:
            child_add(n, c, h)
        except MemoryError:
            PyMem_Free(c)
            node_prune(n)
            raise
        n.flags |= F_GROUPS
        return c

    # -- public API ------------------------------------------------------------

    def subscribe(self, subscriber, topic_filter, int qos=0, bint no_local=False,
                  bint retain_as_published=False, int retain_handling=0,
                  long long subscription_id=0):
        """Add a subscription, or replace the options of an identical one.

        Args:
            subscriber: any hashable object identifying the receiver.
            topic_filter: an MQTT topic filter, or ``$share/{name}/{filter}`` to
                join the shared group ``name`` on ``filter``.
            qos: maximum QoS granted (0..2).
            no_local: do not deliver this subscriber's own publications [MQTT-3.8.3-3].
            retain_as_published: keep the RETAIN flag on forwarded messages.
            retain_handling: 0, 1 or 2 (stored for the broker; not used in matching).
            subscription_id: 0 for none, else 1..268,435,455.

        Returns:
            True if the subscription is new, False if it replaced one [MQTT-3.8.4-3].

        Raises:
            MalformedPacket: invalid filter (0x8F), or no_local on a shared
                subscription (0x82) [MQTT-3.8.3-4].
            ValueError: an option out of range.
            TypeError: unhashable subscriber.
        """
        cdef Levels lv
        cdef uint32_t sid, opts
        cdef Node* t
        cdef Py_ssize_t i
        cdef bint fresh = False
        if qos < 0 or qos > 2:
            raise ValueError("qos must be 0, 1 or 2")
        if retain_handling < 0 or retain_handling > 2:
            raise ValueError("retain_handling must be 0, 1 or 2")
        if subscription_id < 0 or subscription_id > MAX_SUBSCRIPTION_ID:
            raise ValueError("subscription_id must be in 0..268435455")
        # The subscriber lookup (two dependent cache misses at a million
        # subscriptions) is started first and overlapped with parsing and the
        # trie walk. It may run user __hash__/__eq__, which could change the
        # trie: the walk is redone if anything changed meanwhile.
        cdef Py_hash_t h = 0
        cdef bint cached = <PyObject*>subscriber == self.last_obj
        cdef uint64_t m0
        if cached:
            sid = self.last_sid
        else:
            h = PyObject_Hash(subscriber)
            self.stab_prefetch_slot(h)
        levels_init(&lv)
        try:
            parse_filter(&lv, topic_filter)
            if lv.share != NULL and no_local:
                raise MalformedPacket("no_local on a shared subscription [MQTT-3.8.3-4]",
                                      PROTOCOL_ERROR)
            opts = (<uint32_t>qos | (M_NL if no_local else 0) | (M_RAP if retain_as_published else 0)
                    | (<uint32_t>retain_handling << M_RH_SHIFT))
            if not cached:
                self.stab_prefetch_record(h)
            t = self.find_node(&lv, True)
            m0 = self.mutations
            if not cached:
                try:
                    sid = self.sid_find(subscriber, h)
                    if sid == NO_SID:
                        sid = self.sid_new(subscriber, h)
                        fresh = True
                        m0 += 1     # our own change
                except BaseException:
                    self.prune_filter(&lv)
                    raise
                if self.mutations != m0:
                    t = self.find_node(&lv, True)
            self.last_obj = self.subs[sid].obj
            self.last_sid = sid
            try:
                i = -1 if fresh else self.entry_find(t, sid)
                if i >= 0:
                    t.entries[i].meta = (t.entries[i].meta & ~(<uint32_t>M_OPTS)) | opts
                    t.entries[i].subid = <uint32_t>subscription_id
                    return False
                self.entry_add(t, sid, opts, <uint32_t>subscription_id)
            except BaseException:
                node_prune(t)
                if fresh and self.subs[sid].nrefs == 0:
                    self.sid_release(sid)
                raise
            return True
        finally:
            levels_free(&lv)

    cdef void prune_filter(self, Levels* lv) noexcept:
        """Free the nodes of lv's filter if they hold nothing (after a failed subscribe)."""
        cdef Node* t
        try:
            t = self.find_node(lv, False)
        except BaseException:
            return
        if t != NULL:
            node_prune(t)

    cdef Py_ssize_t ref_of(self, uint32_t sid, Levels* lv) noexcept:
        """Index of sid's Ref whose node stands for lv's filter, or -1 (checked
        from the subscriber's own few Refs upward through the parents, so no
        walk down from the root)."""
        cdef Sub* rec = &self.subs[sid]
        cdef Ref* refs = rec.refs
        cdef uint32_t r, nr = rec.nrefs, last = lv.n - 1
        cdef const char* key
        cdef uint32_t klen
        cdef uint8_t group = F_GROUP if lv.share != NULL else 0
        cdef Node* n
        if lv.share != NULL:
            key = lv.share
            klen = lv.share_len
        else:
            key = lv.buf + lv.off[last]
            klen = lv.len[last]
        # Every candidate node's miss at once, then compare.
        for r in range(nr):
            fmq_prefetch(refs[r].node)
        for r in range(nr):
            n = refs[r].node
            if node_is(n, key, klen, group):
                # Likely the one: start what entry_remove() reads first (the
                # entry, and the node of the Ref that will move into this
                # one's place) while the parents are checked.
                fmq_prefetch(&n.entries[refs[r].pos])
                if r + 1 != nr:
                    fmq_prefetch(refs[nr - 1].node)
                if node_path_is(n, lv, self.root):
                    return r
        return -1

    def unsubscribe(self, subscriber, topic_filter):
        """Remove one subscription.

        Args:
            subscriber: the subscriber given to :meth:`subscribe`.
            topic_filter: the filter exactly as subscribed (``$share/...`` included).

        Returns:
            True if it existed.

        Raises:
            MalformedPacket: invalid filter (0x8F).
        """
        cdef Levels lv
        cdef Node* t
        cdef Py_ssize_t i
        cdef uint32_t sid = NO_SID
        cdef Py_hash_t h = 0
        cdef Sub* rec
        cdef bint cached = <PyObject*>subscriber == self.last_obj
        if cached:
            sid = self.last_sid
        else:
            h = PyObject_Hash(subscriber)
            self.stab_prefetch_slot(h)
        levels_init(&lv)
        try:
            parse_filter(&lv, topic_filter)     # while the table slot loads
            if not cached:
                self.stab_prefetch_record(h)
                sid = self.sid_find(subscriber, h)  # may run user __eq__
                if sid == NO_SID:
                    return False
                self.last_obj = self.subs[sid].obj
                self.last_sid = sid
            rec = &self.subs[sid]
            if rec.nrefs <= REF_SCAN:
                # A client has a few subscriptions: find this one among them
                # (their nodes load together) instead of walking from the root
                # through one dependent cache miss per level.
                i = self.ref_of(sid, &lv)
                if i < 0:
                    return False
                t = rec.refs[i].node
                i = rec.refs[i].pos
            else:
                t = self.find_node(&lv, False)
                if t == NULL:
                    return False
                i = self.entry_find(t, sid)
                if i < 0:
                    return False
            self.entry_remove(t, <uint32_t>i)
            node_prune(t)
        finally:
            levels_free(&lv)
        if self.subs[sid].nrefs == 0:
            self.sid_release(sid)
        return True

    def remove_subscriber(self, subscriber):
        """Drop every subscription of ``subscriber`` (session end).

        Returns:
            How many subscriptions were removed.
        """
        cdef uint32_t sid = self.sid_of(subscriber)
        if sid == NO_SID:
            return 0
        cdef Sub* rec = &self.subs[sid]
        cdef uint32_t n = rec.nrefs
        cdef Node* t
        cdef uint32_t pos
        while rec.nrefs:
            # Taking the last Ref means no Ref moves.
            t = rec.refs[rec.nrefs - 1].node
            pos = rec.refs[rec.nrefs - 1].pos
            self.entry_remove(t, pos)
            node_prune(t)
        self.sid_release(sid)
        return n

    def subscriptions(self, subscriber):
        """Every subscription of ``subscriber``.

        Returns:
            ``(topic_filter, qos, no_local, retain_as_published, retain_handling,
            subscription_id)`` tuples; shared ones carry their ``$share/`` filter.
            The order is unspecified.
        """
        cdef uint32_t sid = self.sid_of(subscriber), i
        if sid == NO_SID:
            return []
        cdef Sub* rec = &self.subs[sid]
        cdef Entry* e
        cdef list out = []
        for i in range(rec.nrefs):
            e = &rec.refs[i].node.entries[rec.refs[i].pos]
            out.append((node_text(rec.refs[i].node), <int>(e.meta & M_QOS),
                        (e.meta & M_NL) != 0, (e.meta & M_RAP) != 0,
                        <int>((e.meta >> M_RH_SHIFT) & 3), <long long>e.subid))
        return out

    def set_share_policy(self, policy):
        """Choose how a shared group picks the member for each message.

        Args:
            policy: ``"round_robin"`` (default; members in subscription order),
                ``"random"``, or a callable
                ``(share_name, topic_filter, members) -> member or None``
                (None skips the group for that message).

        Raises:
            ValueError: unknown policy name.
            TypeError: neither a name nor a callable.
        """
        if isinstance(policy, str):
            if policy == "round_robin":
                self.policy_kind = 0
            elif policy == "random":
                self.policy_kind = 1
            else:
                raise ValueError(f"unknown share policy {policy!r}")
            self.policy = None
        elif callable(policy):
            self.policy_kind = 2
            self.policy = policy
        else:
            raise TypeError("policy must be a name or a callable")

    def node_count(self):
        """Trie nodes below the root, not counting shared-group nodes.

        Introspection for tests: after unsubscribing everything that was
        subscribed, the count is back where it was (emptied nodes are pruned).
        """
        cdef Py_ssize_t total = 0
        cdef list stack = [<size_t>self.root]
        cdef Node* n
        cdef Node* c
        cdef uint32_t i
        while stack:
            n = <Node*><size_t>stack.pop()
            for i in range(node_slots(n)):
                c = node_child_at(n, i)
                if c != NULL and not (c.flags & F_GROUP):
                    stack.append(<size_t>c)
                    total += 1
        return total

    def __len__(self):
        return self.count

    # -- matching ----------------------------------------------------------------

    cdef int ensure_stack(self, uint32_t need) except -1:
        cdef uint32_t cap
        cdef Node** a
        cdef uint32_t* b
        if need <= self.stk_cap:
            return 0
        cap = need * 2 if need > 32 else 64
        a = <Node**>PyMem_Realloc(self.stk_node, cap * sizeof(Node*))
        if a == NULL:
            raise MemoryError()
        self.stk_node = a
        b = <uint32_t*>PyMem_Realloc(self.stk_level, cap * sizeof(uint32_t))
        if b == NULL:
            raise MemoryError()
        self.stk_level = b
        self.stk_cap = cap
        return 0

    cdef int ensure_hits(self, uint32_t need) except -1:
        cdef uint32_t cap
        cdef Node** a
        if need <= self.hits_cap:
            return 0
        cap = need * 2 if need > 32 else 64
        a = <Node**>PyMem_Realloc(self.hits, cap * sizeof(Node*))
        if a == NULL:
            raise MemoryError()
        self.hits = a
        self.hits_cap = cap
        return 0

    cdef uint32_t collect(self, Levels* lv) except? 0xFFFFFFFF:
        """DFS over the trie for the topic in lv; fills self.hits, returns the count."""
        cdef uint32_t sp = 1, nh = 0, i, L = lv.n
        cdef Node* n
        cdef Node* c
        cdef bint wild
        self.mutations += 1      # self.hits is about to be overwritten
        if self.stk_cap < 64:
            self.ensure_stack(64)
        if self.hits_cap < 64:
            self.ensure_hits(64)
        self.stk_node[0] = self.root
        self.stk_level[0] = 0
        while sp:
            sp -= 1
            n = self.stk_node[sp]
            i = self.stk_level[sp]
            # [MQTT-4.7.2-1] no wildcard at the first level matches a '$' topic.
            wild = not (lv.dollar and i == 0)
            if nh + 2 > self.hits_cap:
                self.ensure_hits(nh + 2)
            if wild and (n.flags & F_MULTI):
                # '#' matches this level's children and the level itself [MQTT-4.7.1-2].
                c = child_find(n, b"#", 1, HASH_MULTI, 0)
                fmq_prefetch(c.entries)     # read soon by match()
                if c.flags & F_GROUPS:
                    fmq_prefetch(c.table)
                self.hits[nh] = c
                nh += 1
            if i == L:
                fmq_prefetch(n.entries)
                if n.flags & F_GROUPS:
                    fmq_prefetch(n.table)
                self.hits[nh] = n
                nh += 1
                continue
            if n.nchildren == 0:
                continue
            if sp + 2 > self.stk_cap:
                self.ensure_stack(sp + 2)
            c = child_find(n, lv.buf + lv.off[i], lv.len[i], lv.hash[i], 0)
            if c != NULL:
                fmq_prefetch(c)     # loads while the '+' branch is walked
                self.stk_node[sp] = c
                self.stk_level[sp] = i + 1
                sp += 1
            if wild and (n.flags & F_PLUS):
                self.stk_node[sp] = child_find(n, b"+", 1, HASH_PLUS, 0)
                self.stk_level[sp] = i + 1
                sp += 1
        return nh

    cdef int xs_append(self, uint32_t* nxs, uint64_t v) except -1:
        cdef uint64_t* p
        cdef uint32_t cap
        if nxs[0] == self.xs_cap:
            cap = grow(self.xs_cap) + 16
            p = <uint64_t*>PyMem_Realloc(self.xs, cap * sizeof(uint64_t))
            if p == NULL:
                raise MemoryError()
            self.xs = p
            self.xs_cap = cap
        self.xs[nxs[0]] = v
        nxs[0] += 1
        return 0

    def match(self, topic, publisher=None):
        """Who receives a message published to ``topic``.

        Args:
            topic: a topic name (no wildcards).
            publisher: the publishing subscriber, for no_local [MQTT-3.8.3-3].

        Returns:
            ``(subscriber, qos, retain_as_published, subscription_ids)`` — one
            per subscriber over its normal subscriptions, merged: the highest
            QoS [MQTT-3.3.4-3], retain_as_published if any says so, the sorted
            distinct non-zero subscription ids [MQTT-3.3.4-4], [MQTT-3.3.4-5];
            then one per matching shared group, for the member the share policy
            chose. Order among deliveries is unspecified.

        Raises:
            MalformedPacket: invalid topic name (0x90).
        """
        cdef Levels lv
        cdef uint32_t nh, h, k, j, nacc = 0, nxs = 0, pub = NO_SID, cap, stamp, sid
        cdef uint32_t qr, a, ne
        cdef uint64_t m, v
        cdef bint groups = False
        cdef Node* n
        cdef Entry* ent
        cdef Entry* e
        cdef Acc* ac
        cdef Sub* info
        cdef Sub* si
        cdef list out
        cdef object ids
        cdef object t
        cdef Py_hash_t ph = 0
        cdef bint lookup = False
        cdef uint64_t m0
        if publisher is not None:
            if <PyObject*>publisher == self.last_obj:
                pub = self.last_sid
            else:
                try:
                    ph = PyObject_Hash(publisher)
                    lookup = True
                    self.stab_prefetch_slot(ph)
                except TypeError:
                    pass    # unhashable: cannot be a subscriber, so no no_local skip
        levels_init(&lv)
        try:
            parse_topic(&lv, topic)
            if lookup:
                self.stab_prefetch_record(ph)
            nh = self.collect(&lv)
            if lookup:
                # After the walk, so the record's cache miss overlapped it; user
                # __eq__ may change the trie or re-enter match(): collect again then.
                m0 = self.mutations
                pub = self.sid_find(publisher, ph)
                if self.mutations != m0:
                    nh = self.collect(&lv)
        finally:
            levels_free(&lv)
        # New generation; on wrap-around clear every stamp once.
        self.stamp += 1
        if self.stamp > STAMP_MASK:
            for k in range(self.sid_used):
                self.subs[k].stamp &= ~STAMP_MASK
            self.stamp = 1
        stamp = self.stamp
        info = self.subs
        # Issue the loads of every reached subscriber's SubInfo before using
        # any, so their cache misses overlap instead of queueing.
        for h in range(nh):
            n = self.hits[h]
            ent = n.entries
            for k in range(n.nentries):
                fmq_prefetch(&info[ent[k].sid])
            if n.flags & F_GROUPS:
                # Shared groups are served last; start their node loads now.
                for k in range(node_slots(n)):
                    fmq_prefetch(node_child_at(n, k))
        for h in range(nh):
            n = self.hits[h]
            if n.flags & F_GROUPS:
                groups = True
            ne = n.nentries
            if ne == 0:
                continue
            ent = n.entries
            if nacc + ne > self.acc_cap:
                cap = (nacc + ne) * 2
                ac = <Acc*>PyMem_Realloc(self.acc, cap * sizeof(Acc))
                if ac == NULL:
                    raise MemoryError()
                self.acc = ac
                self.acc_cap = cap
            for k in range(ne):
                e = &ent[k]
                sid = e.sid
                if (e.meta & M_NL) and sid == pub:
                    continue    # no_local [MQTT-3.8.3-3]
                qr = e.meta & (M_QOS | M_RAP)
                si = &info[sid]
                if (si.stamp & STAMP_MASK) != stamp:
                    si.stamp = (si.stamp & ~STAMP_MASK) | stamp
                    si.slot = nacc
                    ac = &self.acc[nacc]
                    nacc += 1
                    ac.sid = sid
                    ac.obj = si.obj
                    fmq_prefetch(si.obj)    # its refcount is touched below
                    ac.qos_rap = qr
                    ac.subid = e.subid
                    ac.nsubids = 1 if e.subid else 0
                else:
                    # One delivery per subscriber: highest QoS, every id
                    # [MQTT-3.3.4-3], [MQTT-3.3.4-4], [MQTT-3.3.4-5].
                    a = si.slot
                    ac = &self.acc[a]
                    if (qr & M_QOS) > (ac.qos_rap & M_QOS):
                        ac.qos_rap = (ac.qos_rap & M_RAP) | (qr & M_QOS)
                    ac.qos_rap |= qr & M_RAP
                    if e.subid:
                        if ac.nsubids == 0:
                            ac.subid = e.subid
                        else:
                            if ac.nsubids == 1:
                                self.xs_append(&nxs, (<uint64_t>a << 32) | ac.subid)
                            self.xs_append(&nxs, (<uint64_t>a << 32) | e.subid)
                        ac.nsubids += 1
        # The list's slots are filled in place (a slot still NULL if an
        # allocation fails is fine for list_dealloc).
        # Built-in share policies give one delivery per matching group: count
        # them so the list has its final size (no append, no resize).
        cdef uint32_t ngroups = 0, g
        cdef Node* grp
        if groups and self.policy_kind != 2:
            for h in range(nh):
                n = self.hits[h]
                if n.flags & F_GROUPS:
                    for g in range(node_slots(n)):
                        grp = node_child_at(n, g)
                        if grp != NULL and (grp.flags & F_GROUP):
                            ngroups += 1
        cdef PyObject* outp = PyList_New(nacc + ngroups)
        out = <list>outp
        Py_DECREF(out)      # the cast took a second reference
        for a in range(nacc):
            ac = &self.acc[a]
            if ac.nsubids > 1:
                continue
            qr = ac.qos_rap
            if ac.nsubids:
                PyList_SET_ITEM(outp, a, fmq_delivery(ac.obj, QOS_OBJ[qr & M_QOS],
                                                      RAP_OBJ[(qr & M_RAP) != 0],
                                                      fmq_one_id(ac.subid), 1))
            else:
                PyList_SET_ITEM(outp, a, fmq_delivery(ac.obj, QOS_OBJ[qr & M_QOS],
                                                      RAP_OBJ[(qr & M_RAP) != 0],
                                                      <PyObject*>_NO_IDS, 0))
        if nxs:
            qsort(self.xs, nxs, sizeof(uint64_t), qsort_u64)
            j = 0
            while j < nxs:
                a = <uint32_t>(self.xs[j] >> 32)
                ids = []
                while j < nxs and <uint32_t>(self.xs[j] >> 32) == a:
                    v = self.xs[j] & 0xFFFFFFFFu
                    if not ids or ids[len(ids) - 1] != v:  # no negative index: wraparound is off in release builds
                        ids.append(<long long>v)
                    j += 1
                ac = &self.acc[a]
                t = tuple(ids)
                PyList_SET_ITEM(outp, a, fmq_delivery(ac.obj, QOS_OBJ[ac.qos_rap & M_QOS],
                                                      RAP_OBJ[(ac.qos_rap & M_RAP) != 0],
                                                      <PyObject*>t, 0))
        if groups:
            # Shared groups: one delivery per matching group [MQTT-4.8.2].
            if self.policy_kind == 2:
                self.share_by_callable(nh, out)
            else:
                k = nacc
                for h in range(nh):
                    n = self.hits[h]
                    if n.flags & F_GROUPS:
                        k = self.share_builtin(n, outp, k, nacc + ngroups)
                if k != nacc + ngroups:
                    # Only if a finalizer run by an allocation changed the trie.
                    del out[k:]
        return out

    cdef uint32_t share_builtin(self, Node* n, PyObject* outp, uint32_t k,
                                uint32_t end) except? 0xFFFFFFFF:
        """Fill list slots k..end-1 with one delivery per group under n; returns the next slot."""
        cdef uint32_t g, idx
        cdef Node* grp
        cdef Entry* e
        for g in range(node_slots(n)):
            grp = node_child_at(n, g)
            if grp == NULL or not (grp.flags & F_GROUP):
                continue
            if k == end:
                break
            if self.policy_kind == 0:
                idx = grp.nchildren % grp.nentries
                grp.nchildren = idx + 1
            else:
                self.rng ^= self.rng << 13
                self.rng ^= self.rng >> 7
                self.rng ^= self.rng << 17
                idx = <uint32_t>(self.rng % grp.nentries)
            e = &grp.entries[idx]
            if e.subid:
                PyList_SET_ITEM(outp, k, fmq_delivery(self.subs[e.sid].obj,
                                                      QOS_OBJ[e.meta & M_QOS],
                                                      RAP_OBJ[(e.meta & M_RAP) != 0],
                                                      fmq_one_id(e.subid), 1))
            else:
                PyList_SET_ITEM(outp, k, fmq_delivery(self.subs[e.sid].obj,
                                                      QOS_OBJ[e.meta & M_QOS],
                                                      RAP_OBJ[(e.meta & M_RAP) != 0],
                                                      <PyObject*>_NO_IDS, 0))
            k += 1
        return k

    cdef int share_by_callable(self, uint32_t nh, list out) except -1:
        # A callable may run arbitrary code (even change this trie), so copy
        # what it needs into Python objects before calling it.
        cdef uint32_t h, g, idx
        cdef Node* n
        cdef Node* grp
        cdef Entry* e
        cdef list snapshot = []
        for h in range(nh):
            n = self.hits[h]
            if not (n.flags & F_GROUPS):
                continue
            filter_text = node_text(n)
            for g in range(node_slots(n)):
                grp = node_child_at(n, g)
                if grp == NULL or not (grp.flags & F_GROUP):
                    continue
                members = [<object>self.subs[grp.entries[idx].sid].obj
                           for idx in range(grp.nentries)]
                # The members' options as raw Entry bytes: only the chosen
                # one is decoded, so a big group costs no tuple per member.
                entries = PyBytes_FromStringAndSize(<char*>grp.entries,
                                                    grp.nentries * sizeof(Entry))
                snapshot.append((key_text(grp), filter_text, members, entries))
        for name, filter_text, members, entries in snapshot:
            chosen = self.policy(name, filter_text, list(members))
            if chosen is None:
                continue
            try:
                idx = members.index(chosen)
            except ValueError:
                raise ValueError("share policy returned a non-member") from None
            e = &(<Entry*>PyBytes_AS_STRING(entries))[idx]
            out.append((members[idx], <int>(e.meta & M_QOS), (e.meta & M_RAP) != 0,
                        (<long long>e.subid,) if e.subid else ()))
        return 0


cdef int children_into(Node* n, bint skip_dollar, uint32_t level, list work) except -1:
    cdef uint32_t i
    cdef Node* c
    for i in range(node_slots(n)):
        c = node_child_at(n, i)
        if c != NULL and not (skip_dollar and c.keylen and c.key[0] == b'$'):
            work.append((<size_t>c, level))
    return 0


# ---------------------------------------------------------------------------
# garbage collection: the trie's subscriber references live in C arrays that
# Cython's generated tp_traverse cannot see, so a subscriber that refers back
# to its trie (a session holding the broker) would make an uncollectable
# cycle. These slots extend Cython's with the subscriber objects.

cdef traverseproc _cy_trie_traverse = NULL
cdef inquiry _cy_trie_clear = NULL
cdef traverseproc _cy_ret_traverse = NULL    # RetainedStore's, set below its class
cdef inquiry _cy_ret_clear = NULL


cdef int _trie_traverse(PyObject* o, visitproc visit, void* arg) except -1:
    cdef int r
    cdef uint32_t i
    cdef Sub* subs = (<TopicTrie>o).subs
    cdef uint32_t used = (<TopicTrie>o).sid_used
    if _cy_trie_traverse != NULL:
        r = _cy_trie_traverse(o, visit, arg)
        if r:
            return r
    for i in range(used):
        if subs[i].obj != NULL:
            r = visit(subs[i].obj, arg)
            if r:
                return r
    return 0


cdef int _gc_clear(object o) except -1:
    """tp_clear of both types: drop what the C arrays/nodes hold, then what
    Cython's own slot clears."""
    cdef inquiry base
    if type(o) is TopicTrie:
        (<TopicTrie>o).clear_all()
        base = _cy_trie_clear
    else:
        (<RetainedStore>o).clear_all()
        base = _cy_ret_clear
    if base != NULL:
        return base(o)
    return 0


_cy_trie_traverse = (<PyTypeObject*>TopicTrie).tp_traverse
_cy_trie_clear = (<PyTypeObject*>TopicTrie).tp_clear
(<PyTypeObject*>TopicTrie).tp_traverse = _trie_traverse
(<PyTypeObject*>TopicTrie).tp_clear = _gc_clear


# ---------------------------------------------------------------------------
# the retained store

cdef inline RetVal* retval(Node* n) noexcept:
    return <RetVal*>n.entries


@cython.final
cdef class RetainedStore:
    """The latest retained message per topic, looked up by topic filter.

    Messages are opaque objects. Expiry is by absolute time ``expires_at``
    compared with the ``now`` the caller passes (the store reads no clock).
    """

    cdef Node* root
    cdef Py_ssize_t count
    cdef object _gc_anchor      # unused: an object field makes this a GC type (see _ret_traverse)

    def __cinit__(self):
        self.root = node_new(NULL, NULL, 0)

    def __init__(self) -> None:
        """Create an empty store."""

    cdef int clear_all(self) except -1:
        """Drop every message (tp_clear, to break cycles). The tree is detached
        before it is freed: a message's finaliser may use this store again."""
        cdef Node* old = self.root
        self.root = node_new(NULL, NULL, 0)
        self.count = 0
        if old != NULL:
            nodes_free(old, True)
        return 0

    def __dealloc__(self):
        if self.root != NULL:
            nodes_free(self.root, True)
            self.root = NULL

    cdef Node* find(self, Levels* lv, bint create) except? NULL:
        cdef Node* n = self.root
        cdef Node* c
        cdef uint32_t i
        for i in range(lv.n):
            c = child_find(n, lv.buf + lv.off[i], lv.len[i], lv.hash[i], 0)
            if c == NULL:
                if not create:
                    return NULL
                c = node_new(n, lv.buf + lv.off[i], lv.len[i])
                try:
                    child_add(n, c, lv.hash[i])
                except MemoryError:
                    PyMem_Free(c)
                    node_prune(n)
                    raise
            n = c
        return n

    cdef object drop(self, Node* n):
        """Remove n's message and prune; returns the message (caller releases it)."""
        cdef RetVal* rv = retval(n)
        cdef object msg = <object>rv.msg
        Py_DECREF(msg)          # `msg` keeps it alive until the caller drops it
        PyMem_Free(rv)
        n.entries = NULL
        n.flags = 0
        self.count -= 1
        node_prune(n)
        return msg

    def set(self, topic, message, expires_at=None):
        """Store ``message`` as the retained message of ``topic``, replacing any.

        Args:
            topic: a topic name.
            message: any object (the broker stores its Publish).
            expires_at: absolute expiry time, or None for never.

        Raises:
            MalformedPacket: invalid topic name (0x90).
        """
        cdef Levels lv
        cdef Node* n
        cdef RetVal* rv
        cdef object old = None
        cdef double exp = 0.0 if expires_at is None else float(expires_at)
        levels_init(&lv)
        try:
            parse_topic(&lv, topic)
            n = self.find(&lv, True)
        finally:
            levels_free(&lv)
        if n.entries == NULL:
            rv = <RetVal*>PyMem_Malloc(sizeof(RetVal))
            if rv == NULL:
                node_prune(n)
                raise MemoryError()
            n.entries = <Entry*>rv
            self.count += 1
        else:
            rv = retval(n)
            old = <object>rv.msg
            Py_DECREF(old)      # `old` is released after the store is consistent
        Py_INCREF(message)
        rv.msg = <PyObject*>message
        rv.expires = exp
        if expires_at is None:
            n.flags &= ~F_HAS_EXP
        else:
            n.flags |= F_HAS_EXP

    cdef Node* lookup(self, object topic) except? NULL:
        cdef Levels lv
        levels_init(&lv)
        try:
            parse_topic(&lv, topic)
            return self.find(&lv, False)
        finally:
            levels_free(&lv)

    def delete(self, topic):
        """Remove the retained message of ``topic``.

        Returns:
            True if there was one.

        Raises:
            MalformedPacket: invalid topic name (0x90).
        """
        cdef Node* n = self.lookup(topic)
        if n == NULL or n.entries == NULL:
            return False
        self.drop(n)
        return True

    def get(self, topic, now=None):
        """The retained message of ``topic``, or None (also when expired at ``now``).

        Raises:
            MalformedPacket: invalid topic name (0x90).
        """
        cdef Node* n = self.lookup(topic)
        if n == NULL or n.entries == NULL:
            return None
        if now is not None and (n.flags & F_HAS_EXP) and retval(n).expires <= <double>now:
            self.drop(n)
            return None
        return <object>retval(n).msg

    def match(self, topic_filter, now=None):
        """Every retained message whose topic ``topic_filter`` matches.

        Walks only the branches the filter can reach. Topics starting with ``$``
        are not matched by a filter starting with a wildcard [MQTT-4.7.2-1].
        A ``$share/...`` filter returns nothing: MQTT 5.0 section 4.8.2 sends no
        retained messages when a Shared Subscription is made.

        Args:
            topic_filter: an MQTT topic filter.
            now: current time for expiry; None skips the expiry check.

        Returns:
            ``(topic, message)`` pairs, in no particular order. Entries expired
            at ``now`` are left out and removed.

        Raises:
            MalformedPacket: invalid filter (0x8F).
        """
        cdef Levels lv
        cdef list found = []     # node addresses
        cdef list work
        cdef Node* n
        cdef Node* c
        cdef uint32_t i, L
        cdef double t_now = 0.0
        levels_init(&lv)
        try:
            parse_filter(&lv, topic_filter)
            if lv.share != NULL:
                return []
            L = lv.n
            work = [(<size_t>self.root, 0)]
            while work:
                addr, i = work.pop()
                n = <Node*><size_t>addr
                if i == L:
                    if n.entries != NULL:
                        found.append(addr)
                    continue
                if is_level(&lv, i, b'#'):
                    # '#' matches the parent level itself [MQTT-4.7.1-2] ...
                    if i > 0 and n.entries != NULL:
                        found.append(addr)
                    # ... and everything below it.
                    self.all_below(n, i == 0, found)
                elif is_level(&lv, i, b'+'):
                    children_into(n, i == 0, i + 1, work)
                else:
                    c = child_find(n, lv.buf + lv.off[i], lv.len[i], lv.hash[i], 0)
                    if c != NULL:
                        work.append((<size_t>c, i + 1))
        finally:
            levels_free(&lv)
        if now is not None:
            t_now = now
        out = []
        expired = []
        for addr in found:
            n = <Node*><size_t>addr
            if now is not None and (n.flags & F_HAS_EXP) and retval(n).expires <= t_now:
                expired.append(addr)
                continue
            out.append((node_text(n), <object>retval(n).msg))
        dropped = [self.drop(<Node*><size_t>addr) for addr in expired]
        del dropped     # released only now that the store is consistent
        return out

    cdef int all_below(self, Node* top, bint skip_dollar, list found) except -1:
        cdef list work = []
        cdef Node* n
        children_into(top, skip_dollar, 0, work)
        while work:
            addr, _ = work.pop()
            n = <Node*><size_t>addr
            if n.entries != NULL:
                found.append(addr)
            children_into(n, False, 0, work)
        return 0

    def purge_expired(self, now):
        """Remove every message with ``expires_at <= now``.

        Returns:
            How many were removed.
        """
        cdef list found = []
        cdef double t_now = now
        self.all_below(self.root, False, found)
        expired = [addr for addr in found
                   if ((<Node*><size_t>addr).flags & F_HAS_EXP)
                   and retval(<Node*><size_t>addr).expires <= t_now]
        dropped = [self.drop(<Node*><size_t>addr) for addr in expired]
        del dropped
        return len(expired)

    def items(self):
        """Every stored ``(topic, message, expires_at)``, expired or not."""
        cdef list found = []
        cdef Node* n
        self.all_below(self.root, False, found)
        out = []
        for addr in found:
            n = <Node*><size_t>addr
            out.append((node_text(n), <object>retval(n).msg,
                        retval(n).expires if n.flags & F_HAS_EXP else None))
        return out

    def node_count(self):
        """Tree nodes below the root (introspection: emptied nodes are pruned)."""
        cdef list work = []
        cdef Py_ssize_t total = 0
        children_into(self.root, False, 0, work)
        while work:
            addr, _ = work.pop()
            total += 1
            children_into(<Node*><size_t>addr, False, 0, work)
        return total

    def __len__(self):
        return self.count



# Messages live in C nodes Cython's tp_traverse cannot see: a message that
# refers back to its store would make an uncollectable cycle. Visit them too.



cdef struct _Visit:
    visitproc visit
    void* arg


cdef int _visit_message(Node* n, void* v) noexcept:
    cdef _Visit* vv = <_Visit*>v
    if n.entries != NULL and (<RetVal*>n.entries).msg != NULL:
        return vv.visit((<RetVal*>n.entries).msg, vv.arg)
    return 0


cdef int _ret_traverse(PyObject* o, visitproc visit, void* arg) except -1:
    cdef int r
    cdef _Visit v
    if _cy_ret_traverse != NULL:
        r = _cy_ret_traverse(o, visit, arg)
        if r:
            return r
    if (<RetainedStore>o).root == NULL:
        return 0
    v.visit = visit
    v.arg = arg
    return nodes_walk((<RetainedStore>o).root, _visit_message, &v)


_cy_ret_traverse = (<PyTypeObject*>RetainedStore).tp_traverse
_cy_ret_clear = (<PyTypeObject*>RetainedStore).tp_clear
(<PyTypeObject*>RetainedStore).tp_traverse = _ret_traverse
(<PyTypeObject*>RetainedStore).tp_clear = _gc_clear
