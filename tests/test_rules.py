"""Rules engine: loading and validation, matching, how rules combine, decisions, counters, reload, CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.cli import main as cli_main
from proxy.rules import (
    PASS,
    MatchContext,
    RuleError,
    RuleHolder,
    RuleSet,
    RuleWatcher,
    load_rules,
)
from proxy.sql import analyze
from proxy.sql.info import StatementInfo

ROOT = Path(__file__).resolve().parent.parent
CTX = MatchContext(user="app", database="app", application_name="web", in_transaction=False)

ISSUE_RULES = """
[[rule]]
name = "paginate-orders"
match = { kind = "select", tables = ["orders"] }
limit = { max_rows = 1000, max_offset = 10000 }

[[rule]]
name = "cache-reports"
match = { kind = "select", tables = ["daily_report"] }
cache = { ttl = "60s" }

[[rule]]
name = "no-unbounded-delete"
match = { kind = "delete", has_where = false }
block = { message = "DELETE without WHERE is not allowed" }
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def ruleset(tmp_path: Path, text: str) -> RuleSet:
    return load_rules([str(write(tmp_path, "rules.toml", text))])


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(RuleError) as e:
        load_rules([str(path)])
    return [str(p).replace(f"{path}:", "") for p in e.value.problems]


def decide(rs: RuleSet, sql: str, ctx: MatchContext = CTX):
    return rs.decide(analyze(sql), ctx)


# --- the issue's minimal syntax ------------------------------------------------------------------

def test_issue_rules_work_as_written(tmp_path):
    rs = ruleset(tmp_path, ISSUE_RULES)
    assert [r.name for r in rs.rules] == ["paginate-orders", "cache-reports", "no-unbounded-delete"]

    d = decide(rs, "SELECT * FROM orders ORDER BY id")
    assert d.sql == "SELECT * FROM orders ORDER BY id LIMIT 1000"
    assert d.row_limit == 1000
    assert d.notices == ('pgfront rule "paginate-orders" limited this query to 1000 rows (added LIMIT 1000); '
                         "use keyset pagination to read more",)
    assert d.matched == (("paginate-orders", "limit", False),)

    d = decide(rs, "SELECT * FROM orders OFFSET 20000")
    assert d.block == ("54000", 'OFFSET 20000 is beyond the maximum of 10000 set by pgfront rule '
                                '"paginate-orders"; use keyset pagination instead '
                                "(WHERE key > last_key ORDER BY key LIMIT n)")

    d = decide(rs, "select day, total from daily_report")
    assert (d.cache_ttl, d.sql, d.block) == (60.0, None, None)

    d = decide(rs, "DELETE FROM orders")
    assert d.block == ("42501", 'DELETE without WHERE is not allowed (pgfront rule "no-unbounded-delete")')
    assert decide(rs, "DELETE FROM orders WHERE id = 1") is PASS
    assert decide(rs, "UPDATE orders SET x = 1") is PASS


def test_files_load_in_name_order_and_rules_in_file_order(tmp_path):
    write(tmp_path, "20-b.toml", '[[rule]]\nname = "b1"\nmatch = {}\nlog = true\n')
    write(tmp_path, "10-a.toml", '[[rule]]\nname = "a1"\nmatch = {}\nlog = true\n'
                                 '[[rule]]\nname = "a0"\nmatch = {}\nlog = true\n')
    rs = load_rules([str(tmp_path / "*.toml")])
    assert [r.name for r in rs.rules] == ["a1", "a0", "b1"]
    assert [Path(f).name for f in rs.files] == ["10-a.toml", "20-b.toml"]
    assert len(load_rules([str(tmp_path / "nothing-*.toml")])) == 0  # a glob may match nothing


def test_base_dir_resolves_relative_paths(tmp_path):
    write(tmp_path, "r.toml", '[[rule]]\nname = "x"\nmatch = {}\nlog = true\n')
    assert len(load_rules(["*.toml"], base_dir=tmp_path)) == 1


def test_shipped_rule_files_are_valid_and_harmless():
    rs = load_rules(["rules/*.toml"], base_dir=ROOT)
    assert len(rs) >= 5
    assert all(r.observe for r in rs.rules)
    for sql in ("DELETE FROM example_orders", "SELECT * FROM example_orders", "SELECT * FROM example_users WHERE id = 1"):
        d = decide(rs, sql)
        assert d.block is None and d.sql is None and d.cache_ttl is None and d.matched


