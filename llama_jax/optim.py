"""AdamW as Llama was pre-trained (reference section 8): linear warmup from 0 to the peak
learning rate, cosine decay to `min_lr_ratio` of it, global-norm gradient clipping, and
decoupled weight decay on every parameter except those whose path (`layers/ffn_norm/scale`,
`tok_embeddings/embedding`, ...) matches a `no_decay` regex: by default the RMSNorm scales
and the token embeddings, which are not matrices that multiply activations (with tied
embeddings the output projection is the embedding, so it is not decayed either).

The optimizer state takes the dtype of the parameters: float32 master weights give float32
moments whatever the compute dtype."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

from llama_jax.model import Params


def lr_schedule(peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> optax.Schedule:
    """Linear warmup (cut short in runs of fewer steps), then cosine decay to the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=min(warmup_steps, total_steps - 1),
        decay_steps=total_steps,
        end_value=peak * min_lr_ratio,
    )


def param_path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params: Params, no_decay: Sequence[str]) -> Params:
    """True for the parameters that get weight decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(re.search(p, param_path(path)) for p in no_decay), params
    )


def make_optimizer(
    schedule: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-5,
    weight_decay: float = 0.1,
    no_decay: Sequence[str] = ("norm", "tok_embeddings"),
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=lambda p: decay_mask(p, no_decay))
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
