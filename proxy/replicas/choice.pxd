# C types for proxy/replicas/choice.py when it is compiled (setup.py): the message loop of `classify`
# reads each header in C from the bytes, and `Reasons` is an extension type whose `why` is a C call.
cimport cython

from proxy.relay.conversation cimport Conversation
from proxy.stats cimport Stats


@cython.final
cdef class Reasons:
    cdef public object function_ok
    cdef public dict memo

    @cython.locals(got=tuple)
    cpdef str why(self, info)


cdef Py_ssize_t _size(const unsigned char *p, Py_ssize_t at) noexcept

@cython.locals(p="const unsigned char *", n=Py_ssize_t, i=Py_ssize_t, end=Py_ssize_t, j=Py_ssize_t, k=Py_ssize_t, t=int,
               open_unnamed=bint)
cpdef classify(data, dict statements, info_of, Reasons reason_of, bint continuing=*, parses=*)


@cython.locals(dbs=object, target=object)
cpdef bint fits(r, str database, min_lsn) except -1
@cython.locals(fit=list)
cpdef choose(list replicas, str database, min_lsn=*)


cdef class Routing:
    cdef public object replicas, functions, marks
    cdef public Stats stats
    cdef public bint read_your_writes
    cdef public double max_wait
    cdef public dict _reasons, _parses, _routed_keys

    cpdef Reasons reason(self, str database)
    @cython.locals(p="const unsigned char *", n=Py_ssize_t, raw=bytes)
    cpdef _classify(self, Conversation client, data, bint continuing=*)
    cpdef pick(self, Conversation client, data)
    cpdef bint still_read_only(self, Conversation client, data, bint continuing=*) except -1
    cpdef _write(self, Conversation client)
    cpdef _primary(self)
    cpdef _replica(self, replica)
