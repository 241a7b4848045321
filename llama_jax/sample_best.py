"""`infer.py sample-best`: rejection sampling, the best of K completions per prompt as SFT data.

Each line of --prompts is `{"prompt": "..."}` or `{"messages": [..., user turn]}`. K completions
are sampled in the model's chat format (each row has its own seed, so the K differ), each is
scored, and the best becomes one SFT example:
`{"messages": [...prompt messages, {"role": "assistant", "content": best}], "reward": r}`,
which `train.py --stage sft` reads (extra keys are ignored).

The score is the user's --reward MODULE:FUNCTION (an importable module, the working directory on
the path, or a .py file; see llama_jax/rewards.py), or a --reward-model: a checkpoint trained with
`train.py --stage reward`, which scores each dialog in its own tokenizer's chat format. Completions
cut off by --max-new-tokens are not candidates unless --keep-truncated; a prompt left without a
candidate, or whose best reward is below --min-reward, is dropped and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import jax

from llama_jax import sharding
from llama_jax.chat import ChatError, encode_dialog
from llama_jax.errors import UserError
from llama_jax.generate import Completion, Sampling, generate
from llama_jax.jsonl import write_atomic
from llama_jax.load import load
from llama_jax.prompts import Prompt, fit_context, read_prompts
from llama_jax.rewards import call_reward, load_reward, load_reward_model, score_dialogs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help='JSONL: {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--num-samples", type=int, default=4, metavar="K", help="completions per prompt (default: 4)")
    reward_help = "FUNCTION(prompt, completion) -> float, in an importable MODULE or a FILE.py"
    ranker = p.add_mutually_exclusive_group(required=True)
    ranker.add_argument("--reward", metavar="MODULE:FUNCTION", help=reward_help)
    ranker.add_argument("--reward-model", metavar="CHECKPOINT", help="a reward model (train.py --stage reward)")
    p.add_argument("--output", default=None, help="SFT JSONL to write (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="completions generated together (default: 32)")
    p.add_argument("--min-reward", type=float, default=None, help="drop prompts whose best reward is lower")
    p.add_argument("--keep-truncated", action="store_true", help="let completions cut off by the length limit win")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    reward = load_reward(args.reward) if args.reward else None  # before the model: a bad --reward fails fast
    prompts = read_prompts(args.prompts)
    if not prompts:
        raise UserError(f"{args.prompts} holds no prompts")

    sampling = Sampling(args.temperature, args.top_p, args.top_k)  # bad values fail before loading
    lm = load(args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding, head="lm")
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

    # The candidates: (prompt index, text) of every completion that may win.
    texts = [lm.tokenizer.decode(c.tokens) for c in completions]
    candidates = [
        (i // k, text)
        for i, (c, text) in enumerate(zip(completions, texts, strict=True))
        if c.finish_reason == "stop" or args.keep_truncated
    ]
    del lm  # the reward model may need the memory
    scores = rank(args, reward, prompts, candidates)
    best: dict[int, tuple[float, str]] = {}
    for (i, text), value in zip(candidates, scores, strict=True):
        if i not in best or value > best[i][0]:  # the first of equals
            best[i] = (value, text)
    lines = []
    for i, prompt in enumerate(prompts):
        if i in best and (args.min_reward is None or best[i][0] >= args.min_reward):
            answer = {"role": "assistant", "content": best[i][1]}
            lines.append(json.dumps({"messages": [*prompt.dialog, answer], "reward": best[i][0]}))
    if jax.process_index() == 0:
        write_atomic(args.output, lines)
        print(
            f"sample-best: {len(lines)} of {len(prompts)} prompts written ({len(prompts) - len(lines)} dropped: no "
            f"finished completion or below --min-reward), {k} completions each",
            file=sys.stderr,
        )


def rank(args: argparse.Namespace, reward, prompts: list[Prompt], candidates: list[tuple[int, str]]) -> list[float]:
    """The reward of each candidate (prompt index, completion text): the function's, or the reward model's."""
    where = [f"{args.prompts}:{prompts[i].line}" for i, _ in candidates]
    if reward is not None:
        pairs = zip(candidates, where, strict=True)
        return [call_reward(reward, prompts[i].given, text, at) for (i, text), at in pairs]
    rm = load_reward_model(args.reward_model, args.dtype, args.sharding)
    dialogs = [[*prompts[i].dialog, {"role": "assistant", "content": text}] for i, text in candidates]
    return score_dialogs(rm, dialogs, where, args.batch_size)
