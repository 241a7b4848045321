"""Our model directory: config.json (LlamaConfig.to_dict()), params/ (an Orbax PyTree checkpoint of
the canonical params, restorable with orbax's StandardCheckpointer) and tokenizer files. Also read:
a train.py run directory (its latest step's `params`), and a LoRA run (its base checkpoint with the
latest `adapters` merged in).

Streaming both ways: the writer has orbax lay out the checkpoint with zero-cost placeholder arrays,
then writes each tensor through TensorStore one layer at a time (chunks of at most 32 MiB, never
spanning two layers); the reader reads through TensorStore one layer at a time too."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from llama_jax import lora, quant
from llama_jax.config import LlamaConfig
from llama_jax.convert.layout import stacked_shape, tensors
from llama_jax.convert.source import (
    ConvertError,
    Reader,
    Source,
    check_shape,
    iter_tensors,
    load_config,
    set_leaf,
    write_json,
)

CHUNK_BYTES = 32 * 2**20


def _params_dir(path: Path, item: str = "params") -> Path:
    if (path / item).is_dir():
        return path / item
    latest = ocp.step.latest_step_metadata(path / "checkpoints", ocp.step.standard_name_format())
    if latest is None or not (Path(latest.path) / item).is_dir():
        raise ConvertError(f"{path} has neither {item}/ nor a finished step with {item} under checkpoints/")
    return Path(latest.path) / item


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        k: v for name, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{name}" if prefix else name).items()
    }


class _Arrays:
    """The TensorStore arrays of an orbax PyTree checkpoint directory, one open at a time."""

    def __init__(self, directory: Path, write: bool = False):
        self.directory, self.write = epath.Path(directory.absolute()), write  # orbax misreads relative paths
        metadata = ocp.PyTreeCheckpointer().metadata(self.directory).item_metadata
        if metadata is None:
            raise ConvertError(f"{directory} is not a readable Orbax checkpoint")
        self.leaves, self.use_zarr3 = _flatten(dict(metadata.tree)), metadata.use_zarr3
        self.use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
        self.context = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
        self.key, self.store = None, None

    def __getitem__(self, key: str) -> ts.TensorStore:
        if key != self.key:
            self.store = None  # let the previous array and its cache go first
            info = ocp.type_handlers.ParamInfo(
                name=self.leaves[key].name,
                parent_dir=self.directory,
                use_zarr3=self.use_zarr3,
                is_ocdbt_checkpoint=self.use_ocdbt,
                ts_context=self.context,
            )
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
            store = ts.open(spec, read=True, write=self.write, context=self.context).result()
            chunk = store.chunk_layout.read_chunk.shape
            if key.startswith("layers/") and chunk[0] > 1 and not self.write:  # a per-layer leaf
                cache_bytes = 2 * math.prod(chunk) * store.dtype.numpy_dtype.itemsize
                cache = ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": cache_bytes}}), self.context)
                store = ts.open(spec, read=True, context=cache).result()
            self.key, self.store = key, store
        return self.store


def leaf_shapes(cfg: LlamaConfig) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """Every leaf of the checkpoint of `cfg`: its stacked shape and, quantized, its dtype."""
    return {
        k: v
        for t in tensors(cfg)
        for k, v in quant.stored_leaves(t.key, stacked_shape(t, cfg), cfg.quantization).items()
    }


class OrbaxReader(Reader):
    format = "orbax"

    def __init__(self, path: Path, cast: np.dtype | None = None):
        super().__init__(path, load_config(path / "config.json", LlamaConfig.from_dict), cast)
        self.params = _params_dir(path).absolute()  # the PyTree checkpoint, for orbax's own restore
        self.arrays = _Arrays(self.params)
        expected = leaf_shapes(self.config)
        for key, (shape, dtype) in expected.items():
            if key not in self.arrays.leaves:
                raise ConvertError(f"parameter {key} is missing from {self.params}")
            check_shape(f"parameter {key}", self.arrays.leaves[key].shape, shape)
            if dtype is not None and np.dtype(self.arrays.leaves[key].dtype) != dtype:
                raise ConvertError(f"parameter {key} is {self.arrays.leaves[key].dtype}, not {dtype} ({self.params})")
        unexpected = set(self.arrays.leaves) - set(expected)
        if unexpected:
            raise ConvertError(f"unexpected parameter {sorted(unexpected)[0]} in {self.params}")

    def _read(self, key: str, layer: int | None) -> np.ndarray:
        store = self.arrays[key]
        return np.asarray((store if layer is None else store[layer]).read().result())

    def _dtype(self, key: str) -> np.dtype:
        return np.dtype(self.arrays.leaves[key].dtype)


def lora_run_base(path: Path) -> tuple[lora.LoraConfig, Path]:
    """A LoRA run's adapter settings and the path of its base checkpoint (lora.json)."""
    try:
        lcfg, base = lora.load_run_config(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"unreadable {path / lora.CONFIG_FILE}: {e}") from None
    if not base.is_dir():
        raise ConvertError(f"the base checkpoint of LoRA run {path}, {base} (see lora.json), is missing")
    return lcfg, base


