"""The prompts of an RL run: `{"prompt": "..."}` or `{"messages": [..., user turn]}` lines, laid
out in the tokenizer's chat format (the policy answers as the assistant), all read and checked
before the run writes anything. A prompt is an item of the run's data streams: its tokens
right-padded to the prompt length, their count, and its index (for its text and its file and line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from llama_jax.chat import ChatError, encode_dialog
from llama_jax.documents import expand
from llama_jax.errors import UserError
from llama_jax.prompts import read_prompts
from llama_jax.tokenizer import Tokenizer


@dataclass
class PromptSet:
    train: grain.MapDataset  # of {"tokens": int32 [max_len], "length": int32, "index": int32}
    given: list[Any]  # what each line held: its "prompt" string or "messages" list
    where: list[str]  # "file:line" of each
    max_len: int

    def __len__(self) -> int:
        return len(self.given)


def load_prompt_set(data: str, tokenizer: Tokenizer, max_len: int) -> PromptSet:
    """Every prompt of the files `data` (comma-separated globs); bad lines, an empty prompt and one
    longer than `max_len` tokens are UserErrors naming the file and line."""
    items, given, where = [], [], []
    for path in expand(data):
        for prompt in read_prompts(path):
            at = f"{path}:{prompt.line}"
            try:
                ids = encode_dialog(tokenizer, prompt.dialog)
            except ChatError as e:
                raise UserError(f"{at}: {e}") from None
            if not "".join(m["content"] for m in prompt.dialog).strip():
                raise UserError(f"{at}: empty prompt")
            if len(ids) > max_len:
                raise UserError(f"{at}: {len(ids)} prompt tokens exceed --seq-len minus --max-new-tokens ({max_len})")
            tokens = np.zeros(max_len, np.int32)
            tokens[: len(ids)] = ids
            items.append({"tokens": tokens, "length": np.int32(len(ids)), "index": np.int32(len(given))})
            given.append(prompt.given)
            where.append(at)
    if not items:
        raise UserError(f"--data {data} holds no prompts")
    return PromptSet(grain.MapDataset.source(items), given, where, max_len)
