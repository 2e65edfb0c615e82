# C types for proxy/relay/replies.py when it is compiled (setup.py): the reply tracker is an extension
# type whose state is C struct fields, read and written in C by the compiled relay; the transport shell
# (a Python subclass) reaches the same fields as attributes. Interpreted, the .py class is the same.
cimport cython

from proxy.relay.records cimport Pending, Stmt


cdef class ReplyTracker:
    cdef public object app, expect, tx_status, server, pool, cstate, server_params, server_suspend
    cdef public list finished
    cdef public Py_ssize_t special, copies_started, copy_ends_sent
    cdef public bint pooled_tx, skip_until_sync, copy_failed, server_in_copy, server_fatal

    # the relay's own hot methods: C calls within the compiled core (cpdef: the shell calls some too)
    cpdef to_client(self, data)
    cpdef _done(self, Pending p)
    cpdef Pending _pop(self)
    @cython.locals(p=Pending, t=Py_ssize_t, a=Py_ssize_t, b=Py_ssize_t, first=Py_ssize_t, hooked_at=Py_ssize_t)
    cpdef server_frames(self, list frames, data, Py_ssize_t start=*, bint hooked=*)
    @cython.locals(p=Pending)
    cpdef Pending _ready_for_query(self, status)
    @cython.locals(p=Pending, head=Pending, plain=bint, i=Py_ssize_t, t=Py_ssize_t, a=Py_ssize_t, b=Py_ssize_t,
                   first=Py_ssize_t, last=Py_ssize_t, kind=int)
    cpdef _server_frames(self, list frames, data, Py_ssize_t start, bint hooked)
    @cython.locals(p=Pending)
    cpdef _flush_local(self, list out)
