"""Pre-training: the train state, a pure train step, evaluation, and the loop around them
(checkpoints, metrics, preemption, divergence).

`make_train_step(...)` returns `train_step(state, batch) -> (state, metrics)`, a pure function
with no mesh knowledge: callers jit it with whatever shardings they like. The loss never holds
the full [B, T, vocab] logits: a fused linear + cross-entropy runs the output projection
`loss_chunk` positions at a time (`weighted_loss` for the summed objective, its gradient made in
the same pass; `token_losses` for per-token values, as DPO needs).

A run directory holds config.json (the model's LlamaConfig), train_config.toml (the resolved
training configuration), tokenizer.model, metrics.jsonl, tensorboard/ and checkpoints/: an
Orbax CheckpointManager root whose step directories hold the items `params`, `opt_state`,
`data` (the grain iterator) and `meta` (step, rng). A LoRA run saves `adapters` instead of
`params` and names its base checkpoint in lora.json (see llama_jax/lora.py).

`--stage sft|dpo` and `--lora-rank` run through the same loop and step (llama_jax/posttrain.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter
from tqdm import tqdm

from llama_jax import data as data_lib
from llama_jax import lora, posttrain, sharding
from llama_jax.chat import encode_dialog
from llama_jax.config import LlamaConfig, flops_per_token, get_preset
from llama_jax.convert import load_checkpoint, open_checkpoint
from llama_jax.errors import UserError
from llama_jax.generate import Sampling, generate
from llama_jax.model import Llama, Params, init_params, param_shapes
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.posttrain import Tuning
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
from llama_jax.train_config import RESUME_FIXED, TrainConfig, load_toml, parse_args

Batch = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
Metrics = dict[str, jax.Array]
TOKENIZER_LINES = 2_000_000  # lines of training text a tokenizer is trained on, at most
PRETRAIN = Tuning()  # all weights, next-token cross-entropy


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params  # what the optimizer trains: all the weights, or LoRA adapters
    opt_state: optax.OptState
    frozen: Params | None = None  # fixed inputs of the step (Tuning.frozen): a LoRA base, a DPO reference


def output_kernel(cfg: LlamaConfig, params: Params) -> jax.Array:
    """The output projection [dim, vocab]: the embedding's transpose when tied."""
    if cfg.tie_embeddings:
        return params["tok_embeddings"]["embedding"].T
    return params["output"]["kernel"]


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T/chunk, B, chunk, ...], zero-padded to whole chunks."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: jax.Array, t: int) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :t]


