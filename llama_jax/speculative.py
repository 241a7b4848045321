"""Speculative decoding: a small draft model proposes K tokens, the target checks them all in one
forward over K+1 positions, and each round emits the accepted prefix plus one token of the target's.

The whole loop runs on the device (`lax.while_loop`, as `generate.decode`): a round is K small draft
steps and one target step, and a host loop would add a dispatch and a sync per round. Each row keeps
its own cache slot (rows accept different counts): at batch 1 the model is called as usual, larger
batches `vmap` it over rows. Rejected slots need no clean-up: a query sees only slots at or before its
own (attention's causal slot mask), and the next round writes its K+1 slots over them first.

Greedy (temperature 0) accepts while the draft's token is the target's argmax, so the tokens are
`generate`'s. Sampling accepts a draft token x ~ q with probability min(1, p(x)/q(x)) and otherwise
draws from normalize(max(0, p - q)); after K acceptances a bonus token comes from p (Leviathan et
al. 2023; Chen et al. 2023): every token is distributed as the target alone would sample it. p and q
are both models' distributions after `Sampling`'s vocab limit, temperature, top-k and top-p.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.errors import UserError
from llama_jax.generate import (
    Completion,
    Sampling,
    filter_logits,
    limit_vocab,
    pad_prompts,
    prefill_logits,
    row_seeds,
    sample,
)  # fmt: skip
from llama_jax.hosts import to_host
from llama_jax.load import Loaded, load
from llama_jax.model import Llama, Params, init_cache


@dataclass(frozen=True)
class Acceptance:
    """One row's (or a sum of rows') count of draft tokens accepted out of those proposed."""

    accepted: int
    proposed: int
    rounds: int
    k: int

    @property
    def rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def __str__(self) -> str:
        return f"speculative: acceptance {self.rate:.2f} (K={self.k}, {self.rounds} rounds)"


def total(stats: Sequence[Acceptance]) -> Acceptance:
    """The rows' counts added up."""
    return Acceptance(
        sum(s.accepted for s in stats), sum(s.proposed for s in stats), sum(s.rounds for s in stats), stats[0].k
    )


# -- the cache and a forward at per-row slots ------------------------------------------------
def new_cache(model: Llama, batch: int, length: int, dtype) -> dict:
    """The one place this module makes a KV cache."""
    return init_cache(model.cfg, batch, length, dtype, model.per_layer)


@functools.lru_cache(maxsize=16)
def cache_batch_axes(model: Llama):
    """Each cache leaf's batch axis (the one that grows with the batch), as a pytree like the cache."""
    two, three = (jax.eval_shape(lambda b=b: new_cache(model, b, 1, jnp.float32)) for b in (2, 3))
    return jax.tree.map(
        lambda a, b: next(i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n), two, three
    )


def forward(model: Llama, params: Params, cache, tokens: jax.Array, positions: jax.Array, slots: jax.Array):
    """tokens, positions [B, T] written at each row's own cache slots [slots, slots + T) -> (logits
    [B, T, V], cache). One row: the model as `generate` calls it; more: vmapped over the rows."""
    ones = jnp.ones_like(tokens)
    if tokens.shape[0] == 1:
        return model.apply(
            {"params": params}, tokens, positions=positions, segment_ids=ones, cache=cache, cache_index=slots[0]
        )
    axes = cache_batch_axes(model)

    def row(cache_row, tok, pos, seg, slot):
        cache_row = jax.tree.map(jnp.expand_dims, cache_row, axes)
        logits, cache_row = model.apply(
            {"params": params}, tok[None], positions=pos[None], segment_ids=seg[None], cache=cache_row, cache_index=slot
        )
        return logits[0], jax.tree.map(jnp.squeeze, cache_row, axes)

    return jax.vmap(row, in_axes=(axes, 0, 0, 0, 0), out_axes=(0, axes))(cache, tokens, positions, ones, slots)


# -- the acceptance rule ---------------------------------------------------------------------
def processed(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Logits [..., V] after the vocab limit, temperature, top-k and top-p: `generate.sample`'s."""
    logits = limit_vocab(logits.astype(jnp.float32), sampling.vocab_limit)
    return filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)


