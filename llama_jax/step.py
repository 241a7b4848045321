"""One optimizer step: what a stage optimises (`Tuning`), the train state and its layout on a
mesh, and the pure `train_step(state, batch) -> (state, metrics)` with no mesh knowledge.

`build(...)` puts them together for a run (model, optimizer, sharded abstract state and batch,
the jitted train and eval steps); training, the benchmarks and ahead-of-time compilation all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from llama_jax import lora, sharding
from llama_jax.config import LlamaConfig
from llama_jax.loss import dpo_sums, output_kernel, reward_sums, token_losses, weighted_loss
from llama_jax.model import Llama, Params, build_model, init_params, param_shapes
from llama_jax.optim import lr_schedule, make_optimizer

if TYPE_CHECKING:
    from llama_jax.train_config import TrainConfig

Batch = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
Metrics = dict[str, jax.Array]


def batch_dtypes(stage: str) -> dict[str, Any]:
    """The arrays of a stage's batch and their dtypes: int32, and a reward pair's float32 margin."""
    return dict.fromkeys(BATCH_KEYS, jnp.int32) | ({"margin": jnp.float32} if stage == "reward" else {})


@dataclass(frozen=True)
class Tuning:
    """What a train step optimises: the stage's loss, over all weights or LoRA adapters only.
    `seed` derives LoRA dropout keys (from the seed and the step, so a resumed run repeats them)."""

    stage: str = "pretrain"
    lora: lora.LoraConfig | None = None
    dpo_beta: float = 0.1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Tuning:
        adapters = cfg.lora_rank and lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        return cls(cfg.stage, adapters or None, cfg.dpo_beta, cfg.seed)

    def frozen(self, start: Params) -> Params | None:
        """What the step keeps fixed, from the starting weights: the LoRA base (which is also
        DPO's reference), or DPO's reference; None when nothing is."""
        if self.lora is not None:
            return {"base": start}
        return {"reference": start} if self.stage == "dpo" else None


PRETRAIN = Tuning()  # all weights, next-token cross-entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params  # what the optimizer trains: all the weights, or LoRA adapters
    opt_state: optax.OptState
    frozen: Params | None = None  # fixed inputs of the step (Tuning.frozen): a LoRA base, a DPO reference


def hidden_states(model: Llama, params: Params, batch: Batch) -> jax.Array:
    """The final hidden states [B, T, dim] of a packed batch."""
    args = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    return model.apply({"params": params}, batch["tokens"], **args)[0]


def target_losses(model: Llama, params: Params, batch: Batch, loss_chunk: int) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and log Z [B, T] of the batch's targets (`token_losses`)."""
    hidden = hidden_states(model, params, batch)
    return token_losses(hidden, output_kernel(model.cfg, params), batch["targets"], loss_chunk)


def loss_sums(
    model: Llama, params: Params, batch: Batch, loss_chunk: int, z_loss: float = 0.0
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(objective summed over tokens, (cross-entropy sum, token count)); loss_mask weights tokens."""
    weights = batch["loss_mask"].astype(jnp.float32)
    hidden = hidden_states(model, params, batch)
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
    tokens, or of pairs): the targets' cross-entropy (pretrain, sft), the DPO loss against the
    frozen reference, or the reward model's ranking loss. With LoRA, `trained` are the adapters
    on the frozen base (and a reward model's head), and `rng` (None: off) draws their dropout."""
    lcfg = tuning.lora
    params = trained if lcfg is None else lora.combine(frozen["base"], trained, rng if lcfg.dropout else None)
    with lora.intercept(lcfg):
        if tuning.stage == "reward":
            args = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
            scores = model.apply({"params": params}, batch["tokens"], **args)[0]
            return reward_sums(scores, batch["loss_mask"], batch["margin"], batch["segment_ids"])
        if tuning.stage != "dpo":
            total, (xent_sum, count) = loss_sums(model, params, batch, loss_chunk, z_loss)
            return total, {"loss": xent_sum, "count": count}
        policy = -target_losses(model, params, batch, loss_chunk)[0]
    reference = -target_losses(model, frozen["base" if lcfg else "reference"], batch, loss_chunk)[0]
    mask = batch["loss_mask"].astype(jnp.float32)
    reference = jax.lax.stop_gradient(reference * mask)
    return dpo_sums(policy * mask, reference, batch["segment_ids"], tuning.dpo_beta)


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


def make_eval_step(model: Llama, loss_chunk: int = 512, tuning: Tuning = PRETRAIN) -> Callable[..., Metrics]:
    """`eval_step(params, frozen, batch)`: the stage's metric sums with their "count" (no dropout)."""
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
) -> TrainState:
    """The train state's shapes with their shardings (ShapeDtypeStructs): the trained leaves (all
    weights or LoRA adapters) sharded like the model's parameters, their optimizer state like
    them (`optax.tree_map_params`; counts replicated), the frozen weights like the parameters."""
    param_sh = sharding.param_shardings(plan, mesh, cfg)
    abstract = jax.eval_shape(partial(init_state, cfg, optimizer, lora_cfg=tuning.lora), jax.random.key(0))
    trained_sh = param_sh if tuning.lora is None else lora.adapter_shardings(cfg, param_sh, tuning.lora)
    abstract = abstract.replace(frozen=tuning.frozen(param_shapes(cfg, frozen_dtype)))
    return sharded_layout(abstract, trained_sh, tuning.frozen(param_sh), optimizer, mesh)


def sharded_layout(
    abstract: TrainState, trained_sh: Params, frozen_sh: Params | None, optimizer: optax.GradientTransformation, mesh
) -> TrainState:
    """The abstract state's ShapeDtypeStructs with shardings: the trained and frozen leaves as given,
    the optimizer state like the leaves it belongs to (`optax.tree_map_params`; counts replicated)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract.opt_state, trained_sh, transform_non_params=lambda _: replicated
    )
    shardings = TrainState(replicated, trained_sh, opt_sh, frozen_sh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def shardings_of(tree: Any) -> Any:
    """The shardings of a pytree of sharded ShapeDtypeStructs or arrays."""
    return jax.tree.map(lambda x: x.sharding, tree)


@dataclass(frozen=True)
class TrainStep:
    """A run's compiled-to-be step: `run(state, batch)` is jitted with the state's shardings (and
    donates the state), `evaluate(params, frozen, batch)` returns the stage's metric sums."""

    model: Llama
    optimizer: optax.GradientTransformation
    plan: sharding.Plan
    mesh: jax.sharding.Mesh
    state: TrainState  # sharded ShapeDtypeStructs
    batch: dict[str, jax.ShapeDtypeStruct]  # sharded ShapeDtypeStructs
    run: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    evaluate: Callable[[Params, Params | None, Batch], Metrics]


def build(cfg: TrainConfig, model_cfg: LlamaConfig, tuning: Tuning, devices: Sequence | None = None) -> TrainStep:
    """The model, optimizer, mesh, state layout and jitted steps of a run on `devices` (default:
    this process's; a TPU topology's or a described GPU's when compiling ahead of time)."""
    backend = devices[0].platform if devices else None
    model = build_model(model_cfg, cfg.dtype, cfg.attention, cfg.remat, cfg.scan_unroll, backend)
    schedule = lr_schedule(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    optimizer = make_optimizer(schedule, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.no_decay, cfg.clip_norm)
    plan = sharding.load_plan(cfg.sharding)
    mesh = sharding.build_mesh(plan, devices)
    state = state_layout(model_cfg, optimizer, tuning, plan, mesh, model.dtype)
    row = sharding.batch_sharding(plan, mesh, (cfg.batch_size, cfg.seq_len))
    shape = (cfg.batch_size, cfg.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=row) for k, dt in batch_dtypes(tuning.stage).items()}
    state_sh, batch_sh = shardings_of(state), shardings_of(batch)
    train_step = make_train_step(model, optimizer, schedule, cfg.grad_accum, cfg.loss_chunk, cfg.z_loss, tuning)
    run = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    eval_step = make_eval_step(model, cfg.loss_chunk, tuning)
    evaluate = jax.jit(eval_step, in_shardings=(state_sh.params, state_sh.frozen, batch_sh))
    return TrainStep(model, optimizer, plan, mesh, state, batch, run, evaluate)
