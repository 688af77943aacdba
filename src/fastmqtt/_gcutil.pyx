# cython: language_level=3
"""Taking the broker's queued messages out of the cyclic garbage collector.

A message queued for an offline session lives until that session comes back
or expires: with many of them queued, the collections walk them again and
again (measured on the offline persistence benchmark: 0.5 us of collection
per queued message over a run, and a 90 ms pause for each full collection
with 400,000 queued).
The broker's ``Message`` and ``Outgoing`` refer only to strings, bytes,
numbers, tuples and dicts of those, never back to anything that could refer
to them, so they can be in no reference cycle: reference counting frees them,
and the cyclic collector has nothing to find there.
"""

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)
    bint PyObject_GC_IsTracked(object op)


def untrack(a, b=None) -> None:
    """Stop the cyclic GC from walking ``a`` (and ``b``): objects that can be
    in no reference cycle. Harmless on an object that is not tracked."""
    if PyObject_GC_IsTracked(a):
        PyObject_GC_UnTrack(<void*>a)
    if b is not None and PyObject_GC_IsTracked(b):
        PyObject_GC_UnTrack(<void*>b)
