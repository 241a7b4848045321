"""The paged KV cache as a cache input of the one forward: the same logits as the plain forward,
and a compiled step whose memory traffic follows the live tokens, not the cache capacity."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.model import Llama, init_params, param_shapes
from llama_jax.paged import PagedCache, PageRows, init_pools, live_pages, pool_bytes_per_page, pool_shape

CFG = LlamaConfig(64, 2, 4, 2, vocab_size=256, ffn_dim=176, max_seq_len=128)
PAGE = 8


def paged_step(model, params, k, v, seqs, tables, groups):
    """groups: [(rows [(seq index, start, new tokens)], width)] -> logits of each row's last new token."""
    built, tokens, positions, at = [], [], [], []
    for rows, width in groups:
        table = np.zeros((len(rows), 8), np.int32)
        start, new = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
        for r, (i, s0, n) in enumerate(rows):
            table[r, : len(tables[i])], start[r], new[r] = tables[i], s0, n
            tokens += seqs[i][s0 : s0 + n] + [0] * (width - n)
            positions += range(s0, s0 + width)
            at.append(len(tokens) - width + max(n - 1, 0))
        live = jnp.asarray(live_pages(table, start, PAGE)) if width == 1 else None
        built.append(PageRows(jnp.asarray(table), jnp.asarray(start), jnp.asarray(new), width, live))
    logits, k, v = _paged_forward(model, params, k, v, tuple(built), jnp.asarray([tokens]), jnp.asarray([positions]),
                                  jnp.asarray([at]))  # fmt: skip
    return np.asarray(logits[0]), k, v


@partial(jax.jit, static_argnums=0)
def _paged_forward(model, params, k, v, groups, tokens, positions, at):
    logits, cache = model.apply(
        {"params": params}, tokens, positions=positions, cache=PagedCache(k, v, groups), logits_at=at
    )
    return logits, cache.k, cache.v


def test_paged_forward_equals_the_plain_forward():
    params = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, init_params(CFG, jax.random.key(0)))
    model = Llama(CFG)
    rng = np.random.RandomState(0)
    seqs = [rng.randint(0, 256, n).tolist() for n in (37, 5, 20)]
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0][0])
    full = [np.asarray(forward(jnp.asarray([s + [0] * (40 - len(s))]))) for s in seqs]  # causal: padding after is inert
    k, v = init_pools(CFG, 32, PAGE)
    tables = [[3, 1, 2, 9, 5, 6], [7, 8], [12, 10, 11]]  # pages in no particular order
    # Step 1: two prompts' first chunks (one row shorter than the width).
    logits, k, v = paged_step(model, params, k, v, seqs, tables, [([(0, 0, 16), (1, 0, 3)], 16)])
    np.testing.assert_allclose(logits, [full[0][15], full[1][2]], atol=2e-5)
    # Step 2: a decoding row beside the rest of one prompt and all of another (chunked prefill).
    groups = [([(1, 3, 1)], 1), ([(0, 16, 21), (2, 0, 20)], 32)]
    logits, k, v = paged_step(model, params, k, v, seqs, tables, groups)
    np.testing.assert_allclose(logits, [full[1][3], full[0][36], full[2][19]], atol=2e-5)
    # Step 3: decoding, with a padding row (no new token).
    logits, k, v = paged_step(model, params, k, v, seqs, tables, [([(1, 4, 1), (2, 20, 0)], 1)])
    np.testing.assert_allclose(logits[0], full[1][4], atol=2e-5)


def test_step_traffic_follows_live_tokens_not_capacity():
    """XLA's cost analysis of a compiled decode step: the same bytes for a pool of 64 or 1024 pages
    when the rows hold the same tokens, and more bytes when the rows hold more tokens."""
    cfg = CFG
    model = Llama(cfg)

    @partial(jax.jit, donate_argnums=(1, 2))
    def step(params, k, v, groups, tokens, positions):
        logits, cache = model.apply(
            {"params": params}, tokens, positions=positions, cache=PagedCache(k, v, groups), logits_at=positions * 0
        )
        return logits, cache.k, cache.v

    def bytes_accessed(num_pages: int, pages_per_row: int, rows: int = 16, page: int = 16, table: int = 8) -> float:
        sd = jax.ShapeDtypeStruct
        pool = sd(pool_shape(cfg, num_pages, page), jnp.float32)
        vec = sd((rows,), jnp.int32)
        groups = (PageRows(sd((rows, table), jnp.int32), vec, vec, 1, sd((3, rows * pages_per_row), jnp.int32)),)
        compiled = step.lower(param_shapes(cfg), pool, pool, groups, sd((1, rows), jnp.int32), sd((1, rows), jnp.int32))
        cost = compiled.compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]

    small, large = bytes_accessed(64, 4), bytes_accessed(1024, 4)
    assert abs(large - small) <= 0.1 * small, (small, large)
    pool_bytes = 960 * pool_bytes_per_page(cfg, 16, jnp.float32)  # what 960 more pages hold
    assert large - small < 0.01 * pool_bytes
    wide = bytes_accessed(1024, 4, table=32)  # a wider page table, the same live pages: its own ints more
    assert 0 <= wide - large <= 16 * 24 * 4 * 2, (wide, large)
    # More live tokens per row: more bytes, in proportion to the pages. Each live page is read from
    # the pool, copied into the step's buffer and read again by the products: 1-3x its own bytes.
    more = bytes_accessed(1024, 16)
    page_bytes = 12 * 16 * pool_bytes_per_page(cfg, 16, jnp.float32)  # 12 more pages a row, 16 rows
    assert page_bytes < more - large < 3 * page_bytes, (more - large, page_bytes)
