"""A paged KV cache: keys and values live in pools of fixed-size pages shared by all sequences,
and each sequence owns a list of pages (its page table), as in vLLM.

`PagedCache` is one kind of cache input of the model's forward. A serving step feeds the new
tokens of every running row as one flat sequence [1, N], grouped into `PageRows`: groups of rows
with the same number of new tokens per row (`width`: 1 for decoding rows, a prefill chunk for
prompt rows). Each layer attends with the keys already in the row's pages (read up to the
group's page-table width, so a step reads the live pages of its rows and never the whole pool)
plus the step's own new keys; the new keys and values are written into the pages once, after
the last layer (`PagedCache.write`). Page 0 is never allocated: padding tokens write there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.attention import attention

NULL_PAGE = 0  # the page that padding writes to; never holds a sequence's tokens

# Logical axes of the page pools [layers, kv_heads, pages, page_size, head_dim]: kv heads (and
# head_dim, layers: never split in practice) follow the plan's [cache] rules; pages are shared.
# A page of one kv head is a [page_size, head_dim] tile: TPUs tile the two minor dimensions, and
# under tensor parallelism a chip often holds a single kv head.
POOL_AXES = ("layers", "kv_heads", None, None, "head_dim")
SLICES_PER_BLOCK = 32  # page reads per iteration of the loop over a group's rows


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PageRows:
    """A group of rows of one serving step, each with `width` new tokens of which the first
    `new` are real (the rest is padding). `start`: tokens already in the row's pages."""

    page_table: jax.Array  # [rows, pages] int32: page ids, NULL_PAGE beyond the row's pages
    start: jax.Array  # [rows] int32
    new: jax.Array  # [rows] int32
    width: int = field(metadata=dict(static=True))

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

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    def write(self, k_new: jax.Array, v_new: jax.Array) -> PagedCache:
        """Store the step's new keys/values [layers, 1, N, kv_heads, head_dim] in their pages.

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
                    piece = jax.lax.dynamic_slice_in_dim(new[:, 0], source[i], span, axis=1)  # [L, span, KV, D]
                    piece = piece.transpose(0, 2, 1, 3)[:, :, None].astype(pool.dtype)
                    return jax.lax.dynamic_update_slice(pool, piece, (0, 0, page[i], slot[i], 0))

                return one(pools[0], k_new), one(pools[1], v_new)

            k, v = jax.lax.fori_loop(0, page.shape[0], store, (k, v))
            offset += g.tokens
        return PagedCache(k, v, self.groups)


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
    q: jax.Array, k: jax.Array, v: jax.Array, cache: PagedCache, layer: jax.Array, implementation: str = "xla"
) -> jax.Array:
    """Attention of a step's queries q [1, N, H, D] over their rows' pages and the step's new keys
    k, v [1, N, KV, D] (causal among a row's new tokens) -> [1, N, H, D].

    A loop over blocks of rows (`lax.map`) slices each row's pages out of the pools, page by page
    up to the page-table width, and appends the row's new keys; `attention` then applies its one
    masking rule: cached slots beyond the row's `start` get segment 0, and the new keys sit after
    all cached slots (q_offset). Slices read only those pages; a gather would be charged the whole
    pool by XLA's cost model (and on TPUs it copies it)."""
    outs, offset = [], 0
    for g in cache.groups:
        block = max(1, min(g.rows, SLICES_PER_BLOCK // g.page_table.shape[1]))
        blocks = lambda x: x.reshape(g.rows // block, block, *x.shape[1:])  # noqa: B023
        part = lambda x: blocks(x[0, offset : offset + g.tokens].reshape(g.rows, g.width, *x.shape[2:]))  # noqa: B023
        out = jax.lax.map(
            lambda rows: _attend_rows(*rows, cache, layer, implementation),
            (part(q), part(k), part(v), blocks(g.page_table), blocks(g.start)),
        )
        outs.append(out.reshape(1, g.tokens, *out.shape[3:]))
        offset += g.tokens
    return jnp.concatenate(outs, axis=1)


def _attend_rows(q, k, v, page_table, start, cache: PagedCache, layer, implementation: str) -> jax.Array:
    """A block of rows: q [B, W, H, D], their new k/v [B, W, KV, D], page ids [B, pages]."""
    _, kv_heads, _, size, head_dim = cache.k.shape
    rows, pages = page_table.shape
    cached = pages * size

    def read(pool: jax.Array) -> jax.Array:  # [B, cached, KV, D]
        one = lambda r, j: jax.lax.dynamic_slice(
            pool, (layer, 0, page_table[r, j], 0, 0), (1, kv_heads, 1, size, head_dim)
        )
        rows_ = [jnp.concatenate([one(r, j)[0, :, 0] for j in range(pages)], axis=1) for r in range(rows)]
        return jnp.stack(rows_).transpose(0, 2, 1, 3).astype(k.dtype)

    keys = jnp.concatenate([read(cache.k), k], axis=1)
    values = jnp.concatenate([read(cache.v), v], axis=1)
    old = jnp.arange(cached)[None] < start[:, None]
    kv_segments = jnp.concatenate([old, jnp.ones(k.shape[:2], bool)], axis=1).astype(jnp.int32)
    q_segments = jnp.ones(q.shape[:2], jnp.int32)
    return attention(q, keys, values, q_segments, kv_segments, cached, implementation)
