"""sqlcommenter parsing and the Tracing class, exporting real spans over HTTP to a real OTLP receiver.

No mocks: spans go through the OpenTelemetry SDK and its OTLP/HTTP exporter to tests/otlp_receiver.py,
which decodes them with opentelemetry-proto.
"""

from __future__ import annotations

import itertools
import random
import time
import timeit

import pytest
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from proxy import config, otlp
from proxy import tracing as tracing_module
from proxy.config import ConfigError
from proxy.devdb import free_port
from proxy.sql import sqlcommenter
from proxy.sql.sqlcommenter import parse_tags, split_comment, tags_text, traceparent
from proxy.tracing import Tracing, traces_url
from tests.otlp_receiver import OtlpReceiver, otlp_receiver_fixture  # noqa: F401

TRACE = "5bd66ef5095369c7b0d1f8f4bd33716a"
PARENT = "c532cb4098ac3dd2"
DJANGO = (f"controller='index',framework='django%3A2.2.1',route='%5Epolls/%24',"
          f"traceparent='00-{TRACE}-{PARENT}-01'")


# ---- sqlcommenter ----

def test_django_comment_from_the_spec():
    sql = f"SELECT * FROM polls_question /*{DJANGO}*/"
    text, body = split_comment(sql)
    assert text == "SELECT * FROM polls_question"
    assert body == DJANGO
    assert parse_tags(body) == {"controller": "index", "framework": "django:2.2.1", "route": "^polls/$",
                                "traceparent": f"00-{TRACE}-{PARENT}-01"}


def test_spec_example_with_tracestate():
    body = ("action='%2Fparam*d',controller='index',framework='spring',"
            "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',"
            "tracestate='congo%3Dt61rcWkgMzE%2Crojo%3D00f067aa0ba902b7'")
    text, got = split_comment(f"SELECT * FROM FOO /*{body}*/")
    assert (text, got) == ("SELECT * FROM FOO", body)
    tags = parse_tags(got)
    assert tags["action"] == "/param*d"
    assert tags["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert tags_text(tags) == "action=/param*d controller=index framework=spring"


@pytest.mark.parametrize("sql", [
    "SELECT 1 /*app='x'*/;",
    "SELECT 1 /*app='x'*/ ;\n",
    "SELECT 1 /*app='x'*/  \t\n",
    "SELECT 1/*app='x'*/",
    "SELECT 1 /* app='x' */",
])
def test_trailing_semicolon_and_whitespace(sql):
    text, body = split_comment(sql)
    assert text == "SELECT 1"
    assert parse_tags(body) == {"app": "x"}


def test_spaces_around_commas_are_tolerated():
    assert parse_tags(split_comment("SELECT 1 /* a='1', b='2' ,c='x y' */")[1]) == {"a": "1", "b": "2", "c": "x y"}


def test_escaped_quotes_and_backslashes():
    text, body = split_comment(r"UPDATE t SET a = 1 /*name='it\'s',path='C:\\tmp',k\'ey='v'*/")
    assert text == "UPDATE t SET a = 1"
    assert parse_tags(body) == {"name": "it's", "path": "C:\\tmp", "k'ey": "v"}


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "",
    ";",
    "   ",
    "SELECT 1;",
    "SELECT a/b FROM t",
    "SELECT 1 /* a plain comment */",
    "SELECT 1 /**/",
    "SELECT 1 /*app=x*/",  # unquoted value
    "SELECT 1 /*app='x'",  # not closed
    "SELECT 1 /*app='x' junk*/",
    "SELECT 1 /*app='x',*/",
    f"SELECT 1 /*app='x',,traceparent='00-{TRACE}-{PARENT}-01'*/",
    f"SELECT 1 /*app='x' traceparent='00-{TRACE}-{PARENT}-01'*/",
    f"SELECT 1 /*app='x',traceparent='00-{TRACE}-{PARENT}-01',*/",
    f"SELECT 1 /*app='x',traceparent='00-{TRACE}-{PARENT}-01' b='y'*/",
    "SELECT 1 /*app = 'x'*/",  # no spaces around '='
    "SELECT 1 /*a b='x'*/",
    "SELECT 1 /*app='x'*/;;",  # one ';' at most
    "*/",
    # a '*/' inside a string literal at the end is not a comment
    "SELECT '/*app=''x''*/'",
    "SELECT '/*app=''x''*/';",
    "SELECT 'a', '/*' || 'app=''x''*/'",
    "SELECT $$ /*app='x'*/ $$",
    # PostgreSQL ends a comment at its first '*/': this is a comment then a literal, not tags
    "SELECT 1 /*app='*/'*/",
    # comments nest: the last '/*' opens a comment without tags
    "SELECT 1 /*app='x' /* inner */*/",
])
def test_not_a_sqlcommenter_comment(sql):
    assert split_comment(sql) == (sql, None)


