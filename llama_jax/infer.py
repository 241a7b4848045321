"""`infer.py` subcommands: score, generate and chat with any checkpoint kind."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import ArgumentParser, UserError, run_cli
from llama_jax.generate import Sampling, generate, stream
from llama_jax.model import Llama, Params
from llama_jax.scoring import score

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass
class Loaded:
    cfg: LlamaConfig
    model: Llama
    params: Params
    tokenizer: Any  # llama_jax.tokenizer.Tokenizer, or None when the checkpoint has none


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load(
    checkpoint: str, dtype: str | None = None, tokenizer: str | None = None, need_tokenizer: bool = False
) -> Loaded:
    """Load any checkpoint `llama-jax-convert` reads (Orbax model or run directory, HF, Meta)."""
    from llama_jax.convert import load_checkpoint
    from llama_jax.tokenizer import TokenizerError, load_tokenizer

    ckpt = load_checkpoint(checkpoint)
    dt = DTYPES[dtype or default_dtype()]
    params = jax.tree.map(lambda a: jnp.asarray(a, dt), ckpt.params)
    tok = None
    where = [tokenizer] if tokenizer else [str(p) for p in ckpt.tokenizer_files] or [checkpoint]
    if tokenizer or ckpt.tokenizer_files or need_tokenizer:
        try:
            tok = load_tokenizer(where[0])
        except TokenizerError as e:
            if need_tokenizer:
                raise UserError(f"no tokenizer found (looked in {', '.join(where)}): {e}") from None
    if tok is not None and tok.vocab_size > ckpt.config.vocab_size:
        raise UserError(
            f"tokenizer vocabulary ({tok.vocab_size}) exceeds the model's embedding ({ckpt.config.vocab_size})"
        )
    model = Llama(ckpt.config, dtype=dt, param_dtype=dt)
    return Loaded(ckpt.config, model, params, tok)


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; malformed lines are user errors."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def write_atomic(path: str | None, lines: list[str]) -> None:
    """Write lines to path via a temporary file renamed at the end (stdout when None)."""
    if path is None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- score -----------------------------------------------------------------------------------
def cmd_score(args: argparse.Namespace) -> None:
    lm = load(args.checkpoint, args.dtype, args.tokenizer)
    sequences = []
    for n, obj in read_jsonl(args.input):
        if "tokens" in obj:
            toks = obj["tokens"]
            if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
                raise UserError(f"{args.input}:{n}: 'tokens' must be a list of integers")
            bad = [t for t in toks if not 0 <= t < lm.cfg.vocab_size]
            if bad:
                raise UserError(f"{args.input}:{n}: token {bad[0]} is outside the vocabulary [0, {lm.cfg.vocab_size})")
        elif isinstance(obj.get("text"), str):
            if lm.tokenizer is None:
                raise UserError(f"{args.input}:{n}: 'text' input needs a tokenizer; none found with the checkpoint")
            toks = lm.tokenizer.encode(obj["text"], bos=True)
        else:
            raise UserError(f"{args.input}:{n}: expected {{'tokens': [...]}} or {{'text': '...'}}")
        if not toks:
            raise UserError(f"{args.input}:{n}: empty sequence")
        if len(toks) > lm.cfg.max_seq_len:
            raise UserError(f"{args.input}:{n}: {len(toks)} tokens exceed the context of {lm.cfg.max_seq_len}")
        sequences.append(toks)
    results = score(lm.model, lm.params, sequences, batch_size=args.batch_size) if sequences else []
    lines = [
        json.dumps({"tokens": toks, "logprobs": lp.tolist(), "sum_logprob": float(np.sum(lp, dtype=np.float64))})
        for toks, lp in zip(sequences, results, strict=True)
    ]
    write_atomic(args.output, lines)


# -- generate / chat -------------------------------------------------------------------------
def sampling_from(args: argparse.Namespace) -> Sampling:
    try:
        return Sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as e:
        raise UserError(str(e)) from None


def encode_prompt(lm: Loaded, prompt: str | None, messages: list | None, chat: bool, system: str | None) -> list[int]:
    from llama_jax.chat import encode_dialog

    if messages is None and chat:
        messages = [{"role": "user", "content": prompt}]
    if messages is not None:
        if system is not None and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        return encode_dialog(lm.tokenizer, messages)
    return lm.tokenizer.encode(prompt, bos=True)


def fit_context(
    lm: Loaded, prompts: list[list[int]], max_new: int, truncate: str | None
) -> tuple[list[list[int]], int]:
    """Check prompt lengths against the context; truncate on the left when asked.
    Returns the prompts and max_new clamped so that prompt + new tokens fit."""
    ctx = lm.cfg.max_seq_len
    if truncate == "left":
        keep = max(ctx - max_new, 1)
        prompts = [p[-keep:] for p in prompts]
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise UserError(f"a prompt of {longest} tokens does not fit the context of {ctx} (use --truncate left)")
    return prompts, min(max_new, ctx - longest)


def cmd_generate(args: argparse.Namespace) -> None:
    sampling = sampling_from(args)
    lm = load(args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True)
    items: list[tuple[Any, list | None]] = []  # (what to echo as "prompt", chat messages)
    if args.prompt_file:
        for n, obj in read_jsonl(args.prompt_file):
            if isinstance(obj.get("prompt"), str):
                items.append((obj["prompt"], None))
            elif isinstance(obj.get("messages"), list):
                items.append((obj["messages"], obj["messages"]))
            else:
                raise UserError(f"{args.prompt_file}:{n}: expected {{'prompt': '...'}} or {{'messages': [...]}}")
    items += [(p, None) for p in args.prompt or []]
    if not items:
        raise UserError("no prompts: give --prompt TEXT or --prompt-file FILE.jsonl")
    try:
        tokens = [encode_prompt(lm, p if m is None else None, m, args.chat, args.system) for p, m in items]
    except ValueError as e:
        raise UserError(str(e)) from None
    tokens, max_new = fit_context(lm, tokens, args.max_new_tokens, args.truncate)
    kw = dict(sampling=sampling, stop_ids=lm.tokenizer.stop_ids, seed=args.seed)
    if args.stream and not args.json:
        for toks in tokens:
            print_stream(lm, stream(lm.model, lm.params, [toks], max_new, **kw))
        return
    completions = generate(lm.model, lm.params, tokens, max_new, **kw)
    for (prompt, _), c in zip(items, completions, strict=True):
        text = lm.tokenizer.decode(c.tokens)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "completion": text,
                        "completion_tokens": c.tokens,
                        "finish_reason": c.finish_reason,
                    }
                ),
                flush=True,
            )
        else:
            print(text, flush=True)


def print_stream(lm: Loaded, steps: Iterator[list[int | None]]) -> list[int]:
    """Print one row's text as it is generated (whole characters only); return its tokens."""
    tokens: list[int] = []
    shown = ""
    for step in steps:
        if step[0] is None:
            break
        tokens.append(step[0])
        text = lm.tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(lm.tokenizer.decode(tokens)[len(shown) :] + "\n")
    sys.stdout.flush()
    return tokens


