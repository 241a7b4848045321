"""Sampling filters on hand-made distributions, seeding and batch independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import get_preset
from llama_jax.generate import Sampling, filter_logits, generate, sample, stream
from llama_jax.model import Llama, init_params


def kept(logits, top_k, top_p):
    out = np.asarray(filter_logits(jnp.log(jnp.asarray([logits], jnp.float32)), top_k, top_p))[0]
    return set(np.flatnonzero(np.isfinite(out)).tolist())


# probabilities deliberately out of order, so the filter must sort and unsort
PROBS = [0.05, 0.30, 0.10, 0.40, 0.15]  # by rank: 3 (0.40), 1 (0.30), 4 (0.15), 2 (0.10), 0 (0.05)


def test_top_k_keeps_the_k_most_likely():
    assert kept(PROBS, 1, 1.0) == {3}
    assert kept(PROBS, 3, 1.0) == {3, 1, 4}
    assert kept(PROBS, 0, 1.0) == {0, 1, 2, 3, 4}


def test_top_p_uses_meta_semantics():
    # A token is dropped when the mass strictly before it exceeds top_p:
    # mass before each rank: 0, 0.40, 0.70, 0.85, 0.95
    assert kept(PROBS, 0, 0.35) == {3}  # the top token always stays
    assert kept(PROBS, 0, 0.5) == {3, 1}
    assert kept(PROBS, 0, 0.75) == {3, 1, 4}
    assert kept(PROBS, 0, 0.9) == {3, 1, 4, 2}
    assert kept(PROBS, 2, 0.9) == {3, 1}  # top-k and top-p together


def test_filtered_samples_follow_the_renormalised_distribution():
    logits = jnp.log(jnp.asarray([PROBS] * 4000, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(sample(logits, keys, Sampling(temperature=1.0, top_p=0.75)))
    counts = np.bincount(draws, minlength=5) / len(draws)
    assert set(np.flatnonzero(counts)) == {1, 3, 4}
    expected = np.array([0, 0.30, 0, 0.40, 0.15]) / 0.85
    # 4000 draws: standard error <= sqrt(.25/4000) = 0.008; 0.04 is 5 sigma.
    np.testing.assert_allclose(counts, expected, atol=0.04)


def test_invalid_sampling_values():
    for bad in [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-1)]:
        with pytest.raises(ValueError):
            Sampling(**bad)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny-llama2")
    return Llama(cfg), init_params(cfg, jax.random.key(0))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37]]
HOT = Sampling(temperature=1.0, top_p=0.95, top_k=40)


def test_same_seed_same_output_and_seeds_matter(tiny):
    model, params = tiny
    a = generate(model, params, PROMPTS, 16, HOT, seed=1)
    b = generate(model, params, PROMPTS, 16, HOT, seed=1)
    c = generate(model, params, PROMPTS, 16, HOT, seed=2)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_rows_do_not_depend_on_their_batch(tiny):
    model, params = tiny
    alone = generate(model, params, PROMPTS[:1], 16, HOT, seed=7)[0]
    for batch in ([PROMPTS[1], PROMPTS[0]], [PROMPTS[0], PROMPTS[2], PROMPTS[1]], [PROMPTS[2]] * 3 + [PROMPTS[0]]):
        row = [
            c for p, c in zip(batch, generate(model, params, batch, 16, HOT, seed=7), strict=True) if p == PROMPTS[0]
        ][0]
        assert row.tokens == alone.tokens
    repeated = generate(model, params, [PROMPTS[0]] * 3, 16, HOT, seed=7)
    assert len({tuple(c.tokens) for c in repeated}) == 3  # repeats of a prompt get their own streams


def test_stream_equals_generate_and_stops(tiny):
    model, params = tiny
    full = generate(model, params, PROMPTS, 12, HOT, seed=3)
    steps = list(stream(model, params, PROMPTS, 12, HOT, seed=3))
    for i, c in enumerate(full):
        assert [s[i] for s in steps if s[i] is not None] == c.tokens
    stop = full[0].tokens[4]
    stopped = generate(model, params, PROMPTS[:1], 12, HOT, stop_ids=[stop], seed=3)[0]
    assert stopped.finish_reason == "stop" and stopped.tokens == full[0].tokens[: full[0].tokens.index(stop)]
    assert full[1].finish_reason == "length" and len(full[1].tokens) == 12
