"""The client side of the conversation, sans I/O: every client message is tracked (statements,
portals, the batch up to Sync, COPY) and queued for the reply it awaits; here rules decide, the cache
is consulted, and transaction pooling renames prepared statements onto the server it holds.

The transport shell (`proxy.net.client`) subclasses it and provides `to_server`, `to_client`,
`fatal`, `close`, `fill_reply` and `_suspend_client`; nothing here does I/O or touches asyncio.
"""

from __future__ import annotations

import struct
import time
from itertools import islice
from random import random
from typing import TYPE_CHECKING

from proxy.log import log
from proxy.relay.pooling import drops_statements, rename_bind, session_feature
from proxy.relay.records import (
    _B,
    _BLOCKED_SQL,
    _C,
    _D,
    _E,
    _F,
    _H,
    _LOCAL,
    _P,
    _PLAIN_B,
    _PLAIN_C,
    _PLAIN_D,
    _PLAIN_P,
    _PLAIN_S,
    _Q,
    _REFUSED_EXECUTE,
    _RESTORE_TIMEOUT,
    _S,
    _SAVE_AND_SET_TIMEOUT,
    _SUSPEND,
    _X,
    STARTUP,
    Pending,
    Stmt,
    _c,
    _d,
    _f,
)
from proxy.relay.replies import ReplyTracker
from proxy.shadow.observe import Observed, Watch
from proxy.shapes import commented
from proxy.sql import analyze
from proxy.sql.sqlcommenter import parse_tags, split_comment, tags_text
from proxy.wire import protocol as pq
from proxy.wire.framer import Framer

if TYPE_CHECKING:
    from proxy.relay.hooks import RelayContext
    from proxy.replicas.choice import Recent
    from proxy.rules import Decision
    from proxy.sql import StatementInfo
    from proxy.stats import QueryStats


