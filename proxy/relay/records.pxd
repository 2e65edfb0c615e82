# C types for proxy/relay/records.py when it is compiled (setup.py): the statement and reply records
# become extension types, so that creating one is a C allocation with its fields set in place, and a
# compiled module that cimports them reads and writes their fields as C struct members. Interpreted,
# the .py classes (with __slots__) are the same records.

cdef class Stmt:
    cdef public object name, sql, info, notices, sent_sql, decision, oids, server_name, tags


cdef class Pending:
    cdef public int kind, copy_ends, part
    cdef public bint forward, show_errors, whole
    cdef public double t0, queued
    cdef public Py_ssize_t rows
    cdef public object info, sqlstate, error, local, notices, stmt, bind, prep, fill, ttl, text, permit, tags, decision, observe
