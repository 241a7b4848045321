"""Streaming reader and writer for safetensors files.

The format: an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets count from the end of the
header), then the raw little-endian tensor bytes. Tensors are read with pread into fresh arrays and
written with pwrite at offsets fixed by the header, so a file is never resident whole
(`safe_open` memory-maps the file, and every page it touches stays in the resident set).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from llama_jax.convert.source import ConvertError

CODES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in CODES.items()}
BLOCK_BYTES = 64 * 2**20


def _bytes(x: np.ndarray) -> memoryview:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8).data


class SafetensorsReader:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if 8 + n > size:
                raise ConvertError(f"{path} is truncated (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
                header.pop("__metadata__", None)
                self.tensors = {}
                for name, info in header.items():
                    dtype, shape, (begin, end) = CODES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
                    if end - begin != math.prod(shape) * dtype.itemsize:
                        raise ValueError(f"tensor {name} has {end - begin} bytes for shape {shape}")
                    if 8 + n + end > size:
                        raise ConvertError(f"{path} is truncated (tensor {name} ends past the end of the file)")
                    self.tensors[name] = (dtype, shape, 8 + n + begin)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConvertError(f"{path} is not a valid safetensors file: {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, offset = self.tensors[name]
        out = np.empty(shape, dtype)
        buf = _bytes(out)
        with open(self.path, "rb") as f:
            while buf:
                n = os.preadv(f.fileno(), [buf], offset)
                if n == 0:
                    raise ConvertError(f"{self.path} is truncated (tensor {name})")
                buf, offset = buf[n:], offset + n
        return out


class SafetensorsWriter:
    """Writes the header first (it is known from the specs), then each tensor, in any order."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.path, self.todo = path, {}
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.todo[name] = (tuple(shape), dtype, offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
        self.start = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(self.start + offset)

    def write(self, name: str, x: np.ndarray) -> None:
        """Write x in row blocks: a transposed view is made contiguous one block at a time."""
        shape, dtype, offset = self.todo.pop(name)
        assert x.shape == shape and x.dtype == dtype, (name, x.shape, x.dtype, shape, dtype)
        offset += self.start
        rows = max(1, BLOCK_BYTES // max(1, x[:1].nbytes))
        with open(self.path, "r+b") as f:
            for start in range(0, max(1, len(x)), rows):
                buf = _bytes(x[start : start + rows])
                while buf:
                    n = os.pwritev(f.fileno(), [buf], offset)
                    buf, offset = buf[n:], offset + n

    def close(self) -> None:
        assert not self.todo, f"{self.path}: tensors never written: {list(self.todo)}"
