"""Cache hits answered within the client's own turn of the event loop, sans I/O.

A repeat of a request that the cache answered before, arriving alone in its read as the very same
bytes, is answered from a memo keyed by those bytes: no framing, parsing or rule matching again, and
no message to the server. Two kinds of request qualify:

- a simple Query;
- an extended-protocol batch `[Parse] Bind [Describe portal] Execute Sync` of one statement (libpq's
  PQexecParams/PQexecPrepared, pgbench -M extended/prepared, psycopg). Its ParseComplete,
  BindComplete and RowDescription are pgfront's own: the cache entry starts with the RowDescription
  the server gave the batch that filled it, and the Parse is skipped only while the server still
  holds that very statement (`stmt_epoch`: nothing parsed, closed or queried since).

A memo stands only while nothing it stands for changed: the rules (a reload makes a new rule set),
the context they match on (user, database, application_name, in a transaction), the session settings
in the cache key (a new prefix object when one changes); the cache is asked again every time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from proxy.cache.capture import has_description, split_row_description
from proxy.relay.conversation import Conversation
from proxy.relay.records import _B, _D, _E, _LOCAL, _P, _PLAIN_D, _Q, _S, READY, Pending, special
from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.rules import Decision
    from proxy.sql import StatementInfo
    from proxy.stats import QueryStats

_HOT_QUERIES = 64  # per session: requests remembered
_DESCRIBE_PORTAL = b"P\0"  # the body of a Describe of the unnamed portal
_EXECUTE_ALL = b"\0\0\0\0\0"  # the body of an Execute of the unnamed portal, without a row limit


def _describes_portal(frames: list, data: bytes, j: int) -> bool:
    """frames[j] is a Describe of the unnamed portal."""
    return frames[j][0] == _D and data[frames[j][1] + 5:frames[j][2]] == _DESCRIBE_PORTAL


class HotHits(Conversation):
    """A Conversation that answers the requests it remembers (the transport shell's base)."""

    def _remember(self, request: bytes, info: StatementInfo, decision: Decision, key: bytes,
                  batch: tuple | None) -> None:
        if decision.throttle:
            return  # every execution must be admitted by its rule limits
        hot = self.hot_queries
        if len(hot) >= _HOT_QUERIES:
            hot.clear()
        rules = self.app.rules.holder.current
        hot[request] = (rules, rules.context_key(self), self.cstate.prefix, info, decision, key, batch)

    def _remember_hot(self, sql: str, info: StatementInfo, decision: Decision, key: bytes) -> None:
        """A Query the cache answered: keep what answering it took, keyed by its exact message bytes."""
        self._remember(pq.query(sql), info, decision, key, None)

    def _remember_batch(self, frames: list, data: bytes, i: int, p: Pending, decision: Decision, key: bytes,
                        reply: bytes) -> None:
        """An Execute the cache answered (frames[i]): remember its batch when the read held exactly
        `[Parse] Bind [Describe portal] Execute Sync` of its statement, with nothing else in flight."""
        stmt = p.stmt
        if (self.pooled_tx or self.tx_status != pq.IDLE or decision.notices or decision.log or decision.timeout
                or decision.offset_check is not None or i + 2 != len(frames) or frames[0][1] != 0
                or frames[-1][2] != len(data) or frames[i + 1][0] != _S
                or data[frames[i][1] + 5:frames[i][2]] != _EXECUTE_ALL):
            return
        j = i - 1
        describe = _describes_portal(frames, data, j)
        if describe:
            if not has_description(reply):
                return  # filled by a batch without Describe: the server must describe it
            j -= 1
        if j < 0 or frames[j][0] != _B:
            return
        _, ba, bb, _bdata = p.bind
        if ba != frames[j][1] or data[ba + 5] != 0 or pq.bind_names(data[ba + 5:bb])[1] != stmt.name:
            return
        parse = j == 1
        if j > 1 or (parse and (frames[0][0] != _P or pq.parse_parse(data[5:frames[0][2]])[0] != stmt.name)):
            return
        self._remember(bytes(data), p.info, decision, key, (stmt, self.stmt_epoch, parse, describe))

    def _hot_hit(self, memo: tuple) -> bool:
        """Answer a remembered request from the cache. False: take the general path."""
        t0 = time.perf_counter()
        ruleset, context, prefix, info, decision, key, batch = memo
        cstate = self.cstate
        if (self.phase is not READY or self.expect or self.skip_until_sync or self.in_batch or not self.cframer.idle
                or cstate is None or cstate.prefix is not prefix or self.app.rules is None
                or self.app.rules.holder.current is not ruleset or ruleset.context_key(self) != context):
            return False
        if batch is None:
            reply = self.app.cache.hit_now(key, info, cstate, allow_rls=decision.cache_allow_rls,
                                           allow_catalog=decision.cache_allow_catalog)
            if reply is None:
                return False
            self.to_client(reply + pq.ready_for_query(self.tx_status))
        else:
            stmt, epoch, parse, describe = batch
            # (never remembered in transaction pooling, a session's mode for its whole life)
            if self.stmt_epoch != epoch or self.tx_status != pq.IDLE or self.statements.get(stmt.name) is not stmt:
                return False
            reply = self.app.cache.hit_now(key, info, cstate, allow_rls=decision.cache_allow_rls,
                                           allow_catalog=decision.cache_allow_catalog, described=describe)
            if reply is None:
                return False
            description, rows = split_row_description(reply)
            self.portals[""] = stmt  # what the client's Bind made (gone again at its Sync)
            self.last_bind = None
            self.to_client((pq.PARSE_COMPLETE if parse else b"") + pq.BIND_COMPLETE
                           + (description if describe else b"") + rows + pq.ready_for_query(pq.IDLE))
        self.queries += 1
        self.last_active = t0  # a busy client is not an idle one (client_idle_timeout)
        q = self._record(info, t0)
        self._executed(decision, info, None, q)
        self._cache_event(info, "hit", q)
        return True

    def _cache_event(self, info: StatementInfo, event: str, q: QueryStats | None = None) -> None:
        if self.app.stats is not None:
            self.app.stats.cache_event(info.fingerprint, event, q)

    def _serve_hit(self, p: Pending, kind: int, reply: bytes) -> None:
        """Answer `p` from the cache: its reply is queued as a local one, in client order. An Execute's
        entry may start with the RowDescription of its batch's Describe: the server answered that one."""
        if not special(p):
            self.special += 1
        if kind == _E:
            reply = split_row_description(reply)[1]
        p.kind = _LOCAL
        p.local = b"".join(p.notices) + reply
        p.whole = kind == _Q
        self.expect.append(p)
        self._cache_event(p.info, "hit", self._done(p))  # statistics timed from the message's arrival

    def _describe_into(self, p: Pending, frames: list, data: bytes, i: int) -> None:
        """The Execute at frames[i] misses and will be filled into the cache: when the Describe of its
        portal came just before it and is still awaited, the RowDescription it gets goes into the entry
        too (a later hit on the whole batch then needs no server to describe it)."""
        expect = self.expect
        if i > 0 and _describes_portal(frames, data, i - 1) and expect and expect[-1] is _PLAIN_D:
            d = Pending(_D)
            d.fill = p.fill
            expect[-1] = d

