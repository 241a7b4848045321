"""Chat prompts laid out as Meta's reference code does, for Llama 2 (`[INST]`, `<<SYS>>`) and
Llama 3 (header tokens, `<|eot_id|>`); the tokenizer's `chat_format` picks the layout.

A dialog is a list of {"role", "content"} dicts: an optional "system" message first, then
"user" and "assistant" turns alternating, starting with "user"."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from llama_jax.tokenizer import Tokenizer

Message = Mapping[str, str]
# Pieces of a dialog's tokens, each marked True when it is assistant content the model learns.
Segments = list[tuple[list[int], bool]]

ROLES = ("system", "user", "assistant")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class ChatError(ValueError):
    """A dialog that the chat format cannot lay out."""


def encode_dialog(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a dialog.

    With `add_generation_prompt` the dialog must end with a user turn and the ids end where the
    assistant's answer begins (a prompt for generation); without, it must end with an assistant turn."""
    return _encode(tokenizer, messages, add_generation_prompt)[0]


def encode_dialog_with_mask(tokenizer: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a finished dialog (ending with an assistant turn) for supervised
    fine-tuning: the mask is 1 on the assistant turns' tokens and the token closing each of them
    (EOS for Llama 2, <|eot_id|> for Llama 3), 0 elsewhere. The ids equal
    `encode_dialog(tokenizer, messages, add_generation_prompt=False)`."""
    return _encode(tokenizer, messages, add_generation_prompt=False)


def _encode(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    layout = _LAYOUTS.get(tokenizer.chat_format)
    if layout is None:
        raise ChatError(f"the tokenizer has no known chat format (chat_format={tokenizer.chat_format!r})")
    check_dialog(messages, last="user" if add_generation_prompt else "assistant")
    segments = layout(tokenizer, list(messages), add_generation_prompt)
    ids = [i for piece, _ in segments for i in piece]
    mask = [int(learned) for piece, learned in segments for _ in piece]
    return ids, mask


def check_dialog(messages: Sequence[Message], last: str) -> None:
    """Raise ChatError unless `messages` is a dialog the formats lay out, ending with a `last` turn."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatError("'messages' must be a list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ChatError(f"message {i} is not a dict with a string 'content': {message!r}")
    roles = [message.get("role") for message in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = [("user", "assistant")[i % 2] for i in range(len(turns))]
    if turns != expected:
        unknown = next((f"message {i} has unknown role {r!r}; " for i, r in enumerate(roles) if r not in ROLES), "")
        raise ChatError(
            f"{unknown}roles must be an optional 'system' first, then 'user' and 'assistant' alternating from "
            f"'user'; got {roles}"
        )
    if not turns or turns[-1] != last:
        raise ChatError(f"the last message must be from {last!r} here; got roles {roles}")


def _llama2(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> Segments:
    """Meta's Llama 2 `chat_completion`: the system text goes into the first user message; each
    finished (user, answer) pair is one BOS...EOS sequence, the last user turn a BOS sequence."""
    if messages[0]["role"] == "system":
        merged = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
        messages = [{"role": "user", "content": merged}, *messages[2:]]
    segments: Segments = []
    for user, answer in zip(messages[::2], messages[1::2], strict=False):
        prompt = f"{B_INST} {user['content'].strip()} {E_INST}"
        ids = tokenizer.encode(f"{prompt} {answer['content'].strip()} ", bos=True, eos=True)
        # The pair is encoded as one text (as Meta does); the answer starts after the tokens it
        # shares with the prompt alone.
        split = _common_prefix_len(ids, tokenizer.encode(prompt, bos=True))
        segments += [(ids[:split], False), (ids[split:], True)]
    if add_generation_prompt:
        segments.append((tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True), False))
    return segments


def _llama3(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> Segments:
    """Meta's Llama 3 `ChatFormat.encode_dialog_prompt` (contents stripped, as in Llama 3.0)."""

    def header(role: str) -> list[int]:
        start, end = tokenizer.special("<|start_header_id|>"), tokenizer.special("<|end_header_id|>")
        return [start, *tokenizer.encode(role), end, *tokenizer.encode("\n\n")]

    eot = tokenizer.special("<|eot_id|>")
    segments: Segments = [([tokenizer.bos_id], False)]
    for message in messages:
        segments.append((header(message["role"]), False))
        segments.append(([*tokenizer.encode(message["content"].strip()), eot], message["role"] == "assistant"))
    if add_generation_prompt:
        segments.append((header("assistant"), False))
    return segments


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


_LAYOUTS: dict[str | None, Callable[[Tokenizer, list[Message], bool], Segments]] = {
    "llama2": _llama2,
    "llama3": _llama3,
}
