"""`infer.py`: the command line of score, reward, generate, chat, sample-best and serve with any checkpoint kind."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import replace

import jax
import numpy as np

from llama_jax import hosts, sharding, speculative
from llama_jax.config import QUANTIZATIONS
from llama_jax.convert.hub import resolve_checkpoint
from llama_jax.dtypes import DTYPES
from llama_jax.errors import ArgumentParser, UserError, run_cli
from llama_jax.generate import Sampling, generate, stream
from llama_jax.jsonl import read_jsonl, write_atomic
from llama_jax.load import Loaded, load
from llama_jax.prompts import Prompt, encode_prompt, fit_context, read_prompts
from llama_jax.scoring import rewards, score


# -- score -----------------------------------------------------------------------------------
def given_tokens(lm: Loaded, obj: dict, where: str) -> list[int]:
    """A line's {"tokens": [...]}, checked against the vocabulary."""
    toks = obj["tokens"]
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise UserError(f"{where}: 'tokens' must be a list of integers")
    bad = [t for t in toks if not 0 <= t < lm.cfg.vocab_size]
    if bad:
        raise UserError(f"{where}: token {bad[0]} is outside the vocabulary [0, {lm.cfg.vocab_size})")
    return toks


def check_length(lm: Loaded, toks: list[int], where: str) -> list[int]:
    if not toks:
        raise UserError(f"{where}: empty sequence")
    if len(toks) > lm.cfg.max_seq_len:
        raise UserError(f"{where}: {len(toks)} tokens exceed the context of {lm.cfg.max_seq_len}")
    return toks


