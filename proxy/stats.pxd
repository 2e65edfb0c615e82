# C types for proxy/stats.py when it is compiled (setup.py): a fingerprint's entry keeps its counters
# as C fields, and Stats.record, run once per statement, adds to them in C. Interpreted, the .py
# classes (QueryStats with __slots__) are the same records.
import cython


cdef class QueryStats:
    cdef public object fingerprint, query, database, user, errors, hist, cache, rules, tags, encoded
    cdef public long long calls, rows
    cdef public double total, min, max, first_seen, last_seen


cdef class Stats:
    cdef public dict queries, counters
    cdef public list folds
    cdef public object other, gauges, worker_id, generation
    cdef public Py_ssize_t max_fingerprints, _limit, folded, changes

    @cython.locals(q=QueryStats, k=Py_ssize_t, hist=dict, errors=dict)
    cpdef QueryStats record(self, fingerprint, normalized, database, user, double seconds, long long rows,
                            sqlstate=*)
    cpdef inc(self, name, n=*)

    @cython.locals(rules=dict)
    cpdef rule_events(self, fingerprint, tuple keys, QueryStats q=*)


cdef class RuleCounter:
    cdef public long long hits, observed_hits, queued, throttled


cdef class RuleTally:
    cdef public tuple hits, observed, keys

    @cython.locals(c=RuleCounter)
    cpdef hit(self)
    cpdef count(self, Stats stats, fingerprint, QueryStats q=*)
