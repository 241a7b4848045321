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

from llama_jax import sharding
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
    plan: sharding.Plan
    mesh: jax.sharding.Mesh

    @property
    def batch_multiple(self) -> int:
        return sharding.batch_parallelism(self.plan, self.mesh)


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load(
    checkpoint: str,
    dtype: str | None = None,
    tokenizer: str | None = None,
    need_tokenizer: bool = False,
    plan: str = "single",
) -> Loaded:
    """Load any checkpoint `llama-jax-convert` reads (Orbax model or run directory, HF, Meta),
    placed on the devices as the sharding plan says."""
    import orbax.checkpoint as ocp

    from llama_jax.convert import load_checkpoint, open_checkpoint
    from llama_jax.convert.orbax_ckpt import OrbaxReader
    from llama_jax.model import param_shapes
    from llama_jax.tokenizer import TokenizerError, load_tokenizer

    sharding_plan = sharding.load_plan(plan)
    mesh = sharding.build_mesh(sharding_plan)
    dt = DTYPES[dtype or default_dtype()]
    source = open_checkpoint(checkpoint)  # validates config, names and shapes
    cfg, tokenizer_files = source.config, source.tokenizer_files
    placement = sharding.param_shardings(sharding_plan, mesh, cfg)
    if isinstance(source, OrbaxReader):  # restored straight into the target sharding: each host reads its shards
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, dt, sharding=sh), param_shapes(cfg), placement
        )
        params = ocp.StandardCheckpointer().restore(source.params, target)
    else:  # Meta, HF or a LoRA run (adapters merged): read on the host, then placed
        params = sharding.put(
            jax.tree.map(lambda a: np.asarray(a).astype(dt), load_checkpoint(checkpoint).params), placement
        )
    tok = None
    where = [tokenizer] if tokenizer else [str(p) for p in tokenizer_files] or [checkpoint]
    if tokenizer or tokenizer_files or need_tokenizer:
        try:
            tok = load_tokenizer(where[0])
        except TokenizerError as e:
            if need_tokenizer:
                raise UserError(f"no tokenizer found (looked in {', '.join(where)}): {e}") from None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer vocabulary ({tok.vocab_size}) exceeds the model's embedding ({cfg.vocab_size})")
    model = Llama(cfg, dtype=dt, param_dtype=dt)
    return Loaded(cfg, model, params, tok, sharding_plan, mesh)


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
    lm = load(args.checkpoint, args.dtype, args.tokenizer, plan=args.sharding)
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
    batch_size = -(-args.batch_size // lm.batch_multiple) * lm.batch_multiple
    with sharding.activate(lm.plan, lm.mesh):
        results = score(lm.model, lm.params, sequences, batch_size=batch_size) if sequences else []
    lines = [
        json.dumps({"tokens": toks, "logprobs": lp.tolist(), "sum_logprob": float(np.sum(lp, dtype=np.float64))})
        for toks, lp in zip(sequences, results, strict=True)
    ]
    if jax.process_index() == 0:
        write_atomic(args.output, lines)


# -- generate / chat -------------------------------------------------------------------------
def sampling_from(args: argparse.Namespace, vocab_limit: int = 0) -> Sampling:
    try:
        return Sampling(args.temperature, args.top_p, args.top_k, vocab_limit)
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


def cmd_compile_only(args: argparse.Namespace) -> None:
    """Compile prefill and the decode loop for a TPU topology; print per-chip memory."""
    from llama_jax import aot
    from llama_jax import generate as gen
    from llama_jax.config import get_preset
    from llama_jax.model import init_cache, param_shapes

    if not args.model or not args.topology:
        raise UserError("--compile-only needs --model PRESET and --topology (e.g. v5e-8)")
    topology = aot.parse_topology(args.topology)
    cfg = get_preset(args.model)
    plan = sharding.load_plan(args.sharding)
    mesh = sharding.build_mesh(plan, aot.topology_devices(topology))
    dt = DTYPES[args.dtype or "bfloat16"]
    model = Llama(cfg, dtype=dt, param_dtype=dt)
    params = aot.abstract(param_shapes(cfg, dt), sharding.param_shardings(plan, mesh, cfg))
    multiple = sharding.batch_parallelism(plan, mesh)
    b = -(-args.batch_size // multiple) * multiple
    p = gen.bucket(args.prompt_len)
    row = sharding.batch_sharding(plan, mesh, (b, p))
    rows_1d = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(row.spec[0]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    vec = lambda dtype: jax.ShapeDtypeStruct((b,), dtype, sharding=rows_1d)  # noqa: E731
    cache = jax.eval_shape(lambda: init_cache(cfg, b, p + args.max_new_tokens, dt))
    cache = aot.abstract(cache, sharding.cache_shardings(plan, mesh, cache))
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((b,), jnp.uint32)))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows_1d)
    sampling = sampling_from(args)
    with sharding.activate(plan, mesh):
        rows = [
            aot.compile_report(
                f"prefill {b}x{p}",
                gen._prefill,
                (model, params, jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=row), vec(jnp.int32), vec(jnp.uint32)),
                dict(sampling=sampling, cache_len=p + args.max_new_tokens, cache_dtype=dt),
                topology,
            ),
            aot.compile_report(
                f"decode {b}x{args.max_new_tokens}",
                gen._decode_loop,
                (model, params, vec(jnp.int32), cache, vec(jnp.int32), keys, vec(jnp.bool_)),
                dict(
                    stop_ids=jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated),
                    sampling=sampling,
                    max_new=args.max_new_tokens,
                ),
                topology,
            ),
        ]
    size = f"{cfg.num_params / 1e9:.2f}B"
    print(f"model {args.model} ({size}), {jnp.dtype(dt).name}, plan {plan.name} {dict(mesh.shape)}")
    print(aot.format_report(rows))