# --- validation: every mistake, with its line -----------------------------------------------------

def test_unknown_keys_everywhere(tmp_path):
    got = problems(tmp_path, """\
        [[rule]]
        name = "r"
        matc = { kind = "select" }
        match = { kind = "select", tabels = ["t"] }
        limit = { max_rows = 5, max_ofset = 5 }
        cache = { ttl = "1s", swr = "1s" }
        """)
    assert got == [
        "3: rule 'r': unknown key 'matc' (did you mean 'match'?)",
        "4: rule 'r': unknown match key 'tabels' (did you mean 'tables'?)",
        "5: rule 'r': unknown key 'max_ofset' in limit (did you mean 'max_offset'?) (known: max_rows, max_offset)",
        "6: rule 'r': unknown key 'swr' in cache (known: ttl, stale_while_revalidate, allow_rls, allow_catalog)",
    ]


def test_wrong_types_and_values(tmp_path):
    got = problems(tmp_path, """\
        [[rule]]
        name = "types"
        mode = "watch"
        final = "yes"
        match = { kind = "selec", has_where = "no", user = 5, pattern = "(" }
        limit = { max_rows = 0, max_offset = -1 }

        [[rule]]
        name = "durations"
        match = { kind = "select" }
        cache = { ttl = "10 parsecs", stale_while_revalidate = true }
        timeout = "0s"

        [[rule]]
        name = "blocks"
        match = { kind = "delete" }
        block = { message = "", sqlstate = "123" }
        log = "yes"
        """)
    assert got == [
        "3: rule 'types': mode must be \"enforce\" or \"observe\", not 'watch'",
        "4: rule 'types': final must be true or false, not 'yes'",
        "5: rule 'types': unknown statement kind 'selec' (did you mean 'select'?) (kinds: copy, ddl, delete, "
        "empty, insert, merge, select, set, transaction, unknown, update, utility)",
        "5: rule 'types': match.has_where must be true or false, not 'no'",
        "5: rule 'types': match.user must be a string or a non-empty list of strings, not 5",
        "5: rule 'types': match.pattern is not a valid regular expression: missing ), unterminated subpattern at position 0",
        "6: rule 'types': limit.max_rows must be a whole number of at least 1, not 0",
        "6: rule 'types': limit.max_offset must be a whole number of at least 0, not -1",
        "11: rule 'durations': cache.ttl: not a duration: '10 parsecs' (use a number with ms, s, m, h or d)",
        "11: rule 'durations': cache.stale_while_revalidate must be a duration like \"60s\" or \"250ms\", not True",
        "12: rule 'durations': timeout must be more than 0, not '0s'",
        "17: rule 'blocks': block.message must be a non-empty string, not ''",
        "17: rule 'blocks': block.sqlstate must be 5 characters of digits and capitals, like \"42501\", not '123'",
        "18: rule 'blocks': log must be true or false, not 'yes'",
    ]


def test_structural_mistakes(tmp_path):
    got = problems(tmp_path, """\
        [[rule]]
        name = "no-actions"
        match = {}

        [[rule]]
        name = "no-match"
        log = true

        [[rule]]
        name = "block-and-cache"
        match = { kind = "select" }
        block = { message = "no" }
        cache = { ttl = "5s" }

        [[rule]]
        name = "limit-on-delete"
        match = { kind = "delete" }
        limit = { max_rows = 5 }

        [[rule]]
        name = "no-actions"
        match = {}
        log = true

        [[rule]]
        match = { fingerprint = "xyz" }
        log = true

        [[rule]]
        name = "bad template"
        match = {}
        rewrite = { from = "SELECT * FROM t WHERE a = $1 AND b = $2", to = "SELECT a FROM t WHERE a = $1" }
        """)
    assert got == [
        "1: rule 'no-actions': no action: give at least one of block, limit, cache, rewrite, timeout, throttle, mirror, route, log",
        "5: rule 'no-match': no match table (use match = {} to match every statement)",
        "12: rule 'block-and-cache': block cannot be combined with cache: a blocked statement never runs "
        "(only log may go with block)",
        "18: rule 'limit-on-delete': limit only acts on SELECT statements, but match.kind is delete",
        "21: rule 'no-actions': duplicate rule name (first defined at line 2)",
        "25: every rule needs a name of letters, digits, _ . : - (got None)",
        "26: fingerprint 'xyz' is not 16 hex digits (see `pgfront rules explain`)",
        "30: every rule needs a name of letters, digits, _ . : - (got 'bad template')",
        "32: rewrite.to must use the same parameters as rewrite.from ($1, $2), not $1",
    ]


