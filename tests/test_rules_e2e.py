"""Rules end to end through pgfront, with psql and psycopg in both protocols."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from tests.conftest import psql

RULES = """
[[rule]]
name = "paginate-orders"
match = { kind = "select", tables = ["orders"] }
limit = { max_rows = 100, max_offset = 1000 }

[[rule]]
name = "cache-reports"
match = { kind = "select", tables = ["daily_report"] }
cache = { ttl = "60s" }

[[rule]]
name = "no-unbounded-delete"
match = { kind = "delete", has_where = false }
block = { message = "DELETE without WHERE is not allowed" }

[[rule]]
name = "narrow-users"
match = {}
rewrite = { from = "SELECT * FROM users WHERE id = $1", to = "SELECT id, email FROM users WHERE id = $1" }

[[rule]]
name = "old-name"
match = { tables = ["legacy_orders"] }
rewrite = { rename_table = { legacy_orders = "orders" } }

[[rule]]
name = "slow-reports-timeout"
match = { pattern = "pg_sleep" }
timeout = "300ms"

[[rule]]
name = "audit-payments"
match = { tables = ["payments"] }
log = true

[[rule]]
name = "try-blocking-truncate"
match = { kind = "ddl", pattern = "(?i)truncate" }
block = { message = "TRUNCATE would be refused" }
mode = "observe"
"""


@pytest.fixture(scope="module")
def schema(pg):
    pg.psql("DROP TABLE IF EXISTS orders, users, payments, scratch")
    pg.psql("CREATE TABLE orders (id int primary key, total int); "
            "INSERT INTO orders SELECT g, g FROM generate_series(1, 5000) g")
    pg.psql("CREATE TABLE users (id int primary key, email text, secret text); "
            "INSERT INTO users VALUES (1, 'a@x', 's1'), (2, 'b@x', 's2')")
    pg.psql("CREATE TABLE payments (id int); CREATE TABLE scratch (id int); INSERT INTO scratch VALUES (1), (2)")


@pytest.fixture(scope="module")
def ruled(pg, schema, tmp_path_factory):
    from tests.conftest import Pgfront

    d = tmp_path_factory.mktemp("rules")
    (d / "10-test.toml").write_text(RULES)
    p = Pgfront(f"postgresql://127.0.0.1:{pg.port}",
                f"[rules]\nfiles = ['{d}/*.toml']\nwatch = true\n[server]\nlog_format = 'json'\n")
    p.rules_dir = d
    p.start()
    yield p
    p.stop()


def test_block_simple_and_extended(ruled):
    res = psql(ruled.port, "DELETE FROM scratch", check=False)
    assert res.returncode != 0 and "DELETE without WHERE is not allowed" in res.stderr
    with psycopg.connect(ruled.conninfo()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not allowed"):
            conn.execute("DELETE FROM scratch", prepare=True)
        # like any error inside a transaction block, the block fails the transaction
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM scratch").fetchone()[0] == 2
        conn.execute("DELETE FROM scratch WHERE id = 0")  # with a WHERE: allowed


def test_limit_added_lowered_and_noticed(ruled):
    notices = []
    with psycopg.connect(ruled.conninfo(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        assert len(conn.execute("SELECT * FROM orders ORDER BY id").fetchall()) == 100
        assert len(conn.execute("SELECT * FROM orders ORDER BY id LIMIT 5000").fetchall()) == 100
        assert len(conn.execute("SELECT * FROM orders ORDER BY id LIMIT 7").fetchall()) == 7
        # parameters (extended protocol) are capped too
        assert len(conn.execute("SELECT * FROM orders WHERE id > %s ORDER BY id LIMIT %s", [10, 500]).fetchall()) \
            == 100
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 5000  # aggregates untouched
        assert len(conn.execute("SELECT id FROM orders UNION SELECT id FROM orders; -- trailing").fetchall()) == 100
    assert any('pgfront rule "paginate-orders"' in n for n in notices)


def test_deep_offset_refused(ruled):
    with psycopg.connect(ruled.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="keyset pagination"):
            conn.execute("SELECT * FROM orders ORDER BY id LIMIT 10 OFFSET 4000")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="keyset pagination"):
            conn.execute("SELECT * FROM orders ORDER BY id LIMIT 10 OFFSET %s", [4000])
        assert len(conn.execute("SELECT * FROM orders ORDER BY id LIMIT 10 OFFSET %s", [10]).fetchall()) == 10
    res = psql(ruled.port, "SELECT * FROM orders OFFSET 5000", check=False)
    assert "keyset pagination" in res.stderr


def test_template_rewrite_carries_literals_and_parameters(ruled):
    out = psql(ruled.port, "SELECT * FROM users WHERE id = 2").stdout.strip()
    assert out == "2|b@x"
    with psycopg.connect(ruled.conninfo()) as conn:
        cur = conn.execute("select *   from users where id = %s", [1])
        assert [c.name for c in cur.description] == ["id", "email"] and cur.fetchone() == (1, "a@x")


def test_rename_table(ruled):
    assert psql(ruled.port, "SELECT count(*) FROM legacy_orders WHERE id <= 10").stdout.strip() == "10"


def test_timeout_applies_to_matching_statements_only(ruled):
    with psycopg.connect(ruled.conninfo(), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '20s'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(2)")
        # the client's own setting is back afterwards
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "20s"
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(%s)", [2])
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "20s"
        assert conn.execute("SELECT pg_sleep(0.01)").fetchone() is not None


def test_log_action(ruled):
    psql(ruled.port, "SELECT count(*) FROM payments")
    deadline = time.monotonic() + 5
    while '"audit-payments"' not in ruled.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"audit-payments"' in ruled.log()


def test_observe_mode_changes_nothing_and_is_counted(ruled, pg):
    pg.psql("CREATE TABLE IF NOT EXISTS obs (a int)")
    psql(ruled.port, "TRUNCATE obs")
    rows = psql(ruled.port, "SHOW RULES", dbname="pgfront").stdout
    line = [r for r in rows.splitlines() if r.startswith("try-blocking-truncate")][0]
    assert "observe" in line
    assert psql(ruled.port, "SHOW RULES", dbname="pgfront").stdout.count("|") > 0


def test_hot_reload_on_file_change_and_bad_file_keeps_rules(ruled):
    path = ruled.rules_dir / "20-extra.toml"
    path.write_text('[[rule]]\nname = "no-scratch"\nmatch = { tables = ["scratch"], kind = "select" }\n'
                    'block = { message = "scratch is closed" }\n')
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "scratch is closed" in psql(ruled.port, "SELECT * FROM scratch", check=False).stderr:
            break
        time.sleep(0.3)
    else:
        pytest.fail("the new rule file was not picked up")
    # a broken file: the running rules stay, and the log says why
    path.write_text('[[rule]]\nname = "broken"\nmatch = { kind = "selct" }\nblock = true\n')
    time.sleep(2.5)
    assert "scratch is closed" in psql(ruled.port, "SELECT * FROM scratch", check=False).stderr
    assert "keeping the 9 running rules" in ruled.log() and "unknown statement kind 'selct'" in ruled.log()
    path.unlink()
    res = psql(ruled.port, "RELOAD", dbname="pgfront")
    assert res.returncode == 0
    assert psql(ruled.port, "SELECT count(*) FROM scratch").stdout.strip() == "2"


def test_sighup_reload_under_pgbench_load_drops_nothing(ruled):
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-p", str(ruled.port), "postgres"], env=env, check=True,
                   capture_output=True)
    stop = threading.Event()

    def hup():
        while not stop.is_set():
            ruled.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)

    t = threading.Thread(target=hup)
    t.start()
    try:
        res = subprocess.run(["pgbench", "-c", "4", "-j", "2", "-T", "4", "-p", str(ruled.port), "postgres"],
                             env=env, capture_output=True, text=True)
    finally:
        stop.set()
        t.join()
    assert res.returncode == 0, res.stderr
    assert "number of failed transactions: 0" in res.stdout


def test_rules_check_and_explain_cli(ruled, tmp_path):
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nmatch = { kind = "selct", pattern = "(" }\nlimit = { max_rows = "many" }\n')
    res = subprocess.run([sys.executable, "-m", "proxy", "rules", "check", str(bad)], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 1
    assert "bad.toml:" in res.stdout + res.stderr and "selct" in res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "proxy", "rules", "explain", "SELECT * FROM orders",
                          "--rules", str(ruled.rules_dir / "10-test.toml")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "paginate-orders" in res.stdout and "LIMIT 100" in res.stdout


MIRROR_RULE = '[[rule]]\nname = "{name}"\nmatch = {{}}\nmirror = {{ to = "shadow", share = {share} }}\n'


@pytest.mark.parametrize("pure", [False, True])
def test_reload_counts_and_mirrors_under_the_new_rules_at_once(pgfront_factory, pg, tmp_path, pure):
    """What an execution under a matching rule counts (its hits, the fingerprint's rule events) and
    whether it is mirrored are prepared once per decision, not per execution: a RELOAD puts the new
    rules in force at once, for a session open across it, in both protocols."""
    import urllib.request

    from benchmarks.mirror_cost import Console
    from proxy.devdb import free_port

    rules = tmp_path / "rules.toml"
    rules.write_text(MIRROR_RULE.format(name="never", share="1e-12"))
    metrics = free_port()
    p = pgfront_factory(f"[rules]\nfiles = ['{rules}']\nwatch = false\n"
                        f"[mirror.shadow]\nurl = '{pg.dsn()}'\nqueue_size = 100\n"
                        f"[metrics]\nlisten = '127.0.0.1:{metrics}'\n",
                        env={"PGFRONT_PURE_PYTHON": "1"} if pure else None)
    console = Console(p.port)

    def hits() -> dict[str, str]:
        return {r["name"]: r["hits"] for r in console.query("SHOW RULES")}

    def events(rule: str) -> int:
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        want = {f'rule="{rule}"', 'action="mirror"', 'mode="enforce"'}
        found = 0
        for line in body.splitlines():
            if line.startswith(("pgfront_rule_hits{", "pgfront_rule_hits_total{")):
                labels, value = line[line.index("{") + 1:].split("} ")
                found += int(float(value)) if want <= set(labels.split(",")) else 0
        return found

    def compared() -> int:
        return int(console.mirror_counters()["shadow"]["compared"])

    try:
        with psycopg.connect(p.dsn(), autocommit=True) as conn:
            def run() -> None:  # two in the simple protocol, two in the extended one (Parse every time)
                for _ in range(2):
                    assert conn.pgconn.exec_(b"SELECT 42").get_value(0, 0) == b"42"
                    assert conn.execute("SELECT %s::int", (42,), prepare=False).fetchone() == (42,)

            run()
            assert hits() == {"never": "4"} and events("never") == 4
            rules.write_text(MIRROR_RULE.format(name="always", share="1.0"))
            console.query("RELOAD")
            run()
            assert hits() == {"always": "4"}
            assert events("always") == 4 and events("never") == 4
        deadline = time.monotonic() + 10
        while compared() < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert compared() == 4  # every statement after the RELOAD, none before it
    finally:
        console.close()
