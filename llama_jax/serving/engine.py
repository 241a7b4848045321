"""The engine: a thread beside the HTTP server that owns the page pools and runs steps.

Requests enter as `Sequence`s, each with an `Output` that turns its tokens into text (detokenizer,
stop strings and stop tokens) and hands events to whoever waits for them (the server's event
loop). Between steps the engine takes cancellations, admits waiting sequences and plans the next
step; a sequence that finishes or is cancelled releases its pages before the next plan. An error
while handling one sequence's output fails that sequence only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import jax

from llama_jax.model import Llama, Params
from llama_jax.paged import init_pools, pool_bytes_per_page
from llama_jax.serving.detokenizer import Detokenizer
from llama_jax.serving.metrics import Metrics
from llama_jax.serving.pages import PagePool
from llama_jax.serving.programs import Programs
from llama_jax.serving.scheduler import Scheduler
from llama_jax.serving.scheduler import Sequence as Seq
from llama_jax.serving.step import abstract, build_inputs, compile_step, run_step, step_shape

log = logging.getLogger("llama_jax.serving")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    page_size: int = 16
    num_pages: int = 0  # 0: enough for max_num_seqs sequences of the whole context
    prefill_chunk: int = 256
    max_prefill_seqs: int = 16
    max_queue: int = 1024
    min_rows: int = 1  # smallest bucket of decoding rows
    min_pages: int = 1  # smallest bucket of page-table width


def pages_for_memory(cfg, page_size: int, dtype, kv_bytes: float) -> int:
    """How many pages (the null page included) fit in kv_bytes of key and value pools."""
    return int(kv_bytes // pool_bytes_per_page(cfg, page_size, dtype))


@dataclass
class Delta:
    text: str
    tokens: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]  # (token, logprob, top alternatives)


@dataclass
class Finish:
    reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass
class Failure:
    message: str


@dataclass
class Output:
    """The consumer side of one sequence. `emit` receives Delta, then Finish or Failure; it is
    called on the engine thread and must not block."""

    tokenizer: Any
    emit: Callable[[object], None]
    max_tokens: int
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    logprobs: int | None = None  # how many alternatives per token (None: no log-probabilities)
    arrival: float = field(default_factory=time.monotonic)
    detokenizer: Detokenizer = field(init=False)
    count: int = 0
    last_time: float | None = None
    reason: str = ""

    def __post_init__(self):
        self.detokenizer = Detokenizer(self.tokenizer, self.stop)

    def token(self, token: int, logprob: float, top: list[tuple[int, float]], metrics: Metrics) -> bool:
        """Handle a sampled token; True when the sequence is done."""
        now = time.monotonic()
        if self.last_time is None:
            metrics.ttft.observe(now - self.arrival)
        else:
            metrics.itl.observe(now - self.last_time)
        self.last_time = now
        if token in self.stop_ids:
            return self._finish("stop", self.detokenizer.flush(), [], [])
        self.count += 1
        metrics.generation_tokens.inc()
        text = self.detokenizer.add(token)
        lp = [(token, logprob, top)] if self.logprobs is not None else []
        if self.detokenizer.stopped:
            return self._finish("stop", text, [token], lp)
        if self.count >= self.max_tokens:
            return self._finish("length", text + self.detokenizer.flush(), [token], lp)
        self.emit(Delta(text, [token], lp))
        return False

    def _finish(self, reason: str, text: str, tokens: list[int], lp: list) -> bool:
        if text or tokens:
            self.emit(Delta(text, tokens, lp))
        self.emit(Finish(reason, self.count))
        self.reason = reason
        return True


class Engine:
    def __init__(
        self,
        model: Llama,
        params: Params,
        vocab_limit: int,
        config: EngineConfig,
        cache_dtype=None,
        pool_sharding: jax.sharding.Sharding | None = None,
        context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ):
        """context: entered by the engine thread (the mesh and sharding rules of the params)."""
        cfg = model.cfg
        self.model, self.params, self.vocab_limit, self.config = model, params, vocab_limit, config
        num_pages = config.num_pages or 1 + config.max_num_seqs * -(-cfg.max_seq_len // config.page_size)
        self.pool = PagePool(num_pages, config.page_size)
        self.scheduler = Scheduler(
            self.pool, config.max_num_seqs, config.max_queue, config.prefill_chunk, config.max_prefill_seqs
        )
        self._pools = jax.jit(
            lambda: init_pools(cfg, num_pages, config.page_size, cache_dtype or model.dtype),
            out_shardings=None if pool_sharding is None else (pool_sharding, pool_sharding),
        )  # created in place, already sharded
        self.k, self.v = self._pools()
        self._context = context
        params_spec, pool_spec = jax.tree.map(abstract, params), abstract(self.k)
        self.programs = Programs(
            lambda shape: compile_step(model, params_spec, (pool_spec, pool_spec), shape, vocab_limit), context
        )
        self.metrics = Metrics()
        self.metrics.pages(self.pool.stats())
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._cancelled: list[Seq] = []
        self._stop = False
        self._counted = (0, 0)
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="llama-jax-engine", daemon=True)

    # -- called from other threads ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Seq]) -> None:
        """Queue a request's sequences; raises scheduler.QueueFull at once when the queue is full."""
        with self._lock:
            if self._stop:
                raise RuntimeError("the engine is stopping")
            self.scheduler.add(seqs)
            self.metrics.waiting.set(len(self.scheduler.waiting))
            self._wake.notify()

    def cancel(self, seqs: Sequence[Seq]) -> None:
        """Stop generating (a client went away); the pages are released before the next step."""
        with self._lock:
            self._cancelled.extend(s for s in seqs if not s.finished)
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        self.programs.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def fits(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether a sequence can ever be admitted (its pages fit in the whole pool)."""
        return self.scheduler.pages_needed(prompt_len, max_tokens) <= self.pool.usable

    # -- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        with self._context():
            self._run()

    def _run(self) -> None:
        while True:
            with self._lock:
                for seq in self._cancelled:
                    self._end(seq, "cancelled")
                self._cancelled.clear()
                if self._stop:
                    for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                        seq.owner.emit(Failure("the server is shutting down"))
                        self._end(seq, "aborted")
                    return
                plan = self.scheduler.schedule()
                self._count_admissions()
                if plan is None:
                    self._wake.wait(timeout=1.0)
                    continue
                size = self.config.page_size
                shape = self.programs.choose(step_shape(plan, size, self.config.min_rows, self.config.min_pages))
                inputs = build_inputs(plan, size, shape)
            try:
                host, self.k, self.v = run_step(self.model, self.params, self.k, self.v, inputs, self.vocab_limit)
            except Exception:  # the step itself failed: every sequence in it fails, the cache is reset
                log.exception("engine step failed")
                with self._lock:
                    self._reset(inputs.rows, "the engine step failed")
                continue
            with self._lock:
                self._advance(plan, inputs, host)

    def _advance(self, plan, inputs, host) -> None:
        nxt, chosen, top_values, top_ids = host
        fed = {id(s): 1 for s in plan.decode} | {id(s): n for s, n in plan.prefill}
        self.metrics.steps.inc()
        self.steps += 1
        for i, seq in enumerate(inputs.rows):
            if seq is None or seq.finished:
                continue
            n = fed[id(seq)]
            done_prompt = seq.computed + n >= len(seq.prompt)
            sampled = int(nxt[i]) if done_prompt else None
            self.scheduler.advance(seq, n, sampled)
            if sampled is None:
                continue
            try:
                out: Output = seq.owner
                top = [(int(t), float(lp)) for t, lp in zip(top_ids[i], top_values[i], strict=True)]
                done = out.token(sampled, float(chosen[i]), top[: out.logprobs or 0], self.metrics)
            except Exception as e:  # this sequence's output failed: fail it alone
                log.exception("output of a sequence failed")
                seq.owner.emit(Failure(f"internal error: {type(e).__name__}: {e}"))
                self._end(seq, "error")
                continue
            if done:
                self._end(seq, out.reason)
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.pages(self.pool.stats())

    def _end(self, seq: Seq, reason: str) -> None:
        if not seq.finished:
            self.scheduler.finish(seq)
            self.metrics.finished.labels(reason).inc()
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.pages(self.pool.stats())

    def _count_admissions(self) -> None:
        queried, hit = self.pool.queried_tokens, self.pool.hit_tokens
        dq, dh = queried - self._counted[0], hit - self._counted[1]
        if dq:
            self.metrics.prompt_tokens.inc(dq)
            self.metrics.prefix_queries.inc(dq)
            self.metrics.prefix_hits.inc(dh)
            self.metrics.prefill_tokens.inc(dq - dh)
        self._counted = (queried, hit)
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.running.set(len(self.scheduler.running))

    def _reset(self, rows: list, message: str) -> None:
        """After a failed step: fail the step's sequences. If the pools are gone (donated to the
        failed step), every running sequence fails and the cache starts empty."""
        for seq in rows:
            if seq is not None and not seq.finished:
                seq.owner.emit(Failure(message))
                self._end(seq, "error")
        if not (self.k.is_deleted() or self.v.is_deleted()):
            return
        for seq in list(self.scheduler.running):
            seq.owner.emit(Failure(message))
            self._end(seq, "error")
        self.pool = self.scheduler.pool = PagePool(self.pool.num_pages, self.pool.page_size)
        self.k, self.v = self._pools()
        self._counted = (0, 0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self.pool.stats() | {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "steps": self.steps,
                "padded_steps": self.programs.padded_steps,
                "background_compiles": self.programs.background_compiles,
            }
