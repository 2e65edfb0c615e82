"""Rules engine rewrites on many SQL shapes: pagination, templates, renames; checked against real Postgres."""

from __future__ import annotations

import psycopg
import pytest
from pglast import parser

from proxy.rules import MatchContext, load_rules
from proxy.rules.paginate import LimitResult, enforce_limit
from proxy.rules.rewrite import RenameTables, TemplateError, TemplateRewrite
from proxy.sql import analyze

# (statement, expected text after max_rows=1000 / max_offset=10000; None = unchanged)
LIMIT_CASES = [
    ("SELECT * FROM orders", "SELECT * FROM orders LIMIT 1000"),
    ("select * from orders order by id;", "select * from orders order by id LIMIT 1000;"),
    ("SELECT * FROM orders ORDER BY id LIMIT 10", None),
    ("SELECT * FROM orders ORDER BY id LIMIT 1000", None),
    ("SELECT * FROM orders ORDER BY id LIMIT 5000 OFFSET 10", "SELECT * FROM orders ORDER BY id LIMIT 1000 OFFSET 10"),
    ("SELECT * FROM orders OFFSET 10 LIMIT 5000", "SELECT * FROM orders OFFSET 10 LIMIT 1000"),
    ("SELECT * FROM orders LIMIT 99999999999", "SELECT * FROM orders LIMIT 1000"),
    ("SELECT * FROM orders LIMIT ALL", "SELECT * FROM orders LIMIT 1000"),
    ("SELECT * FROM orders LIMIT NULL", "SELECT * FROM orders LIMIT 1000"),
    ("SELECT * FROM orders OFFSET 5", "SELECT * FROM orders OFFSET 5 LIMIT 1000"),
    ("SELECT * FROM orders OFFSET 5 ROWS", "SELECT * FROM orders OFFSET 5 ROWS LIMIT 1000"),
    ("SELECT * FROM orders FOR UPDATE", "SELECT * FROM orders LIMIT 1000 FOR UPDATE"),
    ("SELECT * FROM orders ORDER BY id FOR NO KEY UPDATE SKIP LOCKED",
     "SELECT * FROM orders ORDER BY id LIMIT 1000 FOR NO KEY UPDATE SKIP LOCKED"),
    ("SELECT * FROM orders o JOIN items i ON i.order_id = o.id FOR SHARE OF o NOWAIT",
     "SELECT * FROM orders o JOIN items i ON i.order_id = o.id LIMIT 1000 FOR SHARE OF o NOWAIT"),
    ("SELECT * FROM orders LIMIT 5000 FOR UPDATE", "SELECT * FROM orders LIMIT 1000 FOR UPDATE"),
    ("SELECT id FROM orders UNION SELECT id FROM old_orders ORDER BY 1",
     "SELECT id FROM orders UNION SELECT id FROM old_orders ORDER BY 1 LIMIT 1000"),
    ("(SELECT id FROM orders LIMIT 5000) UNION ALL (SELECT id FROM old_orders)",
     "(SELECT id FROM orders LIMIT 5000) UNION ALL (SELECT id FROM old_orders) LIMIT 1000"),
    ("SELECT id FROM orders INTERSECT SELECT id FROM x EXCEPT SELECT 1 LIMIT 20000",
     "SELECT id FROM orders INTERSECT SELECT id FROM x EXCEPT SELECT 1 LIMIT 1000"),
    ("(SELECT * FROM orders)", "(SELECT * FROM orders LIMIT 1000)"),
    ("((SELECT * FROM orders LIMIT 5000))", "((SELECT * FROM orders LIMIT 1000))"),
    ("WITH recent AS (SELECT * FROM orders LIMIT 10) SELECT * FROM recent",
     "WITH recent AS (SELECT * FROM orders LIMIT 10) SELECT * FROM recent LIMIT 1000"),
    ("WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t) SELECT n FROM t",
     "WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t) SELECT n FROM t LIMIT 1000"),
    ("SELECT * FROM (SELECT * FROM orders LIMIT 5000) s", "SELECT * FROM (SELECT * FROM orders LIMIT 5000) s LIMIT 1000"),
    ("SELECT * FROM orders -- trailing comment\n", "SELECT * FROM orders LIMIT 1000 -- trailing comment\n"),
    ("SELECT * FROM orders /* c */ ;  ", "SELECT * FROM orders LIMIT 1000 /* c */ ;  "),
    ("/* app=web */ SELECT * FROM orders WHERE note = 'LIMIT 5; -- not a comment'",
     "/* app=web */ SELECT * FROM orders WHERE note = 'LIMIT 5; -- not a comment' LIMIT 1000"),
    ("SELECT * FROM orders WHERE id > $1 ORDER BY id LIMIT $2",
     "SELECT * FROM orders WHERE id > $1 ORDER BY id LIMIT LEAST($2::bigint, 1000)"),
    ("SELECT * FROM orders LIMIT 10 + 5000", "SELECT * FROM orders LIMIT LEAST((10 + 5000), 1000)"),
    ("SELECT * FROM orders FETCH FIRST 5000 ROWS ONLY", "SELECT * FROM orders FETCH FIRST 1000 ROWS ONLY"),
    ("SELECT * FROM orders ORDER BY id FETCH NEXT $1 ROWS WITH TIES",
     "SELECT * FROM orders ORDER BY id FETCH NEXT LEAST($1::bigint, 1000) ROWS WITH TIES"),
    ("SELECT * FROM orders FETCH FIRST ROW ONLY", None),
    ("SELECT 'é' AS x FROM orders LIMIT 5000", "SELECT 'é' AS x FROM orders LIMIT 1000"),
    ("TABLE orders", "TABLE orders LIMIT 1000"),
    ("VALUES (1), (2)", "VALUES (1), (2) LIMIT 1000"),
    ("SELECT * INTO copy FROM orders", None),  # creates a table
    ("INSERT INTO x SELECT * FROM orders", None),
    ("DECLARE c CURSOR FOR SELECT * FROM orders", None),
    ("EXPLAIN SELECT * FROM orders", None),
]


