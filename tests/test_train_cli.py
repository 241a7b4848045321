"""train.py end to end, in subprocesses: exact resume after SIGKILL and SIGTERM, divergence, bad
input, the default corpus with a freshly trained tokenizer, and --init-from."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import documents
from llama_jax.config import get_preset
from llama_jax.convert import load_checkpoint
from llama_jax.errors import run_cli
from llama_jax.plot import plot
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.train_config import TrainConfig, parse_args
from llama_jax.training import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """40 standard-library files and a 512-token tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(documents.stdlib_files()[::15][:40]):
        shutil.copyfile(f, root / f"{i:02d}.py")
    tokenizer = train_sentencepiece(sorted(map(str, root.glob("*.py"))), root / "tok", vocab_size=512)
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))  # runs share compilations
    return {"data": f"{root}/*.py", "tokenizer": str(tokenizer)}


def small_run(corpus, out, *extra) -> list[str]:
    return [
        sys.executable, "train.py", "--out", str(out), "--data", corpus["data"], "--tokenizer", corpus["tokenizer"],
        "--seq-len", "64", "--batch-size", "4", "--eval-batches", "1", "--sample-tokens", "0", "--log-every", "1",
        "--shuffle-window", "16", "--workers", "0", "--eval-fraction", "0.1", *extra,
    ]  # fmt: skip


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


def start(args) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def read_until(proc: subprocess.Popen, pattern: str) -> re.Match:
    for line in proc.stdout:
        if m := re.match(pattern, line):
            return m
    raise AssertionError(f"the run ended (exit {proc.wait()}) before printing {pattern!r}")


def step_lines(out) -> dict[int, dict]:
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def test_kill_and_preemption_then_resume_repeat_the_run_exactly(corpus, tmp_path):
    """20 steps straight, versus: SIGKILL after the step-10 checkpoint; a restart that meets a
    half-written checkpoint, resumes at 10, and gets a SIGTERM mid-run, which saves the current
    step and exits 0; a second restart to step 20. Same per-step losses, bit for bit, and the
    same batches."""
    args = ["--steps", "20", "--save-every", "10", "--workers", "1"]
    straight = run(small_run(corpus, tmp_path / "a", *args))
    assert straight.returncode == 0, straight.stderr

    proc = start(small_run(corpus, tmp_path / "b", *args))
    read_until(proc, r"checkpoint saved: step 10$")
    workers = children(proc.pid)
    assert workers  # the grain worker that tokenizes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_gone(workers)  # it notices and ends too
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["10"]
    # What a kill in the middle of saving step 20 would leave: a partly written temporary directory.
    half = checkpoints / "20.orbax-checkpoint-tmp-1234567"
    shutil.copytree(checkpoints / "10", half)
    shutil.rmtree(half / "opt_state")

    proc = start(small_run(corpus, tmp_path / "b", *args))
    read_until(proc, r"resumed from the checkpoint at step 10$")
    read_until(proc, r"step +12 \|")
    proc.send_signal(signal.SIGTERM)
    stopped = int(read_until(proc, r"SIGTERM: stopped after saving step (\d+)$").group(1))
    assert proc.wait(timeout=120) == 0
    assert 12 <= stopped < 20 and (checkpoints / str(stopped) / "params").is_dir() and not half.exists()

    resumed = run(small_run(corpus, tmp_path / "b", *args))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from the checkpoint at step {stopped}" in resumed.stdout
    a, b = step_lines(tmp_path / "a"), step_lines(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert (a[step]["loss"], a[step]["data_crc"]) == (b[step]["loss"], b[step]["data_crc"]), step
    assert len({r["data_crc"] for r in a.values()}) == 20


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]


def wait_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < deadline, f"processes {pids} outlived the killed run"
        time.sleep(0.1)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    result = run(
        small_run(corpus, tmp_path, "--steps", "10", "--save-every", "1", "--lr", "1e30", "--warmup-steps", "0")
    )
    assert result.returncode == 1
    m = re.search(
        r"^error: loss \S+, gradient norm \S+ at step (\d+); the last good checkpoint is step (\d+)$",
        result.stderr,
        re.M,
    )
    assert m, result.stderr
    bad, good = int(m.group(1)), int(m.group(2))
    assert good == bad - 1
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == list(range(max(1, good - 2), good + 1))