def test_only_the_last_comment_counts():
    text, body = split_comment("SELECT /*a='1'*/ 1 /*b='2'*/")
    assert text == "SELECT /*a='1'*/ 1" and parse_tags(body) == {"b": "2"}


def test_parse_tags_memoizes_the_stable_part_and_stays_bounded():
    body = "application='shop',controller='cart',route='%2Fapi%2Fcart'"
    assert parse_tags(body) is parse_tags(body)  # the same dict: callers must not modify it
    tp1 = f"{body},traceparent='00-{TRACE}-{PARENT}-01'"
    tp2 = f"{body},traceparent='00-{TRACE}-{'1' * 16}-01'"
    assert parse_tags(tp1)["traceparent"].endswith(f"{PARENT}-01")
    assert parse_tags(tp2)["traceparent"].endswith("1111111111111111-01")
    assert parse_tags(tp1)["route"] == "/api/cart"
    assert tp1 not in sqlcommenter._cache and tp2 not in sqlcommenter._cache  # unique bodies: not cached
    for i in range(sqlcommenter._CACHE_SIZE + 100):
        parse_tags(f"route='/r{i}'")
    assert len(sqlcommenter._cache) <= sqlcommenter._CACHE_SIZE
    assert parse_tags("not tags") == {}


def test_traceparent_validation():
    assert traceparent({"traceparent": f"00-{TRACE}-{PARENT}-01"}) == (int(TRACE, 16), int(PARENT, 16), True)
    assert traceparent({"traceparent": f"00-{TRACE}-{PARENT}-00"}) == (int(TRACE, 16), int(PARENT, 16), False)
    assert traceparent({"traceparent": f"00-{TRACE}-{PARENT}-03"})[2] is True  # other flag bits ignored
    assert traceparent({"traceparent": f"01-{TRACE}-{PARENT}-01-later-fields"}) is not None  # future version
    for bad in [
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}0-01",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-1",
        f"0-{TRACE}-{PARENT}-01",
        "",
        "garbage",
    ]:
        assert traceparent({"traceparent": bad}) is None, bad
    assert traceparent({"route": "/"}) is None
    assert traceparent({}) is None and traceparent(None) is None


def test_tags_text():
    assert tags_text(parse_tags(DJANGO)) == "controller=index framework=django:2.2.1 route=^polls/$"
    assert tags_text({}) == "" and tags_text(None) == ""


# ---- config ----

def section(**tracing) -> config.Section:
    return config.load(None, overrides={"tracing": tracing}).tracing


def test_config_defaults_and_validation():
    defaults = config.load(None).tracing
    assert defaults.endpoint == "" and defaults.sample_ratio == 0.01 and defaults.export_timeout == 10.0
    assert Tracing.from_config(defaults) is None  # tracing off: nothing to call on the hot path
    with pytest.raises(ConfigError, match=r"\[tracing\] sample_ratio"):
        section(sample_ratio=1.5)
    with pytest.raises(ConfigError, match=r"\[tracing\] sample_ratio"):
        section(sample_ratio=-0.1)
    for bad in ["grpc://collector:4317", "collector:4318", "http://", "http://c:port/v1/traces", "http://c:70000"]:
        with pytest.raises(ConfigError, match=r"\[tracing\] endpoint"):
            section(endpoint=bad)
    assert section(endpoint="https://otel.example/v1/traces").endpoint == "https://otel.example/v1/traces"
    with pytest.raises(ConfigError, match=r"\[tracing\] max_queue_size"):
        section(endpoint="http://127.0.0.1:4318", max_queue_size=0)