def test_subtable_syntax_lines_and_bad_toml(tmp_path):
    got = problems(tmp_path, """\
        [[rule]]
        name = "sub"
        log = true
        [rule.match]
        kind = "select"
        user = 5
        """)
    assert got == ["6: rule 'sub': match.user must be a string or a non-empty list of strings, not 5"]
    got = problems(tmp_path, '[[rule]]\nname = "x"\nmatch = {\n')
    assert len(got) == 1 and got[0].startswith("3: not valid TOML:")
    got = problems(tmp_path, 'rules = 5\n[[rule]]\nname = "x"\nmatch = {}\nlog = true\n')
    assert got == ["1: unknown top-level key 'rules' (rules go in [[rule]] tables)"]


def test_problems_across_files_and_missing_file(tmp_path):
    a = write(tmp_path, "a.toml", '[[rule]]\nname = "same"\nmatch = {}\nlog = true\n')
    b = write(tmp_path, "b.toml", '\n[[rule]]\nname = "same"\nmatch = {}\nlog = true\n')
    with pytest.raises(RuleError) as e:
        load_rules([str(a), str(b), str(tmp_path / "missing.toml")])
    assert str(e.value).splitlines() == [
        f"{b}:3: rule 'same': duplicate rule name (first defined at {a}:2)",
        f"{tmp_path / 'missing.toml'}: no such rule file",
    ]


# --- matching -------------------------------------------------------------------------------------

def info(**facts) -> StatementInfo:
    base = dict(text="x", fingerprint="0123456789abcdef", normalized="select x", parsed=True, kind="select")
    return StatementInfo(**{**base, **facts})


@pytest.mark.parametrize("match, facts, ctx, expected", [
    ('kind = "select"', {}, CTX, True),
    ('kind = ["insert", "update"]', {"kind": "update"}, CTX, True),
    ('kind = ["insert", "update"]', {}, CTX, False),
    ('tables = ["orders"]', {"tables_read": frozenset({"public.orders"})}, CTX, True),
    ('tables = ["orders"]', {"tables_written": frozenset({"orders"})}, CTX, True),
    ('tables = ["orders"]', {"tables_read": frozenset({"orders_archive"})}, CTX, False),
    ('tables = ["public.orders"]', {"tables_read": frozenset({"orders"})}, CTX, True),
    ('tables = ["public.orders"]', {"tables_read": frozenset({"sales.orders"})}, CTX, False),
    ('tables = ["audit_*"]', {"tables_read": frozenset({"audit_2024"})}, CTX, True),
    ('tables = "Orders"', {"tables_read": frozenset({"orders"})}, CTX, True),
    ('fingerprint = "0123456789ABCDEF"', {}, CTX, True),
    ('fingerprint = ["ffffffffffffffff"]', {}, CTX, False),
    ('pattern = "^select"', {}, CTX, True),
    ('pattern = "(?i)^SELECT x$"', {}, CTX, True),
    ('pattern = "^insert"', {}, CTX, False),
    ('user = "app"', {}, CTX, True),
    ('user = ["admin", "root"]', {}, CTX, False),
    ('database = "ap?"', {}, CTX, True),
    ('application_name = "psql*"', {}, CTX, False),
    ('application_name = "we*"', {}, CTX, True),
    ("has_where = false", {}, CTX, True),
    ("has_where = false", {"has_where": True}, CTX, False),
    ("has_limit = true", {"has_limit": True}, CTX, True),
    ("in_transaction = true", {}, CTX, False),
    ("in_transaction = true", {}, MatchContext(in_transaction=True), True),
    ("parsed = false", {"parsed": False, "kind": "unknown"}, CTX, True),
    ("parsed = false", {}, CTX, False),
    # fail open: structural keys never match a statement the parser rejected
    ("has_where = false", {"parsed": False, "kind": "unknown"}, CTX, False),
    ('kind = "unknown"', {"parsed": False, "kind": "unknown"}, CTX, True),
    ('pattern = "x"', {"parsed": False, "kind": "unknown"}, CTX, True),
    ('kind = "select", user = "app", has_where = true', {"has_where": True}, CTX, True),
    ('kind = "select", user = "other", has_where = true', {"has_where": True}, CTX, False),
    ("", {"parsed": False, "kind": "unknown"}, CTX, True),
])
def test_match_keys(tmp_path, match, facts, ctx, expected):
    rs = ruleset(tmp_path, f'[[rule]]\nname = "m"\nmatch = {{ {match} }}\nlog = true\n')
    assert rs.rules[0].match(info(**facts), ctx) is expected


