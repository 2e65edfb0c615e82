"""Cache keys: a blake2b digest of a canonical, length-prefixed encoding of everything that shapes a result.

The key is split in two so the per-execution part stays cheap: `session_prefix()` encodes database, role
and the result-shaping settings once (recomputed only when a setting changes), `make_key()` adds the
statement text, parameter types, values and formats. Never keyed on the libpg_query fingerprint: it sorts
select lists (`SELECT a, b` and `SELECT b, a` share one) and is a grouping key for statistics only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from hashlib import blake2b

from proxy.sql.sqlcommenter import split_comment

KEY_BYTES = 20

# Settings that never change a result's bytes; every other setting a session sets or the server reports is
# part of the key (deny by default: an unknown setting only splits the cache, it never merges results).
NOT_RESULT_SHAPING = frozenset({
    "application_name", "in_hot_standby", "default_transaction_read_only", "transaction_read_only",
    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "idle_session_timeout",
    "work_mem", "maintenance_work_mem", "temp_buffers", "client_min_messages", "log_min_duration_statement",
    "log_statement", "log_min_messages", "jit", "random_page_cost", "seq_page_cost", "effective_cache_size",
    "scram_iterations", "server_version", "server_version_num", "integer_datetimes", "is_superuser",
    "session_authorization", "role", "default_transaction_isolation", "transaction_isolation",
    "default_transaction_deferrable", "transaction_deferrable", "tcp_keepalives_idle",
    "tcp_keepalives_interval", "tcp_keepalives_count", "track_io_timing", "track_activities",
})
_NOT_SHAPING_PREFIXES = ("enable_", "geqo", "jit_", "log_", "auto_explain.", "pg_stat_statements.", "_pq_.")


def shapes_results(name: str) -> bool:
    """True when the setting `name` (lower case) may change the bytes of a query result."""
    return name not in NOT_RESULT_SHAPING and not name.startswith(_NOT_SHAPING_PREFIXES)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _code(fmt: int) -> bytes:
    return (fmt & 0xFFFF).to_bytes(2, "big")


def session_prefix(database: str, role: str, settings: Mapping[str, str]) -> bytes:
    """Canonical encoding of the session part of a key (settings sorted, non-shaping ones left out)."""
    parts = [b"pgfront-key-v1", _field(database.encode()), _field(role.encode())]
    for name in sorted(settings):
        if shapes_results(name):
            parts.append(_field(name.encode()) + _field(settings[name].encode()))
    return b"".join(parts)


def normalize_formats(codes: Sequence[int], count: int | None) -> tuple[int, ...]:
    """Format codes as the server applies them: none = all text, one = every column, else one each.

    With `count` (the number of parameters) the codes are expanded to one per item; without it (result
    columns, whose number the session may not know) one code stands for all columns, and N equal codes
    are the same as one (the server requires N to equal the column count).
    """
    if count is not None:
        if not codes:
            return (0,) * count
        if len(codes) == 1:
            return (codes[0],) * count
        return tuple(codes)
    if not codes:
        return (0,)
    first = codes[0]
    if all(c == first for c in codes):
        return (first,)
    return tuple(codes)


def make_key(
    prefix: bytes,
    sql: str,
    params: Sequence[bytes | None] = (),
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
    param_types: Sequence[int] = (),
    extended: bool = False,
) -> bytes:
    """Digest of (session prefix, protocol, statement text, parameter OIDs, values and formats, result formats).

    A trailing sqlcommenter comment is not keyed. Parameter type OIDs from Parse are keyed because they change the result (`SELECT $1` as int4 or text).
    NULL is encoded apart from the empty string. `extended` keeps the two reply shapes apart: a simple
    Query's entry holds RowDescription + DataRows + CommandComplete, an Execute's DataRows + CommandComplete.
    """
    if sql.endswith("*/") or sql.endswith("*/;"):
        # a trailing sqlcommenter comment (tags, a per-request traceparent) cannot change the result:
        # keyed without it, a traced app's repeated reads hit the same entry
        sql = split_comment(sql)[0]
    h = blake2b(prefix, digest_size=KEY_BYTES)
    h.update(b"E" if extended else b"Q")
    h.update(_field(sql.encode()))
    pf = normalize_formats(param_formats, len(params))
    h.update(len(params).to_bytes(4, "big"))
    for value, fmt in zip(params, pf, strict=True):
        if value is None:
            h.update(b"\xff\xff\xff\xff" + _code(fmt))
        else:
            h.update(_field(value) + _code(fmt))
    rf = normalize_formats(result_formats, None)
    h.update(len(rf).to_bytes(2, "big") + b"".join(_code(c) for c in rf))
    h.update(b"".join(t.to_bytes(4, "big") for t in param_types))
    return h.digest()


def redis_key(key: bytes) -> str:
    return "pgfront:r:" + key.hex()
