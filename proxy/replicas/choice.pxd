# C types for proxy/replicas/choice.py when it is compiled (setup.py): the message loop of `classify`
# reads each header in C from the bytes, and `Reasons` is an extension type whose `why` is a C call.
cimport cython
from libc.string cimport memcmp

from proxy.relay.conversation cimport Conversation
from proxy.relay.records cimport Stmt
from proxy.stats cimport Stats


cpdef str statement_why(info)


@cython.final
cdef class Reasons:
    cdef public object function_ok

    cpdef str why(self, info)


cdef Py_ssize_t _size(const unsigned char *p, Py_ssize_t at) noexcept

@cython.final
cdef class Recent:
    cdef public Reasons reasons
    cdef public bytes parse_body, bind_name
    cdef public str parse_name
    cdef public object parse_info, bind_info
    cdef public Py_ssize_t bind_epoch


cdef bint _same(const unsigned char *p, Py_ssize_t at, Py_ssize_t n, bytes b) noexcept

@cython.locals(p="const unsigned char *", n=Py_ssize_t, i=Py_ssize_t, end=Py_ssize_t, j=Py_ssize_t, k=Py_ssize_t, t=int,
               open_unnamed=bint, stmt=Stmt, name=str, why=str)
cpdef classify(data, dict statements, shapes, Reasons reason_of, bint continuing=*, dict parses=*,
               Recent recent=*, Py_ssize_t epoch=*)


cdef class Upstream:
    cdef public object target, databases
    cdef public str counter, _state
    cdef public double weight
    cdef public bint ok
    cdef public long long replay_lsn, routed


@cython.locals(dbs=object)
cpdef bint fits(Upstream r, str database, long long min_lsn) except -1
@cython.locals(fit=list, r=Upstream)
cpdef choose(list replicas, str database, long long min_lsn=*)


cdef class Routing:
    cdef public object replicas, functions, marks, shapes
    cdef public Stats stats
    cdef public bint read_your_writes
    cdef public double max_wait
    cdef public dict _reasons, _parses
    cdef public list upstreams
    cdef public long long primary_routed

    # C methods: Router, a Python subclass, would make each cpdef call check for an override first
    cdef Reasons reason(self, str database)
    @cython.locals(p="const unsigned char *", n=Py_ssize_t, raw=bytes, recent=Recent)
    cdef _classify(self, Conversation client, data, bint continuing=*)
    cdef choose_for(self, Conversation client, data)
    cpdef bint still_read_only(self, Conversation client, data, bint continuing=*) except -1
    cdef _write(self, Conversation client)
    cdef _to_primary(self)
    cdef _to_replica(self, Upstream replica)
