"""Log-probabilities of given token sequences under a language model; rewards under a reward model."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.buckets import bucket
from llama_jax.hosts import to_host
from llama_jax.model import Llama, Params


def batch_logprobs(model: Llama, params: Params, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] tokens -> [B, T-1] float32 log P(tokens[:, i+1] | tokens[:, :i+1])."""
    logits, _ = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


_batch_logprobs = jax.jit(batch_logprobs, static_argnums=0)


def right_padded(sequences: Sequence[Sequence[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment ids) [rows, bucketed length]: the sequences right-padded with segment 0."""
    length = bucket(max(len(s) for s in sequences))
    tokens = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
        segments[i, : len(seq)] = 1
    return tokens, segments


def score(model: Llama, params: Params, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
    """Per-sequence arrays of len(seq) - 1 next-token log-probabilities.

    Sequences are right-padded (segment 0) to a bucketed length and run in batches."""
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        logp = to_host(_batch_logprobs(model, params, *right_padded(chunk, batch_size)))
        out.extend(logp[i, : len(seq) - 1] for i, seq in enumerate(chunk))
    return out


def target_logprobs(
    model: Llama, params: Params, tokens: jax.Array, segment_ids: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """tokens [B, T], targets [B, K, T] -> float32 log P(targets[:, k, i] | tokens[:, :i+1]) and
    whether each target is the argmax, both [B, K, T]: K alternative next tokens per position.

    "Argmax" is "no logit is larger" (a tie counts): XLA's CPU argmax over a large vocabulary
    takes several times as long as a max."""
    logits, _ = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.swapaxes(targets, 1, 2), axis=-1)  # [B, T, K]
    logp = picked - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    greedy = picked >= jnp.max(logits, axis=-1, keepdims=True)
    return jnp.swapaxes(logp, 1, 2), jnp.swapaxes(greedy, 1, 2)


_target_logprobs = jax.jit(target_logprobs, static_argnums=0)


def score_targets(
    model: Llama,
    params: Params,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[np.ndarray],
    batch_size: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each input (the tokens fed to the model) and its targets, an int array [K, len(input)]
    of K candidate next tokens after each prefix: (log-probabilities, is-argmax), both [K, len(input)].

    One forward serves all K candidates (multiple-choice answers of one token share a row).
    Inputs are right-padded (segment 0) to a bucketed length and run in batches."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        wanted = targets[start : start + batch_size]
        length = bucket(max(len(s) for s in chunk))
        k = bucket(max(len(t) for t in wanted), minimum=1)
        tokens = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        target = np.zeros((batch_size, k, length), np.int32)
        for i, (seq, t) in enumerate(zip(chunk, wanted, strict=True)):
            if t.shape[1:] != (len(seq),):
                raise ValueError(f"targets of shape {t.shape} for an input of {len(seq)} tokens")
            tokens[i, : len(seq)] = seq
            segments[i, : len(seq)] = 1
            target[i, : len(t), : len(seq)] = t
        logp, greedy = map(to_host, _target_logprobs(model, params, tokens, segments, target))
        for i, t in enumerate(wanted):
            k, n = t.shape
            out.append((logp[i, :k, :n], greedy[i, :k, :n]))
    return out


def last_scores(
    model: Llama, params: Params, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None
) -> jax.Array:
    """A reward model's score [B] (float32) of padded rows [B, T] (segment 0: padding; positions
    from 0 at each row's first real token, by default the row's index), read at each row's last
    real token."""
    scores, _ = model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
    last = jnp.max(jnp.where(segment_ids > 0, jnp.arange(tokens.shape[1]), 0), axis=1)
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


_last_scores = jax.jit(last_scores, static_argnums=0)


def rewards(model: Llama, params: Params, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """A reward model's score of each sequence, right-padded to a bucketed length in batches."""
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        out.extend(to_host(_last_scores(model, params, *right_padded(chunk, batch_size)))[: len(chunk)].tolist())
    return out
