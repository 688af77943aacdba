# cython: language_level=3
"""Log writer of the SQLite store: appends records to a segment file and
fsyncs it on a thread that never takes the GIL.

Why this is compiled: the store's writer used to be a Python thread. Every
time it came back from a ``write``/``fsync`` it had to win the GIL back from
the broker's busy trio thread, and every time it held the GIL the trio
thread, back from its own socket call, waited for it. Under load those
hand-offs cost more than the work itself. Here the trio thread copies each
encoded record into a buffer under a mutex (a ``memcpy``), and the writer
thread, a Python thread that enters :meth:`LogWriter.run` and leaves the GIL
behind, swaps that buffer for its own, writes it, fdatasyncs it
(per the mode) and announces progress on an ``eventfd`` that a trio task
watches. No Python object is touched between ``run``'s start and its end.

Progress is counted in *tickets*: the caller passes with each append the
ticket (the store's change sequence number) that the appended bytes complete.
``written`` is the ticket of the last append in the OS (a ``kill -9`` of the
process cannot lose it), ``synced`` that of the last append on disk. Without
``sync`` (the store's ``batch`` mode, where acknowledgements wait for the
write only), a write is announced as soon as it returns, before the periodic
fdatasync that may follow it.

The caller frames its records (:meth:`LogWriter.append`), or hands over the
parts of one and lets the writer thread compute its CRC-32
(:meth:`LogWriter.append_record`: the broker's thread then only copies).
In batch mode the caller may instead write a record itself
(:meth:`LogWriter.write_record`) while the writer is idle with nothing
pending: one ``writev`` into the page cache, then ``written`` moves at once;
the writer thread only fdatasyncs those bytes (at most ``interval`` later).
A segment switch
(:meth:`LogWriter.rotate`) takes effect exactly at the append position where
it was asked for: bytes appended before go to the old file (fsynced and
closed), bytes after to the new one.

Memory: the append buffer grows while the disk is slower than the appends
(the store's callers wait for ``durable`` before acknowledging, which bounds
it); a buffer over 16 MiB is given back after it has been written.
"""

from libc.stdint cimport uint32_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, strdup
from libc.errno cimport errno, EINTR
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC, nanosleep

cdef extern from "<unistd.h>" nogil:
    ssize_t c_write "write"(int fd, const void* buf, size_t n)
    int c_ftruncate "ftruncate"(int fd, long off)
    long c_lseek "lseek"(int fd, long off, int whence)
    int c_close "close"(int fd)
    int c_fsync "fsync"(int fd)
    int c_fdatasync "fdatasync"(int fd)

cdef extern from "<stdio.h>" nogil:
    int c_rename "rename"(const char* old, const char* new)

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t c_writev "writev"(int fd, const iovec* iov, int cnt)

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char* path, int flags, int mode)
    enum:
        O_WRONLY
        O_CREAT
        O_APPEND
        O_CLOEXEC

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    int pthread_condattr_init(pthread_condattr_t* a)
    int pthread_condattr_setclock(pthread_condattr_t* a, int clock)
    int pthread_condattr_destroy(pthread_condattr_t* a)
    int pthread_cond_init(pthread_cond_t* c, pthread_condattr_t* a)
    int pthread_cond_destroy(pthread_cond_t* c)
    int pthread_cond_wait(pthread_cond_t* c, pthread_mutex_t* m)
    int pthread_cond_timedwait(pthread_cond_t* c, pthread_mutex_t* m, const timespec* t)
    int pthread_cond_signal(pthread_cond_t* c)

# CRC-32 (the polynomial of zlib.crc32 and gzip), eight bytes per step
# ("slicing by 8"): the writer thread checksums the records handed over by
# append_record, so the broker's thread does not.
cdef uint32_t CRC_TABLE[8][256]


cdef void _crc_init() noexcept:
    cdef uint32_t c
    cdef int i, k
    for i in range(256):
        c = i
        for k in range(8):
            c = (c >> 1) ^ 0xEDB88320u if c & 1 else c >> 1
        CRC_TABLE[0][i] = c
    for i in range(256):
        c = CRC_TABLE[0][i]
        for k in range(1, 8):
            c = CRC_TABLE[0][c & 0xFF] ^ (c >> 8)
            CRC_TABLE[k][i] = c


