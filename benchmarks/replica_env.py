"""What `python3 -m benchmarks replicas` runs against: a throwaway primary with pg_stat_statements and
pgbench's tables, a streaming replica of it (`proxy.devdb.TempReplica`), and pgfront in transaction
pooling with and without that replica, its /metrics read back as numbers."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from proxy.devdb import TempPostgres, TempReplica, free_port

from . import pgbench
from .targets import Env, Pgfront

REPLICA_NAME = "replica1"
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")


def start_servers(work: Path, scale: int) -> tuple[TempPostgres, TempReplica]:
    """The primary, loaded by pgbench -i, and a replica that has replayed it all. The primary commits
    with synchronous_commit on, as by default (TempPostgres turns it off): off, a commit's WAL waits
    for the WAL writer (up to wal_writer_delay, 200 ms) before it is flushed and so can be streamed,
    and a read after a write would wait about that long for any replica."""
    pg = TempPostgres(settings={"shared_preload_libraries": "'pg_stat_statements'", "wal_level": "replica",
                                "max_wal_senders": "10", "shared_buffers": "256MB", "synchronous_commit": "on",
                                "max_parallel_workers_per_gather": "0"},
                      base_dir=str(work)).start()
    try:
        pg.psql("CREATE EXTENSION pg_stat_statements")
        pgbench.initialize(pg.port, scale)
        replica = pg.replica()
    except BaseException:
        pg.cleanup()
        raise
    replica.wait_caught_up(60)
    return pg, replica


class RoutedPgfront(Pgfront):
    """pgfront in transaction pooling (the `pool` target's settings), with `replica` as its one
    [[replica]] (None: no routing at all) and /metrics on a port of its own."""

    def __init__(self, key: str, label: str, replica: TempReplica | None) -> None:
        super().__init__(key, label, "pool")
        self.replica = replica
        self.metrics_port = free_port()

    def config_text(self, env: Env) -> str:
        text = super().config_text(env) + f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n'
        if self.replica is not None:  # [routing] left at its defaults: what a user gets
            text += (f'[[replica]]\nname = "{REPLICA_NAME}"\n'
                     f'url = "postgresql://postgres@127.0.0.1:{self.replica.port}/postgres"\n')
        return text

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: 'name{labels}' (or 'name') -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m and not line.startswith("#"):
                key = f"{m.group(1)}{{{m.group(2)}}}" if m.group(2) else m.group(1)
                out[key] = float(m.group(3))
        return out

    def routed(self) -> dict[str, float]:
        """pgfront_routed_transactions_total by upstream: 'primary', 'replica1'."""
        prefix = 'pgfront_routed_transactions_total{upstream="'
        return {k[len(prefix):-2]: v for k, v in self.metrics().items() if k.startswith(prefix)}

    def wait_usable(self, timeout: float = 30.0) -> None:
        """Until the replica's first probe said it is ok (it gets no reads before)."""
        key = f'pgfront_replica_usable{{replica="{REPLICA_NAME}"}}'
        deadline = time.monotonic() + timeout
        while self.metrics().get(key) != 1.0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: the replica never became usable ({key} = "
                                   f"{self.metrics().get(key)})")
            time.sleep(0.1)


def routed_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(after.get(k, 0) - before.get(k, 0)) for k in sorted(set(before) | set(after))}