def cmd_score(args: argparse.Namespace) -> None:
    lm = load(args.checkpoint, args.dtype, args.tokenizer, plan=args.sharding, head="lm", quantize=args.quantize)
    sequences = []
    for n, obj in read_jsonl(args.input):
        if "tokens" in obj:
            toks = given_tokens(lm, obj, f"{args.input}:{n}")
        elif isinstance(obj.get("text"), str):
            if lm.tokenizer is None:
                raise UserError(f"{args.input}:{n}: 'text' input needs a tokenizer; none found with the checkpoint")
            toks = lm.tokenizer.encode(obj["text"], bos=True)
        else:
            raise UserError(f"{args.input}:{n}: expected {{'tokens': [...]}} or {{'text': '...'}}")
        sequences.append(check_length(lm, toks, f"{args.input}:{n}"))
    batch_size = -(-args.batch_size // lm.batch_multiple) * lm.batch_multiple
    with sharding.activate(lm.plan, lm.mesh):
        results = score(lm.model, lm.params, sequences, batch_size=batch_size) if sequences else []
    lines = [
        json.dumps({"tokens": toks, "logprobs": lp.tolist(), "sum_logprob": float(np.sum(lp, dtype=np.float64))})
        for toks, lp in zip(sequences, results, strict=True)
    ]
    if jax.process_index() == 0:
        write_atomic(args.output, lines)


# -- reward ----------------------------------------------------------------------------------
def cmd_reward(args: argparse.Namespace) -> None:
    from llama_jax.chat import ChatError
    from llama_jax.examples import BadExample, encode_response

    lm = load(args.checkpoint, args.dtype, args.tokenizer, plan=args.sharding, head="score")
    sequences = []
    for n, obj in read_jsonl(args.input):
        where = f"{args.input}:{n}"
        if "tokens" in obj:
            toks = given_tokens(lm, obj, where)
        elif "response" in obj:
            if lm.tokenizer is None:
                raise UserError(f"{where}: a prompt and response need a tokenizer; none found with the checkpoint")
            try:
                toks = encode_response(lm.tokenizer, obj, "response")[0]
            except (BadExample, ChatError) as e:
                raise UserError(f"{where}: {e}") from None
        else:
            raise UserError(f"{where}: expected {{'prompt' or 'messages', 'response'}} or {{'tokens': [...]}}")
        sequences.append(check_length(lm, toks, where))
    batch_size = -(-args.batch_size // lm.batch_multiple) * lm.batch_multiple
    with sharding.activate(lm.plan, lm.mesh):
        values = rewards(lm.model, lm.params, sequences, batch_size=batch_size) if sequences else []
    lines = [json.dumps({"reward": r, "tokens": toks}) for r, toks in zip(values, sequences, strict=True)]
    if jax.process_index() == 0:
        write_atomic(args.output, lines)


# -- generate / chat -------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> None:
    sampling = Sampling(args.temperature, args.top_p, args.top_k)  # bad values fail before loading
    if args.compile_only:
        from llama_jax import aot

        if args.draft:
            raise UserError("--compile-only does not compile speculative decoding (--draft)")
        if not args.model or not args.topology:
            raise UserError("--compile-only needs --model PRESET and --topology (e.g. v5e-8)")
        return aot.compile_generate(
            args.model, args.topology, args.sharding, args.dtype, args.batch_size, args.prompt_len,
            args.max_new_tokens, sampling,
        )  # fmt: skip
    prompts = read_prompts(args.prompt_file) if args.prompt_file else []
    prompts += [Prompt(p, None) for p in args.prompt or []]
    if not prompts:
        raise UserError("no prompts: give --prompt TEXT or --prompt-file FILE.jsonl")
    lm = load(
        args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding, head="lm",
        quantize=args.quantize,
    )  # fmt: skip
    draft = speculative.load_draft(lm, args.draft, args.dtype, args.tokenizer, args.sharding) if args.draft else None
    sampling = replace(sampling, vocab_limit=lm.tokenizer.vocab_size)
    tokens = [encode_prompt(lm.tokenizer, p, args.chat, args.system) for p in prompts]
    tokens, max_new = fit_context(lm.cfg.max_seq_len, tokens, args.max_new_tokens, args.truncate)
    kw = dict(sampling=sampling, stop_ids=lm.tokenizer.stop_ids, seed=args.seed, batch_multiple=lm.batch_multiple)
    with sharding.activate(lm.plan, lm.mesh):
        if args.stream and not args.json and not draft:
            for toks in tokens:
                print_stream(lm, stream(lm.model, lm.params, [toks], max_new, **kw))
            return
        if draft:  # the rounds run on the device: --stream prints each completion whole
            models = (lm.model, lm.params, draft.model, draft.params)
            completions, stats = speculative.generate(*models, tokens, max_new, k=args.draft_tokens, **kw)
        else:
            completions = generate(lm.model, lm.params, tokens, max_new, **kw)
    if jax.process_index() != 0:
        return
    if draft:
        print(speculative.total(stats), file=sys.stderr)
    for i, (prompt, c) in enumerate(zip(prompts, completions, strict=True)):
        text = lm.tokenizer.decode(c.tokens)
        if args.json:
            line = {"prompt": prompt.given, "completion": text, "completion_tokens": c.tokens}
            line |= {"acceptance": round(stats[i].rate, 4)} if draft else {}
            print(json.dumps(line | {"finish_reason": c.finish_reason}), flush=True)
        else:
            print(text, flush=True)


def print_stream(lm: Loaded, steps: Iterator[list[int | None]]) -> list[int]:
    """Print one row's text as it is generated (whole characters only); return its tokens."""
    tokens: list[int] = []
    shown = ""
    show = jax.process_index() == 0

    def emit(text: str) -> None:
        if show:
            sys.stdout.write(text)
            sys.stdout.flush()

    for step in steps:
        if step[0] is None:
            break
        tokens.append(step[0])
        text = lm.tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            emit(text[len(shown) :])
            shown = text
    emit(lm.tokenizer.decode(tokens)[len(shown) :] + "\n")
    return tokens


def cmd_chat(args: argparse.Namespace) -> None:
    from llama_jax.chat import encode_dialog

    sampling = Sampling(args.temperature, args.top_p, args.top_k)  # bad values fail before loading
    lm = load(
        args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding, head="lm",
        quantize=args.quantize,
    )  # fmt: skip
    draft = speculative.load_draft(lm, args.draft, args.dtype, args.tokenizer, args.sharding) if args.draft else None
    sampling = replace(sampling, vocab_limit=lm.tokenizer.vocab_size)
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
        dialog = [encode_dialog(lm.tokenizer, messages)]
        prompt, max_new = fit_context(lm.cfg.max_seq_len, dialog, args.max_new_tokens, "left")
        with sharding.activate(lm.plan, lm.mesh):
            if draft:  # the reply is printed whole
                models = (lm.model, lm.params, draft.model, draft.params)
                done = speculative.generate(
                    *models, prompt, max_new, sampling, lm.tokenizer.stop_ids, args.seed, args.draft_tokens
                )
                steps = speculative.steps(done[0][0])
            else:
                steps = stream(lm.model, lm.params, prompt, max_new, sampling, lm.tokenizer.stop_ids, args.seed)
            reply = print_stream(lm, steps)
        messages.append({"role": "assistant", "content": lm.tokenizer.decode(reply)})


# -- command line ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="infer.py", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="Orbax model/run, HF or Meta directory, or HF model id (local cache)")
        p.add_argument("--revision", default=None, help="branch, tag or commit of a model id (default: main)")
        p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: float32 on CPU, else bfloat16")
        p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the checkpoint's)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument("--sharding", default="single", help="plan name in sharding/ or a .toml path")
        p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
        p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
        p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")

    def quantize(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--quantize", choices=QUANTIZATIONS, default=None,
            help="weight-only quantization of the linear kernels once loaded (default: as the checkpoint is stored)",
        )  # fmt: skip

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy")
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--system", default=None, help="system message (chat formats)")

    def draft(p: argparse.ArgumentParser) -> None:
        p.add_argument("--draft", default=None, help="speculative decoding: a draft checkpoint with the same tokenizer")
        p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round (K)")

    p = sub.add_parser("score", help="log-probabilities of token sequences")
    common(p)
    quantize(p)
    p.add_argument("--input", required=True, help='JSONL: {"tokens": [...]} or {"text": "..."} per line')
    p.add_argument("--output", default=None, help="JSONL output (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("reward", help="rewards of responses under a reward model")
    common(p)
    p.add_argument("--input", required=True, help='JSONL: {"prompt" or "messages", "response"} or {"tokens": [...]}')
    p.add_argument("--output", default=None, help="JSONL output (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("generate", help="complete prompts")
    common(p)
    quantize(p)
    sampling(p)
    draft(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help='JSONL: {"prompt": "..."} or {"messages": [...]} per line')
    p.add_argument("--chat", action="store_true", help="wrap --prompt texts in the model's chat format")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("--truncate", choices=["left"], default=None, help="cut over-long prompts on the left")
    p.add_argument("--compile-only", action="store_true", help="compile prefill+decode for --topology, print memory")
    p.add_argument("--topology", default=None, help="TPU slice for --compile-only, e.g. v5e-8 or v5p:2x2x1")
    p.add_argument("--model", default=None, help="model preset for --compile-only (no checkpoint needed)")
    p.add_argument("--batch-size", type=int, default=8, help="--compile-only batch size")
    p.add_argument("--prompt-len", type=int, default=2048, help="--compile-only prompt length")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streams)")
    common(p)
    quantize(p)
    sampling(p)
    draft(p)
    p.set_defaults(func=cmd_chat)

    from llama_jax.serving import server

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: continuous batching over a paged KV cache")
    common(p)
    quantize(p)
    server.add_arguments(p)
    p.set_defaults(func=server.cmd_serve)

    from llama_jax import sample_best

    p = sub.add_parser("sample-best", help="rejection sampling: the best of K completions per prompt, as SFT data")
    common(p)
    sampling(p)
    sample_best.add_arguments(p)

    from llama_jax import evaluate

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks (mmlu, hellaswag, ...; local YAML tasks)")
    common(p)
    evaluate.add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    def run(argv: list[str]) -> None:
        args = parser().parse_args(argv)
        if getattr(args, "max_new_tokens", 1) < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if getattr(args, "batch_size", 1) < 1:
            raise UserError("--batch-size must be at least 1")
        if getattr(args, "draft_tokens", 1) < 1:
            raise UserError("--draft-tokens must be at least 1")
        if getattr(args, "compile_only", False):
            return args.func(args)
        if not args.checkpoint:
            raise UserError("--checkpoint is required")
        args.checkpoint = str(resolve_checkpoint(args.checkpoint, args.revision))
        if getattr(args, "draft", None):
            args.draft = str(resolve_checkpoint(args.draft, None))
        hosts.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        args.func(args)

    return run_cli(run, argv)
