"""Runs one observed statement on a shadow server and digests its result exactly as the relay digests
the primary's.

The relay hashes each DataRow body it forwards (`digest.RowDigest`). Here the statement goes through
libpq with raw bytes in and out (psycopg's `pgconn`, no Python adaptation of values): the parameters
as the client bound them, in their formats and with the Parse's type OIDs, and the result in the
format the client asked for. Each row's DataRow body is rebuilt from the PGresult (int16 column count,
then per column an int32 length, -1 for NULL, and the bytes), which gives the bytes the server sent.

libpq asks for one result format for all columns; a Bind asking for mixed formats runs in text and
its digest is spoiled (only the row counts compare then).

Rows arrive in chunks (libpq 17's chunked rows mode) so a large result never sits whole in the
worker's memory, and the digesting yields to the event loop between chunks: the relay shares it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import generators, pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq.abc import PGresult

from proxy.shadow.digest import RowDigest
from proxy.shadow.mirror_target import safe_url
from proxy.shadow.observe import Observed
from proxy.wire.protocol import rows_from_tag

log = logging.getLogger(__name__)

CHUNK_ROWS = 256  # rows per PGresult in chunked mode: bounds memory, and the event loop time between yields
_CHUNKED = pq.version() >= 170000 and hasattr(pq.PGconn, "set_chunked_rows_mode")
_YIELD_ROWS = 64  # digesting a chunk larger than this yields to the event loop after it
_GRACE = 2.0  # seconds past `timeout` before giving up on the server's own statement_timeout
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0  # seconds between connection attempts to a shadow that is down

# SQLSTATEs of failures that are not the server's answer
CONNECT_FAILED = "08001"  # sqlclient_unable_to_establish_sqlconnection
CONNECTION_LOST = "08006"  # connection_failure
TIMED_OUT = "57014"  # query_canceled, as the server's statement_timeout reports it too
UNSUPPORTED = "0A000"  # feature_not_supported (COPY)
INTERNAL = "XX000"

_S = pq.ExecStatus
_ROWS = frozenset({_S.TUPLES_OK, _S.SINGLE_TUPLE, getattr(_S, "TUPLES_CHUNK", _S.TUPLES_OK)})
_COPY = frozenset({_S.COPY_IN, _S.COPY_OUT, _S.COPY_BOTH})
_IN_TRANSACTION = frozenset({pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR})

_i16 = struct.Struct("!h").pack
_i32 = struct.Struct("!i").pack
_NULL = _i32(-1)


@dataclass(slots=True)
class ShadowResult:
    """What the shadow answered: rows as CommandComplete tags count them (summed over the statements
    of a simple Query, like the relay's `Observed.rows`), the rows' digest, the time to the complete
    result (digesting excluded) and the SQLSTATE of an error (None on success)."""

    rows: int = 0
    digest: str | None = None
    seconds: float = 0.0
    sqlstate: str | None = None
    message: str = ""


def data_row_body(values: Sequence[bytes | None]) -> bytes:
    """The body of a DataRow message carrying these column values (None is NULL)."""
    parts = [_i16(len(values))]
    for v in values:
        if v is None:
            parts.append(_NULL)
        else:
            parts += (_i32(len(v)), v)
    return b"".join(parts)


def digest_result(res: PGresult, digest: RowDigest) -> None:
    """Add every row of a PGresult to the digest, as its DataRow body."""
    nfields = res.nfields
    head = _i16(nfields)
    get = res.get_value
    columns = range(nfields)
    for r in range(res.ntuples):
        parts = [head]
        for c in columns:
            v = get(r, c)
            if v is None:
                parts.append(_NULL)
            else:
                parts += (_i32(len(v)), v)
        digest.add(b"".join(parts))


def result_format(result_formats: Sequence[int]) -> tuple[int, bool]:
    """(format for libpq, whether the digest can match): a Bind's result formats are empty (all
    text), one (for all columns) or one per column."""
    if not result_formats:
        return 0, True
    first = result_formats[0]
    if all(f == first for f in result_formats):
        return first, True
    return 0, False


def _param_formats(formats: Sequence[int], n: int) -> list[int]:
    """A Bind's parameter formats (none: all text; one: for all; else one each) as libpq wants them."""
    if len(formats) == 1:
        return [formats[0]] * n
    return [*formats[:n], *([0] * (n - len(formats)))]


