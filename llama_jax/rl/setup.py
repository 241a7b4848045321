"""An RL run's models, train state and jitted programs: the counterpart of step.build for PPO and GRPO.

The state is an ordinary `step.TrainState`. `params` holds what is trained: {"policy", "value"}
(PPO) or {"policy"} (GRPO), each all the weights in float32 or, with LoRA, adapters (the value's
with its scalar head). `frozen` holds the rest in the compute dtype: the reference (the --init-from
weights; with LoRA they are the policy's base, and the reference is that base without adapters),
and the reward model. The value model starts as the reward model (Llama 2) or as the policy with a
fresh head (--value-from); with LoRA it is adapters on that model's frozen weights, so policy, value,
reference and reward model hold one or two copies of the weights, not four.

Three programs: `score` (per rollout chunk: the policy's and the reference's log-probabilities of
the response tokens, the policy's entropy, the values, the reward model's score), `finish` (the whole
batch: KL-penalised rewards, GAE and whitened advantages for PPO, group-relative ones for GRPO) and
`update` (one optimizer step on a minibatch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import lora, sharding
from llama_jax.config import LlamaConfig
from llama_jax.generate import Sampling
from llama_jax.loss import output_kernel, token_entropy, token_losses
from llama_jax.model import Llama, Params, build_model, param_shapes
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.rl import losses
from llama_jax.scoring import last_scores
from llama_jax.step import TrainState, sharded_layout, shardings_of

if TYPE_CHECKING:
    from llama_jax.train_config import TrainConfig

Batch = dict[str, jax.Array]
SEQUENCE_KEYS = ("tokens", "positions", "segment_ids")  # [rows, prompt_len + max_new]


@dataclass(frozen=True)
class Settings:
    """What the programs compute, from the run's options (static: hashable)."""

    stage: str  # "ppo" or "grpo"
    lora: lora.LoraConfig | None
    value_from: str
    kl_beta: float
    gamma: float
    lam: float
    clip_ratio: float
    clip_value: float
    vf_coef: float
    temperature: float
    group_size: int
    prompt_len: int  # prompts are left-padded to this many tokens
    max_new: int  # response tokens
    ppo_epochs: int
    micro_batches: int  # a minibatch (and a chunk of rollouts being scored) runs in this many pieces
    loss_chunk: int
    seed: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Settings:
        adapters = cfg.lora_rank and lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        return cls(
            cfg.stage, adapters or None, cfg.value_from, cfg.kl_beta, cfg.gamma, cfg.lam, cfg.clip_ratio,
            cfg.clip_value, cfg.vf_coef, cfg.temperature, cfg.group_size, cfg.seq_len - cfg.max_new_tokens,
            cfg.max_new_tokens, cfg.ppo_epochs, cfg.grad_accum, cfg.loss_chunk, cfg.seed,
        )  # fmt: skip

    @property
    def ppo(self) -> bool:
        return self.stage == "ppo"


@dataclass(frozen=True)
class Models:
    policy: Llama
    value: Llama | None  # PPO's value model (a score head)
    reward: Llama | None  # the reward model, without --reward FUNCTION


def policy_params(s: Settings, trained: Params, frozen: Params, rng: jax.Array | None = None) -> Params:
    if s.lora is None:
        return trained["policy"]
    return lora.combine(frozen["base"], trained["policy"], rng if s.lora.dropout else None)


def value_params(s: Settings, trained: Params, frozen: Params, rng: jax.Array | None = None) -> Params:
    if s.lora is None:
        return trained["value"]
    base = frozen["reward"] if s.value_from == "reward" else frozen["base"]
    return lora.combine(base, trained["value"], rng if s.lora.dropout else None)


def reference_params(s: Settings, frozen: Params) -> Params:
    return frozen["base" if s.lora else "reference"]


def response_window(s: Settings, x: jax.Array) -> jax.Array:
    """Positions [prompt_len - 1, prompt_len - 1 + max_new) of [B, T, ...]: where each response
    token is predicted (and valued)."""
    return x[:, s.prompt_len - 1 : s.prompt_len - 1 + s.max_new]


def response_logprobs(model: Llama, params: Params, batch: Batch, s: Settings, entropy: bool = False):
    """log pi(response token) [B, max_new] at the sampling temperature (and the entropy [B, max_new])."""
    args = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    hidden = response_window(s, model.apply({"params": params}, batch["tokens"], **args)[0])
    hidden = (hidden / s.temperature).astype(hidden.dtype) if s.temperature != 1 else hidden
    kernel = output_kernel(model.cfg, params)
    logp = -token_losses(hidden, kernel, batch["tokens"][:, s.prompt_len :], s.loss_chunk)[0]
    return (logp, token_entropy(hidden, kernel, s.loss_chunk)) if entropy else logp


def response_values(model: Llama, params: Params, batch: Batch, s: Settings) -> jax.Array:
    """The value model's V(state before each response token) [B, max_new]."""
    scores = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])[0]  # fmt: skip
    return response_window(s, scores)


