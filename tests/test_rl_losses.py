"""GAE, PPO's clipped losses and GRPO's objective against plain NumPy loops of the textbook formulas,
on fixed random arrays with responses of different lengths."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.rl import losses

RNG = np.random.default_rng(0)
B, N = 4, 7
LENGTHS = [7, 3, 5, 1]
MASK = np.array([[1.0] * n + [0.0] * (N - n) for n in LENGTHS])
REWARDS = RNG.normal(size=(B, N)) * MASK
VALUES = RNG.normal(size=(B, N)) * MASK
LOGP = -RNG.uniform(0.1, 3, (B, N))
OLD_LOGP = LOGP + RNG.normal(0, 0.3, (B, N))  # ratios both inside and outside 1 +- 0.2
REF_LOGP = LOGP + RNG.normal(0, 0.5, (B, N))


def f32(x):
    return jnp.asarray(x, jnp.float32)


def test_gae_equals_the_recursion_by_hand():
    gamma, lam = 0.9, 0.8
    advantages, returns = losses.gae(f32(REWARDS), f32(VALUES), f32(MASK), gamma, lam)
    expected = np.zeros((B, N))
    for b, n in enumerate(LENGTHS):
        last = 0.0
        for t in reversed(range(n)):
            next_value = VALUES[b, t + 1] if t + 1 < n else 0.0
            delta = REWARDS[b, t] + gamma * next_value - VALUES[b, t]
            last = delta + gamma * lam * last
            expected[b, t] = last
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, (expected + VALUES) * MASK, rtol=1e-5, atol=1e-6)
    # lam = 1, gamma = 1: the advantage is the sum of the rewards to go minus the value.
    a1, _ = losses.gae(f32(REWARDS), f32(VALUES), f32(MASK), 1.0, 1.0)
    to_go = np.array(
        [[REWARDS[b, t:n].sum() - VALUES[b, t] if t < n else 0 for t in range(N)] for b, n in enumerate(LENGTHS)]
    )
    np.testing.assert_allclose(a1, to_go, rtol=1e-5, atol=1e-5)


def test_kl_rewards_whitening_and_explained_variance():
    scores = RNG.normal(size=B)
    got = losses.kl_rewards(f32(scores), f32(LOGP), f32(REF_LOGP), f32(MASK), 0.05)
    expected = -0.05 * (LOGP - REF_LOGP) * MASK
    for b, n in enumerate(LENGTHS):
        expected[b, n - 1] += scores[b]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    x = RNG.normal(size=(B, N))
    on = x[MASK > 0]
    np.testing.assert_allclose(
        losses.masked_whiten(f32(x), f32(MASK))[MASK > 0], (on - on.mean()) / on.std(), rtol=1e-4
    )
    returns = RNG.normal(size=(B, N))
    ev = 1 - np.var((returns - VALUES)[MASK > 0]) / np.var(returns[MASK > 0])
    assert float(losses.explained_variance(f32(VALUES), f32(returns), f32(MASK))) == pytest.approx(ev, rel=1e-5)


def test_ppo_losses_equal_the_clipped_formulas():
    advantages = RNG.normal(size=(B, N))
    loss, clip_fraction = losses.ppo_policy_loss(f32(LOGP), f32(OLD_LOGP), f32(advantages), f32(MASK), 0.2)
    terms, clipped = [], []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            ratio = math.exp(LOGP[b, t] - OLD_LOGP[b, t])
            a = advantages[b, t]
            terms.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
            clipped.append(abs(ratio - 1) > 0.2)
    assert 0 < np.mean(clipped) < 1  # both kinds of token are there
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)
    assert float(clip_fraction) == pytest.approx(np.mean(clipped), rel=1e-6)

    old_values, returns = VALUES + RNG.normal(0, 0.3, (B, N)), RNG.normal(size=(B, N))
    value_loss = losses.ppo_value_loss(f32(VALUES), f32(old_values), f32(returns), f32(MASK), 0.2)
    terms = []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            v, v_old, r = VALUES[b, t], old_values[b, t], returns[b, t]
            v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
            terms.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
    assert float(value_loss) == pytest.approx(np.mean(terms), rel=1e-5)


def test_grpo_advantages_and_loss_equal_the_formulas():
    group = 2
    scores = np.array([1.0, 3.0, -2.0, -2.5])
    advantages = losses.group_advantages(f32(scores), group)
    by_hand = []
    for g in range(0, B, group):
        s = scores[g : g + group]
        by_hand += [(x - s.mean()) / (s.std() + 1e-4) for x in s]
    np.testing.assert_allclose(advantages, by_hand, rtol=1e-5)
    a = RNG.normal(size=B)
    loss, metrics = losses.grpo_loss(f32(LOGP), f32(OLD_LOGP), f32(REF_LOGP), f32(a), f32(MASK), 0.2, 0.04)
    per_sequence, kls = [], []
    for b, n in enumerate(LENGTHS):
        terms = []
        for t in range(n):
            ratio = math.exp(LOGP[b, t] - OLD_LOGP[b, t])
            surrogate = min(ratio * a[b], min(max(ratio, 0.8), 1.2) * a[b])
            kl = math.exp(REF_LOGP[b, t] - LOGP[b, t]) - (REF_LOGP[b, t] - LOGP[b, t]) - 1
            terms.append(-(surrogate - 0.04 * kl))
            kls.append(kl)
        per_sequence.append(np.mean(terms))
    assert float(loss) == pytest.approx(np.mean(per_sequence), rel=1e-5)
    assert float(metrics["kl_estimate"]) == pytest.approx(np.mean(kls), rel=1e-5)
