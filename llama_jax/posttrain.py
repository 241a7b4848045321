"""Post-training data and losses: supervised fine-tuning (SFT) on chat data and direct preference
optimisation (DPO), run by the pre-training loop (`training.py`, `--stage sft|dpo`).

SFT data: JSONL lines `{"messages": [{"role", "content"}, ...]}` in the tokenizer's chat format
(llama_jax.chat); the loss weight is 1 exactly on the assistant turns and the token closing each.
DPO data: `{"prompt": "..."}` or `{"messages": [..., user turn]}`, with "chosen" and "rejected"
responses (a string, or a list of one assistant message); the weight marks the response tokens.

Every example is read, tokenized and checked before a run writes anything, so bad data is
reported with its file and line (or skipped and counted with --skip-bad-examples). Examples are
packed whole into rows of --seq-len tokens (first fit), each with its own segment id and
positions from 0, so no attention crosses examples. A DPO pair is packed as one unit, its chosen
then its rejected sequence: pair k of a row has segments 2k+1 (chosen) and 2k+2 (rejected).

The DPO loss (Rafailov et al., 2023) is -log sigmoid(beta * (log-ratio chosen - log-ratio
rejected)), where a log-ratio is the response's summed log-probability under the policy minus
under the frozen reference (the starting checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.chat import ChatError, encode_dialog_with_mask
from llama_jax.data import DataError, Streams, expand, stream_batches
from llama_jax.lora import LoraConfig
from llama_jax.model import Params
from llama_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama_jax.train_config import TrainConfig

ROLES = ("system", "user", "assistant")
FEATURES = ("tokens", "targets", "loss_mask", "positions", "part")
Example = dict[str, np.ndarray]  # FEATURES, each [length] int32


@dataclass(frozen=True)
class Tuning:
    """What a train step optimises: the stage's loss, over all weights or LoRA adapters only.
    `seed` derives LoRA dropout keys (from the seed and the step, so a resumed run repeats them)."""

    stage: str = "pretrain"
    lora: LoraConfig | None = None
    dpo_beta: float = 0.1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Tuning:
        lora = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) if cfg.lora_rank else None
        return cls(cfg.stage, lora, cfg.dpo_beta, cfg.seed)

    def frozen(self, start: Params) -> Params | None:
        """What the step keeps fixed, from the starting weights: the LoRA base (which is also
        DPO's reference), or DPO's reference; None when nothing is."""
        if self.lora is not None:
            return {"base": start}
        return {"reference": start} if self.stage == "dpo" else None


# -- examples ---------------------------------------------------------------------------------


class BadExample(ValueError):
    """One example that cannot be used; reported with its file and line."""


@dataclass
class Examples:
    train: list[Example]
    eval: list[Example]
    skipped: int
    first_skipped: str  # "file:line: reason" of the first skipped example ("" when none)


def _sequence(ids: list[int], mask: list[int], part: int = 1) -> Example:
    n = len(ids) - 1
    return {
        "tokens": np.asarray(ids[:-1], np.int32),
        "targets": np.asarray(ids[1:], np.int32),
        "loss_mask": np.asarray(mask[1:], np.int32),
        "positions": np.arange(n, dtype=np.int32),
        "part": np.full(n, part, np.int32),
    }


def _check_roles(messages: Any) -> list:
    if not isinstance(messages, list) or not messages:
        raise BadExample("'messages' must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") not in ROLES:
            raise BadExample(f"message {i} has unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
    return messages


def _sft_example(obj: dict, tokenizer: Tokenizer) -> Example:
    if "messages" not in obj:
        raise BadExample("expected {'messages': [...]}")
    ids, mask = encode_dialog_with_mask(tokenizer, _check_roles(obj["messages"]))
    return _sequence(ids, mask)


def _response(value: Any, name: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise BadExample(f"{name!r} must be an assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise BadExample(f"{name!r} must be a string or a list of one assistant message")
    if not value.strip():
        raise BadExample(f"empty {name!r} response")
    return value


def _dpo_example(obj: dict, tokenizer: Tokenizer) -> Example:
    if isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif "messages" in obj:
        messages = _check_roles(obj["messages"])
    else:
        raise BadExample("expected a 'prompt' string or a 'messages' list, with 'chosen' and 'rejected'")
    halves = []
    for part, name in enumerate(("chosen", "rejected"), 1):
        answer = {"role": "assistant", "content": _response(obj.get(name), name)}
        ids, mask = encode_dialog_with_mask(tokenizer, [*messages, answer])
        start = len(mask) - next(i for i, m in enumerate(reversed(mask)) if not m)  # the final answer only
        halves.append(_sequence(ids, [0] * start + [1] * (len(mask) - start), part))
    return {k: np.concatenate([h[k] for h in halves]) for k in FEATURES}


def read_examples(
    paths: Sequence[str], stage: str, tokenizer: Tokenizer, seq_len: int, skip_bad: bool
) -> tuple[list[Example], int, str]:
    """Tokenized examples of JSONL files; a bad one raises DataError naming its file and line,
    or with `skip_bad` is counted. Returns (examples, skipped, first skipped "file:line: why")."""
    encode = {"sft": _sft_example, "dpo": _dpo_example}[stage]
    examples, skipped, first = [], 0, ""
    for path in paths:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    try:
                        obj = json.loads(line)
                    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                        raise BadExample(f"not valid JSON ({getattr(e, 'msg', e)})") from None
                    if not isinstance(obj, dict):
                        raise BadExample("expected a JSON object")
                    example = encode(obj, tokenizer)
                    if len(example["tokens"]) > seq_len:
                        raise BadExample(f"{len(example['tokens'])} tokens exceed --seq-len {seq_len}")
                except (BadExample, ChatError) as e:
                    if not skip_bad:
                        raise DataError(f"{path}:{n}: {e} (or pass --skip-bad-examples)") from None
                    skipped, first = skipped + 1, first or f"{path}:{n}: {e}"
                    continue
                examples.append(example)
    return examples, skipped, first


def load_examples(
    stage: str,
    data: str,
    eval_data: str,
    eval_fraction: float,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    skip_bad: bool = False,
) -> Examples:
    """Training and held-out examples. Without `eval_data`, a seeded `eval_fraction` of the
    examples (at least one) is held out."""
    train, skipped, first = read_examples(expand(data), stage, tokenizer, seq_len, skip_bad)
    if eval_data:
        held_out, more, first_eval = read_examples(expand(eval_data), stage, tokenizer, seq_len, skip_bad)
        skipped, first = skipped + more, first or first_eval
    else:
        if len(train) < 2:
            raise DataError(
                f"need at least two usable examples to hold one out (or pass --eval-data); got {len(train)}"
            )
        order = np.random.default_rng(seed).permutation(len(train))
        count = min(len(train) - 1, max(1, round(eval_fraction * len(train))))
        train, held_out = [train[i] for i in sorted(order[count:])], [train[i] for i in sorted(order[:count])]
    if not train or not held_out:
        raise DataError(f"no usable {'training' if not train else 'held-out'} examples")
    return Examples(train, held_out, skipped, first)


# -- packed batches ---------------------------------------------------------------------------


def _rows(b: dict[str, np.ndarray], parts: int) -> dict[str, np.ndarray]:
    """Packed features -> a model batch: segment ids from the packer's example ids and the part
    (chosen/rejected) within each example; positions restart at every sequence."""
    example = b["tokens_segment_ids"]
    segment_ids = np.where(example > 0, parts * (example - 1) + b["part"], 0).astype(np.int32)
    keys = ("tokens", "targets", "positions", "loss_mask")
    return {**{k: b[k].astype(np.int32) for k in keys}, "segment_ids": segment_ids}


def _packed(ds: grain.IterDataset, stage: str, seq_len: int, batch_size: int, drop_remainder: bool):
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=dict.fromkeys(FEATURES, seq_len), num_packing_bins=batch_size, shuffle_bins=False
    )
    return ds.batch(batch_size, drop_remainder=drop_remainder).map(partial(_rows, parts=2 if stage == "dpo" else 1))


IN_MEMORY = grain.ReadOptions(num_threads=0)  # the examples are tokenized already: no reader threads


def train_batches(
    examples: list[Example],
    stage: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    streams: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Streams:
    """Endless batches of the examples dealt to `streams` data streams (see llama_jax/data.py),
    each reshuffled every epoch; this process's block of rows."""

    def pack(share: grain.MapDataset, rows: int) -> grain.IterDataset:
        return _packed(share.to_iter_dataset(IN_MEMORY), stage, seq_len, rows, drop_remainder=True)

    source = grain.MapDataset.source(examples)
    return stream_batches(source, pack, batch_size, seed, streams, process_index, process_count)


def eval_batches(examples: list[Example], stage: str, seq_len: int, batch_size: int, count: int) -> list[dict]:
    """Up to `count` batches of the held-out examples in order; the last is filled up with
    empty rows (segment 0, no loss)."""
    batches = []
    for b in _packed(grain.MapDataset.source(examples).to_iter_dataset(IN_MEMORY), stage, seq_len, batch_size, False):
        missing = batch_size - len(b["tokens"])
        batches.append({k: np.pad(v, ((0, missing), (0, 0))) for k, v in b.items()})
        if len(batches) == count:
            break
    if not batches:
        raise DataError("no held-out examples")
    return batches


# -- DPO ----------------------------------------------------------------------------------------


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T] values summed per segment: [B, T + 1], column s for segment s (0: padding)."""
    b, t = values.shape
    ids = segment_ids + (t + 1) * jnp.arange(b)[:, None]
    return jax.ops.segment_sum(values.ravel(), ids.ravel(), num_segments=b * (t + 1)).reshape(b, t + 1)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, chosen reward, rejected reward) from summed response log-probabilities; a reward
    is beta * (policy - reference) log-probability."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected


def dpo_sums(
    policy: jax.Array, reference: jax.Array, segment_ids: jax.Array, beta: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(DPO loss summed over the pairs of a packed batch, metric sums with the pair "count").
    policy, reference: [B, T] log-probabilities of the targets, 0 off the responses."""
    pairs = segment_ids.shape[1] // 2

    def chosen_rejected(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        sums = segment_sums(x, segment_ids)
        return sums[:, 1::2][:, :pairs], sums[:, 2::2][:, :pairs]

    present = (chosen_rejected((segment_ids > 0).astype(jnp.float32))[0] > 0).astype(jnp.float32)
    loss, chosen, rejected = dpo_loss(*chosen_rejected(policy), *chosen_rejected(reference), beta)
    margin = chosen - rejected
    sums = {
        "loss": jnp.sum(loss * present),
        "reward_margin": jnp.sum(margin * present),
        "reward_accuracy": jnp.sum((margin > 0) * present),
        "chosen_reward": jnp.sum(chosen * present),
        "rejected_reward": jnp.sum(rejected * present),
        "count": jnp.sum(present),
    }
    return sums["loss"], sums
