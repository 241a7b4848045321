"""infer.py sample-best: K sampled completions per prompt, the user's reward picks the best, the
result is SFT data; bad input is one `error:` line and writes nothing."""

import json
import re

import jax
import numpy as np
import pytest

from llama_jax import infer
from llama_jax.chat import encode_dialog
from llama_jax.config import LlamaConfig
from llama_jax.convert import Checkpoint, save_checkpoint
from llama_jax.examples import read_examples
from llama_jax.generate import Sampling, generate
from llama_jax.load import load
from llama_jax.model import init_params
from llama_jax.tokenizer import train_sentencepiece

CFG = LlamaConfig(64, 2, 4, 2, vocab_size=320, ffn_dim=176, max_seq_len=128, family="llama2")
PROMPTS = [{"prompt": "Tell me about the river."}, {"messages": [{"role": "user", "content": "Name a stone."}]}]
# A reward that ranks texts in an arbitrary but fixed order: ties are unlikely.
REWARD = "def reward(prompt, completion):\n    return sum(map(ord, completion)) % 97 + 0.01 * len(completion)\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("best")
    text = ["Tell me about the river.", "Name a stone.", "[INST] [/INST] It is a stone."] * 10
    tokenizer = train_sentencepiece(iter(text), root / "tok", 300)
    params = jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0)))
    save_checkpoint(Checkpoint(CFG, params, [], "orbax"), root / "model", "orbax")
    (root / "model" / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (root / "reward.py").write_text(REWARD)
    return {"root": root, "model": str(root / "model"), "prompts": str(root / "prompts.jsonl")}


def args(files, *extra) -> list[str]:
    return [
        "sample-best", "--checkpoint", files["model"], "--prompts", files["prompts"], "--num-samples", "4",
        "--reward", f"{files['root'] / 'reward.py'}:reward", "--max-new-tokens", "6", "--temperature", "1",
        "--top-p", "1", "--seed", "3", *extra,
    ]  # fmt: skip


def test_the_best_of_k_completions_becomes_an_sft_example(files, tmp_path, capsys):
    out = tmp_path / "best.jsonl"
    assert infer.main(args(files, "--keep-truncated", "--output", str(out), "--batch-size", "4")) == 0
    assert "2 of 2 prompts written (0 dropped" in capsys.readouterr().err
    written = [json.loads(line) for line in out.read_text().splitlines()]

    # The same completions, generated directly: the K rows of a prompt differ, and the one written
    # has the highest reward.
    lm = load(files["model"])
    namespace: dict = {}
    exec(REWARD, namespace)
    for example, given in zip(written, PROMPTS, strict=True):
        messages = given.get("messages") or [{"role": "user", "content": given["prompt"]}]
        assert example["messages"][:-1] == messages and example["messages"][-1]["role"] == "assistant"
        prompt = encode_dialog(lm.tokenizer, messages)
        sampling = Sampling(1.0, 1.0, vocab_limit=lm.tokenizer.vocab_size)  # as infer.py samples
        completions = generate(lm.model, lm.params, [prompt] * 4, 6, sampling, lm.tokenizer.stop_ids, seed=3)
        texts = [lm.tokenizer.decode(c.tokens) for c in completions]
        rewards = [namespace["reward"](given.get("prompt", given.get("messages")), t) for t in texts]
        assert len(set(texts)) == 4
        assert example["messages"][-1]["content"] == texts[int(np.argmax(rewards))]
        assert example["reward"] == max(rewards)
    # What it writes is SFT data.
    examples, skipped, _ = read_examples([str(out)], "sft", lm.tokenizer, 128, skip_bad=False)
    assert len(examples) == 2 and skipped == 0 and all(e["loss_mask"].sum() > 0 for e in examples)


def test_prompts_without_a_good_enough_completion_are_dropped_and_counted(files, tmp_path, capsys):
    out = tmp_path / "best.jsonl"
    assert infer.main(args(files, "--keep-truncated", "--min-reward", "1000", "--output", str(out))) == 0
    assert "0 of 2 prompts written (2 dropped" in capsys.readouterr().err
    assert out.read_text() == ""


BAD = {
    "no function name": (["--reward", "reward.py"], "--reward must be MODULE:FUNCTION"),
    "missing function": (["--reward", "{root}/reward.py:score"], "has no function 'score'"),
    "missing module": (["--reward", "no_such_module_xyz:f"], "cannot import no_such_module_xyz"),
    "reward raises": (["--reward", "{root}/raises.py:reward"], "prompts.jsonl:1: the reward function raised KeyError"),
    "not a number": (["--reward", "{root}/text.py:reward"], "returned 'best', not a number"),
    "bad prompt line": (["--prompts", "{root}/bad.jsonl"], "bad.jsonl:2: expected {'prompt'"),
    "zero samples": (["--num-samples", "0"], "--num-samples must be at least 1"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(files, tmp_path, capsys, name):
    root = files["root"]
    (root / "raises.py").write_text("def reward(prompt, completion):\n    return {}['x']\n")
    (root / "text.py").write_text("def reward(prompt, completion):\n    return 'best'\n")
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    extra = [a.format(root=root) for a in BAD[name][0]]
    out = tmp_path / "best.jsonl"
    assert infer.main([*args(files, "--keep-truncated"), *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: [^\n]*\n", err) and BAD[name][1] in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
