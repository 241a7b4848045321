"""Hugging Face `transformers` Llama checkpoints: config.json, generation_config.json and
safetensors shards (read also: pytorch_model*.bin), tokenizer files beside them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llama_jax.config import from_hf_config, to_hf_config
from llama_jax.convert.layout import BY_KEY, EMBEDDING, OUTPUT, from_torch, items, to_torch, torch_shape
from llama_jax.convert.safetensors_file import SafetensorsReader, SafetensorsWriter
from llama_jax.convert.source import (
    ConvertError,
    Reader,
    Source,
    check_shape,
    iter_tensors,
    load_config,
    read_json,
    write_json,
)
from llama_jax.convert.torch_file import TorchReader

INDEXES = {"model.safetensors.index.json": SafetensorsReader, "pytorch_model.bin.index.json": TorchReader}


def _open_weights(path: Path) -> dict:
    """Tensor name -> the open file that holds it."""
    for index, opener in INDEXES.items():
        if (path / index).is_file():
            weight_map = read_json(path / index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise ConvertError(f"malformed {path / index}: no weight_map")
            files = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise ConvertError(f"{path / index} lists shard {shard}, which is missing")
                files[shard] = opener(path / shard)
            return {name: files[shard] for name, shard in weight_map.items()}
    found = [(p, SafetensorsReader) for p in sorted(path.glob("*.safetensors"))]
    found = found or [(p, TorchReader) for p in sorted(path.glob("pytorch_model*.bin"))]
    if not found:
        raise ConvertError(f"{path} has config.json but no *.safetensors or pytorch_model*.bin weights")
    return {name: f for f in (opener(p) for p, opener in found) for name in f.tensors}


class HFReader(Reader):
    format = "hf"

    def __init__(self, path: Path, cast: np.dtype | None = None):
        super().__init__(path, load_config(path / "config.json", from_hf_config), cast)
        self.files = _open_weights(path)
        expected = {t.name("hf", layer): t for t, layer in items(self.config)}
        for name, t in expected.items():
            if name not in self.files or name not in self.files[name].tensors:
                raise ConvertError(f"tensor {name} is missing from {path}")
            check_shape(f"tensor {name}", self.files[name].shape(name), torch_shape(t, self.config))
        for name in self.files:
            tied_head = name == OUTPUT.hf and self.config.tie_embeddings
            if name not in expected and not tied_head and not name.endswith("rotary_emb.inv_freq"):
                raise ConvertError(f"unexpected tensor {name} in {path} (not a plain Llama model?)")

    def _read(self, key: str, layer: int | None) -> np.ndarray:
        t = BY_KEY[key]
        name = t.name("hf", layer)
        return from_torch(t, self.files[name].read(name), self.config)

    def _dtype(self, key: str) -> np.dtype:
        name = BY_KEY[key].name("hf", 0)
        return self.files[name].dtype(name)


def write_hf(source: Source, dst: Path, max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> None:
    cfg = source.config
    shards: list[dict] = [{}]  # per file: name -> (shape, dtype); layer by layer, like HF's own shards
    size = 0
    for t, layer in items(cfg, layer_major=True):
        shape, dtype = torch_shape(t, cfg), source.dtype(t.key)
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][t.name("hf", layer)] = (shape, dtype)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    names = ["model.safetensors"] if len(shards) == 1 else names
    files = [SafetensorsWriter(dst / name, specs) for name, specs in zip(names, shards, strict=True)]
    writer = {name: f for f in files for name in f.todo}
    for t, layer, x in iter_tensors(source, progress):
        name = t.name("hf", layer)
        writer[name].write(name, to_torch(t, x))
    for f in files:
        f.close()
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for specs in shards for s, d in specs.values())
        weight_map = {name: file for file, specs in zip(names, shards, strict=True) for name in specs}
        write_json(dst / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = to_hf_config(cfg, source.dtype(EMBEDDING.key).name)
    write_json(dst / "config.json", config)
    if cfg.head != "lm":  # a reward model generates nothing
        return
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    # Meta's sampling defaults (see the reference sheet).
    write_json(dst / "generation_config.json", {**generation, "do_sample": True, "temperature": 0.6, "top_p": 0.9})