def test_endpoint_url():
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://otel.example:4318/") == "https://otel.example:4318/v1/traces"
    assert traces_url("http://c:4318/custom/path") == "http://c:4318/custom/path"
    for bad in ["http://", "http://host:notaport", "http://host:99999", "collector:4318", "ftp://h/"]:
        with pytest.raises(ValueError, match=r"\[tracing\] endpoint"):
            traces_url(bad)
    # a Section built by hand (not through config.load) still gets a clear message
    bad = config.Section({**config.load(None).tracing.as_dict(), "endpoint": "http://host:99999"})
    with pytest.raises(ValueError, match="not a valid URL"):
        Tracing(bad)


# ---- Tracing, exporting to a real OTLP/HTTP receiver ----

def make(receiver: OtlpReceiver, **kw) -> Tracing:
    settings = {"endpoint": receiver.url, "sample_ratio": 1.0, **kw}
    return Tracing(section(**settings), service_instance="test-1")


def emit(tracing: Tracing, sampled, **kw) -> None:
    now = time.perf_counter()
    args = dict(start=now - 0.010, end=now, fingerprint="0123456789abcdef",
                normalized="SELECT * FROM pgbench_accounts WHERE aid = $1", kind="select",
                tables=frozenset({"pgbench_accounts", "branches"}), database="app", user="alice",
                application_name="psql", rules=(), cache=None, queue_seconds=0.0, rows=1, sqlstate=None,
                tags=None)
    args.update(kw)
    tracing.statement(sampled, **args)


def test_span_is_a_child_of_the_traceparent(otlp_receiver):
    tracing = make(otlp_receiver, sample_ratio=0.0, headers={"Authorization": "Bearer t0ken"})
    try:
        tags = parse_tags(split_comment(f"SELECT * FROM pgbench_accounts WHERE aid = 1 /*{DJANGO}*/")[1])
        sampled = tracing.sample(tags)
        assert sampled  # ratio 0, but the client's sampled flag wins
        wall_end = time.time_ns()
        emit(tracing, sampled, tags=tags, rows=3, cache="miss", queue_seconds=0.002,
             rules=(("slow_reads", "log", False), ("no_seq", "block", True)))
        assert tracing.force_flush(10)
        [span] = otlp_receiver.wait_for(lambda spans: len(spans) == 1)
    finally:
        tracing.shutdown()
    assert span["trace_id"] == TRACE and span["parent_span_id"] == PARENT
    assert span["span_id"] not in ("", PARENT)
    assert span["name"] == "SELECT branches" and span["kind"] == "SERVER"
    assert span["status_code"] == "UNSET"
    assert 9_000_000 <= span["end_ns"] - span["start_ns"] <= 11_000_000
    assert abs(span["end_ns"] - wall_end) < 1_000_000_000  # perf_counter mapped onto the wall clock
    a = span["attributes"]
    assert a["db.system.name"] == "postgresql" and a["db.namespace"] == "app"
    assert a["db.operation.name"] == "SELECT" and a["db.collection.name"] == "branches"
    assert a["db.query.text"] == "SELECT * FROM pgbench_accounts WHERE aid = $1"
    assert a["db.response.returned_rows"] == 3 and "db.response.status_code" not in a
    assert a["db.user"] == "alice"
    assert a["pgfront.fingerprint"] == "0123456789abcdef"
    assert a["pgfront.rules"] == ["slow_reads:log", "no_seq:block:observe"]
    assert a["pgfront.cache"] == "miss" and a["pgfront.application_name"] == "psql"
    assert a["pgfront.queue_seconds"] == 0.002
    assert 0.0075 <= a["pgfront.upstream_seconds"] <= 0.0085
    assert a["pgfront.tag.route"] == "^polls/$" and a["pgfront.tag.framework"] == "django:2.2.1"
    assert "pgfront.tag.traceparent" not in a
    assert span["resource"]["service.name"] == "pgfront"
    assert span["resource"]["service.instance.id"] == "test-1"
    assert otlp_receiver.headers[0].get("authorization") == "Bearer t0ken"


