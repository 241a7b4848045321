"""Training documents: one text file, one JSONL line (`field`), one Parquet row (`field` column)
or one ArrayRecord record (UTF-8 text) each; the Python standard library when no data is given;
and the seeded held-out split that documents and fine-tuning examples share."""

from __future__ import annotations

import functools
import glob
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grain
import numpy as np

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
    return Corpus(*hold_out(docs, eval_fraction, seed, "documents"))


def hold_out(
    items: grain.MapDataset, fraction: float, seed: int, what: str
) -> tuple[grain.MapDataset, grain.MapDataset]:
    """(training, held-out) items: a seeded `fraction` of them (at least one, never all) held out."""
    if len(items) < 2:
        raise DataError(f"need at least two {what} to hold one out (or pass --eval-data); got {len(items)}")
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    order = items.shuffle(seed)
    return order[count:], order[:count]


def document_lines(docs: grain.MapDataset, limit: int) -> Iterator[str]:
    """The first `limit` non-blank lines of the documents, for training a tokenizer."""
    lines = (line for i in range(len(docs)) for line in docs[i].splitlines() if line.strip())
    return itertools.islice(lines, limit)
