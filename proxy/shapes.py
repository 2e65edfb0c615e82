"""Per-execution statement look-up: text -> shape (fingerprint, normalized text, facts) in ~2 us.

Apps that inline literals send a new text for every execution, so caching the parser's answer by
text alone would parse every query. A shape key strips literals with one regex (string and numeric
constants become '?', quoted identifiers, $n parameters and comments are kept verbatim), and the
parser runs once per shape key. Two texts with the same key differ only in constant values, so they
share fingerprint, normalized text, kind and tables. Facts that depend on the values themselves
(LIMIT/OFFSET numbers, SET values) must come from `proxy.sql.analyze(text)`, which callers use
only when a rule may act on the statement.
"""

from __future__ import annotations

import re

from proxy.sql import StatementInfo, analyze

# group 1 keeps what must stay verbatim; everything else matched is a constant
_STRIP = re.compile(
    r"""("(?:[^"]|"")*"|\$\d+|--[^\n]*|/\*.*?\*/)"""
    r"""|[eEbBxXuU]?'(?:[^'\\]|''|\\.)*'"""
    r"""|[0-9](?<![\w$][0-9])[0-9]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?""",
    re.S,
)


# the common case (no quotes, $n or comments) needs neither the verbatim branch nor a Python callback.
# A number starts with a digit not preceded by a word character or $ (t1, $1 are not numbers); testing
# the digit first lets the regex engine skip every other position at once (twice as fast as a
# look-behind first). Only ASCII digits make SQL numbers.
_NUMBERS = re.compile(r"[0-9](?<![\w$][0-9])[0-9]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")


def _keep_or_blank(m: re.Match) -> str:
    g = m.group(1)
    return g if g is not None else "?"


def shape_key(sql: str) -> str:
    if "'" in sql or '"' in sql or "$" in sql or "-" in sql or "/*" in sql:
        return _STRIP.sub(_keep_or_blank, sql)
    return _NUMBERS.sub("?", sql)


class ShapeCache:
    """Bounded map from statement text (and from its shape key) to the analysed StatementInfo."""

    __slots__ = ("_by_text", "_by_key", "max_entries", "misses")

    def __init__(self, max_entries: int = 20_000) -> None:
        self._by_text: dict[str, StatementInfo] = {}
        self._by_key: dict[str, StatementInfo] = {}
        self.max_entries = max_entries
        self.misses = 0

    def get(self, sql: str) -> StatementInfo:
        info = self._by_text.get(sql)
        if info is not None:
            return info
        key = shape_key(sql)
        info = self._by_key.get(key)
        if info is None:
            self.misses += 1
            info = analyze(sql)
            self._store(self._by_key, key, info)
        if key == sql:  # no literals: the text itself is the shape, remember it directly
            self._store(self._by_text, sql, info)
        return info

    def _store(self, d: dict[str, StatementInfo], k: str, v: StatementInfo) -> None:
        if len(d) >= self.max_entries:
            # drop the oldest half: dicts keep insertion order, so this is FIFO, cheap and bounded
            for old in list(d)[: self.max_entries // 2]:
                del d[old]
        d[k] = v
