"""The canonical parameter layout, and how each tensor is named and laid out in Hugging Face and
Meta files.

Both HF and Meta store a linear layer as a torch weight [out_features, in_features]; our kernels
are its transpose with the head axes split out (wq [dim, heads, head_dim], wo [heads, head_dim,
dim]). q/k rows follow HF's rotate-half RoPE order; Meta's interleaved order differs by a per-head
permutation of the rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from llama_jax.config import LlamaConfig


@dataclass(frozen=True)
class Tensor:
    key: str  # path in the canonical params pytree
    hf: str  # Hugging Face name; "{}" is the layer index
    meta: str  # Meta name
    shape: Callable[[LlamaConfig], tuple[int, ...]]  # canonical shape (of one layer)
    n_in: int = 1  # leading canonical axes that make up the torch in_features; 0: stored as is
    rope: bool = False  # q/k: rows permuted between Meta and HF
    kv: bool = False  # k/v: heads are repeated across Meta shards when model-parallel > n_kv_heads
    meta_dim: int | None = 0  # Meta model-parallel concat axis (torch layout); None: replicated

    @property
    def per_layer(self) -> bool:
        return self.key.startswith("layers/")

    def heads(self, cfg: LlamaConfig) -> int:
        return cfg.n_kv_heads if self.kv else cfg.n_heads

    def name(self, fmt: str, layer: int | None) -> str:
        return getattr(self, fmt).format(layer)


EMBEDDING = Tensor("tok_embeddings/embedding", "model.embed_tokens.weight", "tok_embeddings.weight",
                   lambda c: (c.vocab_size, c.dim), n_in=0)  # fmt: skip
OUTPUT = Tensor("output/kernel", "lm_head.weight", "output.weight", lambda c: (c.dim, c.vocab_size))
# A reward or value model's scalar head (HF LlamaForSequenceClassification; Meta has none).
SCORE = Tensor("score/kernel", "score.weight", "score.weight", lambda c: (c.dim, 1), meta_dim=None)
_ATTN, _FFN, _L = "model.layers.{}.self_attn", "model.layers.{}.mlp", "layers.{}"
TENSORS = (
    EMBEDDING,
    Tensor("layers/attention_norm/scale", "model.layers.{}.input_layernorm.weight", f"{_L}.attention_norm.weight",
           lambda c: (c.dim,), n_in=0, meta_dim=None),
    Tensor("layers/attention/wq/kernel", f"{_ATTN}.q_proj.weight", f"{_L}.attention.wq.weight",
           lambda c: (c.dim, c.n_heads, c.head_dim), rope=True),
    Tensor("layers/attention/wk/kernel", f"{_ATTN}.k_proj.weight", f"{_L}.attention.wk.weight",
           lambda c: (c.dim, c.n_kv_heads, c.head_dim), rope=True, kv=True),
    Tensor("layers/attention/wv/kernel", f"{_ATTN}.v_proj.weight", f"{_L}.attention.wv.weight",
           lambda c: (c.dim, c.n_kv_heads, c.head_dim), kv=True),
    Tensor("layers/attention/wo/kernel", f"{_ATTN}.o_proj.weight", f"{_L}.attention.wo.weight",
           lambda c: (c.n_heads, c.head_dim, c.dim), n_in=2, meta_dim=1),
    Tensor("layers/ffn_norm/scale", "model.layers.{}.post_attention_layernorm.weight", f"{_L}.ffn_norm.weight",
           lambda c: (c.dim,), n_in=0, meta_dim=None),
    Tensor("layers/feed_forward/w1/kernel", f"{_FFN}.gate_proj.weight", f"{_L}.feed_forward.w1.weight",
           lambda c: (c.dim, c.ffn_dim)),
    Tensor("layers/feed_forward/w3/kernel", f"{_FFN}.up_proj.weight", f"{_L}.feed_forward.w3.weight",
           lambda c: (c.dim, c.ffn_dim)),
    Tensor("layers/feed_forward/w2/kernel", f"{_FFN}.down_proj.weight", f"{_L}.feed_forward.w2.weight",
           lambda c: (c.ffn_dim, c.dim), meta_dim=1),
    Tensor("norm/scale", "model.norm.weight", "norm.weight", lambda c: (c.dim,), n_in=0, meta_dim=None),
    OUTPUT,
    SCORE,
)  # fmt: skip
BY_KEY = {t.key: t for t in TENSORS}


def tensors(cfg: LlamaConfig) -> tuple[Tensor, ...]:
    """The canonical leaves of a model: the output kernel unless the embedding is tied or the
    head is a score; the score kernel for a score head."""
    head = () if cfg.head == "lm" and cfg.tie_embeddings else (SCORE,) if cfg.head == "score" else (OUTPUT,)
    return tuple(t for t in TENSORS if t not in (OUTPUT, SCORE) or t in head)


def items(cfg: LlamaConfig, layer_major: bool = False) -> Iterator[tuple[Tensor, int | None]]:
    """Every (tensor, layer) of a model; layer is None for tensors outside the layer stack.

    Leaf-major order (the default) finishes a leaf before starting the next, so an Orbax leaf
    stored in chunks of several layers is decoded once; layer-major order groups a layer's
    tensors, as HF shards do."""
    outer = [t for t in tensors(cfg) if not t.per_layer]
    inner = [t for t in tensors(cfg) if t.per_layer]
    if layer_major:
        per_layer = [(t, i) for i in range(cfg.n_layers) for t in inner]
    else:
        per_layer = [(t, i) for t in inner for i in range(cfg.n_layers)]
    yield (outer[0], None)
    yield from per_layer
    yield from ((t, None) for t in outer[1:])


def stacked_shape(t: Tensor, cfg: LlamaConfig) -> tuple[int, ...]:
    return (cfg.n_layers, *t.shape(cfg)) if t.per_layer else t.shape(cfg)


def torch_shape(t: Tensor, cfg: LlamaConfig) -> tuple[int, ...]:
    """Shape of the HF weight (also Meta's, once model-parallel shards are merged)."""
    shape = t.shape(cfg)
    return shape if not t.n_in else (math.prod(shape[t.n_in :]), math.prod(shape[: t.n_in]))


def to_torch(t: Tensor, x: np.ndarray) -> np.ndarray:
    """Canonical (one layer) -> HF weight [out, in]. A view: no copy."""
    return x if not t.n_in else x.reshape(math.prod(x.shape[: t.n_in]), -1).T


def from_torch(t: Tensor, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """HF weight [out, in] -> canonical (one layer). A view: no copy."""
    return w if not t.n_in else w.T.reshape(t.shape(cfg))


def meta_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k from Meta's interleaved pairs (2i, 2i+1) to HF's halves (i, i + head_dim/2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of meta_to_hf."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def meta_split_dim(t: Tensor, cfg: LlamaConfig) -> int | None:
    """The axis Meta's model-parallel layers split a tensor along (torch layout), None: replicated.

    Llama 1/2 use ParallelEmbedding (split along dim), Llama 3 VocabParallelEmbedding (along vocab)."""
    if t is EMBEDDING:
        return 0 if cfg.family == "llama3" else 1
    return t.meta_dim
