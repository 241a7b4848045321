"""Training throughput: tokens/s and model FLOPs utilization of the train step.

Random weights and a synthetic batch (one document per row), the same jitted `train_step` as
train.py, and the matmul rate of this device measured in the same run as the peak that MFU is
taken against. Prints a table with one row per combination of the comma-separated presets,
batch sizes, remat policies and attention implementations; a combination that fails (out of
memory, say) gets a row saying so and the others still run.

    python benchmarks/train_step.py                                    # CPU: tiny preset
    python benchmarks/train_step.py --model llama3.2-1b --seq-len 4096 --batch-size 2,4 --remat none,full
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import flops_per_token, get_preset
from llama_jax.errors import ArgumentParser, UserError, run_cli
from llama_jax.model import REMAT_POLICIES, build_model
from llama_jax.step import PRETRAIN, build, init_state, shardings_of
from llama_jax.train_config import TrainConfig
from llama_jax.training import matmul_flops_per_s


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


def run_config(preset: str, batch_size: int, remat: str, attention: str, unroll: int, args) -> TrainConfig:
    """The benchmark's train.py settings: one device, a fixed schedule."""
    return TrainConfig(
        model=preset, batch_size=batch_size, seq_len=args.seq_len, remat=remat, attention=attention,
        scan_unroll=unroll, dtype=args.dtype, grad_accum=args.grad_accum, loss_chunk=args.loss_chunk,
        sharding="single", lr=3e-4, warmup_steps=10, steps=1000,
    )  # fmt: skip


def benchmark(preset: str, batch_size: int, remat: str, attention: str, unroll: int, args, peak: float) -> dict:
    cfg = get_preset(preset)
    built = build(run_config(preset, batch_size, remat, attention, unroll, args), cfg, PRETRAIN)
    init = partial(init_state, cfg, built.optimizer)
    state = jax.jit(init, out_shardings=shardings_of(built.state))(jax.random.key(0))
    batch = synthetic_batch(cfg.vocab_size, batch_size, args.seq_len)
    start = time.perf_counter()
    step = built.run.lower(state, batch).compile()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    m = step.memory_analysis()  # the executable's own need (a process's peak would carry earlier rows')
    step_bytes = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / args.steps
    if args.profile:  # two more steps under the profiler, outside the timing
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(2):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
    tokens = batch_size * args.seq_len
    model_flops = flops_per_token(cfg, args.seq_len) * tokens / seconds
    return {
        "step ms": f"{seconds * 1e3:,.1f}",
        "compile s": f"{compile_s:.1f}",
        "tokens/s": f"{tokens / seconds:,.0f}",
        "model TFLOP/s": f"{model_flops / 1e12:.3f}",
        "MFU": f"{model_flops / peak:.1%}",
        "memory GiB": f"{step_bytes / 2**30:.2f}",
        "loss": f"{float(metrics['loss']):.3f}",
    }


def row(preset: str, batch_size: int, remat: str, attention: str, unroll: int, args, peak: float) -> dict:
    cfg = get_preset(preset)
    model = build_model(cfg, args.dtype, attention, remat, unroll)
    head = {
        "preset": preset,
        "params": f"{cfg.num_params / 1e6:,.1f}M",
        "batch x seq": f"{batch_size} x {args.seq_len}",
        "remat": remat,
        "attention": model.attention_impl,
        "unroll": str(model.scan_unroll),
    }
    try:
        return head | benchmark(preset, batch_size, remat, attention, unroll, args, peak)
    except Exception as e:  # one failed combination (out of memory, say) must not end the table
        print(f"{head}: {type(e).__name__}: {e}", file=sys.stderr)
        return head | {"step ms": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}


def print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(r.get(k, "")) for r in rows)) for k in keys}
    print("| " + " | ".join(k.ljust(w) for k, w in widths.items()) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths.values()) + "|")
    for r in rows:
        print("| " + " | ".join(r.get(k, "").rjust(w) for k, w in widths.items()) + " |", flush=True)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="comma-separated presets (default: tiny)")
    parser.add_argument("--batch-size", default="8", help="comma-separated batch sizes (default: 8)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--remat", default="none", help=f"comma-separated, of {', '.join(REMAT_POLICIES)}")
    parser.add_argument("--attention", default="auto", help="comma-separated, of auto, xla, cudnn, splash, tokamax")
    parser.add_argument("--unroll", default="0", help="comma-separated layers per loop iteration (0: auto)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--loss-chunk", type=int, default=512)
    parser.add_argument("--profile", metavar="DIR", help="also trace two steps with jax.profiler into DIR")
    args = parser.parse_args(argv)
    presets = args.model.split(",")
    for preset in presets:
        get_preset(preset)  # an unknown name fails before any work
    try:
        batch_sizes = [int(b) for b in args.batch_size.split(",")]
    except ValueError:
        raise UserError(f"--batch-size: {args.batch_size!r} is not a comma-separated list of integers") from None
    remats = args.remat.split(",")
    if unknown := set(remats) - set(REMAT_POLICIES):
        raise UserError(f"--remat: unknown policy {sorted(unknown)[0]!r}; use {', '.join(REMAT_POLICIES)}")
    attentions = args.attention.split(",")
    try:
        unrolls = [int(u) for u in args.unroll.split(",")]
    except ValueError:
        raise UserError(f"--unroll: {args.unroll!r} is not a comma-separated list of integers") from None
    dtype = build_model(get_preset(presets[0]), args.dtype).dtype
    peak = matmul_flops_per_s(dtype)
    print(
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), compute {jnp.dtype(dtype).name}, parameters float32"
    )
    print(f"measured matmul rate: {peak / 1e12:.3g} TFLOP/s", flush=True)
    grid = itertools.product(presets, batch_sizes, remats, attentions, unrolls)
    print_table([row(*combination, args, peak) for combination in grid])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
