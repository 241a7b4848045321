"""Packed batches: items (documents, fine-tuning examples) -> fixed-length rows -> batches.

A document is tokenized (`BOS text EOS`; in `workers` grain processes, or in this one), and the
documents of a stream are concatenated and split at row boundaries. A fine-tuning example is packed
whole (grain's first-fit packing): a DPO pair is one unit, its chosen then its rejected sequence
(segments 2k+1 and 2k+2 for pair k of a row). Either way each sequence gets its own segment id
(1, 2, ... within a row; 0 is padding) and positions from 0, so the model never attends across
sequences, and inputs and targets are shifted within a sequence.

A batch is a dict of [batch, seq_len] int32 arrays: tokens, targets, positions, segment_ids,
loss_mask. The items are dealt to `streams` independent data streams (stream s reads every
`streams`-th one, shuffled with a seed, a new order each epoch), each giving `batch / streams`
consecutive rows of every batch, in stream order; each process runs a contiguous block of the
streams. So the batches depend on the number of streams, never on the number of processes, and the
streams' iterator states (`Streams.get_state`, JSON) saved with the model resume the exact next
batch on any process count that divides the number of streams.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from llama_jax.documents import DataError
from llama_jax.tokenizer import load_tokenizer

Batch = dict[str, np.ndarray]
# pack(items, rows, whole): batches of `rows` packed rows of the items; `whole`: drop a last partial batch.
Pack = Callable[[grain.MapDataset, int, bool], grain.IterDataset]
EXAMPLE_FEATURES = ("tokens", "targets", "loss_mask", "positions", "part")
IN_MEMORY = grain.ReadOptions(num_threads=0)  # examples are tokenized already: no reader threads


class Tokenize(grain.transforms.Map):
    """text -> {tokens: BOS text, targets: text EOS}; the tokenizer is loaded in each worker."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path}

    def map(self, text: str) -> Batch:
        ids = np.asarray(self.tokenizer.encode(text, bos=True, eos=True), np.int32)
        return {"tokens": ids[:-1], "targets": ids[1:]}


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In a grain worker: end this process once the training process is gone, even by SIGKILL
    (grain's workers would otherwise live on)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _document_batch(b: Batch) -> Batch:
    return {
        "tokens": b["tokens"],
        "targets": b["targets"],
        "positions": b["tokens_positions"],
        "segment_ids": b["tokens_segment_ids"],
        "loss_mask": (b["targets_segment_ids"] > 0).astype(np.int32),
    }


def documents_packer(
    tokenizer_path: str, seq_len: int, workers: int = 0, shuffle_window: int = 1, seed: int = 0
) -> Pack:
    """Documents -> batches of packed rows, tokenized in `workers` processes (0: in this one).
    Rows are shuffled in windows of `shuffle_window`, since a long document fills many rows."""

    def pack(docs: grain.MapDataset, rows: int, whole: bool) -> grain.IterDataset:
        # A few documents tokenized ahead by one thread: grain's default (16 threads, 500 documents
        # ahead) tokenizes far more than a stream consumes, and every stream would do so.
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
        ds = docs.map(Tokenize(tokenizer_path)).to_iter_dataset(options)
        if workers:
            # grain reads absl flags when it starts workers; a program that is not an absl app has
            # not parsed them, so mark them parsed (their defaults stand).
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_exit_with_parent)
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len, "targets": seq_len})
        if shuffle_window > 1:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
        return ds.batch(rows, drop_remainder=whole).map(_document_batch)

    return pack


def _example_batch(b: Batch, parts: int) -> Batch:
    """Packed example features -> a model batch: segment ids from the packer's example ids and the
    part (chosen/rejected) within each example; positions restart at every sequence; a reward
    pair's margin (float32) rides along."""
    example = b["tokens_segment_ids"]
    segment_ids = np.where(example > 0, parts * (example - 1) + b["part"], 0).astype(np.int32)
    keys = ("tokens", "targets", "positions", "loss_mask")
    margin = {"margin": b["margin"].astype(np.float32)} if "margin" in b else {}
    return {**{k: b[k].astype(np.int32) for k in keys}, "segment_ids": segment_ids, **margin}


