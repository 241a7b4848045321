"""`train.py --stage ppo / grpo`: an RL run, as ordinary as every other run.

Its inputs are checked before anything is written (the reward function imports; the reward model is
one, with the policy's tokenizer; every prompt). Then per iteration: a batch of prompts from the run's
data streams, the rollouts (llama_jax/rl/rollout.py), --ppo-epochs passes over them in shuffled
minibatches of --minibatch-size, one optimizer step each; a metrics line; on schedule a checkpoint
(policy, value, optimizer state, the data streams' position, the RNG), and on SIGTERM one and a stop.
A killed run resumes from its last checkpoint and repeats what the uninterrupted run did.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from llama_jax import batches, hosts, lora, run_dir, sharding
from llama_jax.convert import open_checkpoint, read_checkpoint
from llama_jax.convert.source import Source
from llama_jax.errors import UserError
from llama_jax.model import with_head
from llama_jax.rewards import Reward, load_reward
from llama_jax.rl.rollout import Rewarder, Rollouts, collect
from llama_jax.rl.setup import RLStep, build
from llama_jax.step import TrainState, shardings_of
from llama_jax.tokenizer import load_tokenizer
from llama_jax.train_config import TrainConfig

UPDATE_METRICS = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "kl_estimate", "grad_norm")


def train_rl(cfg: TrainConfig) -> None:
    """Run, or resume, the PPO or GRPO training that `cfg` describes."""
    function, reward_model = reward_inputs(cfg)
    run = run_dir.prepare(cfg)
    step = build(cfg, run.model_cfg, reward_model.config if reward_model else None)
    print(f"sharding plan {step.plan.name}: mesh {dict(step.mesh.shape)} over {jax.device_count()} devices")
    rows = cfg.batch_size // (cfg.group_size if cfg.stage == "grpo" else 1)  # prompts per iteration
    processes = (jax.process_index(), jax.process_count())
    pack = batches.prompts_packer()
    stream = batches.train_batches(run.items.train, pack, rows, cfg.seed, cfg.data_streams, *processes)
    parts = {"policy": "params" if step.settings.lora is None else "adapters"}
    parts |= {"value": "value"} if step.settings.ppo else {}
    checkpoints, rng = run_dir.Checkpoints(run.out, cfg.keep, parts=parts), jax.random.key(cfg.seed)
    with sharding.activate(step.plan, step.mesh):
        state, start = start_state(step, cfg, run.init, reward_model, checkpoints, stream, rng)
    tokenizer = load_tokenizer(run.tokenizer)
    rewarder = Rewarder(function, cfg.reward or cfg.reward_model, run.items, tokenizer)
    sampling = replace(step.sampling, vocab_limit=tokenizer.vocab_size)
    log, preemption = run_dir.MetricsLog(run.out, start), run_dir.Preemption()
    print(f"{len(run.items)} prompts; {cfg.batch_size} rollouts of up to {cfg.max_new_tokens} tokens per iteration")
    with sharding.activate(step.plan, step.mesh):
        try:
            for n in range(start + 1, cfg.steps + 1):
                prompts = {k: hosts.global_rows(v) for k, v in next(stream).items()}
                rollouts = collect(step, state, prompts, n, rewarder, sampling)
                state, metrics = optimize(step, state, rollouts, n, checkpoints)
                log.write(n, metrics)
                tqdm.write(" | ".join([f"iteration {n:5d}"] + [f"{k} {v:.4g}" for k, v in metrics.items()]))
                if n % cfg.save_every == 0 or n == cfg.steps or preemption.requested:
                    checkpoints.save(state, stream, rng)
                checkpoints.report(wait=preemption.requested)
                if preemption.requested:
                    print(f"SIGTERM: stopped after saving step {n}")
                    return
        finally:
            preemption.restore()
            checkpoints.close()
            log.close()
            stream.close()
    if cfg.sample_tokens:
        run_dir.sample(cfg, run)


def reward_inputs(cfg: TrainConfig) -> tuple[Reward | None, Source | None]:
    """(the reward function, or the reward model's open checkpoint), checked: the model must have a
    score head and the policy's tokenizer, since it scores the policy's tokens."""
    if cfg.reward:
        return load_reward(cfg.reward), None
    model = open_checkpoint(cfg.reward_model)
    if model.config.head != "score":
        raise UserError(f"--reward-model {cfg.reward_model} is not a reward model (train one with --stage reward)")
    policy = [Path(cfg.tokenizer)] if cfg.tokenizer else open_checkpoint(cfg.init_from).tokenizer_files
    ours, theirs = (next((f for f in files if f.name in ("tokenizer.model", "tokenizer.json")), None)
                    for files in (policy, model.tokenizer_files))  # fmt: skip
    if ours is not None and ours.is_dir():
        ours = run_dir.tokenizer_in(ours)
    if theirs is None or ours is None or theirs.read_bytes() != ours.read_bytes():
        raise UserError(
            f"the reward model {cfg.reward_model} does not have the policy's tokenizer "
            f"({ours or 'none found'}): it would score other tokens than the policy samples"
        )
    return None, model


def start_state(
    step: RLStep, cfg: TrainConfig, init: Source, reward_model: Source | None, checkpoints, stream, rng
) -> tuple[TrainState, int]:
    """(the state to train from, its iteration): the latest checkpoint, else the policy from
    --init-from and the value from the reward model or the policy (fresh adapters with LoRA); plus
    the frozen reference (or LoRA base) and reward model, read again on every start."""
    s, sh = step.settings, shardings_of(step.state)
    start = checkpoints.latest_step() or 0
    dtype = step.models.policy.dtype
    policy = read_checkpoint(init, dtype if s.lora or start else np.float32).params
    rm = read_checkpoint(reward_model, dtype).params if reward_model else None
    frozen = {"base" if s.lora else "reference": jax.tree.map(lambda x: x.astype(dtype), policy)}
    frozen |= {"reward": rm} if rm is not None else {}
    if start:
        state = checkpoints.restore(start, step.state, stream)
        print(f"resumed from the checkpoint at step {start}")
    else:
        params = sharding.put(initial_params(step, policy, reward_model, rng), sh.params)
        opt_state = jax.jit(step.optimizer.init, out_shardings=sh.opt_state)(params)
        state = TrainState(sharding.put(np.int32(0), sh.step), params, opt_state)
        print(f"starting from the weights of {init.path}" + (f", rank-{s.lora.rank} LoRA adapters" if s.lora else ""))
    return state.replace(frozen=sharding.put(frozen, sh.frozen)), start


def initial_params(step: RLStep, policy, reward_model: Source | None, rng) -> dict:
    """What an RL run trains, at its start (host arrays): see setup's module docstring."""
    s, value = step.settings, step.models.value
    if s.lora is not None:
        trained = {"policy": lora.init_adapters(step.models.policy.cfg, s.lora, jax.random.fold_in(rng, 0))}
        if s.ppo:
            trained["value"] = lora.init_adapters(value.cfg, s.lora, jax.random.fold_in(rng, 1))
            if s.value_from == "reward":  # the reward model's head, on its own (frozen) weights
                head = read_checkpoint(reward_model, np.float32).params["score"]
                trained["value"]["score"] = head
        return trained
    trained = {"policy": policy}
    if s.ppo and s.value_from == "reward":
        trained["value"] = read_checkpoint(reward_model, np.float32).params
    elif s.ppo:
        trained["value"] = with_head(policy, value.cfg, jax.random.fold_in(rng, 2))
    return trained


def optimize(step: RLStep, state: TrainState, rollouts: Rollouts, n: int, checkpoints) -> tuple[TrainState, dict]:
    """--ppo-epochs passes over the rollouts, each in a new random order of minibatches, one
    optimizer step per minibatch; the iteration's metrics (update metrics averaged over its steps)."""
    arrays = rollouts.arrays
    rows = len(arrays["mask"])
    order = np.random.default_rng([step.settings.seed, n, 1])
    sh = shardings_of(step.minibatch)
    results = []
    for _ in range(step.settings.ppo_epochs):
        permutation = order.permutation(rows)
        for c in range(0, rows, step.rows):
            minibatch = sharding.put({k: v[permutation[c : c + step.rows]] for k, v in arrays.items()}, sh)
            index = np.int32((n - 1) * step.updates_per_iteration + len(results))
            state, metrics = step.update(state, minibatch, index)
            results.append(jax.device_get(metrics))
    means = {k: float(np.mean([r[k] for r in results])) for k in UPDATE_METRICS if k in results[0]}
    if not all(math.isfinite(v) for v in means.values()):
        last = checkpoints.latest_step()
        raise run_dir.Diverged(f"non-finite update at iteration {n} ({means}); the last good checkpoint is {last}")
    state = state.replace(step=sharding.put(np.int32(n), state.step.sharding))
    return state, rollouts.metrics | means | {"lr": float(results[-1]["lr"])}
