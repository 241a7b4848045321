"""Log-probabilities of given token sequences under the model."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.generate import bucket
from llama_jax.hosts import to_host
from llama_jax.model import Llama, Params


def batch_logprobs(model: Llama, params: Params, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] tokens -> [B, T-1] float32 log P(tokens[:, i+1] | tokens[:, :i+1])."""
    logits, _ = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


_batch_logprobs = jax.jit(batch_logprobs, static_argnums=0)


def score(model: Llama, params: Params, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
    """Per-sequence arrays of len(seq) - 1 next-token log-probabilities.

    Sequences are right-padded (segment 0) to a bucketed length and run in batches."""
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = bucket(max(len(s) for s in chunk))
        tokens = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        for i, seq in enumerate(chunk):
            tokens[i, : len(seq)] = seq
            segments[i, : len(seq)] = 1
        logp = to_host(_batch_logprobs(model, params, tokens, segments))
        out.extend(logp[i, : len(seq) - 1] for i, seq in enumerate(chunk))
    return out
