"""Which sequences run at each engine step (continuous batching).

Up to `max_num_seqs` sequences run at once. A waiting sequence is admitted when a slot and the
pages for its whole length (prompt + max_tokens, less the pages it shares through the prefix
cache) are free, so a running sequence never runs out of pages and never has to be preempted.
Beyond that, sequences wait in a queue of at most `max_queue` (`QueueFull` past it). Each step
decodes one token for every running sequence whose prompt is in the cache, and prefills the next
chunk of up to `max_prefill_seqs` others (their chunks together at most `prefill_chunk` tokens,
each starting on a page boundary, shaped so that the step prefills as many prompt tokens as it
can and computes no more than it needs). A finished or cancelled sequence releases its pages at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llama_jax.buckets import bucket
from llama_jax.serving.pages import PagePool, page_hashes


class QueueFull(Exception):
    """The waiting queue is at --max-queue."""


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with n > 1 has n of them)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # the row seed (generate.row_seeds): token i is sampled with fold_in(key(seed), i)
    owner: Any = None  # what the engine reports this sequence's tokens to
    tokens: list[int] = field(default_factory=list)  # generated so far
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full pages named so far
    computed: int = 0  # tokens whose keys and values are in the pages
    cached: int = 0  # prompt tokens found in the prefix cache
    finished: bool = False

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)

    def token_at(self, i: int) -> int:
        return self.prompt[i] if i < len(self.prompt) else self.tokens[i - len(self.prompt)]


@dataclass
class Plan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, tokens of its prompt this step)
    prefill_width: int  # tokens per prefill row (`Scheduler._prefill_shape`)


def max_prefill_rows(max_prefill_seqs: int, prefill_chunk: int, page_size: int) -> int:
    """The most rows a prefill group has: a power of two, each row at least one page."""
    return min(bucket(max_prefill_seqs, 1), prefill_chunk // page_size)


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        max_num_seqs: int,
        max_queue: int,
        prefill_chunk: int,
        max_prefill_seqs: int,
    ):
        size = pool.page_size
        if prefill_chunk % size or prefill_chunk < size:
            raise ValueError(f"--prefill-chunk ({prefill_chunk}) must be a multiple of --page-size ({size})")
        self.pool, self.max_num_seqs, self.max_queue = pool, max_num_seqs, max_queue
        self.prefill_chunk = prefill_chunk
        self.max_prefill_seqs = max_prefill_rows(max_prefill_seqs, prefill_chunk, size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Pages of a sequence's whole length (its last token is never fed back)."""
        return -(-(prompt_len + max_tokens - 1) // self.pool.page_size)

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request together (all or none)."""
        if len(self.waiting) + len(seqs) > self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
        for s in seqs:
            s.hashes = page_hashes(s.prompt, self.pool.page_size)
        self.waiting.extend(seqs)

    def finish(self, seq: Sequence) -> None:
        """Finished or cancelled: leave the queue or the batch and release the pages now."""
        if seq.finished:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.pages)
        seq.pages = []

    def schedule(self) -> Plan | None:
        self._admit()
        decode = [s for s in self.running if s.prefilled]
        candidates = [s for s in self.running if not s.prefilled]
        prefill, width = [], 0
        if candidates:
            rows, width = self._prefill_shape(candidates)
            prefill = [(s, min(width, len(s.prompt) - s.computed)) for s in candidates[:rows]]
        if not decode and not prefill:
            return None
        return Plan(decode, prefill, width)

    def _prefill_shape(self, candidates: list[Sequence]) -> tuple[int, int]:
        """The rows x width of this step's prefill group (rows a power of two, width whole pages,
        a power of two of them or the chunk's share): the most prompt tokens in arrival order, at
        most `prefill_chunk` in all, then the fewest computed. One long prompt takes the whole
        chunk, many short ones share it, and a short one alone computes little more than itself."""
        size, options, rows = self.pool.page_size, [], 1
        while rows <= min(bucket(len(candidates), 1), self.max_prefill_seqs):
            left = [len(s.prompt) - s.computed for s in candidates[:rows]]
            width = min(self.prefill_chunk // rows // size, bucket(-(-max(left) // size), 1)) * size
            options.append((sum(min(width, n) for n in left), -rows * width, rows, width))
            rows *= 2
        _, _, rows, width = max(options, key=lambda o: o[:2])  # the first (fewest rows) of equals
        return rows, width

    def _admit(self) -> None:
        """Admit waiting sequences in order while slots and pages last. A sequence whose prefix
        another sequence is computing waits for it (and lets the ones behind it go first)."""
        size = self.pool.page_size
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                return
            shared, wait = self.pool.match(seq.hashes)
            if wait:
                continue
            shared = shared[: (len(seq.prompt) - 1) // size]  # compute at least the last prompt token
            new = self.pages_needed(len(seq.prompt), seq.max_tokens) - len(shared)
            if self.pool.cost(shared, new) > self.pool.available:
                return  # in order: a large request is not overtaken for ever by small ones
            self.pool.acquire(shared)
            seq.pages = shared + self.pool.allocate(new)
            seq.computed = seq.cached = len(shared) * size
            self.pool.count_lookup(len(seq.prompt), seq.cached)
            for i in range(len(shared), len(seq.hashes)):  # prompt pages this sequence will compute
                self.pool.register(seq.pages[i], seq.hashes[i], pending=True)
            self.waiting.remove(seq)
            self.running.append(seq)

    def advance(self, seq: Sequence, fed: int, sampled: int | None) -> None:
        """After a step: `fed` more tokens of seq are in the cache; `sampled` is its next token
        (None while the prompt is not done). Pages that became full are named in the cache."""
        size = self.pool.page_size
        seq.computed += fed
        if sampled is not None:
            seq.tokens.append(sampled)
        full = seq.computed // size
        for i in range(len(seq.hashes)):  # prompt pages: computed now (or were shared)
            if (i + 1) * size <= seq.computed:
                self.pool.computed(seq.pages[i])
        while len(seq.hashes) < full:  # generated tokens filled a page
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else b""
            content = page_hashes([seq.token_at(j) for j in range(i * size, (i + 1) * size)], size, parent)[0]
            seq.hashes.append(content)
            self.pool.register(seq.pages[i], content, pending=False)
