"""Every job on a machine without torch or transformers (tests/no_torch hides them): the default
`train.py` (shortened), conversions run -> hf -> orbax -> meta (MP=2) -> orbax, and infer.py's
generate (from the Meta files), score, chat and eval (lm-eval). Each in its own process, as a user
runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from llama_jax.convert import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
ENV["PYTHONPATH"] = f"{ROOT / 'tests' / 'no_torch'}{os.pathsep}{ROOT}"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, input=stdin, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stderr}"
    return proc


def test_every_job_runs_without_torch(tmp_path):
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=ENV, capture_output=True, text=True)
    assert blocked.returncode == 1 and "No module named 'torch'" in blocked.stderr
    run("-c", "import importlib.util as u; assert u.find_spec('torch') is None is u.find_spec('transformers')")

    out = tmp_path / "run"
    short = ["--steps", "3", "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "8"]
    trained = run("train.py", "--out", str(out), "--workers", "0", *short)
    assert "sample from the checkpoint at step 3:\n    def __init__(self" in trained.stdout

    chain = [("hf", []), ("orbax", []), ("meta", ["--model-parallel", "2"]), ("orbax", [])]
    src = out
    for i, (fmt, extra) in enumerate(chain):
        dst = tmp_path / f"{i}-{fmt}"
        run("-m", "llama_jax.convert", str(src), str(dst), "--to", fmt, *extra)
        src = dst
    meta, hf = tmp_path / "2-meta", tmp_path / "0-hf"
    assert sorted(p.name for p in meta.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    start, end = load_checkpoint(out).params, load_checkpoint(src).params
    assert jax.tree.all(jax.tree.map(np.array_equal, start, end))  # every conversion bit-exact

    greedy = ["--max-new-tokens", "8", "--temperature", "0"]
    generated = run("infer.py", "generate", "--checkpoint", str(meta), "--prompt", "def", "--json", *greedy)
    assert len(json.loads(generated.stdout)["completion_tokens"]) == 8

    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text(json.dumps({"text": "import os\nprint(os.getcwd())\n"}) + "\n")
    scored = run("infer.py", "score", "--checkpoint", str(hf), "--input", str(seqs))
    row = json.loads(scored.stdout)
    assert len(row["logprobs"]) == len(row["tokens"]) - 1 > 0 and all(x <= 0 for x in row["logprobs"])

    chat = run("infer.py", "chat", "--checkpoint", str(src), *greedy, stdin="hello\n/exit\n")
    assert chat.stdout.startswith("> ") and chat.stdout.endswith("\n> ")  # prompt, streamed reply, prompt

    # lm-eval and the llama-jax backend: a local rolling-perplexity task on the run directory
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(3))
    )
    (tasks / "ppl.yaml").write_text(
        f"task: no_torch_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
    )
    results = tmp_path / "eval.json"
    evaluate = ["eval", "--tasks", "no_torch_ppl", "--include-path", str(tasks), "--output", str(results)]
    evaluated = run("infer.py", *evaluate, "--checkpoint", str(out))
    assert "|no_torch_ppl|" in evaluated.stdout
    assert json.loads(results.read_text())["results"]["no_torch_ppl"]["bits_per_byte,none"] > 0
