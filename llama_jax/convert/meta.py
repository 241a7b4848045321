"""Meta's checkpoints: params.json + consolidated.NN.pth, one file per model-parallel rank, split
the way Meta's fairscale layers are (see layout.meta_split_dim)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from llama_jax.config import LlamaConfig, from_meta_params, to_meta_params
from llama_jax.convert.layout import (
    BY_KEY,
    EMBEDDING,
    OUTPUT,
    Tensor,
    from_torch,
    hf_to_meta,
    items,
    meta_split_dim,
    meta_to_hf,
    to_torch,
    torch_shape,
)
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
from llama_jax.convert.torch_file import TorchReader, TorchWriter


def to_meta(t: Tensor, x: np.ndarray, cfg: LlamaConfig, kv_repeats: int) -> np.ndarray:
    """Canonical (one layer) -> Meta's merged weight [out, in], kv heads repeated `kv_repeats` times."""
    w = to_torch(t, x)
    if t.rope:
        w = hf_to_meta(w, t.heads(cfg))
    if t.kv and kv_repeats > 1:
        w = np.repeat(w.reshape(cfg.n_kv_heads, cfg.head_dim, -1), kv_repeats, axis=0).reshape(-1, w.shape[1])
    return w


def from_meta(t: Tensor, w: np.ndarray, cfg: LlamaConfig, kv_repeats: int) -> np.ndarray:
    """Inverse of to_meta: keep the first of each run of repeated kv heads."""
    if t.kv and kv_repeats > 1:
        w = w.reshape(cfg.n_kv_heads, kv_repeats, cfg.head_dim, -1)[:, 0].reshape(-1, w.shape[1])
    if t.rope:
        w = meta_to_hf(w, t.heads(cfg))
    return from_torch(t, w, cfg)


