"""Grouped-query attention with causal + document (segment) masking.

Queries sit at cache slots `q_offset + t`; key slot `s` is visible to a query when
`s <= q_slot` and both carry the same segment id. Training (packed documents), scoring and
KV-cache decoding all use this one rule: padding gets segment 0 and so never mixes with
real tokens (segment ids >= 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    implementation: str = "xla",
) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, S, KV, D]; segment ids [B, T] and [B, S] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    q_slot = q_offset + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & (
        q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    )  # [B, T, S]
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
