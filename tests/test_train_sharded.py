"""Training under sharding plans on 8 simulated devices gives the one-device losses; a run
resumes under another plan; the train step compiles ahead of time for a TPU topology."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import documents
from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.model import init_params
from llama_jax.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
# heads = kv heads = 8, mlp 176, vocab 512, embed 64: every sharded dimension divides fsdp 8 and tensor 4.
CFG = LlamaConfig(64, 2, 8, 8, vocab_size=512, ffn_dim=176, max_seq_len=128, family="llama2")
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sharded-train")
    for i, f in enumerate(documents.stdlib_files()[::25][:24]):
        (root / f"{i:02d}.py").write_bytes(Path(f).read_bytes())
    tok = train_sentencepiece(sorted(map(str, root.glob("*.py"))), root / "tok", vocab_size=512)
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    save_checkpoint(Checkpoint(CFG, params, [Path(tok)], "orbax"), root / "init", "orbax")
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    return {"data": f"{root}/*.py", "init": str(root / "init"), "tokenizer": str(tok)}


def train_args(start: dict, out: Path, plan: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--out", str(out), "--data", start["data"], "--init-from", start["init"],
            "--tokenizer", start["tokenizer"], "--sharding", plan, "--steps", str(steps), "--seq-len", "64",
            "--batch-size", "8", "--eval-batches", "1", "--sample-tokens", "0", "--log-every", "1", "--workers", "0",
            "--shuffle-window", "8", "--dtype", "float32", "--save-every", "2", *extra]  # fmt: skip


def records(out: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def train(start: dict, out: Path, plan: str, steps: int = 4, *extra: str) -> dict[int, float]:
    proc = subprocess.run(train_args(start, out, plan, steps, *extra), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sharding plan {plan}" in proc.stdout
    return {step: r["loss"] for step, r in records(out).items()}


def test_fsdp_and_fsdp_tp_training_match_one_device(start, tmp_path):
    one = train(start, tmp_path / "single", "single")
    assert len(one) == 4 and one[4] < one[1]  # it trains
    for plan in ("fsdp", "fsdp_tp"):
        losses = train(start, tmp_path / plan, plan)
        # float32: sharded matmuls and gradient reductions only reorder sums.
        assert max(abs(losses[s] - one[s]) for s in one) <= 1e-5, (plan, losses, one)


def test_a_run_saved_under_fsdp_resumes_under_tp(start, tmp_path):
    """Stopped at step 2 then resumed to 4 (the same --steps changes, so the same schedule):
    saving under fsdp and resuming under tp gives what one device gives."""
    one, switched = tmp_path / "one", tmp_path / "switched"
    train(start, one, "single", 2)
    train(start, switched, "fsdp", 2)
    expected = train(start, one, "single", 4)
    resumed = train(start, switched, "tp", 4)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert max(abs(resumed[s] - expected[s]) for s in expected) <= 1e-5, (resumed, expected)


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(start, tmp_path):
    """2 processes x 4 devices (jax.distributed on localhost) see the batches and losses of
    1 process x 8 devices; their step-2 checkpoint resumes in one process to the same steps 3-4."""
    one, two = tmp_path / "one", tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [
                *train_args(start, two, "fsdp", 2),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(pid),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert "over 8 devices" in outputs[0][0]
    assert "configuration" not in outputs[1][0] and "loss" not in outputs[1][0]  # process 0 speaks for the run
    two_procs = records(two)
    train(start, one, "fsdp", 2)
    expected = records(one)
    train(start, one, "fsdp", 4)
    expected |= records(one)
    train(start, two, "fsdp", 4)  # one process resumes the two processes' run
    resumed = records(two)
    assert sorted(two_procs) == [1, 2] and sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        got = two_procs[step] if step <= 2 else resumed[step]
        assert got["data_crc"] == expected[step]["data_crc"], step  # identical global batches
        assert abs(got["loss"] - expected[step]["loss"]) <= 1e-5, (step, got["loss"], expected[step]["loss"])


def test_train_step_compiles_for_a_tpu_topology():
    args = [sys.executable, "train.py", "--compile-only", "--topology", "v5p:2x2x1", "--model", "tiny-llama3",
            "--sharding", "fsdp", "--batch-size", "8", "--seq-len", "128"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| train step")]
    assert len(rows) == 1 and "| v5p:2x2x1 | 4 |" in rows[0] and "| yes |" in rows[0], proc.stdout