_crc_init()


cdef inline uint32_t _le32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline void _put_le(char* w, uint64_t v, int width) noexcept nogil:
    cdef int i
    for i in range(width):
        w[i] = <char>(v & 0xFF)
        v >>= 8


# Carry-less multiplication (PCLMULQDQ, x86-64) folds the data 64 bytes per
# step into four 128-bit lanes, then into one, keeping it congruent modulo
# the CRC polynomial; the table finishes on those 16 bytes and the tail.
# About four times the tables' speed on long records (the event loop
# checksums what it writes itself in batch mode). The fold constants are
# x^d mod P (bit-reflected, as the CRC is) for the distances folded: 512
# +/- 32 bits across the four lanes, 128 +/- 32 bits within one.
cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #if defined(__x86_64__) && defined(__GNUC__)
    #include <immintrin.h>
    static inline __attribute__((target("pclmul,sse2"))) __m128i
    fm_fold(__m128i x, __m128i k)
    {
        return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00),
                             _mm_clmulepi64_si128(x, k, 0x11));
    }
    /* n >= 64. reg: the CRC register (inverted, as the table loop keeps it).
       Writes the folded 16 bytes to out; returns the bytes consumed (a
       multiple of 16, at most n). */
    static __attribute__((target("pclmul,sse2"))) size_t
    fm_clmul_fold(uint32_t reg, const unsigned char *p, size_t n, unsigned char *out)
    {
        const __m128i k512 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
        const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
        __m128i a = _mm_loadu_si128((const __m128i *)p);
        __m128i b = _mm_loadu_si128((const __m128i *)(p + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(p + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(p + 48));
        size_t off = 64;
        a = _mm_xor_si128(a, _mm_cvtsi32_si128((int)reg));
        while (n - off >= 64) {
            a = _mm_xor_si128(fm_fold(a, k512), _mm_loadu_si128((const __m128i *)(p + off)));
            b = _mm_xor_si128(fm_fold(b, k512), _mm_loadu_si128((const __m128i *)(p + off + 16)));
            c = _mm_xor_si128(fm_fold(c, k512), _mm_loadu_si128((const __m128i *)(p + off + 32)));
            d = _mm_xor_si128(fm_fold(d, k512), _mm_loadu_si128((const __m128i *)(p + off + 48)));
            off += 64;
        }
        a = _mm_xor_si128(fm_fold(a, k128), b);
        a = _mm_xor_si128(fm_fold(a, k128), c);
        a = _mm_xor_si128(fm_fold(a, k128), d);
        while (n - off >= 16) {
            a = _mm_xor_si128(fm_fold(a, k128), _mm_loadu_si128((const __m128i *)(p + off)));
            off += 16;
        }
        _mm_storeu_si128((__m128i *)out, a);
        return off;
    }
    static int fm_have_clmul(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
    }
    #else
    static size_t fm_clmul_fold(uint32_t reg, const unsigned char *p, size_t n,
                                unsigned char *out) { return 0; }
    static int fm_have_clmul(void) { return 0; }
    #endif
    """
    size_t fm_clmul_fold(uint32_t reg, const unsigned char* p, size_t n,
                         unsigned char* out) noexcept nogil
    int fm_have_clmul() noexcept nogil

cdef bint _clmul = fm_have_clmul()

#: True when CRC-32 uses carry-less multiplication on this CPU (else tables).
CRC_CLMUL = bool(_clmul)


cdef uint32_t _crc_tables(uint32_t crc, const unsigned char* p, size_t n) noexcept nogil:
    """The CRC register (inverted) after ``p[:n]``, eight bytes a step."""
    cdef uint32_t a, b
    while n >= 8:
        a = _le32(p) ^ crc
        b = _le32(p + 4)
        crc = (CRC_TABLE[7][a & 0xFF] ^ CRC_TABLE[6][(a >> 8) & 0xFF]
               ^ CRC_TABLE[5][(a >> 16) & 0xFF] ^ CRC_TABLE[4][a >> 24]
               ^ CRC_TABLE[3][b & 0xFF] ^ CRC_TABLE[2][(b >> 8) & 0xFF]
               ^ CRC_TABLE[1][(b >> 16) & 0xFF] ^ CRC_TABLE[0][b >> 24])
        p += 8
        n -= 8
    while n:
        crc = CRC_TABLE[0][(crc ^ p[0]) & 0xFF] ^ (crc >> 8)
        p += 1
        n -= 1
    return crc


cdef uint32_t _crc32(uint32_t crc, const unsigned char* p, size_t n) noexcept nogil:
    cdef unsigned char folded[16]
    cdef size_t used
    crc = ~crc
    if _clmul and n >= 64:
        used = fm_clmul_fold(crc, p, n, folded)
        # The folded lanes stand for everything consumed, the register
        # included: their CRC from a zero register continues it.
        crc = _crc_tables(0, folded, 16)
        p += used
        n -= used
    return ~_crc_tables(crc, p, n)


def crc32(const unsigned char[::1] data, uint32_t value=0, bint tables=False) -> int:
    """CRC-32 of ``data`` (equal to ``zlib.crc32(data, value)``), as the log
    writer computes it; ``tables``: without carry-less multiplication (the
    fallback on other CPUs), for tests."""
    if data.shape[0] == 0:
        return value
    if tables:
        return ~_crc_tables(~value, &data[0], data.shape[0]) & 0xFFFFFFFF
    return _crc32(value, &data[0], data.shape[0])


DEF SHRINK_ABOVE = 16 * 1024 * 1024
# write_record writes on the caller's thread only while less than this has
# been written that way since the last fdatasync completed: a disk that
# falls behind sends the records back through the writer thread, whose
# pending bytes the store bounds.
DEF DIRECT_UNSYNCED_MAX = 8 * 1024 * 1024
DEF FIRST_CAPACITY = 64 * 1024

#: Waits (seconds) between attempts at a failing write; after the last the
#: writer stops with the error (a full disk may clear up meanwhile).
cdef double RETRY_DELAYS[5]
RETRY_DELAYS[:] = [0.05, 0.15, 0.45, 1.35, 2.0]


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void _sleep(double seconds) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = <long>seconds
    ts.tv_nsec = <long>((seconds - ts.tv_sec) * 1e9)
    nanosleep(&ts, NULL)


cdef class LogWriter:
    """Appends bytes to a file from a GIL-free thread.

    Args:
        fd: the open segment file (write, append); the writer closes it.
        dirfd: the data directory, fsynced after a new segment is created
            (-1: never); the writer does not close it.
        sync: fdatasync after every write (``synced`` follows ``written``);
            otherwise at most every ``interval`` seconds.
        interval: the fsync period of the batch mode, in seconds.
    """

    cdef pthread_mutex_t mu
    cdef pthread_cond_t cv
    cdef char* buf
    cdef size_t blen
    cdef size_t bcap
    cdef char* wbuf
    cdef size_t wcap
    # Records appended by append_record whose CRC the writer fills in:
    # (offset of the CRC field, length of what it covers) pairs, for buf
    # and, once swapped, for wbuf.
    cdef size_t* crcs
    cdef size_t ncrcs, crcs_cap
    cdef size_t* wcrcs
    cdef size_t wcrcs_cap
    cdef uint64_t appended
    cdef uint64_t _written
    cdef uint64_t _synced
    cdef int fd
    cdef int dirfd
    cdef int efd
    cdef int err
    cdef int fail_next
    cdef int fail_sync
    cdef double sync_delay  # seconds each fdatasync waits first (tests)
    cdef int _errnum
    #: Multiplies the waits between write attempts (tests set 0).
    cdef public double retry_scale
    cdef char* next_path
    cdef char* next_spare  # a folded segment to become next_path (or NULL)
    cdef size_t switch_at
    # The current file is a recycled segment, written from its start over
    # what it held before (not in append mode): cut at the end of what was
    # written when it is left.
    cdef bint recycled
    cdef readonly uint64_t recycled_segments
    cdef bint closing
    cdef bint paused
    cdef bint sync
    cdef bint started
    # The writer thread holds a swapped buffer it has not finished writing.
    cdef bint writing
    # write_record wrote since the writer's last fdatasync began; bytes it
    # wrote since the last fdatasync completed.
    cdef bint ddirty
    cdef size_t dbytes
    cdef double interval
    cdef readonly uint64_t writes
    cdef readonly uint64_t fsyncs
    cdef readonly uint64_t bytes_written
    cdef readonly uint64_t retries
    cdef readonly uint64_t direct_writes

    def __cinit__(self, int fd, int dirfd=-1, bint sync=True, double interval=0.01):
        cdef pthread_condattr_t attr
        pthread_mutex_init(&self.mu, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&self.cv, &attr)
        pthread_condattr_destroy(&attr)
        self.fd = fd
        self.dirfd = dirfd
        self.sync = sync
        self.interval = interval if interval > 0 else 0.0
        self.retry_scale = 1.0
        self.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.efd < 0:
            raise OSError(errno, "eventfd failed")

    def __dealloc__(self):
        if self.fd >= 0 and not self.started:
            c_close(self.fd)
        if self.efd >= 0:
            c_close(self.efd)
        free(self.buf)
        free(self.wbuf)
        free(self.crcs)
        free(self.wcrcs)
        free(self.next_path)
        free(self.next_spare)
        pthread_cond_destroy(&self.cv)
        pthread_mutex_destroy(&self.mu)

    # ------------------------------------------------------------ caller side

    @property
    def notify_fd(self) -> int:
        """An ``eventfd``, readable after each step forward (or failure)."""
        return self.efd

    @property
    def written(self) -> int:
        """Ticket of the last append handed to the OS."""
        pthread_mutex_lock(&self.mu)
        v = self._written
        pthread_mutex_unlock(&self.mu)
        return v

    @property
    def synced(self) -> int:
        """Ticket of the last append on disk (fdatasync returned)."""
        pthread_mutex_lock(&self.mu)
        v = self._synced
        pthread_mutex_unlock(&self.mu)
        return v

    @property
    def pending(self) -> int:
        """Bytes appended and not yet handed to the OS."""
        pthread_mutex_lock(&self.mu)
        v = self.blen
        pthread_mutex_unlock(&self.mu)
        return v

    @property
    def error(self) -> int:
        """errno of the failure that stopped the writer; 0 while it works."""
        return self.err

    cdef int _reserve(self, size_t n) noexcept nogil:
        """Room for ``n`` more bytes in buf (mutex held); -1: out of memory."""
        cdef size_t need = self.blen + n
        cdef size_t cap
        cdef char* grown
        if need > self.bcap:
            cap = self.bcap * 2 if self.bcap else FIRST_CAPACITY
            while cap < need:
                cap *= 2
            grown = <char*>realloc(self.buf, cap)
            if grown == NULL:
                return -1
            self.buf = grown
            self.bcap = cap
        return 0

    cdef int _lock_working(self) except -1:
        """Take the mutex, unless the writer has failed.

        Raises:
            OSError: the writer has failed (the mutex is not held then).
        """
        pthread_mutex_lock(&self.mu)
        if self.err:
            pthread_mutex_unlock(&self.mu)
            raise OSError(self.err, "log writer failed")
        return 0

    def append_record(self, uint64_t lsn, bytes head, bytes cold, bytes ops,
                      uint64_t ticket):
        """Queue one framed record: ``<I length><Q lsn><I crc>`` then
        ``head + cold + ops``, ``length`` counting the CRC and what follows.
        The writer thread computes the CRC-32 of ``head + cold + ops`` before
        the record reaches the file; here the parts are only copied.

        Raises:
            OSError: the writer has failed (nothing more is written).
        """
        cdef size_t nh = PyBytes_GET_SIZE(head)
        cdef size_t nc = PyBytes_GET_SIZE(cold)
        cdef size_t no = PyBytes_GET_SIZE(ops)
        cdef size_t body = nh + nc + no
        cdef size_t* grown
        cdef size_t cap
        cdef char* w
        self._lock_working()
        if self.ncrcs + 2 > self.crcs_cap:
            cap = self.crcs_cap * 2 if self.crcs_cap else 64
            grown = <size_t*>realloc(self.crcs, cap * sizeof(size_t))
            if grown == NULL:
                pthread_mutex_unlock(&self.mu)
                raise MemoryError()
            self.crcs = grown
            self.crcs_cap = cap
        if self._reserve(16 + body):
            pthread_mutex_unlock(&self.mu)
            raise MemoryError()
        w = self.buf + self.blen
        _put_le(w, 4 + body, 4)
        _put_le(w + 4, lsn, 8)
        memcpy(w + 16, PyBytes_AS_STRING(head), nh)
        memcpy(w + 16 + nh, PyBytes_AS_STRING(cold), nc)
        memcpy(w + 16 + nh + nc, PyBytes_AS_STRING(ops), no)
        self.crcs[self.ncrcs] = self.blen + 12
        self.crcs[self.ncrcs + 1] = body
        self.ncrcs += 2
        self.blen += 16 + body
        self.appended = ticket
        # Signalled after the unlock: a writer woken on this core would
        # otherwise run only to block on the mutex still held here.
        pthread_mutex_unlock(&self.mu)
        pthread_cond_signal(&self.cv)

    cdef bint _direct_ok(self) noexcept nogil:
        """write_record may write now (mutex held): batch mode, the writer
        idle with everything before written, no switch, pause, failure or
        injected failure pending, and the disk not far behind."""
        return not (self.sync or self.err or self.closing or self.paused or self.writing
                    or self.blen or self.next_path != NULL or self.fail_next > 0
                    or self.fd < 0 or self._written != self.appended
                    or self.dbytes > DIRECT_UNSYNCED_MAX)

    def write_record(self, uint64_t lsn, bytes head, bytes cold, bytes ops,
                     uint64_t ticket) -> bool:
        """The record of :meth:`append_record`, written to the file now by
        the calling thread (one ``writev`` into the page cache, CRC computed
        here), when the writer is idle and nothing is pending before it; a
        ``kill -9`` cannot lose it once this returns True, so ``written``
        is ``ticket`` at once and the writer thread only fdatasyncs it (at
        most ``interval`` later). Batch mode only: with ``sync`` it always
        returns False.

        Returns:
            True: written. False: queued as by :meth:`append_record` (the
            writer is busy, a switch or pause is pending, the disk is more
            than 8 MiB behind, or the write failed: the writer retries what
            is left); wait for ``written`` as usual.

        Raises:
            OSError: the writer has failed (nothing more is written).
        """
        cdef size_t nh = PyBytes_GET_SIZE(head)
        cdef size_t nc = PyBytes_GET_SIZE(cold)
        cdef size_t no = PyBytes_GET_SIZE(ops)
        cdef size_t body = nh + nc + no
        cdef size_t total = 16 + body
        cdef size_t done = 0
        cdef ssize_t r
        cdef int first = 0
        cdef int i
        cdef uint32_t crc
        cdef bint wake
        cdef char hdr[16]
        cdef iovec iov[4]
        cdef char* w
        self._lock_working()
        if not self._direct_ok():
            pthread_mutex_unlock(&self.mu)
            self.append_record(lsn, head, cold, ops, ticket)
            return False
        crc = _crc32(0, <const unsigned char*>PyBytes_AS_STRING(head), nh)
        crc = _crc32(crc, <const unsigned char*>PyBytes_AS_STRING(cold), nc)
        crc = _crc32(crc, <const unsigned char*>PyBytes_AS_STRING(ops), no)
        _put_le(hdr, 4 + body, 4)
        _put_le(hdr + 4, lsn, 8)
        _put_le(hdr + 12, crc, 4)
        iov[0].iov_base = hdr
        iov[0].iov_len = 16
        iov[1].iov_base = PyBytes_AS_STRING(head)
        iov[1].iov_len = nh
        iov[2].iov_base = PyBytes_AS_STRING(cold)
        iov[2].iov_len = nc
        iov[3].iov_base = PyBytes_AS_STRING(ops)
        iov[3].iov_len = no
        while done < total:
            r = c_writev(self.fd, &iov[first], 4 - first)
            if r < 0:
                if errno == EINTR:
                    continue
                break  # the writer retries it, with its pauses
            done += <size_t>r
            self.bytes_written += <uint64_t>r
            while first < 4 and <size_t>r >= iov[first].iov_len:
                r -= iov[first].iov_len
                first += 1
            if first < 4:
                iov[first].iov_base = <char*>iov[first].iov_base + r
                iov[first].iov_len -= <size_t>r
        if done:
            wake = not self.ddirty
            self.ddirty = True
            self.dbytes += done
        else:
            wake = False
        if done == total:
            self._written = ticket
            self.appended = ticket
            self.direct_writes += 1
            pthread_mutex_unlock(&self.mu)
            if wake:  # the writer's fdatasync is now due within interval
                pthread_cond_signal(&self.cv)
            return True
        # Short or failed: the writer thread writes the rest (CRC included).
        if self._reserve(total - done):
            pthread_mutex_unlock(&self.mu)
            raise MemoryError()
        w = self.buf + self.blen
        for i in range(first, 4):
            memcpy(w, iov[i].iov_base, iov[i].iov_len)
            w += iov[i].iov_len
        self.blen += total - done
        self.appended = ticket
        pthread_mutex_unlock(&self.mu)
        pthread_cond_signal(&self.cv)
        return False

    def advance(self, uint64_t ticket) -> bool:
        """An append of nothing but ``ticket`` (its changes cancelled out),
        taken as written at once when :meth:`write_record` could write now;
        otherwise queued as by :meth:`append`. True: ``written`` is
        ``ticket``."""
        self._lock_working()
        if self._direct_ok():
            self._written = ticket
            self.appended = ticket
            pthread_mutex_unlock(&self.mu)
            return True
        self.appended = ticket
        pthread_mutex_unlock(&self.mu)
        pthread_cond_signal(&self.cv)
        return False

    def append(self, const unsigned char[::1] data, uint64_t ticket):
        """Queue ``data`` (may be empty) for the file; ``ticket`` is what the
        caller may call written once it is.

        Raises:
            OSError: the writer has failed (nothing more is written).
        """
        cdef size_t n = data.shape[0]
        self._lock_working()
        if n:
            if self._reserve(n):
                pthread_mutex_unlock(&self.mu)
                raise MemoryError()
            memcpy(self.buf + self.blen, &data[0], n)
            self.blen += n
        self.appended = ticket
        pthread_mutex_unlock(&self.mu)
        pthread_cond_signal(&self.cv)  # after the unlock, as in append_record

    def rotate(self, bytes path, bytes spare=None) -> bool:
        """Continue in a new file at ``path`` from the current append
        position. False: a switch is still pending; ask again later.

        ``path`` is created, or, with ``spare`` (a segment file whose records
        are all folded), is ``spare`` renamed: its pages are in the page
        cache and its blocks allocated, so writing over them costs neither
        a page allocation per 4 KiB (on the broker's thread, in batch mode)
        nor block allocation at each fdatasync. What it held stays after
        the written end until the file is left (then it is cut there);
        readers tell those records by their lsn (older than the segment's
        first). If the rename fails, ``path`` is created as without it."""
        pthread_mutex_lock(&self.mu)
        if self.next_path != NULL:
            pthread_mutex_unlock(&self.mu)
            return False
        self.next_path = strdup(path)
        self.next_spare = strdup(spare) if spare is not None else NULL
        self.switch_at = self.blen
        pthread_cond_signal(&self.cv)
        pthread_mutex_unlock(&self.mu)
        return True

    def stop(self) -> None:
        """Write what is appended (and fsync it), then leave :meth:`run`."""
        pthread_mutex_lock(&self.mu)
        self.closing = True
        self.paused = False
        pthread_cond_signal(&self.cv)
        pthread_mutex_unlock(&self.mu)

    def pause(self, bint on=True) -> None:
        """Hold (or release) the writer before its next write: for tests that
        need a commit to be late."""
        pthread_mutex_lock(&self.mu)
        self.paused = on
        pthread_cond_signal(&self.cv)
        pthread_mutex_unlock(&self.mu)

    def inject_failure(self, int errnum, int writes=0, int fsyncs=0) -> None:
        """Make the next ``writes`` write attempts and ``fsyncs`` fdatasync
        calls fail with ``errnum`` (tests)."""
        pthread_mutex_lock(&self.mu)
        self._errnum = errnum
        self.fail_next = writes
        self.fail_sync = fsyncs
        pthread_mutex_unlock(&self.mu)

    def inject_sync_delay(self, double seconds) -> None:
        """Make every later fdatasync wait ``seconds`` first: a slow disk
        (tests)."""
        pthread_mutex_lock(&self.mu)
        self.sync_delay = seconds
        pthread_mutex_unlock(&self.mu)

    # ------------------------------------------------------------ writer side

    def run(self) -> None:
        """The writer loop; returns after :meth:`stop` (everything written) or
        a failure (see :attr:`error`). Call on a thread of its own, once."""
        if self.started:
            raise RuntimeError("LogWriter.run() called twice")
        self.started = True
        with nogil:
            self._loop()
            if self.fd >= 0:
                if self.recycled and self.err == 0:
                    self._cut(self.fd)  # tidy; recovery copes without
                c_close(self.fd)
                self.fd = -1
            self._signal()

    cdef int _cut(self, int fd) noexcept nogil:
        """Cut a recycled file at the end of what was written to it, and
        fdatasync it: the one sync puts on disk both what was written and
        the new size (fdatasync flushes a size change, being needed to read
        the data back). Returns 0 or an errno."""
        cdef long end = c_lseek(fd, 0, 1)  # SEEK_CUR: the write position
        if end < 0 or c_ftruncate(fd, end) != 0:
            return errno
        return self._datasync(fd)

    cdef void _signal(self) noexcept nogil:
        cdef uint64_t one = 1
        c_write(self.efd, &one, 8)

    cdef int _write_all(self, const char* p, size_t n) noexcept nogil:
        """Write ``n`` bytes, retrying short writes, EINTR and (after a pause)
        other errors a few times. 0 or the errno that stayed."""
        cdef ssize_t r
        cdef int attempt = 0
        cdef int e
        while n:
            if self.fail_next > 0:
                self.fail_next -= 1
                r = -1
                e = self._errnum
            else:
                r = c_write(self.fd, p, n)
                e = errno
            if r >= 0:
                p += r
                n -= <size_t>r
                self.bytes_written += <uint64_t>r
                continue
            if e == EINTR:
                continue
            if attempt >= 5:
                return e
            _sleep(RETRY_DELAYS[attempt] * self.retry_scale)
            attempt += 1
            self.retries += 1
        return 0

    cdef int _datasync(self, int fd) noexcept nogil:
        cdef int r
        if self.fail_sync > 0:
            self.fail_sync -= 1
            return self._errnum
        if self.sync_delay > 0:
            _sleep(self.sync_delay)
        while True:
            r = c_fdatasync(fd)
            if r == 0:
                self.fsyncs += 1
                return 0
            if errno != EINTR:
                return errno

    cdef void _loop(self) noexcept nogil:
        cdef char* tmp
        cdef size_t* ctmp
        cdef size_t tcap, n, sw, ncrc, i
        cdef uint64_t target
        cdef char* path
        cdef char* spare
        cdef int rc, nfd
        cdef bint dirty = False  # written but not fsynced
        cdef bint closing
        cdef bint told
        cdef uint64_t synced_upto, before
        cdef size_t dsnap
        cdef double last_sync = _now()
        cdef double deadline
        cdef timespec ts
        while True:
            pthread_mutex_lock(&self.mu)
            while True:
                if self.closing:
                    break
                if not self.paused and (self.appended != self._written
                                        or self.next_path != NULL):
                    break
                if (dirty or self.ddirty) and not self.sync and not self.paused:
                    deadline = last_sync + self.interval
                    if _now() >= deadline:
                        break
                    ts.tv_sec = <long>deadline
                    ts.tv_nsec = <long>((deadline - ts.tv_sec) * 1e9)
                    pthread_cond_timedwait(&self.cv, &self.mu, &ts)
                else:
                    pthread_cond_wait(&self.cv, &self.mu)
            closing = self.closing
            n = self.blen
            tmp = self.buf
            tcap = self.bcap
            self.buf = self.wbuf
            self.bcap = self.wcap
            self.wbuf = tmp
            self.wcap = tcap
            self.blen = 0
            ctmp = self.crcs
            tcap = self.crcs_cap
            self.crcs = self.wcrcs
            self.crcs_cap = self.wcrcs_cap
            self.wcrcs = ctmp
            self.wcrcs_cap = tcap
            ncrc = self.ncrcs
            self.ncrcs = 0
            target = self.appended
            path = self.next_path
            self.next_path = NULL
            spare = self.next_spare
            self.next_spare = NULL
            sw = self.switch_at
            self.writing = n > 0 or path != NULL
            before = self._written
            pthread_mutex_unlock(&self.mu)

            i = 0
            while i < ncrc:  # before any of wbuf is written (a switch splits it)
                _put_le(self.wbuf + self.wcrcs[i],
                        _crc32(0, <const unsigned char*>self.wbuf + self.wcrcs[i] + 4,
                               self.wcrcs[i + 1]), 4)
                i += 2
            rc = 0
            if path != NULL:
                # The old segment gets what came before the switch, on disk,
                # before the new one exists.
                rc = self._write_all(self.wbuf, sw)
                if rc == 0:
                    # A recycled file is cut at the end of its own records
                    # (what it held before goes), on disk before the next
                    # segment exists: only the last segment can have older
                    # records after its own.
                    rc = self._cut(self.fd) if self.recycled else self._datasync(self.fd)
                if rc == 0:
                    c_close(self.fd)
                    self.fd = -1
                    # (Once renamed, the file must be written from its
                    # start: never appended to after what it held.)
                    self.recycled = spare != NULL and c_rename(spare, path) == 0
                    if self.recycled:
                        nfd = c_open(path, O_WRONLY | O_CLOEXEC, 0o644)
                    else:
                        nfd = c_open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
                    if nfd < 0:
                        rc = errno
                    else:
                        self.fd = nfd
                        if self.recycled:
                            self.recycled_segments += 1
                        if self.dirfd >= 0:
                            c_fsync(self.dirfd)
                free(path)
                free(spare)
                if rc == 0 and n > sw:
                    rc = self._write_all(self.wbuf + sw, n - sw)
                    dirty = True
            elif n:
                rc = self._write_all(self.wbuf, n)
                dirty = True
            if rc == 0 and n:
                self.writes += 1
            told = False
            pthread_mutex_lock(&self.mu)
            # write_record may write again (batch), also while this step's
            # fdatasync runs; it moves _written past target meanwhile.
            self.writing = False
            if rc == 0 and n and not self.sync:
                # batch: acknowledgements wait for the write only; tell them
                # now, not after the periodic fdatasync that may follow.
                if target > self._written:
                    self._written = target
                told = True
            pthread_mutex_unlock(&self.mu)
            if told:
                self._signal()
            synced_upto = 0
            if rc == 0 and (dirty or self.ddirty) and (self.sync or closing
                                                       or _now() - last_sync >= self.interval):
                pthread_mutex_lock(&self.mu)
                # What this fdatasync covers: everything written before it
                # starts, by this thread (target) or by write_record.
                synced_upto = self._written if self._written > target else target
                self.ddirty = False
                dsnap = self.dbytes
                pthread_mutex_unlock(&self.mu)
                rc = self._datasync(self.fd)
                pthread_mutex_lock(&self.mu)
                if rc == 0:
                    dirty = False
                    last_sync = _now()
                    self.dbytes -= dsnap
                else:
                    self.ddirty = True
                pthread_mutex_unlock(&self.mu)
            pthread_mutex_lock(&self.mu)
            if rc:
                self.err = rc
            else:
                if target > self._written:
                    self._written = target
                if not dirty and not self.ddirty:
                    self._synced = self._written  # nothing written since the fdatasync
                elif synced_upto > self._synced:
                    self._synced = synced_upto
            pthread_mutex_unlock(&self.mu)
            # (batch: ``synced`` is read, never waited on, so a periodic
            # fdatasync of write_record's bytes alone is not announced.)
            if rc or not (told or (not self.sync and target == before)):
                self._signal()
            if rc:
                return
            if self.wcap > SHRINK_ABOVE:
                free(self.wbuf)
                self.wbuf = NULL
                self.wcap = 0
            if closing:
                pthread_mutex_lock(&self.mu)
                if self.appended == self._written and self.next_path == NULL:
                    pthread_mutex_unlock(&self.mu)
                    return
                pthread_mutex_unlock(&self.mu)
