"""The engine step: one jitted function that runs the model over a step's rows (decoding rows
and prefill chunks, as `paged.PageRows` groups), samples each row's next token with its own
settings and key, and returns the updated page pools (donated, so updated in place).

Shapes are bucketed so that serving compiles a handful of programs, each dimension to a power of
two: decoding rows (at least `min_rows`), prefill rows, the page-table width (covering the step's
longest row, at least `min_pages`) and a decoding group's live pages (at least one a row), which
its attention reads. A decoding step with every slot full and every page live has rows x
context pages live pages; the sampling program compiles once per row count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.buckets import bucket
from llama_jax.generate import limit_vocab, sample_rows
from llama_jax.model import Llama, Params
from llama_jax.paged import NULL_PAGE, PagedCache, PageRows, live_pages
from llama_jax.serving.scheduler import Plan

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's completions limit)


@dataclass
class StepInputs:
    """Host arrays of one step; `rows` lists each row's sequence (None for padding rows)."""

    tokens: np.ndarray  # [N] int32
    positions: np.ndarray  # [N] int32
    groups: list[tuple]  # page_table, start, new, width, live pages (decoding) or None
    logits_at: np.ndarray  # [R]
    seeds: np.ndarray  # [R] uint32
    counts: np.ndarray  # [R] int32: index of the token being sampled
    temperature: np.ndarray  # [R] float32
    top_k: np.ndarray  # [R] int32
    top_p: np.ndarray  # [R] float32
    rows: list


@dataclass(frozen=True)
class StepShape:
    """The shapes a step program is compiled for: decoding rows, their live pages, the page-table
    width, and the prefill group's rows and width (None: no prefill group)."""

    rows: int
    live: int
    pages: int
    prefill: tuple[int, int] | None = None

    def holds(self, other: StepShape) -> bool:
        """Whether other's step can run in this program, padded: at least as many decoding rows,
        live pages and page-table columns, and a prefill group at least as wide with as many rows
        (padding rows of it write to the null page)."""
        prefill = other.prefill is None or (
            self.prefill is not None and self.prefill[0] >= other.prefill[0] and self.prefill[1] >= other.prefill[1]
        )
        return prefill and self.rows >= other.rows and self.live >= other.live and self.pages >= other.pages

    @property
    def tokens(self) -> int:
        return self.rows + (0 if self.prefill is None else self.prefill[0] * self.prefill[1])