def test_unparseable_passes_unless_a_rule_asks(tmp_path):
    bad = "SELEC * FROM orders"
    assert decide(ruleset(tmp_path, ISSUE_RULES), bad) is PASS
    rs = ruleset(tmp_path, ISSUE_RULES + '[[rule]]\nname = "strict"\nmatch = { parsed = false }\nblock = {}\n')
    assert decide(rs, bad).block == ("42501", 'statement not allowed (pgfront rule "strict")')


# --- combination ----------------------------------------------------------------------------------

def test_all_matching_rules_apply_in_order(tmp_path):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "short"
        match = { tables = ["orders"] }
        timeout = "250ms"
        log = true
        [[rule]]
        name = "cache-first"
        match = { kind = "select" }
        cache = { ttl = "30s", stale_while_revalidate = "5s" }
        [[rule]]
        name = "long"
        match = { kind = "select" }
        timeout = "10s"
        cache = { ttl = "1h" }
        [[rule]]
        name = "limit-big"
        match = { kind = "select" }
        limit = { max_rows = 500, max_offset = 50 }
        [[rule]]
        name = "limit-small"
        match = { tables = ["orders"] }
        limit = { max_rows = 100, max_offset = 1000 }
        """)
    d = decide(rs, "SELECT * FROM orders OFFSET 20")
    assert (d.timeout, d.cache_ttl, d.stale_while_revalidate, d.log) == (0.25, 30.0, 5.0, True)
    assert d.sql == "SELECT * FROM orders OFFSET 20 LIMIT 100"  # the smallest max_rows
    assert d.notices[0].startswith('pgfront rule "limit-small" limited this query to 100 rows')
    assert [m[0] for m in d.matched] == ["short", "short", "cache-first", "long", "long", "limit-big", "limit-small"]
    assert decide(rs, "SELECT * FROM orders OFFSET 60").block[1].startswith(  # the smallest max_offset
        'OFFSET 60 is beyond the maximum of 50 set by pgfront rule "limit-big"')
    d = decide(rs, "SELECT * FROM customers")
    assert (d.timeout, d.cache_ttl, d.sql) == (10.0, 30.0, "SELECT * FROM customers LIMIT 500")


def test_final_stops_and_block_wins(tmp_path):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "cache"
        match = { kind = "select" }
        cache = { ttl = "30s" }
        [[rule]]
        name = "stop-for-reports"
        match = { tables = ["report"] }
        timeout = "1s"
        final = true
        [[rule]]
        name = "deny-secrets"
        match = { tables = ["secrets", "report"] }
        block = { message = "no", sqlstate = "42000" }
        log = true
        [[rule]]
        name = "after-block"
        match = {}
        timeout = "2s"
        """)
    d = decide(rs, "SELECT * FROM report")
    assert (d.block, d.timeout, d.cache_ttl) == (None, 1.0, 30.0)
    assert [m[0] for m in d.matched] == ["cache", "stop-for-reports"]
    d = decide(rs, "SELECT * FROM secrets")
    assert d.block == ("42000", 'no (pgfront rule "deny-secrets")')
    assert (d.cache_ttl, d.timeout, d.sql, d.notices, d.log) == (None, None, None, (), True)
    assert [m[0] for m in d.matched] == ["cache", "deny-secrets", "deny-secrets"]


