"""The Llama 1/2/3 transformer in Flax Linen.

One forward serves training, scoring and KV-cache decoding. For training, layers are stacked
with `nn.scan`: every layer parameter has a leading `layers` axis (the canonical layout, the one
checkpoints hold). For inference (`per_layer=True`) each layer is its own module `layers_{i}`
with its own arrays and its own KV-cache buffers: a step then reads each weight in place. A
loop over stacked weights slices them, and where a GEMM library needs whole operands (cuBLAS)
each slice is a copy of the layer's weights, every step (per_layer.py converts). Every
parameter and activation carries logical axis names; sharding plans map them to a mesh from
outside.

RoPE uses the rotate-half convention (pairs `(x[i], x[i + head_dim/2])`), as Hugging Face
stores q/k; Meta's interleaved layout is permuted at the converter boundary.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.attention import IMPLEMENTATIONS, attention
from llama_jax.config import LlamaConfig
from llama_jax.dtypes import parse_dtype
from llama_jax.linear import INIT, dense
from llama_jax.paged import PagedCache, paged_attention
from llama_jax.per_layer import unstack_layers

Params = dict[str, Any]
# k, v: [layers, batch, cache_len, kv_heads, head_dim], or per layer a list of [batch, cache_len,
# kv_heads, head_dim]; segment_ids: [batch, cache_len]
Cache = dict[str, Any]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2], with Llama 3.1-style scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs is not None:
        wavelen = 2 * np.pi / inv
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        mid = (1 - smooth) * inv / rs.factor + smooth * inv
        inv = np.where(wavelen > low_wl, inv / rs.factor, np.where(wavelen < high_wl, inv, mid))
    return inv.astype(np.float32)


def rope_angles(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim/2] in float32 for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves of x [B, T, H, D] by the angles [B, T, D/2], in float32."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig
    dtype: Any
    param_dtype: Any
    implementation: str
    fused_qkv: bool = False  # one `wqkv` projection (see fuse_qkv) instead of wq, wk, wv

    @nn.compact
    def __call__(self, x, cos, sin, layer_cache, q_segment_ids, kv_segment_ids, cache_index):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        heads = ("batch", "length", "heads", "head_dim")
        kv_heads = ("batch", "length", "kv_heads", "head_dim")
        proj = lambda features, names, name: dense(features, 1, names, name, dt, pdt, c.quantization)(x)  # noqa: E731
        if self.fused_qkv:
            group = c.n_heads // c.n_kv_heads
            qkv = proj((c.n_kv_heads, group + 2, c.head_dim), ("embed", "kv_heads", "qkv", "head_dim"), "wqkv")
            q = qkv[:, :, :, :group].reshape(*x.shape[:2], c.n_heads, c.head_dim)
            k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
        else:
            q = proj((c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), "wq")
            k = proj((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "wk")
            v = proj((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "wv")
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), heads)
        k = nn.with_logical_constraint(apply_rope(k, cos, sin), kv_heads)
        v = nn.with_logical_constraint(v, kv_heads)
        if isinstance(cache_index, PagedCache):  # layer_cache is this layer's index into the page pools
            paged = cache_index.write(layer_cache, k, v)
            out, paged = paged_attention(q, paged, layer_cache, self.implementation)
            layer_cache = paged  # the updated pools, for the next layer
        else:
            if layer_cache is not None:
                at = (0, cache_index, 0, 0)
                k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), at)
                v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), at)
                layer_cache = {"k": k, "v": v}
                k = nn.with_logical_constraint(k, ("batch", "cache_length", "kv_heads", "head_dim"))
                v = nn.with_logical_constraint(v, ("batch", "cache_length", "kv_heads", "head_dim"))
            # Without a cache the keys are this call's own tokens: queries sit at slots 0..T-1 (a static 0
            # lets a fused kernel use its causal mask).
            q_offset = 0 if layer_cache is None else cache_index
            out = attention(q, k.astype(dt), v.astype(dt), q_segment_ids, kv_segment_ids, q_offset, self.implementation)
        out = nn.with_logical_constraint(out, heads)
        out = dense(c.dim, 2, ("heads", "head_dim", "embed"), "wo", dt, pdt, c.quantization)(out)
        return out, layer_cache


class FeedForward(nn.Module):
    cfg: LlamaConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        gate = dense(c.ffn_dim, 1, ("embed", "mlp"), "w1", dt, pdt, c.quantization)(x)
        up = dense(c.ffn_dim, 1, ("embed", "mlp"), "w3", dt, pdt, c.quantization)(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(c.dim, 1, ("mlp", "embed"), "w2", dt, pdt, c.quantization)(h)


class Block(nn.Module):
    """A pre-norm transformer layer; the `nn.scan` body (carry: x and the page pools of a paged
    cache, or None; per layer: its cache slice, or its index into the pools)."""

    cfg: LlamaConfig
    dtype: Any
    param_dtype: Any
    implementation: str
    fused_qkv: bool = False

    @nn.compact
    def __call__(self, carry, layer_cache, rope, segments, cache_index):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        x, paged = carry
        h = RMSNorm(c.norm_eps, dt, pdt, name="attention_norm")(x)
        attn, layer_cache = Attention(c, dt, pdt, self.implementation, self.fused_qkv, name="attention")(
            h, *rope, layer_cache, *segments, cache_index if paged is None else paged
        )
        if paged is not None:
            paged, layer_cache = layer_cache, None
        x = x + attn
        x = x + FeedForward(c, dt, pdt, name="feed_forward")(RMSNorm(c.norm_eps, dt, pdt, name="ffn_norm")(x))
        return (nn.with_logical_constraint(x, ("batch", "length", "embed")), paged), layer_cache


class Llama(nn.Module):
    """tokens [B, T] -> (logits [B, T, vocab] or final hidden states [B, T, dim], cache); with
    `cfg.head == "score"`, a scalar per position [B, T] (float32) instead of logits.

    positions: RoPE positions [B, T] (default: cache_index + arange(T)).
    segment_ids: [B, T] document ids for packed sequences; 0 marks padding (default: all 1).
    cache: from `init_cache`; the T new keys/values are written at slots
      [cache_index, cache_index + T) and the updated cache is returned (else None). Or a
      `paged.PagedCache` (serving): tokens [1, N] are the new tokens of its rows, laid out as its
      groups say, positions are required, and the updated pages are returned.
    logits_at: [B, K] indices into T: logits (or hidden states) of those positions only.
    """

    cfg: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str = "xla"
    scan_unroll: int = 1  # layers per iteration of the loop over layers (n_layers: no loop at all)
    per_layer: bool = False  # one module per layer (`layers_{i}`) instead of a scan over stacked ones

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | PagedCache | None]:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embed = nn.Embed(
            c.vocab_size,
            c.dim,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(INIT, ("vocab", "embed")),
            name="tok_embeddings",
        )
        x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        rope = rope_angles(c, positions)

        layer_cache, kv_segment_ids = None, segment_ids
        paged = cache if isinstance(cache, PagedCache) else None  # each layer writes, then reads, its pages
        if paged is not None:
            paged = paged.with_buffers()
            layer_cache = jnp.arange(c.n_layers)
        elif cache is not None:
            kv_segment_ids = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids.astype(cache["segment_ids"].dtype), (0, cache_index)
            )
            layer_cache = {"k": cache["k"], "v": cache["v"]}

        block = Block
        if self.remat != "none":
            # A loop keeps XLA from merging the recomputation with the forward pass (common
            # subexpressions); fully unrolled layers need the barrier that prevent_cse adds.
            unrolled = self.per_layer or self.scan_unroll >= c.n_layers
            block = nn.remat(Block, prevent_cse=unrolled, policy=REMAT_POLICIES[self.remat])
        args = (rope, (segment_ids, kv_segment_ids), cache_index)
        carry = (x, paged)
        if self.per_layer:
            outs = []
            for i in range(c.n_layers):
                own = i if paged is not None else None  # the layer's pages, or its buffers
                if isinstance(layer_cache, dict):
                    own = {"k": layer_cache["k"][i], "v": layer_cache["v"][i]}
                carry, own = block(c, dt, pdt, self.attention_impl, True, name=f"layers_{i}")(carry, own, *args)
                outs.append(own)
            layer_cache = None if cache is None or paged is not None else {n: [o[n] for o in outs] for n in "kv"}
        else:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.n_layers,
                unroll=self.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, dt, pdt, self.attention_impl, name="layers")
            carry, layer_cache = layers(carry, layer_cache, *args)
        x, paged = carry

        if paged is not None:
            new_cache = paged
        else:
            new_cache = None if cache is None else {**layer_cache, "segment_ids": kv_segment_ids}
        x = RMSNorm(c.norm_eps, dt, pdt, name="norm")(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        if return_hidden:
            return x, new_cache
        if c.head == "score":
            return _score(x, dt, pdt), new_cache
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = dense(c.vocab_size, 1, ("embed", "vocab"), "output", dt, pdt, c.quantization)(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), new_cache


def _score(hidden: jax.Array, dtype: Any, param_dtype: Any) -> jax.Array:
    """A reward or value model's scalars [B, T] (float32) from final hidden states: the
    `score/kernel` [dim, 1] projection (no bias), as HF's LlamaForSequenceClassification."""
    scores = dense(1, 1, ("embed", "labels"), "score", dtype, param_dtype)(hidden)
    return scores[..., 0].astype(jnp.float32)