def fold(keys: jax.Array, n: jax.Array | int) -> jax.Array:
    """Each row's key [B] folded with n."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, n)


def pick(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """A token per row from logits [B, V] as `generate.sample` draws it."""
    return sample(logits, keys, sampling)


def accept(
    draft_tokens: jax.Array, q_logits: jax.Array, p_logits: jax.Array, keys: jax.Array, sampling: Sampling
) -> tuple[jax.Array, jax.Array]:
    """Draft tokens [B, K] drawn from q_logits [B, K, V], the target's p_logits [B, K+1, V] ->
    (accepted count a [B], the target's token [B] at position a: a correction or the bonus)."""
    b, k = draft_tokens.shape
    if sampling.temperature == 0:
        target = jnp.argmax(limit_vocab(p_logits.astype(jnp.float32), sampling.vocab_limit), axis=-1)
        a = jnp.sum(jnp.cumprod(draft_tokens == target[:, :k], axis=1), axis=1)
        return a, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0].astype(jnp.int32)
    p = jax.nn.softmax(processed(p_logits, sampling), axis=-1)
    q = jax.nn.softmax(processed(q_logits, sampling), axis=-1)
    p_x = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(fold(keys, k))
    a = jnp.sum(jnp.cumprod(u * q_x < p_x, axis=1), axis=1)  # u < p/q, with q(x) > 0 for a drawn x
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), a[:, None, None], axis=1)[:, 0]  # 0 after K
    residual = jnp.maximum(p_a - q_a, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)  # p == q: never rejected
    token = jax.vmap(jax.random.categorical)(fold(keys, k + 1), jnp.log(residual))
    return a, token.astype(jnp.int32)


