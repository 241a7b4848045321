"""Reward models: the ranking loss with margins on fixed scores, pairs scored at their last token,
train.py --stage reward (all weights and LoRA) to high held-out accuracy, HF export and import as
LlamaForSequenceClassification against transformers, infer.py reward, sample-best --reward-model."""

import json
import math
import re
import shutil

import grain
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama_jax import batches, infer
from llama_jax.chat import encode_dialog
from llama_jax.convert import load_checkpoint
from llama_jax.convert.cli import main as convert_main
from llama_jax.errors import run_cli
from llama_jax.examples import read_examples
from llama_jax.generate import Sampling, generate
from llama_jax.load import load
from llama_jax.loss import reward_loss, reward_sums
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
from llama_jax.training import main

WORDS = "apple river stone cloud green quiet music window paper orange silver forest".split()


def response(rng, word: str) -> str:
    words = list(rng.choice(WORDS, rng.integers(1, 4)))
    words.insert(rng.integers(0, len(words) + 1), word)
    return " ".join(words)


def preferences(n: int, seed: int) -> list[dict]:
    """Synthetic preferences: the chosen answer says "thanks" somewhere among random words, the
    rejected one "sorry"; half the pairs carry a margin."""
    rng = np.random.default_rng(seed)
    return [
        {
            "prompt": f"Tell me about {rng.choice(WORDS)}.",
            "chosen": response(rng, "thanks"),
            "rejected": response(rng, "sorry"),
            "margin": float(rng.choice([0.0, 0.5])),
        }
        for _ in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_hf_llama) -> dict:
    """A random tiny HF model with a SentencePiece tokenizer (Llama 2 chat format), preference data."""
    root = tmp_path_factory.mktemp("reward")
    rows = preferences(150, seed=0)
    text = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tokenizer = train_sentencepiece(iter(text * 2 + ["[INST] [/INST]"] * 5), root / "tok", 300)
    hf = make_hf_llama(seed=5, vocab_size=320)
    hf.save_pretrained(root / "hf")
    shutil.copy(tokenizer, root / "hf" / "tokenizer.model")
    data = write_jsonl(root / "train.jsonl", rows[:120])
    held_out = write_jsonl(root / "eval.jsonl", rows[120:])
    return {"root": root, "tokenizer": str(tokenizer), "hf": str(root / "hf"), "data": data, "eval": held_out}


