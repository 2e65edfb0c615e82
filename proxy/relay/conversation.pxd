# C types for proxy/relay/conversation.py when it is compiled: the records it fills are extension types,
# their fields read and written as C struct members.
from proxy.relay.records cimport Pending, Stmt
