"""Shape buckets: lengths and counts rounded up to powers of two, so that jitted programs compile
for a handful of shapes rather than one per request."""

from __future__ import annotations


def bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a power of two (at least `minimum`), so that new lengths rarely recompile."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())
