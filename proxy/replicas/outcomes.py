"""What `choice.Routing.pick` answers besides a replica or None (the primary), when the choice cannot be
made at once: a module of its own, so that the byte path can test for them without importing routing
(which builds on the byte path's types)."""

WAIT = object()  # the choice needs an await (`Router.pick_later`)
MARK = object()  # the primary, once the possible write is marked in Redis (`Router.mark_write`)
