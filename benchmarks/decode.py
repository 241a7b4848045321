"""Prefill and decode speed against the machine's own rooflines, for each weight format side by side.

Builds a preset with random weights (no download) in the inference layout, measures this device's
copy bandwidth and matmul rate in the same run, then times, for bf16 and each `--quantize` mode:
  - prefill of one 128- and one 2048-token prompt (roofline: FLOPs / matmul rate, or weight
    bytes / bandwidth if larger),
  - decode at batch 1 and 64 (roofline: bytes that must be read per step, i.e. the weights as
    stored plus the KV cache of the tokens so far, over the bandwidth),
and with `--draft-model` speculative decoding at batch 1 (a random-weight draft accepts little:
the row shows the cost of the verification), with `--hf` Hugging Face eager on the same shapes.
`--profile DIR` instead traces the bf16 decode loop at the first batch size.

    python benchmarks/decode.py                          # CPU: tiny preset, small sizes
    python benchmarks/decode.py --model llama3-8b        # GPU
    /tmp/gpuaot/bin/python benchmarks/decode.py --compile-for h100 --model llama3-8b   # no GPU: decode_aot.py
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import get_preset
from llama_jax.generate import Sampling, decode, prefill
from llama_jax.model import Llama, build_model, init_params
from llama_jax.per_layer import unstack_layers
from llama_jax.speculative import Acceptance, speculative_decode


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


def random_model(cfg, mode: str, dt) -> tuple[Llama, dict]:
    """A preset with random weights, quantized as `mode`, in the inference layout."""
    from llama_jax.quant import quantize_params

    model = build_model(cfg.replace(quantization=mode), dt, "xla", per_layer=True)
    params = jax.jit(init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), dt)
    params = quantize_params(params, cfg, mode, free=True) if mode != "none" else params
    return model, jax.jit(unstack_layers)(params)


def measure(model: Llama, params, cfg, prompts, batches, args, bandwidth: float, flops_rate: float) -> list[tuple]:
    dt = model.dtype
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # Every weight is a matmul except the embedding lookup (a tied embedding is the output matmul).
    matmul_params = cfg.num_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dt).itemsize
    greedy = Sampling(temperature=0.0)
    mode = model.cfg.quantization if model.cfg.quantization != "none" else "bf16"
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
        rows.append((f"{mode} prefill {p} tokens", f"{seconds * 1e3:.2f} ms", f"{roof * 1e3:.2f} ms", roof / seconds))
    for b in batches:
        seconds = decode_seconds(model, params, b, args)
        mean_context = args.context + args.steps / 2
        step_bytes = weight_bytes + b * mean_context * kv_per_token
        roof = step_bytes / bandwidth
        rows.append((f"{mode} decode batch {b}", f"{b / seconds:,.0f} tok/s", f"{b / roof:,.0f} tok/s", roof / seconds))
    return rows


def decode_run(model: Llama, params, b: int, args):
    """A prefilled batch of `b` and the decode loop over `args.steps` steps, to call."""
    greedy, p, dt = Sampling(temperature=0.0), args.context, model.dtype
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
    return lambda: run(cache, lengths, keys, done, never)


def decode_seconds(model: Llama, params, b: int, args) -> float:
    return timeit(decode_run(model, params, b, args), reps=3) / (args.steps - 1)


def speculative_rate(model: Llama, params, draft: Llama, draft_params, args) -> tuple[float, Acceptance]:
    """Greedy speculative decoding at batch 1 after an `args.context`-token prompt: (generated tok/s,
    the prefills excluded, as the time of `args.steps` tokens minus that of one; the acceptance)."""
    b, k = 1, args.draft_tokens
    tokens = jnp.ones((b, args.context), jnp.int32)
    pad, seeds, done = (jnp.zeros((b,), t) for t in (jnp.int32, jnp.uint32, bool))
    never = jnp.full((1,), -1, jnp.int32)  # no stop token: every step runs
    run = lambda new: speculative_decode(  # noqa: E731
        model, params, draft, draft_params, tokens, pad, seeds, done, never,
        sampling=Sampling(temperature=0.0), k=k, max_new=new,
    )  # fmt: skip
    seconds = timeit(run, args.steps, reps=3) - timeit(run, 1, reps=3)
    _, accepted, rounds = (np.asarray(x) for x in run(args.steps))
    stats = Acceptance(int(accepted.sum()), int(rounds.sum()) * k, int(rounds.sum()), k)
    return b * (args.steps - 1) / max(seconds, 1e-9), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset (default: tiny on CPU, llama3-8b elsewhere)")
    ap.add_argument("--prompts", default=None, help="prefill lengths, comma separated (default 128,2048)")
    ap.add_argument("--batches", default="1,64", help="decode batch sizes")
    ap.add_argument("--context", type=int, default=512, help="prompt length before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--quantize", default="none", help="comma-separated weight formats: none (bf16), int8, int4")
    ap.add_argument("--draft-model", default=None, help="preset of a random-weight draft: a speculative row")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--hf", action="store_true", help="also Hugging Face eager (PyTorch) on the same shapes")
    ap.add_argument("--profile", metavar="DIR", default=None, help="only trace the bf16 decode loop into DIR")
    ap.add_argument("--compile-for", choices=("h100", "h200"), default=None, help="compile only, for this GPU")
    ap.add_argument("--layout", default="stacked,per-layer", help="--compile-for: stacked and/or per-layer")
    ap.add_argument("--gemms", default="triton,cublas", help="--compile-for: XLA's GEMMs (triton) and/or cublas")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    if args.compile_for:
        from decode_aot import compile_rows  # benchmarks/, beside this script

        cfg = get_preset(args.model or "llama3-8b")
        prompt = int((args.prompts or "2048").split(",")[-1])
        layouts = args.layout.split(",")
        compile_rows(args.compile_for, cfg, layouts, batches, prompt, args.context, args.quantize, args.gemms)
        return
    on_cpu = jax.default_backend() == "cpu"
    name = args.model or ("tiny" if on_cpu else "llama3-8b")
    cfg = get_preset(name)
    prompts = [int(p) for p in (args.prompts or ("128,512" if on_cpu else "128,2048")).split(",")]
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max(prompts) + args.context + args.steps))
    dt = jnp.bfloat16
    if args.profile:
        model, params = random_model(cfg, "none", dt)
        run = decode_run(model, params, batches[0], args)
        jax.block_until_ready(run())  # compiled outside the trace
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            jax.block_until_ready(run())
        print(f"traced one decode loop of {args.steps} steps at batch {batches[0]} into {args.profile}")
        return
    bandwidth = copy_bandwidth(2**28 if on_cpu else 2**32)
    flops_rate = matmul_rate(1024 if on_cpu else 8192)
    rows, weights = [], []
    for mode in args.quantize.split(","):
        model, params = random_model(cfg, mode, dt)
        weights.append(f"{mode} {sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9:.3f} GB")
        rows += measure(model, params, cfg, prompts, batches, args, bandwidth, flops_rate)
        if args.draft_model and mode == "none":
            draft_cfg = get_preset(args.draft_model).replace(max_seq_len=cfg.max_seq_len)
            draft, draft_params = random_model(draft_cfg, "none", dt)
            rate, stats = speculative_rate(model, params, draft, draft_params, args)
            label = f"bf16 speculative batch 1 ({args.draft_model} draft, K={stats.k}, acceptance {stats.rate:.2f})"
            rows.append((label, f"{rate:,.0f} tok/s", "-", float("nan")))
            del draft_params
        del params
    if args.hf:
        from decode_hf import hf_decode_rows  # benchmarks/, beside this script

        for label, rate in hf_decode_rows(cfg, args.context, batches, args.steps):
            rows.append((label, f"{rate:,.0f} tok/s", "-", float("nan")))

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: {name}, {cfg.num_params / 1e9:.3f}B params; weights as stored: {', '.join(weights)}")
    print(f"measured: copy bandwidth {bandwidth / 1e9:.1f} GB/s, bf16 matmul {flops_rate / 1e12:.2f} TFLOP/s")
    print(f"decode: context {args.context} + {args.steps} steps\n")
    print("| measurement | measured | roofline | % of roofline |")
    print("|---|---|---|---|")
    for label, measured, roof, frac in rows:
        print(f"| {label} | {measured} | {roof} | {'-' if frac != frac else f'{100 * frac:.0f}%'} |")


if __name__ == "__main__":
    main()
