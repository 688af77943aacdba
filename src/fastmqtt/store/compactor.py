"""The SQLite store's compactor process.

:class:`~fastmqtt.store.sqlite.SqliteStore` (with ``compactor="process"``, the
default) starts ``python -m fastmqtt.store.compactor`` to fold its log into the
tables. Folding is Python work: unpickling records, merging them into one net
effect, building rows for SQLite. In a thread of the broker it competes with
the event loop for the GIL, and every system call the loop makes hands the GIL
over to it; measured on the persistence benchmark, that cost the loop more
than the folding itself. In a process of its own it runs on another core and
the broker only waits for its answer on a pipe.

Protocol, one line each way (ASCII, over the child's stdin and stdout)::

    parent: fold <lsn>          fold every record up to <lsn> (written already)
    parent: fold <lsn> hold     read them, but fold only those the last
                                "hold" read (see _Folder.fold)
    child:  done <lsn> <ops>    the tables hold everything up to <lsn>
    child:  fail <reason>       nothing folded (what was read is kept; ask again)

The child reads the records from the segment files itself. It exits when its
stdin closes, and is killed with the broker (``PR_SET_PDEATHSIG``): a
compaction cut short is a transaction SQLite rolls back, and the log still
holds its records.

``FASTMQTT_COMPACTOR_STALL`` (tests only): a path; inside the first
compaction transaction, once its rows are written, the child creates that file
(holding its pid) and waits there until it is killed.
"""

from __future__ import annotations

import gc
import os
import sys
import time


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: stdin EOF only
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data_dir, db_path, parent = argv[0], argv[1], int(argv[2])  # then CHECKPOINT_BYTES
    _die_with_parent(parent)
    from . import sqlite as store

    if len(argv) > 3:
        store.CHECKPOINT_BYTES = int(argv[3])

    stall = os.environ.get("FASTMQTT_COMPACTOR_STALL")
    if stall:
        inner = store._apply_tables

        def stalled(conn, batch):
            inner(conn, batch)
            with open(stall + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(stall + ".tmp", stall)
            time.sleep(3600)

        store._apply_tables = stalled

    out = sys.stdout.buffer
    try:
        conn = store._connect(db_path, "FULL")
        folder = store._Folder(conn, data_dir, db_path)
    except Exception as e:
        out.write(f"fail cannot open {db_path}: {e}\n".encode("ascii", "replace"))
        out.flush()
        return 1
    # The cyclic GC runs once after each fold, not during it: a fold builds a
    # list per delivery and a tuple per message, hundreds of thousands with
    # offline queues, and the automatic collections walking them took an
    # eighth of the process's time (py-spy, persistence benchmark). None of
    # it is cyclic (reference counting frees the batch); what outlives the
    # start-up is frozen out of every collection.
    gc.freeze()
    gc.disable()
    for line in sys.stdin.buffer:
        cmd, _, arg = line.strip().partition(b" ")
        if cmd != b"fold":
            reply = f"fail unknown command {line[:40]!r}"
        else:
            upto, _, hold = arg.partition(b" ")
            try:
                lsn, ops = folder.fold(int(upto), hold == b"hold")
            except Exception as e:
                reply = f"fail {type(e).__name__}: {e}"
            else:
                reply = f"done {lsn} {ops}"
        out.write(reply.replace("\n", " ").encode("ascii", "replace") + b"\n")
        out.flush()
        gc.collect()
    folder.close()
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
