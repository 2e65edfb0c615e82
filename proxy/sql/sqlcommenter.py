"""sqlcommenter comments: the `/*key='value',...*/` tags that ORMs append to a statement.

Format (https://google.github.io/sqlcommenter/spec/, also emitted by Rails' query logs and the Django,
Flask, Spring, Knex and OpenTelemetry middlewares): one block comment at the very end of the statement,
holding comma-separated `key='value'` pairs, keys and values URL-encoded, then meta-escaped (`'` as
`\\'`), values in single quotes. A `traceparent` tag carries the W3C trace context of the client's
request, so a span made here can be a child of the application's span.

Every statement goes through split_comment(), so its common case (no trailing comment) is a couple of
string slices; the parsing costs are paid only by statements that end with a comment, and parse_tags()
memoizes the stable part of the tags (controller, route...) since an application repeats them.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# key='value' pairs. Keys and values are URL-encoded, so the common body holds no backslash and is
# checked by the plain pattern; meta-escapes (\' and \\) send it to the slower escaped one. Keys cannot
# hold spaces, quotes, commas, '=' or comment markers. Spaces are tolerated around commas only.
_KEY = r"[^\s=,'\\*/]"
_SEP = r" *, *"
_PLAIN_PAIR = rf"{_KEY}+='[^'\\]*'"
_PLAIN = re.compile(rf"{_PLAIN_PAIR}(?:{_SEP}{_PLAIN_PAIR})*")
_PLAIN_PAIRS = re.compile(rf"({_KEY}+)='([^'\\]*)'")
_ESC_KEY = rf"(?:{_KEY}|\\.)+"
_ESC_VALUE = r"'[^'\\]*(?:\\.[^'\\]*)*'"  # the unrolled loop: an alternation per character is 4x slower
_ESCAPED = re.compile(rf"{_ESC_KEY}={_ESC_VALUE}(?:{_SEP}{_ESC_KEY}={_ESC_VALUE})*", re.S)
_ESCAPED_PAIRS = re.compile(rf"({_ESC_KEY})=({_ESC_VALUE})", re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)

_TRAILING = frozenset(" \t\r\n;")
_TRACE_KEYS = ("traceparent", "tracestate")

_CACHE_SIZE = 4096
_cache: dict[str, dict[str, str]] = {}


def split_comment(sql: str) -> tuple[str, str | None]:
    """(statement without its trailing sqlcommenter comment, the comment's body), else (sql, None).

    Trailing whitespace and at most one ';' after the comment are allowed (and dropped with it). Only a
    comment whose body fully parses as sqlcommenter pairs counts: any other comment, or a `*/` that is
    not the end of such a comment, leaves the statement untouched. The body is parsed here already, so
    parse_tags(body) right after is a lookup.
    """
    last = sql[-1:]
    if last != "/":
        if last not in _TRAILING:
            return sql, None  # the common case: two slices and two comparisons
        end = sql.rstrip()
        if end[-1:] == ";":
            end = end[:-1].rstrip()
        if end[-2:] != "*/":
            return sql, None
    elif sql[-2:] == "*/":
        end = sql
    else:
        return sql, None
    # PostgreSQL nests block comments and ends one at the first "*/": the comment is the text after the
    # last "/*", and it holds no "*/" of its own (a tag value with "/*" or "*/" breaks the statement)
    start = end.rfind("/*", 0, len(end) - 2)
    if start < 0:
        return sql, None
    body = end[start + 2 : -2].strip()
    if "*/" in body or not parse_tags(body):
        return sql, None
    return end[:start].rstrip(), body


def _decode(text: str) -> str:
    return unquote(text) if "%" in text else text


def _unescape(text: str) -> str:
    return _decode(_ESCAPE.sub(r"\1", text) if "\\" in text else text)


def _parse(body: str) -> dict[str, str]:
    # on a body that matched the whole-body pattern, findall() yields exactly its pairs: a separator
    # cannot start a key, and a value cannot hold an unescaped quote
    if "\\" not in body:
        if _PLAIN.fullmatch(body) is None:
            return {}
        return {_decode(k): _decode(v) for k, v in _PLAIN_PAIRS.findall(body)}
    if _ESCAPED.fullmatch(body) is None:
        return {}
    return {_unescape(k): _unescape(v[1:-1]) for k, v in _ESCAPED_PAIRS.findall(body)}


def _parse_tail(tail: str) -> dict[str, str]:
    """`traceparent='...'` and whatever follows it; alone (the usual case) it needs no regex."""
    if tail[12:13] == "'" and tail[-1:] == "'" and tail.count("'") == 2 and "\\" not in tail:
        return {"traceparent": _decode(tail[13:-1])}
    return _parse(tail)


_last: tuple[str, dict[str, str]] = ("", {})  # split_comment() parses; the caller's parse_tags() finds it here


def parse_tags(body: str) -> dict[str, str]:
    """The tags of a comment body from split_comment(), URL-decoded ({} if it does not parse).

    The returned dict may be shared with later calls: do not modify it. A traceparent makes nearly every
    body unique, so only the part before it is memoized (sqlcommenter sorts keys: traceparent and
    tracestate come after application, controller, framework, route...), in a bounded cache.
    """
    global _last
    last = _last
    if last[0] is body:
        return last[1]
    tags = _cache.get(body)
    if tags is not None:
        return tags
    cut = body.find("traceparent=")
    if cut < 0:
        tags = _parse(body)
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]  # oldest first: dicts keep insertion order
        _cache[body] = tags
        return tags
    tags = {}
    if cut > 0 and body[cut - 1] in ", ":
        head_text = body[:cut].rstrip(" ,")
        head = parse_tags(head_text) if body.count(",", len(head_text), cut) == 1 else None
        if head:
            tail = _parse_tail(body[cut:])
            if tail:
                tags = {**head, **tail}
    if not tags:  # traceparent first, or a split that did not parse on both sides: the body as a whole
        tags = _parse(body)
    _last = (body, tags)  # unique bodies are not cached, but the relay asks again right after split_comment
    return tags


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)


def traceparent(tags: dict[str, str] | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) from a W3C traceparent tag, None when absent or invalid.

    Version ff is invalid, version 00 has exactly four fields, later versions may add fields after the
    fourth (ignored), as the W3C Trace Context spec says; all-zero ids are invalid.
    """
    if not tags:
        return None
    value = tags.get("traceparent")
    if value is None:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def tags_text(tags: dict[str, str] | None) -> str:
    """`key=value key2=value2`, keys sorted, trace context left out: the tags column of SHOW QUERIES."""
    if not tags:
        return ""
    return " ".join(f"{k}={v}" for k, v in sorted(tags.items()) if k not in _TRACE_KEYS)