def _param_types(oids: Sequence[int], n: int) -> list[int]:
    """The Parse's OIDs, one per parameter: those it left out are 0, for the server to infer."""
    return [*oids[:n], *([0] * (n - len(oids)))]


async def run_statement(conn: psycopg.AsyncConnection, sql: str, params: Sequence[bytes | None] | None,
                        param_formats: Sequence[int], param_types: Sequence[int], result_formats: Sequence[int],
                        chunk_rows: int = 256) -> ShadowResult | None:
    """Run one statement on conn with raw parameter bytes (a simple Query when params is None), digesting
    its rows as the relay does. None when it turned out to be a COPY: the connection is then unusable."""
    pgconn = conn.pgconn
    command = sql.encode("utf-8", "surrogateescape")
    digest = RowDigest()
    t0 = time.perf_counter()
    if params is None:  # simple Query: text results, maybe several statements
        pgconn.send_query(command)
    else:
        fmt, whole = result_format(result_formats)
        if not whole:  # libpq takes one format for all columns: only the row counts can compare
            digest.spoil()
        n = len(params)
        pgconn.send_query_params(command, params, _param_types(param_types, n), _param_formats(param_formats, n), fmt)
    if _CHUNKED:
        pgconn.set_chunked_rows_mode(chunk_rows)
    await conn.wait(generators.send(pgconn))
    out = ShadowResult()
    hashing = 0.0  # time spent digesting, left out of the server's latency
    while (res := await conn.wait(generators.fetch(pgconn))) is not None:
        status = res.status
        if status in _ROWS:
            if res.ntuples:
                h0 = time.perf_counter()
                digest_result(res, digest)
                hashing += time.perf_counter() - h0
            out.rows += rows_from_tag(res.command_status or b"")
            large = res.ntuples > _YIELD_ROWS
            res.clear()
            if large:
                await asyncio.sleep(0)  # a big result must not hold the event loop the relay runs on
        elif status == _S.COMMAND_OK:
            out.rows += rows_from_tag(res.command_status or b"")
        elif status == _S.FATAL_ERROR:
            if out.sqlstate is None:
                out.sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"XX000").decode()
                out.message = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(
                    "utf-8", "replace")
        elif status in _COPY:
            return None
    out.seconds = time.perf_counter() - t0 - hashing
    out.digest = digest.value()
    return out


