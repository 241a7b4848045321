"""Page accounting for the paged KV cache: a free list, reference counts and a prefix cache.

A page is free (no content), in use (referenced by running sequences), or cached (its content
is known, nobody references it, and it waits in LRU order to be reused or evicted). A full
page's content is named by a hash of its tokens chained with the previous page's hash, so equal
hashes mean equal prefixes and equal keys/values. A prompt page is registered when it is
allocated, as pending until its writer has computed it: a request that would share a pending
page waits for it instead of computing it again. Page 0 is the null page, never allocated.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np

from llama_jax.paged import NULL_PAGE


def page_hashes(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """The chained hash of every full page of tokens, continuing from `parent`."""
    out = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        chunk = np.asarray(tokens[start : start + page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        out.append(parent)
    return out


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page {NULL_PAGE} is reserved), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self.free: deque[int] = deque(p for p in range(num_pages) if p != NULL_PAGE)
        self.refs = np.zeros(num_pages, np.int64)
        self.hash_of: dict[int, bytes] = {}
        self.page_of: dict[bytes, int] = {}
        self.pending: set[int] = set()  # registered pages not computed yet (one holder: the writer)
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached pages, least recently used first
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, tokens found (computed before)

    @property
    def usable(self) -> int:
        return self.num_pages - 1

    @property
    def available(self) -> int:
        """Pages an allocation can take: free ones, then cached ones (evicted oldest first)."""
        return len(self.free) + len(self.lru)

    @property
    def in_use(self) -> int:
        return self.usable - self.available

    def match(self, hashes: Sequence[bytes]) -> tuple[list[int], bool]:
        """The cached pages of the longest prefix of `hashes`, and whether that prefix ends at a
        page another request is still computing (then the caller should wait for it)."""
        pages = []
        for h in hashes:
            page = self.page_of.get(h)
            if page is None:
                break
            if page in self.pending:
                return pages, True
            pages.append(page)
        return pages, False

    def count_lookup(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def cost(self, shared: Sequence[int], new: int) -> int:
        """Available pages that acquiring `shared` and allocating `new` more would use up."""
        return new + sum(1 for p in shared if p in self.lru)

    def acquire(self, pages: Sequence[int]) -> None:
        for p in pages:
            self.lru.pop(p, None)
            self.refs[p] += 1

    def allocate(self, n: int) -> list[int]:
        if n > self.available:
            raise RuntimeError(f"{n} pages wanted, {self.available} available")
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:  # evict the least recently used cached page
                page, _ = self.lru.popitem(last=False)
                del self.page_of[self.hash_of.pop(page)]
            self.refs[page] = 1
            out.append(page)
        return out

    def register(self, page: int, content: bytes, pending: bool) -> None:
        """Name a full page by its content hash (pending: its writer has not computed it yet).
        A content already cached under another page keeps that page; this one stays unnamed."""
        if content in self.page_of or page in self.hash_of:
            return
        self.page_of[content], self.hash_of[page] = page, content
        if pending:
            self.pending.add(page)

    def computed(self, page: int) -> None:
        """The writer has stored the page's keys and values: others may share it now."""
        self.pending.discard(page)

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced named pages stay cached, others are freed.
        A pending page released by its writer is forgotten (its content was never computed)."""
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] < 0:
                raise RuntimeError(f"page {p} released more often than acquired")
            if self.refs[p]:
                continue
            if p in self.pending:
                self.pending.discard(p)
                del self.page_of[self.hash_of.pop(p)]
            if p in self.hash_of:
                self.lru[p] = None
            else:
                self.free.append(p)

    def stats(self) -> dict[str, int]:
        return {
            "pages_total": self.usable,
            "pages_free": len(self.free),
            "pages_cached": len(self.lru),
            "pages_in_use": self.in_use,
            "pages_pending": len(self.pending),
            "references": int(self.refs.sum()),
            "hashed_pages": len(self.hash_of),
            "prefix_queried_tokens": self.queried_tokens,
            "prefix_hit_tokens": self.hit_tokens,
        }

    def check(self) -> None:
        """Raise if the accounting is inconsistent (used by tests and after draining)."""
        referenced = {int(p) for p in np.flatnonzero(self.refs)}
        free, cached = set(self.free), set(self.lru)
        problems = []
        if len(free) != len(self.free):
            problems.append("a page is free twice")
        if free & cached or free & referenced or cached & referenced:
            problems.append("a page is in two states")
        if len(free) + len(cached) + len(referenced) != self.usable or NULL_PAGE in free | cached | referenced:
            problems.append("pages are missing")
        if {self.page_of[h] for h in self.hash_of.values()} != set(self.hash_of) or len(self.page_of) != len(
            self.hash_of
        ):
            problems.append("the hash tables disagree")
        if not cached <= set(self.hash_of) or not self.pending <= referenced:
            problems.append("a cached page has no hash, or a pending page no writer")
        if problems:
            raise RuntimeError(f"page accounting: {'; '.join(problems)} ({self.stats()})")
