"""A batch of rollouts, on the host side: prompts -> responses sampled by the policy with the project's
on-device generation (`generate.prefill` and `generate.decode`, a chunk of rows at a time) ->
rewards (the reward model's, in `RLStep.score`, or the user's function on the decoded text) -> the
arrays the optimizer steps read.

A rollout is one sequence of `prompt_len + max_new` tokens: the prompt left-padded to `prompt_len`
(so every response starts at the same position), then the response up to and including its stop
token, then padding (segment 0). Each row samples from its own key, drawn from the run's seed and
the iteration: a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import generate, lora
from llama_jax.hosts import to_host
from llama_jax.rewards import call_reward
from llama_jax.rl.prompts import PromptSet
from llama_jax.rl.setup import SEQUENCE_KEYS, RLStep, minibatch_keys, policy_params
from llama_jax.step import TrainState
from llama_jax.tokenizer import Tokenizer


@dataclass
class Rewarder:
    """What scores a response: the reward model (inside `RLStep.score`) or a function."""

    function: Callable | None  # FUNCTION(prompt, completion) -> float, or None: the reward model
    spec: str  # --reward MODULE:FUNCTION or --reward-model CHECKPOINT, for error lines
    prompts: PromptSet
    tokenizer: Tokenizer


@dataclass
class Rollouts:
    arrays: dict[str, np.ndarray]  # every minibatch array (setup.minibatch_keys) of the whole batch
    metrics: dict[str, float]


def row_seeds(seed: int, iteration: int, rows: int) -> np.ndarray:
    """A 32-bit sampling seed per row of an iteration's batch."""
    return np.random.default_rng([seed, iteration]).integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32)


def sample_responses(step: RLStep, state: TrainState, tokens: np.ndarray, pad: np.ndarray, seeds: np.ndarray, sampling,
           stop_ids: jax.Array) -> np.ndarray:  # fmt: skip
    """Responses [B, max_new] to left-padded prompts [B, prompt_len], `step.rows` rows at a time."""
    s, model = step.settings, step.models.policy
    params = policy_params(s, state.params, state.frozen)
    out = []
    for c in range(0, len(tokens), step.rows):
        rows = slice(c, c + step.rows)
        cache = dict(cache_len=s.prompt_len + s.max_new, cache_dtype=model.dtype)
        lengths, done = jnp.asarray(s.prompt_len - pad[rows]), jnp.zeros(len(pad[rows]), bool)
        with lora.intercept(s.lora):  # traced with the adapters: the policy samples
            prompt = (tokens[rows], pad[rows], seeds[rows])
            first, kv, keys = generate.prefill(model, params, *prompt, sampling=sampling, **cache)
            args = (first, kv, lengths, keys, done, stop_ids)
            responses = generate.decode(model, params, *args, sampling=sampling, max_new=s.max_new)
        out.append(to_host(responses))
    return np.concatenate(out)


def sequences(step: RLStep, prompts: np.ndarray, pad: np.ndarray, responses: np.ndarray, stop_ids) -> dict:
    """The rollouts' sequences (tokens, positions, segment_ids [B, T]) and response mask [B, N] from
    left-padded prompts [B, P]: each response runs to its first stop token, included; what was
    sampled after it is padding."""
    p, n = step.settings.prompt_len, step.settings.max_new
    stops = np.isin(responses, stop_ids)
    length = np.where(stops.any(axis=1), stops.argmax(axis=1) + 1, n)
    mask = (np.arange(n) < length[:, None]).astype(np.float32)
    tokens = np.concatenate([prompts, np.where(mask > 0, responses, 0)], axis=1).astype(np.int32)
    index = np.arange(p + n)[None]
    segment_ids = ((index >= pad[:, None]) & (index < p + length[:, None])).astype(np.int32)
    positions = np.maximum(index - pad[:, None], 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "mask": mask}


def left_padded(prompts: dict[str, np.ndarray]) -> np.ndarray:
    """Right-padded prompt tokens [B, P] moved to the right end of their rows."""
    out = np.zeros_like(prompts["tokens"])
    for row, (tokens, n) in enumerate(zip(prompts["tokens"], prompts["length"], strict=True)):
        out[row, out.shape[1] - n :] = tokens[:n]
    return out


def function_scores(rewarder: Rewarder, prompts: dict[str, np.ndarray], responses: np.ndarray, mask: np.ndarray,
                    stop_ids) -> np.ndarray:  # fmt: skip
    """The reward function's score of each decoded response (its stop token left out)."""
    out = []
    for index, row, keep in zip(prompts["index"], responses, mask > 0, strict=True):
        ids = [t for t in row[keep].tolist() if t not in stop_ids]
        where = f"--reward {rewarder.spec} on the prompt at {rewarder.prompts.where[index]}"
        out.append(call_reward(rewarder.function, rewarder.prompts.given[index], rewarder.tokenizer.decode(ids), where))
    return np.asarray(out, np.float32)


def collect(step: RLStep, state: TrainState, prompts: dict[str, np.ndarray], iteration: int, rewarder: Rewarder,
            sampling) -> Rollouts:  # fmt: skip
    """One iteration's rollouts of `prompts` (every row of the batch, on every process), scored."""
    s = step.settings
    if s.stage == "grpo":  # G completions of each prompt, in consecutive rows
        prompts = {k: np.repeat(v, s.group_size, axis=0) for k, v in prompts.items()}
    stop_ids = list(rewarder.tokenizer.stop_ids)
    pad = (s.prompt_len - prompts["length"]).astype(np.int32)
    seeds = row_seeds(s.seed, iteration, len(pad))
    tokens = left_padded(prompts)
    responses = sample_responses(step, state, tokens, pad, seeds, sampling, jnp.asarray(stop_ids, jnp.int32))
    batch = sequences(step, tokens, pad, responses, stop_ids)
    chunks = []
    for c in range(0, len(pad), step.rows):
        chunk = {k: batch[k][c : c + step.rows] for k in SEQUENCE_KEYS}
        chunks.append(jax.device_get(step.score(state.params, state.frozen, chunk)))
    rollout = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} | {"mask": batch["mask"]}
    if rewarder.function is not None:
        rollout["score"] = function_scores(rewarder, prompts, responses, batch["mask"], set(stop_ids))
    finished = jax.device_get(step.finish({k: jnp.asarray(v) for k, v in rollout.items()}))
    arrays = batch | {"old_logp": rollout["logp"], "advantages": finished["advantages"]}
    arrays |= {"old_values": rollout.get("values"), "returns": finished.get("returns"), "ref_logp": rollout["ref_logp"]}
    arrays = {k: np.asarray(arrays[k]) for k in minibatch_keys(s)}
    mask = batch["mask"]
    metrics = {
        "reward": float(np.mean(rollout["score"])),
        "kl": float(np.mean(finished["kl"])),
        "entropy": float(np.sum(rollout["entropy"] * mask) / np.sum(mask)),
        "response_length": float(np.mean(mask.sum(axis=1))),
    }
    if s.ppo:
        metrics["explained_variance"] = float(finished["explained_variance"])
    else:  # how much the G completions of a prompt differ in reward
        metrics["reward_std"] = float(np.mean(rollout["score"].reshape(-1, s.group_size).std(axis=1)))
    return Rollouts(arrays, metrics)