class ShadowRunner:
    """One autocommit connection to a shadow, running statements one at a time (not concurrently:
    use one runner per concurrent worker). `execute` never raises: failures come back as a SQLSTATE.

    A statement slower than `timeout` is cancelled by the shadow itself (statement_timeout, SQLSTATE
    57014); a shadow that does not even answer that is dropped `_GRACE` seconds later. A shadow that
    is down is retried with exponential backoff (0.1 s to 5 s): `execute` waits out the backoff, so the
    statements queued behind it wait too, and past the queue's size are dropped.
    """

    def __init__(self, url: str, timeout: float = 5.0, *, application_name: str = "pgfront-mirror",
                 chunk_rows: int = CHUNK_ROWS) -> None:
        self.url = url
        self.timeout = timeout
        self.chunk_rows = chunk_rows
        self.conn: psycopg.AsyncConnection | None = None
        self.retry_at = 0.0  # time.monotonic() of the next connection attempt
        self.backoff = 0.0
        self.last_error = ""
        self.outage = False  # connection attempts failing: logged once when it starts and once when it ends
        self.applied: dict[str, str] = {}  # settings set on this connection by `execute(settings=...)`
        self._connect_args: dict[str, object] = {"autocommit": True}
        given = conninfo_to_dict(url)
        if "application_name" not in given:
            self._connect_args["application_name"] = application_name
        if "connect_timeout" not in given:
            self._connect_args["connect_timeout"] = max(2, math.ceil(timeout))

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    async def run(self, obs: Observed) -> ShadowResult:
        # `settings`: the client session's result-shaping settings, should the relay record them
        if not obs.unpack():
            return ShadowResult(sqlstate="08P01", message="the statement's Bind could not be read")
        return await self.execute(obs.sql, obs.params, obs.param_formats, obs.param_types, obs.result_formats,
                                  getattr(obs, "settings", None))

    async def execute(self, sql: str, params: Sequence[bytes | None] | None = None,
                      param_formats: Sequence[int] = (), param_types: Sequence[int] = (),
                      result_formats: Sequence[int] = (), settings: Mapping[str, str] | None = None) -> ShadowResult:
        """Run `sql` (a simple Query when params is None, else one extended-protocol statement).

        settings: run-time settings to have on the connection first ({"TimeZone": "UTC"}): those that
        shape how values print must match the client session's, or equal values digest differently.
        Only a change costs a round trip."""
        if not self.connected:
            problem = await self._connect()
            if problem:
                return ShadowResult(sqlstate=CONNECT_FAILED, message=problem)
        conn = self.conn
        assert conn is not None
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout + _GRACE):  # no extra task, unlike wait_for
                if settings:
                    await self._apply(conn, settings)
                return await self._execute(conn, sql, params, param_formats, param_types, result_formats)
        except TimeoutError:
            message = f"no answer from the shadow within {self.timeout + _GRACE:g} s"
            await self._drop(message)
            return ShadowResult(seconds=time.perf_counter() - t0, sqlstate=TIMED_OUT, message=message)
        except (psycopg.Error, OSError) as e:
            await self._drop(str(e))
            return ShadowResult(seconds=time.perf_counter() - t0, sqlstate=CONNECTION_LOST, message=str(e))
        except Exception as e:  # a bug here must cost the mirror a statement, never the worker
            log.exception("mirroring a statement failed")
            await self._drop(str(e))
            return ShadowResult(sqlstate=INTERNAL, message=f"{type(e).__name__}: {e}")

    async def _execute(self, conn: psycopg.AsyncConnection, sql: str, params: Sequence[bytes | None] | None,
                       param_formats: Sequence[int], param_types: Sequence[int],
                       result_formats: Sequence[int]) -> ShadowResult:
        t0 = time.perf_counter()
        out = await run_statement(conn, sql, params, param_formats, param_types, result_formats, self.chunk_rows)
        if out is None:  # COPY needs a data stream the mirror does not have: give the connection up
            await self._drop("COPY is not mirrored")
            return ShadowResult(sqlstate=UNSUPPORTED, message="COPY is not mirrored",
                                seconds=time.perf_counter() - t0)
        pgconn = conn.pgconn
        if pgconn.transaction_status in _IN_TRANSACTION:
            # a mirrored BEGIN (or a simple Query ending inside a transaction block) must not leave
            # the next statements of this connection inside it: the shadow runs them one by one
            pgconn.send_query(b"ROLLBACK")
            await conn.wait(generators.execute(pgconn))
        return out

    async def _apply(self, conn: psycopg.AsyncConnection, settings: Mapping[str, str]) -> None:
        pgconn = conn.pgconn
        for name, value in settings.items():
            if self.applied.get(name) == value:
                continue
            # set_config with parameters: names and values from clients are never spliced into SQL
            pgconn.send_query_params(b"SELECT pg_catalog.set_config($1, $2, false)",
                                     [name.encode(), value.encode()])
            results = await conn.wait(generators.execute(pgconn))
            if any(r.status == _S.FATAL_ERROR for r in results):  # unknown here: not asked again
                log.debug("mirror: the shadow refused a setting", extra={"setting": name})
            self.applied[name] = value

    async def connect(self) -> str:
        """Open the connection now rather than at the first statement (once; a failure is retried at the
        next statement, after the backoff). Returns a problem, or ''."""
        return "" if self.connected else await self._connect()

    async def _connect(self) -> str:
        """Connect (after the backoff, if the last attempt failed). Returns a problem, or ''."""
        wait = self.retry_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(self.url, **self._connect_args),
                                          self.timeout + _GRACE)
            try:
                await conn.execute(f"SET statement_timeout = {max(1, round(self.timeout * 1000))}")
            except BaseException:
                await conn.close()
                raise
        except (psycopg.Error, OSError, TimeoutError) as e:
            problem = " ".join(str(e).split()) or type(e).__name__
            self.backoff = min(max(self.backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX)
            self.retry_at = time.monotonic() + self.backoff
            if not self.outage:  # once per outage, not per attempt
                self.outage = True
                log.warning("mirror: cannot connect to the shadow", extra={"shadow": safe_url(self.url),
                                                                           "reason": problem})
            self.last_error = problem
            return problem
        if self.outage:
            self.outage = False
            log.info("mirror: connected to the shadow again", extra={"shadow": safe_url(self.url)})
        self.conn, self.backoff, self.retry_at, self.applied = conn, 0.0, 0.0, {}
        return ""

    async def _drop(self, reason: str) -> None:
        conn, self.conn = self.conn, None
        self.last_error = reason
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