def test_reward_loss_equals_hand_computed_values():
    # r_c - r_r - m = 2 - 0.5 - 1 = 0.5: loss log(1 + e^-0.5); without the margin log(1 + e^-1.5).
    assert float(reward_loss(jnp.float32(2), jnp.float32(0.5), jnp.float32(1))) == pytest.approx(
        math.log1p(math.exp(-0.5)), rel=1e-6
    )
    assert float(reward_loss(jnp.float32(2), jnp.float32(0.5), jnp.float32(0))) == pytest.approx(
        math.log1p(math.exp(-1.5)), rel=1e-6
    )
    # Packed: row 0 holds pairs A (segments 1, 2) and B (3, 4) then padding, row 1 pair C. The
    # score is read at each sequence's last token; the margin rides on the pair's tokens.
    segments = np.asarray([[1, 1, 1, 2, 2, 3, 3, 4, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
    last = np.zeros_like(segments)
    for row, ends in ((0, (2, 4, 6, 7)), (1, (4, 8))):
        last[row, list(ends)] = 1
    scores = np.random.default_rng(0).normal(size=(2, 10)).astype(np.float32)
    margin = np.zeros((2, 10), np.float32)
    margin[0, :5], margin[0, 5:8], margin[1, :9] = 1.5, 0.0, -0.25
    total, sums = reward_sums(jnp.asarray(scores), jnp.asarray(last), jnp.asarray(margin), jnp.asarray(segments))
    pairs = [(scores[0, 2], scores[0, 4], 1.5), (scores[0, 6], scores[0, 7], 0.0), (scores[1, 4], scores[1, 8], -0.25)]
    by_hand = [math.log1p(math.exp(-(float(c) - float(r) - m))) for c, r, m in pairs]
    assert float(sums["count"]) == 3
    np.testing.assert_allclose(float(total), sum(by_hand), rtol=1e-6)
    np.testing.assert_allclose(float(sums["chosen_reward"]), sum(float(c) for c, _, _ in pairs), rtol=1e-6)
    np.testing.assert_allclose(float(sums["rejected_reward"]), sum(float(r) for _, r, _ in pairs), rtol=1e-6)
    assert float(sums["reward_accuracy"]) == sum(c > r for c, r, _ in pairs)


def test_a_pair_is_two_whole_dialogs_scored_at_their_last_token(files, tmp_path):
    tok = load_tokenizer(files["tokenizer"])
    rows = [{"prompt": "Tell me about apple.", "chosen": "thanks", "rejected": "sorry", "margin": 2}]
    examples, _, _ = read_examples([write_jsonl(tmp_path / "p.jsonl", rows)], "reward", tok, 256, skip_bad=False)
    batch = next(
        iter(batches.train_batches(grain.MapDataset.source(examples), batches.examples_packer("reward", 256), 1, 0))
    )
    for segment, answer in ((1, "thanks"), (2, "sorry")):
        at = batch["segment_ids"][0] == segment
        tokens = batch["tokens"][0][at]
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id  # the whole dialog, EOS included
        assert tok.decode(list(tokens)).strip() == f"[INST] Tell me about apple. [/INST] {answer}"
        np.testing.assert_array_equal(batch["loss_mask"][0][at], np.eye(at.sum(), dtype=int)[-1])
        np.testing.assert_array_equal(batch["positions"][0][at], np.arange(at.sum()))
        assert (batch["margin"][0][at] == 2).all() and batch["margin"].dtype == np.float32


def reward_run(files, out, *extra) -> list[dict]:
    args = [
        "--stage", "reward", "--data", files["data"], "--eval-data", files["eval"], "--init-from", files["hf"],
        "--out", str(out), "--steps", "25", "--seq-len", "256", "--batch-size", "8", "--lr", "1e-3",
        "--warmup-steps", "5", "--eval-every", "0", "--eval-batches", "4", "--log-every", "1", "--sharding", "single",
        *extra,
    ]  # fmt: skip
    assert run_cli(main, args) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def hf_rewards(path, sequences: list[list[int]]) -> list[float]:
    """transformers' LlamaForSequenceClassification scores of the sequences, right-padded in one batch."""
    model = transformers.LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        return model(ids, attention_mask=(ids != pad).long()).logits[:, 0].tolist()


def infer_rewards(checkpoint, lines, tmp_path) -> list[dict]:
    out = tmp_path / "rewards.jsonl"
    argv = ["reward", "--checkpoint", str(checkpoint), "--input", write_jsonl(tmp_path / "in.jsonl", lines)]
    assert infer.main([*argv, "--output", str(out), "--batch-size", "4"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """A reward model trained on all weights: (its run directory, its metrics lines)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    return run, reward_run(files, run)


@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_ranks_held_out_pairs_and_exports_to_hf(files, trained, tmp_path, lora):
    """From an HF causal LM (its output layer replaced by a fresh scalar head), 25 steps reach
    >= 95% held-out accuracy; the run exports as LlamaForSequenceClassification, whose rewards
    equal infer.py reward's within 1e-4 (float32); LoRA trains the adapters and the head."""
    run, metrics = trained
    if lora:
        run = tmp_path / "run"
        metrics = reward_run(files, run, "--lora-rank", "8", "--lr", "3e-3")
    final = metrics[-1]
    assert final["eval_reward_accuracy"] >= 0.95, final
    assert final["eval_chosen_reward"] > final["eval_rejected_reward"]
    assert metrics[-2]["loss"] < metrics[0]["loss"]
    assert {"chosen_reward", "rejected_reward", "reward_accuracy"} <= set(metrics[0])
    assert json.loads((run / "config.json").read_text())["head"] == "score"
    hf = tmp_path / "hf"
    assert run_cli(convert_main, [str(run), str(hf), "--to", "hf"]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == load_tokenizer(files["tokenizer"]).sp.unk_id()
    held_out = [json.loads(line) for line in open(files["eval"])][:6]
    lines = [{"prompt": r["prompt"], "response": r[k]} for r in held_out for k in ("chosen", "rejected")]
    lines.append({"tokens": [1, 5, 9, 2]})
    ours = infer_rewards(run, lines, tmp_path)
    theirs = hf_rewards(hf, [r["tokens"] for r in ours])
    np.testing.assert_allclose([r["reward"] for r in ours], theirs, atol=1e-4, rtol=0)
    assert all(ours[i]["reward"] > ours[i + 1]["reward"] for i in range(0, 12, 2))  # chosen over rejected
    if lora:
        assert (run / "lora.json").is_file() and (run / "checkpoints" / "25" / "adapters").is_dir()
        base = load_checkpoint(files["hf"]).params
        merged = load_checkpoint(hf).params
        assert not np.allclose(
            base["layers"]["attention"]["wq"]["kernel"], merged["layers"]["attention"]["wq"]["kernel"]
        )


def test_an_hf_reward_model_converts_in(files, tmp_path, make_hf_llama):
    """A transformers LlamaForSequenceClassification read as it is: infer.py reward gives its scores."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**make_hf_llama(seed=1, vocab_size=320).config.to_dict())
    config.update({"num_labels": 1, "pad_token_id": 0, "architectures": ["LlamaForSequenceClassification"]})
    model = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "rm")
    shutil.copy(files["tokenizer"], tmp_path / "rm" / "tokenizer.model")
    ckpt = load_checkpoint(tmp_path / "rm")
    assert (
        ckpt.config.head == "score" and "output" not in ckpt.params and ckpt.params["score"]["kernel"].shape == (64, 1)
    )
    lines = [{"messages": [{"role": "user", "content": "Hi."}], "response": "thanks"}, {"tokens": [1, 7, 3, 8, 2]}]
    ours = infer_rewards(tmp_path / "rm", lines, tmp_path)
    np.testing.assert_allclose([r["reward"] for r in ours], hf_rewards(tmp_path / "rm", [r["tokens"] for r in ours]),
                               atol=1e-4, rtol=0)  # fmt: skip


def test_sample_best_ranks_with_a_reward_model(files, trained, tmp_path):
    """sample-best --reward-model: of the K completions (generated again here, as sample-best does),
    the one kept is the one the reward model (read through infer.py reward) scores highest."""
    rm = trained[0]
    given = [{"prompt": "Tell me about stone."}, {"prompt": "Hi."}]
    out = tmp_path / "best.jsonl"
    argv = ["sample-best", "--checkpoint", files["hf"], "--prompts", write_jsonl(tmp_path / "prompts.jsonl", given),
            "--reward-model", str(rm), "--num-samples", "4", "--max-new-tokens", "6", "--temperature", "1",
            "--top-p", "1", "--keep-truncated", "--output", str(out)]  # fmt: skip
    assert infer.main(argv) == 0
    best = [json.loads(line) for line in out.read_text().splitlines()]
    lm = load(files["hf"])
    for example, line in zip(best, given, strict=True):
        dialog = [{"role": "user", "content": line["prompt"]}]
        sampling = Sampling(1.0, 1.0, vocab_limit=lm.tokenizer.vocab_size)
        rows = [encode_dialog(lm.tokenizer, dialog)] * 4
        texts = [
            lm.tokenizer.decode(c.tokens)
            for c in generate(lm.model, lm.params, rows, 6, sampling, lm.tokenizer.stop_ids)
        ]
        scored = infer_rewards(rm, [{**line, "response": t} for t in texts], tmp_path)
        assert (
            len(set(texts)) == 4
            and example["messages"][-1]["content"] == texts[int(np.argmax([r["reward"] for r in scored]))]
        )
        assert example["reward"] == pytest.approx(max(r["reward"] for r in scored), abs=1e-6)


BAD = {
    "margin": ({"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
    "no rejected": ({"prompt": "hi", "chosen": "a"}, "'rejected' must be a string"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_pair_is_one_error_line_naming_file_and_line(files, tmp_path, capsys, name):
    path = write_jsonl(tmp_path / "p.jsonl", [*preferences(3, seed=1), BAD[name][0]])
    args = ["--stage", "reward", "--data", path, "--init-from", files["hf"], "--out", str(tmp_path / "out")]
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(path)}:4: [^\n]*{re.escape(BAD[name][1])}[^\n]*\n", err), err
    assert not (tmp_path / "out").exists()


def test_a_language_model_is_no_reward_model_and_a_reward_model_does_not_generate(files, trained, tmp_path, capsys):
    lines = write_jsonl(tmp_path / "in.jsonl", [{"tokens": [1, 2]}])
    assert infer.main(["reward", "--checkpoint", files["hf"], "--input", lines]) == 2
    assert "is not a reward model" in capsys.readouterr().err
    assert infer.main(["generate", "--checkpoint", str(trained[0]), "--prompt", "Hi"]) == 2
    assert "is a reward model: it scores responses" in capsys.readouterr().err
    assert infer.main(["score", "--checkpoint", str(trained[0]), "--input", lines]) == 2
    assert "is a reward model" in capsys.readouterr().err
