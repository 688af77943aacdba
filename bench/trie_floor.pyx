# cython: language_level=3, boundscheck=False, wraparound=False
"""The floor of the match benchmark: what any matcher that returns what
``TopicTrie.match`` returns (a new list of new ``(subscriber, qos, rap, ids)``
tuples) costs in the benchmark loop, with no matching work at all: one dict
probe for the topic's precomputed subscribers, then the list. Compiled at run
time by bench/trie_corpus.py (pyximport); never part of the package.
"""

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

cdef extern from "Python.h":
    PyObject* PyTuple_New(Py_ssize_t n) except NULL
    void PyTuple_SET_ITEM(PyObject* t, Py_ssize_t i, PyObject* v)
    PyObject* PyList_New(Py_ssize_t n) except NULL
    void PyList_SET_ITEM(PyObject* l, Py_ssize_t i, PyObject* v)
    PyObject* PyDict_GetItemWithError(object d, object k) except? NULL

cdef object QOS1 = 1, NO = False, NO_IDS = ()


cdef class Floor:
    cdef dict answers

    def __init__(self, dict answers):
        """``answers``: topic -> tuple of the subscriber objects it reaches."""
        self.answers = answers

    def match(self, topic, publisher=None):
        cdef PyObject* found = PyDict_GetItemWithError(self.answers, topic)
        if found == NULL:
            return []
        cdef tuple subs = <tuple>found
        cdef Py_ssize_t i, n = len(subs)
        cdef PyObject* out = PyList_New(n)
        cdef PyObject* t
        cdef PyObject* obj
        for i in range(n):
            t = PyTuple_New(4)
            obj = <PyObject*>subs[i]
            Py_INCREF(<object>obj)
            PyTuple_SET_ITEM(t, 0, obj)
            Py_INCREF(QOS1)
            PyTuple_SET_ITEM(t, 1, <PyObject*>QOS1)
            Py_INCREF(NO)
            PyTuple_SET_ITEM(t, 2, <PyObject*>NO)
            Py_INCREF(NO_IDS)
            PyTuple_SET_ITEM(t, 3, <PyObject*>NO_IDS)
            PyList_SET_ITEM(out, i, t)
        result = <list>out
        Py_DECREF(result)   # the cast took a second reference
        return result
