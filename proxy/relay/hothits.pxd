# C types for proxy/relay/hothits.py when it is compiled (see conversation.pxd).
from proxy.relay.records cimport Pending, Stmt
from proxy.relay.conversation cimport Conversation


cdef class HotHits(Conversation):
    pass
