"""analyze(text) -> StatementInfo, computed once per distinct text and kept in a bounded LRU.

A new simple statement costs roughly 10-20 us (libpg_query fingerprint, normalize and JSON parse, one
walk of the tree); a text seen before costs one dict look-up. analyze never raises: text the parser
rejects gets parsed=False, kind "unknown" and a fingerprint hashed from its whitespace-collapsed text.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from pglast import parser

from proxy.sql.facts import statement_facts
from proxy.sql.fingerprint import fallback_fingerprint, normalize, replaced_spans
from proxy.sql.info import StatementInfo
from proxy.sql.vocabulary import KIND_PRIORITY

try:  # orjson decodes the parse tree about 2.5x faster; the standard library works too
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - depends on the environment
    from json import loads as _json_loads

MAX_ENTRIES = 10_000
MAX_CACHED_CHARS = 32 * 1024 * 1024  # text + normalized text held by the cache, all entries together

_cache: OrderedDict[str, StatementInfo] = OrderedDict()
_cached_chars = 0
_lock = threading.Lock()


def analyze(text: str) -> StatementInfo:
    """Facts about one SQL text (one statement or several separated by ';')."""
    info = _cache.get(text)
    if info is not None:
        try:
            _cache.move_to_end(text)
        except KeyError:  # evicted by another thread in between: still a valid answer
            pass
        return info
    info = _analyze_uncached(text)
    _remember(text, info)
    return info


def clear_cache() -> None:
    global _cached_chars
    with _lock:
        _cache.clear()
        _cached_chars = 0


def cache_size() -> int:
    return len(_cache)


def _remember(text: str, info: StatementInfo) -> None:
    global _cached_chars
    size = len(text) + len(info.normalized)
    if size > MAX_CACHED_CHARS // 8:
        return  # a huge one-off (bulk INSERT): analysing it again is cheaper than holding it
    with _lock:  # only the miss path takes it (the advisor and slow log may analyse from threads)
        if text in _cache:
            return
        _cache[text] = info
        _cached_chars += size
        while len(_cache) > MAX_ENTRIES or _cached_chars > MAX_CACHED_CHARS:
            old_text, old = _cache.popitem(last=False)
            _cached_chars -= len(old_text) + len(old.normalized)


def _unparsed(text: str, error: str) -> StatementInfo:
    return StatementInfo(
        text=text, fingerprint=fallback_fingerprint(text), normalized=" ".join(text.split()),
        parsed=False, kind="unknown", error=error,
    )


def _analyze_uncached(text: str) -> StatementInfo:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            # bytes that are not UTF-8 arrive as lone surrogates (surrogateescape), which the parser
            # cannot take: analyse the text with each one as "?" (one byte for one, so the parser's
            # byte offsets still hold). A literal's bytes never change its shape; the server judges
            # the real bytes.
            return dataclasses.replace(_analyze_uncached(text.encode("utf-8", "replace").decode()), text=text)
    try:
        stmts = _json_loads(parser.parse_sql_json(text)).get("stmts", [])
        if not stmts:
            return StatementInfo(text=text, fingerprint=parser.fingerprint(text), normalized=text,
                                 parsed=True, kind="empty")
        if len(stmts) > 1:
            return _analyze_many(text, stmts)
        facts = statement_facts(stmts[0]["stmt"])
        # like pg_stat_statements, label the statement without its trailing semicolon
        label = normalize(text, facts["max_param"]).rstrip().rstrip(";").rstrip()
        return StatementInfo(text=text, fingerprint=parser.fingerprint(text), normalized=label, parsed=True,
                             **facts)
    except Exception as e:  # a parse error, or a tree shape we do not know: never fail the query
        return _unparsed(text, str(e) or type(e).__name__)


def _statement_texts(text: str, stmts: list[dict[str, Any]]) -> Iterator[str]:
    """Each statement's own text. The parser's locations count bytes, not characters."""
    raw: str | bytes = text if text.isascii() else text.encode()
    for stmt in stmts:
        start = stmt.get("stmt_location", 0)
        length = stmt.get("stmt_len", 0)  # 0: up to the end of the text
        piece = raw[start:start + length] if length else raw[start:]
        yield (piece if isinstance(piece, str) else piece.decode()).strip()


def _any(parts: tuple[StatementInfo, ...], field: str) -> bool:
    return any(getattr(p, field) for p in parts)


def _union(parts: tuple[StatementInfo, ...], field: str) -> frozenset[str]:
    return frozenset().union(*(getattr(p, field) for p in parts))


def _analyze_many(text: str, stmts: list[dict[str, Any]]) -> StatementInfo:
    """A multi-statement string: facts of each statement, and their union at the top."""
    parts = tuple(analyze(piece) for piece in _statement_texts(text, stmts))
    max_param = max(p.max_param for p in parts)
    return StatementInfo(
        text=text,
        fingerprint=parser.fingerprint(text),
        normalized=normalize(text, max_param),
        parsed=all(p.parsed for p in parts),
        kind=min((p.kind for p in parts), key=KIND_PRIORITY.index),
        statements=parts,
        tables_read=_union(parts, "tables_read"),
        tables_written=_union(parts, "tables_written"),
        functions=_union(parts, "functions"),
        volatile=_any(parts, "volatile"),
        locking=_any(parts, "locking"),
        is_copy_from=_any(parts, "is_copy_from"),
        temp_objects=_any(parts, "temp_objects"),
        catalog=_any(parts, "catalog"),
        max_param=max_param,
    )


_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})


def split_statements(text: str) -> list[str]:
    """The statements of a simple-query string, each stripped; empty and comment-only ones dropped."""
    if analyze(text).parsed:
        return list(_statement_texts(text, _json_loads(parser.parse_sql_json(text)).get("stmts", [])))
    try:  # unparsable: the scanner still knows which ';' are outside quotes and comments
        tokens = parser.scan(text)
    except (parser.Error, UnicodeError):  # surrogates: bytes that were not UTF-8
        return [text.strip()] if text.strip() else []
    pieces: list[str] = []
    start = 0
    has_code = False
    for tok in tokens:
        if tok.name == "ASCII_59":
            if has_code:
                pieces.append(text[start:tok.start].strip())
            start, has_code = tok.end + 1, False
        elif tok.name not in _COMMENTS:
            has_code = True
    if has_code:
        pieces.append(text[start:].strip())
    return pieces


def constants(text: str) -> list[tuple[int, int, str]]:
    """(start, end, literal as written) of each constant that `normalized` replaced, in text order.

    Offsets are character offsets into text. The k-th item became placeholder $(max_param + k).
    """
    info = analyze(text)
    if not info.parsed:
        return []
    spans = replaced_spans(text, info.normalized)
    return [(start, end, text[start:end]) for _, _, start, end in spans or ()]
