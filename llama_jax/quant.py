"""Weight-only quantization of the linear kernels for inference.

int8: one scale per output channel, max|w| / 127 over the input (contracted) axes; the kernel is
int8 [*in, *out], its scale [*out]. int4: one scale per group of `group_size` consecutive rows of
the last input axis, max|w| / 7; two values are packed into a byte along that axis (row 2j in the
low nibble, 2j + 1 in the high one, so a shard of the packed axis is a run of whole rows): the
kernel is uint8 [*in[:-1], in[-1] / 2, *out], its scale [*in[:-1], groups, *out].

Scales are float32: they cost 1/in of an int8 kernel's bytes (1/64 of an int4 group's), and a
bfloat16 scale would add up to 0.4% relative error per channel, as much as int8 rounding itself.

Quantized kernels are found by their module's name (`AXES`), with any number of leading axes
(the stacked `layers` axis or none): the input and output axes are counted from the end.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig

Params = dict[str, Any]
GROUP = 128
# The quantized Linear modules: (input axes, output axes) of one kernel. Embeddings, norms and the
# reward model's score head stay as they are.
AXES = {
    "wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wqkv": (1, 3), "wo": (2, 1),
    "w1": (1, 1), "w2": (1, 1), "w3": (1, 1), "output": (1, 1),
}  # fmt: skip
LEVELS = {"int8": 127, "int4": 7}  # symmetric: -128 and -8 are never used
KERNEL_DTYPES = {"int8": np.dtype(np.int8), "int4": np.dtype(np.uint8)}


def group_size(rows: int) -> int:
    """int4 group length along an input axis of `rows`: 128, else the largest even divisor of
    `rows` in [32, 128] (tiny test models), else the whole axis."""
    if rows <= GROUP:
        return rows
    return next((g for g in range(GROUP, 31, -2) if rows % g == 0), rows)


def layout(shape: tuple[int, ...], n_in: int, n_out: int, mode: str) -> tuple[tuple[int, ...], np.dtype, tuple]:
    """(kernel shape, kernel dtype, scale shape) of a kernel of `shape` quantized as `mode`."""
    ax = len(shape) - n_out - 1  # the last input axis
    if mode == "int8":
        return tuple(shape), KERNEL_DTYPES[mode], (*shape[: ax + 1 - n_in], *shape[ax + 1 :])
    rows = shape[ax]
    return (
        (*shape[:ax], rows // 2, *shape[ax + 1 :]),
        KERNEL_DTYPES[mode],
        (*shape[:ax], rows // group_size(rows), *shape[ax + 1 :]),
    )


def scale_names(names: tuple, n_in: int, mode: str) -> tuple:
    """Logical axis names of a scale, from its kernel's: the output axes' (int8), and for int4 the
    input axes' too, the group axis named as the rows it groups, so it splits as they do."""
    return tuple(names[n_in:]) if mode == "int8" else tuple(names)


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
    """int values in [-8, 7] -> uint8, pairs of rows along `axis` in one byte (low nibble first)."""
    u = jax.lax.bitcast_convert_type(jnp.asarray(q).astype(jnp.int8), jnp.uint8) & 0xF
    n = u.shape[axis]
    even = jax.lax.slice_in_dim(u, 0, n, 2, axis)
    odd = jax.lax.slice_in_dim(u, 1, n, 2, axis)
    return even | (odd << 4)


def unpack_int4(p: jax.Array, axis: int) -> jax.Array:
    """Inverse of pack_int4: uint8 -> int8 in [-8, 7], twice as many rows along `axis`."""
    axis = axis % p.ndim
    low = jax.lax.bitcast_convert_type(p << 4, jnp.int8) >> 4  # arithmetic shifts sign-extend
    high = jax.lax.bitcast_convert_type(p, jnp.int8) >> 4
    pairs = jnp.stack([low, high], axis=axis + 1)
    return pairs.reshape(*p.shape[:axis], 2 * p.shape[axis], *p.shape[axis + 1 :])


