"""lm-eval wall time: the `llama-jax` backend against lm-eval's own `hf` backend, side by side in
one run, on the same random Llama (built with transformers, converted to Orbax for llama-jax) and
the same local tasks (nothing downloaded):

  - mc:   multiple choice, a line of Python and four candidate next lines (one-shot);
  - ppl:  rolling log-likelihood of whole Python source files (several context windows each);
  - gen:  greedy generation of the next line, stopped at "\\n".

The tokenizer is a byte-level BPE trained on this interpreter's standard library, of the model's
vocabulary size. Times are lm-eval's simple_evaluate per task, compilation included (one cold run
each); model loading is timed apart. The last columns check that the two backends agree.

    python benchmarks/eval.py                          # CPU: 4 layers x 512, vocabulary 32000
    python benchmarks/eval.py --layers 8 --dim 1024 --docs 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402


def python_sources(limit_bytes: int) -> list[str]:
    """This interpreter's standard-library sources, up to limit_bytes in all."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or total > limit_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
    return texts


def build_tokenizer(directory: Path, texts: list[str], vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def build_tasks(directory: Path, texts: list[str], docs: int, rng: random.Random) -> None:
    lines = [x for t in texts for x in t.splitlines() if 20 < len(x.strip()) < 100]
    mc, gen = [], []
    for _ in range(docs):
        i = rng.randrange(len(lines) - 1)
        choices = [lines[i + 1], *rng.sample(lines, 3)]
        rng.shuffle(choices)
        mc.append({"question": lines[i], "choices": choices, "label": choices.index(lines[i + 1])})
        gen.append({"prompt": "\n".join(lines[i : i + 3]) + "\n", "answer": lines[i + 3]})
    ppl = [{"text": t[:6000]} for t in rng.sample([t for t in texts if len(t) > 3000], max(1, docs // 10))]
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}\\n'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ''\nnum_fewshot: 1\nfewshot_split: test\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 32\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
    }
    for name, rows in [("mc", mc), ("ppl", ppl), ("gen", gen)]:
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"bench_{name}.yaml").write_text(
            f"task: bench_{name}\n" + head.format(directory / f"{name}.jsonl") + specs[name]
        )


def answers(results: dict, task: str) -> list:
    return [r[0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]


def agreement(task: str, ours: list, theirs: list) -> str:
    if task == "mc":
        ll = np.array([[x[0] for x in a] for a in (ours, theirs)])
        same = sum(x[1] == y[1] for x, y in zip(ours, theirs, strict=True))
        return f"max |d logp| {np.abs(ll[0] - ll[1]).max():.1e}, is_greedy {same}/{len(ours)} equal"
    if task == "ppl":
        return f"max rel d logp {np.abs(np.array(ours) / np.array(theirs) - 1).max():.1e}"
    return f"{sum(a == b for a, b in zip(ours, theirs, strict=True))}/{len(ours)} generations equal"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    ap.add_argument("--docs", type=int, default=100, help="documents per task (ppl: a tenth)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tasks", default="mc,ppl,gen")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    import torch
    import transformers

    from llama_jax.convert import open_checkpoint, save_checkpoint
    from llama_jax.harness import LlamaJaxLM

    rng = random.Random(0)
    (root / "hf").mkdir()
    (root / "tasks").mkdir()
    texts = python_sources(8 * 2**20)
    vocab = build_tokenizer(root / "hf", texts, args.vocab)
    build_tasks(root / "tasks", texts, args.docs, rng)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.dim, intermediate_size=int(args.dim * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.context, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "hf")
    save_checkpoint(open_checkpoint(root / "hf"), root / "orbax", "orbax")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    del model

    from lm_eval.models.huggingface import HFLM

    t = time.perf_counter()
    hf = HFLM(pretrained=str(root / "hf"), dtype="float32", device="cpu", batch_size=args.batch_size)
    load_hf = time.perf_counter() - t
    t = time.perf_counter()
    ours = LlamaJaxLM(checkpoint=str(root / "orbax"), dtype="float32", batch_size=args.batch_size)
    load_ours = time.perf_counter() - t
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)

    print(f"random Llama {params:.0f}M parameters ({args.layers} x {args.dim}, vocabulary {vocab}, context "
          f"{args.context}), float32, CPU, {os.cpu_count()} cores, batch {args.batch_size}; torch "
          f"{torch.__version__}, lm-eval {lm_eval.__version__}", file=sys.stderr)  # fmt: skip
    rows = [("load", "", load_hf, load_ours, "")]
    for task in args.tasks.split(","):
        times, outs = [], []
        for lm in (hf, ours):
            t = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_{task}"], task_manager=manager, log_samples=True)
            times.append(time.perf_counter() - t)
            outs.append(answers(res, f"bench_{task}"))
        requests = sum(len(s["resps"]) for s in res["samples"][f"bench_{task}"])
        rows.append((task, str(requests), *times, agreement(task, *outs)))
    print("| task | requests | hf s | llama-jax s | hf / llama-jax | agreement |")
    print("|---|---|---|---|---|---|")
    for task, n, a, b, note in rows:
        print(f"| {task} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f} | {note} |")


if __name__ == "__main__":
    main()
