"""The pooling concurrency checker (tests/pool_checker.py): directly against PostgreSQL as the
differential baseline that validates the checker's own model, then through pgfront in session and
transaction pooling with a pool smaller than the number of clients.

PGFRONT_CHECKER_SECONDS sets how long each run starts new scripts (default 15 through pgfront);
PGFRONT_CHECKER_SEED replays a seed's scripts (the interleaving is up to the scheduler).
"""

from __future__ import annotations

import os
import random

import pytest

from tests import pool_checker as chk
from tests.conftest import PASSWORD

SECONDS = float(os.environ.get("PGFRONT_CHECKER_SECONDS", "15"))
CLIENTS = 16
POOL_SIZE = 3


def _seed() -> int:
    env = os.environ.get("PGFRONT_CHECKER_SEED")
    return int(env) if env else random.randrange(1 << 31)


@pytest.fixture(scope="module")
def chk_db(pg, tmp_path_factory):
    """A database of its own, owned by `app`, and a userlist for pooled pgfront."""
    pg.psql("DROP DATABASE IF EXISTS chk WITH (FORCE)")
    pg.psql("CREATE DATABASE chk OWNER app")
    userlist = tmp_path_factory.mktemp("chk") / "userlist.txt"
    userlist.write_text(f'"app" "{PASSWORD}"\n')
    yield userlist
    pg.psql("DROP DATABASE IF EXISTS chk WITH (FORCE)")


def _run(pg, port: int, mode: str, pool_size: int | None, seconds: float) -> chk.Report:
    seed = _seed()
    target = chk.Target(port=port, password=PASSWORD, pool_mode=mode, pool_size=pool_size)
    opts = chk.Options(seed=seed, clients=CLIENTS, duration=seconds)
    report = chk.run_check(target, opts, f"postgresql://postgres@127.0.0.1:{pg.port}/chk", label=mode)
    print(report.summary())
    return report


def test_checker_baseline_direct_postgres(pg, chk_db):
    """No proxy: every counter must be zero, or the checker's model is wrong."""
    report = _run(pg, pg.port, "direct", None, min(SECONDS, 6.0))
    assert report.stats["scripts"] > 100 and report.stats["writes_ack"] > 100, report.summary()
    assert report.stats["drops"] > 10 and report.stats["expected_errors"] > 10, report.summary()
    assert not report.failures(), report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_pooling_under_concurrency(pg, chk_db, pgfront_factory, mode):
    """16 clients over 3 server connections: nothing lost, no phantom, no leak, no hang."""
    p = pgfront_factory(config=f"[auth]\nmode = 'userlist'\nfile = '{chk_db}'\n"
                               f"[pool]\nmode = '{mode}'\ndefault_pool_size = {POOL_SIZE}\n"
                               "query_wait_timeout = '30s'\n[server]\nmax_client_conn = 5000\n")
    report = _run(pg, p.port, mode, POOL_SIZE, SECONDS)
    assert report.stats["scripts"] > 50, report.summary() + "\n" + p.log()
    assert not report.failures(), report.summary()
