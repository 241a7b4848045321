"""Fine-tuning examples: chat and preference JSONL -> tokenized, checked examples.

SFT: `{"messages": [{"role", "content"}, ...]}` in the tokenizer's chat format (llama_jax/chat.py);
the loss weight is 1 exactly on the assistant turns and the token closing each. DPO: `{"prompt":
"..."}` or `{"messages": [..., user turn]}`, with "chosen" and "rejected" responses (a string, or
a list of one assistant message); the weight marks the response tokens; a pair is one example,
its chosen then its rejected sequence (`part` 1 and 2). Reward: the same pairs with an optional
"margin" (how strongly the chosen one is preferred); each sequence is the whole dialog, its tokens
not shifted, `loss_mask` 1 on its last token (where the reward is read).

Every example is read, tokenized and checked before a run writes anything, so bad data is reported
with its file and line (or skipped and counted with --skip-bad-examples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from llama_jax.batches import EXAMPLE_FEATURES
from llama_jax.chat import ChatError, check_dialog, encode_dialog_with_mask
from llama_jax.documents import DataError, expand, hold_out
from llama_jax.tokenizer import Tokenizer

Example = dict[str, np.ndarray]  # EXAMPLE_FEATURES, each [length] int32


class BadExample(ValueError):
    """One example that cannot be used; reported with its file and line."""


@dataclass
class Examples:
    train: grain.MapDataset  # of Example
    eval: grain.MapDataset
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


def _sft_example(obj: dict, tokenizer: Tokenizer) -> Example:
    if "messages" not in obj:
        raise BadExample("expected {'messages': [...]}")
    ids, mask = encode_dialog_with_mask(tokenizer, obj["messages"])
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


def encode_response(tokenizer: Tokenizer, obj: dict, name: str) -> tuple[list[int], list[int]]:
    """(ids, mask of the final answer) of the dialog of a line's "prompt" or "messages" answered by
    its response `name`, laid out in the chat format: what DPO and the reward model train on."""
    if isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif "messages" in obj:
        messages = obj["messages"]
        check_dialog(messages, last="user")
    else:
        raise BadExample(f"expected a 'prompt' string or a 'messages' list, with {name!r}")
    answer = {"role": "assistant", "content": _response(obj.get(name), name)}
    ids, mask = encode_dialog_with_mask(tokenizer, [*messages, answer])
    start = len(mask) - next(i for i, m in enumerate(reversed(mask)) if not m)  # the final answer only
    return ids, [0] * start + [1] * (len(mask) - start)


def _pair(obj: dict, tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, mask of the final answer) of the chosen and the rejected dialog of a preference line."""
    if not isinstance(obj.get("prompt"), str) and "messages" not in obj:
        raise BadExample("expected a 'prompt' string or a 'messages' list, with 'chosen' and 'rejected'")
    return [encode_response(tokenizer, obj, name) for name in ("chosen", "rejected")]


def _dpo_example(obj: dict, tokenizer: Tokenizer) -> Example:
    halves = [_sequence(ids, mask, part) for part, (ids, mask) in enumerate(_pair(obj, tokenizer), 1)]
    return {k: np.concatenate([h[k] for h in halves]) for k in EXAMPLE_FEATURES}


def _reward_example(obj: dict, tokenizer: Tokenizer) -> Example:
    """A pair for the reward model: each whole dialog as its tokens (the score is read at the last
    one, marked by loss_mask), and the pair's margin on every token."""
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise BadExample(f"'margin' must be a finite number, got {margin!r}")
    halves = []
    for part, (ids, _) in enumerate(_pair(obj, tokenizer), 1):
        n = len(ids)
        last = np.zeros(n, np.int32)
        last[-1] = 1
        tokens = np.asarray(ids, np.int32)
        features = (tokens, tokens, last, np.arange(n, dtype=np.int32), np.full(n, part, np.int32))
        halves.append({**dict(zip(EXAMPLE_FEATURES, features, strict=True)), "margin": np.full(n, margin, np.float32)})
    return {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}


def read_examples(
    paths: Sequence[str], stage: str, tokenizer: Tokenizer, seq_len: int, skip_bad: bool
) -> tuple[list[Example], int, str]:
    """Tokenized examples of JSONL files; a bad one raises DataError naming its file and line,
    or with `skip_bad` is counted. Returns (examples, skipped, first skipped "file:line: why")."""
    encode = {"sft": _sft_example, "dpo": _dpo_example, "reward": _reward_example}[stage]
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
        if not train or not held_out:
            raise DataError(f"no usable {'training' if not train else 'held-out'} examples")
        return Examples(grain.MapDataset.source(train), grain.MapDataset.source(held_out), skipped, first)
    return Examples(*hold_out(grain.MapDataset.source(train), eval_fraction, seed, "usable examples"), skipped, first)
