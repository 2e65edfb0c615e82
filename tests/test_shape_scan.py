"""The shape key's one-pass scan (what the compiled core runs) gives exactly the regexes' key (what
the interpreted core runs), on texts made of the characters where the two could part: quotes of both
kinds, escapes, comments, $n, numbers next to words, non-ASCII letters and digits, characters beyond
the BMP, and lone surrogates (how a non-UTF-8 statement's bytes read)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import shapes

ALPHABET = "'\"$-/*\\\n eEbBxXuU0123456789._a\u00e9\u0661\U0001f600\udc80+;,()="


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
@example("SELECT 'a''b' FROM t WHERE x = 1.5e-3 AND y = $1 -- c 2\n AND z = \"q\"\"x\" /* 3 */ AND w = E'\\'' ")
@example("\"a\"\"")
@example("'ab''")
@example("'ab\\")
@example("x1 $a1 _2 \u00e92 \u06612 $\u0661 .5 1. 1e 1e+ 1e+2x")
@example("SELECT '\udc80' || 7, \U0001f600 1")
def test_scan_matches_the_regexes(text: str) -> None:
    assert shapes._scan_key(text) == shapes._regex_key(text)


def test_the_running_core_uses_its_own_key() -> None:
    from proxy.core import core

    assert shapes.shape_key is (shapes._scan_key if core() == "compiled" else shapes._regex_key)
    assert shapes.shape_key("SELECT * FROM t WHERE id = 42 AND s = 'x'") == "SELECT * FROM t WHERE id = ? AND s = ?"
