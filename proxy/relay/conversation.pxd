# C types for proxy/relay/conversation.py when it is compiled: the conversation's state as C struct
# fields of the extension type (see replies.pxd).
cimport cython

from proxy.relay.records cimport Pending, Stmt
from proxy.relay.replies cimport ReplyTracker
from proxy.shapes cimport commented
from proxy.stats cimport RuleTally


cdef class Conversation(ReplyTracker):
    cdef public object phase, user, database, application_name, cframer, last_bind, lookup_job, last_parse
    cdef public object throttle_job, admitted, tags, tag_key, tracing, observers, routed_raw, routed_sql, routed_info
    cdef public object route_recent
    cdef public Py_ssize_t trace_gap
    cdef public str route_pref
    cdef public object ryw_lsn
    cdef public bint route_wrote, route_retry_primary
    cdef public double ryw_since
    cdef public dict statements, portals, hot_queries
    cdef public bint pinned, in_batch, restore_at_sync
    cdef public Py_ssize_t stmt_epoch, queries
    cdef public double last_active

    cpdef to_server(self, data)

    @cython.locals(p=Pending, stmt=Stmt, t=Py_ssize_t, a=Py_ssize_t, b=Py_ssize_t, first=Py_ssize_t,
                   skipping=bint, now=double)
    cpdef client_frames(self, list frames, data, Py_ssize_t start=*)
    @cython.locals(p=Pending)
    cpdef _query(self, str sql, double now, info=*)
    cpdef _done(self, Pending p)
    @cython.locals(p=Pending)
    cpdef _account(self)
    @cython.locals(seconds=double)
    cpdef _record(self, info, double t0, Py_ssize_t rows=*, sqlstate=*, Pending p=*)
    @cython.locals(tally=RuleTally)
    cpdef _executed(self, d, info, text=*, q=*)
    @cython.locals(targets=tuple)
    cpdef _watch(self, Pending p, info, decision, sql)