def score(models: Models, s: Settings, trained: Params, frozen: Params, batch: Batch) -> Batch:
    """A chunk of rollouts scored, `s.micro_batches` pieces one after the other: logp, ref_logp,
    entropy [B, max_new], values (PPO), score [B] (with a reward model)."""
    micro = jax.tree.map(lambda x: x.reshape(s.micro_batches, -1, *x.shape[1:]), batch)
    out = jax.lax.map(partial(score_micro_batch, models, s, trained, frozen), micro)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def score_micro_batch(models: Models, s: Settings, trained: Params, frozen: Params, batch: Batch) -> Batch:
    with lora.intercept(s.lora):
        logp, entropy = response_logprobs(models.policy, policy_params(s, trained, frozen), batch, s, entropy=True)
        out = {"logp": logp, "entropy": entropy}
        if s.ppo:
            out["values"] = response_values(models.value, value_params(s, trained, frozen), batch, s)
    out["ref_logp"] = response_logprobs(models.policy, reference_params(s, frozen), batch, s)
    if models.reward is not None:
        args = (batch["tokens"], batch["segment_ids"], batch["positions"])
        out["score"] = last_scores(models.reward, frozen["reward"], *args)
    return out


def finish(s: Settings, rollout: Batch) -> Batch:
    """The whole batch's advantages (and PPO's returns, explained variance), and each rollout's
    KL to the reference (the sum over its tokens of log pi - log pi_ref)."""
    mask = rollout["mask"]
    out = {"kl": jnp.sum((rollout["logp"] - rollout["ref_logp"]) * mask, axis=1)}
    if not s.ppo:
        return out | {"advantages": losses.group_advantages(rollout["score"], s.group_size)}
    rewards = losses.kl_rewards(rollout["score"], rollout["logp"], rollout["ref_logp"], mask, s.kl_beta)
    advantages, returns = losses.gae(rewards, rollout["values"], mask, s.gamma, s.lam)
    return out | {
        "advantages": losses.masked_whiten(advantages, mask),
        "returns": returns,
        "explained_variance": losses.explained_variance(rollout["values"], returns, mask),
    }


def objective(models: Models, s: Settings, trained: Params, frozen: Params, mb: Batch, rng: jax.Array):
    """(the minibatch's loss, (its metrics, its weight)): PPO's clipped surrogate + vf_coef x clipped
    value loss, token means, or GRPO's clipped objective with its KL term, a mean over sequences.
    Loss and metrics come multiplied by the weight (tokens, or sequences), so that micro-batches sum
    to the minibatch's means."""
    policy_rng, value_rng = jax.random.split(rng)
    mask = mb["mask"]
    with lora.intercept(s.lora):
        logp = response_logprobs(models.policy, policy_params(s, trained, frozen, policy_rng), mb, s)
        if not s.ppo:
            args = (mb["old_logp"], mb["ref_logp"], mb["advantages"], mask, s.clip_ratio, s.kl_beta)
            loss, metrics = losses.grpo_loss(logp, *args)
            return weighted(loss, {"policy_loss": loss, **metrics}, jnp.float32(mask.shape[0]))
        values = response_values(models.value, value_params(s, trained, frozen, value_rng), mb, s)
    policy_loss, clip_fraction = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, s.clip_ratio)
    value_loss = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mask, s.clip_value)
    metrics = {"policy_loss": policy_loss, "value_loss": value_loss, "clip_fraction": clip_fraction}
    metrics["approx_kl"] = losses.masked_mean(mb["old_logp"] - logp, mask)  # to the rollout policy
    return weighted(policy_loss + s.vf_coef * value_loss, metrics, jnp.sum(mask))


def weighted(loss: jax.Array, metrics: Batch, weight: jax.Array):
    return loss * weight, ({k: v * weight for k, v in metrics.items()}, weight)


