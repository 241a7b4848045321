"""A paged KV cache: keys and values live in pools of fixed-size pages shared by all sequences,
and each sequence owns a list of pages (its page table), as in vLLM.

`PagedCache` is one kind of cache input of the model's forward. A serving step feeds the new
tokens of every running row as one flat sequence [1, N], grouped into `PageRows`: groups of rows
with the same number of new tokens per row (`width`: 1 for decoding rows, a prefill chunk for
prompt rows). Each layer first writes its new keys and values into the rows' pages
(`PagedCache.write`), then attends over the rows' pages, read up to the group's page-table width:
a step reads the live pages of its rows and never the whole pool. Writing before reading, layer
by layer, also chains every write after the previous layer's reads, which is what lets XLA update
the donated pools in place (reads that nothing after them depends on make it copy both pools
every step). Page 0 is never allocated: padding tokens write there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.attention import attention
from llama_jax.buckets import bucket
from llama_jax.precision import einsum_f32

NULL_PAGE = 0  # the page that padding writes to; never holds a sequence's tokens

# Logical axes of the page pools [layers, kv_heads, pages, page_size, head_dim]: kv heads (and
# head_dim, layers: never split in practice) follow the plan's [cache] rules; pages are shared.
# A page of one kv head is a [page_size, head_dim] tile: TPUs tile the two minor dimensions, and
# under tensor parallelism a chip often holds a single kv head.
POOL_AXES = ("layers", "kv_heads", None, None, "head_dim")
PAGES_PER_BLOCK = 32  # pages a prefill group reads at once (rows per iteration of its loop)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PageRows:
    """A group of rows of one serving step, each with `width` new tokens of which the first
    `new` are real (the rest is padding). `start`: tokens already in the row's pages.

    A decoding group (width 1) also lists its rows' live pages, row after row (`live_pages`):
    its attention reads those and no more, however long the page table."""

    page_table: jax.Array  # [rows, pages] int32: page ids, NULL_PAGE beyond the row's pages
    start: jax.Array  # [rows] int32
    new: jax.Array  # [rows] int32
    width: int = field(metadata=dict(static=True))
    live: jax.Array | None = None  # [3, M] int32: page id, row, column of each live page (width 1)

    @property
    def rows(self) -> int:
        return self.page_table.shape[0]

    @property
    def tokens(self) -> int:
        return self.rows * self.width


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedCache:
    k: jax.Array  # [layers, kv_heads, num_pages, page_size, head_dim]
    v: jax.Array
    groups: tuple[PageRows, ...]  # the step's rows; their tokens are laid out group after group
    # Per decoding group, (k, v) buffers [M, kv_heads, page_size, head_dim] for its live pages,
    # which every layer's reads overwrite (`with_buffers`).
    buffers: tuple[tuple[jax.Array, jax.Array], ...] = ()

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    def write(self, layer: jax.Array | int, k_new: jax.Array, v_new: jax.Array) -> PagedCache:
        """Store one layer's new keys/values [1, N, kv_heads, head_dim] in their rows' pages.

        A loop of in-place updates: one per token of a decoding group (width 1), one per page of
        a prefill group (its rows start on a page boundary and its width is whole pages). Not a
        scatter: XLA's cost model charges a scatter the whole pool."""
        k, v, size, offset = self.k, self.v, self.page_size, 0
        for g in self.groups:
            span = 1 if g.width == 1 else size
            if g.width % span:
                raise ValueError(f"a prefill group's width ({g.width}) must be whole pages of {size}")
            t = jnp.arange(0, g.width, span)
            position = g.start[:, None] + t[None]  # [rows, pieces]: where each piece starts
            column = position // size
            columns = g.page_table.shape[1]
            page = jnp.take_along_axis(g.page_table, jnp.minimum(column, columns - 1), axis=1)
            page = jnp.where(column < columns, page, NULL_PAGE).reshape(-1)
            slot = (position % size).reshape(-1)  # 0 for whole pages
            source = (offset + jnp.arange(g.rows)[:, None] * g.width + t[None]).reshape(-1)

            def store(i, pools, page=page, slot=slot, source=source, span=span):
                def one(pool, new):
                    piece = jax.lax.dynamic_slice_in_dim(new[0], source[i], span, axis=0)  # [span, KV, D]
                    piece = piece.transpose(1, 0, 2)[None, :, None].astype(pool.dtype)
                    return jax.lax.dynamic_update_slice(pool, piece, (layer, 0, page[i], slot[i], 0))

                return one(pools[0], k_new), one(pools[1], v_new)

            k, v = jax.lax.fori_loop(0, page.shape[0], store, (k, v))
            offset += g.tokens
        return PagedCache(k, v, self.groups, self.buffers)

    def with_buffers(self) -> PagedCache:
        """The cache with buffers for its decoding groups' live pages: one pair a step, which every
        layer's reads overwrite (a pair per layer costs a zeroed buffer and copies of it in each
        layer, and the copies land in cold memory)."""
        _, kv_heads, _, size, head_dim = self.k.shape
        live = [g.live.shape[1] for g in self.groups if g.width == 1]
        empty = lambda m: jnp.zeros((m, kv_heads, size, head_dim), self.k.dtype)  # noqa: E731
        return PagedCache(self.k, self.v, self.groups, tuple((empty(m), empty(m)) for m in live))


