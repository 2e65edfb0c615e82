"""Query fingerprints, normalized text and the literal constants behind the normalized $n.

libpg_query does the hard part: `fingerprint` ignores constant values and IN-list lengths (so literal and
$n forms of a statement share one fingerprint), `normalize` replaces constants by $n. libpg_query numbers
the new $n in parse-tree order (LIMIT 10 OFFSET 5 -> LIMIT $2 OFFSET $1); we renumber them in text order,
as pg_stat_statements does, so the k-th item of constants() is always the k-th new placeholder.
"""

from __future__ import annotations

import hashlib
import itertools
import re

from pglast import parser

# Also matches $n inside identifiers or comments; replaced_spans tells those apart.
_PLACEHOLDER = re.compile(r"\$(\d+)")
_COUNTING = [str(n) for n in range(1, 1001)]

# (normalized start, normalized end, original start, original end) of one replaced constant
Span = tuple[int, int, int, int]


def fallback_fingerprint(text: str) -> str:
    """For text the parser rejects: a hash of the text with its whitespace collapsed."""
    data = " ".join(text.split()).encode("utf-8", "surrogatepass")  # lone surrogates must not raise
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def normalize(text: str, max_param: int) -> str:
    """Constants replaced by $n (n after the highest existing parameter), numbered in text order."""
    normalized = parser.normalize(text)
    if _in_text_order(_PLACEHOLDER.findall(normalized), max_param):
        return normalized  # the common case
    if not any(int(n) > max_param for n in _PLACEHOLDER.findall(text)):
        # every $n above max_param is a new placeholder (none came from comments or names): renumber them
        numbers = itertools.count(max_param + 1)
        return _PLACEHOLDER.sub(lambda m: f"${next(numbers)}" if int(m[1]) > max_param else m[0], normalized)
    spans = replaced_spans(text, normalized)
    if spans is None:
        return normalized
    out: list[str] = []
    pos = 0
    for number, (start, end, _, _) in enumerate(spans, max_param + 1):
        out.append(normalized[pos:start])
        out.append(f"${number}")
        pos = end
    out.append(normalized[pos:])
    return "".join(out)


def _in_text_order(numbers: list[str], max_param: int) -> bool:
    if max_param == 0:
        return numbers == _COUNTING[:len(numbers)]
    new = [n for n in map(int, numbers) if n > max_param]
    return new == list(range(max_param + 1, max_param + 1 + len(new)))


def replaced_spans(text: str, normalized: str) -> list[Span] | None:
    """Align normalized text with the original: where each placeholder replaced which constant.

    Outside constants normalize copies the text verbatim, so walking both in step only needs each
    constant's length, which the scanner gives (a negative number is '-' plus the number token, as
    libpg_query measures it). None if the two cannot be aligned.
    """
    try:
        tokens = parser.scan(text)  # offsets in characters, end inclusive
    except (parser.Error, UnicodeError):
        return None
    token_index = {tok.start: i for i, tok in enumerate(tokens)}
    spans: list[Span] = []
    delta = 0  # original offset - normalized offset
    for m in _PLACEHOLDER.finditer(normalized):
        start = m.start() + delta
        if text.startswith(m.group(0), start):
            continue  # a parameter or comment text copied verbatim, not a replaced constant
        i = token_index.get(start)
        if i is None:
            return None
        end = tokens[i].end + 1
        if tokens[i].name == "ASCII_45" and i + 1 < len(tokens):  # '-' 5
            end = tokens[i + 1].end + 1
        spans.append((m.start(), m.end(), start, end))
        delta += (end - start) - (m.end() - m.start())
    tail = spans[-1][1] if spans else 0
    if normalized[tail:] != text[tail + delta:]:
        return None
    return spans
