"""The workloads: each is one pgbench load, optionally with many idle connections held open."""

from __future__ import annotations

from dataclasses import dataclass

from .pgbench import Load

# A read that is expensive for PostgreSQL (a full scan of pgbench_accounts, 100,000 rows per
# scale unit) and returns a small result: what a read cache is for. No min()/max(): Pgpool-II
# 4.3 will not cache those (it cannot prove the polymorphic overloads immutable).
AGGREGATE_SQL = ("SELECT bid, count(*), sum(abalance), avg(abalance) "
                 "FROM pgbench_accounts GROUP BY bid ORDER BY bid;")


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    load: Load
    idle_connections: int = 0  # held open (startup done, no queries) while pgbench runs
    cache: bool = False  # compared against Pgpool-II's query cache


SCENARIOS: list[Scenario] = [
    Scenario("select-simple", "pgbench -S, simple protocol", Load("select-only", mode="simple")),
    Scenario("select-extended", "pgbench -S, extended protocol", Load("select-only", mode="extended")),
    Scenario("select-prepared", "pgbench -S, prepared statements", Load("select-only", mode="prepared")),
    Scenario("tpcb", "pgbench TPC-B-like (writes)", Load("tpcb-like", mode="simple")),
    Scenario("aggregate", "heavy aggregate read (cacheable)", Load(None, script=AGGREGATE_SQL, mode="simple"),
             cache=True),
    Scenario("aggregate-extended", "heavy aggregate read (cacheable), extended protocol",
             Load(None, script=AGGREGATE_SQL, mode="extended"), cache=True),
    Scenario("many-conns", "pgbench -S with 1,000 idle clients held", Load("select-only", mode="simple"),
             idle_connections=1000),
    Scenario("churn", "pgbench -S -C (new connection per txn)", Load("select-only", mode="simple", reconnect=True)),
]

QUICK_SCENARIOS = ["select-simple", "select-extended", "aggregate", "aggregate-extended"]


def by_key(keys: list[str] | None) -> list[Scenario]:
    if not keys:
        return list(SCENARIOS)
    known = {s.key: s for s in SCENARIOS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[k] for k in keys]