def _chunk_logits(h: jax.Array, w: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A chunk's float32 logits, log Z and cross-entropy (log Z - logit[target])."""
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return logits, log_z, log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _chunk_grads(h, w, targets, logits, log_z, g_xent, g_log_z, grad_kernel: bool = True):
    """d_h and the float32 d_w of sum(g_xent * xent + g_log_z * log Z) over a chunk: both terms
    move with the softmax, the cross-entropy also with the target's logit."""
    probs = jnp.exp(logits - log_z[..., None])
    target = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = ((g_xent + g_log_z)[..., None] * probs - jnp.where(target, g_xent[..., None], 0.0)).astype(h.dtype)
    d_w = jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32) if grad_kernel else None
    return jnp.einsum("bcv,dv->bcd", d_logits, w), d_w


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_losses(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and log-partition log Z per token, [B, T] float32, from hidden states
    [B, T, D] and the output projection [D, V], making logits for `chunk` positions at a time.

    A fused linear + cross-entropy for any downstream use of the per-token values (DPO sums
    them per sequence): the forward and the backward pass each loop over the chunks (the backward
    recomputes a chunk's logits), so no more than one chunk of logits ever exists, the projection
    is cast to the compute dtype once, and its gradient accumulates in float32 in the loop's
    carry. `weighted_loss` is the cheaper form for a plain weighted sum."""
    return _token_losses_fwd(hidden, kernel, targets, chunk)[0]


def _token_losses_fwd(hidden, kernel, targets, chunk):
    w = kernel.astype(hidden.dtype)

    def one_chunk(_, args):
        return None, _chunk_logits(args[0], w, args[1])[1:]

    _, (log_z, xent) = jax.lax.scan(one_chunk, None, (_chunks(hidden, chunk), _chunks(targets, chunk)))
    t = hidden.shape[1]
    return (_unchunk(xent, t), _unchunk(log_z, t)), (hidden, kernel, targets, log_z)


def _token_losses_bwd(chunk, residuals, cotangents):
    hidden, kernel, targets, log_z = residuals
    g_xent, g_log_z = (_chunks(g, chunk) for g in cotangents)
    w = kernel.astype(hidden.dtype)

    def one_chunk(d_kernel, args):
        h, tgt, lz, gx, gz = args
        logits = _chunk_logits(h, w, tgt)[0]  # (its log Z, known already, is dead code to XLA)
        d_h, d_w = _chunk_grads(h, w, tgt, logits, lz, gx, gz)
        return d_kernel + d_w, d_h

    chunks = (_chunks(hidden, chunk), _chunks(targets, chunk), log_z, g_xent, g_log_z)
    d_kernel, d_hidden = jax.lax.scan(one_chunk, jnp.zeros(kernel.shape, jnp.float32), chunks)
    return _unchunk(d_hidden, hidden.shape[1]).astype(hidden.dtype), d_kernel.astype(kernel.dtype), None


token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def _weighted_sums(xent, log_z, weights, z_loss):
    xent_sum = jnp.sum(xent * weights)
    return xent_sum + z_loss * jnp.sum(log_z**2 * weights), xent_sum


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def weighted_loss(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """(sum(weights * xent) + z_loss * sum(weights * log Z**2), sum(weights * xent)): the
    pre-training and fine-tuning objective over tokens [B, T], and its cross-entropy part.

    The fused linear + cross-entropy of `token_losses` with the gradient made in the forward
    pass: a scalar objective's cotangent only scales it, so each chunk's logits are computed
    once, not again in the backward pass (a quarter of the output projection's FLOPs and a pass
    over the logits saved). Without differentiation no gradient is made. With a z-loss only the
    objective is differentiable."""
    return _weighted_sums(*token_losses(hidden, kernel, targets, chunk), weights, z_loss)


def _weighted_loss_fwd(hidden, kernel, targets, weights, z_loss, chunk):
    grad_kernel = kernel.perturbed  # a frozen projection (LoRA) needs no gradient
    hidden, kernel, targets, weights = hidden.value, kernel.value, targets.value, weights.value
    w = kernel.astype(hidden.dtype)

    def one_chunk(d_kernel, args):
        h, tgt, wt = args
        logits, log_z, xent = _chunk_logits(h, w, tgt)
        d_h, d_w = _chunk_grads(h, w, tgt, logits, log_z, wt, 2 * z_loss * wt * log_z, grad_kernel)
        return (d_kernel + d_w if grad_kernel else None), (xent, log_z, d_h)

    chunks = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights.astype(jnp.float32), chunk))
    d_kernel = jnp.zeros(kernel.shape, jnp.float32) if grad_kernel else None
    d_kernel, (xent, log_z, d_hidden) = jax.lax.scan(one_chunk, d_kernel, chunks)
    t = hidden.shape[1]
    sums = _weighted_sums(_unchunk(xent, t), _unchunk(log_z, t), weights, z_loss)
    return sums, (_unchunk(d_hidden, t), None if d_kernel is None else d_kernel.astype(kernel.dtype))


def _weighted_loss_bwd(z_loss, chunk, residuals, cotangents):
    d_hidden, d_kernel = residuals
    g, g_xent = (None if isinstance(c, jax.custom_derivatives.SymbolicZero) else c for c in cotangents)
    if g_xent is not None:
        if z_loss:  # the two outputs differ by the z-loss, whose gradient alone is not kept
            raise TypeError("weighted_loss: with a z-loss, differentiate the objective, not its cross-entropy part")
        g = g_xent if g is None else g + g_xent  # without one they are the same function
    if g is None:
        return None, None, None, None
    d_kernel = None if d_kernel is None else (g * d_kernel).astype(d_kernel.dtype)
    return (g * d_hidden).astype(d_hidden.dtype), d_kernel, None, None


weighted_loss.defvjp(_weighted_loss_fwd, _weighted_loss_bwd, symbolic_zeros=True)


def _hidden(model: Llama, params: Params, batch: Batch) -> jax.Array:
    return model.apply(
        {"params": params},
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        return_hidden=True,
    )[0]


def target_losses(model: Llama, params: Params, batch: Batch, loss_chunk: int) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and log Z [B, T] of the batch's targets (`token_losses`)."""
    hidden = _hidden(model, params, batch)
    return token_losses(hidden, output_kernel(model.cfg, params), batch["targets"], loss_chunk)


def loss_sums(
    model: Llama, params: Params, batch: Batch, loss_chunk: int, z_loss: float = 0.0
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(objective summed over tokens, (cross-entropy sum, token count)); loss_mask weights tokens."""
    weights = batch["loss_mask"].astype(jnp.float32)
    hidden = _hidden(model, params, batch)
    kernel = output_kernel(model.cfg, params)
    objective, xent_sum = weighted_loss(hidden, kernel, batch["targets"], weights, z_loss, loss_chunk)
    return objective, (xent_sum, jnp.sum(weights))


def objective(
    model: Llama,
    tuning: Tuning,
    loss_chunk: int,
    z_loss: float,
    trained: Params,
    frozen: Params | None,
    batch: Batch,
    rng: jax.Array | None,
) -> tuple[jax.Array, Metrics]:
    """The stage's objective summed over the batch, and metric sums with their "count" (of
    tokens, or of DPO pairs): the targets' cross-entropy (pretrain, sft) or the DPO loss against
    the frozen reference. With LoRA, `trained` are the adapters on the frozen base, and `rng`
    (None: off) draws their dropout."""
    lcfg = tuning.lora
    params = trained if lcfg is None else lora.combine(frozen["base"], trained, rng if lcfg.dropout else None)
    with lora.intercept(lcfg):
        if tuning.stage != "dpo":
            total, (xent_sum, count) = loss_sums(model, params, batch, loss_chunk, z_loss)
            return total, {"loss": xent_sum, "count": count}
        policy = -target_losses(model, params, batch, loss_chunk)[0]
    reference = -target_losses(model, frozen["base" if lcfg else "reference"], batch, loss_chunk)[0]
    mask = batch["loss_mask"].astype(jnp.float32)
    reference = jax.lax.stop_gradient(reference * mask)
    return posttrain.dpo_sums(policy * mask, reference, batch["segment_ids"], tuning.dpo_beta)


def make_train_step(
    model: Llama,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    loss_chunk: int = 512,
    z_loss: float = 0.0,
    tuning: Tuning = PRETRAIN,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `train_step(state, batch)`. The batch is split into `grad_accum` micro-batches
    whose gradients are summed; the loss is the mean over all tokens (DPO: pairs) of the batch
    either way. Only `state.params` is differentiated and updated; `state.frozen` passes through."""
    grad_fn = jax.grad(partial(objective, model, tuning, loss_chunk, z_loss), has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
        rng = jax.random.fold_in(jax.random.key(tuning.seed), state.step)

        def grads_of(i):
            micro_batch = jax.tree.map(lambda x: x[i], micro)
            return grad_fn(state.params, state.frozen, micro_batch, jax.random.fold_in(rng, i))

        def accumulate(acc, i):
            return jax.tree.map(jnp.add, acc, grads_of(i)), None

        # The first micro-batch starts the sums (no zero-filled buffers; nothing else at grad_accum 1).
        (grads, sums), _ = jax.lax.scan(accumulate, grads_of(0), jnp.arange(1, grad_accum))
        count = jnp.maximum(sums.pop("count"), 1)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {k: v / count for k, v in sums.items()}
        metrics |= {"grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: Llama, loss_chunk: int = 512) -> Callable[[Params, Batch], tuple[jax.Array, jax.Array]]:
    """`eval_step(params, batch) -> (cross-entropy sum, token count)`."""
    return lambda params, batch: loss_sums(model, params, batch, loss_chunk)[1]


def make_eval_sums(model: Llama, loss_chunk: int = 512, tuning: Tuning = PRETRAIN) -> Callable[..., Metrics]:
    """`eval_sums(params, frozen, batch)`: the stage's metric sums with their "count" (no dropout)."""
    return lambda params, frozen, batch: objective(model, tuning, loss_chunk, 0.0, params, frozen, batch, None)[1]


def init_state(
    cfg: LlamaConfig, optimizer: optax.GradientTransformation, rng: jax.Array, lora_cfg: lora.LoraConfig | None = None
) -> TrainState:
    """Random weights, or with `lora_cfg` fresh adapters (the caller adds the frozen base)."""
    params = init_params(cfg, rng, jnp.float32) if lora_cfg is None else lora.init_adapters(cfg, lora_cfg, rng)
    return TrainState(jnp.int32(0), params, optimizer.init(params))


def state_layout(
    cfg: LlamaConfig,
    optimizer: optax.GradientTransformation,
    tuning: Tuning,
    plan: sharding.Plan,
    mesh: jax.sharding.Mesh,
    frozen_dtype: Any,
) -> tuple[TrainState, TrainState]:
    """(abstract train state, its shardings): the trained leaves (all weights or LoRA adapters)
    and their optimizer state, and the frozen weights, sharded like the model's parameters."""
    param_sh = sharding.param_shardings(plan, mesh, cfg)
    abstract = jax.eval_shape(partial(init_state, cfg, optimizer, lora_cfg=tuning.lora), jax.random.key(0))
    trained_sh = param_sh if tuning.lora is None else lora.adapter_shardings(cfg, param_sh, tuning.lora)
    state_sh = state_shardings(abstract, trained_sh, mesh).replace(frozen=tuning.frozen(param_sh))
    return abstract.replace(frozen=tuning.frozen(param_shapes(cfg, frozen_dtype))), state_sh


def state_shardings(abstract: TrainState, param_shardings: Params, mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of the whole train state: every optimizer leaf shaped like a parameter (Adam's
    moments) is sharded like that parameter; the rest (step, counts) is replicated."""
    params = {jax.tree_util.keystr(p): (leaf.shape, s) for (p, leaf), s in zip(
        jax.tree_util.tree_leaves_with_path(abstract.params), jax.tree.leaves(param_shardings), strict=True
    )}  # fmt: skip
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        match = [s for p, (shape, s) in params.items() if key.endswith(p) and shape == leaf.shape]
        return match[0] if match else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


def batch_shardings(plan: sharding.Plan, mesh: jax.sharding.Mesh, shape: tuple[int, int]) -> dict:
    return dict.fromkeys(BATCH_KEYS, sharding.batch_sharding(plan, mesh, shape))


def global_batch(local: dict, shardings: dict) -> Batch:
    """This process's rows -> global arrays (each process holds its share of the batch)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k])) for k in BATCH_KEYS}


def matmul_flops_per_s(dtype: Any) -> float:
    """This device's square-matmul rate in FLOP/s: the median of five timings of ten back-to-back
    products of random matrices (queued without waiting, so dispatch overhead stays hidden)."""
    n = 1024 if jax.default_backend() == "cpu" else 8192
    a, b = (jax.random.normal(key, (n, n), dtype) for key in jax.random.split(jax.random.key(0)))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready([matmul(a, b) for _ in range(10)])
        times.append((time.perf_counter() - start) / 10)
    return 2 * n**3 / float(np.median(times))


# -- checkpoints ------------------------------------------------------------------------------


def all_stream_states(data_iter: data_lib.Streams) -> dict[str, Any]:
    """The iterator states of every process's data streams, on every process (a collective): the
    checkpoint holds all of them, so any process count can resume from it."""
    # Serialised at once: the iterators go on changing the objects get_state returns, and Orbax
    # writes the checkpoint in the background.
    encoded = json.dumps(data_iter.get_state())
    if jax.process_count() == 1:
        return json.loads(encoded)
    from jax.experimental import multihost_utils

    raw = np.frombuffer(encoded.encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.int32(raw.size)).max())
    gathered = multihost_utils.process_allgather(np.pad(raw, (0, size - raw.size)))
    return {k: v for row in gathered for k, v in json.loads(bytes(row).rstrip(b"\0")).items()}


def global_tokens(batch: Batch) -> np.ndarray:
    """The tokens of the whole batch (every process's rows, in order) on every process: a collective."""
    if jax.process_count() == 1:
        return np.ascontiguousarray(batch["tokens"])
    from jax.experimental import multihost_utils

    return np.ascontiguousarray(multihost_utils.process_allgather(batch["tokens"], tiled=True))


def local_rows(batch: dict, process_index: int, process_count: int) -> dict:
    """This process's contiguous block of a global batch's rows."""
    rows = len(next(iter(batch.values()))) // process_count
    return {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}


class Checkpoints:
    """The run's Orbax CheckpointManager. Saves are asynchronous and each is reported on stdout
    once complete; a step directory only appears complete (Orbax renames a temporary directory),
    and temporary directories left by a killed save are deleted when the next run starts."""

    def __init__(self, run_dir: Path, keep: int, item: str = "params"):
        self.item = item  # what state.params is saved as: "params", or "adapters" (LoRA)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self.mngr = ocp.CheckpointManager(run_dir / "checkpoints", options=options)
        self.pending: int | None = None  # a step being saved, not yet reported

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, state: TrainState, data_iter: data_lib.Streams, rng: jax.Array) -> None:
        self.report(wait=True)
        self.pending = step = int(state.step)
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                **{self.item: ocp.args.StandardSave(state.params)},
                opt_state=ocp.args.StandardSave(state.opt_state),
                data=ocp.args.JsonSave(all_stream_states(data_iter)),
                meta=ocp.args.JsonSave({"step": step, "rng": jax.random.key_data(rng).tolist()}),
            ),
        )

    def restore(self, step: int, abstract: TrainState, data_iter: data_lib.Streams) -> TrainState:
        """The train state of `step`; `data_iter`'s streams are moved to where they were then."""
        restored = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                **{self.item: ocp.args.StandardRestore(abstract.params)},
                opt_state=ocp.args.StandardRestore(abstract.opt_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        data_iter.set_state(restored.data)
        return TrainState(jnp.int32(step), restored[self.item], restored.opt_state)

    def report(self, wait: bool) -> None:
        """Print "checkpoint saved: step N" once the pending save is complete (`wait`: block)."""
        if self.pending is not None and (wait or not self.mngr.is_saving_in_progress()):
            self.mngr.wait_until_finished()
            print(f"checkpoint saved: step {self.pending}", flush=True)
            self.pending = None

    def close(self) -> None:
        self.report(wait=True)
        self.mngr.close()


# -- metrics ------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl lines and TensorBoard scalars. Lines past `start_step` (left by a run that
    was killed after its last checkpoint) are dropped, and TensorBoard purges those steps."""

    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0  # one process writes for the run
        if not self.enabled:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            self.path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= start_step))
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for name, value in values.items():
            if isinstance(value, float):  # not the token count and the batch checksum
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def evaluate(eval_sums: Callable, state: TrainState, batches: list) -> dict[str, float]:
    """Metric means over the held-out batches ("loss": nats per token, or DPO loss per pair)."""
    sums = [jax.device_get(eval_sums(state.params, state.frozen, b)) for b in batches]
    totals = {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in sums[0]}
    count = max(totals.pop("count"), 1)
    return {k: v / count for k, v in totals.items()}


# -- the run ----------------------------------------------------------------------------------


def _tokenizer_in(directory: Path) -> Path | None:
    return next((directory / n for n in ("tokenizer.model", "tokenizer.json") if (directory / n).is_file()), None)


def compute_dtype(name: str) -> Any:
    """'auto': bfloat16 on accelerators, float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def attention_impl(name: str, dtype: Any, backend: str | None = None) -> str:
    """'auto': the Pallas splash kernel on TPUs, the fused cuDNN kernel on GPUs (it takes 16-bit
    inputs), the XLA reference elsewhere. `backend` (default: this process's) names the target
    when compiling ahead of time for other devices."""
    if name == "auto":
        backend = backend or jax.default_backend()
        if backend == "tpu":
            return "splash"
        fused = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if fused else "xla"
    if name == "tokamax" and importlib.util.find_spec("tokamax") is None:
        raise UserError("--attention tokamax needs the tokamax package: pip install 'llama-jax[cuda]'")
    return name


def layer_unroll(setting: int, n_layers: int, remat: str, backend: str | None = None) -> int:
    """Layers per iteration of the loop over layers; 0 ('auto'): all of them on GPUs without
    rematerialisation, one otherwise.

    Looping over stacked layers makes XLA's GPU backend write saved activations and weight
    gradients into all-layer buffers and copy them out again: about half the non-matmul memory
    traffic of a train step, and 40% more memory (BENCHMARKS.md). Rematerialised layers unrolled
    need barriers against XLA merging the recomputation back into the forward pass, which cost
    more than the loop. TPUs keep the loop, whose compile time stays flat in the depth."""
    if setting:
        return min(setting, n_layers)
    return n_layers if (backend or jax.default_backend()) == "gpu" and remat == "none" else 1


class _Preemption:
    """Remembers a SIGTERM so the loop can save the current step and exit cleanly."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _prepare_run(
    cfg: TrainConfig, corpus: data_lib.Corpus | None
) -> tuple[LlamaConfig, Path, posttrain.Examples | None]:
    """Check the inputs, then write config.json, train_config.toml and the tokenizer to the run
    directory, so that bad input leaves nothing behind. Returns the model config, the tokenizer
    file and, for sft/dpo (no corpus), the checked examples."""
    out = Path(cfg.out)
    tokenizer_src = Path(cfg.tokenizer) if cfg.tokenizer else None
    if cfg.init_from:
        source = open_checkpoint(cfg.init_from)
        model_cfg = source.config
        if tokenizer_src is None and source.tokenizer_files:
            tokenizer_src = source.tokenizer_files[0]
    else:
        model_cfg = get_preset(cfg.model)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise UserError(f"seq-len {cfg.seq_len} exceeds the model's context of {model_cfg.max_seq_len}")
    if cfg.data_streams % jax.process_count():
        raise UserError(
            f"data-streams {cfg.data_streams} cannot be shared by {jax.process_count()} processes: "
            f"pass --data-streams with a multiple of {jax.process_count()} that divides --batch-size"
        )
    if (out / "config.json").exists():
        if json.loads((out / "config.json").read_text()) != model_cfg.to_dict():
            raise UserError(f"{out} holds a run of another model; choose another --out")
        previous = load_toml(out / "train_config.toml")
        changed = [f"--{k.replace('_', '-')}" for k in RESUME_FIXED if previous.get(k) != getattr(cfg, k)]
        if changed:
            raise UserError(f"{out} was trained with other {', '.join(changed)}; resume with the same values")
    saved = _tokenizer_in(out)
    if tokenizer_src is not None:
        vocab = load_tokenizer(tokenizer_src).vocab_size
        if vocab > model_cfg.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens, the model only {model_cfg.vocab_size}")
        tokenizer_src = _tokenizer_in(tokenizer_src) if tokenizer_src.is_dir() else tokenizer_src
        if saved is not None and saved.read_bytes() != tokenizer_src.read_bytes():
            raise UserError(f"{out} was trained with another tokenizer, {saved}")
    examples = None
    if corpus is None:  # sft/dpo: every example is read and checked before anything is written
        if tokenizer_src is None and saved is None:
            raise UserError(f"--stage {cfg.stage} needs a chat tokenizer: --tokenizer, or --init-from a model with one")
        examples = posttrain.load_examples(
            cfg.stage, cfg.data, cfg.eval_data, cfg.eval_fraction, load_tokenizer(tokenizer_src or saved),
            cfg.seq_len, cfg.seed, cfg.skip_bad_examples,
        )  # fmt: skip

    _barrier("run directory checked")  # every process has read the run directory before it changes
    if jax.process_index() == 0:  # one process writes the run directory; the others then read it
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
        (out / "train_config.toml").write_text(cfg.to_toml())
        if saved is None and tokenizer_src is not None:
            name = "tokenizer.json" if tokenizer_src.suffix == ".json" else "tokenizer.model"
            shutil.copyfile(tokenizer_src, out / name)
        elif saved is None:
            print(f"training a {model_cfg.vocab_size}-token SentencePiece BPE tokenizer on the training documents")
            lines = data_lib.document_lines(corpus.train, TOKENIZER_LINES)
            train_sentencepiece(lines, out / "tokenizer.tmp", model_cfg.vocab_size).rename(out / "tokenizer.model")
            (out / "tokenizer.tmp.vocab").unlink(missing_ok=True)
    print(f"configuration (saved to {out / 'train_config.toml'}):\n{cfg.to_toml()}", end="")
    _barrier("run directory written")
    return model_cfg, _tokenizer_in(out), examples


def _barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train(cfg: TrainConfig) -> None:
    """Run, or resume, the training that `cfg` describes: to the last step, or until a SIGTERM,
    which saves the current step. Raises Diverged on a NaN or infinite loss."""
    out = Path(cfg.out).absolute()
    tuning = Tuning.from_config(cfg)
    corpus = None
    if cfg.stage == "pretrain":
        corpus = data_lib.load_corpus(
            cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.data_format, cfg.data_field, cfg.seed
        )
    model_cfg, tokenizer_file, examples = _prepare_run(cfg, corpus)
    if tuning.lora is not None:
        lora.save_run_config(out, tuning.lora, cfg.init_from)
    tokenizer, tokenizer_path = load_tokenizer(tokenizer_file), str(tokenizer_file)
    processes = (jax.process_index(), jax.process_count())
    if corpus is not None:
        data_iter = data_lib.train_batches(
            corpus.train, tokenizer_path, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.data_streams, cfg.workers,
            cfg.shuffle_window, *processes,
        )  # fmt: skip
        eval_set = data_lib.eval_batches(corpus.eval, tokenizer_path, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
        counts = f"{len(corpus.train)} training and {len(corpus.eval)} held-out documents"
    else:
        data_iter = posttrain.train_batches(
            examples.train, cfg.stage, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.data_streams, *processes
        )
        eval_set = posttrain.eval_batches(examples.eval, cfg.stage, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
        counts = f"{len(examples.train)} training and {len(examples.eval)} held-out {cfg.stage} examples"
        if examples.skipped:
            counts += f" ({examples.skipped} bad ones skipped; the first: {examples.first_skipped})"
    entropy = data_lib.unigram_entropy(eval_set, model_cfg.vocab_size)
    print(
        f"{counts}; held-out unigram entropy "
        f"{entropy:.3f} nats/token over {sum(int(b['loss_mask'].sum()) for b in eval_set)} tokens"
    )

    dtype = compute_dtype(cfg.dtype)
    attention = attention_impl(cfg.attention, dtype)
    rng = jax.random.key(cfg.seed)
    built = build_step(cfg, model_cfg, tuning, dtype, attention)
    model, optimizer, plan, mesh, abstract, state_sh, batch_sh, train_step = built
    eval_step = jax.jit(
        make_eval_sums(model, cfg.loss_chunk, tuning), in_shardings=(state_sh.params, state_sh.frozen, batch_sh)
    )
    print(f"sharding plan {plan.name}: mesh {dict(mesh.shape)} over {jax.device_count()} devices")

    checkpoints = Checkpoints(out, cfg.keep, "params" if tuning.lora is None else "adapters")
    start = checkpoints.latest_step() or 0
    with sharding.activate(plan, mesh):
        start_params = None  # the --init-from weights: where training starts, or the LoRA base / DPO reference
        if cfg.init_from and (not start or state_sh.frozen is not None):
            start_dtype = np.float32 if tuning.lora is None else np.dtype(dtype)  # a LoRA base is never trained
            start_params = load_checkpoint(cfg.init_from, dtype=start_dtype).params
        if start:  # restored straight into this run's shardings, whatever mesh saved it
            target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, state_sh)
            state = checkpoints.restore(start, target, data_iter)
            state = state.replace(step=sharding.put(np.int32(start), state_sh.step))
            print(f"resumed from the checkpoint at step {start}")
        elif cfg.init_from and tuning.lora is None:
            params = sharding.put(start_params, state_sh.params)
            opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
            state = TrainState(sharding.put(np.int32(0), state_sh.step), params, opt_state)
            print(f"starting from the weights of {cfg.init_from}")
        else:  # random weights or fresh LoRA adapters, created already sharded
            init = partial(init_state, model_cfg, optimizer, lora_cfg=tuning.lora)
            state = jax.jit(init, out_shardings=state_sh.replace(frozen=None))(rng)
        if state_sh.frozen is not None:  # the LoRA base as loaded; a DPO reference as a copy in the compute dtype
            fixed = start_params if tuning.lora else jax.tree.map(lambda x: np.asarray(x).astype(dtype), start_params)
            state = state.replace(frozen=sharding.put(tuning.frozen(fixed), state_sh.frozen))
            if tuning.lora is not None:
                print(f"training rank-{tuning.lora.rank} LoRA adapters of {', '.join(tuning.lora.targets)}")
    eval_set = [global_batch(local_rows(b, *processes), batch_sh) for b in eval_set]  # the same in any process count

    log = MetricsLog(out, start)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    model_flops = tokens_per_step * flops_per_token(
        model_cfg, cfg.seq_len, weight_grads=tuning.lora is None, extra_forwards=int(tuning.stage == "dpo")
    )
    peak = matmul_flops_per_s(dtype) * jax.device_count()
    print(
        f"model {model_cfg.num_params / 1e6:.1f}M parameters, {tokens_per_step} tokens per step, "
        f"on a {jax.devices()[0].device_kind} ({jax.default_backend()}), compute {jnp.dtype(dtype).name}"
    )

    def run_eval(step: int) -> None:
        means = evaluate(eval_step, state, eval_set)
        loss = means.pop("loss")
        if cfg.stage == "dpo":
            log.write(step, {"eval_loss": loss, **{f"eval_{k}": v for k, v in means.items()}})
            accuracy, margin = means["reward_accuracy"], means["reward_margin"]
            tqdm.write(f"step {step:6d} | held-out DPO loss {loss:.4f}, accuracy {accuracy:.3f}, margin {margin:.3f}")
            return
        log.write(step, {"eval_loss": loss, "eval_ppl": math.exp(loss), "unigram_entropy": entropy})
        tqdm.write(f"step {step:6d} | held-out loss {loss:.4f} (ppl {math.exp(loss):.1f}, unigram {entropy:.3f})")

    preemption = _Preemption()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=None, dynamic_ncols=True)
    with sharding.activate(plan, mesh):
        try:
            mark, marked_steps, losses = time.perf_counter(), 0, []
            for step in range(start + 1, cfg.steps + 1):
                batch = next(data_iter)
                state, metrics = train_step(state, global_batch(batch, batch_sh))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    last = checkpoints.latest_step()
                    raise Diverged(
                        f"loss {metrics['loss']}, gradient norm {metrics['grad_norm']} at step {step}; "
                        + (f"the last good checkpoint is step {last}" if last else "no checkpoint was saved")
                    )
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                marked_steps += 1
                losses.append(metrics["loss"])
                logged = step % cfg.log_every == 0 or step == cfg.steps
                if logged:
                    seconds = time.perf_counter() - mark
                    metrics |= {
                        "loss": sum(losses) / len(losses),  # over the steps since the last line
                        "tokens_per_s": marked_steps * tokens_per_step / seconds,
                        "mfu": marked_steps * model_flops / seconds / peak,
                        "tokens": step * tokens_per_step,
                        "data_crc": zlib.crc32(global_tokens(batch).tobytes()),
                    }
                    log.write(step, metrics)
                    losses = []
                    tqdm.write(
                        f"step {step:6d} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                        f"grad norm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:,.0f} tok/s | "
                        f"mfu {metrics['mfu']:.1%}"
                    )
                evaluated = cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps
                if evaluated:
                    run_eval(step)
                if step % cfg.save_every == 0 or step == cfg.steps or preemption.requested:
                    checkpoints.save(state, data_iter, rng)
                if step == start + 1 or logged or evaluated:
                    mark, marked_steps = time.perf_counter(), 0  # rates exclude compilation and evaluation
                checkpoints.report(wait=preemption.requested)
                if preemption.requested:
                    print(f"SIGTERM: stopped after saving step {step}")
                    return
            if start < cfg.steps:
                run_eval(cfg.steps)
        finally:
            bar.close()
            preemption.restore()
            checkpoints.close()
            log.close()
            data_iter.close()

    if cfg.sample_tokens:
        params = load_checkpoint(out).params  # as infer.py and the converter read the run
        sampler = Llama(model_cfg, dtype=dtype, attention_impl=attention)
        prompt = tokenizer.encode(cfg.sample_prompt, bos=True)
        if cfg.stage != "pretrain":  # a chat reply
            prompt = encode_dialog(tokenizer, [{"role": "user", "content": cfg.sample_prompt}])
        sample_len = min(cfg.sample_tokens, model_cfg.max_seq_len - len(prompt))
        completion = generate(sampler, params, [prompt], sample_len, Sampling(), tokenizer.stop_ids, cfg.seed)[0]
        text = tokenizer.decode(prompt[1:] + completion.tokens)
        if cfg.stage != "pretrain":
            text = f"{cfg.sample_prompt}\n> {tokenizer.decode(completion.tokens)}"
        print(f"sample from the checkpoint at step {cfg.steps}:\n{text}")


class BuiltStep(NamedTuple):
    model: Llama
    optimizer: optax.GradientTransformation
    plan: sharding.Plan
    mesh: jax.sharding.Mesh
    abstract: TrainState  # shapes of the train state
    state_sh: TrainState  # its shardings
    batch_sh: dict
    train_step: Callable  # jitted with those shardings, the state donated


def build_step(
    cfg: TrainConfig, model_cfg: LlamaConfig, tuning: Tuning, dtype: Any, attention: str, devices=None
) -> BuiltStep:
    """The model, optimizer, mesh, state layout and jitted train step of a run; training and
    --compile-only (with a TPU topology's devices) share it."""
    backend = devices[0].platform if devices else None
    unroll = layer_unroll(cfg.scan_unroll, model_cfg.n_layers, cfg.remat, backend)
    model = Llama(model_cfg, dtype, jnp.float32, cfg.remat, attention, scan_unroll=unroll)
    schedule = lr_schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    optimizer = make_optimizer(schedule, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.no_decay, cfg.clip_norm)
    plan = sharding.load_plan(cfg.sharding)
    mesh = sharding.build_mesh(plan, devices)
    abstract, state_sh = state_layout(model_cfg, optimizer, tuning, plan, mesh, dtype)
    batch_sh = batch_shardings(plan, mesh, (cfg.batch_size, cfg.seq_len))
    train_step = jax.jit(
        make_train_step(model, optimizer, schedule, cfg.grad_accum, cfg.loss_chunk, cfg.z_loss, tuning),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    return BuiltStep(model, optimizer, plan, mesh, abstract, state_sh, batch_sh, train_step)


def compile_train_step(cfg: TrainConfig) -> None:
    """Compile the real train step (forward, backward, AdamW) for a TPU topology on this machine
    and print per-chip memory and XLA's cost estimate: find out-of-memory before a pod is allocated."""
    from llama_jax import aot

    if not cfg.topology:
        raise UserError("--compile-only needs --topology (e.g. v5p-8, v5p-256 or v5p:2x2x1)")
    topology = aot.parse_topology(cfg.topology)
    model_cfg = open_checkpoint(cfg.init_from).config if cfg.init_from else get_preset(cfg.model)
    dtype = jnp.bfloat16 if cfg.dtype == "auto" else jnp.dtype(cfg.dtype)  # the accelerator's compute dtype
    devices = aot.topology_devices(topology)
    attention = attention_impl(cfg.attention, dtype, backend=devices[0].platform)
    built = build_step(cfg, model_cfg, Tuning.from_config(cfg), dtype, attention, devices)
    plan, mesh = built.plan, built.mesh
    batch = {
        k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=s) for k, s in built.batch_sh.items()
    }
    with sharding.activate(plan, mesh):
        state = aot.abstract(built.abstract, built.state_sh)
        row = aot.compile_report("train step", built.train_step, (state, batch), {}, topology)
    print(
        f"model {cfg.model} ({model_cfg.num_params / 1e9:.2f}B), batch {cfg.batch_size} x {cfg.seq_len}, "
        f"compute {jnp.dtype(dtype).name}, remat {cfg.remat}, attention {attention}, "
        f"plan {plan.name} {dict(mesh.shape)}"
    )
    print(aot.format_report([row]))


def main(argv: list[str]) -> int:
    """`train.py`: parse the options and train; exit code 1 when the loss diverges."""
    cfg = parse_args(argv)
    if cfg.compile_only:
        compile_train_step(cfg)
        return 0
    sharding.initialize_distributed(
        cfg.coordinator or None, cfg.num_processes or None, cfg.process_id if cfg.process_id >= 0 else None
    )
    if jax.process_index() != 0:  # one process speaks for the run
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        train(cfg)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
