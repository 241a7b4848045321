"""The model itself: KV-cache decoding, packed documents, RoPE scaling, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import RopeScaling, get_preset
from llama_jax.model import Llama, init_cache, init_params, param_logical_axes, rope_inv_freq

CFG = get_preset("tiny-llama3").replace(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_kv_cache_decoding_equals_full_forward(params):
    """Prefill 7 tokens, then decode one at a time: same logits as one full forward."""
    model = Llama(CFG)
    tokens = jax.random.randint(jax.random.key(1), (3, 40), 0, CFG.vocab_size)
    full, _ = model.apply({"params": params}, tokens)
    cache = init_cache(CFG, 3, 48)
    step, cache = model.apply({"params": params}, tokens[:, :7], cache=cache, cache_index=0)
    outs = [step]
    for i in range(7, 40):
        step, cache = model.apply({"params": params}, tokens[:, i : i + 1], cache=cache, cache_index=i)
        outs.append(step)
    # float32: both paths do the same arithmetic up to reduction order (~1e-7 relative).
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


def test_packed_documents_do_not_see_each_other(params):
    """A document's logits are the same alone and packed after another document."""
    model = Llama(CFG)
    a = jax.random.randint(jax.random.key(2), (1, 11), 0, CFG.vocab_size)
    b = jax.random.randint(jax.random.key(3), (1, 13), 0, CFG.vocab_size)
    alone_a, _ = model.apply({"params": params}, a)
    alone_b, _ = model.apply({"params": params}, b)
    packed = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([jnp.arange(11), jnp.arange(13)])[None]
    segments = jnp.concatenate([jnp.full(11, 1), jnp.full(13, 2)])[None]
    logits, _ = model.apply({"params": params}, packed, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(logits[:, :11], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 11:], alone_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor,head_dim,orig", [(8.0, 128, 8192), (32.0, 64, 8192), (8.0, 16, 16)])
def test_rope_scaling_matches_transformers(factor, head_dim, orig):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope |= {"original_max_position_embeddings": orig, "rope_theta": 500000.0}
    hf = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    cfg = CFG.replace(
        dim=head_dim * 4, head_dim=head_dim, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor, 1.0, 4.0, orig),
    )  # fmt: skip
    # Both evaluate the same formula; ours in float64 then rounded, theirs in float32.
    np.testing.assert_allclose(rope_inv_freq(cfg), theirs.numpy(), rtol=1e-6)
    assert not np.allclose(rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_scaling=None)))


def test_every_parameter_has_logical_axes(params):
    axes = param_logical_axes(CFG)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(
        jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    )
    assert len(flat_p) == len(flat_a) == 12
    for path, leaf in flat_p:
        spec = flat_a[path]
        assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), (path, spec)
        if "layers" in jax.tree_util.keystr(path):
            assert spec[0] == "layers" and leaf.shape[0] == CFG.n_layers


def test_unrolled_layer_loop_computes_the_same(params):
    """Unrolling the loop over layers changes the program, not the function: logits, the cache and
    the gradient agree with the rolled loop."""
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, CFG.vocab_size)
    models = Llama(CFG), Llama(CFG, scan_unroll=CFG.n_layers)
    outs = [m.apply({"params": params}, tokens, cache=init_cache(CFG, 2, 12), cache_index=0) for m in models]
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-6, rtol=0)  # float32, same arithmetic
    np.testing.assert_allclose(outs[0][1]["k"], outs[1][1]["k"], atol=1e-6, rtol=0)
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, tokens)[0] ** 2))(params) for m in models]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_rematerialised_unrolled_layers_keep_their_recomputation(params):
    """With the layer loop gone, only an optimization barrier keeps XLA from merging the
    recomputed forward pass back into the first one (which undoes the remat: seen on the GPU
    backend); inside a loop none is needed."""
    tokens = jnp.zeros((1, 8), jnp.int32)

    def barriers(remat, unroll):
        model = Llama(CFG, remat=remat, scan_unroll=unroll)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0])))
        return grad.lower(params).as_text().count("optimization_barrier")

    assert barriers("full", CFG.n_layers) > 0
    assert barriers("full", 1) == barriers("none", CFG.n_layers) == 0