# -- the loop on the device ------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("target", "draft", "sampling", "k", "max_new", "cache_dtype"))
def speculative_decode(
    target: Llama,
    target_params: Params,
    draft: Llama,
    draft_params: Params,
    tokens: jax.Array,
    pad: jax.Array,
    seeds: jax.Array,
    done: jax.Array,
    stop_ids: jax.Array,
    *,
    sampling: Sampling,
    k: int,
    max_new: int,
    cache_dtype=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Left-padded prompts [B, P] (`pad` leading pads; rows `done` are skipped) -> (tokens [B,
    max_new], accepted draft tokens [B], rounds [B]); a row stops at a stop token or max_new."""
    b, p = tokens.shape
    cache_len = p + max_new + k  # the last round may write K slots past max_new
    lengths = p - pad
    keys = jax.vmap(jax.random.key)(seeds)
    logits, t_cache = prefill_logits(target, target_params, tokens, pad, cache_len, cache_dtype)
    _, d_cache = prefill_logits(draft, draft_params, tokens, pad, cache_len, cache_dtype)
    first = pick(logits, fold(keys, 0), sampling)
    out = jnp.zeros((b, max_new + k + 1), jnp.int32).at[:, 0].set(first)
    done = done | jnp.isin(first, stop_ids) | (max_new == 1)
    zeros = jnp.zeros((b,), jnp.int32)
    # Row state: n tokens out; `last` (the n-th) is in neither cache yet, `prev` (the one before) is
    # in the target's; the draft's may lack it (after K acceptances), so the draft writes both.
    state = (jnp.int32(0), jnp.ones((b,), jnp.int32), first, tokens[:, -1], t_cache, d_cache, out, done, zeros, zeros)

    def cond(state):
        return ~jnp.all(state[7])

    def body(state):
        r, n, last, prev, t_cache, d_cache, out, done, accepted, rounds = state
        slot, pos = p + n - 1, lengths + n - 1  # where `last` goes
        round_keys = fold(keys, r + 1)
        two = jnp.stack([prev, last], axis=1)
        d_logits, d_cache = forward(draft, draft_params, d_cache, two, pos[:, None] + jnp.arange(-1, 1), slot - 1)
        guess = pick(d_logits[:, -1], fold(round_keys, 0), sampling)

        def draft_step(carry, i):
            d_cache, tok = carry
            logits, d_cache = forward(draft, draft_params, d_cache, tok[:, None], (pos + i)[:, None], slot + i)
            nxt = pick(logits[:, 0], fold(round_keys, i), sampling)
            return (d_cache, nxt), (logits[:, 0], nxt)

        (d_cache, _), (q_rest, d_rest) = jax.lax.scan(draft_step, (d_cache, guess), jnp.arange(1, k))
        q_logits = jnp.concatenate([d_logits[:, -1:], q_rest.swapaxes(0, 1)], axis=1)  # [B, K, V]
        proposal = jnp.concatenate([guess[:, None], d_rest.T], axis=1)  # [B, K]
        fed = jnp.concatenate([last[:, None], proposal], axis=1)  # [B, K+1]
        p_logits, t_cache = forward(target, target_params, t_cache, fed, pos[:, None] + jnp.arange(k + 1), slot)
        a, token = accept(proposal, q_logits, p_logits, round_keys, sampling)

        emitted = jnp.where(jnp.arange(k + 1) == a[:, None], token[:, None], jnp.pad(proposal, ((0, 0), (0, 1))))
        live = ~done
        written = jax.vmap(lambda o, e, i: jax.lax.dynamic_update_slice(o, e, (i,)))(out, emitted, n)
        out = jnp.where(live[:, None], written, out)
        index = n[:, None] + jnp.arange(k + 1)
        real = (jnp.arange(k + 1) <= a[:, None]) & (index < max_new)
        stopped = jnp.any(real & jnp.isin(emitted, stop_ids), axis=1)
        new_n = jnp.where(live, n + a + 1, n)
        prev = jnp.where(live, jnp.take_along_axis(fed, a[:, None], axis=1)[:, 0], prev)
        last = jnp.where(live, token, last)
        accepted, rounds = accepted + jnp.where(live, a, 0), rounds + live
        done = done | stopped | (new_n >= max_new)
        return r + 1, new_n, last, prev, t_cache, d_cache, out, done, accepted, rounds

    final = jax.lax.while_loop(cond, body, state)
    return final[6][:, :max_new], final[8], final[9]


# -- the host side ---------------------------------------------------------------------------
DEFAULT_SAMPLING = Sampling()  # generate's default


def generate(
    target: Llama,
    target_params: Params,
    draft: Llama,
    draft_params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = DEFAULT_SAMPLING,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    k: int = 4,
    cache_dtype=None,
    batch_multiple: int = 1,
) -> tuple[list[Completion], list[Acceptance]]:
    """`generate.generate` with a draft proposing k tokens a round -> (completions, each row's
    acceptance). Greedy gives `generate`'s tokens; sampling, tokens distributed as `generate`'s."""
    if k < 1:
        raise ValueError(f"the draft proposes at least 1 token a round, got {k}")
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ValueError("every prompt needs at least one token")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.cfg.vocab_size}) is not the model's ({target.cfg.vocab_size})"
        )
    longest = max(len(x) for x in prompts)
    for name, model in (("the model", target), ("the draft", draft)):
        if longest + max_new_tokens > model.cfg.max_seq_len:
            raise ValueError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of {name} "
                f"({model.cfg.max_seq_len})"
            )
    tokens, pad = pad_prompts(prompts, batch_multiple)
    seeds = np.zeros((len(tokens),), np.uint32)
    seeds[: len(prompts)] = row_seeds(prompts, seed)
    out, accepted, rounds = speculative_decode(
        target,
        target_params,
        draft,
        draft_params,
        jnp.asarray(tokens),
        jnp.asarray(pad),
        jnp.asarray(seeds),
        jnp.arange(len(tokens)) >= len(prompts),
        jnp.asarray(sorted(set(stop_ids)) or [-1], jnp.int32),
        sampling=sampling,
        k=k,
        max_new=max_new_tokens,
        cache_dtype=cache_dtype,
    )
    out, accepted, rounds = to_host(out), to_host(accepted), to_host(rounds)
    stops = set(stop_ids)
    completions, stats = [], []
    for i in range(len(prompts)):
        row = out[i].tolist()
        end = next((j for j, t in enumerate(row) if t in stops), None)
        completions.append(Completion(row, "length") if end is None else Completion(row[:end], "stop"))
        stats.append(Acceptance(int(accepted[i]), int(rounds[i]) * k, int(rounds[i]), k))
    return completions, stats


PROBE = "Speculative decoding, 1234567 times: ünïcödé «quotes» 日本語\n\tand  spaces!"


def load_draft(
    lm: Loaded, checkpoint: str, dtype: str = "auto", tokenizer: str | None = None, plan: str = "single"
) -> Loaded:
    """The draft model for `lm` (loaded with `lm`'s plan, `plan`); its tokenizer (or `tokenizer`, shared
    by both) must be `lm`'s: the same vocabulary, special ids, encoding of a probe text and pieces."""
    draft = load(checkpoint, dtype, tokenizer, need_tokenizer=True, plan=plan, head="lm")
    if draft.cfg.vocab_size != lm.cfg.vocab_size:
        raise UserError(
            f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the model's ({lm.cfg.vocab_size}): "
            "speculative decoding needs the same tokenizer"
        )
    mine, theirs = lm.tokenizer, draft.tokenizer
    ids = range(0, mine.vocab_size, max(1, mine.vocab_size // 512))

    def identity(t) -> tuple:
        names = (t.vocab_size, t.bos_id, t.eos_id, t.pad_id, tuple(t.stop_ids), t.special_tokens)
        return (*names, t.encode(PROBE), tuple(t.decode([i]) for i in ids))

    if identity(mine) != identity(theirs):
        raise UserError(
            f"the draft {checkpoint} has another tokenizer than the model's: speculative decoding needs the same"
        )
    return draft


def steps(completion: Completion) -> Iterator[list[int | None]]:
    """A finished completion as `generate.stream`'s steps (one row), for code that prints a stream."""
    for t in completion.tokens:
        yield [t]
