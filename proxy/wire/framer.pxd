# C types for proxy/wire/framer.py when it is compiled (setup.py): the framer is an extension type, and
# feed() reads each message header straight from the chunk's bytes in C (`at` is a pointer into them).
cimport cython

cdef bint _COMPILED  # a C constant here: True


cdef class Framer:
    cdef public object _buf, stream_types, data
    cdef public Py_ssize_t _want, _skip, max_size
    cdef public int _skip_type

    @cython.locals(pos=Py_ssize_t, n=Py_ssize_t, top=Py_ssize_t, stop=Py_ssize_t, end=Py_ssize_t,
                   ln=Py_ssize_t, t=int, raw=bytes, at="const unsigned char *", out=list)
    cpdef list feed(self, data)
    @cython.locals(n=Py_ssize_t, ln=Py_ssize_t, raw=bytes, at="const unsigned char *")
    cpdef list single(self, data)