def test_unsampled_parent_and_ratio_zero_send_nothing(otlp_receiver):
    tracing = make(otlp_receiver, sample_ratio=0.0)
    try:
        unsampled = parse_tags(f"traceparent='00-{TRACE}-{PARENT}-00'")
        assert tracing.sample(unsampled) is None
        assert all(tracing.sample(None) is None for _ in range(1000))
        assert all(tracing.sample({"route": "/x"}) is None for _ in range(100))
        invalid = {"traceparent": f"00-{'0' * 32}-{PARENT}-01"}  # invalid: the ratio decides
        assert tracing.sample(invalid) is None
        emit(tracing, None)  # a falsy decision makes no span
        # a marker span with its own sampled parent: once it arrives, anything sent before it has too
        marker = parse_tags(f"traceparent='00-{'a' * 32}-{PARENT}-01'")
        emit(tracing, tracing.sample(marker), normalized="marker")
        assert tracing.force_flush(10)
        spans = otlp_receiver.wait_for(lambda spans: len(spans) >= 1)
    finally:
        tracing.shutdown()
    assert [s["attributes"]["db.query.text"] for s in spans] == ["marker"]
    assert spans[0]["trace_id"] == "a" * 32
    d = tracing.describe()
    assert d["spans"] == 1 and d["sampled_out"] == 1102 and d["exported"] == 1 and d["dropped"] == 0


def test_ratio_one_traces_every_statement(otlp_receiver):
    tracing = make(otlp_receiver, sample_ratio=1.0, service_name="shop-db")
    try:
        for i in range(50):
            sampled = tracing.sample(None)
            assert sampled is True
            emit(tracing, sampled, rows=i, tables=(), kind="utility",
                 sqlstate="23505" if i == 7 else "02000" if i == 8 else None)
        assert tracing.force_flush(10)
        spans = otlp_receiver.wait_for(lambda spans: len(spans) == 50)
    finally:
        tracing.shutdown()
    assert len({s["trace_id"] for s in spans}) == 50  # each a root span of its own trace
    assert all(s["parent_span_id"] == "" and s["name"] == "UTILITY" for s in spans)
    assert all("db.collection.name" not in s["attributes"] for s in spans)
    by_rows = {s["attributes"]["db.response.returned_rows"]: s for s in spans}
    assert by_rows[7]["status_code"] == "ERROR" and by_rows[7]["attributes"]["db.response.status_code"] == "23505"
    assert by_rows[8]["status_code"] == "UNSET"  # 02000 no data is not an error
    assert spans[0]["resource"]["service.name"] == "shop-db"
    assert tracing.describe()["exported"] == 50 and tracing.describe()["sampled_out"] == 0


def test_partial_ratio_samples_about_that_share(otlp_receiver):
    tracing = make(otlp_receiver, sample_ratio=0.25)
    try:
        picked = sum(1 for _ in range(20_000) if tracing.sample(None))
    finally:
        tracing.shutdown()
    assert 4_400 < picked < 5_600
    assert tracing.describe()["sampled_out"] == 20_000 - picked


def test_unreachable_collector_never_raises():
    dead = free_port()
    tracing = Tracing(section(endpoint=f"http://127.0.0.1:{dead}", sample_ratio=1.0, export_timeout="1s"))
    try:
        for _ in range(3):
            emit(tracing, tracing.sample(None))
        tracing.force_flush(5)
    finally:
        tracing.shutdown()
    d = tracing.describe()
    assert d["spans"] == 3 and d["exported"] == 0 and d["export_failures"] == 3


def test_full_queue_drops_and_counts(otlp_receiver):
    tracing = make(otlp_receiver, max_queue_size=4)
    try:
        for _ in range(200):
            emit(tracing, True)
        assert tracing.force_flush(10)
    finally:
        tracing.shutdown()
    d = tracing.describe()
    assert d["spans"] == 200 and d["dropped"] > 0
    # dropped is read off the queue's length just before a span is queued, racing the export thread's
    # pops: exact but for a few
    assert abs(d["exported"] + d["dropped"] - 200) <= 10
    assert len(otlp_receiver.spans()) == d["exported"]


