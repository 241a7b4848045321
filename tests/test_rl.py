"""PPO and GRPO end to end on a synthetic task: a tiny model SFT'd to answer with lists of words, and
a reward that counts the word "apple". The reward rises, the KL to the reference grows as beta
shrinks and stays small when beta is large; runs resume bit for bit after SIGKILL; the PPO step on 8
devices gives the one-device numbers; HF -> SFT -> reward model -> PPO (LoRA) -> HF and Meta, read
by transformers; bad input is one error line."""

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
import torch
import transformers

from llama_jax import sharding
from llama_jax.convert import load_checkpoint
from llama_jax.convert.cli import main as convert_main
from llama_jax.errors import run_cli
from llama_jax.load import load
from llama_jax.plot import plot
from llama_jax.rewards import load_reward
from llama_jax.rl.loop import initial_params
from llama_jax.rl.prompts import load_prompt_set
from llama_jax.rl.rollout import Rewarder, collect
from llama_jax.rl.setup import build
from llama_jax.step import TrainState, shardings_of
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
from llama_jax.train_config import parse_args
from llama_jax.training import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
WORDS = "apple river stone cloud green quiet music window paper orange silver forest".split()
REWARD = "def apples(prompt, completion):\n    return float(completion.split().count('apple'))\n"


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_hf_llama) -> dict:
    """A random tiny HF model, SFT'd (train.py --stage sft) to answer any prompt with 3-6 random
    words (so about one word in twelve is "apple"); its prompts and the reward function."""
    root = tmp_path_factory.mktemp("rl")
    rng = np.random.default_rng(0)
    chats = [
        {"messages": [{"role": "user", "content": f"Tell me about {rng.choice(WORDS)}."},
                      {"role": "assistant", "content": " ".join(rng.choice(WORDS, rng.integers(3, 7)))}]}
        for _ in range(300)
    ]  # fmt: skip
    text = [m["content"] for c in chats for m in c["messages"]]
    tokenizer = train_sentencepiece(iter(text * 2 + ["[INST] [/INST]"] * 5), root / "tok", 420)  # a word: a token
    make_hf_llama(seed=5, vocab_size=448).save_pretrained(root / "hf")
    shutil.copy(tokenizer, root / "hf" / "tokenizer.model")
    sft = root / "sft"
    args = ["--stage", "sft", "--data", write_jsonl(root / "sft.jsonl", chats), "--init-from", str(root / "hf"),
            "--out", str(sft), "--steps", "60", "--seq-len", "128", "--batch-size", "16", "--lr", "3e-3",
            "--warmup-steps", "5", "--eval-every", "0", "--sample-tokens", "0", "--sharding", "single"]  # fmt: skip
    assert run_cli(main, args) == 0
    (root / "reward.py").write_text(REWARD)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Tell me about {w}."} for w in WORDS])
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))  # subprocess runs share compilations
    return {"root": root, "hf": str(root / "hf"), "sft": str(sft), "prompts": prompts,
            "reward": f"{root / 'reward.py'}:apples", "tokenizer": str(tokenizer)}  # fmt: skip


def rl_args(files, stage: str, out, *extra) -> list[str]:
    return [
        "--stage", stage, "--data", files["prompts"], "--init-from", files["sft"], "--out", str(out),
        "--reward", files["reward"], "--value-from", "policy", "--seq-len", "48", "--max-new-tokens", "16",
        "--batch-size", "16", "--minibatch-size", "8", "--lr", "1e-3", "--sharding", "single", "--sample-tokens", "0",
        *extra,
    ]  # fmt: skip


