"""Training throughput: tokens/s and model FLOPs utilization of the train step.

Random weights and a synthetic batch (one document per row), the same jitted `train_step` as
train.py, and the matmul rate of this device measured in the same run as the peak that MFU is
taken against. Prints a table, one row per preset.

    python benchmarks/train_step.py                                    # CPU: tiny preset
    python benchmarks/train_step.py --model llama3.2-1b --seq-len 4096 --batch-size 4 --remat full
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import flops_per_token, get_preset
from llama_jax.errors import ArgumentParser, run_cli
from llama_jax.model import REMAT_POLICIES, Llama
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.training import attention_impl, compute_dtype, init_state, make_train_step, matmul_flops_per_s


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
    return {
        k: jnp.asarray(v)
        for k, v in dict(
            tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=positions, segment_ids=ones, loss_mask=ones
        ).items()
    }


def benchmark(preset: str, args: argparse.Namespace, peak: float, dtype) -> dict:
    cfg = get_preset(preset)
    attention = attention_impl(args.attention, dtype)
    model = Llama(cfg, dtype=dtype, param_dtype=jnp.float32, remat=args.remat, attention_impl=attention)
    schedule = lr_schedule(3e-4, 10, 1000, 0.1)
    optimizer = make_optimizer(schedule)
    state = jax.jit(partial(init_state, cfg, optimizer))(jax.random.key(0))
    step = jax.jit(make_train_step(model, optimizer, schedule, args.grad_accum, args.loss_chunk), donate_argnums=0)
    batch = synthetic_batch(cfg.vocab_size, args.batch_size, args.seq_len)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch_size * args.seq_len
    model_flops = flops_per_token(cfg, args.seq_len) * tokens / seconds
    return {
        "preset": preset,
        "params": f"{cfg.num_params / 1e6:,.1f}M",
        "batch x seq": f"{args.batch_size} x {args.seq_len}",
        "compile s": f"{compile_s:.1f}",
        "step ms": f"{seconds * 1e3:,.1f}",
        "tokens/s": f"{tokens / seconds:,.0f}",
        "model TFLOP/s": f"{model_flops / 1e12:.3f}",
        "matmul TFLOP/s": f"{peak / 1e12:.3f}",
        "MFU": f"{model_flops / peak:.1%}",
    }


def print_table(rows: list[dict]) -> None:
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    print("| " + " | ".join(k.ljust(w) for k, w in widths.items()) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths.values()) + "|")
    for r in rows:
        print("| " + " | ".join(r[k].rjust(w) for k, w in widths.items()) + " |")


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="comma-separated presets (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--remat", default="none", choices=tuple(REMAT_POLICIES))
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--loss-chunk", type=int, default=512)
    args = parser.parse_args(argv)
    presets = args.model.split(",")
    for preset in presets:
        get_preset(preset)  # an unknown name fails before any work
    dtype = compute_dtype(args.dtype)
    peak = matmul_flops_per_s(dtype)
    print(
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), compute {jnp.dtype(dtype).name}, parameters float32"
    )
    print_table([benchmark(p, args, peak, dtype) for p in presets])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