def test_receiver_accepts_gzip(otlp_receiver):
    import gzip
    import urllib.request

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.name, span.trace_id, span.span_id = "gz", bytes(range(16)), bytes(range(8))
    req = urllib.request.Request(otlp_receiver.url, data=gzip.compress(request.SerializeToString()),
                                 headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as reply:
        assert reply.status == 200
    [got] = otlp_receiver.spans()
    assert got["name"] == "gz" and got["trace_id"] == bytes(range(16)).hex() and got["parent_span_id"] == ""


def _reference_span(sampled, trace_id: int, span_id: int, offset: int, *, start, end, fingerprint, normalized, kind,
                    tables, database, user, application_name, rules, cache, queue_seconds, rows, sqlstate,
                    tags) -> bytes:
    """A statement's span as Tracing encoded it before it kept the parts spans share: every attribute in
    a dict, through otlp.span()."""
    operation = kind.upper()
    first = min(tables) if tables else None
    attributes = {"db.system.name": "postgresql", "db.namespace": database, "db.operation.name": operation,
                  "db.query.text": normalized[:8192], "db.response.returned_rows": rows, "db.user": user,
                  "pgfront.fingerprint": fingerprint, "pgfront.upstream_seconds": max(0.0, end - start - queue_seconds)}
    if application_name:
        attributes["pgfront.application_name"] = application_name
    if first is not None:
        attributes["db.collection.name"] = first
    if sqlstate:
        attributes["db.response.status_code"] = sqlstate
    if rules:
        attributes["pgfront.rules"] = [f"{n}:{a}:observe" if o else f"{n}:{a}" for n, a, o in rules]
    if cache:
        attributes["pgfront.cache"] = cache
    if queue_seconds > 0:
        attributes["pgfront.queue_seconds"] = queue_seconds
    for key, value in (tags or {}).items():
        if key not in ("traceparent", "tracestate"):
            attributes["pgfront.tag." + key] = value
    if sampled is True:
        parent_id, state = None, ""
    else:
        trace_id, parent_id = sampled.trace_id, sampled.span_id
        state = sampled.trace_state.to_header() if sampled.trace_state else ""
    error = f"SQLSTATE {sqlstate}" if sqlstate is not None and not sqlstate.startswith(("00", "01", "02")) else None
    return otlp.span(trace_id, span_id, parent_id, sampled is not True, state,
                     f"{operation} {first}" if first else operation, otlp.SERVER, int(start * 1e9) + offset,
                     int(end * 1e9) + offset, attributes, error)


def test_spans_encode_to_the_same_bytes_as_the_generic_encoder(monkeypatch):
    monkeypatch.setattr(tracing_module, "_SHAPE_BYTES", 30_000)  # the kept shapes are dropped now and then
    tracing = Tracing(section(endpoint=f"http://127.0.0.1:{free_port()}", sample_ratio=1.0))
    sent: list[bytes] = []
    tracing._emit = sent.append
    rng = random.Random(17)
    state = TraceState([("vendor", "x1")])
    try:
        for _ in range(3000):
            sampled = rng.choice([True, SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, True,
                                                    TraceFlags(1), rng.choice([None, state]))])
            start = rng.random() * 1000
            args = dict(start=start, end=start + rng.random() / 100, fingerprint=rng.choice(["f1", "0123456789abcdef"]),
                        normalized=rng.choice(["SELECT 1", "x" * 9000, "SELECT '\u00e9\udc80'"]),
                        kind=rng.choice(["select", "utility"]),
                        tables=rng.choice([(), frozenset({"a", "b"}), ("t",), ["l", "k"]]),
                        database=rng.choice(["app", "d"]), user=rng.choice(["u", ""]),
                        application_name=rng.choice(["", "psql"]),
                        rules=rng.choice([(), (("r", "log", False), ("n", "block", True))]),
                        cache=rng.choice([None, "hit", "miss", ""]), queue_seconds=rng.choice([0.0, 0.002]),
                        rows=rng.choice([0, 1, 127, 128, 10**6, 2**40]),
                        sqlstate=rng.choice([None, "", "00000", "23505", "02000"]),
                        tags=rng.choice([None, {}, {"a": "b", "traceparent": "x"}, {"tracestate": "z"}]))
            tracing._encode(sampled, **args)
            got = sent.pop()
            span = got[2 if got[1] < 0x80 else 3:]  # the span's random ids, read back: trace_id, span_id
            ids = int.from_bytes(span[2:18], "big"), int.from_bytes(span[20:28], "big")
            assert span[:2] == b"\x0a\x10" and span[18:20] == b"\x12\x08" and all(ids)
            expected = _reference_span(sampled, *ids, tracing._epoch_offset_ns, **args)
            assert got == otlp.scope_span(expected)
            assert otlp.request([expected], b"", b"").endswith(otlp.scope_span(expected))
    finally:
        tracing.shutdown()
    assert 0 < len(tracing._shapes) < 100