def records(out) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def test_rl_raises_the_reward_and_beta_holds_the_policy_to_the_reference(files, tmp_path):
    """PPO over 20 iterations at beta 0.01, 0.1 and 1, GRPO over 12: the reward of the SFT policy
    (about 0.4 apples a response) rises well above it; the KL to the reference is larger the smaller
    beta, and at beta 1 the policy stays close to the reference (KL < 2 nats a response)."""
    runs = {}
    for beta in ("0.01", "0.1", "1"):
        out = tmp_path / f"ppo-beta-{beta}"
        assert run_cli(main, rl_args(files, "ppo", out, "--steps", "20", "--kl-beta", beta)) == 0
        runs[beta] = records(out)
    start = runs["0.01"][1]
    assert start["kl"] == 0 and start["reward"] < 1  # iteration 1 samples the reference itself
    late = {
        beta: {k: np.mean([r[step][k] for step in range(16, 21)]) for k in ("reward", "kl")} for beta, r in runs.items()
    }
    assert late["0.01"]["reward"] > 10 * start["reward"] and late["0.01"]["reward"] > 5
    assert late["0.01"]["kl"] > late["0.1"]["kl"] > late["1"]["kl"]
    assert max(r["kl"] for r in runs["1"].values()) < 2
    for r in runs["0.01"].values():
        assert {"entropy", "clip_fraction", "value_loss", "explained_variance", "response_length"} <= set(r)

    grpo = tmp_path / "grpo"
    assert run_cli(main, rl_args(files, "grpo", grpo, "--steps", "12", "--group-size", "4")) == 0
    g = records(grpo)
    assert g[1]["kl"] == 0 and np.mean([g[s]["reward"] for s in (10, 11, 12)]) > 5 * g[1]["reward"] + 1
    assert {"reward_std", "clip_fraction", "kl_estimate", "entropy"} <= set(g[1])
    assert plot(*(tmp_path / f"ppo-beta-{b}" for b in runs), out=tmp_path / "beta.png").is_file()
    assert load_checkpoint(tmp_path / "ppo-beta-1").config == load_checkpoint(files["sft"]).config  # the policy
    assert plot(grpo).name == "rl.png"


# Subprocess runs compile at XLA's lowest CPU optimisation level: faster, and every run of a test alike.
FAST_XLA = {**ENV, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}


