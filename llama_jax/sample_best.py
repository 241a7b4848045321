"""`infer.py sample-best`: rejection sampling, the best of K completions per prompt as SFT data.

Each line of --prompts is `{"prompt": "..."}` or `{"messages": [..., user turn]}`. K completions
are sampled in the model's chat format (each row has its own seed, so the K differ), each is
scored by the user's reward function, and the best becomes one SFT example:
`{"messages": [...prompt messages, {"role": "assistant", "content": best}], "reward": r}`,
which `train.py --stage sft` reads (extra keys are ignored).

--reward MODULE:FUNCTION names an importable module (the working directory is on the path) or a
.py file, and a function called as FUNCTION(prompt, completion) -> float: `prompt` is the
line's "prompt" string or "messages" list, `completion` the generated text. Completions cut off
by --max-new-tokens are not candidates unless --keep-truncated; a prompt left without a
candidate, or whose best reward is below --min-reward, is dropped and counted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from numbers import Real
from pathlib import Path
from typing import Any

import jax

from llama_jax import sharding
from llama_jax.chat import ChatError, encode_dialog
from llama_jax.errors import UserError
from llama_jax.generate import Completion, Sampling, generate
from llama_jax.jsonl import write_atomic
from llama_jax.load import load
from llama_jax.prompts import fit_context, read_prompts

Reward = Callable[[Any, str], float]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help='JSONL: {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--num-samples", type=int, default=4, metavar="K", help="completions per prompt (default: 4)")
    reward_help = "FUNCTION(prompt, completion) -> float, in an importable MODULE or a FILE.py"
    p.add_argument("--reward", required=True, metavar="MODULE:FUNCTION", help=reward_help)
    p.add_argument("--output", default=None, help="SFT JSONL to write (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="completions generated together (default: 32)")
    p.add_argument("--min-reward", type=float, default=None, help="drop prompts whose best reward is lower")
    p.add_argument("--keep-truncated", action="store_true", help="let completions cut off by the length limit win")
    p.set_defaults(func=run)


def load_reward(spec: str) -> Reward:
    """The function named by MODULE:FUNCTION, MODULE importable or a path to a .py file."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise UserError(f"--reward must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise UserError(f"--reward {spec}: no file {module_name}")
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # anything the user's module raises while importing
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {module_name} has no function {name!r}")
    return function


def score(reward: Reward, prompt: Any, completion: str, where: str) -> float:
    try:
        value = reward(prompt, completion)
    except Exception as e:
        raise UserError(f"{where}: the reward function raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise UserError(f"{where}: the reward function returned {value!r}, not a number")
    return float(value)


def best_of(
    reward: Reward, prompt: Any, completions: list[str], finished: list[bool], where: str, keep_truncated: bool
) -> tuple[float, str] | None:
    """(reward, completion) of the best candidate (the first of equals), or None without one."""
    candidates = [c for c, f in zip(completions, finished, strict=True) if f or keep_truncated]
    scored = [(score(reward, prompt, c, where), c) for c in candidates]
    return max(scored, key=lambda rc: rc[0]) if scored else None


def run(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    reward = load_reward(args.reward)  # before the model: a bad --reward fails fast
    prompts = read_prompts(args.prompts)
    if not prompts:
        raise UserError(f"{args.prompts} holds no prompts")

    sampling = Sampling(args.temperature, args.top_p, args.top_k)  # bad values fail before loading
    lm = load(args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding)
    sampling = replace(sampling, vocab_limit=lm.tokenizer.vocab_size)
    tokens = []
    for prompt in prompts:
        try:
            tokens.append(encode_dialog(lm.tokenizer, prompt.dialog))
        except ChatError as e:
            raise UserError(f"{args.prompts}:{prompt.line}: {e}") from None
    tokens, max_new = fit_context(lm.cfg.max_seq_len, tokens, args.max_new_tokens, None)
    k = args.num_samples
    per_batch = max(1, args.batch_size // k)  # whole prompts per batch: a prompt's K rows get distinct seeds
    completions: list[Completion] = []
    kw = dict(sampling=sampling, stop_ids=lm.tokenizer.stop_ids, seed=args.seed, batch_multiple=lm.batch_multiple)
    with sharding.activate(lm.plan, lm.mesh):
        for start in range(0, len(tokens), per_batch):
            rows = [t for t in tokens[start : start + per_batch] for _ in range(k)]
            completions += generate(lm.model, lm.params, rows, max_new, **kw)

    lines, dropped = [], 0
    for i, prompt in enumerate(prompts):
        group = completions[i * k : (i + 1) * k]
        texts = [lm.tokenizer.decode(c.tokens) for c in group]
        finished = [c.finish_reason == "stop" for c in group]
        best = best_of(reward, prompt.given, texts, finished, f"{args.prompts}:{prompt.line}", args.keep_truncated)
        if best is None or (args.min_reward is not None and best[0] < args.min_reward):
            dropped += 1
            continue
        answer = {"role": "assistant", "content": best[1]}
        lines.append(json.dumps({"messages": [*prompt.dialog, answer], "reward": best[0]}))
    if jax.process_index() == 0:
        write_atomic(args.output, lines)
        print(
            f"sample-best: {len(lines)} of {len(prompts)} prompts written ({dropped} dropped: no finished completion "
            f"or below --min-reward), {k} completions each",
            file=sys.stderr,
        )