def with_head(params: Params, cfg: LlamaConfig, rng: jax.Array) -> Params:
    """A checkpoint's parameters with the head `cfg` has: a score head absent from them is drawn
    fresh (as the model initialises it), an output projection that `cfg` has none of is dropped."""
    params = {k: v for k, v in params.items() if k != "output" or (cfg.head == "lm" and not cfg.tie_embeddings)}
    if cfg.head == "score" and "score" not in params:
        dtype = np.asarray(params["norm"]["scale"]).dtype
        params["score"] = {"kernel": np.asarray(INIT(rng, (cfg.dim, 1), jnp.float32)).astype(dtype)}
    return params


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32, per_layer: bool = False) -> Cache:
    """A zeroed KV cache of `length` slots: stacked over layers, or (per_layer) a buffer per layer."""
    shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    if per_layer:
        kv = {n: [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)] for n in ("k", "v")}
    else:
        kv = {n: jnp.zeros((cfg.n_layers, *shape), dtype) for n in ("k", "v")}
    return {**kv, "segment_ids": jnp.zeros((batch, length), jnp.int32)}


def cache_axes(cache: Cache) -> dict:
    """The logical axis names of a cache's arrays (stacked or per layer), a pytree like it."""
    axes = ("batch", "cache_length", "kv_heads", "head_dim")
    per_layer = isinstance(cache["k"], list)
    kv = [axes] * len(cache["k"]) if per_layer else ("layers", *axes)
    return {"k": kv, "v": kv, "segment_ids": ("batch", "cache_length")}


