"""Batched generation over a preallocated KV cache, as small public functions: `prefill` (the
prompts, the first token), `decode` (every further step in a `lax.while_loop` on the device),
`decode_step` (one step, for a host loop), and `generate` / `stream` around them.

Prompts are left-padded (segment 0) to a bucketed length, so all rows write the cache at the
same slot each step; RoPE positions are per row, so padding never changes a row's numbers.
Each row samples from its own key, derived from the seed, the prompt's tokens and how many
times the same prompt came before it in the request: a row's output does not depend on the
other rows of its batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.buckets import bucket
from llama_jax.hosts import to_host
from llama_jax.model import Llama, Params, init_cache


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off. vocab_limit
    (the tokenizer's vocabulary when the embedding is padded beyond it) keeps ids below it."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    vocab_limit: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, not included in tokens) or "length"


def filter_logits(logits: jax.Array, top_k: int | jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Set to -inf every logit outside the top-k and outside Meta's top-p nucleus
    (sorted descending, drop a token when the mass before it already exceeds top_p).
    top_k and top_p are numbers, or per-row arrays [B] (serving: each request its own)."""
    static = isinstance(top_k, int) and isinstance(top_p, int | float)
    if static and top_k == 0 and top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    top_k, top_p = jnp.asarray(top_k)[..., None], jnp.asarray(top_p)[..., None]
    drop = (top_k > 0) & (jnp.arange(logits.shape[-1]) >= top_k)
    drop |= (top_p < 1.0) & (jnp.cumsum(probs, axis=-1) - probs > top_p)
    sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(sorted_logits, inverse, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V], one key per row -> tokens [B]."""
    logits = limit_vocab(logits.astype(jnp.float32), sampling.vocab_limit)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def sample_rows(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, vocab_limit: int
) -> jax.Array:
    """Like `sample`, with each row's own temperature, top_k and top_p [B] (0: greedy, as `sample`).
    The sampling and the filters (sorts) run only when some row needs them."""
    logits = limit_vocab(logits.astype(jnp.float32), vocab_limit)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> jax.Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtering = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1.0)))
        scaled = jax.lax.cond(filtering, lambda: filter_logits(scaled, top_k, top_p), lambda: scaled)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def limit_vocab(logits: jax.Array, vocab_limit: int) -> jax.Array:
    """-inf beyond the tokenizer's vocabulary (0: no limit) when the embedding is padded beyond it."""
    if 0 < vocab_limit < logits.shape[-1]:
        return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return logits


def row_seeds(prompts: Sequence[Sequence[int]], seed: int) -> np.ndarray:
    """A 32-bit seed per row from (seed, prompt tokens, occurrence of that prompt so far)."""
    seen: dict[bytes, int] = {}
    out = []
    for p in prompts:
        digest = hashlib.sha256(np.asarray(p, np.int64).tobytes()).digest()
        n = seen[digest] = seen.get(digest, -1) + 1
        h = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + digest + n.to_bytes(4, "little")).digest()
        out.append(int.from_bytes(h[:4], "little"))
    return np.asarray(out, np.uint32)


def _step(model: Llama, params, cache, token, lengths, step, keys, prompt_len, sampling: Sampling):
    """Feed the step-th new token [B] at cache slot prompt_len + step; sample the next one."""
    logits, cache = model.apply(
        {"params": params},
        token[:, None],
        positions=(lengths + step)[:, None],
        segment_ids=jnp.ones_like(token)[:, None],
        cache=cache,
        cache_index=prompt_len + step,
    )
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step + 1)
    return sample(logits[:, 0], step_keys, sampling), cache


# The cache is donated: each step updates it in place.
decode_step = jax.jit(_step, static_argnames=("model", "sampling"), donate_argnames="cache")


def prefill_logits(model: Llama, params, tokens, pad, cache_len: int, cache_dtype) -> tuple[jax.Array, dict]:
    """Left-padded prompts [B, P] (`pad` leading pad tokens each) into a fresh cache of
    `cache_len` slots -> (the last position's logits [B, V], cache). Traced inside `prefill`
    and speculative decoding's loop."""
    b, p = tokens.shape
    idx = jnp.arange(p)[None]
    positions = jnp.maximum(idx - pad[:, None], 0)
    segments = (idx >= pad[:, None]).astype(jnp.int32)
    cache = init_cache(model.cfg, b, cache_len, cache_dtype or model.dtype, model.per_layer)
    last = jnp.full((b, 1), p - 1, jnp.int32)  # prompts are left-padded: every row ends at p - 1
    inputs = dict(positions=positions, segment_ids=segments, cache=cache, cache_index=0, logits_at=last)
    logits, cache = model.apply({"params": params}, tokens, **inputs)
    return logits[:, -1], cache


@partial(jax.jit, static_argnames=("model", "sampling", "cache_len", "cache_dtype"))
def prefill(model: Llama, params, tokens, pad, seeds, *, sampling: Sampling, cache_len: int, cache_dtype):
    """`prefill_logits`, then the first sampled token -> (first token [B], cache, per-row keys
    from `seeds`)."""
    logits, cache = prefill_logits(model, params, tokens, pad, cache_len, cache_dtype)
    keys = jax.vmap(jax.random.key)(seeds)
    first = sample(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, 0), sampling)
    return first, cache, keys


