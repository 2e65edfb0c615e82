"""Parse trees and tokens of one SQL text, for rewrites that splice the original text.

Rewrites edit the client's text at positions the parser reports instead of deparsing a tree, so
comments (sqlcommenter tags, hints), formatting and everything pgfront does not touch survive.
The JSON form of libpg_query's tree is used because it carries every node's location.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import parser

COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})
OPEN, CLOSE, SEMI = "ASCII_40", "ASCII_41", "ASCII_59"


@dataclass(frozen=True, slots=True)
class Tok:
    start: int
    end: int  # exclusive
    name: str


@dataclass(frozen=True, slots=True)
class Tree:
    text: str
    stmts: tuple[dict[str, Any], ...]  # RawStmt bodies: {"stmt": {...}, "stmt_location": .., "stmt_len": ..}
    tokens: tuple[Tok, ...]  # comments included
    starts: tuple[int, ...]  # token start offsets, for bisect

    def pos(self, location: int) -> int:
        """Character offset of a parse-tree location (libpg_query counts UTF-8 bytes)."""
        if location <= 0 or self.text.isascii():
            return location
        return len(self.text.encode()[:location].decode("utf-8", errors="ignore"))

    def token_index(self, pos: int) -> int:
        """Index of the token that starts at pos (or the first one after it)."""
        return bisect.bisect_left(self.starts, pos)

    def segment(self, i: int) -> tuple[int, int]:
        """Character span of statement i (without its semicolon)."""
        raw = self.stmts[i]
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        return self.pos(start), (self.pos(start + length) if length else len(self.text))


MAX_CACHED_TEXT = 64 * 1024  # a bulk INSERT is parsed again rather than held


def parse(text: str) -> Tree | None:
    """The tree of text, or None when libpg_query cannot parse it."""
    return _parse_cached(text) if len(text) <= MAX_CACHED_TEXT else _parse(text)


def _parse(text: str) -> Tree | None:
    try:
        stmts = json.loads(parser.parse_sql_json(text))["stmts"]
        raw_tokens = parser.scan(text)
    except (parser.ParseError, ValueError):
        return None
    # pglast reports character offsets of the str, with inclusive ends.
    tokens = tuple(Tok(t.start, t.end + 1, t.name) for t in raw_tokens)
    return Tree(text, tuple(stmts), tokens, tuple(t.start for t in tokens))


_parse_cached = lru_cache(maxsize=1024)(_parse)


def node(n: Any) -> tuple[str, dict[str, Any]] | tuple[None, None]:
    """Split a wrapped node {"SelectStmt": {...}} into its type name and body."""
    if isinstance(n, dict) and len(n) == 1:
        ((kind, body),) = n.items()
        if isinstance(body, dict) and kind[:1].isupper():
            return kind, body
    return None, None


def walk(n: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every node under n (n included), depth first.

    Fields typed as one node kind are not wrapped in the JSON (InsertStmt.relation is a bare
    {"relname": ...}); those RangeVars are recognised by their keys.
    """
    stack = [n]
    while stack:
        cur = stack.pop()
        if isinstance(cur, list):
            stack.extend(reversed(cur))
            continue
        if not isinstance(cur, dict):
            continue
        kind, body = node(cur)
        if kind is not None:
            yield kind, body
            stack.extend(reversed(list(body.values())))
        else:
            if "relname" in cur and "relpersistence" in cur:
                yield "RangeVar", cur
            stack.extend(reversed(list(cur.values())))


def literal_span(tree: Tree, location: int) -> tuple[int, int]:
    """Span of the constant at parse location: one token, or a sign and a number."""
    i = tree.token_index(tree.pos(location))
    tok = tree.tokens[i]
    if tok.name in ("ASCII_45", "ASCII_43") and i + 1 < len(tree.tokens):  # -5, +5
        return tok.start, tree.tokens[i + 1].end
    return tok.start, tok.end


def name_span(tree: Tree, location: int, parts: int) -> tuple[int, int]:
    """Span of a dotted name of `parts` identifiers at parse location (a.b.c)."""
    i = tree.token_index(tree.pos(location))
    last = min(i + 2 * (parts - 1), len(tree.tokens) - 1)
    return tree.tokens[i].start, tree.tokens[last].end


def splice(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Apply non-overlapping (start, end, replacement) edits."""
    out = []
    pos = 0
    for start, end, repl in sorted(edits):
        out.append(text[pos:start])
        out.append(repl)
        pos = end
    out.append(text[pos:])
    return "".join(out)