def examples_packer(stage: str, seq_len: int) -> Pack:
    """Tokenized SFT, DPO or reward examples (llama_jax/examples.py) -> batches, each example
    packed whole."""
    features = (*EXAMPLE_FEATURES, "margin") if stage == "reward" else EXAMPLE_FEATURES

    def pack(examples: grain.MapDataset, rows: int, whole: bool) -> grain.IterDataset:
        ds = grain.experimental.FirstFitPackIterDataset(
            examples.to_iter_dataset(IN_MEMORY),
            length_struct=dict.fromkeys(features, seq_len),
            num_packing_bins=rows,
            shuffle_bins=False,
        )
        parts = 2 if stage in ("dpo", "reward") else 1
        return ds.batch(rows, drop_remainder=whole).map(functools.partial(_example_batch, parts=parts))

    return pack


def prompts_packer() -> Pack:
    """Prompts of an RL run (llama_jax/rl/prompts.py, each padded to one length) -> batches."""
    return lambda prompts, rows, whole: prompts.to_iter_dataset(IN_MEMORY).batch(rows, drop_remainder=whole)


def local_streams(streams: int, process_index: int, process_count: int) -> range:
    """The streams that process `process_index` of `process_count` runs: a contiguous block."""
    if streams % process_count:
        raise DataError(
            f"{streams} data streams cannot be shared by {process_count} processes; "
            f"pass --data-streams with a multiple of {process_count}"
        )
    per_process = streams // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class Streams:
    """Batches of several data streams concatenated in stream order: `next` takes one batch from
    each stream. Its state (JSON) maps each stream's number to that stream's iterator state, so
    states saved by processes that ran different streams combine into one."""

    def __init__(self, datasets: dict[int, grain.IterDataset]):
        self.iterators = {stream: iter(ds) for stream, ds in datasets.items()}

    def __iter__(self) -> Streams:
        return self

    def __next__(self) -> Batch:
        parts = [next(it) for it in self.iterators.values()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {str(stream): it.get_state() for stream, it in self.iterators.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Move each of this process's streams to its entry in `state` (which may hold others)."""
        missing = [stream for stream in self.iterators if str(stream) not in state]
        if missing:
            raise DataError(f"the checkpoint holds no state for data stream {missing[0]}")
        for stream, it in self.iterators.items():
            it.set_state(_slices_as_tuples(state[str(stream)]))

    def close(self) -> None:
        for it in self.iterators.values():
            it.close()


def _slices_as_tuples(state: Any) -> Any:
    """A JSON-decoded iterator state with grain's packing slices as tuples again: grain 0.2's
    concat-then-split compares them with the tuple (-1, -1) to tell that no document is half
    consumed, and a list never equals it, so a state saved at a document boundary would restore
    with a phantom remainder and a different data order."""
    if isinstance(state, dict):
        return {
            k: {f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices" else _slices_as_tuples(v)
            for k, v in state.items()
        }
    return [_slices_as_tuples(v) for v in state] if isinstance(state, list) else state


def train_batches(
    items: grain.MapDataset,
    pack: Pack,
    batch_size: int,
    seed: int,
    streams: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Streams:
    """This process's rows of every global batch of `batch_size`. The items (documents, examples)
    are dealt to the streams, stream s taking every `streams`-th one, reshuffled each epoch;
    `pack` turns a stream's endless items into batches of `batch_size / streams` rows."""
    if batch_size % streams:
        raise DataError(f"batch size {batch_size} is not divisible by {streams} data streams")
    if len(items) < streams:
        raise DataError(f"{len(items)} training items cannot feed {streams} data streams; pass --data-streams")
    rows = batch_size // streams
    return Streams(
        {
            s: pack(items[s::streams].shuffle(seed).repeat(), rows, True)
            for s in local_streams(streams, process_index, process_count)
        }
    )


def eval_batches(items: grain.MapDataset, pack: Pack, batch_size: int, count: int) -> list[Batch]:
    """Up to `count` batches of the held-out items in order; a last partial batch is filled up
    with empty rows (segment 0, no loss)."""
    batches = []
    for b in pack(items, batch_size, False):
        batches.append({k: np.pad(v, ((0, batch_size - len(v)), (0, 0))) for k, v in b.items()})
        if len(batches) == count:
            break
    if not batches:
        raise DataError("the held-out data hold no batch")
    return batches


def unigram_entropy(batches: Sequence[Batch], vocab_size: int) -> float:
    """Entropy in nats of the targets' own token distribution: no model that ignores context
    (a unigram model) has a lower cross-entropy on these tokens."""
    counts = sum(
        np.bincount(b["targets"].ravel(), weights=b["loss_mask"].ravel(), minlength=vocab_size) for b in batches
    )
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
