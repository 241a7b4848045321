"""Loading any checkpoint for inference: the model, its parameters placed on the devices as a
sharding plan says, and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from llama_jax import quant, sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import UserError
from llama_jax.model import Llama, Params, build_model, param_shapes, repeat_kv_heads
from llama_jax.per_layer import inference_layer
from llama_jax.tokenizer import Tokenizer


@dataclass
class Loaded:
    cfg: LlamaConfig
    model: Llama
    params: Params
    tokenizer: Tokenizer | None  # None when the checkpoint has none and none was needed
    plan: sharding.Plan
    mesh: jax.sharding.Mesh

    @property
    def batch_multiple(self) -> int:
        """How many ways the batch is split: batches are padded to a multiple."""
        return sharding.batch_parallelism(self.plan, self.mesh)


def load(
    checkpoint: str,
    dtype: str = "auto",
    tokenizer: str | None = None,
    need_tokenizer: bool = False,
    plan: str = "single",
    head: str | None = None,
    quantize: str | None = None,
) -> Loaded:
    """Load any checkpoint `llama-jax-convert` reads (Orbax model or run directory, HF, Meta, a
    LoRA run), placed on the devices as the sharding plan says. dtype 'auto': float32 on CPUs,
    bfloat16 on accelerators. When the plan splits kv heads over more devices than there are kv
    heads, they are replicated (`cfg.n_kv_heads` is then the replicated count). `head`: what the
    caller needs, "lm" (a language model) or "score" (a reward model); None: either. `quantize`:
    "int8" or "int4" quantizes the linear kernels once loaded (quant.py), one at a time on the
    devices; None: as the checkpoint is stored (a quantized checkpoint loads as it is)."""
    import orbax.checkpoint as ocp

    from llama_jax.convert import open_checkpoint, read_checkpoint
    from llama_jax.convert.orbax_ckpt import OrbaxReader
    from llama_jax.tokenizer import TokenizerError, load_tokenizer

    sharding_plan = sharding.load_plan(plan)
    mesh = sharding.build_mesh(sharding_plan)
    source = open_checkpoint(checkpoint)  # validates config, names and shapes
    cfg, tokenizer_files = source.config, source.tokenizer_files
    if head == "lm" and cfg.head != "lm":
        raise UserError(f"{checkpoint} is a reward model: it scores responses (infer.py reward), it does not generate")
    if head == "score" and cfg.head != "score":
        raise UserError(f"{checkpoint} is not a reward model (train one with train.py --stage reward)")
    if quantize not in (None, cfg.quantization) and cfg.quantization != "none":
        raise UserError(f"{checkpoint} is quantized ({cfg.quantization}); it cannot be loaded as {quantize}")
    quantized = cfg.replace(quantization=quantize) if quantize not in (None, cfg.quantization) else None  # checked now
    replicas = sharding.kv_head_replicas(sharding_plan, mesh, cfg)
    split = replicas == 1  # kv heads kept whole when they are to be repeated
    compute = build_model(cfg, dtype).dtype
    stacked = sharding.param_shardings(sharding_plan, mesh, cfg, split_kv_heads=split)
    if isinstance(source, OrbaxReader):  # restored straight into the sharding: each host reads its shards
        target = jax.tree_util.tree_map_with_path(
            lambda p, s, sh: jax.ShapeDtypeStruct(s.shape, quant.load_dtype(p, s.dtype, compute), sharding=sh),
            param_shapes(cfg),
            stacked,
        )
        params = ocp.StandardCheckpointer().restore(source.params, target)
    else:  # Meta, HF or a LoRA run (adapters merged): read on the host, then placed
        host = read_checkpoint(source).params
        cast = lambda p, a: np.asarray(a).astype(quant.load_dtype(p, np.asarray(a).dtype, compute))  # noqa: E731
        params = sharding.put(jax.tree_util.tree_map_with_path(cast, host), stacked)
    if quantized is not None:  # each float kernel is freed once quantized
        placement = sharding.param_shardings(sharding_plan, mesh, quantized, split_kv_heads=split)
        params = quant.quantize_params(params, cfg, quantize, placement, free=True)
        cfg = quantized
    if replicas > 1:  # more devices split kv heads than there are: each device gets a copy of one
        cfg = cfg.replace(n_kv_heads=cfg.n_kv_heads * replicas)
        kv = {"layers": {"attention": {n: params["layers"]["attention"][n] for n in ("wk", "wv")}}}
        where = sharding.param_shardings(sharding_plan, mesh, cfg)["layers"]["attention"]
        where = {"layers": {"attention": {n: where[n] for n in ("wk", "wv")}}}
        kv = jax.jit(lambda t: repeat_kv_heads(t, replicas), out_shardings=where)(kv)
        params["layers"]["attention"].update(kv["layers"]["attention"])
    model = build_model(cfg, dtype, per_layer=True)
    params = unstack_on_device(params, sharding.param_shardings(sharding_plan, mesh, cfg, per_layer=True))
    tok = None
    where = [tokenizer] if tokenizer else [str(p) for p in tokenizer_files] or [checkpoint]
    if tokenizer or tokenizer_files or need_tokenizer:
        try:
            tok = load_tokenizer(where[0])
        except TokenizerError as e:
            if need_tokenizer:
                raise UserError(f"no tokenizer found (looked in {', '.join(where)}): {e}") from None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer vocabulary ({tok.vocab_size}) exceeds the model's embedding ({cfg.vocab_size})")
    return Loaded(cfg, model, params, tok, sharding_plan, mesh)


def unstack_on_device(params: Params, placement: Params) -> Params:
    """Canonical (stacked) parameters on the devices -> the per-layer layout, placed as `placement`
    says, one stacked module at a time (attention, each feed-forward matrix, ...), each freed once
    its layers are placed: the peak is the parameters plus one module of all layers."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers: list[Params] = [{} for _ in range(n)]
    branches = [{k: v} for k, v in stacked.items() if k != "feed_forward"]
    branches += [{"feed_forward": {k: v}} for k, v in stacked.get("feed_forward", {}).items()]
    for branch in branches:
        for i, layer in enumerate(layers):
            piece = inference_layer(branch, i)
            _merge(layer, jax.device_put(piece, _like(placement[f"layers_{i}"], piece)))
        for leaf in jax.tree.leaves(branch):
            leaf.delete()
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": layer for i, layer in enumerate(layers)}}


def _like(tree: dict, branch: dict) -> dict:
    """The part of `tree` with the keys of `branch`."""
    return {k: _like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in branch.items()}


def _merge(into: dict, branch: dict) -> None:
    for k, v in branch.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v