BAD_INPUT = {
    "no data": (["--data", "{tmp}/nothing*.txt"], "matches no file"),
    "unknown preset": (["--model", "llama9"], "unknown model preset"),
    "bad toml": (["--config", "{tmp}/bad.toml"], "not valid TOML"),
    "zero steps": (["--steps", "0"], "steps must be positive"),
    "negative steps": (["--steps", "-3"], "steps must be positive"),
    "unreadable data": (["--data", "{tmp}/bad.parquet"], "cannot read Parquet"),
    "stage": (["--stage", "sft"], "needs --data"),
    "bad flag value": (["--batch-size", "many"], "invalid int value"),
    "long sequences": (["--seq-len", "4096"], "exceeds the model's context"),
}


def bad_input_args(tmp_path, name) -> list[str]:
    (tmp_path / "bad.toml").write_text("steps = [")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    args = [a.format(tmp=tmp_path) for a in BAD_INPUT[name][0]]
    return ["--out", str(tmp_path / "out"), *args]


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, name):
    assert run_cli(main, bad_input_args(tmp_path, name)) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: [^\n]*\n", err) and BAD_INPUT[name][1] in err, err
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_command_line(tmp_path):
    """The same through train.py itself: one stderr line, exit code 2, nothing written."""
    procs = {}
    for name in ("no data", "bad toml"):
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, "train.py", *bad_input_args(tmp_path / name, name)],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and re.fullmatch(rf"error: [^\n]*{BAD_INPUT[name][1]}[^\n]*\n", stderr), stderr
        assert not (tmp_path / name / "out").exists()


def test_default_corpus_trains_a_tokenizer_and_writes_the_run_directory(corpus, tmp_path, capsys):
    """`train.py` without --data or --tokenizer, shortened; resuming it with other options;
    then a run --init-from it."""
    out = tmp_path / "run"
    args = ["--steps", "3", "--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "8"]
    result = run([sys.executable, "train.py", "--out", str(out), "--log-every", "1", "--workers", "0", *args])
    assert result.returncode == 0, result.stderr
    assert "training a 4096-token SentencePiece BPE tokenizer" in result.stdout
    assert re.search(r"held-out unigram entropy \d+\.\d+ nats/token", result.stdout)
    assert "sample from the checkpoint at step 3:\n    def __init__(self" in result.stdout
    assert json.loads((out / "config.json").read_text()) == get_preset("tiny").to_dict()
    assert parse_args(["--config", str(out / "train_config.toml")]) == TrainConfig(
        out=str(out), log_every=1, workers=0, steps=3, seq_len=64, batch_size=2, eval_batches=1, sample_tokens=8
    )
    assert (out / "tokenizer.model").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"} <= set(lines[0])
    assert {"eval_loss", "eval_ppl", "unigram_entropy"} <= set(lines[-1])
    ckpt = load_checkpoint(out)
    assert ckpt.config == get_preset("tiny") and ckpt.params["layers"]["attention"]["wq"]["kernel"].shape[0] == 4
    assert plot(out).is_file()

    # Resuming with another model or another data order is refused before anything is written.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for changed, message in ((["--model", "tiny-llama2"], "another model"), (["--seed", "1"], "other --seed")):
        assert run_cli(main, ["--out", str(out), "--workers", "0", *args, *changed]) == 2
        assert message in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # With a learning rate of 0, one step leaves the weights where --init-from started them.
    init = run(small_run(corpus, tmp_path / "init", "--steps", "1", "--lr", "0", "--init-from", str(out)))
    assert init.returncode == 0, init.stderr
    assert "starting from the weights of" in init.stdout
    a, b = ckpt.params, load_checkpoint(tmp_path / "init").params
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
