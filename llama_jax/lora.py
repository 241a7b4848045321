"""LoRA (Hu et al., 2021) on the canonical parameter pytree, with the model code untouched.

A targeted projection's kernel [L, *in, *out] gets an adapter pair with the same layer axis:
`lora_a` [L, *in, rank] (uniform in +-1/sqrt(fan_in), as PEFT) and `lora_b` [L, rank, *out]
(zeros, so a fresh adapter changes nothing). The adapted kernel is

    kernel + (alpha / rank) * lora_a @ lora_b

The adapters pytree mirrors the params: `{"layers": {"attention": {"wq": {"lora_a", "lora_b"}}}}`.

Training never forms that sum. `combine` puts each pair next to its kernel in the params pytree
(with dropout, also a random key per layer, `lora_key`); `nn.scan` slices them per layer like
the kernel, and inside `intercept(...)` every `Linear` that finds them adds
`scale * dropout(x) @ lora_a @ lora_b` to its output. So the frozen kernels never get a weight
gradient, and the base weights need no second, merged copy. Export merges (`merge_kernel`): the
converter reads a LoRA run (lora.json + checkpoints/<step>/adapters) as merged weights. A reward or
value model's scalar head (`score/kernel`, new to the base) is trained whole and stored with the
adapters.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax.config import LlamaConfig
from llama_jax.convert.hub import resolve_checkpoint
from llama_jax.linear import Linear
from llama_jax.model import Params, param_shapes

# Target name -> the kernel's path in the params pytree.
TARGETS = {
    "wq": "layers/attention/wq",
    "wk": "layers/attention/wk",
    "wv": "layers/attention/wv",
    "wo": "layers/attention/wo",
    "w1": "layers/feed_forward/w1",
    "w2": "layers/feed_forward/w2",
    "w3": "layers/feed_forward/w3",
}
IN_AXES = {"wo": 2}  # kernel axes (after the layer axis) that the input contracts with; others: 1
CONFIG_FILE = "lora.json"
HEAD = "score/kernel"  # a reward or value model's scalar head: new, so trained whole beside the adapters


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA targets {unknown or '(none)'}; choose from {', '.join(TARGETS)}")
        if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got {self}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@functools.lru_cache(maxsize=16)
def _split(cfg: LlamaConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A target's kernel shape (one layer) split into (in axes, out axes)."""
    shape = _get(param_shapes(cfg), TARGETS[target])["kernel"].shape[1:]
    n_in = IN_AXES.get(target, 1)
    return shape[:n_in], shape[n_in:]


def adapter_shapes(cfg: LlamaConfig, lcfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Flat path ("layers/attention/wq/lora_a") -> shape of every adapter (and of a score head)."""
    shapes = {HEAD: (cfg.dim, 1)} if cfg.head == "score" else {}
    for target in lcfg.targets:
        ins, outs = _split(cfg, target)
        shapes[f"{TARGETS[target]}/lora_a"] = (cfg.n_layers, *ins, lcfg.rank)
        shapes[f"{TARGETS[target]}/lora_b"] = (cfg.n_layers, lcfg.rank, *outs)
    return shapes


def _nest(flat: dict[str, Any]) -> Params:
    tree: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def init_adapters(cfg: LlamaConfig, lcfg: LoraConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Fresh adapters: A uniform in +-1/sqrt(fan_in), B zero (a score head: normal, std 0.02)."""
    flat = {}
    for i, (path, shape) in enumerate(adapter_shapes(cfg, lcfg).items()):
        if path == HEAD:
            flat[path] = 0.02 * jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)
        elif path.endswith("lora_b"):
            flat[path] = jnp.zeros(shape, dtype)
        else:
            bound = 1 / math.sqrt(math.prod(shape[1:-1]))
            flat[path] = jax.random.uniform(jax.random.fold_in(rng, i), shape, dtype, -bound, bound)
    return _nest(flat)