# ---- cost (printed, not asserted: run with -s to see it) ----

def test_hot_path_cost(otlp_receiver):
    tracing = make(otlp_receiver, sample_ratio=0.0)
    try:
        n = 200_000
        sample = min(timeit.repeat(lambda: tracing.sample(None), number=n, repeat=5)) / n
        plain = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213"
        split_plain = min(timeit.repeat(lambda: split_comment(plain), number=n, repeat=5)) / n
        tagged = f"{plain} /*{DJANGO}*/"
        split_tagged = min(timeit.repeat(lambda: split_comment(tagged), number=20_000, repeat=5)) / 20_000
        rails = f"{plain} /*application='Shop',controller='carts',action='show'*/"
        split_rails = min(timeit.repeat(lambda: split_comment(rails), number=n, repeat=5)) / n
        body = split_comment(tagged)[1]
        # a fresh copy each call, as from a new statement (the same object is found by identity)
        copies = itertools.cycle([("x" + body)[1:] for _ in range(100)])
        tags_tp = min(timeit.repeat(lambda: parse_tags(next(copies)), number=20_000, repeat=5)) / 20_000
        tags_tp -= min(timeit.repeat(lambda: next(copies), number=20_000, repeat=5)) / 20_000
        stable = "controller='index',framework='django%3A2.2.1',route='%5Epolls/%24'"
        tags_hit = min(timeit.repeat(lambda: parse_tags(stable), number=n, repeat=5)) / n
        baseline = min(timeit.repeat(lambda: None, number=n, repeat=5)) / n  # the lambda call itself
        tracing1 = make(otlp_receiver, sample_ratio=1.0)
        try:
            m = 2_000
            now = time.perf_counter()
            t0 = time.perf_counter()
            for _ in range(m):
                tracing1.statement(True, start=now, end=now + 0.001, fingerprint="f", normalized=plain,
                                   kind="select", tables=("pgbench_accounts",), database="app", user="u",
                                   application_name="a", rules=(), cache=None, queue_seconds=0.0, rows=1,
                                   sqlstate=None, tags=None)
            span_cost = (time.perf_counter() - t0) / m
        finally:
            tracing1.shutdown()
    finally:
        tracing.shutdown()
    print(f"\nsample(None), unsampled: {(sample - baseline) * 1e9:.0f} ns (+{baseline * 1e9:.0f} ns call overhead)"
          f"\nsplit_comment, no comment: {(split_plain - baseline) * 1e9:.0f} ns"
          f"\nsplit_comment, Django comment with traceparent: {(split_tagged - baseline) * 1e9:.0f} ns"
          f"\nsplit_comment, Rails comment (no traceparent): {(split_rails - baseline) * 1e9:.0f} ns"
          f"\nparse_tags, Django body with traceparent, not from split_comment: {tags_tp * 1e9:.0f} ns"
          f"\nparse_tags, cached body: {(tags_hit - baseline) * 1e9:.0f} ns"
          f"\nstatement(), one sampled span: {span_cost * 1e6:.1f} us")
