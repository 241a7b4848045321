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
    model = build_model(cfg, dtype)
    placement = sharding.param_shardings(sharding_plan, mesh, cfg, split_kv_heads=replicas == 1)
    if isinstance(source, OrbaxReader):  # restored straight into the target sharding: each host reads its shards
        target = jax.tree_util.tree_map_with_path(
            lambda p, s, sh: jax.ShapeDtypeStruct(s.shape, quant.load_dtype(p, s.dtype, model.dtype), sharding=sh),
            param_shapes(cfg),
            placement,
        )
        params = ocp.StandardCheckpointer().restore(source.params, target)
    else:  # Meta, HF or a LoRA run (adapters merged): read on the host, then placed
        host = read_checkpoint(source).params
        params = sharding.put(jax.tree.map(lambda a: np.asarray(a).astype(model.dtype), host), placement)
    if quantized is not None:  # each float kernel is freed once quantized
        placement = sharding.param_shardings(sharding_plan, mesh, quantized, split_kv_heads=replicas == 1)
        params = quant.quantize_params(params, cfg, quantize, placement, free=True)
        cfg, model = quantized, build_model(quantized, dtype)
    if replicas > 1:  # more devices split kv heads than there are: each device gets a copy of one
        cfg = cfg.replace(n_kv_heads=cfg.n_kv_heads * replicas)
        model = build_model(cfg, dtype)
        target = sharding.param_shardings(sharding_plan, mesh, cfg)
        params = jax.jit(lambda p: repeat_kv_heads(p, replicas), out_shardings=target)(params)
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
