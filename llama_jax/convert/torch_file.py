"""Reading and writing torch `.pth`/`.bin` state dicts one tensor at a time through memory maps.

Pages of a file mapping stay in the process's resident set once touched, so after each tensor is
copied out (or in) its pages are handed back with madvise(MADV_DONTNEED): peak memory stays about
one tensor whatever the file size. For shared (written) mappings the data stays in the page cache
and reaches the file as usual.
"""

from __future__ import annotations

import ctypes
import mmap
import pickle
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from llama_jax.convert.source import ConvertError

DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype(np.float64),
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _release(t: torch.Tensor) -> None:
    """Drop the pages of t's storage from this process's resident set."""
    storage = t.untyped_storage()
    start = storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    _libc.madvise(start, storage.data_ptr() + storage.nbytes() - start, mmap.MADV_DONTNEED)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t's memory (numpy has no bfloat16 of its own: go through int16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _load(path: Path, shared: bool = False) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE):
            state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise ConvertError(f"{path} needs arbitrary code to load{what}; torch weights_only refused it") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        reason = re.split(r"\.\s|\n", str(e).strip())[0] or type(e).__name__
        raise ConvertError(f"{path} is truncated or not a torch checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path} does not hold a flat state dict of tensors")
    return state


class TorchReader:
    def __init__(self, path: Path):
        self.path, self.tensors = path, _load(path)
        for name, t in self.tensors.items():
            if t.dtype not in DTYPES:
                raise ConvertError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.tensors[name].dtype]

    def read(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        out = np.array(_numpy(t))
        _release(t)
        return out


class TorchWriter:
    """Saves a skeleton (torch.save under skip_data: the zip with space reserved for every
    storage, written sparsely), maps it shared, then fills tensors in any order."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        # torch.empty only reserves address space; skip_data never touches the bytes.
        skeleton = {name: torch.empty(shape, dtype=TORCH_DTYPES[dtype]) for name, (shape, dtype) in specs.items()}
        with torch.serialization.skip_data():
            torch.save(skeleton, path)
        del skeleton
        self.path, self.todo = path, _load(path, shared=True)

    def write(self, name: str, x: np.ndarray) -> None:
        t = self.todo.pop(name)
        np.copyto(_numpy(t), x, casting="no")
        _release(t)

    def close(self) -> None:
        assert not self.todo, f"{self.path}: tensors never written: {list(self.todo)}"
