"""Index hygiene (unused, duplicate, prefix-redundant) and table maintenance (VACUUM, ANALYZE) advice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.advisor.candidates import normalize_key
from proxy.advisor.catalog import Catalog, Index
from proxy.slowlog.explain import quote_ident

DEAD_SHARE = 0.20  # VACUUM advice above this dead-tuple share ...
DEAD_MIN = 1000  # ... and this many dead tuples
STALE_ANALYZE = timedelta(days=7)
MODIFIED_SHARE = 0.10  # ... when this share of rows changed since


def _drop_sql(idx: Index) -> str:
    return f"DROP INDEX CONCURRENTLY {quote_ident(idx.schema)}.{quote_ident(idx.name)};"


def _signature(idx: Index) -> tuple:
    return (idx.table_oid, idx.method, tuple(normalize_key(k) for k in idx.keys), normalize_key(idx.predicate or ""))


def _droppable(idx: Index) -> bool:
    return not idx.unique and not idx.primary and idx.constraint is None


def unused_indexes(cat: Catalog) -> list[dict[str, Any]]:
    """Indexes never scanned since the statistics were reset, that no constraint needs."""
    out = []
    for idx in cat.indexes:
        if idx.idx_scan == 0 and _droppable(idx) and idx.valid:
            out.append({"index": f"{idx.schema}.{idx.name}", "table": idx.table, "size_bytes": idx.size_bytes,
                        "idx_scan": idx.idx_scan, "definition": idx.definition, "drop_sql": _drop_sql(idx)})
    return sorted(out, key=lambda r: -r["size_bytes"])


def _keeper_rank(idx: Index) -> tuple:
    # the index to keep among identical ones: constraint-backing, unique, most used, oldest
    return (idx.constraint is None, not idx.unique, -idx.idx_scan, idx.oid)


def duplicate_indexes(cat: Catalog) -> list[dict[str, Any]]:
    """Same table, method, keys and predicate: all but one can go (never one backing a constraint)."""
    groups: dict[tuple, list[Index]] = {}
    for idx in cat.indexes:
        groups.setdefault(_signature(idx), []).append(idx)
    out = []
    for same in groups.values():
        if len(same) < 2:
            continue
        keep, *rest = sorted(same, key=_keeper_rank)
        for idx in rest:
            if idx.constraint is not None or (idx.unique and not keep.unique):
                continue  # only the constraint can drop it, or it enforces what the keeper does not
            out.append({"index": f"{idx.schema}.{idx.name}", "duplicate_of": f"{keep.schema}.{keep.name}",
                        "table": idx.table, "size_bytes": idx.size_bytes, "definition": idx.definition,
                        "kind": "duplicate", "drop_sql": _drop_sql(idx)})
    return out


def prefix_redundant_indexes(cat: Catalog) -> list[dict[str, Any]]:
    """A non-unique btree whose keys are a strict prefix of another btree's, with the same predicate."""
    out = []
    for idx in cat.indexes:
        if idx.method != "btree" or not _droppable(idx) or not idx.valid:
            continue
        keys = tuple(normalize_key(k) for k in idx.keys)
        pred = normalize_key(idx.predicate or "")
        for other in cat.indexes_on(idx.table_oid):
            okeys = tuple(normalize_key(k) for k in other.keys)
            if other is not idx and other.method == "btree" and other.valid and len(okeys) > len(keys) \
                    and okeys[:len(keys)] == keys and normalize_key(other.predicate or "") == pred:
                out.append({"index": f"{idx.schema}.{idx.name}", "duplicate_of": f"{other.schema}.{other.name}",
                            "table": idx.table, "size_bytes": idx.size_bytes, "definition": idx.definition,
                            "kind": "prefix", "drop_sql": _drop_sql(idx)})
                break
    return out


def _age(ts: str | None, now: datetime) -> timedelta | None:
    if not ts:
        return None
    return now - datetime.fromisoformat(ts)


def table_maintenance(cat: Catalog, now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    out = []
    for t in sorted(cat.tables.values(), key=lambda t: t.qualified):
        s = t.stats
        if not s:
            continue
        live, dead = s.get("n_live_tup") or 0, s.get("n_dead_tup") or 0
        name = f"{quote_ident(t.schema)}.{quote_ident(t.name)}"
        share = dead / (live + dead) if live + dead else 0.0
        if share > DEAD_SHARE and dead >= DEAD_MIN:
            out.append({"table": t.qualified, "action": "vacuum", "dead_share": round(share, 4), "n_dead_tup": dead,
                        "n_live_tup": live, "sql": f"VACUUM (ANALYZE) {name};",
                        "reason": f"{share:.0%} of the rows are dead tuples ({dead:,})"})
        last = max((x for x in (s.get("last_analyze"), s.get("last_autoanalyze")) if x), default=None)
        rows = max(live, int(t.reltuples))  # live is 0 right after a statistics reset
        modified = s.get("n_mod_since_analyze") or 0
        age = _age(last, now)
        if last is None and rows > 0 and not t.column_stats:
            # no timestamp but column statistics: analyzed before a statistics reset, not "never"
            reason = "never analyzed: the planner is guessing"
        elif age is not None and age > STALE_ANALYZE and rows and modified / rows > MODIFIED_SHARE:
            reason = f"last analyzed {age.days} days ago, {modified:,} rows changed since"
        else:
            continue
        out.append({"table": t.qualified, "action": "analyze", "last_analyze": last, "n_mod_since_analyze": modified,
                    "sql": f"ANALYZE {name};", "reason": reason})
    return out
