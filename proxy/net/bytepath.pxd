# C types for proxy/net/bytepath.py when it is compiled (setup.py): the byte path's state as C fields of
# the extension type the shell (ClientConnection) derives from, its methods C calls within the core.
cimport cython

from proxy.relay.hothits cimport HotHits
from proxy.replicas.choice cimport Routing


@cython.locals(p="const unsigned char *", end=Py_ssize_t, at=Py_ssize_t, size=Py_ssize_t, t=int, described=bint)
cpdef int replica_reply(out) except -1


@cython.locals(p="const unsigned char *", n=Py_ssize_t, i=Py_ssize_t)
cdef bint _maybe_route_setting(data) except -1


cdef class BytePath(HotHits):
    cdef public object transport, client_backlog, server_backlog, on_replica
    cdef public Py_ssize_t bytes_in, bytes_out
    cdef public bint client_suspended, server_paused
    cdef public object held, home, ryw_mark, replica_held, route_sent, route_lent
    cdef public bint acquiring, session_home
    cdef public dict route_pools

    cpdef to_client(self, data)
    cpdef to_server(self, data)
    cpdef server_data(self, data)
    @cython.locals(router=Routing)
    cpdef _wait_for_server(self, data)
    cdef _pool_on(self, replica)  # C: the Python subclass would make a cpdef call check for an override
    cpdef _attach(self, link, replica=*, lent=*)
    cpdef _maybe_release(self)
    cpdef bint _deliver(self, out) except -1
