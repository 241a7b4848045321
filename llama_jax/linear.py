"""The model's one matrix multiply: `x @ kernel` over named kernel axes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """x @ kernel, contracting the last `in_axes` axes of x with the first of the kernel.

    (flax's DenseGeneral flattens its kernel while initialising, which breaks logical
    sharding constraints on multi-dimensional kernels.)"""

    features: tuple[int, ...]
    in_axes: int
    names: tuple[str, ...]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[x.ndim - self.in_axes :], *self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(INIT, self.names), shape, self.param_dtype)
        return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_axes)


def dense(features, in_axes, names, name, dtype, param_dtype) -> Linear:
    features = (features,) if isinstance(features, int) else tuple(features)
    return Linear(features, in_axes, names, dtype, param_dtype, name=name)