class Conversation(ReplyTracker):
    """One client's conversation: what it prepared, what it awaits, and the decisions on the way."""

    def __init__(self, app: RelayContext) -> None:
        super().__init__(app)
        self.phase = STARTUP
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.cframer = Framer(app.cfg.server.max_message_size, stream_types=b"d")
        self.statements: dict[str, Stmt] = {}
        self.portals: dict[str, Stmt] = {}
        self.last_bind: tuple | None = None
        self.lookup_job: tuple | None = None
        self.throttle_job: tuple | None = None  # (limits, grant): rule limits a statement waits on
        self.admitted = None  # the outcome of that wait: a Grant, or our ErrorResponse refusing it
        self.tags: dict[str, str] | None = None  # sqlcommenter tags of the statement being decided
        # read routing (with [[replica]]s): what `replicas.choice.Routing.pick` reads and sets, in C
        self.route_pref = "auto"  # SET pgfront.route = primary | auto
        self.route_wrote = False  # the transaction on the primary lent now may have written
        self.route_retry_primary = False  # a replica cancelled the read waiting: the primary answers it
        self.ryw_since = 0.0  # when this client's last possible write ended (monotonic); 0 = never
        self.ryw_lsn = 0  # the primary's WAL position after it: replicas must have replayed this far
        # the whole Query message read routing chose an upstream for, its text and its shape, which the
        # relay takes instead of decoding and looking them up again (held: an id is not reused meanwhile)
        self.routed_raw: bytes | None = None
        self.routed_sql: str | None = None
        self.routed_info: StatementInfo | None = None
        self.route_recent: Recent | None = None  # this client's last Parse and Bind, as read routing read them
        self.tracing = app.tracing  # fixed for the worker's life ([tracing] keys take a restart)
        self.observers = app.observers  # mirror and capture sinks, or None (neither configured)
        self.trace_gap = self.tracing.gap() if self.tracing is not None else 0  # statements to the next span
        self.tag_key = ""  # the same as text (rules' decisions are cached under it)
        self.pinned = False  # session state seen in transaction mode: keep the server
        self.in_batch = False  # extended-protocol messages sent since the last Sync
        self.last_parse: tuple | None = None  # (body, stmt, rules) of the last Parse forwarded unchanged
        self.hot_queries: dict[bytes, tuple] = {}  # request bytes -> what _hot_hit needs to answer it again
        self.stmt_epoch = 0  # bumped by every Parse, Close and Query: the server's statements may differ
        self.restore_at_sync = False
        self.queries = 0
        self.last_active = time.perf_counter()

    # -- provided by the transport shell ---------------------------------------------------------
    def to_server(self, data: bytes) -> None:
        raise NotImplementedError

    def fatal(self, code: str, message: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _suspend_client(self, frames: list, data: bytes, i: int) -> None:
        """A cache look-up must finish before the client's message at frames[i] can go on."""
        raise NotImplementedError

    # -- the relay: client -> server ---------------------------------------------------------------

    def client_frames(self, frames: list, data: bytes, start: int = 0) -> None:
        """Track each client message; forward the chunk untouched unless a message was changed."""
        if start >= len(frames):
            return
        out: list | None = None  # becomes a list of pieces once something differs from the input
        expect = self.expect
        now = self.last_active = time.perf_counter()
        skipping = self.skip_until_sync
        first = frames[start][1]
        # the most frequent messages are tested first: Query, then a batch's Parse, Bind, Describe, Execute, Sync
        for t, a, b in islice(frames, start, None) if start else frames:
            sent: bytes | None = None  # replacement for this message, if any
            if skipping and t != _S and t != _c and t != _f:
                pass  # the server discards everything up to Sync after an error: so do we
            elif t == _Q:
                if data is self.routed_raw and a == 0:  # read routing's very message (`replicas.choice`)
                    sent = self._query(self.routed_sql, now, self.routed_info)
                    self.routed_raw = self.routed_sql = self.routed_info = None
                else:
                    # pq.ENC and pq.ERRORS, spelt out: compiled, the UTF-8 codec is then called directly
                    sent = self._query(data[a + 5:b - 1].decode("utf-8", "surrogateescape"), now)
            elif t == _P:
                sent = self._parse(data[a + 5:b])
            elif t == _B:
                if data[a + 5] == 0:  # unnamed portal, the common case
                    name = data[a + 6:data.index(0, a + 6, b)].decode("utf-8", "surrogateescape")
                    portal = ""
                    stmt = self.statements.get(name)
                    if stmt is not None:
                        self.last_bind = (stmt, a, b, data)
                else:
                    portal, name = pq.bind_names(data[a + 5:b])
                    stmt = self.statements.get(name)
                self.portals[portal] = stmt  # type: ignore[assignment]
                d = stmt.decision if stmt is not None else None
                if (d is None or (not d.timeout and d.offset_check is None)) and not (self.pooled_tx and name):
                    expect.append(_PLAIN_B)  # the common case: nothing to change (no rule acts at Bind)
                else:
                    sent = self._bind(stmt, d, portal, name, data[a:b])
                self.in_batch = True
            elif t == _D:
                if self.pooled_tx and data[a + 5] == 83 and data[a + 6] != 0:  # Describe of a named statement
                    stmt = self.statements.get(pq.parse_describe_close(data[a + 5:b])[1])
                    if stmt is not None:
                        sent = self._on_server(stmt) + pq.msg(b"D", b"S" + pq.cstr(stmt.server_name))
                expect.append(_PLAIN_D)
                self.in_batch = True
            elif t == _E:
                portal, max_rows = pq.parse_execute(data[a + 5:b])
                stmt = self.portals.get(portal)
                if stmt is not None:
                    p = Pending(_E, stmt.info, now)
                    p.stmt = stmt
                    p.tags = stmt.tags
                    d = p.decision = stmt.decision
                    if d is not None and d.throttle:
                        refused = self._admitted(p, stmt.info, d)
                        if refused is _SUSPEND:
                            self.to_server(data[first:a] if out is None else b"".join(out))
                            self._suspend_client(frames, data, frames.index((t, a, b), start))
                            return
                        if refused is not None:  # fails on the server (skipping to Sync); the client sees ours
                            self._executed(d, stmt.info)
                            p.error = refused
                            self.special += 1
                            expect.append(p)
                            self.queries += 1
                            self.in_batch = True
                            if out is None:
                                out = [data[first:a]]
                            out.append(_REFUSED_EXECUTE)
                            continue
                    if d is not None:
                        self._executed(d, stmt.info)
                    if stmt.notices:
                        p.notices = stmt.notices
                        self.special += 1
                    lb = self.last_bind
                    if lb is not None and lb[0] is stmt and portal == "":
                        p.bind = lb
                    if self.observers is not None:
                        self._watch(p, stmt.info, d, stmt.sent_sql)
                    if self.cstate is None:
                        expect.append(p)
                    elif (d is not None and d.cache_ttl is not None and not d.timeout and p.bind is not None
                          and not self.skip_until_sync):
                        info = stmt.info if stmt.sent_sql == stmt.sql else analyze(stmt.sent_sql)
                        # a row limit (asyncpg's fetchval sends 1) is part of the key: only replies that
                        # complete within it are stored (a PortalSuspended abandons the fill)
                        keyed = stmt.sent_sql if not max_rows else f"{stmt.sent_sql}\0max_rows={max_rows}"
                        self.lookup_job = (_E, p, keyed, info, d, data[a:b])
                        sent = _SUSPEND
                    else:
                        expect.append(p)
                        self.cstate.sent(stmt.info)
                else:
                    expect.append(Pending(_E, None, now))
                self.queries += 1
                self.in_batch = True
            elif t == _S:
                skipping = self.skip_until_sync = False
                self.copy_failed = False
                self.in_batch = False
                if self.server_in_copy and self.copy_ends_sent < self.copies_started:
                    pass  # the server is in COPY IN mode and ignores this Sync
                elif self.copies_started or self.copy_ends_sent:
                    p = Pending(_S)
                    p.copy_ends = self.copy_ends_sent
                    expect.append(p)
                else:
                    expect.append(_PLAIN_S)
                if self.restore_at_sync:
                    self.restore_at_sync = False
                    sent = data[a:b] + self._swallowed_query(None)
            elif t == _d or t < 0:
                pass  # CopyData, or a piece of a large one
            elif t == _c or t == _f:
                if self.copy_failed:
                    self.copy_failed = False  # the end of a copy the server already failed
                else:
                    self.copy_ends_sent += 1
            elif t == _C:
                kind, name = pq.parse_describe_close(data[a + 5:b])
                self.stmt_epoch += 1
                if kind == b"S":
                    self.statements.pop(name, None)
                else:
                    self.portals.pop(name, None)
                if self.pooled_tx and kind == b"S" and name:
                    # the server-side statement is shared by name and content: keep it, answer here
                    self._local(pq.CLOSE_COMPLETE)
                    sent = b""
                else:
                    expect.append(_PLAIN_C)
            elif t == _H:
                pass
            elif t == _F:
                expect.append(Pending(_F, None, now))
            elif t == _X:
                self.to_server(data[first:a] if out is None else b"".join(out))
                if self.pool is None:
                    self.to_server(pq.TERMINATE)  # a pooled server connection outlives its client
                self.close()
                return
            else:
                self.to_server(data[first:a] if out is None else b"".join(out))
                self.fatal("08P01", f"invalid frontend message type {t}")
                return
            if sent is not None:
                if sent is _SUSPEND:  # a cache look-up first: forward what came before, then wait
                    self.to_server(data[first:a] if out is None else b"".join(out))
                    self._suspend_client(frames, data, frames.index((t, a, b), start))
                    return
                if out is None:
                    out = [data[first:a]]
                out.append(sent)
            elif out is not None:
                out.append(data[a:b])
        # the whole chunk is the very same object: slicing all of a bytes object copies nothing
        self.to_server(data[first:frames[-1][2]] if out is None else b"".join(out))
        if self.special and expect and expect[0].kind == _LOCAL:  # local replies always count as special
            replies: list = []
            self._flush_local(replies)
            self.to_client(b"".join(replies))


    def _local(self, reply: bytes) -> None:
        """A reply pgfront gives itself, queued behind whatever the server still owes the client."""
        p = Pending(_LOCAL)
        p.local = reply
        self.special += 1
        self.expect.append(p)


    def _bind(self, stmt: Stmt | None, d: Decision | None, portal: str, name: str, raw: bytes) -> bytes:
        """A Bind that rules or transaction pooling change: what is sent instead (its reply is queued)."""
        prefix = b""
        bind = raw
        p = _PLAIN_B
        if self.pooled_tx and name and stmt is not None:
            prefix = self._on_server(stmt)
            bind = rename_bind(raw[5:], portal, stmt.server_name)
            p = Pending(_B)
            p.stmt = stmt  # a refused cached plan is traced back to its statement
        if d is not None:
            if d.timeout and not self.in_batch:
                prefix = self._timeout_prefix(d) + prefix
            if d.offset_check is not None:
                error = self._check_offset(d, raw[5:])
                if error is not None:  # make this Bind fail on the server, and answer with our error
                    p = Pending(_B)
                    p.error = error
                    self.special += 1
                    bind = pq.build_bind(portal, _BLOCKED_SQL, [], [], [])
        self.expect.append(p)
        return prefix + bind


    def _on_server(self, stmt: Stmt) -> bytes:
        """Transaction pooling: make sure the lent server has this statement prepared (swallowed Parse)."""
        if stmt.server_name in self.server.state.prepared:
            return b""
        return self._prepare(stmt, False)


    def _prepare(self, stmt: Stmt, forward: bool) -> bytes:
        """Transaction pooling: prepare the statement under its server-side name on the lent server.
        The client sees the ParseComplete of its own Parse (`forward`), never that of ours, but always
        the error if it no longer parses."""
        state = self.server.state
        name = stmt.server_name
        state.prepared.add(name)
        out = b""
        if state.uncertain:  # after a DEALLOCATE of some name: the statement may still be there
            self._swallowed(_C)
            out = pq.msg(b"C", b"S" + pq.cstr(name))
        p = Pending(_P)
        p.prep = name
        if not forward:
            p.forward = False
            p.show_errors = True
            self.special += 1
        self.expect.append(p)
        return out + pq.parse_message(name, stmt.sent_sql, stmt.oids)


    def _query(self, sql: str, now: float, info: StatementInfo | None = None) -> bytes | None:
        """A simple Query: track it, apply rules. Returns a replacement message or None. `info`: its shape,
        when already looked up."""
        self.queries += 1
        self.stmt_epoch += 1  # a Query destroys the unnamed statement
        tags = _tags(sql) if commented(sql) else None
        if self.app.rules is None and self.cstate is None and not self.pooled_tx and self.observers is None:
            # nothing decides on the statement before it is sent: its shape is looked up for the
            # statistics after the reply has gone out, off the path the client waits on
            p = Pending(_Q, None, now)
            p.text = sql
            p.tags = tags
            self.expect.append(p)
            return None
        if info is None:
            info = self.app.shapes.get(sql)
        p = Pending(_Q, info, now)
        p.tags = tags
        self._set_tags(tags)
        if self.pooled_tx:
            refusal = self._pooled_statement(sql, info)
            if refusal is not None:
                p.error = refusal
                self.special += 1
                self.expect.append(p)
                return pq.query(_BLOCKED_SQL)
        rules = self.app.rules
        sent = None
        decision = None
        if rules is not None:
            decision = rules.decide_for(self, sql, info)
            if decision is not None:
                p.decision = decision
                refused = self._admitted(p, info, decision) if decision.throttle else None
                if refused is _SUSPEND:
                    self.queries -= 1  # counted when the Query is taken up again
                    return _SUSPEND
                self._executed(decision, info, sql)
                if decision.block or refused is not None:
                    if refused is None:
                        code, message = decision.block
                        refused = pq.error_response(code, message)
                    p.error = refused
                    self.special += 1
                    sent = pq.query(_BLOCKED_SQL)
                else:
                    if self.observers is not None:
                        self._watch(p, info, decision, decision.sql or sql)
                    if decision.sql is not None:
                        sent = pq.query(decision.sql)
                    if decision.notices:
                        p.notices = tuple([pq.notice_response(n) for n in decision.notices])
                        self.special += 1
                    if decision.timeout:
                        before = self._swallowed_query(_SAVE_AND_SET_TIMEOUT.format(ms=int(decision.timeout * 1000)))
                        self.expect.append(p)
                        after = self._swallowed_query(None)
                        if self.cstate is not None:
                            self.cstate.sent(info)
                        return before + (sent or pq.query(sql)) + after
                    if decision.cache_ttl is not None and self.cstate is not None:
                        if decision.sql is None:  # the shape's facts serve the cache policy
                            cache = self.app.cache
                            key = cache.query_key(self.cstate, sql)
                            reply = cache.hit_now(key, info, self.cstate, allow_rls=decision.cache_allow_rls,
                                                  allow_catalog=decision.cache_allow_catalog)
                            if reply is not None:  # fresh in L1: answered without suspending the client
                                self._serve_hit(p, _Q, reply)
                                if not decision.notices and not decision.log:
                                    self._remember_hot(sql, info, decision, key)
                                return b""
                            self.lookup_job = (_Q, p, sql, info, decision, sent or pq.query(sql))
                        else:
                            self.lookup_job = (_Q, p, decision.sql, analyze(decision.sql), decision, sent)
                        return _SUSPEND
        if self.observers is not None and p.error is None and p.observe is None and (
                rules is None or decision is None):
            self._watch(p, info, None, sql)
        if self.cstate is not None and p.error is None:
            self.cstate.sent(info)
        self.expect.append(p)
        return sent


    def _pooled_statement(self, sql: str, info: StatementInfo) -> bytes | None:
        """Transaction pooling, before a statement is sent: a DEALLOCATE or DISCARD ALL empties the
        registry at once; session state pins the server (or is refused: the error returned)."""
        if drops_statements(sql):
            self.server.state.statements_dropped()
        feature = session_feature(info)
        return self._session_feature(feature) if feature else None

    def _session_feature(self, feature: str) -> bytes | None:
        """Transaction mode met session state: pin the server to this client, or refuse (an error)."""
        if self.app.cfg.pool.session_state == "refuse" and not self.session_home:
            return pq.error_response("0A000", f"{feature} is not supported in transaction pooling mode "
                                              "(pgfront [pool] session_state = refuse)")
        if self.server is not None:
            self.server.state.dirty.add(feature)  # whatever happens next, it is reset before reuse
        if not self.pinned:
            self.pinned = True
            self.app.stats_inc("pinned_sessions")
            log.info("session pinned to its server connection", extra={"client": self.id, "reason": feature})
        return None


    def _swallowed(self, kind: int) -> None:
        """Expect a reply to a message of pgfront's own (e.g. a BindComplete) that the client must not see."""
        p = Pending(kind)
        p.forward = False
        self.special += 1
        self.expect.append(p)


    def _swallowed_query(self, sql: str | None) -> bytes:
        """A Query of pgfront's own whose whole reply the client never sees (None: restore timeout)."""
        self._swallowed(_Q)
        return pq.query(sql) if sql is not None else _RESTORE_TIMEOUT


    def _timeout_prefix(self, decision: Decision | None) -> bytes:
        """At the start of an extended batch, set a rule's statement_timeout until the batch's Sync."""
        if decision is None or not decision.timeout or self.in_batch:
            return b""
        self.restore_at_sync = True
        return self._swallowed_query(_SAVE_AND_SET_TIMEOUT.format(ms=int(decision.timeout * 1000)))


    def _parse(self, body: bytes) -> bytes | None:
        self.stmt_epoch += 1
        last = self.last_parse
        rules = self.app.rules
        if (last is not None and last[0] == body and self.statements.get(last[1].name) is last[1]
                and last[2] is (rules.holder.current if rules is not None else None)):
            # the same Parse again (drivers re-parse the unnamed statement every execution): nothing
            # about it can have changed, and it was forwarded unchanged last time
            self.expect.append(_PLAIN_P)
            self.in_batch = True
            return None
        name, sql, oids = pq.parse_parse(body)
        info = self.app.shapes.get(sql)
        stmt = Stmt(name, sql, info, sql)
        stmt.oids = oids
        if commented(sql):
            stmt.tags = _tags(sql)
        self._set_tags(stmt.tags)
        p = _PLAIN_P
        sent = None  # the Parse sent instead of the client's
        prefix = b""  # pgfront's own messages sent before it (a rule's timeout)
        rules = self.app.rules
        if rules is not None:
            decision = rules.decide_for(self, sql, info)
            if decision is not None:
                if decision.block:
                    code, message = decision.block
                    p = Pending(_P, info)
                    p.error = pq.error_response(code, message)
                    self.special += 1
                    sent = pq.parse_message(name, _BLOCKED_SQL, oids)
                elif decision.sql is not None:
                    stmt.sent_sql = decision.sql
                    sent = pq.parse_message(name, decision.sql, oids)
                stmt.notices = tuple([pq.notice_response(n) for n in decision.notices])
                stmt.decision = decision
                if decision.timeout and not self.in_batch and not decision.block:
                    prefix = self._timeout_prefix(decision)
        self.statements[name] = stmt
        self.in_batch = True
        if self.pooled_tx:
            refusal = self._pooled_statement(sql, info)
            if refusal is not None:
                p = Pending(_P, info)
                p.error = refusal
                self.special += 1
                sent = pq.parse_message(name, _BLOCKED_SQL, oids)
            if name and p is _PLAIN_P:  # a named statement, not blocked: prepared under its server-side name
                self.last_parse = None
                stmt.server_name = self.pool.server_name(stmt.sent_sql, oids)
                if stmt.server_name in self.server.state.prepared:
                    self._local(pq.PARSE_COMPLETE)
                    return prefix
                return prefix + self._prepare(stmt, True)
        self.expect.append(p)
        if sent is None and not prefix and p is _PLAIN_P and not self.pooled_tx:
            self.last_parse = (body, stmt, rules.holder.current if rules is not None else None)
        else:
            self.last_parse = None
        if prefix:
            return prefix + (sent or pq.msg(b"P", body))
        return sent


    def _admitted(self, p: Pending, info: StatementInfo, decision: Decision) -> bytes | None:
        """Rule limits (throttle) on this statement: None when it may run now (its slots in p.permit),
        _SUSPEND when it must wait (`throttle_job`; the shell comes back to the same message with
        `admitted` set), or the ErrorResponse refusing it."""
        outcome = self.admitted
        if outcome is not None:  # taken up again after the wait
            self.admitted = None
            if isinstance(outcome, bytes):
                return outcome
            p.queued = p.t0 - outcome.since  # timed from its arrival: the client waited all along
            p.t0 = outcome.since
            p.permit = outcome
            return None
        throttler = self.app.throttler
        limits = throttler.limits(decision.throttle, self.user, self.application_name, info.fingerprint)
        grant, now = throttler.admit_now(limits)
        p.permit = grant
        if not now:
            grant.since = p.t0
            self.throttle_job = (limits, grant)
            return _SUSPEND
        return None


    def _set_tags(self, tags: dict[str, str] | None) -> None:
        """The sqlcommenter tags rules see for the statement about to be decided."""
        if tags is not None or self.tags is not None:
            self.tags = tags
            self.tag_key = tags_text(tags)


    def _check_offset(self, decision: Decision, body: bytes) -> bytes | None:
        """The error for an OFFSET $n bound above a rule's max_offset, or None."""
        n = decision.offset_check[0]
        try:
            _, _, formats, values, _ = pq.parse_bind(body)
            fmt = formats[0] if len(formats) == 1 else (formats[n - 1] if len(formats) >= n else 0)
            error = decision.offset_error(values[n - 1], binary=fmt == 1) if len(values) >= n else None
        except (ValueError, IndexError, struct.error):
            error = None  # malformed: the server will say so
        return pq.error_response(*error) if error is not None else None


    @property
    def in_transaction(self) -> bool:
        return self.tx_status != pq.IDLE


    def _done(self, p: Pending) -> QueryStats | None:
        """A statement finished: statistics, slow log. Returns its statistics entry, if any."""
        if p.permit is not None:  # its rule limits' slots go to the next statement
            p.permit.release()
            p.permit = None
        info = p.info
        if info is None:
            if p.text is None:
                return None
            info = p.info = self.app.shapes.get(p.text)
        q = self._record(info, p.t0, p.rows, p.sqlstate, p)
        if p.observe is not None:
            self._observed(p, info)
        return q


    def _account(self) -> None:
        """Statistics of the statements the reply just written finished (see server_frames)."""
        finished, self.finished = self.finished, []
        for p in finished:
            self._done(p)


    def _record(self, info: StatementInfo, t0: float, rows: int = 0, sqlstate: str | None = None,
                p: Pending | None = None) -> QueryStats | None:
        seconds = time.perf_counter() - t0
        app = self.app
        stats = app.stats
        q = None
        if stats is not None:
            q = stats.record(info.fingerprint, info.normalized, self.database, self.user, seconds, rows, sqlstate)
            if p is not None and p.tags:
                stats.tags_seen(q, p.tags)
        if p is not None and self.tracing is not None:
            tags = p.tags
            if tags is not None and "traceparent" in tags:  # the client's trace decides
                self._trace(p, info, seconds, rows, sqlstate, self.tracing.sample(tags))
            else:
                self.trace_gap -= 1
                if self.trace_gap <= 0:
                    self.trace_gap = self.tracing.gap()
                    self._trace(p, info, seconds, rows, sqlstate, True)
        if p is not None and app.slow_threshold is not None and seconds >= app.slow_threshold and app.slowlog is not None:
            app.slowlog_capture(self, p, info, seconds)
        return q


    def _trace(self, p: Pending, info: StatementInfo, seconds: float, rows: int, sqlstate: str | None,
               sampled: object) -> None:
        """The span of a statement sampled for tracing (`[tracing] endpoint`); `sampled` is what
        Tracing.sample() says (the client's span to be a child of, True, or None: no span)."""
        if not sampled:
            return
        tracing = self.tracing
        d = p.decision
        if p.kind == _LOCAL:
            cache = "hit"
        elif p.ttl is not None:
            cache = "miss"
        elif d is not None and d.cache_ttl is not None:
            cache = "bypass"
        else:
            cache = None
        tracing.statement(sampled, start=p.t0, end=p.t0 + seconds, fingerprint=info.fingerprint,
                          normalized=info.normalized, kind=info.kind, tables=info.tables, database=self.database,
                          user=self.user, application_name=self.application_name,
                          rules=d.matched if d is not None else (), cache=cache, queue_seconds=p.queued, rows=rows,
                          sqlstate=sqlstate, tags=p.tags)


    def _executed(self, d: Decision, info: StatementInfo, text: str | None = None,
                  q: QueryStats | None = None) -> None:
        """Count one execution under decision d (rule hits, the fingerprint's rule events: prepared with
        the decision), and log it when a rule asks. text: the statement as sent; q: the fingerprint's
        statistics entry, when at hand."""
        tally = d.tally
        tally.count(self.app.stats, info.fingerprint, q)
        if d.log:
            self.app.rules.log_execution(self, d, info, text)


    def _watch(self, p: Pending, info: StatementInfo, decision: Decision | None, sql: str) -> None:
        """Whether to observe a statement, and then digest its rows on the way: the mirror rules' targets
        that sample it (a write only where the rule mirrors writes) and that have room for it now (a
        shadow that is behind drops it before it costs anything), and the capture's own sampling."""
        sinks = self.observers
        targets: tuple[str, ...] = ()
        mirrors = decision.mirror if decision is not None else ()
        if mirrors and sinks.mirror is not None:
            mirror = sinks.mirror
            write = info.is_write
            for m in mirrors:  # a random draw only below share 1
                if (m.writes or not write) and (m.share >= 1.0 or random() < m.share) \
                        and mirror.admit(m.to, self.id):
                    targets += (m.to,)
        capture = sinks.capture is not None and sinks.capture.sample()
        if targets or capture:
            p.observe = Watch(targets, capture, sql, self.tx_status != pq.IDLE)
            self.special += 1  # its DataRows are read one by one (_server_frames)


    def _observed(self, p: Pending, info: StatementInfo) -> None:
        """An observed statement is over: hand it to the mirror and the capture (not a cache hit: the
        server never ran it)."""
        watch = p.observe
        p.observe = None
        if p.kind == _LOCAL:
            return
        obs = Observed(self.id, self.database, self.user, self.application_name, info.fingerprint, info.normalized,
                       info.kind, info.is_write, watch.sql, started=watch.started,
                       seconds=time.perf_counter() - p.t0, rows=p.rows, sqlstate=p.sqlstate,
                       digest=watch.digest.value(), in_transaction=watch.in_transaction, targets=watch.targets,
                       capture=watch.capture)
        if p.kind == _E and p.bind is not None:
            stmt, a, b, data = p.bind
            obs.bind = data[a + 5:b]  # parsed by the sinks (Observed.unpack), off the relay's path
            obs.param_types = stmt.oids
        elif p.kind == _E:
            return  # an Execute of a portal bound before: its parameters are not known here
        self.observers.offer(obs)


def _tags(sql: str) -> dict[str, str] | None:
    """The tags of a statement ending in a sqlcommenter comment (None when it is another comment)."""
    body = split_comment(sql)[1]
    return parse_tags(body) if body is not None else None
