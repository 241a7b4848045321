"""The formulas of PPO (Schulman et al. 2017; GAE, Schulman et al. 2016) and GRPO (Shao et al.
2024), on response-aligned arrays [B, N]: position j of a row is its j-th response token, `mask`
1 on the tokens the policy generated (up to and including the stop token), 0 after them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (population variance), 0 off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def kl_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """Llama 2's per-token reward: -beta * (log pi - log pi_ref) on every response token, plus the
    sequence's score on its last one."""
    last = mask * (1 - jnp.pad(mask[:, 1:], ((0, 0), (0, 1))))  # 1 on each row's last response token
    return (-beta * (logp - ref_logp) + scores[:, None] * last) * mask


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) by generalised advantage estimation: delta_j = r_j + gamma V_{j+1} - V_j,
    A_j = delta_j + gamma lam A_{j+1}, with V and A zero past a row's last token; returns A + V."""
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_mask
    deltas = rewards + gamma * next_values - values

    def back(carry, x):
        delta, keep = x
        advantage = delta + gamma * lam * carry * keep
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0]), (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, clip: float
) -> tuple[jax.Array, jax.Array]:
    """(the clipped surrogate loss, the share of tokens whose ratio was clipped), token means:
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = pi / pi_old."""
    ratio = jnp.exp(logp - old_logp)
    losses = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip))
    clipped = (jnp.abs(ratio - 1) > clip).astype(jnp.float32)
    return masked_mean(losses, mask), masked_mean(clipped, mask)


def ppo_value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, clip: float
) -> jax.Array:
    """The clipped value loss, a token mean: 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2)."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(R - V) / Var(R) over the response tokens: 1 when the values predict the returns."""

    def var(x):
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    return 1 - var(returns - values) / jnp.maximum(var(returns), 1e-12)


def group_advantages(scores: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
    """GRPO's advantage of each of G completions of a prompt (consecutive rows): its score minus
    the group's mean, over the group's standard deviation (population) + eps."""
    groups = scores.reshape(-1, group_size)
    mean, std = groups.mean(axis=1, keepdims=True), groups.std(axis=1, keepdims=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip: float,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's objective as a loss: per token -(min(r A, clip(r, 1 +- eps) A) - beta KL), KL the
    unbiased estimate pi_ref/pi - log(pi_ref/pi) - 1; averaged over each sequence's tokens, then
    over the sequences. advantages [B] hold for every token of a row."""
    ratio = jnp.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - clip, 1 + clip) * a)
    kl = jnp.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_sequence = jnp.sum((beta * kl - surrogate) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    clipped = (jnp.abs(ratio - 1) > clip).astype(jnp.float32)
    return jnp.mean(per_sequence), {"kl_estimate": masked_mean(kl, mask), "clip_fraction": masked_mean(clipped, mask)}
