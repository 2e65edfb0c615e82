"""What mirroring found, per target and fingerprint: the counts, the latency histograms of both sides and
one example of a mismatch. The shadow runner process keeps them (`mirror_process`); every worker's snapshot
(`Mirrors.snapshot`, a JSON file per worker) carries them, and `MirrorReport` adds snapshots up for the
admin console and /metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.stats import bucket_of, percentile

if TYPE_CHECKING:  # the worker imports this module; psycopg (runner) only its shadow runner process
    from proxy.shadow.observe import Observed
    from proxy.shadow.runner import ShadowResult

MAX_FINGERPRINTS = 1000  # per target and worker; further fingerprints are counted together as OTHER
OTHER = "other"
_SQL_MAX = 2000  # characters of an example's statement kept
_PARAM_MAX = 200  # characters of each of an example's parameters kept
# per-target counters; "queued" is a gauge (statements waiting now), the others only grow
COUNTERS = ("queued", "sent", "dropped", "compared", "mismatched", "errors")


# -- reports ----------------------------------------------------------------------------------------
class Latency:
    """A latency histogram (stats.py's log-scale buckets, so workers' histograms merge by adding)."""

    __slots__ = ("hist", "count", "min", "max")

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.count = 0
        self.min = float("inf")
        self.max = 0.0

    def add(self, seconds: float) -> None:
        k = bucket_of(seconds)
        self.hist[k] = self.hist.get(k, 0) + 1
        self.count += 1
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def absorb(self, other: Latency) -> None:
        for k, n in other.hist.items():
            self.hist[k] = self.hist.get(k, 0) + n
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def ms(self, q: float) -> float:
        """The q-quantile in milliseconds (0 when empty)."""
        return round(percentile(self.hist, self.count, q, self.min, self.max) * 1e3, 3) if self.count else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"hist": [x for item in self.hist.items() for x in item], "count": self.count,
                "min": self.min if self.count else None, "max": self.max}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Latency:
        lat = cls()
        flat = d["hist"]
        lat.hist = dict(zip(flat[::2], flat[1::2], strict=True))
        lat.count, lat.max = d["count"], d["max"]
        lat.min = float("inf") if d["min"] is None else d["min"]
        return lat


class Comparison:
    """The mirror's results for one fingerprint on one target."""

    __slots__ = ("target", "fingerprint", "query", "compared", "mismatches", "errors", "primary", "shadow",
                 "example", "last_error", "last_seen")

    def __init__(self, target: str, fingerprint: str, query: str = "") -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.query = query
        self.compared = 0  # answered by the shadow, the results compared
        self.mismatches = 0
        self.errors = 0  # the shadow failed (and the primary did not, or not the same way)
        self.primary = Latency()  # of the statements compared, on both sides
        self.shadow = Latency()
        self.example: dict[str, Any] | None = None  # the first mismatch
        self.last_error = ""
        self.last_seen = 0.0

    def absorb(self, other: Comparison) -> None:
        self.query = self.query or other.query
        self.compared += other.compared
        self.mismatches += other.mismatches
        self.errors += other.errors
        self.primary.absorb(other.primary)
        self.shadow.absorb(other.shadow)
        if self.example is None or (other.example is not None and other.example["at"] < self.example["at"]):
            self.example = other.example or self.example
        if other.last_seen >= self.last_seen:
            self.last_seen = other.last_seen
            self.last_error = other.last_error or self.last_error

    def row(self) -> dict[str, Any]:
        """One line of SHOW MIRROR."""
        return {"target": self.target, "fingerprint": self.fingerprint, "query": self.query,
                "compared": self.compared, "mismatches": self.mismatches, "errors": self.errors,
                "primary_p50_ms": self.primary.ms(0.50), "primary_p95_ms": self.primary.ms(0.95),
                "shadow_p50_ms": self.shadow.ms(0.50), "shadow_p95_ms": self.shadow.ms(0.95),
                "example": self.example, "last_error": self.last_error}

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "fingerprint": self.fingerprint, "query": self.query,
                "compared": self.compared, "mismatches": self.mismatches, "errors": self.errors,
                "primary": self.primary.to_json(), "shadow": self.shadow.to_json(), "example": self.example,
                "last_error": self.last_error, "last_seen": self.last_seen}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Comparison:
        c = cls(d["target"], d["fingerprint"], d["query"])
        c.compared, c.mismatches, c.errors = d["compared"], d["mismatches"], d["errors"]
        c.primary, c.shadow = Latency.from_json(d["primary"]), Latency.from_json(d["shadow"])
        c.example, c.last_error, c.last_seen = d["example"], d["last_error"], d["last_seen"]
        return c


@dataclass
class MirrorReport:
    """Mirror counters and comparisons, of one worker or added up over all of them."""

    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> COUNTERS, url, connected, ...
    comparisons: dict[tuple[str, str], Comparison] = field(default_factory=dict)
    workers: int = 0
    restarts: int = 0  # shadow runner processes that died and were started again, over the workers

    def add(self, snap: dict[str, Any]) -> None:
        """Add one worker's snapshot (`Mirrors.snapshot()`)."""
        self.workers += 1
        self.restarts += int(snap.get("runner_restarts", 0))
        for name, counters in snap["targets"].items():
            mine = self.targets.setdefault(name, {"target": name, "url": counters["url"], "workers": 0,
                                                  "connected": 0, **dict.fromkeys(COUNTERS, 0),
                                                  "last_error": "", "last_error_at": 0.0})
            mine["workers"] += 1
            for key in (*COUNTERS, "connected"):
                mine[key] += counters[key]
            if counters["last_error_at"] > mine["last_error_at"]:
                mine["last_error"], mine["last_error_at"] = counters["last_error"], counters["last_error_at"]
        for d in snap["comparisons"]:
            c = Comparison.from_json(d)
            key = (c.target, c.fingerprint)
            if key in self.comparisons:
                self.comparisons[key].absorb(c)
            else:
                self.comparisons[key] = c

    def rows(self) -> list[dict[str, Any]]:
        """SHOW MIRROR: per target and fingerprint, the most mismatched first."""
        ranked = sorted(self.comparisons.values(),
                        key=lambda c: (c.target, -c.mismatches, -c.errors, -c.compared, c.fingerprint))
        return [c.row() for c in ranked]

    def target_rows(self) -> list[dict[str, Any]]:
        """SHOW MIRRORS: per target, the counters."""
        return [{k: v for k, v in t.items() if k != "last_error_at"}
                for _, t in sorted(self.targets.items())]


def example(obs: Observed, res: ShadowResult) -> dict[str, Any]:
    """What SHOW MIRROR shows of a mismatch: the statement, its parameters (text as text, binary as
    hex), and both sides' outcomes."""
    params = None
    if obs.params is not None:
        formats = obs.param_formats
        params = [_param_text(v, formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0)
                  for i, v in enumerate(obs.params)]
    return {"sql": obs.sql[:_SQL_MAX], "params": params,
            "primary": {"rows": obs.rows, "digest": obs.digest, "sqlstate": obs.sqlstate},
            "shadow": {"rows": res.rows, "digest": res.digest, "sqlstate": res.sqlstate},
            "at": round(time.time(), 3)}


def _param_text(value: bytes | None, fmt: int) -> str | None:
    if value is None:
        return None
    if fmt == 0:
        text = value.decode("utf-8", "replace")
    else:
        text = "\\x" + value.hex()
    return text if len(text) <= _PARAM_MAX else text[:_PARAM_MAX] + "..."
