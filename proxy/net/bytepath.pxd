# C types for proxy/net/bytepath.py when it is compiled (setup.py): the byte path's state as C fields of
# the extension type the shell (ClientConnection) derives from, its methods C calls within the core.
cimport cython

from proxy.relay.hothits cimport HotHits


cdef class BytePath(HotHits):
    cdef public object transport, client_backlog, server_backlog, on_replica
    cdef public Py_ssize_t bytes_in, bytes_out
    cdef public bint client_suspended, server_paused

    cpdef to_client(self, data)
    cpdef to_server(self, data)
    cpdef server_data(self, data)
    cpdef bint _deliver(self, out) except -1
