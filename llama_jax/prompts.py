"""Prompts for generation: JSONL prompt files, chat formatting, and fitting the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_jax.chat import encode_dialog
from llama_jax.errors import UserError
from llama_jax.jsonl import read_jsonl
from llama_jax.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    given: Any  # what the line held: a "prompt" string or a "messages" list
    messages: list | None  # the dialog, for a "messages" line
    line: int = 0  # line number in the prompt file (0: from the command line)

    @property
    def dialog(self) -> list:
        """The prompt as a dialog: its messages, or a plain prompt as one user turn."""
        return self.messages if self.messages is not None else [{"role": "user", "content": self.given}]


def read_prompts(path: str) -> list[Prompt]:
    """`{"prompt": "..."}` or `{"messages": [...]}` lines."""
    prompts = []
    for n, obj in read_jsonl(path):
        if isinstance(obj.get("prompt"), str):
            prompts.append(Prompt(obj["prompt"], None, n))
        elif isinstance(obj.get("messages"), list):
            prompts.append(Prompt(obj["messages"], obj["messages"], n))
        else:
            raise UserError(f"{path}:{n}: expected {{'prompt': '...'}} or {{'messages': [...]}}")
    return prompts


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, chat: bool, system: str | None) -> list[int]:
    """Token ids of a prompt: its dialog in the chat format (a messages line, or any prompt with
    `chat`; `system` added unless the dialog has one), else the text after BOS."""
    if prompt.messages is None and not chat:
        return tokenizer.encode(prompt.given, bos=True)
    messages = prompt.dialog
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return encode_dialog(tokenizer, messages)


def fit_context(
    max_seq_len: int, prompts: list[list[int]], max_new: int, truncate: str | None
) -> tuple[list[list[int]], int]:
    """Check prompt lengths against the context; truncate on the left when asked.
    Returns the prompts and max_new clamped so that prompt + new tokens fit."""
    if truncate == "left":
        keep = max(max_seq_len - max_new, 1)
        prompts = [p[-keep:] for p in prompts]
    longest = max(len(p) for p in prompts)
    if longest >= max_seq_len:
        raise UserError(f"a prompt of {longest} tokens does not fit the context of {max_seq_len} (use --truncate left)")
    return prompts, min(max_new, max_seq_len - longest)
