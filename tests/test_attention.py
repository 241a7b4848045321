"""The kernel implementations against the XLA reference: splash attention (the Pallas TPU kernel,
run in Pallas' interpreter on CPU) and tokamax (on CPU its XLA backend: this checks our use of it
-- layout, mask, heads, sharding -- while benchmarks/attention.py checks its GPU kernels): packed
documents, padding, grouped-query heads, gradients, sharding, and the splash kernel compiled ahead
of time into a TPU train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from llama_jax import aot, sharding
from llama_jax import attention as attention_lib
from llama_jax.attention import attention
from llama_jax.config import get_preset
from llama_jax.step import Tuning, build
from llama_jax.train_config import TrainConfig

B, T, H, KV, D = 2, 256, 4, 2, 64


def packed_segments(seed: int, b: int = B, t: int = T) -> np.ndarray:
    """[b, t] segment ids: each row a few documents of random lengths (ids 1, 2, ...) and a padding
    tail (0), document boundaries falling inside and across 128-token kernel blocks."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in seg:
        cuts = np.sort(rng.choice(np.arange(1, t - 16), size=3, replace=False))
        for doc, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True), start=1):
            row[lo:hi] = doc  # the tail after the last cut stays padding
    return seg


def qkv(seed: int, dtype, b: int = B, t: int = T):
    kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    shape_kv = (b, t, KV, D)
    return tuple(
        jax.random.normal(key, shape, jnp.float32).astype(dtype)
        for key, shape in ((kq, (b, t, H, D)), (kk, shape_kv), (kv_, shape_kv))
    )


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "dtype, tol",
    [
        # float32: the same math in another order (online softmax over blocks): ~1e-7 per element,
        # measured <= 2e-6 relative in the gradients; 1e-5 leaves room and still catches any mask error.
        (jnp.float32, 1e-5),
        # bfloat16: inputs, probabilities and outputs are rounded to 8 mantissa bits (eps 2^-8 = 0.4%)
        # at different points in each implementation; a few eps of the norm, well under any mask error.
        (jnp.bfloat16, 2e-2),
    ],
)
@pytest.mark.parametrize("impl", ["splash", "tokamax"])
def test_kernel_matches_xla_on_packed_gqa_batch(impl, dtype, tol, monkeypatch):
    """Output and gradients wrt q, k, v, with 128-token blocks: a 2x2 block grid, so the kernel
    skips the block above the diagonal and masks the diagonal ones."""
    monkeypatch.setattr(attention_lib, "SPLASH_BLOCKS", (128,))
    seg = jnp.asarray(packed_segments(0))
    q, k, v = qkv(1, dtype)
    cot = jax.random.normal(jax.random.key(2), q.shape, jnp.float32).astype(dtype)

    def run(impl):
        f = lambda q, k, v: attention(q, k, v, seg, seg, 0, impl)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cot)

    out, grads = run(impl)
    ref_out, ref_grads = run("xla")
    errors = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    print(f"{jnp.dtype(dtype).name} relative errors out, dq, dk, dv: {errors}")
    assert max(errors) < tol, errors


@pytest.mark.parametrize("impl, seed", [("splash", 0), ("splash", 1), ("tokamax", 0)])
def test_kernel_output_ignores_other_documents(impl, seed):
    """Replacing one document's q, k and v leaves every other document's output (and padding's)
    exactly unchanged: masked scores contribute exact zeros, whatever their values."""
    seg = packed_segments(seed, b=1)
    q, k, v = qkv(seed, jnp.float32, b=1)
    other = seg == 2
    fresh = qkv(seed + 10, jnp.float32, b=1)
    new_q, new_k, new_v = (jnp.where(other[..., None, None], 5 * y, x) for x, y in zip((q, k, v), fresh, strict=True))
    run = lambda q, k, v: np.asarray(attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), 0, impl))
    before, after = run(q, k, v), run(new_q, new_k, new_v)
    np.testing.assert_array_equal(after[~other], before[~other])
    assert not np.allclose(after[other], before[other])  # the changed document itself does change


@pytest.mark.parametrize("impl", ["splash", "tokamax"])
def test_kernel_falls_back_to_xla_for_decoding_and_untileable_lengths(impl):
    seg = jnp.ones((1, 8), jnp.int32)
    kv_seg = jnp.ones((1, 16), jnp.int32)
    q, k, v = qkv(3, jnp.float32, b=1, t=16)
    q = q[:, :8]
    for offset in (jnp.int32(8), 0):  # traced offset, and T != S: both the XLA path
        np.testing.assert_array_equal(
            attention(q, k, v, seg, kv_seg, offset, impl), attention(q, k, v, seg, kv_seg, offset, "xla")
        )
    q, k, v = qkv(3, jnp.float32, b=1, t=192)  # not a multiple of the 128-token tile
    seg = jnp.ones((1, 192), jnp.int32)
    np.testing.assert_array_equal(attention(q, k, v, seg, seg, 0, impl), attention(q, k, v, seg, seg, 0, "xla"))


@pytest.mark.parametrize(
    "rules",
    [
        (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor")),  # as sharding/fsdp_tp.toml
        (("batch", "data"), ("heads", "tensor")),  # KV heads replicated: q heads must follow them
    ],
)
@pytest.mark.parametrize("impl", ["splash", "tokamax"])
def test_kernel_sharded_over_batch_and_heads_matches_xla(impl, rules):
    """Under a mesh each device runs the kernel on its own rows and heads (a shard_map); every query
    head stays on the device of its KV head."""
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    seg = jnp.asarray(packed_segments(4))
    q, k, v = qkv(4, jnp.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda q, k, v: attention(q, k, v, seg, seg, 0, impl))(q, k, v)
    assert rel(out, attention(q, k, v, seg, seg, 0, "xla")) < 1e-5


def test_train_step_with_splash_compiles_to_a_mosaic_kernel_for_a_tpu_topology():
    """The real train step (fsdp over v5p:2x2x1, 4 chips), compiled ahead of time: attention
    forward and backward are Mosaic custom calls, not XLA einsums."""
    cfg = TrainConfig(model="tiny", sharding="fsdp", batch_size=8, seq_len=256, dtype="bfloat16", steps=10)
    devices = aot.topology_devices(aot.parse_topology("v5p:2x2x1"))
    step = build(cfg, get_preset("tiny"), Tuning.from_config(cfg), devices)
    assert step.model.attention_impl == "splash"  # 'auto' on a TPU
    with sharding.activate(step.plan, step.mesh):
        hlo = step.run.lower(step.state, step.batch).compile().as_text()
    assert "tpu_custom_call" in hlo
    for phase in ("fwd", "dq", "dkv"):
        assert f"splash_mha_{phase}_segmented" in hlo, phase