def test_rewrites_chain_then_limit(tmp_path):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "narrow"
        match = {}
        rewrite = { from = "SELECT * FROM old_users WHERE team = $1", to = "SELECT id, name FROM old_users WHERE team = $1" }
        [[rule]]
        name = "rename"
        match = {}
        rewrite = { rename_table = { old_users = "users" } }
        [[rule]]
        name = "page"
        match = { kind = "select" }
        limit = { max_rows = 50 }
        """)
    d = decide(rs, "select *   from OLD_USERS where team = 'red'")
    assert d.sql == "SELECT id, name FROM users WHERE team = 'red' LIMIT 50"
    assert [m[:2] for m in d.matched] == [("narrow", "rewrite"), ("rename", "rewrite"), ("page", "limit")]
    # the template keys its rule: other statements do not count as its hits
    d = decide(rs, "SELECT * FROM old_users")
    assert d.sql == "SELECT * FROM users LIMIT 50"
    assert [m[0] for m in d.matched] == ["rename", "page"]


def test_observe_mode_changes_nothing_and_never_stops(tmp_path, caplog):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "would-block"
        mode = "observe"
        final = true
        match = { kind = "delete" }
        block = { message = "no" }
        [[rule]]
        name = "would-limit"
        mode = "observe"
        match = { kind = "select" }
        limit = { max_rows = 1 }
        [[rule]]
        name = "log-deletes"
        match = { kind = "delete" }
        log = true
        """)
    with caplog.at_level("INFO", logger="pgfront.rules"):
        d = decide(rs, "DELETE FROM t")
    assert (d.block, d.sql, d.log) == (None, None, True)
    assert d.matched == (("would-block", "block", True), ("log-deletes", "log", False))
    assert "rule 'would-block' (observe mode) would have applied block to: DELETE FROM t" in caplog.text
    d = decide(rs, "SELECT * FROM t")
    assert (d.sql, d.notices, d.row_limit) == (None, (), None)
    assert d.matched == (("would-limit", "limit", True),)


def test_multi_statement_strings(tmp_path):
    rs = ruleset(tmp_path, ISSUE_RULES)
    d = decide(rs, "SELECT 1; DELETE FROM orders")
    assert d.block[0] == "42501"  # a harmless first statement does not hide the second
    d = decide(rs, "SELECT * FROM orders; SELECT * FROM customers; select * from orders limit 5000;")
    assert d.sql == "SELECT * FROM orders LIMIT 1000; SELECT * FROM customers; select * from orders limit 1000;"
    assert len(d.notices) == 2
    assert decide(rs, "SELECT * FROM daily_report; SELECT 1").cache_ttl is None  # never cached
    d = decide(rs, "SELECT 'é€'; /* ü */ SELECT * FROM orders -- ö")  # parser offsets are bytes
    assert d.sql == "SELECT 'é€'; /* ü */ SELECT * FROM orders LIMIT 1000 -- ö"


def test_disabled_rules_defaults_and_description(tmp_path):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "off"
        enabled = false
        match = {}
        block = true
        [[rule]]
        name = "cached"
        description = "reports may be a minute old"
        match = { kind = "select" }
        cache = true
        """)
    d = decide(rs, "SELECT * FROM t")
    assert (d.block, d.cache_ttl) == (None, 60.0)  # cache = true takes [cache] default_ttl
    rows = rs.describe()
    assert (rows[0]["mode"], rows[0]["actions"]) == ("disabled", "block")
    assert rows[1]["description"] == "reports may be a minute old"
    path = write(tmp_path, "ttl.toml", '[[rule]]\nname = "c"\nmatch = {}\ncache = {}\n')
    assert load_rules([str(path)], default_ttl=5).decide(analyze("SELECT 1"), CTX).cache_ttl == 5.0


def test_template_rewrite_simple_and_extended(tmp_path):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "users"
        match = {}
        rewrite = { from = "SELECT * FROM users WHERE id = $1", to = "SELECT id, email FROM users WHERE id = $1" }
        """)
    assert decide(rs, "SELECT * FROM users WHERE id = 42").sql == "SELECT id, email FROM users WHERE id = 42"
    assert decide(rs, "select *\n  from Users where ID=$1").sql == "SELECT id, email FROM users WHERE id = $1"
    assert decide(rs, "SELECT * FROM users WHERE id = 'x''y'").sql == "SELECT id, email FROM users WHERE id = 'x''y'"
    assert decide(rs, "SELECT * FROM users WHERE id = 42 AND 1 = 1") is PASS
    assert decide(rs, "SELECT * FROM users WHERE name = 42") is PASS


