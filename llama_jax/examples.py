"""Fine-tuning examples: chat and preference JSONL -> tokenized, checked examples.

SFT: `{"messages": [{"role", "content"}, ...]}` in the tokenizer's chat format (llama_jax/chat.py);
the loss weight is 1 exactly on the assistant turns and the token closing each. DPO: `{"prompt":
"..."}` or `{"messages": [..., user turn]}`, with "chosen" and "rejected" responses (a string, or
a list of one assistant message); the weight marks the response tokens; a pair is one example,
its chosen then its rejected sequence (`part` 1 and 2).

Every example is read, tokenized and checked before a run writes anything, so bad data is reported
with its file and line (or skipped and counted with --skip-bad-examples).
"""

from __future__ import annotations

import json
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


def _dpo_example(obj: dict, tokenizer: Tokenizer) -> Example:
    if isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif "messages" in obj:
        messages = obj["messages"]
        check_dialog(messages, last="user")
    else:
        raise BadExample("expected a 'prompt' string or a 'messages' list, with 'chosen' and 'rejected'")
    halves = []
    for part, name in enumerate(("chosen", "rejected"), 1):
        answer = {"role": "assistant", "content": _response(obj.get(name), name)}
        ids, mask = encode_dialog_with_mask(tokenizer, [*messages, answer])
        start = len(mask) - next(i for i, m in enumerate(reversed(mask)) if not m)  # the final answer only
        halves.append(_sequence(ids, [0] * start + [1] * (len(mask) - start), part))
    return {k: np.concatenate([h[k] for h in halves]) for k in EXAMPLE_FEATURES}


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
        if not train or not held_out:
            raise DataError(f"no usable {'training' if not train else 'held-out'} examples")
        return Examples(grain.MapDataset.source(train), grain.MapDataset.source(held_out), skipped, first)
    return Examples(*hold_out(grain.MapDataset.source(train), eval_fraction, seed, "usable examples"), skipped, first)
