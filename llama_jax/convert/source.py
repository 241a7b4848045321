"""What every checkpoint reader provides, and the loop that streams its tensors to a writer."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.convert.layout import Tensor, items
from llama_jax.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


class ConvertError(UserError):
    """Bad input; the CLI reports it as one `error:` line."""


class Source(Protocol):
    """A checkpoint whose canonical tensors can be read one layer at a time."""

    config: LlamaConfig
    tokenizer_files: list[Path]
    format: str

    def read(self, key: str, layer: int | None = None) -> np.ndarray: ...

    def dtype(self, key: str) -> np.dtype: ...


class Reader:
    """Base of the streaming readers: casts to the requested dtype on the way out."""

    format = ""

    def __init__(self, path: Path, config: LlamaConfig, cast: np.dtype | None):
        self.path, self.config, self.cast = path, config, cast
        self.tokenizer_files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]

    def read(self, key: str, layer: int | None = None) -> np.ndarray:
        x = self._read(key, layer)
        return x if self.cast is None else x.astype(self.cast, copy=False)

    def dtype(self, key: str) -> np.dtype:
        return self.cast if self.cast is not None else self._dtype(key)

    def _read(self, key: str, layer: int | None) -> np.ndarray:
        raise NotImplementedError

    def _dtype(self, key: str) -> np.dtype:
        raise NotImplementedError


def iter_tensors(source: Source, progress: bool = False) -> Iterator[tuple[Tensor, int | None, np.ndarray]]:
    """Every canonical tensor of `source`, one layer at a time in items() order, with a bytes/s
    progress bar on stderr. A quantized checkpoint has no such tensors: it is for inference only."""
    if source.config.quantization != "none":
        raise ConvertError(
            f"the checkpoint is quantized ({source.config.quantization}): only inference (infer.py) loads it; "
            "train or convert from the unquantized checkpoint"
        )
    todo = list(items(source.config))
    total = sum(math.prod(t.shape(source.config)) * source.dtype(t.key).itemsize for t, _ in todo)
    # disable=None: no bar when stderr is not a terminal.
    with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, disable=None if progress else True) as bar:
        for t, layer in todo:
            bar.set_postfix_str(t.key if layer is None else f"{t.key}[{layer}]", refresh=False)
            x = source.read(t.key, layer)
            yield t, layer, x
            bar.update(x.nbytes)
            del x


def check_shape(what: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        raise ConvertError(f"{what} has shape {tuple(actual)}, but the config implies {tuple(expected)}")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise ConvertError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"malformed {path}: {e}") from None


def load_config(path: Path, parse: Callable[[Any], LlamaConfig]) -> LlamaConfig:
    """Parse a config file with one of llama_jax.config's readers, reporting the file on failure."""
    try:
        return parse(read_json(path))
    except ConfigError as e:
        raise ConvertError(f"{path}: {e}") from None


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def get_leaf(tree: dict, key: str) -> Any:
    for part in key.split("/"):
        tree = tree[part]
    return tree


def set_leaf(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value