@pytest.mark.parametrize("sql, expected", LIMIT_CASES)
def test_limit_shapes(sql, expected):
    res = enforce_limit(sql, 1000, 10000)
    assert res.sql == expected
    if expected is not None:
        parser.parse_sql(expected)  # still valid SQL


@pytest.mark.parametrize("sql, result", [
    ("SELECT * FROM orders OFFSET 20000", LimitResult(offset=20000)),
    ("SELECT * FROM orders ORDER BY id LIMIT 5 OFFSET 10001", LimitResult(offset=10001)),
    ("SELECT * FROM orders OFFSET 10000 LIMIT 5", LimitResult()),
    ("SELECT * FROM orders LIMIT 5 OFFSET $1", LimitResult(offset_param=1)),
    ("SELECT * FROM orders LIMIT $1 OFFSET $2",
     LimitResult("SELECT * FROM orders LIMIT LEAST($1::bigint, 1000) OFFSET $2", "capped", None, 2)),
    ("SELECT * FROM orders OFFSET 99999999999", LimitResult(offset=99999999999)),
])
def test_offsets(sql, result):
    assert enforce_limit(sql, 1000, 10000) == result


def test_one_row_statements_and_limit_kinds():
    assert enforce_limit("SELECT count(*) FROM orders", 1000, None, one_row=True).sql is None
    assert enforce_limit("SELECT * FROM orders LIMIT 5000", 1000, None).change == "lowered"
    assert enforce_limit("SELECT * FROM orders", None, 10).sql is None  # only an offset limit