# --- decisions: caching and counting ----------------------------------------------------------------

def test_decisions_are_cached_and_shared(tmp_path):
    rs = ruleset(tmp_path, ISSUE_RULES)
    first = decide(rs, "SELECT * FROM orders")
    assert decide(rs, "SELECT * FROM orders") is first
    assert decide(rs, "SELECT * FROM orders", MatchContext(user="other")) is first  # no rule reads user
    assert decide(rs, "SELECT 1") is PASS
    with pytest.raises(AttributeError):
        first.sql = "x"  # frozen
    empty = RuleSet()
    assert empty.decide(analyze("SELECT * FROM orders"), CTX) is PASS


def test_decision_cache_keys_on_context_fields_rules_read(tmp_path):
    rs = ruleset(tmp_path, """
        [[rule]]
        name = "admin-only"
        match = { kind = "delete", user = "admin" }
        block = { message = "no" }
        """)
    assert decide(rs, "DELETE FROM t", MatchContext(user="admin")).block
    assert decide(rs, "DELETE FROM t", MatchContext(user="app")) is PASS
    assert decide(rs, "DELETE FROM t", MatchContext(user="admin")).block


def test_decision_cache_is_bounded(tmp_path):
    path = write(tmp_path, "r.toml", ISSUE_RULES)
    rs = load_rules([str(path)], cache_size=3)
    for i in range(10):
        decide(rs, f"SELECT * FROM orders WHERE id = {i}")
    assert len(rs._decisions) == 3
    huge = "SELECT * FROM orders WHERE id IN (" + ", ".join(str(i) for i in range(10000, 20000)) + ")"  # > 64 KiB
    first = decide(rs, huge)
    assert first.sql.endswith(") LIMIT 1000") and huge not in rs._decisions  # too big to hold
    assert decide(rs, huge) == first


def test_counters_count_every_execution(tmp_path):
    rs = ruleset(tmp_path, ISSUE_RULES + """
        [[rule]]
        name = "watch-orders"
        mode = "observe"
        match = { tables = ["orders"] }
        timeout = "1s"
        """)
    for _ in range(3):
        rs.count(decide(rs, "SELECT * FROM orders"))  # cached after the first
    rs.count(decide(rs, "DELETE FROM orders"))
    rs.count(decide(rs, "SELECT 1"))
    rows = {r["name"]: r for r in rs.describe()}
    assert rows["paginate-orders"] == {
        "name": "paginate-orders", "file": "rules.toml", "line": 3, "match": "kind=select tables=orders",
        "actions": "limit(max_rows=1000, max_offset=10000)", "mode": "enforce", "final": False,
        "description": "", "hits": 3, "observed_hits": 0, "queued": 0, "throttled": 0,
    }
    assert (rows["no-unbounded-delete"]["hits"], rows["cache-reports"]["hits"]) == (1, 0)
    # 3, not 4: the blocked DELETE stopped evaluation before the observe rule
    assert (rows["watch-orders"]["hits"], rows["watch-orders"]["observed_hits"]) == (0, 3)
    assert rows["watch-orders"]["mode"] == "observe"


# --- hot reload -------------------------------------------------------------------------------------

def test_holder_reload_keeps_old_rules_on_a_bad_file(tmp_path):
    path = write(tmp_path, "r.toml", ISSUE_RULES)
    holder = RuleHolder([str(tmp_path / "*.toml")])
    old = holder.current
    old.count(old.decide(analyze("DELETE FROM t"), CTX))

    path.write_text(ISSUE_RULES + '[[rule]]\nname = "broken"\nmatch = { kind = "nope" }\nlog = true\n')
    ok, message = holder.reload()
    assert not ok and holder.current is old
    assert "keeping the 3 running rules" in message and "unknown statement kind 'nope'" in message

    path.write_text(ISSUE_RULES.replace("max_rows = 1000", "max_rows = 10"))
    ok, message = holder.reload()
    assert ok and message == "loaded 3 rules from 1 files"
    assert holder.current is not old
    assert decide(holder.current, "SELECT * FROM orders").sql == "SELECT * FROM orders LIMIT 10"
    assert decide(old, "SELECT * FROM orders").sql == "SELECT * FROM orders LIMIT 1000"  # in-flight: unaffected
    kept = {r["name"]: r["hits"] for r in holder.current.describe()}
    assert kept["no-unbounded-delete"] == 1  # counts survive a reload