class MetaReader(Reader):
    format = "meta"

    def __init__(self, path: Path, cast: np.dtype | None = None):
        files = sorted(path.glob("consolidated.*.pth"))
        mp = len(files)
        if [f.name for f in files] != [f"consolidated.{i:02d}.pth" for i in range(mp)] or not mp:
            found = ", ".join(f.name for f in files) or "none"
            raise ConvertError(f"{path}: expected consolidated.00.pth ... consolidated.NN.pth, found {found}")
        self.shards = [TorchReader(f) for f in files]
        if EMBEDDING.meta not in self.shards[0].tensors:
            raise ConvertError(f"tensor {EMBEDDING.meta} is missing from {files[0]}")
        # Llama 1/2 split the embedding along dim, Llama 3 along vocab; the shard shape tells which.
        rows, cols = self.shards[0].shape(EMBEDDING.meta)
        params = read_json(path / "params.json")
        self.embedding_axis = 1 if mp > 1 and isinstance(params, dict) and cols * mp == params.get("dim") else 0
        vocab = rows if self.embedding_axis else rows * mp
        declared = load_config(path / "params.json", functools.partial(from_meta_params, vocab_size=vocab))
        stored, self.kv_repeats = self._as_stored(declared)
        expected = {t.name("meta", layer): t for t, layer in items(stored)}
        for shard in self.shards:
            for name, t in expected.items():
                if name not in shard.tensors:
                    raise ConvertError(f"tensor {name} is missing from {shard.path}")
                check_shape(f"{shard.path.name}: tensor {name}", shard.shape(name), self._shard_shape(t, stored))
            unexpected = set(shard.tensors) - set(expected) - {"rope.freqs"}
            if unexpected:
                raise ConvertError(f"unexpected tensor {sorted(unexpected)[0]} in {shard.path}")
        self.kv_repeats = self.kv_repeats or self._kv_repeats(stored)
        super().__init__(path, stored.replace(n_kv_heads=stored.n_kv_heads // self.kv_repeats), cast)
        shared = path.parent / "tokenizer.model"  # Llama 1/2 downloads: one tokenizer beside the model folders
        if not self.tokenizer_files and shared.is_file():
            self.tokenizer_files = [shared]

    def _axis(self, t: Tensor) -> int | None:
        return self.embedding_axis if t is EMBEDDING else t.meta_dim

    def _shard_shape(self, t: Tensor, cfg: LlamaConfig) -> tuple[int, ...]:
        shape, axis = list(torch_shape(t, cfg)), self._axis(t)
        if axis is not None:
            shape[axis] //= len(self.shards)
        return tuple(shape)

    def _as_stored(self, declared: LlamaConfig) -> tuple[LlamaConfig, int]:
        """The config with n_kv_heads as the shards hold them, and the repeat count (0: unknown yet).

        When model-parallel > n_kv_heads, each kv head is repeated over consecutive shards so that
        every shard holds one. Either params.json states the repeated count (Meta's 405B MP=16
        release; the repeats are then found from the data, see _kv_repeats), or it keeps the true
        n_kv_heads (llama-models' reshard_mp): then the shards' wk rows give the copies."""
        wk, first = BY_KEY["layers/attention/wk/kernel"].name("meta", 0), self.shards[0]
        rows = first.shape(wk)[0] if wk in first.tensors and first.shape(wk) else 0
        held = rows * len(self.shards) // declared.head_dim
        if held > declared.n_kv_heads and held % declared.n_kv_heads == 0 and rows % declared.head_dim == 0:
            return declared.replace(n_kv_heads=held), held // declared.n_kv_heads
        return declared, 0

    def _kv_repeats(self, stored: LlamaConfig) -> int:
        """With params.json stating the repeated count: the longest run of identical copies in
        layer 0's k and v (each later layer's copies are checked when read)."""
        mp = len(self.shards)
        if mp == 1 or stored.n_kv_heads != mp:
            return 1
        names = [BY_KEY[f"layers/attention/{w}/kernel"].name("meta", 0) for w in ("wk", "wv")]
        heads = np.stack([np.concatenate([s.read(n).reshape(-1).view(np.uint8) for n in names]) for s in self.shards])
        for repeats in range(mp, 1, -1):
            if mp % repeats or stored.n_heads % (mp // repeats):
                continue
            runs = heads.reshape(mp // repeats, repeats, -1)
            if (runs == runs[:, :1]).all():
                return repeats
        return 1

    def _read(self, key: str, layer: int | None) -> np.ndarray:
        t = BY_KEY[key]
        name, axis = t.name("meta", layer), self._axis(t)
        if axis is None or len(self.shards) == 1:
            w = self.shards[0].read(name)
        else:
            w = np.concatenate([s.read(name) for s in self.shards], axis=axis)
        if t.kv and self.kv_repeats > 1:
            copies = w.reshape(self.config.n_kv_heads, self.kv_repeats, -1).view(np.uint8)
            if not (copies == copies[:, :1]).all():
                raise ConvertError(
                    f"{self.path}: tensor {name} should hold each of the {self.config.n_kv_heads} kv heads "
                    f"{self.kv_repeats} times over consecutive shards, but the copies differ"
                )
        return from_meta(t, w, self.config, self.kv_repeats)

    def _dtype(self, key: str) -> np.dtype:
        return self.shards[0].dtype(BY_KEY[key].name("meta", 0))


def check_model_parallel(cfg: LlamaConfig, mp: int) -> None:
    if mp < 1:
        raise ConvertError(f"--model-parallel must be at least 1, got {mp}")
    sizes = {"n_heads": cfg.n_heads, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size, "dim": cfg.dim}
    for what, size in sizes.items():
        if size % mp:
            raise ConvertError(f"--model-parallel {mp} does not divide {what} {size}")
    if max(mp, cfg.n_kv_heads) % min(mp, cfg.n_kv_heads):
        raise ConvertError(f"--model-parallel {mp} and n_kv_heads {cfg.n_kv_heads}: neither divides the other")


def check_rope_scaling(cfg: LlamaConfig) -> None:
    """params.json has no room for the scaling's other parameters: Meta's code fixes them."""
    rs = cfg.rope_scaling
    if rs is not None and (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) != (
        1,
        4,
        8192,
    ):
        raise ConvertError(
            f"Meta's params.json cannot express this RoPE scaling ({rs}); Meta's code assumes "
            "low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192"
        )


def write_meta(source: Source, dst: Path, model_parallel: int = 1, progress: bool = False) -> None:
    cfg, mp = source.config, model_parallel
    check_model_parallel(cfg, mp)
    check_rope_scaling(cfg)
    kv_repeats = max(1, mp // cfg.n_kv_heads)
    # Meta's files always carry output.weight, also when the model ties it to the embedding (Llama 3.2).
    stored = cfg.replace(n_kv_heads=cfg.n_kv_heads * kv_repeats, tie_embeddings=False)
    specs = {}
    for t, layer in items(stored):
        shape, axis = list(torch_shape(t, stored)), meta_split_dim(t, cfg)
        if axis is not None:
            shape[axis] //= mp
        specs[t.name("meta", layer)] = (
            tuple(shape),
            source.dtype(EMBEDDING.key if t is OUTPUT and cfg.tie_embeddings else t.key),
        )
    files = [TorchWriter(dst / f"consolidated.{rank:02d}.pth", specs) for rank in range(mp)]
    for t, layer, x in iter_tensors(source, progress):
        tied = [(OUTPUT, x.T)] if t is EMBEDDING and cfg.tie_embeddings else []
        for u, y in [(t, x), *tied]:
            w, axis = to_meta(u, y, cfg, kv_repeats), meta_split_dim(u, cfg)
            pieces = [w] * mp if axis is None else np.split(w, mp, axis=axis)
            for f, piece in zip(files, pieces, strict=True):
                f.write(u.name("meta", layer), piece)
    for f in files:
        f.close()
    write_json(dst / "params.json", to_meta_params(cfg, n_kv_heads=stored.n_kv_heads))