def live_pages(page_table: np.ndarray, start: np.ndarray, page_size: int, minimum: int = 1) -> np.ndarray:
    """The pages a decoding group's attention reads: for each row, its pages up to the one its
    new token goes to, as [3, M] (page id, row, column), M a power of two (at least `minimum`).
    Padding entries (NULL_PAGE, last row, a column past every row's token) are masked out."""
    rows, columns = page_table.shape
    count = np.asarray(start) // page_size + 1  # a padding row (start 0) reads the null page, masked
    row = np.repeat(np.arange(rows), count)
    column = np.concatenate([np.arange(n) for n in count])
    m = bucket(len(row), minimum)
    live = np.empty((3, m), np.int32)
    live[0], live[1], live[2] = NULL_PAGE, rows - 1, columns
    live[0, : len(row)], live[1, : len(row)], live[2, : len(row)] = page_table[row, column], row, column
    return live


def pool_shape(cfg: Any, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.n_layers, cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)


def init_pools(cfg: Any, num_pages: int, page_size: int, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Zeroed key and value pools for `num_pages` pages (page 0 included) of `page_size` tokens."""
    shape = pool_shape(cfg, num_pages, page_size)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def pool_bytes_per_page(cfg: Any, page_size: int, dtype: Any) -> int:
    """Bytes one page takes in the key and value pools together."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * np.dtype(dtype).itemsize


def paged_attention(
    q: jax.Array, cache: PagedCache, layer: jax.Array | int, implementation: str = "xla"
) -> tuple[jax.Array, PagedCache]:
    """Attention of a step's queries q [1, N, H, D] over their rows' pages (this step's keys
    already written) -> ([1, N, H, D], the cache with the pages this layer read in its buffers).
    A query at position p of its row sees the row's slots 0..p.

    A decoding group reads its live pages (`_attend_live`). A prefill group reads each row's
    pages up to the page-table width, in blocks of rows (`lax.map`, so that a long table never
    holds every row's keys at once), and `attention` applies its one masking rule with each
    row's `start` as its queries' offset."""
    decoding = [g for g in cache.groups if g.width == 1]
    if any(g.live is None for g in decoding):
        raise ValueError("a decoding group needs its live pages (paged.live_pages)")
    if len(cache.buffers) != len(decoding):  # not made by the model's forward: buffers for this call
        cache = cache.with_buffers()
    outs, offset, buffers, d = [], 0, list(cache.buffers), 0
    for g in cache.groups:
        if g.width == 1:
            out, buffers[d] = _attend_live(q[0, offset : offset + g.rows], g, cache, layer, buffers[d])
            d += 1
            outs.append(out[None])
            offset += g.tokens
            continue
        block = max(1, min(g.rows, PAGES_PER_BLOCK // g.page_table.shape[1]))
        blocks = lambda x: x.reshape(g.rows // block, block, *x.shape[1:])  # noqa: B023
        rows_q = blocks(q[0, offset : offset + g.tokens].reshape(g.rows, g.width, *q.shape[2:]))
        out = jax.lax.map(
            lambda rows: _attend_rows(*rows, cache, layer, implementation),
            (rows_q, blocks(g.page_table), blocks(g.start)),
        )
        outs.append(out.reshape(1, g.tokens, *out.shape[3:]))
        offset += g.tokens
    return jnp.concatenate(outs, axis=1), PagedCache(cache.k, cache.v, cache.groups, tuple(buffers))


def _attend_rows(q, page_table, start, cache: PagedCache, layer, implementation: str) -> jax.Array:
    """A block of rows: q [B, W, H, D], page ids [B, pages], tokens before the step [B]."""
    rows, pages = page_table.shape
    kv_heads, size, head_dim = cache.k.shape[1], cache.k.shape[3], cache.k.shape[4]

    def keys(x: jax.Array) -> jax.Array:  # [B * pages, KV, size, D] -> [B, pages * size, KV, D]
        x = x.reshape(rows, pages, kv_heads, size, head_dim).transpose(0, 1, 3, 2, 4)
        return x.reshape(rows, pages * size, kv_heads, head_dim).astype(q.dtype)

    k, v = read_pages(cache, layer, page_table.reshape(-1))
    ones = lambda n: jnp.ones((rows, n), jnp.int32)  # noqa: E731
    return attention(q, keys(k), keys(v), ones(q.shape[1]), ones(pages * size), start, implementation)


def read_pages(
    cache: PagedCache, layer: jax.Array | int, pages: jax.Array, into: tuple[jax.Array, jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
    """One layer's pages [n] of the key and value pools -> two [n, kv_heads, page_size, head_dim]
    (written over `into`, if given): a loop of one-page copies, both pools per iteration. Copies
    read only those pages (XLA's cost model counts each iteration; a gather is charged the whole
    pool), and on CPUs a loop iteration costs less than a kernel per page."""
    _, kv_heads, _, size, head_dim = cache.k.shape

    def copy(i, outs):
        def one(pool, out):
            page = jax.lax.dynamic_slice(pool, (layer, 0, pages[i], 0, 0), (1, kv_heads, 1, size, head_dim))
            return jax.lax.dynamic_update_slice(out, page.reshape(1, kv_heads, size, head_dim), (i, 0, 0, 0))

        return one(cache.k, outs[0]), one(cache.v, outs[1])

    if into is None:
        into = (jnp.zeros((pages.shape[0], kv_heads, size, head_dim), cache.k.dtype),) * 2
    return jax.lax.fori_loop(0, pages.shape[0], copy, into)


def _attend_live(q: jax.Array, g: PageRows, cache: PagedCache, layer, into) -> tuple[jax.Array, tuple]:
    """A decoding group over its live pages only: q [rows, H, D] -> ([rows, H, D], the pages read
    (k, v), written over the buffers `into`). Each live page scores its row's query; a softmax across each
    row's pages (segment max and sums, the pages sorted by row) combines them, so the pages read
    follow the live tokens, not the table."""
    page, row, column = g.live
    _, kv_heads, _, size, head_dim = cache.k.shape
    rows, heads = q.shape[0], q.shape[1]

    read = read_pages(cache, layer, page, into)
    k, v = (x.astype(q.dtype) for x in read)  # [M, KV, size, D]
    qg = q.reshape(rows, kv_heads, heads // kv_heads, head_dim)[row]  # [M, KV, G, D]
    scores = einsum_f32("mkgd,mksd->mkgs", qg, k) * head_dim**-0.5
    visible = column[:, None] * size + jnp.arange(size) <= g.start[row][:, None]  # [M, size]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    top = jax.ops.segment_max(scores.max(-1), row, rows, indices_are_sorted=True)  # [rows, KV, G]
    probs = jnp.exp(scores - top[row][..., None])
    total = jax.ops.segment_sum(probs.sum(-1), row, rows, indices_are_sorted=True)
    out = jnp.einsum("mksd,mkgs->mkgd", v, probs.astype(q.dtype), preferred_element_type=jnp.float32)
    out = jax.ops.segment_sum(out, row, rows, indices_are_sorted=True) / total[..., None]
    return out.reshape(rows, heads, head_dim).astype(q.dtype), read
