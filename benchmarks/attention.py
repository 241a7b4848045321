"""Document-masked causal attention: each implementation against the float32 reference.

A packed batch (random document lengths, a padding tail of segment 0) goes forward and backward
through every requested implementation; the table gives the time of one forward + backward and the
relative error ||x - ref|| / ||ref|| of the output and of the gradients for q, k and v, where ref is
the XLA implementation in float32 at highest matmul precision on the same device.

    python benchmarks/attention.py                                    # CPU: small shape, xla
    python benchmarks/attention.py --seq-len 4096 --impl xla,cudnn    # GPU
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.attention import attention
from llama_jax.errors import ArgumentParser, run_cli


def packed_segments(rng: np.random.Generator, batch: int, seq_len: int, mean_doc: int) -> np.ndarray:
    """Segment ids 1, 2, ... for documents of random length, then a padding tail of 0."""
    ids = np.zeros((batch, seq_len), np.int32)
    for row in ids:
        end, doc = int(seq_len * rng.uniform(0.85, 1.0)), 1
        start = 0
        while start < end:
            length = int(rng.integers(1, 2 * mean_doc))
            row[start : min(end, start + length)] = doc
            start, doc = start + length, doc + 1
    return ids


def forward_backward(implementation: str):
    def loss(q, k, v, cotangent, segment_ids):
        out = attention(q, k, v, segment_ids, segment_ids, 0, implementation)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(5)])
        times.append((time.perf_counter() - start) / 5)
    return float(np.median(times)) * 1e3


def relative_error(x: jax.Array, ref: jax.Array) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mean-doc", type=int, default=600, help="mean document length in tokens")
    parser.add_argument("--impl", default="xla", help="comma-separated implementations (default: xla)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    b, t = args.batch_size, args.seq_len
    q, k, v, cotangent = (
        rng.standard_normal(shape, np.float32)
        for shape in (
            (b, t, args.heads, args.head_dim),
            (b, t, args.kv_heads, args.head_dim),
            (b, t, args.kv_heads, args.head_dim),
            (b, t, args.heads, args.head_dim),
        )
    )
    segment_ids = jnp.asarray(packed_segments(rng, b, t, args.mean_doc))
    with jax.default_matmul_precision("highest"):
        (_, ref_out), ref_grads = forward_backward("xla")(q, k, v, cotangent, segment_ids)
    dtype = jnp.dtype(args.dtype)
    inputs = [jnp.asarray(x, dtype) for x in (q, k, v)]
    print(
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {dtype.name}, batch {b} x {t}, "
        f"{args.heads} heads / {args.kv_heads} kv heads of {args.head_dim}, "
        f"{int(segment_ids.max(axis=1).sum())} documents"
    )
    print("| implementation | fwd+bwd ms | out rel. err | dq rel. err | dk rel. err | dv rel. err |")
    print("|---|---|---|---|---|---|")
    for implementation in args.impl.split(","):
        fn = forward_backward(implementation)
        try:
            (_, out), grads = fn(*inputs, cotangent, segment_ids)
            ms = median_ms(fn, *inputs, cotangent, segment_ids)
        except Exception as e:  # an implementation this platform lacks gets a row saying so
            print(f"| {implementation} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} |||||")
            continue
        errors = [relative_error(x, r) for x, r in zip((out, *grads), (ref_out, *ref_grads), strict=True)]
        print(f"| {implementation} | {ms:.2f} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
