# C types for proxy/stats.py when it is compiled (setup.py): a fingerprint's entry keeps its counters
# as C fields, and Stats.record, run once per statement, adds to them in C. Interpreted, the .py
# classes (QueryStats with __slots__) are the same records.
import cython


cdef class QueryStats:
    cdef public object fingerprint, query, database, user, errors, hist, cache, rules, tags, encoded
    cdef public long long calls, rows
    cdef public double total, min, max, first_seen, last_seen


cdef class Stats:
    cdef public object queries, other, gauges, worker_id, generation
    cdef public dict counters
    cdef public Py_ssize_t max_fingerprints, _limit, folded, changes

    @cython.locals(q=QueryStats, k=Py_ssize_t, hist=dict, errors=dict)
    cpdef QueryStats record(self, fingerprint, normalized, database, user, double seconds, long long rows,
                            sqlstate=*)
    cpdef inc(self, name, n=*)
