"""Which compiled program each engine step runs in, so that a new shape never stalls serving.

A step's own bucketed shape (`step.StepShape`) may not have been compiled yet; compiling it takes
seconds, during which every running request would wait. If a compiled program holds the shape
(at least as many decoding rows, live pages and page-table columns, a prefill group at least as
large), the step runs in the smallest such program, padded; once a shape has run padded a few
times, its own program compiles on a background thread, and later steps of that shape run in it.
Only a shape that nothing compiled holds is compiled by the step itself. vLLM pads to its
captured CUDA-graph batch sizes in the same way.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager

from llama_jax.serving.step import StepShape

log = logging.getLogger("llama_jax.serving")
COMPILE_AFTER = 3  # padded steps of a shape before its own program is compiled (rare ones never are)


class Programs:
    def __init__(
        self,
        compile_shape: Callable[[StepShape], None],
        context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ):
        """compile_shape: compiles one shape's programs without running them (`step.compile_step`);
        context: entered by the compiling thread (the mesh and sharding rules)."""
        self._compile, self._context = compile_shape, context
        self._lock = threading.Lock()
        self._ready: set[StepShape] = set()  # compiled, or being compiled by the step that needs it
        self._wanted: Counter[StepShape] = Counter()  # padded steps of each shape not compiled
        self._queue: queue.Queue[StepShape | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="llama-jax-compile", daemon=True)
        self.padded_steps = 0  # steps run in a larger program than their own
        self.background_compiles = 0

    def choose(self, shape: StepShape) -> StepShape:
        """The shape of the program to run a step of `shape` in."""
        with self._lock:
            if shape in self._ready:
                return shape
            holders = [s for s in self._ready if s.holds(shape)]
            if not holders:
                self._ready.add(shape)  # the step compiles it
                return shape
            self._wanted[shape] += 1
            if self._wanted[shape] == COMPILE_AFTER:
                if not self._thread.is_alive():
                    self._thread.start()
                self._queue.put(shape)
            self.padded_steps += 1
            return min(holders, key=lambda s: (s.tokens, s.live, s.rows, s.pages))

    def stop(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        with self._context():
            while (shape := self._queue.get()) is not None:
                try:
                    self._compile(shape)
                except Exception:  # the shape stays held by the larger program
                    log.exception("compiling the step programs of %s failed", shape)
                    continue
                with self._lock:
                    self._ready.add(shape)
                    self.background_compiles += 1
