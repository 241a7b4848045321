"""Mixed precision: an einsum that returns float32 and differentiates at its operands' precision."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum(spec, a, b)` accumulated and returned in float32.

    Plain `einsum(..., preferred_element_type=float32)` on bfloat16 operands has a float32
    cotangent, and its transpose upcasts the operands to match: the backward matmuls then run at
    float32 rates. For the output projection (vocabulary x dim, the largest matmul of a training
    step) and the attention scores that made a GPU step several times slower. Here the cotangent is
    rounded to the operands' dtype first, as in the rest of the backward pass."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _fwd(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _bwd(spec, residuals, g):
    a, b = residuals
    _, vjp = jax.vjp(partial(jnp.einsum, spec), a, b)
    return vjp(g.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_fwd, _bwd)