def init_params(cfg: LlamaConfig, rng: jax.Array, param_dtype: Any = jnp.float32) -> Params:
    """Random parameters as a plain pytree (the canonical layout, unboxed)."""
    model = Llama(cfg, param_dtype=param_dtype)
    variables = model.init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def param_logical_axes(cfg: LlamaConfig, per_layer: bool = False) -> Params:
    """The logical axis names of every parameter, a pytree of PartitionSpec like the params."""
    model = Llama(cfg, per_layer=per_layer)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(boxed)["params"]


def repeat_kv_heads(params: Params, times: int) -> Params:
    """Each kv head of wk and wv `times` times in a row ([..., kv_heads, head_dim] -> kv_heads *
    times): the model with n_kv_heads * times computes the same function, since query head h
    then uses copy h // (heads / (kv_heads * times)) of its own kv head h // (heads / kv_heads).
    Canonical layout; host (numpy) or device arrays."""
    attention = params["layers"]["attention"]
    # A quantized kernel's scale has the kv heads at -2 too.
    xp = np if isinstance(attention["wk"]["kernel"], np.ndarray) else jnp
    repeated = {n: jax.tree.map(lambda a: xp.repeat(a, times, axis=-2), attention[n]) for n in ("wk", "wv")}
    return {**params, "layers": {**params["layers"], "attention": {**attention, **repeated}}}


def param_shapes(cfg: LlamaConfig, dtype: Any = jnp.float32, per_layer: bool = False) -> Params:
    """ShapeDtypeStructs of the parameter pytree (canonical, or per layer), without allocating it
    (float leaves in `dtype`; quantized kernels keep their integer dtype)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    if per_layer:
        shapes = jax.eval_shape(unstack_layers, shapes)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype if s.dtype.kind in "iu" else dtype), shapes)


def build_model(
    cfg: LlamaConfig,
    dtype: str = "auto",
    attention: str = "auto",
    remat: str = "none",
    unroll: int = 0,
    backend: str | None = None,
    per_layer: bool = False,
) -> Llama:
    """The model for `backend` (default: this process's; the target when compiling ahead of time),
    every 'auto' setting resolved here and nowhere else: dtype float32 on CPUs, bfloat16 elsewhere
    (parameters may come in any dtype); attention splash on TPUs, cuDNN on GPUs with 16-bit compute,
    XLA otherwise; unroll 0: all layers on GPUs without remat (the GPU backend copies saved
    activations and weight gradients in and out of all-layer buffers in a loop), else 1.
    per_layer: the inference layout (params from `unstack_layers`, caches `per_layer`)."""
    backend = backend or jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend  # a device's platform may name its GPU kind
    compute = (np.dtype(np.float32) if backend == "cpu" else parse_dtype("bfloat16")) if dtype == "auto" else dtype
    compute = parse_dtype(compute) if isinstance(compute, str) else np.dtype(compute)
    if attention == "auto":
        fused = backend == "gpu" and compute.itemsize == 2
        attention = "splash" if backend == "tpu" else "cudnn" if fused else "xla"
    elif attention not in IMPLEMENTATIONS:
        known = ", ".join(IMPLEMENTATIONS)
        raise ValueError(f"unknown attention implementation {attention!r}; use one of auto, {known}")
    elif attention == "tokamax" and importlib.util.find_spec("tokamax") is None:
        raise ValueError("--attention tokamax needs the tokamax package: pip install 'llama-jax[cuda]'")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; use one of {', '.join(REMAT_POLICIES)}")
    if unroll < 0:
        raise ValueError(f"the layer unroll must not be negative, got {unroll}")
    layers = min(unroll, cfg.n_layers) if unroll else cfg.n_layers if backend == "gpu" and remat == "none" else 1
    return Llama(cfg, compute, jnp.float32, remat, attention, scan_unroll=layers, per_layer=per_layer)