def cmd_generate(args: argparse.Namespace) -> None:
    if args.compile_only:
        return cmd_compile_only(args)
    sampling = sampling_from(args)
    lm = load(args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding)
    sampling = sampling_from(args, lm.tokenizer.vocab_size)
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
    kw = dict(sampling=sampling, stop_ids=lm.tokenizer.stop_ids, seed=args.seed, batch_multiple=lm.batch_multiple)
    with sharding.activate(lm.plan, lm.mesh):
        if args.stream and not args.json:
            for toks in tokens:
                print_stream(lm, stream(lm.model, lm.params, [toks], max_new, **kw))
            return
        completions = generate(lm.model, lm.params, tokens, max_new, **kw)
    if jax.process_index() != 0:
        return
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

    sampling = sampling_from(args)
    lm = load(args.checkpoint, args.dtype, args.tokenizer, need_tokenizer=True, plan=args.sharding)
    sampling = sampling_from(args, lm.tokenizer.vocab_size)
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
        with sharding.activate(lm.plan, lm.mesh):
            steps = stream(lm.model, lm.params, prompt, max_new, sampling, lm.tokenizer.stop_ids, args.seed)
            reply = print_stream(lm, steps)
        messages.append({"role": "assistant", "content": lm.tokenizer.decode(reply)})


# -- command line ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="infer.py", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="Orbax model/run directory, HF or Meta directory")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, else bfloat16")
        p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the checkpoint's)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument("--sharding", default="single", help="plan name in sharding/ or a .toml path")
        p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
        p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
        p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")

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
    p.add_argument("--compile-only", action="store_true", help="compile prefill+decode for --topology, print memory")
    p.add_argument("--topology", default=None, help="TPU slice for --compile-only, e.g. v5e-8 or v5p:2x2x1")
    p.add_argument("--model", default=None, help="model preset for --compile-only (no checkpoint needed)")
    p.add_argument("--batch-size", type=int, default=8, help="--compile-only batch size")
    p.add_argument("--prompt-len", type=int, default=2048, help="--compile-only prompt length")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streams)")
    common(p)
    sampling(p)
    p.set_defaults(func=cmd_chat)

    from llama_jax import sample_best

    p = sub.add_parser("sample-best", help="rejection sampling: the best of K completions per prompt, as SFT data")
    common(p)
    sampling(p)
    sample_best.add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    def run(argv: list[str]) -> None:
        args = parser().parse_args(argv)
        if getattr(args, "max_new_tokens", 1) < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if getattr(args, "batch_size", 1) < 1:
            raise UserError("--batch-size must be at least 1")
        if getattr(args, "compile_only", False):
            return args.func(args)
        if not args.checkpoint:
            raise UserError("--checkpoint is required")
        if not Path(args.checkpoint).exists():
            raise UserError(f"checkpoint not found: {args.checkpoint}")
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        args.func(args)

    return run_cli(run, argv)