def start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=FAST_XLA, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_killed_run_resumes_bit_for_bit(files, tmp_path, stage):
    """10 iterations straight, versus 5, SIGKILL, resume to 10: the same metrics and weights, bit
    for bit (rollouts, minibatch order and dropout keys come from the seed and the iteration)."""
    extra = ["--steps", "10", "--save-every", "5", "--batch-size", "8", "--max-new-tokens", "8", "--lora-rank", "4",
             "--lora-dropout", "0.1", "--lr", "3e-3"]  # fmt: skip
    straight = start(rl_args(files, stage, tmp_path / "a", *extra))
    killed = start(rl_args(files, stage, tmp_path / "b", *extra))
    checkpoints = tmp_path / "b" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "5").is_dir():  # Orbax renames a finished checkpoint into place
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its step-5 checkpoint"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=300) == 0
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["5"]
    resumed = subprocess.run([sys.executable, "train.py", *rl_args(files, stage, tmp_path / "b", *extra)], cwd=ROOT,
                             env=FAST_XLA, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint at step 5" in resumed.stdout
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert len({a[s]["reward"] for s in a}) > 1  # the rollouts differ from iteration to iteration
    for item in ("adapters", *(["value"] if stage == "ppo" else [])):
        x, y = (load_item(tmp_path / run / "checkpoints" / "10" / item) for run in "ab")
        assert jax.tree.all(jax.tree.map(np.array_equal, x, y))


def load_item(path):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(path.absolute())


def test_the_ppo_step_on_8_devices_gives_the_one_device_numbers(files):
    """One iteration's rollouts, scored and stepped on under fsdp over 8 simulated devices, on one
    device, and on one device in 2 micro-batches: the same log-probabilities, values, losses and
    updated weights (float32, 1e-5)."""
    tokenizer = load_tokenizer(files["tokenizer"])
    prompts = load_prompt_set(files["prompts"], tokenizer, 32)  # --seq-len 48 minus 16 new tokens
    rewarder = Rewarder(load_reward(files["reward"]), files["reward"], prompts, tokenizer)
    items = [prompts.train[i % len(prompts)] for i in range(16)]
    batch = {k: np.stack([item[k] for item in items]) for k in ("tokens", "length", "index")}
    init = load_checkpoint(files["sft"])
    results = {}
    for plan, micro in (("single", "1"), ("fsdp", "1"), ("single", "2")):
        cfg = parse_args(
            rl_args(files, "ppo", "unused", "--sharding", plan, "--dtype", "float32", "--grad-accum", micro)
        )
        step = build(cfg, init.config, None)
        sh = shardings_of(step.state)
        with sharding.activate(step.plan, step.mesh):
            params = sharding.put(initial_params(step, init.params, None, jax.random.key(0)), sh.params)
            opt_state = jax.jit(step.optimizer.init, out_shardings=sh.opt_state)(params)
            frozen = sharding.put({"reference": init.params}, sh.frozen)
            state = TrainState(sharding.put(np.int32(0), sh.step), params, opt_state, frozen)
            rollouts = collect(step, state, batch, 1, rewarder, step.sampling)
            minibatch = sharding.put({k: v[:8] for k, v in rollouts.arrays.items()}, shardings_of(step.minibatch))
            state, metrics = step.update(state, minibatch, np.int32(0))
            state, metrics = step.update(state, minibatch, np.int32(1))  # a ratio away from 1 this time
            results[plan, micro] = jax.device_get((rollouts.arrays, rollouts.metrics, metrics, state.params))
    arrays1, roll1, m1, p1 = results["single", "1"]
    assert m1["clip_fraction"] >= 0 and m1["value_loss"] > 0 and abs(m1["approx_kl"]) > 0
    for other in (("fsdp", "1"), ("single", "2")):
        arrays, roll, m, p = results[other]
        np.testing.assert_array_equal(arrays1["tokens"], arrays["tokens"])  # the same samples
        for key in ("old_logp", "old_values", "advantages", "returns"):
            np.testing.assert_allclose(arrays1[key], arrays[key], atol=1e-5, rtol=0, err_msg=f"{other} {key}")
        for key in m1:
            np.testing.assert_allclose(m1[key], m[key], atol=1e-5, rtol=1e-5, err_msg=f"{other} {key}")
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0), p1, p)
        assert roll1["reward"] == roll["reward"]


def test_hf_to_sft_to_reward_model_to_ppo_to_hf_and_meta(files, tmp_path):
    """The whole pipeline: the SFT run (from an HF model) -> a reward model trained from it on
    preferences for more apples -> PPO with LoRA, the value model from the reward model -> exported
    (adapters merged) to HF, which transformers loads with logits equal to ours within 1e-4, and to
    Meta, which holds the same weights."""
    rng = np.random.default_rng(1)

    def answer(apples):
        words = list(rng.choice(WORDS[1:], rng.integers(2, 5)))
        for _ in range(apples):
            words.insert(rng.integers(0, len(words) + 1), "apple")
        return " ".join(words)

    pairs = []
    for _ in range(160):
        fewer, more = sorted(rng.choice(4, 2, replace=False))
        pairs.append(
            {"prompt": f"Tell me about {rng.choice(WORDS)}.", "chosen": answer(more), "rejected": answer(fewer)}
        )
    rm = tmp_path / "rm"
    args = ["--stage", "reward", "--data", write_jsonl(tmp_path / "prefs.jsonl", pairs), "--init-from", files["sft"],
            "--out", str(rm), "--steps", "30", "--seq-len", "128", "--batch-size", "8", "--lr", "2e-3",
            "--warmup-steps", "5", "--eval-every", "0", "--sharding", "single"]  # fmt: skip
    assert run_cli(main, args) == 0
    assert records(rm)[30]["eval_reward_accuracy"] >= 0.9
    ppo = tmp_path / "ppo"
    args = rl_args(files, "ppo", ppo, "--steps", "4", "--lora-rank", "8", "--lr", "3e-3")
    args[args.index("--reward") : args.index("--reward") + 4] = ["--reward-model", str(rm), "--value-from", "reward"]
    assert run_cli(main, args) == 0
    assert records(ppo)[4]["reward"] != records(ppo)[1]["reward"]
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    assert run_cli(convert_main, [str(ppo), str(hf), "--to", "hf"]) == 0
    assert run_cli(convert_main, [str(ppo), str(meta), "--to", "meta"]) == 0
    tokens = [[1, *load_tokenizer(files["tokenizer"]).encode("[INST] Tell me about stone. [/INST] apple apple")]]
    ours = load(str(ppo))
    logits = np.asarray(ours.model.apply({"params": ours.params}, np.asarray(tokens))[0])
    model = transformers.LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits, theirs, atol=1e-4, rtol=0)
    sft_logits = np.asarray(
        load(files["sft"]).model.apply({"params": load(files["sft"]).params}, np.asarray(tokens))[0]
    )
    assert np.abs(logits - sft_logits).max() > 1e-3  # PPO changed the policy
    a, b = load_checkpoint(hf).params, load_checkpoint(meta).params
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


