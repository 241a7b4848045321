"""Grouped-query attention with causal + document (segment) masking.

Queries sit at cache slots `q_offset + t`; key slot `s` is visible to a query when `s <= q_slot`
and both carry the same segment id (padding is segment 0). Training, scoring and decoding all use
this one rule. Implementations: "xla" (the reference), "cudnn" (`jax.nn.dot_product_attention`),
"splash" (Pallas, TPUs; interpreted elsewhere) and "tokamax" (the `cuda` extra). The kernels cover
the no-cache case at lengths divisible by 128; the rest falls back to the XLA path, which computes
the same function."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from llama_jax.precision import einsum_f32

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "tokamax")
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the sequence; splash needs multiples of 128


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    implementation: str = "xla",
) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, S, KV, D]; segment ids [B, T] and [B, S] -> [B, T, H, D].
    q_offset: one for all rows, or one per row [B] (paged serving)."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    causal = isinstance(q_offset, int) and q_offset == 0 and t == s  # queries at slots 0..T-1
    if implementation in ("splash", "tokamax") and causal and t % SPLASH_BLOCKS[-1] == 0:
        kernel = _splash if implementation == "splash" else _tokamax
        return _per_device(kernel, q, k, v, q_segment_ids, kv_segment_ids)
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    q_slot = jnp.reshape(q_offset, (-1, 1)) + jnp.arange(t)  # [B or 1, T]
    in_order = jnp.arange(s) <= q_slot[:, :, None]  # key at or before the query
    if implementation == "cudnn":
        # Training and scoring use cuDNN's own causal mask, which lets the kernel skip the blocks
        # above the diagonal; decoding passes the whole mask.
        mask = same_doc if causal else same_doc & in_order
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=causal, implementation="cudnn")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    mask = same_doc & in_order
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = einsum_f32("btkgd,bskd->bkgts", qg, k) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # v as the left operand: the other order makes TPU layout assignment lay v out with the key
    # axis minor, and it then relays out the whole paged KV cache that v's pages come from.
    out = jnp.einsum("bskd,bkgts->btkgd", v, probs)
    return out.reshape(b, t, h, d)


def splash_block(length: int) -> int:
    """The kernel's tile size (queries and keys) for a sequence length divisible by 128."""
    return next(block for block in SPLASH_BLOCKS if length % block == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, block: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for one sequence: q [H, T, D], k/v [KV, T, D] (KV dividing H), causal."""
    sizes = splash.BlockSizes(*[block] * 8)  # forward, dk/dv and dq passes alike
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, q_seg, kv_seg, platform: str):
    kernel = _splash_kernel(q.shape[2], q.shape[1], splash_block(q.shape[1]), platform != "tpu")
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale the scores
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, T, H, D] -> [B, H, T, D]
    seg = splash.SegmentIds(q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
    return heads_first(jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v), seg))


def _tokamax(q, k, v, q_seg, kv_seg, platform: str):
    import tokamax  # the `cuda` extra
    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax reads its options from absl flags, else parsing our sys.argv
        flags.FLAGS.mark_as_parsed()
    same_doc = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]  # [B, 1, T, S]
    return tokamax.dot_product_attention(q, k, v, mask=same_doc, is_causal=True)


def _per_device(kernel, q, k, v, q_segment_ids, kv_segment_ids):
    """A Pallas kernel over the batch, inside a shard_map over the current mesh (Pallas kernels
    are not partitioned automatically): each device runs it on its own rows and heads, with whole
    sequences (the kernel needs every key of its queries)."""
    mesh = jax.sharding.get_abstract_mesh()  # the target devices (also when compiling ahead of time)
    platform = jax.default_backend() if mesh.empty or mesh.abstract_device is None else mesh.abstract_device.platform
    local = functools.partial(kernel, platform=platform)
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    # Rows and heads split as the model's activations are under the active rules; a query head's
    # group goes with its KV head, so both follow the kv_heads rule. Sequence and head_dim stay whole.
    batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
    qkv, seg = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv, check_vma=False)(
        q, k, v, q_segment_ids, kv_segment_ids
    )