def test_holder_refuses_to_start_with_bad_rules(tmp_path):
    write(tmp_path, "r.toml", '[[rule]]\nname = "x"\nmatch = {}\n')
    with pytest.raises(RuleError):
        RuleHolder([str(tmp_path / "r.toml")])


def test_watcher_reloads_on_change(tmp_path):
    path = write(tmp_path, "10.toml", ISSUE_RULES)
    holder = RuleHolder([str(tmp_path / "*.toml")])
    watcher = RuleWatcher(holder, interval=0.01)
    assert watcher.poll() is None  # nothing changed

    async def wait_for(predicate) -> None:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if predicate():
                return
        raise AssertionError("watcher did not react")

    async def scenario() -> None:
        watcher.start()
        first = holder.current
        path.write_text("not = [valid")  # a new size too: seen even where mtimes are coarse
        await asyncio.sleep(0.1)
        assert holder.current is first  # a broken file keeps the running rules
        write(tmp_path, "10.toml", ISSUE_RULES)
        write(tmp_path, "20.toml", '[[rule]]\nname = "extra"\nmatch = {}\nlog = true\n')
        await wait_for(lambda: len(holder.current) == 4)
        (tmp_path / "20.toml").unlink()
        await wait_for(lambda: len(holder.current) == 3)
        await watcher.stop()

    asyncio.run(scenario())
    ok, message = watcher.reload()
    assert ok and message == "loaded 3 rules from 1 files"


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_check(tmp_path, capsys):
    good = write(tmp_path, "good.toml", ISSUE_RULES)
    assert cli_main(["rules", "check", str(good)]) == 0
    assert capsys.readouterr().out == "OK: 3 rules in 1 file\n"
    bad = write(tmp_path, "bad.toml", '[[rule]]\nname = "x"\nmatch = { kind = "selec" }\nlog = true\n')
    assert cli_main(["rules", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}:3: rule 'x': unknown statement kind 'selec'")
    assert out[-1] == "1 problem found"


def test_cli_explain(tmp_path, capsys):
    path = write(tmp_path, "r.toml", ISSUE_RULES + """
        [[rule]]
        name = "psql-timeout"
        mode = "observe"
        match = { application_name = "psql" }
        timeout = "5s"
        """)
    sql = "SELECT * FROM orders WHERE id > $1 ORDER BY id LIMIT $2"
    assert cli_main(["rules", "explain", sql, "--rules", str(path), "--application-name", "psql"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint: {analyze(sql).fingerprint}" in out
    assert "facts:       kind=select parsed=true tables_read=orders" in out
    assert "* paginate-orders [enforce] limit(max_rows=1000, max_offset=10000)" in out and "APPLIES" in out
    assert "psql-timeout [observe] timeout=5s" in out and "observed (would apply)" in out
    assert "result:      SELECT * FROM orders WHERE id > $1 ORDER BY id LIMIT LEAST($2::bigint, 1000)" in out
    assert 'notice:      pgfront rule "paginate-orders" limited this query to 1000 rows' in out
    assert cli_main(["rules", "explain", "DELETE FROM x", "--rules", str(path)]) == 0
    assert "result:      ERROR 42501: DELETE without WHERE is not allowed" in capsys.readouterr().out
    assert cli_main(["rules", "explain", "SELECT 1", "--rules", str(path), "--application-name", "psql",
                     "--enforce"]) == 0
    assert "timeout:     statement_timeout 5000ms" in capsys.readouterr().out


def test_cli_as_a_subprocess(tmp_path):
    bad = write(tmp_path, "bad.toml", '[[rule]]\nname = "x"\nmatch = {}\nblock = { sqlstate = 5 }\n')
    res = subprocess.run([sys.executable, "-m", "proxy", "rules", "check", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1
    assert res.stdout.splitlines()[0] == (
        f"{bad}:4: rule 'x': block.sqlstate must be 5 characters of digits and capitals, like \"42501\", not 5")
