"""The per-layer inference layout of the parameters (`Llama(per_layer=True)`): `layers_{i}` holds
layer i's own arrays, and its attention has one `wqkv` projection instead of wq, wk, wv.
Checkpoints keep the canonical stacked layout; loading for inference converts (load.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


def fuse_qkv(attention: Params) -> Params:
    """wq, wk, wv (each leaf: kernel, and scales if quantized; output axes last) -> one `wqkv`
    whose output axes are [kv_heads, group + 2, head_dim]: each kv head's group of query heads,
    then its key, then its value. One matmul instead of three (a decode step's k and v products
    alone are too small to be GEMMs on GPUs); split over kv heads, each device gets whole groups."""
    rest = {k: v for k, v in attention.items() if k not in ("wq", "wk", "wv")}
    fused = {}
    for leaf, q in attention["wq"].items():
        k, v = attention["wk"][leaf], attention["wv"][leaf]
        xp = np if isinstance(q, np.ndarray) else jnp
        q = q.reshape(*q.shape[:-2], k.shape[-2], q.shape[-2] // k.shape[-2], q.shape[-1])
        fused[leaf] = xp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)
    return {**rest, "wqkv": fused}


def split_qkv(attention: Params) -> Params:
    """The inverse of `fuse_qkv`."""
    rest = {k: v for k, v in attention.items() if k != "wqkv"}
    out = {"wq": {}, "wk": {}, "wv": {}}
    for leaf, qkv in attention["wqkv"].items():
        group = qkv.shape[-2] - 2
        out["wq"][leaf] = qkv[..., :group, :].reshape(*qkv.shape[:-3], qkv.shape[-3] * group, qkv.shape[-1])
        out["wk"][leaf], out["wv"][leaf] = qkv[..., group, :], qkv[..., group + 1, :]
    return {**rest, **out}


def inference_layer(stacked: Params, i: int) -> Params:
    """Layer i of the canonical stacked layer parameters, in the per-layer (inference) layout."""
    layer = jax.tree.map(lambda a: a[i], stacked)
    return {**layer, "attention": fuse_qkv(layer["attention"])} if "attention" in layer else layer


def unstack_layers(params: Params) -> Params:
    """The canonical (stacked) parameters in the per-layer layout: `layers_{i}` = layer i."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": inference_layer(params["layers"], i) for i in range(n)}}


def stack_layers(params: Params) -> Params:
    """The inverse of `unstack_layers`."""
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [{**params[k], "attention": split_qkv(params[k]["attention"])} for k in names]
    return {**rest, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
