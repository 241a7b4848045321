"""Training data on grain: documents -> tokens -> packed fixed-length rows.

A *document* is one text file, one JSONL line (`field`), one Parquet row (`field` column) or one
ArrayRecord record (UTF-8 text). The documents are dealt to `streams` independent data streams
(stream s reads every `streams`-th one, shuffled with a seed, a new order each epoch); each
stream's documents are tokenized (`BOS text EOS`; in `workers` grain processes, or in this one)
and packed into rows of `seq_len` tokens by concatenating documents and splitting at row
boundaries. Each document gets its own segment id (1, 2, ... within a row; 0 is padding) and
positions from 0, so the model never attends across documents, and inputs and targets are
shifted within a document, so no target crosses into the next one.

A batch is a dict of [batch, seq_len] int32 arrays: tokens, targets, positions, segment_ids,
loss_mask. Each stream gives `batch / streams` consecutive rows of every batch, in stream order,
and each process runs a contiguous block of the streams and so holds a contiguous block of rows.
The batches therefore depend on the number of streams, never on the number of processes, and the
streams' iterator states (`Streams.get_state`, JSON) are saved with the model: a run resumes at
the exact next batch on any process count that divides the number of streams.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import os
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
from absl import flags

from llama_jax.tokenizer import load_tokenizer

Batch = dict[str, np.ndarray]
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrayrecord": "arrayrecord"}  # others: text


class DataError(ValueError):
    """Data that cannot be found or read."""


def stdlib_files() -> list[str]:
    """The .py files of this interpreter's standard library, without tests and site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]
        files += [os.path.join(directory, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files)


def expand(globs: str) -> list[str]:
    """Comma-separated globs (with `**`) -> sorted files; each glob must match a file."""
    files: set[str] = set()
    for pattern in filter(None, (g.strip() for g in globs.split(","))):
        matches = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matches:
            raise DataError(f"--data pattern {pattern!r} matches no file")
        files.update(matches)
    if not files:
        raise DataError("no data files given")
    return sorted(files)


class TextFiles:
    """One document per file."""

    def __init__(self, paths: Sequence[str]):
        unreadable = [p for p in paths if not os.access(p, os.R_OK)]
        if unreadable:
            raise DataError(f"cannot read data file {unreadable[0]}")
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        with open(self.paths[i], encoding="utf-8", errors="replace") as f:
            return f.read()


class JsonLines:
    """One document per non-blank line: the string in `field` of its JSON object.

    The byte offset of every line is indexed up front; the first line of each file is checked."""

    def __init__(self, paths: Sequence[str], field: str):
        self.paths, self.field = list(paths), field
        file_ids, offsets = [], []
        for file_id, path in enumerate(self.paths):
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        file_ids.append(file_id)
                        offsets.append(offset)
                    offset += len(line)
        self.file_ids, self.offsets = np.asarray(file_ids, np.int32), np.asarray(offsets, np.int64)
        for first in np.unique(self.file_ids, return_index=True)[1]:
            self[int(first)]  # raises DataError when the file's first document is malformed

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        path = self.paths[self.file_ids[i]]
        with open(path, "rb") as f:
            f.seek(self.offsets[i])
            line = f.readline()
        try:
            text = json.loads(line)[self.field]
        except (ValueError, TypeError, KeyError):
            raise DataError(f"{path}: a line is not a JSON object with a string field {self.field!r}") from None
        if not isinstance(text, str):
            raise DataError(f"{path}: field {self.field!r} is not a string")
        return text


class ParquetRows:
    """One document per row: the string in column `field`. Rows are read a row group at a time
    (the last few stay cached), so shuffled reading suits files with small row groups."""

    def __init__(self, paths: Sequence[str], field: str):
        import pyarrow.parquet as pq

        self.paths, self.field = list(paths), field
        groups = []
        for file_id, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
                raise DataError(f"cannot read Parquet file {path}: {e}") from None
            if field not in meta.schema.names:
                raise DataError(f"{path}: no column {field!r} (columns: {', '.join(meta.schema.names)})")
            groups += [(file_id, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.groups = [(f, g) for f, g, n in groups if n]
        self.starts = np.cumsum([0] + [n for _, _, n in groups if n])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one source per run; the cache is the point)
    def _group(self, index: int) -> list:
        import pyarrow.parquet as pq

        file_id, group = self.groups[index]
        return pq.ParquetFile(self.paths[file_id]).read_row_group(group, columns=[self.field]).column(0).to_pylist()

    def __getitem__(self, i: int) -> str:
        index = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._group(index)[i - self.starts[index]] or ""


class ArrayRecords:
    """One document per record, the record being UTF-8 text."""

    def __init__(self, paths: Sequence[str]):
        try:
            self.source = grain.sources.ArrayRecordDataSource(list(paths))
        except Exception as e:  # array_record raises RuntimeError/ValueError from C++
            raise DataError(f"cannot read ArrayRecord files: {e}") from None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        return self.source[i].decode("utf-8", errors="replace")


def open_documents(paths: Sequence[str], data_format: str = "auto", field: str = "text") -> grain.MapDataset:
    """Random access to the documents of `paths` (format 'auto': by file extension)."""
    if data_format == "auto":
        formats = {FORMATS.get(os.path.splitext(p)[1].lower(), "text") for p in paths}
        if len(formats) > 1:
            raise DataError(f"data files of several formats ({', '.join(sorted(formats))}); pass --data-format")
        data_format = formats.pop()
    if data_format == "text":
        source = TextFiles(paths)
    elif data_format == "jsonl":
        source = JsonLines(paths, field)
    elif data_format == "parquet":
        source = ParquetRows(paths, field)
    else:
        source = ArrayRecords(paths)
    if not len(source):
        raise DataError("the data files hold no documents")
    return grain.MapDataset.source(source)


@dataclass
class Corpus:
    train: grain.MapDataset  # documents (str)
    eval: grain.MapDataset


def load_corpus(data: str, eval_data: str, eval_fraction: float, data_format: str, field: str, seed: int) -> Corpus:
    """Training and held-out documents. Without `eval_data`, a seeded `eval_fraction` of the
    documents (at least one) is held out; with no `data` at all, the Python standard library."""
    docs = open_documents(expand(data) if data else stdlib_files(), data_format, field)
    if eval_data:
        return Corpus(docs, open_documents(expand(eval_data), data_format, field))
    if len(docs) < 2:
        raise DataError("need at least two documents to hold one out (or pass --eval-data)")
    held_out = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
    order = docs.shuffle(seed)
    return Corpus(order[held_out:], order[:held_out])


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


def _model_batch(b: Batch) -> Batch:
    return {
        "tokens": b["tokens"],
        "targets": b["targets"],
        "positions": b["tokens_positions"],
        "segment_ids": b["tokens_segment_ids"],
        "loss_mask": (b["targets_segment_ids"] > 0).astype(np.int32),
    }


def packed_batches(
    docs: grain.MapDataset,
    tokenizer_path: str,
    seq_len: int,
    batch_size: int,
    workers: int = 0,
    shuffle_window: int = 1,
    seed: int = 0,
) -> grain.IterDataset:
    """Documents -> batches of packed rows, tokenized in `workers` processes (0: in this one).
    Rows are shuffled in windows of `shuffle_window`, since a long document fills many rows."""
    # A few documents tokenized ahead by one thread: grain's default (16 threads, 500 documents ahead)
    # tokenizes far more than a stream consumes, and every stream would do so.
    ds = docs.map(Tokenize(tokenizer_path)).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    if workers:
        # grain reads absl flags when it starts workers; a program that is not an absl app has
        # not parsed them, so mark them parsed (their defaults stand).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_exit_with_parent)
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len, "targets": seq_len})
    if shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
    return ds.batch(batch_size, drop_remainder=True).map(_model_batch)


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