@partial(jax.jit, static_argnames=("model", "sampling", "max_new"))
def decode(model: Llama, params, first, cache, lengths, keys, done, stop_ids, *, sampling, max_new: int):
    """All decode steps after prefill on the device -> tokens [B, max_new] (the first included);
    stops early once every row is `done` or has hit a stop token."""
    prompt_len = cache["segment_ids"].shape[1] - max_new
    out = jnp.zeros((first.shape[0], max_new), jnp.int32).at[:, 0].set(first)
    done = done | jnp.isin(first, stop_ids)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new - 1) & ~jnp.all(done)

    def body(state):
        step, token, cache, out, done = state
        nxt, cache = _step(model, params, cache, token, lengths, step, keys, prompt_len, sampling)
        return step + 1, nxt, cache, out.at[:, step + 1].set(nxt), done | jnp.isin(nxt, stop_ids)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), first, cache, out, done))[3]


@dataclass
class _Batch:
    rows: int  # real prompts; rows beyond are batch padding
    prompt_len: int  # left-padded prompt length (a bucket)
    lengths: jax.Array  # [B] real prompt lengths
    first: jax.Array  # [B] first sampled token
    cache: dict
    keys: jax.Array
    padding_rows: jax.Array  # [B] True for batch padding


def pad_prompts(prompts: Sequence[Sequence[int]], batch_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to a bucketed length, rows to a bucketed multiple of `batch_multiple`
    -> (tokens [B, P], pad [B]: leading pad tokens, P for a padding row)."""
    rows, p = len(prompts), bucket(max(len(x) for x in prompts))
    b = -(-bucket(rows, 1) // batch_multiple) * batch_multiple
    tokens = np.zeros((b, p), np.int32)
    pad = np.full((b,), p, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, p - len(prompt) :] = prompt
        pad[i] = p - len(prompt)
    return tokens, pad


def _start(model, params, prompts, max_new, sampling, seed, cache_dtype, batch_multiple) -> _Batch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new} new tokens exceeds the context of {model.cfg.max_seq_len}"
        )
    tokens, pad = pad_prompts(prompts, batch_multiple)
    rows, (b, p) = len(prompts), tokens.shape
    lengths = p - pad  # 0 for batch padding
    seeds = np.zeros((b,), np.uint32)
    seeds[:rows] = row_seeds(prompts, seed)
    first, cache, keys = prefill(
        model,
        params,
        jnp.asarray(tokens),
        jnp.asarray(pad),
        jnp.asarray(seeds),
        sampling=sampling,
        cache_len=p + max_new,
        cache_dtype=cache_dtype or model.dtype,
    )
    return _Batch(rows, p, jnp.asarray(lengths), first, cache, keys, jnp.arange(b) >= rows)


def _finish(row: np.ndarray, stop_ids: Sequence[int]) -> Completion:
    stop_set = set(stop_ids)
    stops = [i for i, t in enumerate(row.tolist()) if t in stop_set]
    if stops:
        return Completion(row[: stops[0]].tolist(), "stop")
    return Completion(row.tolist(), "length")


def generate(
    model: Llama,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    cache_dtype=None,
    batch_multiple: int = 1,
) -> list[Completion]:
    """Complete each prompt (token ids) until one of stop_ids or max_new_tokens.

    The batch is padded to a multiple of `batch_multiple` (the data-parallel degree)."""
    batch = _start(model, params, prompts, max_new_tokens, sampling, seed, cache_dtype, batch_multiple)
    out = decode(
        model,
        params,
        batch.first,
        batch.cache,
        batch.lengths,
        batch.keys,
        batch.padding_rows,
        jnp.asarray(sorted(set(stop_ids)) or [-1], jnp.int32),
        sampling=sampling,
        max_new=max_new_tokens,
    )
    out = to_host(out)
    return [_finish(out[i], stop_ids) for i in range(batch.rows)]


def stream(
    model: Llama,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    cache_dtype=None,
    batch_multiple: int = 1,
) -> Iterator[list[int | None]]:
    """Like `generate`, one step at a time: yields each row's new token (None once a row
    has stopped; the stop token itself is not yielded). Same numbers as `generate`."""
    batch = _start(model, params, prompts, max_new_tokens, sampling, seed, cache_dtype, batch_multiple)
    stops = set(stop_ids)
    done = [False] * batch.rows
    token, cache = batch.first, batch.cache
    for step in range(max_new_tokens):
        if step:
            token, cache = decode_step(
                model, params, cache, token, batch.lengths, step - 1, batch.keys, batch.prompt_len, sampling
            )
        host = to_host(token)[: batch.rows].tolist()
        done = [d or t in stops for d, t in zip(done, host, strict=True)]
        if all(done):
            return
        yield [None if d else t for d, t in zip(done, host, strict=True)]
