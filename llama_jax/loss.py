"""Losses: the fused linear + cross-entropy that never holds a batch's [B, T, vocab] logits, DPO and
the reward model's ranking loss.

The output projection runs `chunk` positions at a time. `weighted_loss` (pre-training and SFT
objectives) makes its gradient in the forward pass; `token_losses` gives per-token values for any
downstream use (DPO sums them per sequence) and recomputes a chunk's logits backward.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.model import Params


def output_kernel(cfg: LlamaConfig, params: Params) -> jax.Array:
    """The output projection [dim, vocab]: the embedding's transpose when tied."""
    if cfg.tie_embeddings:
        return params["tok_embeddings"]["embedding"].T
    return params["output"]["kernel"]


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T/chunk, B, chunk, ...], zero-padded to whole chunks."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :t]


def _chunk_logits(h: jax.Array, w: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A chunk's float32 logits, log Z and cross-entropy (log Z - logit[target])."""
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return logits, log_z, log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _chunk_grads(h, w, targets, logits, log_z, g_xent, g_log_z, grad_kernel: bool = True):
    """d_h and the float32 d_w of sum(g_xent * xent + g_log_z * log Z) over a chunk: both terms
    move with the softmax, the cross-entropy also with the target's logit."""
    probs = jnp.exp(logits - log_z[..., None])
    target = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = ((g_xent + g_log_z)[..., None] * probs - jnp.where(target, g_xent[..., None], 0.0)).astype(h.dtype)
    d_w = jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32) if grad_kernel else None
    return jnp.einsum("bcv,dv->bcd", d_logits, w), d_w


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_losses(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and log-partition log Z per token, [B, T] float32, from hidden states
    [B, T, D] and the output projection [D, V], making logits for `chunk` positions at a time.

    A fused linear + cross-entropy for any downstream use of the per-token values (DPO sums
    them per sequence): the forward and the backward pass each loop over the chunks (the backward
    recomputes a chunk's logits), so no more than one chunk of logits ever exists, the projection
    is cast to the compute dtype once, and its gradient accumulates in float32 in the loop's
    carry. `weighted_loss` is the cheaper form for a plain weighted sum."""
    return _token_losses_fwd(hidden, kernel, targets, chunk)[0]


def _token_losses_fwd(hidden, kernel, targets, chunk):
    w = kernel.astype(hidden.dtype)

    def one_chunk(_, args):
        return None, _chunk_logits(args[0], w, args[1])[1:]

    _, (log_z, xent) = jax.lax.scan(one_chunk, None, (_chunks(hidden, chunk), _chunks(targets, chunk)))
    t = hidden.shape[1]
    return (_unchunk(xent, t), _unchunk(log_z, t)), (hidden, kernel, targets, log_z)


def _token_losses_bwd(chunk, residuals, cotangents):
    hidden, kernel, targets, log_z = residuals
    g_xent, g_log_z = (_chunks(g, chunk) for g in cotangents)
    w = kernel.astype(hidden.dtype)

    def one_chunk(d_kernel, args):
        h, tgt, lz, gx, gz = args
        logits = _chunk_logits(h, w, tgt)[0]  # (its log Z, known already, is dead code to XLA)
        d_h, d_w = _chunk_grads(h, w, tgt, logits, lz, gx, gz)
        return d_kernel + d_w, d_h

    chunks = (_chunks(hidden, chunk), _chunks(targets, chunk), log_z, g_xent, g_log_z)
    d_kernel, d_hidden = jax.lax.scan(one_chunk, jnp.zeros(kernel.shape, jnp.float32), chunks)
    return _unchunk(d_hidden, hidden.shape[1]).astype(hidden.dtype), d_kernel.astype(kernel.dtype), None


token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def token_entropy(hidden: jax.Array, kernel: jax.Array, chunk: int) -> jax.Array:
    """The entropy [B, T] (float32) of each position's next-token distribution, `chunk` positions
    of logits at a time (a metric: not differentiated)."""
    w = kernel.astype(hidden.dtype)

    def one_chunk(_, h):
        logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        return None, log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)

    _, entropy = jax.lax.scan(one_chunk, None, _chunks(jax.lax.stop_gradient(hidden), chunk))
    return _unchunk(entropy, hidden.shape[1])


def _weighted_sums(xent, log_z, weights, z_loss):
    xent_sum = jnp.sum(xent * weights)
    return xent_sum + z_loss * jnp.sum(log_z**2 * weights), xent_sum


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def weighted_loss(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """(sum(weights * xent) + z_loss * sum(weights * log Z**2), sum(weights * xent)): the
    pre-training and fine-tuning objective over tokens [B, T], and its cross-entropy part.

    The fused linear + cross-entropy of `token_losses` with the gradient made in the forward
    pass: a scalar objective's cotangent only scales it, so each chunk's logits are computed
    once, not again in the backward pass (a quarter of the output projection's FLOPs and a pass
    over the logits saved). Without differentiation no gradient is made. With a z-loss only the
    objective is differentiable."""
    return _weighted_sums(*token_losses(hidden, kernel, targets, chunk), weights, z_loss)


def _weighted_loss_fwd(hidden, kernel, targets, weights, z_loss, chunk):
    grad_kernel = kernel.perturbed  # a frozen projection (LoRA) needs no gradient
    hidden, kernel, targets, weights = hidden.value, kernel.value, targets.value, weights.value
    w = kernel.astype(hidden.dtype)

    def one_chunk(d_kernel, args):
        h, tgt, wt = args
        logits, log_z, xent = _chunk_logits(h, w, tgt)
        d_h, d_w = _chunk_grads(h, w, tgt, logits, log_z, wt, 2 * z_loss * wt * log_z, grad_kernel)
        return (d_kernel + d_w if grad_kernel else None), (xent, log_z, d_h)

    chunks = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights.astype(jnp.float32), chunk))
    d_kernel = jnp.zeros(kernel.shape, jnp.float32) if grad_kernel else None
    d_kernel, (xent, log_z, d_hidden) = jax.lax.scan(one_chunk, d_kernel, chunks)
    t = hidden.shape[1]
    sums = _weighted_sums(_unchunk(xent, t), _unchunk(log_z, t), weights, z_loss)
    return sums, (_unchunk(d_hidden, t), None if d_kernel is None else d_kernel.astype(kernel.dtype))


def _weighted_loss_bwd(z_loss, chunk, residuals, cotangents):
    d_hidden, d_kernel = residuals
    g, g_xent = (None if isinstance(c, jax.custom_derivatives.SymbolicZero) else c for c in cotangents)
    if g_xent is not None:
        if z_loss:  # the two outputs differ by the z-loss, whose gradient alone is not kept
            raise TypeError("weighted_loss: with a z-loss, differentiate the objective, not its cross-entropy part")
        g = g_xent if g is None else g + g_xent  # without one they are the same function
    if g is None:
        return None, None, None, None
    d_kernel = None if d_kernel is None else (g * d_kernel).astype(d_kernel.dtype)
    return (g * d_hidden).astype(d_hidden.dtype), d_kernel, None, None


weighted_loss.defvjp(_weighted_loss_fwd, _weighted_loss_bwd, symbolic_zeros=True)


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] values summed per segment: [B, T + 1], column s for segment s (0: padding)."""
    b, t = values.shape
    ids = segment_ids + (t + 1) * jnp.arange(b)[:, None]
    return jax.ops.segment_sum(values.ravel(), ids.ravel(), num_segments=b * (t + 1)).reshape(b, t + 1)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, chosen reward, rejected reward) from summed response log-probabilities; a reward
    is beta * (policy - reference) log-probability."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected


def pair_sums(values: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected, present) [B, T/2] of a packed batch of pairs (pair k of a row is segments
    2k+1 and 2k+2): each sequence's sum of `values` [B, T], and 1 where the pair exists."""
    pairs = segment_ids.shape[1] // 2

    def chosen_rejected(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        sums = segment_sums(x, segment_ids)
        return sums[:, 1::2][:, :pairs], sums[:, 2::2][:, :pairs]

    present = (chosen_rejected((segment_ids > 0).astype(jnp.float32))[0] > 0).astype(jnp.float32)
    return *chosen_rejected(values), present


def preference_sums(loss, chosen, rejected, present) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss summed over the present pairs, metric sums with the pair "count")."""
    margin = chosen - rejected
    sums = {
        "loss": jnp.sum(loss * present),
        "reward_margin": jnp.sum(margin * present),
        "reward_accuracy": jnp.sum((margin > 0) * present),
        "chosen_reward": jnp.sum(chosen * present),
        "rejected_reward": jnp.sum(rejected * present),
        "count": jnp.sum(present),
    }
    return sums["loss"], sums


def dpo_sums(
    policy: jax.Array, reference: jax.Array, segment_ids: jax.Array, beta: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(DPO loss summed over the pairs of a packed batch, metric sums with the pair "count").
    policy, reference: [B, T] log-probabilities of the targets, 0 off the responses."""
    policy_chosen, policy_rejected, present = pair_sums(policy, segment_ids)
    reference_chosen, reference_rejected, _ = pair_sums(reference, segment_ids)
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    return preference_sums(loss, chosen, rejected, present)


def reward_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array) -> jax.Array:
    """Llama 2's binary ranking loss with a margin: -log sigmoid(r_chosen - r_rejected - margin)."""
    return -jax.nn.log_sigmoid(chosen - rejected - margin)


def reward_sums(
    scores: jax.Array, last: jax.Array, margin: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(ranking loss summed over the pairs of a packed batch, metric sums with the pair "count").
    scores [B, T] of the reward model, read where `last` (1 on each sequence's last token) is."""
    last = last.astype(jnp.float32)
    chosen, rejected, present = pair_sums(scores * last, segment_ids)
    pair_margin = pair_sums(margin * last, segment_ids)[0]  # the chosen sequence's copy of it
    return preference_sums(reward_loss(chosen, rejected, pair_margin), chosen, rejected, present)
