"""Prefill and decode speed against the machine's own rooflines.

Builds a preset with random weights (no download), measures this device's copy bandwidth and
matmul rate in the same run, then times:
  - prefill of one 128- and one 2048-token prompt (roofline: FLOPs / matmul rate, or weight
    bytes / bandwidth if larger),
  - decode at batch 1 and 64 (roofline: bytes that must be read per step, i.e. weights plus the
    KV cache of the tokens so far, over the bandwidth).

    python benchmarks/decode.py                          # CPU: tiny preset, small sizes
    python benchmarks/decode.py --model llama3-8b        # GPU
    python benchmarks/decode.py --model llama3.1-8b --draft llama3.2-1b   # + a speculative row (K=4)

With random weights the draft's acceptance means little: `--draft` equal to `--model` (every token
accepted) bounds the speculative rate from above; `speculative.decode_rate` takes real parameters too.
    /tmp/gpuaot/bin/python benchmarks/decode.py --compile-for h100 --model llama3-8b   # no GPU: decode_aot.py
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp

from llama_jax.config import get_preset
from llama_jax.generate import Sampling, decode, prefill
from llama_jax.model import build_model, init_params
from llama_jax.per_layer import unstack_layers


def timeit(fn, *args, reps: int = 5) -> float:
    """Median wall time of fn(*args) after one warm-up call, fully synchronised."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s moved by a device copy (counting read + write)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 1)
    return 2 * x.nbytes / timeit(f, x)


def matmul_rate(n: int) -> float:
    """bfloat16 FLOP/s of an n x n x n matrix product."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    return 2 * n**3 / timeit(jax.jit(jnp.matmul), a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset (default: tiny on CPU, llama3-8b elsewhere)")
    ap.add_argument("--prompts", default=None, help="prefill lengths, comma separated (default 128,2048)")
    ap.add_argument("--batches", default="1,64", help="decode batch sizes")
    ap.add_argument("--context", type=int, default=512, help="prompt length before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--compile-for", choices=("h100", "h200"), default=None, help="compile only, for this GPU")
    ap.add_argument("--layout", default="stacked,per-layer", help="--compile-for: stacked and/or per-layer")
    ap.add_argument("--draft", default=None, help="a speculative decoding row at batch 1: the draft preset")
    ap.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes a round")
    args = ap.parse_args()
    if args.compile_for:
        from decode_aot import compile_rows  # benchmarks/, beside this script

        cfg = get_preset(args.model or "llama3-8b")
        prompt = int((args.prompts or "2048").split(",")[-1])
        batches = [int(x) for x in args.batches.split(",")]
        compile_rows(args.compile_for, cfg, args.layout.split(","), batches, prompt, args.context)
        return
    on_cpu = jax.default_backend() == "cpu"
    name = args.model or ("tiny" if on_cpu else "llama3-8b")
    cfg = get_preset(name)
    prompts = [int(p) for p in (args.prompts or ("128,512" if on_cpu else "128,2048")).split(",")]
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max(prompts) + args.context + args.steps))
    dt = jnp.bfloat16
    model = build_model(cfg, dt, "xla", per_layer=True)  # the inference layout, as load() gives
    params = jax.jit(lambda key: unstack_layers(init_params(cfg, key, dt)))(jax.random.key(0))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bandwidth = copy_bandwidth(2**28 if on_cpu else 2**32)
    flops_rate = matmul_rate(1024 if on_cpu else 8192)
    # Every weight is a matmul except the embedding lookup (a tied embedding is the output matmul).
    matmul_params = cfg.num_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dt).itemsize
    greedy = Sampling(temperature=0.0)
    rows = []

    for p in prompts:
        tokens = jnp.ones((1, p), jnp.int32)
        zeros = jnp.zeros((1,), jnp.int32)
        seeds = jnp.zeros((1,), jnp.uint32)
        run = partial(prefill, model, params, sampling=greedy, cache_len=p + 1, cache_dtype=dt)
        seconds = timeit(run, tokens, zeros, seeds)
        attn_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * p * p / 2  # causal QK^T and PV
        flops = 2 * matmul_params * p + attn_flops
        roof = max(flops / flops_rate, weight_bytes / bandwidth)
        rows.append((f"prefill {p} tokens", f"{seconds * 1e3:.2f} ms", f"{roof * 1e3:.2f} ms", roof / seconds))

    for b in [int(x) for x in args.batches.split(",")]:
        p = args.context
        tokens = jnp.ones((b, p), jnp.int32)
        zeros = jnp.zeros((b,), jnp.int32)
        first, cache, keys = prefill(
            model, params, tokens, zeros, jnp.zeros((b,), jnp.uint32), sampling=greedy, cache_len=p + args.steps,
            cache_dtype=dt,
        )  # fmt: skip
        lengths = jnp.full((b,), p, jnp.int32)
        never = jnp.full((1,), -1, jnp.int32)  # no stop token: every step runs
        done = jnp.zeros((b,), bool)
        run = partial(decode, model, params, first, sampling=greedy, max_new=args.steps)
        seconds = timeit(run, cache, lengths, keys, done, never, reps=3) / (args.steps - 1)
        mean_context = p + args.steps / 2
        step_bytes = weight_bytes + b * mean_context * kv_per_token
        roof = step_bytes / bandwidth
        rows.append((f"decode batch {b}", f"{b / seconds:,.0f} tok/s", f"{b / roof:,.0f} tok/s", roof / seconds))

    if args.draft:
        from llama_jax.speculative import decode_rate

        draft_cfg = get_preset(args.draft).replace(max_seq_len=cfg.max_seq_len)
        if draft_cfg.vocab_size != cfg.vocab_size:
            ap.error(f"the draft's vocabulary ({draft_cfg.vocab_size}) is not the model's ({cfg.vocab_size})")
        draft = build_model(draft_cfg, dt, "xla", per_layer=True)
        same = draft_cfg == cfg
        draft_params = (
            params if same else jax.jit(lambda k: unstack_layers(init_params(draft_cfg, k, dt)))(jax.random.key(1))
        )
        rate, accepted = decode_rate(model, params, draft, draft_params, args.context, args.steps, args.draft_tokens)
        label = f"speculative batch 1 ({args.draft}, K={args.draft_tokens}, acceptance {accepted.rate:.2f})"
        rows.append((label, f"{rate:,.0f} tok/s", "-", None))

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: {name}, {cfg.num_params / 1e9:.3f}B params, bfloat16 weights {weight_bytes / 1e9:.3f} GB")
    print(f"measured: copy bandwidth {bandwidth / 1e9:.1f} GB/s, bf16 matmul {flops_rate / 1e12:.2f} TFLOP/s")
    print(f"decode: context {args.context} + {args.steps} steps\n")
    print("| measurement | measured | roofline | % of roofline |")
    print("|---|---|---|---|")
    for name, measured, roof, frac in rows:
        print(f"| {name} | {measured} | {roof} | {'-' if frac is None else f'{100 * frac:.0f}%'} |")


if __name__ == "__main__":
    main()
