"""Format detection, loading any checkpoint into memory, and saving to any format."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.convert.hub import resolve_checkpoint
from llama_jax.convert.source import ConvertError, Source, get_leaf, iter_tensors, set_leaf
from llama_jax.dtypes import DTYPES

FORMATS = ("meta", "hf", "orbax")


@dataclass
class Checkpoint:
    """A whole model in memory: `params` is the canonical pytree of numpy arrays."""

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer_files: list[Path]
    format: str

    def read(self, key: str, layer: int | None = None) -> np.ndarray:
        leaf = get_leaf(self.params, key)
        return leaf if layer is None else leaf[layer]

    def dtype(self, key: str) -> np.dtype:
        return get_leaf(self.params, key).dtype


def detect_format(path: str | os.PathLike) -> str:
    """The format of the checkpoint directory `path` ("meta", "hf" or "orbax"), from its files."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path} is not a directory")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").is_file():
        if (path / "params").is_dir() or (path / "checkpoints").is_dir():
            return "orbax"
        if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")) or any(path.glob("*.index.json")):
            return "hf"
    raise ConvertError(
        f"cannot tell the checkpoint format of {path}: expected params.json + consolidated.*.pth (meta), "
        "config.json + *.safetensors or pytorch_model*.bin (hf), or config.json + params/ or checkpoints/ (orbax)"
    )


def _dtype(dtype: Any) -> np.dtype | None:
    if dtype is None or dtype == "keep":
        return None
    try:
        return DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    except (KeyError, TypeError):
        raise ConvertError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def open_checkpoint(
    path: str | os.PathLike, fmt: str = "auto", dtype: Any = None, revision: str | None = None
) -> Source:
    """A streaming reader: tensors are read (and cast to `dtype`) one layer at a time, on demand.
    `path` is a directory or a Hugging Face model id in the local cache (at `revision`, see hub)."""
    # Imported on use: jax and orbax are slow to import.
    from llama_jax.convert.hf import HFReader
    from llama_jax.convert.meta import MetaReader
    from llama_jax.convert.orbax_ckpt import LoraRunReader, OrbaxReader, lora_run_base
    from llama_jax.lora import CONFIG_FILE as lora_run_file

    path = resolve_checkpoint(path, revision)
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"meta": MetaReader, "hf": HFReader, "orbax": OrbaxReader}
    if fmt not in readers:
        raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_dir():
        raise ConvertError(f"{path} is not a directory")
    if fmt == "orbax" and (path / lora_run_file).is_file():  # a LoRA run reads as its base, adapters merged
        lcfg, base = lora_run_base(path)
        return LoraRunReader(path, _dtype(dtype), lcfg, open_checkpoint(base))
    return readers[fmt](path, _dtype(dtype))


def load_checkpoint(
    path: str | os.PathLike, fmt: str = "auto", dtype: Any = None, revision: str | None = None
) -> Checkpoint:
    """Any checkpoint (Meta, HF or ours) as a canonical pytree of numpy arrays."""
    return read_checkpoint(open_checkpoint(path, fmt, dtype, revision))


def read_checkpoint(source: Source, dtype: Any = None) -> Checkpoint:
    """Every tensor of an open checkpoint, as a canonical pytree of numpy arrays (each cast to
    `dtype` as it is read, when given)."""
    cast = _dtype(dtype)
    params: dict[str, Any] = {}
    for t, layer, x in iter_tensors(source):
        x = x if cast is None else x.astype(cast, copy=False)
        if layer is None:
            set_leaf(params, t.key, x)
            continue
        if layer == 0:
            set_leaf(params, t.key, np.empty((source.config.n_layers, *x.shape), x.dtype))
        get_leaf(params, t.key)[layer] = x
    return Checkpoint(source.config, params, source.tokenizer_files, source.format)


def save_checkpoint(
    source: Source,
    dst: str | os.PathLike,
    fmt: str,
    *,
    model_parallel: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    quantize: str = "none",
) -> None:
    """Write `source` (a Checkpoint or an open_checkpoint reader) to the directory `dst` as `fmt`.

    Everything is written into a temporary sibling directory that replaces `dst` at the end, so a
    failure leaves `dst` as it was. model_parallel: Meta shard count; max_shard_bytes: HF shards;
    quantize: "int8" or "int4" writes a quantized Orbax checkpoint for inference (quant.py)."""
    from llama_jax.convert.hf import write_hf
    from llama_jax.convert.meta import write_meta
    from llama_jax.convert.orbax_ckpt import write_orbax

    dst = Path(dst)
    writers = {
        "meta": lambda tmp: write_meta(source, tmp, model_parallel, progress),
        "hf": lambda tmp: write_hf(source, tmp, max_shard_bytes, progress),
        "orbax": lambda tmp: write_orbax(source, tmp, progress, quantize),
    }
    if fmt not in writers:
        raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if source.config.quantization != "none":
        raise ConvertError(
            f"the checkpoint is quantized ({source.config.quantization}): it cannot be converted "
            f"(to {fmt} or otherwise); convert the unquantized checkpoint instead"
        )
    if quantize != "none" and fmt != "orbax":
        raise ConvertError(f"--quantize writes Orbax checkpoints only (--to orbax), not {fmt}")
    try:
        source.config.replace(quantization=quantize)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    if fmt == "meta" and source.config.head != "lm":
        raise ConvertError("Meta's format holds language models only; write a reward model --to hf or --to orbax")
    if model_parallel != 1 and fmt != "meta":
        raise ConvertError("--model-parallel only applies to --to meta")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"{dst} already exists and is not empty (use --overwrite to replace it)")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        writers[fmt](tmp)
        for f in source.tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            old.rename(dst)  # the swap failed half way: put the original back
        elif old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
