"""The model's one matrix multiply: `x @ kernel` over named kernel axes, optionally from a
weight-only quantized kernel (quant.py)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax import quant

INIT = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """x @ kernel, contracting the last `in_axes` axes of x with the first of the kernel.

    (flax's DenseGeneral flattens its kernel while initialising, which breaks logical
    sharding constraints on multi-dimensional kernels.)

    quantization "int8": the kernel is int8 with a float32 `scale` per output channel, applied to
    the product (`(x @ kernel) * scale`), so the int8 -> compute dtype convert is an operand of
    the dot that XLA can fuse into it. "int4": the kernel is packed uint8 with a scale per group
    of input rows; the scale varies along the contraction, so the kernel is dequantized whole
    (one matrix at a time, inside the jitted step) and then multiplied."""

    features: tuple[int, ...]
    in_axes: int
    names: tuple[str, ...]
    dtype: Any
    param_dtype: Any
    quantization: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[x.ndim - self.in_axes :], *self.features)
        x = x.astype(self.dtype)
        mode, n_in, n_out = self.quantization, self.in_axes, len(self.features)
        if mode == "none":
            kernel = self.param("kernel", nn.with_logical_partitioning(INIT, self.names), shape, self.param_dtype)
            return jnp.tensordot(x, kernel.astype(self.dtype), axes=n_in)
        kernel_shape, kernel_dtype, scale_shape = quant.layout(shape, n_in, n_out, mode)
        zeros, ones = nn.initializers.zeros, nn.initializers.ones  # placeholders: quantize_params fills them
        kernel = self.param("kernel", nn.with_logical_partitioning(zeros, self.names), kernel_shape, kernel_dtype)
        names = quant.scale_names(self.names, n_in, mode)
        scale = self.param("scale", nn.with_logical_partitioning(ones, names), scale_shape, jnp.float32)
        if mode == "int8":
            return jnp.tensordot(x, kernel.astype(self.dtype), axes=n_in) * scale.astype(self.dtype)
        return jnp.tensordot(x, quant.dequantize(kernel, scale, n_in, n_out, mode, self.dtype), axes=n_in)


def dense(features, in_axes, names, name, dtype, param_dtype, quantization: str = "none") -> Linear:
    features = (features,) if isinstance(features, int) else tuple(features)
    return Linear(features, in_axes, names, dtype, param_dtype, quantization, name=name)
