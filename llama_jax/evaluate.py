"""`infer.py eval`: lm-evaluation-harness tasks (mmlu, hellaswag, arc_easy, gsm8k, ... or local
YAML tasks under --include-path) on any checkpoint, through the `llama-jax` backend
(llama_jax.harness). Prints lm-eval's results table; --output writes its results JSON."""

from __future__ import annotations

import argparse
import json
import sys

import jax

from llama_jax.errors import UserError
from llama_jax.jsonl import write_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. mmlu,hellaswag")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: 8)")
    p.add_argument("--output", default=None, help="results JSON to write (atomically)")
    p.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAML files")
    p.add_argument("--apply-chat-template", action="store_true", help="prompts in the model's chat format")
    p.add_argument("--fewshot-as-multiturn", action="store_true", help="few-shot examples as chat turns")
    p.add_argument("--system-instruction", default=None, help="a system message for every prompt")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation length unless a task sets it")
    p.add_argument("--log-samples", action="store_true", help="every request's inputs and outputs in the JSON")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled generations")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from llama_jax.harness import LlamaJaxLM

    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit must be positive, got {args.limit:g}")
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise UserError("--fewshot-as-multiturn needs --apply-chat-template")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path)  # before the model: a bad task name fails fast
    unknown = [t for t in tasks if not manager.match_tasks([t])]  # names or glob patterns
    if not tasks or unknown:
        where = f" or in {args.include_path}" if args.include_path else " (--include-path adds a task YAML folder)"
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown) or '(none given)'}: not among lm-eval's{where}")
    lm = LlamaJaxLM(
        checkpoint=args.checkpoint,
        dtype=args.dtype,
        sharding=args.sharding,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        seed=args.seed,
    )
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=manager.match_tasks(tasks),
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=lm.batch_size,  # recorded in the results' config
        task_manager=manager,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn,
        system_instruction=args.system_instruction,
    )
    if results is None or jax.process_index() != 0:
        return
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    for kind, count in lm.truncated.items():
        if count:
            print(f"note: {count} {kind} requests were cut on the left to fit the context", file=sys.stderr)
    if args.output:
        write_atomic(args.output, [json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)])