class LoraRunReader(Reader):
    """A LoRA run directory: its base checkpoint (any format, opened by the caller), each targeted
    kernel merged with the latest step's adapters (kernel + alpha/rank * A @ B in float32, then
    the base's dtype). The adapters are small and read whole."""

    format = "orbax"

    def __init__(self, path: Path, cast: np.dtype | None, lcfg: lora.LoraConfig, base: Source):
        super().__init__(path, load_config(path / "config.json", LlamaConfig.from_dict), cast)
        self.lora, self.base = lcfg, base
        trunk = base.config.replace(head=self.config.head, pad_id=self.config.pad_id)  # a new head is trained
        if trunk != self.config:
            raise ConvertError(f"the base checkpoint {base.path} is not the model of LoRA run {path}")
        arrays = _Arrays(_params_dir(path, "adapters"))
        self.adapters = {}
        for key, shape in lora.adapter_shapes(self.config, self.lora).items():
            if key not in arrays.leaves:
                raise ConvertError(f"adapter {key} is missing from {arrays.directory}")
            check_shape(f"adapter {key}", arrays.leaves[key].shape, shape)
            self.adapters[key] = np.asarray(arrays[key].read().result())
        self.merged = {f"{lora.TARGETS[t]}/kernel": lora.TARGETS[t] for t in self.lora.targets}

    def _read(self, key: str, layer: int | None) -> np.ndarray:
        if key == lora.HEAD:  # trained whole, with the adapters; in the base's dtype
            return self.adapters[key].astype(self._dtype(key))
        x = self.base.read(key, layer)
        if key not in self.merged:
            return x
        a, b = (self.adapters[f"{self.merged[key]}/{n}"] for n in ("lora_a", "lora_b"))
        if layer is None:  # the whole stack
            return np.stack([lora.merge_kernel(x[i], a[i], b[i], self.lora.scale) for i in range(len(x))])
        return lora.merge_kernel(x, a[layer], b[layer], self.lora.scale)

    def _dtype(self, key: str) -> np.dtype:
        return self.base.dtype("norm/scale" if key == lora.HEAD else key)  # the base may have no head


def write_orbax(source: Source, dst: Path, progress: bool = False, quantize: str = "none") -> None:
    """`quantize` "int8"/"int4": the linear kernels are quantized one layer at a time (quant.py)."""
    cfg = source.config.replace(quantization=quantize)
    write_json(dst / "config.json", cfg.to_dict())
    placeholders, save_args = {}, {}
    for t in tensors(cfg):
        for key, (shape, dtype) in quant.stored_leaves(t.key, stacked_shape(t, cfg), quantize).items():
            set_leaf(placeholders, key, np.broadcast_to(np.zeros((), dtype or source.dtype(t.key)), shape))
            set_leaf(save_args, key, ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if t.per_layer else ()))
    # deepcopy_host_arrays=False: orbax would otherwise materialise the placeholders.
    handler = ocp.PyTreeCheckpointHandler(
        use_zarr3=True,
        type_handler_registry=ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
        ),
    )
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(
            epath.Path(dst.absolute() / "params"), args=ocp.args.PyTreeSave(placeholders, save_args=save_args)
        )
    arrays = _Arrays(dst / "params", write=True)
    for t, layer, x in iter_tensors(source, progress):
        leaves = quant.stored_leaves(t.key, x.shape, quantize)
        values = [x] if len(leaves) == 1 else quant.quantize_host(t.key, x, quantize)
        for key, value in zip(leaves, values, strict=True):
            store = arrays[key]
            (store if layer is None else store[layer]).write(value).result()
