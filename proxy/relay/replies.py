"""The server side of the conversation, sans I/O: each server message is paired with the request it
answers, through the ordered queue of `Pending` entries the client side filled.

While no queued reply needs changing, a chunk is relayed exactly as it came (`server_frames` only
tracks); from the first message that needs work (an error, a swallowed or replaced reply, a notice,
COPY, a cache fill...) the general loop `_server_frames` builds what the client gets. What the server
connection itself carries (transaction status, prepared statements, session state a client left) is
reported to its `ServerState` on the way.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

from proxy.relay.records import (
    _A,
    _BIND_OK,
    _CLOSE_OK,
    _CMD_C,
    _D,
    _E,
    _ERR,
    _FATAL,
    _G,
    _I,
    _LOCAL,
    _N,
    _PARSE_OK,
    _Q,
    _S,
    _SKIP_KINDS,
    _STATEMENT_KINDS,
    _T,
    _W,
    _Z,
    _Z_KINDS,
    Pending,
    Stmt,
    _n,
    _s,
    special,
)
from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.relay.hooks import HeldServer, RelayContext, StatementNames


class ReplyTracker:
    """The reply queue and what the server's messages tell about the conversation."""

    def __init__(self, app: RelayContext) -> None:
        self.app = app
        self.expect: deque[Pending] = deque()
        self.special = 0  # queued entries whose replies are not relayed verbatim
        self.tx_status = pq.IDLE
        self.server: HeldServer | None = None
        self.pool: StatementNames | None = None  # pool.Pool when server connections are pooled
        self.pooled_tx = False  # transaction pooling: the server is lent per transaction
        self.cstate = None  # cache.SessionCacheState when the read cache is on
        self.server_params: dict[str, str] = {}
        self.server_suspend: tuple | None = None  # (frames, data, index, effect): stopped at a commit point
        self.finished: list[Pending] = []  # statements whose reply is being relayed: accounted after it
        self.skip_until_sync = False
        self.copies_started = 0
        self.copy_ends_sent = 0
        self.copy_failed = False
        self.server_in_copy = False
        self.server_fatal = False  # the server sent a FATAL: it is closing the connection

    # -- provided by the transport shell ---------------------------------------------------------
    def to_client(self, data: bytes) -> None:
        raise NotImplementedError

    def fill_reply(self, fill: object, ttl: float | None) -> None:
        """A reply captured whole for the cache: store it (asynchronously)."""
        raise NotImplementedError

    def _done(self, p: Pending) -> object:
        raise NotImplementedError


    # -- the relay: server -> client ---------------------------------------------------------------
    def _pop(self) -> Pending:
        p = self.expect.popleft()
        if self.special and special(p):  # with none queued (the common case) there is nothing to check
            self.special -= 1
        return p


    def server_frames(self, frames: list, data: bytes, start: int = 0, hooked: bool = False) -> bytes:
        """Track each server message. While no pending reply needs changing (no swallowed replies,
        replaced errors, notices or local replies queued), the chunk is forwarded as it came.

        With the cache on, a commit point that made writes stops the loop before its CommandComplete
        or ReadyForQuery (`self.server_suspend`), so the invalidation lands before the client hears of
        the commit; the loop then resumes at that message with `hooked` set.

        This is the loop for the common case, every reply relayed verbatim: it only tracks the messages
        of successful statements (and the cache's commit points); from any other message on (an error,
        COPY, a notice, a ParameterStatus...), or in any other case, `_server_frames` does the work."""
        if start >= len(frames):
            return b""
        if self.special:
            return self._server_frames(frames, data, start, hooked)
        expect = self.expect
        cstate = self.cstate
        first = frames[start][1]
        hooked_at = first if hooked else -1  # resuming after an invalidation: its commit point is done
        for t, a, b in islice(frames, start, None) if start else frames:
            if t == 68:  # DataRow
                continue
            if not expect:
                break
            p = expect[0]
            if cstate is not None and (t == _CMD_C or t == _Z) and a != hooked_at:
                effect = self._commit_point(t, data[a + 5:b])
                if effect:  # relay what precedes the commit's message; the rest after the invalidation
                    self.server_suspend = (frames, data, frames.index((t, a, b), start), effect)
                    return data[first:a]
            if t == _CMD_C:
                if data[a + 5] == 68 or data[a + 5] == 82:  # DEALLOCATE, DISCARD, RESET: see ServerState
                    self.server.state.command_tag(data[a + 5:b - 1])
                p.rows += pq.rows_from_tag(data[a + 5:b - 1])
                p.part += 1
                self.server_in_copy = False
                if p.kind == _E:
                    expect.popleft()
                    self.finished.append(p)  # accounted once the reply is written
            elif t == _Z:
                self._ready_for_query(data[a + 5:b])
            elif t == _T or t == _n:
                if p.kind == _D:
                    expect.popleft()
            elif (t == _PARSE_OK or t == _BIND_OK or t == _CLOSE_OK) and p.prep is None:
                expect.popleft()
            elif t >= 0:
                break
        else:
            return data[first:frames[-1][2]]  # all of it: the very same object, no copy
        self._server_frames(frames, data, frames.index((t, a, b), start), False)  # relays it verbatim too
        if self.server_suspend is not None:  # it stopped at a commit point: nothing from there on yet
            return data[first:frames[self.server_suspend[2]][1]]
        return data[first:frames[-1][2]]


    def _skipped(self) -> None:
        """The reply at the head will never come (an error, or the server skipped its message)."""
        p = self._pop()
        if p.prep is not None and self.server is not None:
            self.server.state.prepared.discard(p.prep)  # that Parse never prepared anything
        if p.permit is not None:  # a throttled statement the server skipped: its slots are free again
            p.permit.release()
            p.permit = None


    def _plan_changed(self, stmt: Stmt) -> None:
        """The server refused a statement's cached plan (its result type changed): the client will
        prepare it again, and that must prepare it anew on the server, not find the stale one."""
        self.pool.plan_changed(stmt.sent_sql, stmt.oids, stmt.server_name)
        stmt.server_name = self.pool.server_name(stmt.sent_sql, stmt.oids)


    def _ready_for_query(self, status: bytes) -> Pending | None:
        """ReadyForQuery with replies pending: the Sync or Query it answers is over (returned, or None
        if every entry was skipped by the server)."""
        self.tx_status = status
        self.server_in_copy = False
        self.server.state.ready(status)
        expect = self.expect
        # entries before the Sync/Query that never got a reply were skipped by the server
        while expect and expect[0].kind not in _Z_KINDS:
            self._skipped()
        if not expect:
            return None
        p = expect.popleft()
        if self.special and special(p):  # _pop, inlined: this runs once per statement
            self.special -= 1
        if p.kind != _S:
            self.finished.append(p)  # accounted once the reply is written (server_data)
        elif p.copy_ends > self.copies_started:
            self._forget_stray_copy_ends(p.copy_ends - self.copies_started)
        return p


    def _server_frames(self, frames: list, data: bytes, start: int, hooked: bool) -> bytes:
        """The general loop of server_frames: any message, any queued reply."""
        plain = self.special == 0
        out: list = []
        expect = self.expect
        cstate = self.cstate
        first = last = frames[start][1]
        for i in range(start, len(frames)):
            t, a, b = frames[i]
            if t == 68 or t < 0:  # DataRow (or a piece of a large one / of CopyData)
                last = b
                if not plain and expect:
                    head = expect[0]
                    if head.fill is not None:
                        self._feed(head, data[a:b], t < 0)
                    if head.observe is not None:
                        head.observe.row(data[a + 5:b], t < 0)
                    if head.forward:
                        out.append(data[a:b])
                elif not plain:
                    out.append(data[a:b])
                continue
            if cstate is not None and (t == _Z or t == _CMD_C) and not (hooked and i == start) and expect:
                effect = self._commit_point(t, data[a + 5:b])
                if effect:
                    self.server_suspend = (frames, data, i, effect)
                    return data[first:a] if plain else b"".join(out)
            last = b
            if t == _N or t == _A or t == 100:  # notices, notifications, CopyData
                if not plain:
                    out.append(data[a:b])
                continue
            if t == 83:  # ParameterStatus (SET of a reported setting)
                name, value = pq.parse_parameter_status(data[a + 5:b])
                self.server_params[name] = value
                if cstate is not None:
                    cstate.server_parameter(name, value)
                if self.pool is not None and not (expect and not expect[0].forward):
                    self.server.state.dirty.add(name)  # the client changed it, not pgfront: undo before reuse
                if not plain:
                    out.append(data[a:b])
                continue
            if not expect:
                if t == _ERR and pq.parse_fields(data[a + 5:b]).get("V") in _FATAL:
                    self.server_fatal = True
                if not plain:
                    out.append(data[a:b])  # unsolicited, e.g. a FATAL before shutdown
                continue
            p = expect[0]
            kind = p.kind
            if t == _Z:
                p = self._ready_for_query(data[a + 5:b])
                if p is None:
                    if not plain:
                        out.append(data[a:b])
                elif not plain and p.forward:
                    if p.notices and p.kind == _Q and p.sqlstate is None:
                        out.extend(p.notices)
                    out.append(data[a:b])
                if not plain:
                    self._flush_local(out)
                continue
            if t == _CMD_C:
                if (data[a + 5] == 68 or data[a + 5] == 82) and p.forward:
                    # the client's DEALLOCATE, DISCARD, RESET (see ServerState); not pgfront's own RESET
                    # of the previous client's settings, which `applied` already accounts for
                    self.server.state.command_tag(data[a + 5:b - 1])
                p.rows += pq.rows_from_tag(data[a + 5:b - 1])
                p.part += 1
                self.server_in_copy = False
                if p.fill is not None:
                    self._feed(p, data[a:b], False)
                    if p.fill is not None:
                        self.fill_reply(p.fill, p.ttl)
                        p.fill = None
                if kind == _E:
                    self._pop()
                    self._done(p)
                    if not plain:
                        if p.notices:
                            out.extend(p.notices)
                        if p.forward:
                            out.append(data[a:b])
                        self._flush_local(out)
                    continue
            elif t == _ERR:
                fields = pq.parse_fields(data[a + 5:b])
                if p.kind in _STATEMENT_KINDS:  # never on the shared entries
                    p.sqlstate = fields.get("C", "XX000")
                if cstate is not None:
                    cstate.error()
                if p.fill is not None:
                    self.app.cache.abandon(p.fill)
                    p.fill = None
                if fields.get("V") in _FATAL:
                    self.server_fatal = True
                if self.server_in_copy:
                    self.server_in_copy = False
                    if self.copy_ends_sent < self.copies_started:
                        self.copy_failed = True
                        self.copy_ends_sent = self.copies_started
                if not plain and (p.forward or p.show_errors):
                    out.append(p.error if p.error is not None else data[a:b])
                if p.stmt is not None and fields.get("R") == "RevalidateCachedQuery" and self.pooled_tx:
                    self._plan_changed(p.stmt)
                if kind in _SKIP_KINDS:
                    self._skipped()  # the prepare it made, if any, failed with it
                    if kind == _E:
                        self._done(p)
                    # the server now skips to the next Sync: drop what it will never answer
                    while expect and expect[0].kind != _S:
                        self._skipped()
                    if not expect:
                        self.skip_until_sync = True
                    if not plain:
                        self._flush_local(out)
                continue
            elif t == _PARSE_OK or t == _BIND_OK or t == _CLOSE_OK:
                self._pop()
                if p.prep is not None:
                    self.pool.known.add(p.prep)
            elif t == _T or t == _n:
                if kind == _D:
                    if p.fill is not None:  # the Describe of a portal whose Execute fills the cache
                        p.fill.feed(data[a:b])  # (if it gives up, the Execute abandons the fill)
                        p.fill = None
                    self._pop()
                elif p.fill is not None:
                    self._feed(p, data[a:b], False)
            elif t == _I or t == _s:
                if p.fill is not None:
                    self.app.cache.abandon(p.fill)  # a suspended portal is not a whole result
                    p.fill = None
                if kind == _E:
                    self._pop()
                    if t == _s:
                        p.observe = None  # part of a result: nothing to mirror, capture or compare it by
                    self._done(p)
            elif t == _G or t == _W:
                self.copies_started += 1
                self.server_in_copy = True
                # Syncs the client sent before its CopyDone are read in COPY mode and ignored
                keep = [e for e in expect if not (e.kind == _S and e.copy_ends < self.copies_started)]
                if len(keep) != len(expect):
                    expect.clear()
                    expect.extend(keep)
            if not plain:
                if p.forward:
                    out.append(data[a:b])
                self._flush_local(out)
        if plain:
            return data if first == 0 and last == len(data) else data[first:last]
        return b"".join(out)


    # -- the read cache ---------------------------------------------------------------------------
    def _feed(self, p: Pending, raw: bytes, partial: bool) -> None:
        """Capture one message of a reply being filled into the cache (a streamed piece: give up)."""
        if partial or not p.fill.feed(raw):
            self.app.cache.abandon(p.fill)
            p.fill = None


    def _commit_point(self, t: int, body: bytes):
        """Cache bookkeeping at a CommandComplete or ReadyForQuery: the writes to invalidate now, if any."""
        cstate = self.cstate
        expect = self.expect
        if t == _Z:
            # other batches (Queries, Syncs) sent after this one: their writes are not committed yet
            return cstate.ready(body, sum(e.kind in _Z_KINDS for e in expect) > 1)
        p = expect[0]
        info = p.info
        if info is None:
            return None
        more = len(expect) > 1 and any(e.kind in _STATEMENT_KINDS for e in islice(expect, 1, None))
        if p.kind == _Q and info.statements:
            if p.part >= len(info.statements):
                return None
            more = more or p.part + 1 < len(info.statements)
            info = info.statements[p.part]
        return cstate.done(info, more)


    def _forget_stray_copy_ends(self, strays: int) -> None:
        """CopyDone/CopyFail sent outside COPY, which the server ignored (all the client's ends before
        this Sync are read, and more than the COPYs started): they must not count as the end of a later
        COPY, or the Syncs sent during it would be expected to get a reply."""
        self.copy_ends_sent -= strays
        for e in self.expect:
            if e.kind == _S and e.copy_ends:  # never the shared _PLAIN_S, whose count is 0
                e.copy_ends -= strays


    def _flush_local(self, out: list) -> None:
        expect = self.expect
        while expect and expect[0].kind == _LOCAL:
            p = self._pop()
            out.append(p.local)
            if p.whole:  # a whole simple-query reply: it ends with ReadyForQuery
                out.append(pq.ready_for_query(self.tx_status))
