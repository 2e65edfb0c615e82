"""The per-execution shape key: texts that share a key must share their facts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.shapes import _STRIP, ShapeCache, _keep_or_blank, shape_key

ALPHABET = "SELECTFROMWHEREabcxyz_0123456789 .,;()=<>+-*/'\"$eE\n"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=60))
def test_fast_path_equals_the_general_one(text):
    assert shape_key(text) == _STRIP.sub(_keep_or_blank, text)


def test_literal_variants_share_a_shape_and_identifiers_do_not():
    cache = ShapeCache()
    a = cache.get("SELECT v FROM t1 WHERE id = 5")
    b = cache.get("SELECT v FROM t1 WHERE id = 77")
    c = cache.get("SELECT v FROM t2 WHERE id = 5")
    assert a is b and a.fingerprint == b.fingerprint
    assert c.fingerprint != a.fingerprint
    assert cache.get('SELECT "col 1" FROM t').fingerprint != cache.get('SELECT "col 2" FROM t').fingerprint
    assert cache.get("SELECT 'a1' FROM t").fingerprint == cache.get("SELECT 'b2' FROM t").fingerprint


def test_limit_values_stay_apart_from_the_decisions_that_depend_on_them():
    """LIMIT 5 and LIMIT 5000 share a shape (and a fingerprint); rules re-analyse the text itself
    when a LIMIT rule applies (proxy/rules_glue.py), so the shared facts never decide a rewrite."""
    cache = ShapeCache()
    assert cache.get("SELECT * FROM t LIMIT 5") is cache.get("SELECT * FROM t LIMIT 5000")