BAD = {
    "not json": (
        lambda root: write_jsonl(root / "p.jsonl", ['{"prompt": "Hi."}', "{not json"]),
        [],
        "p.jsonl:2: not valid JSON",
    ),
    "empty prompt": (
        lambda root: write_jsonl(root / "p.jsonl", [{"prompt": "Hi."}, {"prompt": "  "}]),
        [],
        "p.jsonl:2: empty prompt",
    ),
    "no reward": (None, ["--reward", ""], "needs one of --reward-model CHECKPOINT, --reward MODULE:FUNCTION"),
    "reward model is an LM": (None, ["--reward", "", "--reward-model", "{sft}"], "is not a reward model"),
    "other tokenizer": (None, ["--reward", "", "--reward-model", "{other_rm}"], "does not have the policy's tokenizer"),
}


@pytest.fixture(scope="module")
def other_rm(files, tmp_path_factory, make_hf_llama):
    """A reward model (random HF LlamaForSequenceClassification) with another tokenizer."""
    root = tmp_path_factory.mktemp("other")
    config = transformers.LlamaConfig(**make_hf_llama(seed=2, vocab_size=448).config.to_dict())
    config.update({"num_labels": 1, "pad_token_id": 0, "architectures": ["LlamaForSequenceClassification"]})
    transformers.LlamaForSequenceClassification(config).save_pretrained(root / "rm")
    shutil.copy(
        train_sentencepiece(iter(["other words entirely"] * 50), root / "tok", 300), root / "rm" / "tokenizer.model"
    )
    return str(root / "rm")


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(files, other_rm, tmp_path, capsys, name):
    make, extra, message = BAD[name]
    out = tmp_path / "out"
    args = rl_args(files, "ppo", out, "--steps", "2", *[e.format(sft=files["sft"], other_rm=other_rm) for e in extra])
    if make is not None:
        args[args.index("--data") + 1] = make(tmp_path)
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: [^\n]*\n", err) and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(("body", "message"), [
    ("raise KeyError('x')", "the reward function raised KeyError"),
    ("return float('inf')", "returned inf, not a finite number"),
    ("return float('nan')", "returned nan, not a finite number"),
])  # fmt: skip
def test_a_failing_reward_function_is_one_error_line_naming_it(files, tmp_path, capsys, body, message):
    """The function is called on the first rollouts: the error names it and the prompt's file and
    line; the run leaves no checkpoint and no metrics line behind."""
    (tmp_path / "bad.py").write_text(f"def reward(prompt, completion):\n    {body}\n")
    out = tmp_path / "out"
    args = rl_args(files, "grpo", out, "--steps", "2", "--reward", f"{tmp_path / 'bad.py'}:reward")
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    where = re.escape(f"error: --reward {tmp_path}/bad.py:reward on the prompt at {files['prompts']}:")
    assert re.fullmatch(rf"{where}\d+: [^\n]*{re.escape(message)}[^\n]*\n", err), err
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""