def make_update(models: Models, s: Settings, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    """A pure `update(state, minibatch, index) -> (state, metrics)`: one optimizer step, the
    minibatch split into `s.micro_batches` whose gradients are summed; `index` counts the run's
    updates (the learning rate's step, LoRA dropout's key)."""
    grad_fn = jax.grad(partial(objective, models, s), has_aux=True)

    def update(state: TrainState, mb: Batch, index: jax.Array) -> tuple[TrainState, Batch]:
        rng = jax.random.fold_in(jax.random.key(s.seed), index)
        micro = jax.tree.map(lambda x: x.reshape(s.micro_batches, -1, *x.shape[1:]), mb)

        def grads_of(i):
            return grad_fn(state.params, state.frozen, jax.tree.map(lambda x: x[i], micro), jax.random.fold_in(rng, i))

        def accumulate(acc, i):
            return jax.tree.map(jnp.add, acc, grads_of(i)), None

        (grads, (sums, weight)), _ = jax.lax.scan(accumulate, grads_of(0), jnp.arange(1, s.micro_batches))
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {k: v / weight for k, v in sums.items()}
        metrics |= {"grad_norm": optax.tree.norm(grads), "lr": schedule(index)}
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics

    return update


def minibatch_keys(s: Settings) -> dict[str, str]:
    """The arrays of a minibatch and their kind: "sequence" [M, T], "response" [M, N] or "row" [M]."""
    keys = dict.fromkeys(SEQUENCE_KEYS, "sequence") | {"mask": "response", "old_logp": "response"}
    if s.ppo:
        return keys | {"old_values": "response", "advantages": "response", "returns": "response"}
    return keys | {"ref_logp": "response", "advantages": "row"}


def state_layout(models: Models, s: Settings, optimizer, plan: sharding.Plan, mesh) -> TrainState:
    """The RL train state's ShapeDtypeStructs with shardings (see the module docstring)."""

    def trained(cfg: LlamaConfig) -> tuple[Params, Params]:
        param_sh = sharding.param_shardings(plan, mesh, cfg)
        if s.lora is None:
            return param_shapes(cfg, jnp.float32), param_sh
        adapters = jax.eval_shape(partial(lora.init_adapters, cfg, s.lora), jax.random.key(0))
        return adapters, lora.adapter_shardings(cfg, param_sh, s.lora)

    parts = {"policy": models.policy} | ({"value": models.value} if s.ppo else {})
    shapes_sh = {name: trained(m.cfg) for name, m in parts.items()}
    fixed = {("base" if s.lora else "reference"): models.policy} | ({"reward": models.reward} if models.reward else {})
    frozen = {name: param_shapes(m.cfg, m.dtype) for name, m in fixed.items()}
    frozen_sh = {name: sharding.param_shardings(plan, mesh, m.cfg) for name, m in fixed.items()}
    shapes = {name: shape for name, (shape, _) in shapes_sh.items()}
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), shapes, jax.eval_shape(optimizer.init, shapes), frozen)
    return sharded_layout(abstract, {n: sh for n, (_, sh) in shapes_sh.items()}, frozen_sh, optimizer, mesh)


@dataclass(frozen=True)
class RLStep:
    settings: Settings
    models: Models
    sampling: Sampling
    optimizer: optax.GradientTransformation
    plan: sharding.Plan
    mesh: jax.sharding.Mesh
    state: TrainState  # sharded ShapeDtypeStructs
    minibatch: dict[str, jax.ShapeDtypeStruct]  # sharded ShapeDtypeStructs of `rows` rollouts
    rows: int  # rollouts per minibatch, also per chunk of generation and scoring
    updates_per_iteration: int
    score: Callable[[Params, Params, Batch], Batch]
    finish: Callable[[Batch], Batch]
    update: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Batch]]


def build(
    cfg: TrainConfig, policy_cfg: LlamaConfig, reward_cfg: LlamaConfig | None, devices: Sequence | None = None
) -> RLStep:
    """The models, optimizer, mesh, state layout and jitted programs of an RL run on `devices`."""
    s = Settings.from_config(cfg)
    backend = devices[0].platform if devices else None
    build_one = partial(build_model, dtype=cfg.dtype, attention=cfg.attention, remat=cfg.remat,
                        unroll=cfg.scan_unroll, backend=backend)  # fmt: skip
    policy = build_one(policy_cfg)
    reward = build_one(reward_cfg) if reward_cfg is not None else None
    value = None
    if s.ppo:
        value = reward if s.value_from == "reward" else build_one(policy_cfg.replace(head="score", pad_id=None))
    models = Models(policy, value, reward)
    updates = cfg.ppo_epochs * (cfg.batch_size // cfg.minibatch_size)
    schedule = lr_schedule(cfg.lr, cfg.warmup_steps, cfg.steps * updates, cfg.min_lr_ratio)
    optimizer = make_optimizer(schedule, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.no_decay, cfg.clip_norm)
    plan = sharding.load_plan(cfg.sharding)
    mesh = sharding.build_mesh(plan, devices)
    state = state_layout(models, s, optimizer, plan, mesh)
    m = cfg.minibatch_size  # checked to divide the plan's batch split
    sequences = sharding.batch_sharding(plan, mesh, (m, cfg.seq_len))
    responses = sharding.batch_sharding(plan, mesh, (m, s.max_new))
    layouts = {  # kind -> shape, dtype, sharding
        "sequence": ((m, cfg.seq_len), jnp.int32, sequences),
        "response": ((m, s.max_new), jnp.float32, responses),
        "row": ((m,), jnp.float32, NamedSharding(mesh, PartitionSpec(responses.spec[0]))),
    }
    minibatch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
        for k, kind in minibatch_keys(s).items()
        for shape, dtype, sh in [layouts[kind]]
    }
    state_sh, mb_sh = shardings_of(state), shardings_of(minibatch)
    chunk_sh = {k: mb_sh[k] for k in SEQUENCE_KEYS}
    score_fn = jax.jit(partial(score, models, s), in_shardings=(state_sh.params, state_sh.frozen, chunk_sh))
    update = jax.jit(
        make_update(models, s, optimizer, schedule),
        in_shardings=(state_sh, mb_sh, NamedSharding(mesh, PartitionSpec())),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.top_k)
    return RLStep(s, models, sampling, optimizer, plan, mesh, state, minibatch, m, updates, score_fn,
                  jax.jit(partial(finish, s)), update)  # fmt: skip