def cmd_chat(args: argparse.Namespace) -> None:
    from llama_jax.chat import encode_dialog

    sampling = sampling_from(args)
    lm = load(args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt, max_new = fit_context(lm, [encode_dialog(lm.tokenizer, messages)], args.max_new_tokens, "left")
        steps = stream(lm.model, lm.params, prompt, max_new, sampling, lm.tokenizer.stop_ids, args.seed)
        messages.append({"role": "assistant", "content": lm.tokenizer.decode(print_stream(lm, steps))})


# -- command line ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="infer.py", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="Orbax model/run directory, HF or Meta directory")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, else bfloat16")
        p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the checkpoint's)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy")
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--system", default=None, help="system message (chat formats)")

    p = sub.add_parser("score", help="log-probabilities of token sequences")
    common(p)
    p.add_argument("--input", required=True, help='JSONL: {"tokens": [...]} or {"text": "..."} per line')
    p.add_argument("--output", default=None, help="JSONL output (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("generate", help="complete prompts")
    common(p)
    sampling(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help='JSONL: {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--chat", action="store_true", help="wrap --prompt texts in the model's chat format")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("--truncate", choices=["left"], default=None, help="cut over-long prompts on the left")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streams)")
    common(p)
    sampling(p)
    p.set_defaults(func=cmd_chat)
    return ap


def main(argv: list[str] | None = None) -> int:
    def run(argv: list[str]) -> None:
        args = parser().parse_args(argv)
        if getattr(args, "max_new_tokens", 1) < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if getattr(args, "batch_size", 1) < 1:
            raise UserError("--batch-size must be at least 1")
        if not Path(args.checkpoint).exists():
            raise UserError(f"checkpoint not found: {args.checkpoint}")
        args.func(args)

    return run_cli(run, argv)
