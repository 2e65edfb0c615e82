"""proxy.sql: fingerprints, normalized text, statement facts, splitting and constants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from pglast import parser

from proxy.sql import StatementInfo, analyze, constants, split_statements
from proxy.sql.analyze import MAX_ENTRIES, cache_size, clear_cache


def fs(*names: str) -> frozenset[str]:
    return frozenset(names)


# -- kinds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sql", "kind"), [
    ("SELECT 1", "select"),
    ("VALUES (1), (2)", "select"),
    ("(SELECT a FROM t) UNION ALL (SELECT b FROM u)", "select"),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "select"),
    ("TABLE t", "select"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("INSERT INTO t DEFAULT VALUES", "insert"),
    ("UPDATE t SET a = 1", "update"),
    ("DELETE FROM t", "delete"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "merge"),
    ("COPY t FROM STDIN", "copy"),
    ("COPY (SELECT 1) TO STDOUT", "copy"),
    ("CREATE TABLE t (a int)", "ddl"),
    ("ALTER TABLE t ADD COLUMN b int", "ddl"),
    ("DROP TABLE t", "ddl"),
    ("TRUNCATE t", "ddl"),
    ("CREATE INDEX ON t (a)", "ddl"),
    ("CREATE VIEW v AS SELECT 1", "ddl"),
    ("GRANT SELECT ON t TO bob", "ddl"),
    ("CREATE ROLE bob", "ddl"),
    ("COMMENT ON TABLE t IS 'x'", "ddl"),
    ("SELECT * INTO t2 FROM t", "ddl"),
    ("CREATE TABLE t2 AS SELECT * FROM t", "ddl"),
    ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "ddl"),
    ("BEGIN", "transaction"),
    ("COMMIT", "transaction"),
    ("SET search_path = a", "set"),
    ("RESET ALL", "set"),
    ("SHOW search_path", "utility"),
    ("EXPLAIN SELECT 1", "utility"),
    ("VACUUM t", "utility"),
    ("ANALYZE t", "utility"),
    ("PREPARE p AS SELECT $1", "utility"),
    ("EXECUTE p(1)", "utility"),
    ("DEALLOCATE ALL", "utility"),
    ("DECLARE c CURSOR FOR SELECT 1", "utility"),
    ("FETCH 10 FROM c", "utility"),
    ("CLOSE c", "utility"),
    ("LISTEN ch", "utility"),
    ("NOTIFY ch, 'x'", "utility"),
    ("DISCARD ALL", "utility"),
    ("LOCK TABLE t", "utility"),
    ("DO $$ BEGIN END $$", "utility"),
    ("CALL p(1)", "utility"),
    ("CHECKPOINT", "utility"),
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("-- only a comment", "empty"),
    ("/* block */ ;", "empty"),
    (";;", "empty"),
    ("SELEC 1", "unknown"),
])
def test_kind(sql: str, kind: str) -> None:
    info = analyze(sql)
    assert info.kind == kind
    assert info.parsed is (kind != "unknown")


def test_info_is_frozen_and_slotted() -> None:
    info = analyze("SELECT 1")
    assert isinstance(info, StatementInfo)
    with pytest.raises(AttributeError):
        info.kind = "insert"  # type: ignore[misc]
    assert not hasattr(info, "__dict__")


# -- fingerprints and normalized text ---------------------------------------------------------------
def test_fingerprint_same_for_literal_and_parameter() -> None:
    a = analyze("SELECT * FROM t WHERE id = 5")
    b = analyze("SELECT * FROM t WHERE id = $1")
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0


def test_fingerprint_ignores_in_list_length_case_and_whitespace() -> None:
    prints = {
        analyze(sql).fingerprint
        for sql in (
            "SELECT * FROM t WHERE id IN (1)",
            "SELECT * FROM t WHERE id IN (1, 2, 3, 4, 5)",
            "select *\n  from t\n where id in ($1, $2)",
        )
    }
    assert len(prints) == 1


def test_fingerprint_differs_for_tables_and_columns() -> None:
    prints = {
        analyze(sql).fingerprint
        for sql in (
            "SELECT * FROM t WHERE id = 5",
            "SELECT * FROM u WHERE id = 5",
            "SELECT * FROM t WHERE other = 5",
            "SELECT a FROM t WHERE id = 5",
            "DELETE FROM t WHERE id = 5",
        )
    }
    assert len(prints) == 5


def test_normalized_replaces_constants() -> None:
    assert analyze("SELECT * FROM t WHERE a = 5 AND b = 'x'").normalized == "SELECT * FROM t WHERE a = $1 AND b = $2"
    assert analyze("SELECT * FROM t WHERE a = $1").normalized == "SELECT * FROM t WHERE a = $1"


def test_normalized_numbers_in_text_order() -> None:
    # libpg_query itself numbers these $2 / $1
    assert analyze("SELECT * FROM t LIMIT 10 OFFSET 5").normalized == "SELECT * FROM t LIMIT $1 OFFSET $2"
    sql = "SELECT 1 FROM t WHERE x = 'a' UNION SELECT 2 FROM u LIMIT 5 OFFSET 6"
    assert analyze(sql).normalized == "SELECT $1 FROM t WHERE x = $2 UNION SELECT $3 FROM u LIMIT $4 OFFSET $5"


def test_normalized_continues_after_existing_parameters() -> None:
    info = analyze("SELECT $2, 5, 'x' FROM t LIMIT 3 OFFSET 4")
    assert info.max_param == 2
    assert info.normalized == "SELECT $2, $3, $4 FROM t LIMIT $5 OFFSET $6"


def test_normalized_keeps_dollar_text_in_comments() -> None:
    info = analyze("SELECT /* $7 */ a FROM t LIMIT 1 OFFSET 2")
    assert info.normalized == "SELECT /* $7 */ a FROM t LIMIT $1 OFFSET $2"


def test_unparsable_text() -> None:
    info = analyze("SELEC * FROM t")
    assert not info.parsed and info.kind == "unknown"
    assert info.error and "syntax error" in info.error
    assert len(info.fingerprint) == 16
    # whitespace does not change the fallback fingerprint; other text does
    assert analyze("SELEC *   FROM\n t").fingerprint == info.fingerprint
    assert analyze("SELEC * FROM u").fingerprint != info.fingerprint
    assert analyze("SELECT 'unterminated").kind == "unknown"


def test_odd_text_never_raises() -> None:
    for sql in ("\x00", "SELECT '\x00'", "(" * 5000 + "1" + ")" * 5000, "SELECT " + "1 + " * 20000 + "1", "\ud800"):
        info = analyze(sql)
        assert isinstance(info, StatementInfo) and len(info.fingerprint) == 16


@settings(max_examples=300, deadline=None)
@given(hs.text(alphabet=hs.sampled_from(list("SELECT FROMWHERE*()';$1-,.\"\n\x00é ")) | hs.characters(),
               max_size=80))
def test_never_raises_on_any_text(text: str) -> None:
    info = analyze(text)
    assert len(info.fingerprint) == 16
    assert info.kind in {"select", "insert", "update", "delete", "merge", "ddl", "copy", "utility",
                         "transaction", "set", "empty", "unknown"}
    split_statements(text)
    for start, end, literal in constants(text):
        assert text[start:end] == literal


@settings(max_examples=150, deadline=None)
@given(table=hs.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
       column=hs.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
       number=hs.integers(-10**12, 10**12),
       word=hs.text(hs.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20),
       in_list=hs.lists(hs.integers(0, 10**6), min_size=1, max_size=30))
def test_literal_and_parameter_forms_share_a_fingerprint(table: str, column: str, number: int, word: str,
                                                          in_list: list[int]) -> None:
    literal = word.replace("'", "''")
    forms = [
        f"SELECT * FROM x_{table} WHERE c_{column} = {number} AND d = '{literal}' AND e IN ({', '.join(map(str, in_list))})",
        f"SELECT * FROM x_{table} WHERE c_{column} = $1 AND d = $2 AND e IN ($3)",
    ]
    infos = [analyze(f) for f in forms]
    assert infos[0].parsed and infos[1].parsed
    assert infos[0].fingerprint == infos[1].fingerprint
    assert infos[0].tables_read == {f"x_{table}"}
    assert _substitute(forms[0]) == infos[0].normalized


# -- tables -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sql", "read", "written"), [
    ("SELECT * FROM orders", fs("orders"), fs()),
    ("SELECT * FROM public.orders o JOIN items i ON i.oid = o.id LEFT JOIN x ON true",
     fs("public.orders", "items", "x"), fs()),
    ('SELECT * FROM "Orders", "My Schema"."T", Mixed', fs("Orders", "My Schema.T", "mixed"), fs()),
    ("SELECT * FROM db.s.t", fs("db.s.t"), fs()),
    ("SELECT * FROM t WHERE id IN (SELECT tid FROM u WHERE EXISTS (SELECT 1 FROM v))", fs("t", "u", "v"), fs()),
    ("SELECT (SELECT max(a) FROM u), * FROM (SELECT * FROM v) sub", fs("u", "v"), fs()),
    ("SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.id = t.id) l", fs("t", "u"), fs()),
    ("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent JOIN items USING (id)",
     fs("orders", "items"), fs()),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b, public.a", fs("public.a"), fs()),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r", fs(), fs()),
    # a non-recursive CTE body refers to the real table of the same name
    ("WITH t AS (SELECT * FROM t) SELECT * FROM t", fs("t"), fs()),
    ("SELECT a FROM t UNION SELECT b FROM u EXCEPT SELECT c FROM v", fs("t", "u", "v"), fs()),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (1)", fs("t"), fs()),
    ("INSERT INTO t (a) VALUES (1)", fs(), fs("t")),
    ("INSERT INTO s.t SELECT * FROM u WHERE x > 1", fs("u"), fs("s.t")),
    ("INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING *", fs(), fs("t")),
    ("WITH src AS (SELECT * FROM staging) INSERT INTO t SELECT * FROM src", fs("staging"), fs("t")),
    ("UPDATE t SET a = u.a FROM u, v WHERE t.id = u.id AND u.x = v.x", fs("u", "v"), fs("t")),
    ("UPDATE t SET a = (SELECT max(b) FROM u) WHERE id = 1", fs("u"), fs("t")),
    ("DELETE FROM t USING u WHERE t.id = u.id", fs("u"), fs("t")),
    ("DELETE FROM ONLY t WHERE id IN (SELECT id FROM u)", fs("u"), fs("t")),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a "
     "WHEN NOT MATCHED THEN INSERT VALUES (s.id)", fs("s"), fs("t")),
    ("MERGE INTO t USING (SELECT * FROM s JOIN r USING (id)) q ON t.id = q.id WHEN MATCHED THEN DELETE",
     fs("s", "r"), fs("t")),
    ("WITH d AS (DELETE FROM t RETURNING *) INSERT INTO archive SELECT * FROM d", fs(), fs("t", "archive")),
    ("COPY t FROM STDIN", fs(), fs("t")),
    ("COPY s.t (a, b) FROM '/tmp/x.csv' WITH (FORMAT csv)", fs(), fs("s.t")),
    ("COPY t TO STDOUT", fs("t"), fs()),
    ("COPY (SELECT * FROM t JOIN u USING (id)) TO STDOUT", fs("t", "u"), fs()),
    ("TRUNCATE a, s.b", fs(), fs("a", "s.b")),
    ("DROP TABLE a, s.b", fs(), fs("a", "s.b")),
    ("DROP INDEX i", fs(), fs()),
    ("ALTER TABLE t ADD COLUMN c int", fs(), fs("t")),
    ("CREATE INDEX ON t (a)", fs(), fs("t")),
    ("CREATE TABLE f (a int REFERENCES pk (id))", fs("pk"), fs("f")),
    ("CREATE TABLE t2 AS SELECT * FROM t", fs("t"), fs("t2")),
    ("SELECT * INTO t2 FROM t", fs("t"), fs("t2")),
    ("CREATE VIEW v AS SELECT * FROM t", fs("t"), fs("v")),
    ("REFRESH MATERIALIZED VIEW mv", fs(), fs("mv")),
    ("GRANT SELECT ON t, u TO bob", fs(), fs("t", "u")),
    ("ALTER TABLE t RENAME TO t3", fs(), fs("t")),
    ("EXPLAIN SELECT * FROM t", fs("t"), fs()),
    ("PREPARE p AS SELECT * FROM t WHERE id = $1", fs("t"), fs()),
    ("DECLARE c CURSOR FOR SELECT * FROM t", fs("t"), fs()),
    ("VACUUM ANALYZE t", fs("t"), fs()),
    ("LOCK TABLE t IN SHARE MODE", fs("t"), fs()),
    ("SELECT * FROM t FOR UPDATE OF t", fs("t"), fs()),
    ("SELECT 1", fs(), fs()),
])
def test_tables(sql: str, read: frozenset[str], written: frozenset[str]) -> None:
    info = analyze(sql)
    assert info.parsed, info.error
    assert info.tables_read == read
    assert info.tables_written == written
    assert info.tables == read | written


def test_write_flag() -> None:
    assert analyze("INSERT INTO t VALUES (1)").is_write
    assert analyze("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d").is_write
    assert analyze("CREATE ROLE bob").is_write
    assert not analyze("SELECT * FROM t").is_write
    assert not analyze("BEGIN").is_write


def test_catalog_and_temp() -> None:
    assert analyze("SELECT * FROM pg_class").catalog
    assert analyze("SELECT * FROM pg_catalog.pg_namespace").catalog
    assert analyze("SELECT * FROM information_schema.tables").catalog
    assert not analyze("SELECT * FROM public.pages").catalog
    assert analyze("CREATE TEMP TABLE tt (a int)").temp_objects
    assert analyze("SELECT * FROM pg_temp.tt").temp_objects
    assert not analyze("CREATE TABLE tt (a int)").temp_objects


# -- functions and volatility -----------------------------------------------------------------------
@pytest.mark.parametrize(("sql", "functions", "volatile"), [
    ("SELECT lower(name), coalesce(a, b) FROM t", fs("lower"), False),
    ("SELECT now()", fs("now"), True),
    ("SELECT * FROM t WHERE created > now() - interval '1 day'", fs("now"), True),
    ("SELECT random()", fs("random"), True),
    ("SELECT nextval('s')", fs("nextval"), True),
    ("SELECT pg_catalog.clock_timestamp()", fs("pg_catalog.clock_timestamp"), True),
    ("SELECT current_user, current_timestamp", fs("current_user", "current_timestamp"), True),
    ("SELECT localtimestamp(3)", fs("localtimestamp"), True),
    ("SELECT extract(year FROM d) FROM t", fs("extract"), False),
    ("SELECT myschema.now()", fs("myschema.now"), False),
    ("SELECT count(*) FROM t WHERE id IN (SELECT f(x) FROM u)", fs("count", "f"), False),
    ("INSERT INTO t VALUES (gen_random_uuid())", fs("gen_random_uuid"), True),
    ("SELECT * FROM generate_series(1, 10)", fs("generate_series"), False),
    ("CALL proc(1)", fs("proc"), False),
    ("SELECT 1", fs(), False),
])
def test_functions(sql: str, functions: frozenset[str], volatile: bool) -> None:
    info = analyze(sql)
    assert info.functions == functions
    assert info.volatile is volatile


# -- WHERE, LIMIT, OFFSET, locking, one row ---------------------------------------------------------
@pytest.mark.parametrize(("sql", "has_where"), [
    ("SELECT * FROM t WHERE a = 1", True),
    ("SELECT * FROM t", False),
    ("SELECT * FROM (SELECT * FROM t WHERE a = 1) s", False),
    ("SELECT a FROM t WHERE x UNION SELECT b FROM u WHERE y", True),
    ("SELECT a FROM t WHERE x UNION SELECT b FROM u", False),
    ("UPDATE t SET a = 1 WHERE id = 2", True),
    ("UPDATE t SET a = 1", False),
    ("UPDATE t SET a = 1 WHERE CURRENT OF c", True),
    ("DELETE FROM t WHERE id = 2", True),
    ("DELETE FROM t", False),
    ("DELETE FROM t USING u", False),
    ("INSERT INTO t SELECT * FROM u WHERE x", False),
])
def test_has_where(sql: str, has_where: bool) -> None:
    assert analyze(sql).has_where is has_where


@pytest.mark.parametrize(("sql", "limit", "offset"), [
    ("SELECT * FROM t", (False, None), (False, None)),
    ("SELECT * FROM t LIMIT 10", (True, 10), (False, None)),
    ("SELECT * FROM t LIMIT 0", (True, 0), (False, None)),
    ("SELECT * FROM t LIMIT 10 OFFSET 20", (True, 10), (True, 20)),
    ("SELECT * FROM t OFFSET 0", (False, None), (True, 0)),
    ("SELECT * FROM t LIMIT ALL", (True, None), (False, None)),
    ("SELECT * FROM t LIMIT $1 OFFSET $2", (True, None), (True, None)),
    ("SELECT * FROM t LIMIT 5 + 5", (True, None), (False, None)),
    ("SELECT * FROM t LIMIT 99999999999", (True, 99999999999), (False, None)),
    ("SELECT * FROM t FETCH FIRST 3 ROWS ONLY", (True, 3), (False, None)),
    ("SELECT * FROM t OFFSET 5 ROWS FETCH NEXT ROW ONLY", (True, 1), (True, 5)),
    ("SELECT * FROM t ORDER BY a FETCH FIRST 2 ROWS WITH TIES", (True, 2), (False, None)),
    ("SELECT a FROM t UNION SELECT a FROM u LIMIT 7", (True, 7), (False, None)),
    ("SELECT * FROM (SELECT * FROM t LIMIT 5) s", (False, None), (False, None)),
    ("DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 5)", (False, None), (False, None)),
])
def test_limit_offset(sql: str, limit: tuple[bool, int | None], offset: tuple[bool, int | None]) -> None:
    info = analyze(sql)
    assert (info.has_limit, info.limit_value) == limit
    assert (info.has_offset, info.offset_value) == offset


@pytest.mark.parametrize(("sql", "locking"), [
    ("SELECT * FROM t FOR UPDATE", True),
    ("SELECT * FROM t FOR SHARE", True),
    ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", True),
    ("SELECT * FROM t FOR KEY SHARE NOWAIT", True),
    ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", True),
    ("WITH c AS (SELECT * FROM t FOR UPDATE) SELECT * FROM c", True),
    ("SELECT * FROM t", False),
    ("UPDATE t SET a = 1", False),
])
def test_locking(sql: str, locking: bool) -> None:
    assert analyze(sql).locking is locking


@pytest.mark.parametrize(("sql", "one_row"), [
    ("SELECT 1", True),
    ("SELECT now(), current_user", True),
    ("SELECT count(*) FROM t", True),
    ("SELECT count(*), max(a) FROM t WHERE b > 1", True),
    ("SELECT coalesce(sum(a), 0) FROM t", True),
    ("SELECT count(*) FROM t LIMIT 1", True),
    ("SELECT (SELECT count(*) FROM t)", True),
    ("VALUES (1, 2)", True),
    ("VALUES (1), (2)", False),
    ("SELECT a FROM t", False),
    ("SELECT count(*) FROM t GROUP BY a", False),
    ("SELECT count(*) FROM t HAVING count(*) > 1", False),
    ("SELECT count(*) FROM t LIMIT 0", False),
    ("SELECT count(*) FROM t LIMIT $1", False),
    ("SELECT count(*) FROM t OFFSET 1", False),
    ("SELECT count(*) OVER () FROM t", False),
    ("SELECT 1 WHERE $1", False),
    ("SELECT generate_series(1, 3)", False),
    ("SELECT 1 UNION SELECT 2", False),
    ("SELECT a FROM t WHERE a IN (SELECT max(b) FROM u)", False),
    ("INSERT INTO t VALUES (1)", False),
])
def test_returns_one_row(sql: str, one_row: bool) -> None:
    assert analyze(sql).returns_one_row is one_row


# -- SET / RESET and transaction commands -----------------------------------------------------------
@pytest.mark.parametrize(("sql", "name", "value", "local"), [
    ("SET search_path = myschema, public", "search_path", "myschema, public", False),
    ("SET search_path TO 'a', \"B\"", "search_path", "a, B", False),
    ("SET statement_timeout = 5000", "statement_timeout", "5000", False),
    ("SET LOCAL statement_timeout = '5s'", "statement_timeout", "5s", True),
    ("SET SESSION work_mem = '64MB'", "work_mem", "64MB", False),
    ("SET enable_seqscan = off", "enable_seqscan", "off", False),
    ("SET extra_float_digits = 1.5", "extra_float_digits", "1.5", False),
    ("SET TIME ZONE 'UTC'", "timezone", "UTC", False),
    ("SET NAMES 'UTF8'", "client_encoding", "UTF8", False),
    ("SET ROLE app", "role", "app", False),
    ("SET SESSION AUTHORIZATION app", "session_authorization", "app", False),
    ("SET DateStyle TO DEFAULT", "datestyle", None, False),
    ("RESET search_path", "search_path", None, False),
    ("RESET ALL", "all", None, False),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "transaction", "transaction_isolation=serializable", False),
])
def test_set(sql: str, name: str, value: str | None, local: bool) -> None:
    info = analyze(sql)
    assert info.kind == "set"
    assert (info.set_name, info.set_value, info.set_local) == (name, value, local)


def test_set_fields_empty_for_other_kinds() -> None:
    info = analyze("SELECT 1")
    assert (info.set_name, info.set_value, info.set_local, info.tx) == (None, None, False, None)


@pytest.mark.parametrize(("sql", "tx"), [
    ("BEGIN", "begin"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", "begin"),
    ("START TRANSACTION READ ONLY", "begin"),
    ("COMMIT", "commit"),
    ("END", "commit"),
    ("COMMIT AND CHAIN", "commit"),
    ("ROLLBACK", "rollback"),
    ("ABORT", "rollback"),
    ("SAVEPOINT sp", "savepoint"),
    ("RELEASE SAVEPOINT sp", "release"),
    ("ROLLBACK TO SAVEPOINT sp", "rollback_to"),
    ("PREPARE TRANSACTION 'x'", "prepare"),
    ("COMMIT PREPARED 'x'", "commit_prepared"),
    ("ROLLBACK PREPARED 'x'", "rollback_prepared"),
])
def test_transaction(sql: str, tx: str) -> None:
    info = analyze(sql)
    assert info.kind == "transaction" and info.tx == tx


def test_copy_from() -> None:
    assert analyze("COPY t FROM STDIN").is_copy_from
    assert analyze("COPY t (a) FROM STDIN WITH (FORMAT binary)").is_copy_from
    assert not analyze("COPY t TO STDOUT").is_copy_from
    assert not analyze("INSERT INTO t VALUES (1)").is_copy_from


# -- multi-statement strings ------------------------------------------------------------------------
def test_multi_statement() -> None:
    info = analyze("SELECT * FROM a; UPDATE b SET x = 1 WHERE id = 2; SELECT now()")
    assert info.parsed
    assert [s.kind for s in info.statements] == ["select", "update", "select"]
    assert [s.text for s in info.statements] == ["SELECT * FROM a", "UPDATE b SET x = 1 WHERE id = 2", "SELECT now()"]
    assert info.kind == "update"  # the write wins over the reads around it
    assert info.tables_read == fs("a") and info.tables_written == fs("b")
    assert info.volatile and info.functions == fs("now")
    assert info.normalized == "SELECT * FROM a; UPDATE b SET x = $1 WHERE id = $2; SELECT now()"
    assert info.statements[1].fingerprint == analyze("UPDATE b SET x = $1 WHERE id = $2").fingerprint


def test_multi_statement_transaction_block() -> None:
    info = analyze("BEGIN; INSERT INTO t VALUES (1); COMMIT;")
    assert [s.tx for s in info.statements] == ["begin", None, "commit"]
    assert info.kind == "insert" and info.tx is None


def test_single_statement_has_no_parts() -> None:
    assert analyze("SELECT 1;").statements == ()
    assert analyze("SELECT 1; -- trailing comment").statements == ()


def test_multi_statement_with_non_ascii_text() -> None:
    info = analyze("SELECT 'héllo wörld'; SELECT 'ü' AS x; DELETE FROM t")
    assert [s.text for s in info.statements] == ["SELECT 'héllo wörld'", "SELECT 'ü' AS x", "DELETE FROM t"]


@pytest.mark.parametrize(("sql", "parts"), [
    ("SELECT 1", ["SELECT 1"]),
    ("SELECT 1;", ["SELECT 1"]),
    (" SELECT 1 ; SELECT 2 ;; ", ["SELECT 1", "SELECT 2"]),
    ("SELECT ';' ; SELECT $$;$$", ["SELECT ';'", "SELECT $$;$$"]),
    ("SELECT 1; -- done", ["SELECT 1"]),
    ("", []),
    ("-- nothing", []),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; SELECT 3",
     ["CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END", "SELECT 3"]),
    # unparsable: the scanner still splits outside quotes and drops comment-only pieces
    ("SELEC 1; SELECT ';'; /* c */ ; SELECT 2", ["SELEC 1", "SELECT ';'", "SELECT 2"]),
    ("SELECT 'open", ["SELECT 'open"]),
])
def test_split_statements(sql: str, parts: list[str]) -> None:
    assert split_statements(sql) == parts


# -- constants --------------------------------------------------------------------------------------
def _substitute(sql: str) -> str:
    """Rebuild the normalized text from constants(): proves the two agree."""
    info = analyze(sql)
    out, pos = [], 0
    for k, (start, end, _) in enumerate(constants(sql), info.max_param + 1):
        out += [sql[pos:start], f"${k}"]
        pos = end
    return "".join(out) + sql[pos:]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM t WHERE a = 5 AND b = 'it''s' AND c IN (1, 2.5, -3) LIMIT 10 OFFSET 20",
    "SELECT $2, 7 FROM t WHERE x = $1 AND y = E'\\n' AND z = B'101' AND w = X'ff'",
    "SELECT interval '1 day', date '2020-01-01', true, null, 1e5, $$dollar$$",
    "UPDATE t SET a = 'é', b = - 7 WHERE id = 3",
    "SET statement_timeout = 5000",
    "SELECT /* $9 */ 1; INSERT INTO t VALUES (2, 'x')",
    "CREATE TABLE t (a int DEFAULT 5)",
    "SELECT 1 FROM t ORDER BY 1",
])
def test_constants_match_normalized(sql: str) -> None:
    assert _substitute(sql) == analyze(sql).normalized


def test_constants_values_and_offsets() -> None:
    sql = "SELECT * FROM t WHERE name = 'Zoë' AND n > -5 LIMIT 10"
    assert constants(sql) == [(29, 34, "'Zoë'"), (43, 45, "-5"), (52, 54, "10")]
    assert constants("SELECT * FROM t WHERE a = $1") == []
    assert constants("SELEC 1") == []


# -- the cache --------------------------------------------------------------------------------------
def test_cache_hit_returns_the_same_object() -> None:
    sql = "SELECT * FROM cache_probe WHERE id = 42"
    first = analyze(sql)
    assert analyze(sql) is first
    assert analyze(str(sql)) is first  # equal text, possibly another str object


def test_cache_is_bounded() -> None:
    clear_cache()
    for i in range(MAX_ENTRIES + 500):
        analyze(f"SELECT {i}")
    assert cache_size() == MAX_ENTRIES
    # least recently used went first
    recent = analyze(f"SELECT {MAX_ENTRIES + 499}")
    assert analyze(f"SELECT {MAX_ENTRIES + 499}") is recent


def test_libpg_query_still_numbers_limit_before_offset() -> None:
    """Guards the renumbering: if libpg_query starts numbering in text order, it becomes a no-op."""
    assert parser.normalize("SELECT 1 LIMIT 10 OFFSET 5") in ("SELECT $1 LIMIT $3 OFFSET $2",
                                                             "SELECT $1 LIMIT $2 OFFSET $3")
