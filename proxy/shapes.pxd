# C types for proxy/shapes.py when it is compiled (setup.py): the shape-key scan as a C loop over the
# text's code points, read from a copy of its bytes (ASCII) or of its UTF-32 form. The .py file stays the
# one source; interpreted, these declarations do nothing.
import cython


@cython.locals(n=cython.Py_ssize_t, start=cython.Py_ssize_t, i=cython.Py_ssize_t, j=cython.Py_ssize_t,
               k=cython.Py_ssize_t, end=cython.Py_ssize_t, skip=cython.Py_ssize_t, q=cython.Py_ssize_t,
               c=cython.Py_UCS4, prev=cython.Py_UCS4, codes=bytes, buf="const char *",
               one="const unsigned char *", wide="const Py_UCS4 *")
cpdef str _scan_key(str sql)

cdef Py_UCS4 _at(const unsigned char *one, const Py_UCS4 *wide, Py_ssize_t i) noexcept

@cython.locals(last_pair=cython.Py_ssize_t, d=cython.Py_UCS4)
cdef Py_ssize_t _closing(const unsigned char *one, const Py_UCS4 *wide, Py_ssize_t n, Py_ssize_t j,
                         Py_UCS4 quote, bint escapes) noexcept

cdef bint _word(Py_UCS4 c) noexcept

@cython.locals(n=cython.Py_ssize_t)
cpdef bint commented(str sql)
