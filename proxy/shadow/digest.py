"""A digest of a statement's result rows that two servers can be compared by.

Rows are compared as the wire carries them (each DataRow message, in the formats the client asked
for), so a shadow answering the same statement with the same formats gives the same bytes exactly when
it returns the same values. The digest is a multiset hash (the sum of each row's 64-bit hash, and the
count), so rows in another order still compare equal: without ORDER BY, two servers, or one server
with another plan, may return the same rows in a different order.
"""

from __future__ import annotations

from hashlib import blake2b

_MASK = (1 << 64) - 1


class RowDigest:
    __slots__ = ("rows", "total", "whole")

    def __init__(self) -> None:
        self.rows = 0
        self.total = 0
        self.whole = True  # False once a row came in pieces (a very large row): compare counts only

    def add(self, row: bytes) -> None:
        """One DataRow message (its body, or the whole message: use one form per digest)."""
        self.rows += 1
        self.total = (self.total + int.from_bytes(blake2b(row, digest_size=8).digest(), "little")) & _MASK

    def spoil(self) -> None:
        self.whole = False

    def value(self) -> str:
        """`rows:hash` (hash `-` when a row was too large to hash)."""
        return f"{self.rows}:{self.total:016x}" if self.whole else f"{self.rows}:-"


def same(a: str | None, b: str | None) -> bool | None:
    """Whether two digests show the same rows (None: they cannot tell, a hash is missing)."""
    if a is None or b is None:
        return None
    count_a, _, hash_a = a.partition(":")
    count_b, _, hash_b = b.partition(":")
    if count_a != count_b:
        return False
    if hash_a == "-" or hash_b == "-":
        return None
    return hash_a == hash_b