def test_engine_leaves_plain_aggregates_alone(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\nname = "p"\nmatch = { kind = "select" }\nlimit = { max_rows = 10 }\n')
    rs = load_rules([str(path)])
    for sql in ("SELECT count(*) FROM orders", "SELECT max(id), min(id) FROM orders WHERE x > 1"):
        d = rs.decide(analyze(sql), MatchContext())
        assert (d.sql, d.notices) == (None, ())
    assert rs.decide(analyze("SELECT x, count(*) FROM orders GROUP BY x"), MatchContext()).sql.endswith("LIMIT 10")


def test_offset_parameter_checked_at_bind(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\nname = "p"\nmatch = { kind = "select" }\nlimit = { max_offset = 100 }\n')
    d = load_rules([str(path)]).decide(analyze("SELECT * FROM t ORDER BY id OFFSET $1"), MatchContext())
    assert d.sql is None and d.offset_check == (1, 100, "p")
    assert d.offset_error(b"100") is None
    assert d.offset_error(b"101") == ("54000", 'OFFSET 101 is beyond the maximum of 100 set by pgfront rule "p"; '
                                               "use keyset pagination instead (WHERE key > last_key ORDER BY key LIMIT n)")
    assert d.offset_error((5000).to_bytes(8, "big"), binary=True)[0] == "54000"
    assert d.offset_error((50).to_bytes(4, "big"), binary=True) is None
    assert d.offset_error(None) is None and d.offset_error(b"abc") is None


# --- templates ----------------------------------------------------------------------------------------

def fp(text: str) -> str:
    return analyze(text).fingerprint


@pytest.mark.parametrize("sql, expected", [
    ("SELECT * FROM t WHERE a = 1 AND b = 'two'", "SELECT a, b FROM t WHERE b = 'two' AND a = 1"),
    ("select * from T where A=$1 and B=$2", "SELECT a, b FROM t WHERE b = $2 AND a = $1"),
    ("SELECT * FROM t WHERE a = $2 AND b = $1", "SELECT a, b FROM t WHERE b = $1 AND a = $2"),
    ("SELECT * FROM t WHERE a = -5 AND b = E'x\\ny'", "SELECT a, b FROM t WHERE b = E'x\\ny' AND a = (-5)"),
    ("SELECT * FROM t WHERE a = 1.5e3 AND b = $$q$$", "SELECT a, b FROM t WHERE b = $$q$$ AND a = 1.5e3"),
    ("SELECT * FROM t WHERE a = 1 AND b = NULL", "SELECT a, b FROM t WHERE b = NULL AND a = 1"),
    # the same fingerprint, but not the same statement: AND operands swapped, another column
    ("SELECT * FROM t WHERE b = 1 AND a = 2", None),
    ("SELECT * FROM t WHERE a = 1 AND c = 2", None),
    ("SELECT * FROM t WHERE a = 1 AND b = 2 AND c = 3", None),
    ("SELECT * FROM t WHERE a = 1 AND b = 2::text", None),
])
def test_template_rewrite(sql, expected):
    t = TemplateRewrite("SELECT * FROM t WHERE a = $1 AND b = $2", "SELECT a, b FROM t WHERE b = $2 AND a = $1", fp)
    assert t.apply(sql, fp(sql)) == expected


def test_template_repeated_parameter_and_constants():
    t = TemplateRewrite("SELECT * FROM t WHERE a = $1 OR b = $1", "SELECT 1 FROM t WHERE a = $1 OR b = $1", fp)
    assert t.apply("SELECT * FROM t WHERE a = 3 OR b = 3", fp("SELECT * FROM t WHERE a = 3 OR b = 3")) == \
        "SELECT 1 FROM t WHERE a = 3 OR b = 3"
    assert t.apply("SELECT * FROM t WHERE a = 3 OR b = 4", fp("SELECT * FROM t WHERE a = 3 OR b = 4")) is None
    # a literal in `from` must be the same literal in the client's statement
    t = TemplateRewrite("SELECT * FROM t WHERE s = 'open' AND id = $1", "SELECT id FROM t WHERE s = 'open' AND id = $1", fp)
    assert t.apply("SELECT * FROM t WHERE s = 'open' AND id = 7", fp("SELECT * FROM t WHERE s = 'open' AND id = 7")) \
        == "SELECT id FROM t WHERE s = 'open' AND id = 7"
    assert t.apply("SELECT * FROM t WHERE s = 'shut' AND id = 7", fp("SELECT * FROM t WHERE s = 'shut' AND id = 7")) is None


@pytest.mark.parametrize("src, dst, message", [
    ("SELEC 1", "SELECT 1", "rewrite.from does not parse"),
    ("SELECT 1", "SELECT FROM WHERE", "rewrite.to does not parse"),
    ("SELECT 1; SELECT 2", "SELECT 1", "must each be exactly one statement"),
    ("SELECT $1", "SELECT $2", "must use the same parameters as rewrite.from ($1), not $2"),
])
def test_template_errors(src, dst, message):
    with pytest.raises(TemplateError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        TemplateRewrite(src, dst, fp)


@pytest.mark.parametrize("mapping, sql, expected", [
    ({"old_orders": "orders"}, "SELECT old_orders.id, o2.x FROM old_orders JOIN public.old_orders o2 ON true",
     "SELECT orders.id, o2.x FROM orders JOIN public.orders o2 ON true"),
    ({"old_orders": "orders"}, "INSERT INTO old_orders VALUES (1) RETURNING old_orders.id",
     "INSERT INTO orders VALUES (1) RETURNING orders.id"),
    ({"old_orders": "orders"}, "UPDATE public.old_orders SET x = 1 WHERE id IN (SELECT id FROM OLD_ORDERS)",
     "UPDATE public.orders SET x = 1 WHERE id IN (SELECT id FROM orders)"),
    ({"old_orders": "orders"}, "DELETE FROM ONLY old_orders WHERE id = 1 -- keep me",
     "DELETE FROM ONLY orders WHERE id = 1 -- keep me"),
    ({"old_orders": "orders"}, "WITH old_orders AS (SELECT 1) SELECT * FROM old_orders", None),
    ({"old_orders": "orders"}, "SELECT * FROM old_orders_archive", None),
    ({"old_orders": "orders"}, "SELECT 'old_orders' FROM x", None),
    ({"public.old_orders": "archive.orders"}, "SELECT * FROM old_orders, public.old_orders x, other.old_orders",
     "SELECT * FROM archive.orders, archive.orders x, other.old_orders"),
    ({'"Old"': "new_t"}, 'SELECT * FROM "Old", old', 'SELECT * FROM new_t, old'),
    ({"a": "b"}, "SELECT 'é', a.x FROM a", "SELECT 'é', b.x FROM b"),
])
def test_rename_table(mapping, sql, expected):
    assert RenameTables(mapping).apply(sql) == expected


def test_rename_table_rejects_non_names():
    with pytest.raises(TemplateError, match="is not a table name"):
        RenameTables({"orders; DROP TABLE x": "y"})


# --- against a real PostgreSQL -----------------------------------------------------------------------

RULES = """
[[rule]]
name = "rename"
match = { tables = ["rt_old_orders"] }
rewrite = { rename_table = { rt_old_orders = "rt_orders" } }

[[rule]]
name = "page"  # matched against the renamed statement: rules after a rewrite see its output
match = { kind = "select", tables = ["rt_orders"] }
limit = { max_rows = 10, max_offset = 100 }

[[rule]]
name = "narrow"
match = {}
rewrite = { from = "SELECT * FROM rt_users WHERE id = $1", to = "SELECT id, email FROM rt_users WHERE id = $1" }
"""


@pytest.fixture(scope="module")
def db(pg, tmp_path_factory):
    conn = psycopg.connect(pg.dsn("postgres", "postgres"), autocommit=True)
    conn.execute("DROP TABLE IF EXISTS rt_orders, rt_users")
    conn.execute("CREATE TABLE rt_orders (id int PRIMARY KEY, note text)")
    conn.execute("INSERT INTO rt_orders SELECT g, 'n' || g FROM generate_series(1, 25) g")
    conn.execute("CREATE TABLE rt_users (id int PRIMARY KEY, email text, secret text)")
    conn.execute("INSERT INTO rt_users VALUES (42, 'a@example.com', 's')")
    path = tmp_path_factory.mktemp("rules") / "r.toml"
    path.write_text(RULES)
    yield conn, load_rules([str(path)])
    conn.close()


def run(conn: psycopg.Connection, sql: str, params: list[bytes] | None = None, binary: bool = False):
    """Simple protocol without params, extended (Parse/Bind/Execute, untyped params) with them."""
    pq = conn.pgconn
    if params is None:
        res = pq.exec_(sql.encode())
    else:
        res = pq.exec_params(sql.encode(), params, param_formats=[1 if binary else 0] * len(params))
    if res.status not in (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK):
        raise AssertionError(f"{sql}: {res.error_message.decode()}")
    return [[res.get_value(r, c) for c in range(res.nfields)] for r in range(res.ntuples)]


@pytest.mark.parametrize("sql, params, rows", [
    ("SELECT * FROM rt_orders ORDER BY id", None, 10),
    ("SELECT * FROM rt_orders ORDER BY id LIMIT 5", None, 5),
    ("SELECT * FROM rt_orders ORDER BY id LIMIT 50 OFFSET 20", None, 5),
    ("SELECT * FROM rt_orders ORDER BY id OFFSET 20 ROWS", None, 5),
    ("SELECT * FROM rt_orders ORDER BY id FETCH FIRST 20 ROWS ONLY", None, 10),
    ("SELECT id FROM rt_orders UNION ALL SELECT id FROM rt_orders ORDER BY 1", None, 10),
    ("WITH o AS (SELECT * FROM rt_orders) SELECT * FROM o -- comment", None, 10),
    ("(SELECT * FROM rt_orders);", None, 10),
    ("SELECT count(*) FROM rt_orders", None, 1),
    ("SELECT * FROM rt_old_orders WHERE id > 0", None, 10),  # renamed, then limited
    ("SELECT * FROM rt_orders WHERE id > $1 ORDER BY id LIMIT $2", [b"0", b"50"], 10),
    ("SELECT * FROM rt_orders WHERE id > $1 ORDER BY id LIMIT $2", [b"0", b"3"], 3),
    ("SELECT * FROM rt_orders WHERE id > $1 ORDER BY id LIMIT $2", [b"0", None], 10),  # LIMIT NULL = none
    ("SELECT * FROM rt_orders WHERE id > $1 ORDER BY id", [b"20"], 5),
])
def test_rewritten_statements_run_on_postgres(db, sql, params, rows):
    conn, rs = db
    d = rs.decide(analyze(sql), MatchContext())
    assert d.block is None
    assert len(run(conn, d.sql or sql, params)) == rows


def test_binary_limit_parameter_and_locking_on_postgres(db):
    conn, rs = db
    sql = "SELECT * FROM rt_orders ORDER BY id LIMIT $1"
    d = rs.decide(analyze(sql), MatchContext())
    assert len(run(conn, d.sql, [(500).to_bytes(8, "big")], binary=True)) == 10
    sql = "SELECT * FROM rt_orders ORDER BY id FOR UPDATE SKIP LOCKED"
    d = rs.decide(analyze(sql), MatchContext())
    run(conn, "BEGIN")
    try:
        assert len(run(conn, d.sql)) == 10
    finally:
        run(conn, "ROLLBACK")


def test_template_rewrite_on_postgres(db):
    conn, rs = db
    for sql, params in (("select * from RT_USERS where id = 42", None), ("SELECT * FROM rt_users WHERE id = $1", [b"42"])):
        d = rs.decide(analyze(sql), MatchContext())
        assert d.sql.startswith("SELECT id, email FROM rt_users WHERE id = ")
        assert run(conn, d.sql, params) == [[b"42", b"a@example.com"]]


def test_deep_offset_is_refused(db):
    _, rs = db
    d = rs.decide(analyze("SELECT * FROM rt_orders ORDER BY id OFFSET 101"), MatchContext())
    assert d.block[0] == "54000"