def _grouped(w: jax.Array, ax: int, groups: int) -> jax.Array:
    return w.reshape(*w.shape[:ax], groups, w.shape[ax] // groups, *w.shape[ax + 1 :])


def quantize_kernel(w: jax.Array, n_in: int, n_out: int, mode: str) -> tuple[jax.Array, jax.Array]:
    """(kernel, scale) of a float kernel [..., *in, *out]; round-to-nearest, so every weight is
    off by at most scale / 2."""
    w = jnp.asarray(w).astype(jnp.float32)
    ax = w.ndim - n_out - 1
    levels = LEVELS[mode]
    if mode == "int8":
        axes = tuple(range(ax + 1 - n_in, ax + 1))
        amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
        scale = jnp.where(amax > 0, amax / levels, 1.0)
        q = jnp.clip(jnp.round(w / scale), -levels, levels).astype(jnp.int8)
        return q, jnp.squeeze(scale, axes)
    rows = w.shape[ax]
    groups = rows // group_size(rows)
    g = _grouped(w, ax, groups)
    amax = jnp.max(jnp.abs(g), axis=ax + 1, keepdims=True)
    scale = jnp.where(amax > 0, amax / levels, 1.0)
    q = jnp.clip(jnp.round(g / scale), -levels, levels).reshape(w.shape)
    return pack_int4(q, ax), jnp.squeeze(scale, ax + 1)


def dequantize(kernel: jax.Array, scale: jax.Array, n_in: int, n_out: int, mode: str, dtype: Any) -> jax.Array:
    """The kernel in `dtype` (values * scale): int4's matmul uses it; tests and checks for both."""
    ax = kernel.ndim - n_out - 1
    if mode == "int8":
        return kernel.astype(dtype) * jnp.expand_dims(scale, tuple(range(ax + 1 - n_in, ax + 1))).astype(dtype)
    q = unpack_int4(kernel, ax)
    groups = scale.shape[ax]
    w = _grouped(q, ax, groups).astype(dtype) * jnp.expand_dims(scale, ax + 1).astype(dtype)
    return w.reshape(q.shape)


@functools.cache
def _quantizer(n_in: int, n_out: int, mode: str, out_shardings: Any) -> Any:
    return jax.jit(functools.partial(quantize_kernel, n_in=n_in, n_out=n_out, mode=mode), out_shardings=out_shardings)


def quantize_params(
    params: Params, cfg: LlamaConfig, mode: str, shardings: Params | None = None, free: bool = False
) -> Params:
    """`params` (numpy or jax arrays, canonical or per-layer layout) with every kernel of `AXES`
    quantized as `mode`, each by its own jit call: placed as `shardings` (the quantized params'
    shardings) says when given, and its float kernel deleted once quantized when `free`, so no
    second copy of the model is ever whole. Other leaves are returned as they are."""
    if cfg.quantization != "none":
        raise ValueError(f"the parameters are already quantized ({cfg.quantization})")
    cfg.replace(quantization=mode)  # checks the mode and the shapes
    if mode == "none":
        return params

    def walk(tree: Params, where: Params | None) -> Params:
        out = {}
        for name, sub in tree.items():
            sh = None if where is None else where[name]
            if name in AXES and isinstance(sub, dict) and set(sub) == {"kernel"}:
                places = None if sh is None else (sh["kernel"], sh["scale"])
                kernel, scale = _quantizer(*AXES[name], mode, places)(sub["kernel"])
                if free and isinstance(sub["kernel"], jax.Array):
                    sub["kernel"].delete()
                out[name] = {"kernel": kernel, "scale": scale}
            else:
                out[name] = walk(sub, sh) if isinstance(sub, dict) else sub
        return out

    return walk(params, shardings)


def is_scale(path: tuple) -> bool:
    """Whether a params path (keys or tree path entries) is a quantized kernel's scale."""
    names = [getattr(k, "key", k) for k in path]
    return len(names) >= 2 and names[-1] == "scale" and names[-2] in AXES


def load_dtype(path: tuple, stored: Any, compute: Any) -> np.dtype:
    """The dtype a leaf is loaded in: integer kernels and their float32 scales as stored, every
    other leaf in the compute dtype."""
    stored = np.dtype(stored)
    return stored if stored.kind in "iu" or is_scale(path) else np.dtype(compute)


def weight_bytes(params: Params, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of the parameters (arrays or ShapeDtypeStructs) with every float leaf but the scales
    counted in `dtype`: quantized kernels and scales as stored."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(int(np.prod(x.shape)) * load_dtype(p, x.dtype, dtype).itemsize for p, x in leaves)


def linear_bytes(params: Params, dtype: Any = jnp.bfloat16) -> int:
    """weight_bytes of the kernels (and scales) of the `AXES` modules alone."""
    is_module = lambda x: isinstance(x, dict) and "kernel" in x
    modules = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_module)
    return sum(weight_bytes({path[-1].key: m}, dtype) for path, m in modules if path[-1].key in AXES)


def stored_leaves(key: str, shape: tuple[int, ...], mode: str) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """The checkpoint leaves of the canonical tensor `key` ("layers/attention/wq/kernel") of
    `shape`: itself (dtype None: any float) or, quantized, its kernel and scale."""
    *parent, leaf = key.split("/")
    if mode == "none" or leaf != "kernel" or not parent or parent[-1] not in AXES:
        return {key: (tuple(shape), None)}
    kernel, dtype, scale = layout(shape, *AXES[parent[-1]], mode)
    return {key: (kernel, dtype), "/".join([*parent, "scale"]): (scale, np.dtype(np.float32))}


def quantize_host(key: str, x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, scale) as numpy of the canonical kernel `key` (one layer, or the whole stack)."""
    kernel, scale = _quantizer(*AXES[key.split("/")[-2]], mode, None)(x)
    return np.asarray(kernel), np.asarray(scale)
