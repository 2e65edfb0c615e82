"""What-if validation with HypoPG, and the greedy choice of the indexes worth creating.

All on one connection (hypothetical indexes live in the backend that made them): EXPLAIN every
affected statement with no hypothetical index, then greedily: add each remaining candidate to the
indexes chosen so far, keep the one the planner uses that saves the most workload time (calls x
mean time, scaled by the relative cost cut, counting only statements it makes at least
`min_improvement` cheaper), preferring the smaller index when two save about the same; stop when
none saves anything. Indexes that are a prefix of another chosen one go, and a final run with all
chosen indexes together gives the costs shown (an index no statement uses any more drops out).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.advisor.candidates import Candidate, normalize_key
from proxy.advisor.collect import Statement
from proxy.slowlog.explain import explain_plan, walk_plan

log = logging.getLogger("pgfront.advisor")

_TIE = 0.02  # gains within 2% of each other count as equal: the smaller index wins


@dataclass
class HypoStatus:
    available: bool = False  # the extension can be used on this server
    validated: bool = False
    created_by_advisor: bool = False
    version: str | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "validated": self.validated, "version": self.version,
                "created_by_advisor": self.created_by_advisor, "note": self.note}


async def enable_hypopg(conn: asyncpg.Connection) -> HypoStatus:
    status = HypoStatus()
    default = await conn.fetchval("SELECT default_version FROM pg_available_extensions WHERE name = 'hypopg'")
    if default is None:
        status.note = ("HypoPG is not installed on the database server (e.g. the postgresql-NN-hypopg package): "
                       "recommendations are NOT validated")
        return status
    installed = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'hypopg'")
    if installed is None:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS hypopg")
            status.created_by_advisor = True
        except asyncpg.PostgresError as e:
            reason = str(e).splitlines()[0]
            status.note = f"HypoPG could not be enabled ({reason}): recommendations are NOT validated"
            return status
    status.available = True
    status.version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'hypopg'")
    return status


async def disable_hypopg(conn: asyncpg.Connection, status: HypoStatus) -> None:
    if status.created_by_advisor:
        try:
            await conn.execute("DROP EXTENSION IF EXISTS hypopg")
        except asyncpg.PostgresError as e:
            log.warning("could not drop the hypopg extension the advisor created: %s", e)


def uses_index(plan: dict[str, Any], index_name: str) -> bool:
    return any(node.get("Index Name") == index_name for node in walk_plan(plan.get("Plan", plan)))


def plan_indexes(plan: dict[str, Any]) -> set[str]:
    return {n["Index Name"] for n in walk_plan(plan.get("Plan", plan)) if n.get("Index Name")}


@dataclass
class Scored:
    candidate: Candidate
    size_bytes: int = 0
    costs: dict[str, float] = field(default_factory=dict)  # fingerprint -> cost where the index is used


@dataclass
class Chosen:
    candidate: Candidate
    size_bytes: int
    before: dict[str, float]
    after: dict[str, float]  # with every chosen index present, for the statements using this one


class Validator:
    def __init__(self, conn: asyncpg.Connection, statements: list[Statement],
                 tick: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self.statements = {s.fingerprint: s for s in statements}
        self.tick = tick or (lambda: None)
        self.failures: dict[str, str] = {}  # fingerprint -> why it could not be explained
        self.tables_of: dict[str, set[str]] = {}  # fingerprint -> relation names in its plan
        self.plans: dict[str, list[dict[str, Any]]] = {}  # fingerprint -> plans without hypothetical indexes

    async def cost(self, st: Statement) -> tuple[float, list[dict[str, Any]]] | None:
        """Mean estimated total cost over the statement's samples, and their plans."""
        costs, plans = [], []
        for sample in st.samples:
            try:
                plan = await explain_plan(self.conn, sample.sql, sample.params)
            except (asyncpg.PostgresError, ValueError) as e:
                self.failures.setdefault(st.fingerprint, str(e).splitlines()[0])
                continue
            costs.append(plan["Plan"]["Total Cost"])
            plans.append(plan)
        if not costs:
            return None
        return sum(costs) / len(costs), plans

    async def baseline(self, reset_hypopg: bool) -> dict[str, float]:
        if reset_hypopg:
            await self.conn.execute("SELECT hypopg_reset()")
        before: dict[str, float] = {}
        for fp, st in self.statements.items():
            res = await self.cost(st)
            if res is not None:
                before[fp] = res[0]
                self.plans[fp] = res[1]
                self.tables_of[fp] = {n["Relation Name"] for p in res[1] for n in walk_plan(p["Plan"])
                                      if n.get("Relation Name")}
            self.tick()
        return before

    def affected(self, cand: Candidate, before: dict[str, float]) -> list[str]:
        return [fp for fp in before if cand.table.name in self.tables_of.get(fp, ())]

    async def _create(self, cand: Candidate) -> tuple[int, str]:
        row = await self.conn.fetchrow("SELECT indexrelid, indexname FROM hypopg_create_index($1)",
                                       f"CREATE INDEX {cand.definition()}")
        return row["indexrelid"], row["indexname"]

    async def _try(self, cand: Candidate, before: dict[str, float]) -> Scored:
        """Costs of the affected statements with this candidate added to the indexes present now."""
        scored = Scored(cand)
        try:
            oid, name = await self._create(cand)
        except asyncpg.PostgresError as e:
            log.info("hypothetical index %s refused: %s", cand.definition(), e)
            return scored
        try:
            scored.size_bytes = await self.conn.fetchval("SELECT hypopg_relation_size($1)", oid) or 0
            for fp in self.affected(cand, before):
                res = await self.cost(self.statements[fp])
                if res is not None and any(uses_index(p, name) for p in res[1]):
                    scored.costs[fp] = res[0]
        finally:
            await self.conn.fetchval("SELECT hypopg_drop_index($1)", oid)
            self.tick()
        return scored

    async def greedy(self, cands: list[Candidate], before: dict[str, float], weights: dict[str, float],
                     min_improvement: float) -> list[Scored]:
        """Choose indexes one at a time, each evaluated together with those already chosen (a join
        often needs two indexes before either pays off). A candidate's costs are re-measured only
        when a chosen index touched one of its statements."""
        await self.conn.execute("SELECT hypopg_reset()")
        current = dict(before)
        tried: dict[int, Scored] = {}
        remaining = list(range(len(cands)))
        chosen: list[Scored] = []
        try:
            while remaining:
                for i in remaining:
                    if i not in tried:
                        tried[i] = await self._try(cands[i], before)
                gains = [(_gain(tried[i], current, before, weights, min_improvement), i) for i in remaining]
                top = max(g for g, _ in gains)
                if top <= 0:
                    break
                pick = min((i for g, i in gains if g >= top * (1 - _TIE)),
                           key=lambda i: (tried[i].size_bytes, len(cands[i].keys)))
                chosen.append(tried[pick])
                remaining.remove(pick)
                await self._create(cands[pick])  # stays for the following rounds
                touched = set(self.affected(cands[pick], before))
                for fp in touched:
                    res = await self.cost(self.statements[fp])
                    if res is not None:
                        current[fp] = min(current[fp], res[0])
                for i in remaining:
                    if touched & set(self.affected(cands[i], before)):
                        del tried[i]
        finally:
            await self.conn.execute("SELECT hypopg_reset()")
        return prune_prefixes(chosen)

    async def combined(self, chosen: list[Scored], before: dict[str, float]) -> list[Chosen]:
        """Costs with every chosen index present; indexes no statement uses any more drop out."""
        names: dict[str, Scored] = {}
        try:
            for s in chosen:
                _, name = await self._create(s.candidate)
                names[name] = s
            fps = {fp for s in chosen for fp in self.affected(s.candidate, before)}
            after: dict[str, float] = {}
            users: dict[str, set[str]] = {name: set() for name in names}
            for fp in fps:
                res = await self.cost(self.statements[fp])
                if res is None:
                    continue
                after[fp] = res[0]
                for name in set().union(*(plan_indexes(p) for p in res[1])) & names.keys():
                    users[name].add(fp)
        finally:
            await self.conn.execute("SELECT hypopg_reset()")
        out = []
        for name, s in names.items():
            helped = {fp for fp in users[name] if after[fp] < before[fp]}
            if helped:
                out.append(Chosen(s.candidate, s.size_bytes, {fp: before[fp] for fp in helped},
                                  {fp: after[fp] for fp in helped}))
        return out


def _gain(s: Scored, current: dict[str, float], before: dict[str, float], weights: dict[str, float],
          min_improvement: float) -> float:
    """Workload time saved on top of the current indexes: weight x relative cost cut, counting only
    statements whose current cost drops by at least `min_improvement`."""
    return sum(weights.get(fp, 1.0) * (current[fp] - c) / before[fp] for fp, c in s.costs.items()
               if before[fp] > 0 and c <= current[fp] * (1 - min_improvement))


def _key_names(cand: Candidate) -> tuple[str, ...]:
    return tuple(re.sub(r"\s+(desc|asc)$", "", normalize_key(k)) for k in cand.keys)


def prune_prefixes(chosen: list[Scored]) -> list[Scored]:
    """Drop an index whose keys are a strict prefix of another chosen one on the same table and predicate."""
    out = []
    for s in chosen:
        a = s.candidate
        covered = any(
            o is not s and o.candidate.table.oid == a.table.oid and o.candidate.signature[2] == a.signature[2]
            and len(o.candidate.keys) > len(a.keys) and _key_names(o.candidate)[:len(a.keys)] == _key_names(a)
            for o in chosen)
        if not covered:
            out.append(s)
    return out
