"""`infer.py serve`: load the model once, start the engine thread and run the app on uvicorn.

SIGTERM (or Ctrl-C) stops accepting connections, lets the running requests finish for up to
--drain-timeout seconds (uvicorn's graceful shutdown), stops the engine and exits 0."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time

import jax

from llama_jax import sharding
from llama_jax.errors import UserError
from llama_jax.paged import pool_bytes_per_page
from llama_jax.serving.engine import Engine, EngineConfig

GIB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the checkpoint)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (slots)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--kv-memory", type=float, default=None, help="GiB of KV cache per device")
    p.add_argument("--kv-memory-fraction", type=float, default=0.9,
                   help="without --kv-memory on GPU/TPU: this fraction of the memory left after loading")  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step (all rows)")
    p.add_argument("--max-prefill-seqs", type=int, default=16, help="most prompts prefilled together in a step")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before answering 429")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests after SIGTERM")
    p.add_argument("--min-batch-bucket", type=int, default=8, help="decoding rows are padded to a power of two >= N")
    p.add_argument("--min-page-bucket", type=int, default=4, help="page tables are padded to a power of two >= N")
    p.add_argument("--compile-only", action="store_true", help="compile the engine step for --topology, print memory")
    p.add_argument("--topology", default=None, help="TPU slice for --compile-only, e.g. v5e-8 or v6e-8")
    p.add_argument("--model", default=None, help="model preset for --compile-only (no checkpoint needed)")


def engine_config(args: argparse.Namespace, num_pages: int) -> EngineConfig:
    names = ("max_num_seqs", "page_size", "prefill_chunk", "max_prefill_seqs", "max_queue", "min_batch_bucket",
             "min_page_bucket")  # fmt: skip
    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.prefill_chunk % args.page_size:
        raise UserError(f"--prefill-chunk ({args.prefill_chunk}) must be a multiple of --page-size ({args.page_size})")
    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        page_size=args.page_size,
        num_pages=num_pages,
        prefill_chunk=args.prefill_chunk,
        max_prefill_seqs=args.max_prefill_seqs,
        max_queue=args.max_queue,
        min_rows=args.min_batch_bucket,
        min_pages=args.min_page_bucket,
    )


def kv_shards(plan: sharding.Plan, mesh: jax.sharding.Mesh) -> int:
    """How many ways the page pools are split (over kv heads)."""
    spec = sharding.pool_sharding(plan, mesh).spec
    return math.prod(mesh.shape[n] for axis in spec for n in ((axis,) if isinstance(axis, str) else axis or ()))


def num_pages(args: argparse.Namespace, cfg, dtype, plan, mesh) -> int:
    """Pages of the pools (the null page included): --kv-memory per device, else the fraction of
    free device memory, else (CPU) enough for --max-num-seqs sequences of the whole context."""
    per_page = pool_bytes_per_page(cfg, args.page_size, dtype) / kv_shards(plan, mesh)
    budget = None
    if args.kv_memory is not None:
        budget = args.kv_memory * GIB
    else:
        stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "bytes_limit" in stats:
            budget = args.kv_memory_fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if budget is None:
        return 1 + args.max_num_seqs * -(-cfg.max_seq_len // args.page_size)
    pages = int(budget // per_page)
    if pages < 2 + -(-cfg.max_seq_len // args.page_size) // 8:
        raise UserError(f"a KV cache budget of {budget / GIB:.2f} GiB holds only {pages} pages; raise --kv-memory")
    return pages


class BackgroundServer:
    """An app on uvicorn in a thread, on 127.0.0.1 and an ephemeral port unless told otherwise
    (benchmarks and tests); stopped when the `with` block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.host, self.port = self.server.servers[0].sockets[0].getsockname()[:2]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def cmd_serve(args: argparse.Namespace) -> None:
    if args.compile_only:
        from llama_jax import aot

        if not args.model or not args.topology:
            raise UserError("--compile-only needs --model PRESET and --topology (e.g. v5e-8)")
        return aot.compile_serve(args.model, args.topology, args.sharding, args.dtype, engine_config(args, 0),
                                 args.kv_memory)  # fmt: skip
    import uvicorn

    from llama_jax.load import load
    from llama_jax.serving.api import create_app

    lm = load(
        args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding, quantize=args.quantize
    )
    with sharding.activate(lm.plan, lm.mesh):
        pages = num_pages(args, lm.cfg, lm.model.dtype, lm.plan, lm.mesh)
        engine = Engine(
            lm.model, lm.params, lm.tokenizer.vocab_size, engine_config(args, pages),
            pool_sharding=sharding.pool_sharding(lm.plan, lm.mesh),
            context=lambda: sharding.activate(lm.plan, lm.mesh),
        )  # fmt: skip
    name = args.served_model_name or args.checkpoint
    app = create_app(engine, lm.tokenizer, name, args.api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_jax.serving").info(
        "%d KV pages of %d tokens (%.2f GiB per device), %d slots",
        pages, args.page_size, pages * pool_bytes_per_page(lm.cfg, args.page_size, lm.model.dtype)
        / kv_shards(lm.plan, lm.mesh) / GIB, args.max_num_seqs,
    )  # fmt: skip
    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=args.drain_timeout, log_level="info"
    )
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler makes that
    # a clean exit (0) instead of death by SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
