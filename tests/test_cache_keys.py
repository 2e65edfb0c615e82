"""Cache keys, per-session tracking of settings and writes, write classification and reply capture
(no services needed: these are pure functions over the real SQL analyzer's StatementInfo)."""

from __future__ import annotations

from proxy.cache import ResultCapture, SessionCacheState, make_key, split_row_description, write_effect
from proxy.cache.catalog import FunctionFacts
from proxy.cache.keys import normalize_formats, session_prefix
from proxy.cache.testing import message, select_reply
from proxy.cache.writes import relname
from proxy.sql import analyze

SQL = "SELECT v FROM kv WHERE k = $1"


def key(prefix: bytes = b"", **kw) -> bytes:
    return make_key(prefix or session_prefix("app", "alice", {}), kw.pop("sql", SQL), **kw)


def test_key_scoping_covers_everything_that_shapes_the_result():
    base = key(params=[b"1"])
    assert base == key(params=[b"1"])
    variants = [
        key(session_prefix("other", "alice", {}), params=[b"1"]),
        key(session_prefix("app", "bob", {}), params=[b"1"]),
        key(session_prefix("app", "alice", {"search_path": "s2"}), params=[b"1"]),
        key(session_prefix("app", "alice", {"datestyle": "German, DMY"}), params=[b"1"]),
        key(session_prefix("app", "alice", {"timezone": "UTC"}), params=[b"1"]),
        key(session_prefix("app", "alice", {"extra_float_digits": "3"}), params=[b"1"]),
        key(session_prefix("app", "alice", {"bytea_output": "escape"}), params=[b"1"]),
        key(params=[b"2"]),
        key(params=[None]),
        key(params=[b""]),
        key(params=[b"\x00\x00\x00\x01"], param_formats=[1]),
        key(params=[b"1"], result_formats=[1]),
        key(params=[b"1"], param_types=[23]),
        key(sql="SELECT v FROM kv WHERE k = $1 ", params=[b"1"]),
        key(sql="select v from kv where k = $1", params=[b"1"]),
        key(params=[b"1"], extended=True),  # an Execute's reply has no RowDescription
    ]
    assert len(set(variants) | {base}) == len(variants) + 1


def test_keys_differ_for_reordered_select_lists():
    # the libpg_query fingerprint is the same for both: it must never be the key
    assert analyze("SELECT a, b FROM t").fingerprint == analyze("SELECT b, a FROM t").fingerprint
    assert key(sql="SELECT a, b FROM t") != key(sql="SELECT b, a FROM t")


def test_format_codes_are_normalized_as_the_server_applies_them():
    assert key(params=[b"1", b"2"]) == key(params=[b"1", b"2"], param_formats=[0]) == \
        key(params=[b"1", b"2"], param_formats=[0, 0])
    assert key(params=[b"1", b"2"], param_formats=[1]) == key(params=[b"1", b"2"], param_formats=[1, 1])
    assert key(params=[b"1", b"2"], param_formats=[1, 0]) != key(params=[b"1", b"2"], param_formats=[0, 1])
    assert key(result_formats=[]) == key(result_formats=[0]) == key(result_formats=[0, 0, 0])
    assert key(result_formats=[1]) == key(result_formats=[1, 1])
    assert key(result_formats=[1, 0]) != key(result_formats=[1])
    assert normalize_formats([], 3) == (0, 0, 0)
    assert normalize_formats([1], None) == (1,)


def test_settings_that_do_not_shape_results_do_not_split_the_cache():
    assert session_prefix("app", "a", {"application_name": "x", "work_mem": "1GB", "enable_seqscan": "off"}) \
        == session_prefix("app", "a", {})
    assert session_prefix("app", "a", {"lc_monetary": "de_DE"}) != session_prefix("app", "a", {})


def test_session_tracks_settings_from_startup_set_and_parameter_status():
    s = SessionCacheState("app", "alice", {"user": "alice", "database": "app",
                                           "options": "-c search_path=s1 --extra-float-digits=3"})
    assert s.settings() == {"search_path": "s1", "extra_float_digits": "3"}
    p0 = s.prefix
    s.server_parameter("DateStyle", "ISO, MDY")
    assert s.prefix != p0 and s.settings()["datestyle"] == "ISO, MDY"
    p1 = s.prefix
    s.server_parameter("DateStyle", "ISO, MDY")
    assert s.prefix is p1  # unchanged value: the cached prefix stays
    set_path = analyze("SET search_path = s2")
    s.sent(set_path)
    assert s.done(set_path) is None
    assert s.settings()["search_path"] == "s2"
    assert s.ready(b"I") is None
    assert s.settings()["search_path"] == "s2"


def test_sets_in_a_rolled_back_or_failed_block_do_not_stick():
    s = SessionCacheState("app", "alice")
    for q in ("BEGIN", "SET search_path = inside", "SET LOCAL timezone = 'UTC'"):
        s.done(analyze(q))
    s.ready(b"T")
    assert s.settings() == {"search_path": "inside", "timezone": "UTC"}  # in effect for the block
    s.done(analyze("ROLLBACK"))
    s.ready(b"I")
    assert s.settings() == {}
    # an implicit block (pipeline / multi-statement Query) that fails drops its SETs too
    s.done(analyze("SET search_path = doomed"))
    s.error()
    s.ready(b"I")
    assert s.settings() == {}
    # SET LOCAL ends with its block, a committed SET stays
    for q in ("BEGIN", "SET LOCAL search_path = x", "SET bytea_output = escape", "COMMIT"):
        s.done(analyze(q))
    s.ready(b"I")
    assert s.settings() == {"bytea_output": "escape"}
    s.done(analyze("RESET ALL"))
    s.ready(b"I")
    assert s.settings() == {}


