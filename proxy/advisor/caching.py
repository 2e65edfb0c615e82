"""Caching and result-size advice, each with a ready-to-paste pgfront rule.

Expected hit rate, a rough model stated in the report: an entry lives until its TTL runs out or a
write to one of its tables invalidates it, so its mean lifetime is L = 1 / (1/ttl + writes per
second); with q calls per second spread over K distinct parameter sets, a key sees n = q/K x L
calls per lifetime, of which all but the first hit: n / (n + 1).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.advisor.catalog import Catalog
from proxy.advisor.collect import Statement
from proxy.advisor.predicates import statement_shape

CACHE_MIN_CALLS = 20
CACHE_MIN_MEAN_MS = 1.0
CACHE_MIN_HIT = 0.5
CACHE_TTL_S = 60.0
LIMIT_MIN_ROWS = 10000
LIMIT_MAX_ROWS = 1000

_UNCACHEABLE = re.compile(
    r"\b(now|random|clock_timestamp|statement_timestamp|timeofday|nextval|currval|setval|gen_random_uuid|"
    r"uuid_generate_v\d|pg_sleep|txid_current|current_timestamp|localtimestamp|current_user|session_user)\b"
    r"|\bfor\s+(update|share|no\s+key\s+update|key\s+share)\b", re.I)


def cache_rule(fp: str, ttl_s: float = CACHE_TTL_S) -> str:
    return f'[[rule]]\nname = "cache-{fp}"\nmatch = {{ fingerprint = "{fp}" }}\ncache = {{ ttl = "{int(ttl_s)}s" }}\n'


def limit_rule(fp: str, max_rows: int = LIMIT_MAX_ROWS) -> str:
    return f'[[rule]]\nname = "limit-{fp}"\nmatch = {{ fingerprint = "{fp}" }}\nlimit = {{ max_rows = {max_rows} }}\n'


def expected_hit_rate(calls_per_s: float, distinct_keys: int, writes_per_s: float, ttl_s: float) -> float:
    lifetime = 1.0 / (1.0 / ttl_s + max(0.0, writes_per_s))
    n = calls_per_s / max(1, distinct_keys) * lifetime
    return n / (n + 1.0)


def _write_rate(cat: Catalog, names: tuple[str, ...], stats_seconds: float) -> float | None:
    total = 0.0
    for name in names:
        t = cat.table(name)
        if t is None:
            return None
        s = t.stats
        total += (s.get("n_tup_ins") or 0) + (s.get("n_tup_upd") or 0) + (s.get("n_tup_del") or 0)
    return total / max(stats_seconds, 1.0)


def cache_candidates(cat: Catalog, statements: list[Statement], window_s: float,
                     stats_seconds: float) -> list[dict[str, Any]]:
    """Reads called often, slow enough, on tables rarely written. `window_s`: seconds the call counts span."""
    out = []
    for st in statements:
        shape = statement_shape(st.sql)
        if shape.kind != "select" or not shape.tables or _UNCACHEABLE.search(st.sql):
            continue
        if st.calls < CACHE_MIN_CALLS or st.mean_ms < CACHE_MIN_MEAN_MS:
            continue
        writes = _write_rate(cat, shape.tables, stats_seconds)
        if writes is None:
            continue
        rate = st.calls / max(window_s, 1.0)
        keys = st.distinct_keys()
        hit = expected_hit_rate(rate, keys, writes, CACHE_TTL_S)
        if hit < CACHE_MIN_HIT:
            continue
        out.append({
            "fingerprint": st.fingerprint, "query": st.normalized, "calls": st.calls, "mean_ms": round(st.mean_ms, 3),
            "calls_per_s": round(rate, 3), "table_writes_per_s": round(writes, 4), "distinct_parameter_sets": keys,
            "expected_hit_rate": round(hit, 3), "est_time_saved_ms": round(st.weight_ms * hit, 1),
            "ttl": f"{int(CACHE_TTL_S)}s", "rule": cache_rule(st.fingerprint),
        })
    return sorted(out, key=lambda r: -r["est_time_saved_ms"])


def _plan_rows(st: Statement) -> float:
    if st.plan:
        return float(st.plan.get("Plan", {}).get("Plan Rows", 0))
    if st.pgss_calls:
        return (st.pgss_rows or 0) / st.pgss_calls
    return 0.0


def limit_candidates(statements: list[Statement]) -> list[dict[str, Any]]:
    """Reads without LIMIT whose results are large (plan estimate or rows per call)."""
    out = []
    for st in statements:
        shape = statement_shape(st.sql)
        if shape.kind != "select" or shape.has_limit:
            continue
        rows = _plan_rows(st)
        if rows < LIMIT_MIN_ROWS:
            continue
        out.append({"fingerprint": st.fingerprint, "query": st.normalized, "rows": int(rows), "calls": st.calls,
                    "max_rows": LIMIT_MAX_ROWS, "rule": limit_rule(st.fingerprint)})
    return sorted(out, key=lambda r: -r["rows"] * max(1, r["calls"]))