def stream_batches(
    items: grain.MapDataset,
    pack: Callable[[grain.MapDataset, int], grain.IterDataset],
    batch_size: int,
    seed: int,
    streams: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Streams:
    """This process's rows of every global batch of `batch_size`. The items (documents, examples)
    are dealt to the streams, stream s taking every `streams`-th one, reshuffled each epoch;
    `pack(share, rows)` turns a stream's endless items into batches of `batch_size / streams` rows."""
    if batch_size % streams:
        raise DataError(f"batch size {batch_size} is not divisible by {streams} data streams")
    if len(items) < streams:
        raise DataError(f"{len(items)} training items cannot feed {streams} data streams; pass --data-streams")
    rows = batch_size // streams
    return Streams(
        {
            s: pack(items[s::streams].shuffle(seed).repeat(), rows)
            for s in local_streams(streams, process_index, process_count)
        }
    )


def train_batches(
    docs: grain.MapDataset,
    tokenizer_path: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    streams: int = 1,
    workers: int = 0,
    shuffle_window: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Streams:
    """Endless batches of packed documents (`batch_size` rows in all processes together; this
    process's block of rows); `workers` tokenizing processes per stream."""

    def pack(share: grain.MapDataset, rows: int) -> grain.IterDataset:
        return packed_batches(share, tokenizer_path, seq_len, rows, workers, shuffle_window, seed)

    return stream_batches(docs, pack, batch_size, seed, streams, process_index, process_count)


def eval_batches(docs: grain.MapDataset, tokenizer_path: str, seq_len: int, batch_size: int, count: int) -> list[Batch]:
    """Up to `count` batches of the held-out documents, in order."""
    batches = list(itertools.islice(packed_batches(docs, tokenizer_path, seq_len, batch_size), count))
    if not batches:
        raise DataError(f"the held-out documents fill less than one batch of {batch_size} x {seq_len} tokens")
    return batches


def unigram_entropy(batches: Sequence[Batch], vocab_size: int) -> float:
    """Entropy in nats of the targets' own token distribution: no model that ignores context
    (a unigram model) has a lower cross-entropy on these tokens."""
    counts = sum(
        np.bincount(b["targets"].ravel(), weights=b["loss_mask"].ravel(), minlength=vocab_size) for b in batches
    )
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def document_lines(docs: grain.MapDataset, limit: int) -> Iterator[str]:
    """The first `limit` non-blank lines of the documents, for training a tokenizer."""
    lines = (line for i in range(len(docs)) for line in docs[i].splitlines() if line.strip())
    return itertools.islice(lines, limit)