def test_role_changes_and_untrackable_settings_stop_caching_for_the_session():
    s = SessionCacheState("app", "alice")
    s.sent(analyze("SET ROLE bob"))
    assert s.role_changed
    s2 = SessionCacheState("app", "alice")
    s2.server_parameter("session_authorization", "bob")
    assert s2.role_changed
    s3 = SessionCacheState("app", "alice")
    s3.sent(analyze("SELECT set_config('search_path', 'x', false)"))
    assert s3.untracked
    s4 = SessionCacheState("app", "alice")
    s4.sent(analyze("CREATE TEMP TABLE scratch (a int)"))
    assert s4.temp_tables
    s4.done(analyze("DISCARD ALL"))
    assert not s4.temp_tables


def test_isolation_is_tracked_per_block():
    s = SessionCacheState("app", "alice")
    s.done(analyze("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    s.ready(b"T")
    assert s.in_transaction and s.isolation == "repeatable read"
    s.done(analyze("COMMIT"))
    s.ready(b"I")
    assert s.isolation == "read committed"
    s.done(analyze("BEGIN"))
    s.done(analyze("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
    assert s.isolation == "serializable"
    s.done(analyze("ROLLBACK"))
    s.done(analyze("SET default_transaction_isolation = 'repeatable read'"))
    s.ready(b"I")
    s.done(analyze("BEGIN"))
    assert s.isolation == "repeatable read"


def test_writes_are_flushed_only_at_commit_points():
    facts = {"lower": FunctionFacts(True, False), "bump_counter": FunctionFacts(False, True)}
    s = SessionCacheState("app", "alice", function_facts=lambda db, name: facts.get(name))
    # autocommit statement: flushed at ReadyForQuery 'I'
    ins = analyze("INSERT INTO public.orders VALUES (1)")
    s.sent(ins)
    assert s.done(ins) is None and s.pending
    effect = s.ready(b"I")
    assert effect.tables == {"orders"} and not s.pending
    # explicit transaction: held through 'T', flushed at COMMIT's CommandComplete
    s.done(analyze("BEGIN"))
    s.ready(b"T")
    upd = analyze("UPDATE items SET a = 1")
    s.sent(upd)
    s.done(upd)
    assert s.ready(b"T") is None
    effect = s.done(analyze("COMMIT"))
    assert effect.tables == {"items"}
    assert s.ready(b"I") is None
    # rolled back: nothing to invalidate
    s.done(analyze("BEGIN"))
    s.sent(upd)
    s.done(analyze("ROLLBACK"))
    assert s.ready(b"I") is None
    # reads calling functions that cannot write are not writes; known writers flush the database;
    # unknown functions are kept for invalidate() to look up
    s.sent(analyze("SELECT lower(a) FROM items"))
    assert not s.pending
    s.sent(analyze("SELECT bump_counter()"))
    assert s.ready(b"I").flush_database
    s.sent(analyze("SELECT mystery(a) FROM items"))
    assert s.ready(b"I").functions == {"mystery"}


def test_write_classification():
    assert write_effect(analyze("TRUNCATE orders")).tables == {"orders"}
    assert write_effect(analyze("TRUNCATE orders CASCADE")).flush_database
    assert write_effect(analyze("ALTER ROLE app SET search_path = x")).flush_all
    assert write_effect(analyze("GRANT SELECT ON orders TO app")).tables == {"orders"}
    assert write_effect(analyze("GRANT admins TO app")).flush_all
    assert write_effect(analyze("COPY orders FROM STDIN")).tables == {"orders"}
    assert not write_effect(analyze("COPY orders TO STDOUT"))
    assert write_effect(analyze("CALL refresh_all()")).flush_database
    assert write_effect(analyze("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'")).flush_database
    assert write_effect(analyze("REFRESH MATERIALIZED VIEW mv")).tables == {"mv"}
    assert not write_effect(analyze("SELECT 1"))
    assert not write_effect(analyze("VACUUM orders"))
    assert relname('"Sales"."Orders"') == "orders" and relname("public.orders") == "orders"


def test_capture_keeps_exact_bytes_and_gives_up_on_anything_unexpected():
    reply = select_reply([b"1", b"2"])
    c = ResultCapture(10_000)
    rd, rest = split_row_description(reply)
    assert c.feed(rd) and c.feed(rest)
    assert c.result() == reply
    assert rd[:1] == b"T" and rest.endswith(message(b"C", b"SELECT 2\x00"))
    small = ResultCapture(len(reply) - 1)
    assert not small.feed(reply) and small.result() is None and small.reason == "result too large"
    err = ResultCapture(10_000)
    assert err.feed(rd) and not err.feed(message(b"E", b"SERROR\x00\x00")) and err.result() is None
    suspended = ResultCapture(10_000)
    suspended.feed(rest[:-len(message(b"C", b"SELECT 2\x00"))])
    assert not suspended.feed(message(b"s", b""))  # Execute with max_rows: not cached
    incomplete = ResultCapture(10_000)
    incomplete.feed(rd)
    assert incomplete.result() is None