def step_shape(plan: Plan, page_size: int, min_rows: int = 1, min_pages: int = 1) -> StepShape:
    """A plan's own bucketed shape. A padding row of the decoding group reads one (null) page."""
    rows = bucket(len(plan.decode), min_rows)
    longest = max([s.computed + 1 for s in plan.decode] + [s.computed + n for s, n in plan.prefill])
    live = sum(s.computed // page_size + 1 for s in plan.decode) + rows - len(plan.decode)
    prefill = (bucket(len(plan.prefill), 1), plan.prefill_width) if plan.prefill else None
    return StepShape(rows, bucket(live, rows), bucket(-(-longest // page_size), min_pages), prefill)


def build_inputs(plan: Plan, page_size: int, shape: StepShape) -> StepInputs:
    """Lay out a plan's rows in `shape` (its own or one that holds it): the decoding group (width
    1, always there: a step with prefill rows only is the same program as one with decoding rows
    too), then the prefill group."""
    groups = [([(s, s.computed, 1) for s in plan.decode], shape.rows, 1)]
    if shape.prefill is not None:
        groups.append(([(s, s.computed, n) for s, n in plan.prefill], *shape.prefill))
    pages = shape.pages
    tokens, positions, built, rows, logits_at = [], [], [], [], []
    for members, count, width in groups:
        table = np.full((count, pages), NULL_PAGE, np.int32)
        start, new = np.zeros(count, np.int32), np.zeros(count, np.int32)
        for r in range(count):
            seq, s0, n = members[r] if r < len(members) else (None, 0, 0)
            if seq is not None:
                own = seq.pages[:pages]
                table[r, : len(own)] = own
                start[r], new[r] = s0, n
            tokens += [seq.token_at(s0 + t) if t < n else 0 for t in range(width)]
            positions += range(s0, s0 + width)
            logits_at.append(len(tokens) - width + max(n - 1, 0))
            rows.append(seq)
        live = live_pages(table, start, page_size, shape.live) if width == 1 else None
        built.append((table, start, new, width, live))
    seeds = np.zeros(len(rows), np.uint32)
    counts, top_k = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
    temperature, top_p = np.zeros(len(rows), np.float32), np.ones(len(rows), np.float32)
    for i, s in enumerate(rows):
        if s is not None:
            seeds[i], counts[i], top_k[i] = s.seed, len(s.tokens), s.top_k
            temperature[i], top_p[i] = s.temperature, s.top_p
    return StepInputs(
        np.asarray(tokens, np.int32), np.asarray(positions, np.int32), built, np.asarray(logits_at, np.int32),
        seeds, counts, temperature, top_k, top_p, rows,
    )  # fmt: skip


@partial(jax.jit, static_argnames="model", donate_argnames=("k", "v"))
def forward_step(
    model: Llama,
    params: Params,
    k: jax.Array,
    v: jax.Array,
    groups: tuple[PageRows, ...],
    tokens: jax.Array,
    positions: jax.Array,
    logits_at: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model over a step's rows -> (logits [R, vocab] of each row's last new token, k, v)."""
    logits, cache = model.apply(
        {"params": params},
        tokens[None],
        positions=positions[None],
        cache=PagedCache(k, v, groups),
        logits_at=logits_at[None],
    )
    return logits[0], cache.k, cache.v


@partial(jax.jit, static_argnames="vocab_limit")
def sample_step(
    logits: jax.Array,
    seeds: jax.Array,
    counts: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    vocab_limit: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> next token [R], its log-probability [R], the top log-probabilities and their ids
    [R, TOP_LOGPROBS] (of the model's distribution, before temperature and filters). A separate
    program from the forward, so that it compiles once per row count."""
    logits = limit_vocab(logits.astype(jnp.float32), vocab_limit)
    keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(seeds), counts)
    nxt = sample_rows(logits, keys, temperature, top_k, top_p, vocab_limit)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_values, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
    return nxt, chosen, top_values, top_ids


def run_step(model: Llama, params: Params, k: jax.Array, v: jax.Array, inputs: StepInputs, vocab_limit: int):
    """Run one step from host inputs; -> (host outputs, new k pool, new v pool)."""
    groups = tuple(
        PageRows(jnp.asarray(t), jnp.asarray(s), jnp.asarray(n), w, None if live is None else jnp.asarray(live))
        for t, s, n, w, live in inputs.groups
    )
    logits, k, v = forward_step(
        model, params, k, v, groups,
        jnp.asarray(inputs.tokens), jnp.asarray(inputs.positions), jnp.asarray(inputs.logits_at),
    )  # fmt: skip
    out = sample_step(
        logits, jnp.asarray(inputs.seeds), jnp.asarray(inputs.counts), jnp.asarray(inputs.temperature),
        jnp.asarray(inputs.top_k), jnp.asarray(inputs.top_p), vocab_limit=vocab_limit,
    )  # fmt: skip
    return jax.device_get(out), k, v


def abstract(x: Any, sharding: jax.sharding.Sharding | None = None) -> jax.ShapeDtypeStruct:
    """An array's shape, dtype and sharding as jit's cache sees them: a single-device sharding is
    left out (a spec that names one keys a different program than the array itself does)."""
    sharding = sharding or getattr(x, "sharding", None)
    keep = sharding is not None and len(sharding.device_set) > 1
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if keep else None)


def step_specs(shape: StepShape, sharding: jax.sharding.Sharding | None = None) -> tuple:
    """The abstract host inputs of a step of `shape`: (groups, tokens, positions, logits_at), the
    arguments of `forward_step` after the pools."""
    ints = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32, sharding=sharding)  # noqa: E731
    groups = [PageRows(ints(shape.rows, shape.pages), ints(shape.rows), ints(shape.rows), 1, ints(3, shape.live))]
    if shape.prefill is not None:
        r, width = shape.prefill
        groups.append(PageRows(ints(r, shape.pages), ints(r), ints(r), width))
    n, rows = sum(g.tokens for g in groups), sum(g.rows for g in groups)
    return tuple(groups), ints(n), ints(n), ints(rows)


def sample_specs(rows: int, sharding: jax.sharding.Sharding | None = None) -> tuple:
    """The abstract per-row inputs of `sample_step` after the logits."""
    spec = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype, sharding=sharding)  # noqa: E731
    return spec(jnp.uint32), spec(jnp.int32), spec(jnp.float32), spec(jnp.int32), spec(jnp.float32)


def compile_step(model: Llama, params: Any, pools: tuple[Any, Any], shape: StepShape, vocab_limit: int) -> None:
    """Compile the forward and sampling programs of one step shape without running them: params
    and pools are `abstract` specs of the real arrays. The compiled programs land in the jit
    caches, so the first step of that shape compiles nothing."""
    inputs = step_specs(shape)
    forward = forward_step.lower(model, params, *pools, *inputs).compile()
    logits = abstract(forward.out_info[0], forward.output_shardings[0])
    sample_step.lower(logits, *sample_specs(logits.shape[0]), vocab_limit=vocab_limit).compile()
