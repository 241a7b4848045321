"""Serving throughput and latency, in the manner of vLLM's benchmark_serving: the same seeded
request set, in the same run, through the server (continuous batching over the paged KV cache)
and through static batches of `generate` (each batch padded to its longest prompt and run until
its longest output).

Prompt and output lengths are drawn from seeded log-normal distributions (mixed lengths, as chat
traffic has); prompts are random token ids, and every request generates exactly its output length
(`ignore_eos`). The load generator is the `openai` client, streaming, at a fixed concurrency or a
Poisson request rate, in a process of its own. Both paths are warmed up on the same requests first
(compilation): static batches once (their shapes are fixed), the server until a pass compiles no
new step program (its shapes follow the timing of arrivals; at most `--warmup-passes`). Then both
are timed in rounds, static then server, and the ratio is the median of the rounds' ratios: each
round compares the two paths minutes apart at most, on a machine whose speed drifts.

    python benchmarks/serve.py                                # CPU: tiny preset, random weights
    python benchmarks/serve.py --model llama3-8b --num-requests 256 --input-len 512 --output-len 512 \\
        --len-sigma 0 --concurrency 64 --max-num-seqs 64      # the GPU target
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import multiprocessing
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.buckets import bucket
from llama_jax.config import get_preset
from llama_jax.generate import Sampling, generate
from llama_jax.model import Llama, init_params
from llama_jax.per_layer import unstack_layers
from llama_jax.serving.api import create_app
from llama_jax.serving.engine import Engine, EngineConfig
from llama_jax.serving.server import BackgroundServer
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    ttft: float  # seconds from sending to the first token
    tpot: float  # seconds per output token after the first
    latency: float
    tokens: int


def requests(n: int, vocab: int, input_len: int, output_len: int, sigma: float, context: int, seed: int):
    """Seeded log-normal lengths around the given medians, clipped to a quarter of the context
    (prompts) and the rest (outputs), so that any static batch of them fits the context."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(np.clip(round(input_len * rng.lognormal(0, sigma)), 2, context // 4))
        o = int(np.clip(round(output_len * rng.lognormal(0, sigma)), 1, context - context // 4))
        out.append(Request([1, *rng.integers(3, vocab, p - 1).tolist()], o))
    return out


def ms(values: list[float], q: float) -> float:
    """The q-th percentile in milliseconds."""
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def summary(name: str, results: list[Result], wall: float, kv: str) -> dict:
    tokens = sum(r.tokens for r in results)
    return {
        "path": name, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall, "req_s": len(results) / wall,
        "ttft_p50": ms([r.ttft for r in results], 50), "ttft_p99": ms([r.ttft for r in results], 99),
        "tpot_p50": ms([r.tpot for r in results], 50), "tpot_p99": ms([r.tpot for r in results], 99),
        "kv": kv,
    }  # fmt: skip


def run_static(
    model, params, reqs: list[Request], batch: int, sampling: Sampling, page: int
) -> tuple[list, float, str]:
    """Batches of `batch` requests in order, each to its longest output; a request's tokens all
    arrive when its batch ends (TTFT = that time, TPOT = 0)."""
    results, start, reserved = [], time.perf_counter(), []
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        done = generate(model, params, [r.prompt for r in group], max(r.output_len for r in group), sampling)
        t1 = time.perf_counter() - start
        reserved.append(len(group) * (bucket(max(len(r.prompt) for r in group)) + max(r.output_len for r in group)))
        for r, c in zip(group, done, strict=True):
            assert len(c.tokens) >= r.output_len
            results.append(Result(t1, 0.0, t1, r.output_len))
    wall = time.perf_counter() - start
    return results, wall, f"{max(reserved) / page:.0f} pages reserved (max)"


def run_load(base_url: str, reqs: list[Request], concurrency: int, rate: float, temperature: float, seed: int):
    """The load generator, meant for a process of its own (as vLLM's benchmark is): the client's
    parsing then does not share the server's interpreter lock."""
    return asyncio.run(load(base_url, reqs, concurrency, rate, temperature, seed))


async def load(base_url: str, reqs: list[Request], concurrency: int, rate: float, temperature: float, seed: int):
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="benchmark", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)
    rng = np.random.default_rng(seed)

    async def one(i: int, r: Request) -> Result:
        async with gate:
            sent = time.perf_counter()
            stream = await client.completions.create(
                model="bench", prompt=r.prompt, max_tokens=r.output_len, temperature=temperature, seed=seed + i,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            first = last = None
            tokens = 0
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                elif first is None:
                    first = now
                last = now
            assert tokens == r.output_len, (tokens, r.output_len)
            tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
            return Result(first - sent, tpot, last - sent, tokens)

    async def arrivals():
        tasks = []
        for i, r in enumerate(reqs):
            tasks.append(asyncio.create_task(one(i, r)))
            if rate > 0:
                await asyncio.sleep(rng.exponential(1 / rate))
        return await asyncio.gather(*tasks)

    start = time.perf_counter()
    results = await arrivals()
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def warm_up(run_pass, most: int) -> tuple[int, int]:
    """Run warm-up passes until one compiles nothing (or `most` passes) -> (passes, programs the
    last one compiled). Compiles are counted with jax.monitoring's backend-compile events."""
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_: compiles.append(event) if event == BACKEND_COMPILE else None
    )
    passes, new = 0, 1
    while new and passes < most:
        before = len(compiles)
        run_pass()
        passes, new = passes + 1, len(compiles) - before
    return passes, new


def tokenizer_for(vocab: int, workdir: Path):
    """A SentencePiece tokenizer trained on some standard-library sources (random weights need
    no particular one; the server needs one to detokenize)."""
    import collections
    import json as json_module

    corpus = workdir / "corpus.txt"
    corpus.write_text("".join(inspect.getsource(m) for m in (collections, json_module, argparse, statistics)))
    return load_tokenizer(str(train_sentencepiece([corpus], str(workdir / "sp"), vocab_size=min(vocab, 2000))))


def format_table(rows: list[dict]) -> str:
    head = (
        "| path | requests | output tokens | wall s | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms "
        "| TPOT p50 ms | TPOT p99 ms | KV cache |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['requests']} | {r['output_tokens']:,} | {r['wall_s']:.1f} | {r['tok_s']:,.0f} | "
            f"{r['req_s']:.2f} | {r['ttft_p50']:,.0f} | {r['ttft_p99']:,.0f} | {r['tpot_p50']:.1f} "
            f"| {r['tpot_p99']:.1f} | {r['kv']} |"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset with random weights (default: tiny on CPU, else llama3-8b)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, else bfloat16)")
    ap.add_argument("--num-requests", type=int, default=192)
    ap.add_argument("--input-len", type=int, default=24, help="median prompt length")
    ap.add_argument("--output-len", type=int, default=24, help="median output length")
    ap.add_argument("--len-sigma", type=float, default=1.0, help="log-normal sigma of the lengths (0: fixed)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="server slots, and the static batch size")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--max-prefill-seqs", type=int, default=16)
    ap.add_argument("--min-batch-bucket", type=int, default=16)
    ap.add_argument("--min-page-bucket", type=int, default=0, help="0: the whole context (one page bucket)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, each static then server (median ratio)")
    ap.add_argument("--warmup-passes", type=int, default=4, help="most server warm-up passes (each the whole set)")
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    name = args.model or ("tiny" if on_cpu else "llama3-8b")
    cfg = get_preset(name)
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype or ("float32" if on_cpu else "bfloat16")]
    model = Llama(cfg, dtype=dt, param_dtype=dt, per_layer=True)  # the inference layout, as load() gives
    params = jax.jit(lambda key: unstack_layers(init_params(cfg, key, dt)))(jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_for(cfg.vocab_size, Path(tmp))
    reqs = requests(args.num_requests, tok.vocab_size, args.input_len, args.output_len, args.len_sigma,
                    cfg.max_seq_len, args.seed)  # fmt: skip
    sampling = Sampling(args.temperature, 1.0, 0, tok.vocab_size)

    run_static(model, params, reqs, args.max_num_seqs, sampling, args.page_size)  # compile every batch shape
    pages = args.min_page_bucket or -(-cfg.max_seq_len // args.page_size)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                          max_prefill_seqs=args.max_prefill_seqs, max_queue=max(1024, args.num_requests),
                          min_rows=args.min_batch_bucket, min_pages=pages)  # fmt: skip
    engine = Engine(model, params, tok.vocab_size, config)
    load_args = (reqs, args.concurrency, args.request_rate, args.temperature, args.seed)
    spawn = multiprocessing.get_context("spawn")
    rows, ratios = [], []
    with (
        BackgroundServer(create_app(engine, tok, "bench")) as server,
        ProcessPoolExecutor(1, mp_context=spawn) as client,
    ):
        passes = warm_up(lambda: client.submit(run_load, server.base_url, *load_args).result(), args.warmup_passes)
        for _ in range(args.rounds):  # static then server, side by side in time
            static = summary(f"static batches of {args.max_num_seqs}",
                             *run_static(model, params, reqs, args.max_num_seqs, sampling, args.page_size))  # fmt: skip
            used: list[int] = []
            stop = threading.Event()

            def watch(used=used, stop=stop) -> None:
                while not stop.wait(0.05):
                    used.append(engine.stats()["pages_in_use"])

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            served, served_wall = client.submit(run_load, server.base_url, *load_args).result()
            stop.set()
            watcher.join()
            total = engine.stats()["pages_total"]
            kv = f"{statistics.mean(used):.0f} pages in use (mean), {max(used)} max, of {total}"
            rows += [static, summary(f"server, concurrency {args.concurrency}", served, served_wall, kv)]
            ratios.append(rows[-1]["tok_s"] / static["tok_s"])
    lengths = [r.output_len for r in reqs]
    print(f"model {name} ({cfg.num_params / 1e6:.1f}M), "
          f"{jnp.dtype(dt).name}, {jax.devices()[0].device_kind}; {len(reqs)} requests, prompt tokens median "
          f"{statistics.median(len(r.prompt) for r in reqs):.0f} (max {max(len(r.prompt) for r in reqs)}), output "
          f"median {statistics.median(lengths):.0f} (max {max(lengths)})")  # fmt: skip
    print(f"server warm-up: {passes[0]} passes, the last compiling {passes[1]} programs")
    print(format_table(rows))
    print(f"continuous / static output tok/s: {statistics.median(ratios):.2f}x, the median of {len(ratios)} rounds "
          f"({', '.join(f'{r:.2f}x' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
