# cython: boundscheck=False, wraparound=False
# (compiled: every index in this module is checked against the length by the code itself, and none
# is negative; see _scan_key)
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
from proxy.sql.sqlcommenter import split_comment

try:
    import cython

    _COMPILED = cython.compiled
except ImportError:  # Cython is a build requirement only
    _COMPILED = False

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


def _regex_key(sql: str) -> str:
    if "'" in sql or '"' in sql or "$" in sql or "-" in sql or "/*" in sql:
        return _STRIP.sub(_keep_or_blank, sql)
    return _NUMBERS.sub("?", sql)


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _at(one: str, wide: None, i: int) -> str:
    """The code point at i: compiled, from the text's ASCII bytes (`one`) or else its UTF-32 copy
    (`wide`); interpreted, from the str itself (`one`)."""
    if cython.compiled and not one:
        return wide[i]
    return one[i]


def _closing(one: str, wide: None, n: int, j: int, quote: str, escapes: bool) -> int:
    """Where a quoted run that opened just before `j` ends (after its closing quote), as the regex's
    `quote(?:[^quote]|quote quote)*quote` finds it (with `|\\.` for string constants: `escapes`);
    -1 when it does not close. Unterminated, the regex backtracks to the last doubled quote and
    closes there. The text's `n` code points are read with `_at`."""
    last_pair = -1
    while j < n:
        d = _at(one, wide, j)
        if d == quote:
            if j + 1 < n and _at(one, wide, j + 1) == quote:
                last_pair = j
                j += 2
                continue
            return j + 1
        if escapes and d == "\\":
            if j + 1 >= n:
                break
            j += 2
            continue
        j += 1
    return last_pair + 1 if last_pair >= 0 else -1


def _scan_key(sql: str) -> str:
    """The same key as the regexes, in one pass over the code points: what the compiled core runs.
    Compiled (shapes.pxd), the code points are read in C from a copy of the text's bytes and every
    test below is a C comparison; interpreted (tests only: that core keys with the regexes), the same
    loop reads the str itself. Each position tries what the regex tries, in its order: a quoted
    identifier, $n, a comment (kept), a string constant, a number (each becomes '?')."""
    n = len(sql)
    if cython.compiled:  # a constant: Cython compiles this branch only, the interpreter runs the other
        if sql.isascii():  # the common case: a copy of its bytes (the codec's fast path)
            codes = sql.encode("ascii")
            one = codes
            wide = cython.NULL
        else:  # a lone surrogate (from non-UTF-8 input) stays one code point
            codes = sql.encode("utf-32-le", "surrogatepass")
            buf = codes
            one = cython.NULL
            wide = cython.cast(cython.pointer(cython.Py_UCS4), buf)
    else:
        one, wide = sql, None
    parts = []
    start = 0  # the verbatim run not yet copied
    i = 0
    prev = " "  # the code point before i
    while i < n:
        c = _at(one, wide, i)
        end = -1  # end of a constant found at i (replaced by '?')
        skip = -1  # end of something kept verbatim found at i
        if c == '"':
            skip = _closing(one, wide, n, i + 1, '"', False)
        elif c == "$":
            j = i + 1
            while j < n and _at(one, wide, j).isdecimal():
                j += 1
            if j > i + 1:
                skip = j
        elif c == "-":
            if i + 1 < n and _at(one, wide, i + 1) == "-":
                j = i + 2
                while j < n and _at(one, wide, j) != "\n":
                    j += 1
                skip = j
        elif c == "/":
            if i + 1 < n and _at(one, wide, i + 1) == "*":
                j = sql.find("*/", i + 2)
                if j >= 0:
                    skip = j + 2
        if skip < 0:
            q = -1  # where a string constant's opening quote is
            if c == "'":
                q = i
            elif c in "eEbBxXuU" and i + 1 < n and _at(one, wide, i + 1) == "'":
                q = i + 1
            if q >= 0:
                end = _closing(one, wide, n, q + 1, "'", True)
            elif "0" <= c <= "9" and (i == 0 or not (_word(prev) or prev == "$")):
                j = i + 1
                while j < n and "0" <= _at(one, wide, j) <= "9":
                    j += 1
                if j < n and _at(one, wide, j) == ".":
                    j += 1
                    while j < n and "0" <= _at(one, wide, j) <= "9":
                        j += 1
                if j < n and (_at(one, wide, j) == "e" or _at(one, wide, j) == "E"):
                    k = j + 1
                    if k < n and (_at(one, wide, k) == "+" or _at(one, wide, k) == "-"):
                        k += 1
                    if k < n and "0" <= _at(one, wide, k) <= "9":
                        while k < n and "0" <= _at(one, wide, k) <= "9":
                            k += 1
                        j = k
                end = j
        if end >= 0:
            parts.append(sql[start:i])
            parts.append("?")
            start = i = end
        elif skip >= 0:
            i = skip
        else:
            i += 1
            prev = c
            continue
        prev = _at(one, wide, i - 1) if i > 0 else " "
    if start == 0:
        return sql
    parts.append(sql[start:])
    return "".join(parts)


# compiled, the scan is a C loop; interpreted, the regexes are the faster of the two (same answer)
shape_key = _scan_key if _COMPILED else _regex_key


def commented(sql: str) -> bool:
    """Whether sql ends as a sqlcommenter comment does ("*/", or "*/;"): the test in C before the
    comment is looked at (`proxy.sql.sqlcommenter.split_comment`), on every statement."""
    n = len(sql)
    if n and sql[n - 1] == ";":
        n -= 1
    return n >= 2 and sql[n - 1] == "/" and sql[n - 2] == "*"


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
        if commented(sql):
            # a sqlcommenter comment (tags, a per-request traceparent) is not part of the statement: the
            # shape is the text's without it, or every traced request would be a new shape to parse
            text, comment = split_comment(sql)
            if comment is not None:
                return self.get(text)
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