def _merge_trees(base: Params, extra: Params) -> Params:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge_trees(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def combine(base: Params, adapters: Params, dropout_rng: jax.Array | None = None) -> Params:
    """The params pytree for `model.apply` under `intercept`: the base with each adapter pair
    next to its kernel, and with `dropout_rng` an independent dropout key per layer and target."""
    tree = _merge_trees(base, adapters)
    if dropout_rng is not None:
        layers = jax.tree.leaves(adapters["layers"])[0].shape[0]
        for i, path in enumerate(TARGETS.values()):
            node = _get(tree, path)
            if node is not None and "lora_a" in node:
                node["lora_key"] = jax.random.key_data(jax.random.split(jax.random.fold_in(dropout_rng, i), layers))
    return tree


def _get(tree: Params, path: str) -> Any:
    for part in path.split("/"):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


@contextlib.contextmanager
def intercept(lcfg: LoraConfig | None) -> Iterator[None]:
    """While active, `Linear` layers whose params hold `lora_a`/`lora_b` add their adapter's
    output (a no-op context when lcfg is None)."""
    if lcfg is None:
        yield
        return

    def add_adapter(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, Linear) or not m.has_variable("params", "lora_a"):
            return out
        x = args[0].astype(m.dtype)
        if lcfg.dropout and m.has_variable("params", "lora_key"):
            key = jax.random.wrap_key_data(m.get_variable("params", "lora_key"))
            keep = jax.random.bernoulli(key, 1 - lcfg.dropout, x.shape)
            x = jnp.where(keep, x / (1 - lcfg.dropout), 0).astype(m.dtype)
        a, b = (m.get_variable("params", n).astype(m.dtype) for n in ("lora_a", "lora_b"))
        low_rank = jnp.tensordot(jnp.tensordot(x, a, axes=m.in_axes), b, axes=1)
        return out + (lcfg.scale * low_rank).astype(out.dtype)

    with nn.intercept_methods(add_adapter):
        yield


def merge_kernel(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """One layer's kernel [*in, *out] + scale * lora_a [*in, r] @ lora_b [r, *out], computed in
    float32 and returned in the kernel's dtype."""
    delta = np.tensordot(np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32), axes=1)
    return (np.asarray(kernel, np.float32) + scale * delta).astype(kernel.dtype)


def adapter_shardings(cfg: LlamaConfig, param_shardings: Params, lcfg: LoraConfig) -> Params:
    """Shardings of the adapters from the model's parameter shardings: A is split like its
    kernel's layer and input axes, B like its layer and output axes; the rank axis is whole."""
    flat = {HEAD: _get(param_shardings, HEAD)} if cfg.head == "score" else {}
    for target in lcfg.targets:
        s = _get(param_shardings, TARGETS[target])["kernel"]
        ins, outs = _split(cfg, target)
        spec = (*s.spec, *(None,) * (1 + len(ins) + len(outs) - len(s.spec)))  # trailing axes may be omitted
        layer, spec_in, spec_out = spec[0], spec[1 : 1 + len(ins)], spec[1 + len(ins) :]
        flat[f"{TARGETS[target]}/lora_a"] = jax.sharding.NamedSharding(s.mesh, P(layer, *spec_in, None))
        flat[f"{TARGETS[target]}/lora_b"] = jax.sharding.NamedSharding(s.mesh, P(layer, None, *spec_out))
    return _nest(flat)


# -- lora.json: what a LoRA run's adapters belong to --------------------------------------------


def save_run_config(run_dir: Path, lcfg: LoraConfig, base: str) -> None:
    """Write lora.json: the adapter settings and the base checkpoint (an absolute path; a model id's
    snapshot directory)."""
    info = {"rank": lcfg.rank, "alpha": lcfg.alpha, "dropout": lcfg.dropout, "targets": list(lcfg.targets)}
    base = str(resolve_checkpoint(base).absolute())
    (run_dir / CONFIG_FILE).write_text(json.dumps({**info, "base": base}, indent=2) + "\n")


def load_run_config(run_dir: Path) -> tuple[LoraConfig, Path]:
    """(adapter settings, base checkpoint path) from a LoRA run's lora.json."""
    info = json.loads((run_dir / CONFIG_FILE).read_text())
    lcfg = LoraConfig(int(info["rank"]), float(info["alpha"]), float(info["dropout"]), tuple(info["targets"]))
    return lcfg, Path(info["base"])
