import re

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.precision import einsum_f32


def operands(dtype):
    a, b = jax.random.normal(jax.random.key(0), (2, 16, 32)), jax.random.normal(jax.random.key(1), (32, 64))
    return a.astype(dtype), b.astype(dtype)


def test_float32_gradients_equal_the_plain_einsum():
    a, b = operands(jnp.float32)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f("btd,dv->btv", a, b)))
    plain = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    for ours, ref in zip(jax.grad(loss(einsum_f32), (0, 1))(a, b), jax.grad(loss(plain), (0, 1))(a, b), strict=True):
        np.testing.assert_array_equal(ours, ref)


def dot_types(fn, *args) -> list[list[str]]:
    """Element types [lhs, rhs, result] of every dot_general in fn's lowered StableHLO."""
    lines = [line for line in jax.jit(fn).lower(*args).as_text().splitlines() if "dot_general" in line]
    return [re.findall(r"x([a-z]+\d+)>", line.split(" : ")[-1]) for line in lines]


def test_bfloat16_backward_runs_bfloat16_matmuls():
    """The output is float32, but both backward matmuls take bfloat16 operands (a float32 operand
    would make the GPU run the largest matmuls of a step at float32 rates)."""
    a, b = operands(jnp.bfloat16)
    assert dot_types(lambda a, b: einsum_f32("btd,dv->btv", a, b), a, b) == [["bf16", "bf16", "f32"]]
    grad = jax.grad(lambda a, b: jnp.sum(jnp.sin(einsum_f32("btd,dv->btv", a, b))), (0, 1))
    backward = dot_types(grad, a, b)
    assert len(backward) == 3 and all(t[:2] == ["bf16", "bf16"] for t in backward), backward
    da, db = grad(a, b)
    assert da.dtype == db.dtype == jnp.bfloat16
    ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum("btd,dv->btv", a, b, preferred_element_type=jnp.float32))),
                   (0, 1))(a.astype(jnp.float32), b.astype(jnp.float32))  # fmt: skip
    for x, r in zip((da, db), ref, strict=True):  # bf16 rounding of the cotangent and the result: a few 2^-8
        assert np.linalg.norm(np.asarray(x, np.float32) - r) / np.linalg.norm(r) < 2e-2
