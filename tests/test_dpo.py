"""DPO: the loss on fixed log-probabilities, log 2 while the policy is the reference, paired
packing, training that separates chosen from rejected, and bad preference data."""

import json
import math
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import batches
from llama_jax.chat import encode_dialog_with_mask
from llama_jax.convert import load_checkpoint
from llama_jax.errors import run_cli
from llama_jax.examples import load_examples, read_examples
from llama_jax.loss import dpo_loss, dpo_sums
from llama_jax.model import Llama
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.step import TrainState, Tuning, make_train_step
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
from llama_jax.training import main

WORDS = "apple river stone cloud green quiet music window paper orange silver forest".split()
CHOSEN, REJECTED = "Yes, gladly.", "No, never."


def packed(examples, stage, seq_len, batch_size, seed=0):
    """Training batches of read examples, one data stream."""
    pack = batches.examples_packer(stage, seq_len)
    return batches.train_batches(grain.MapDataset.source(examples), pack, batch_size, seed)


def preferences(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"Tell me about {rng.choice(WORDS)}.", "chosen": CHOSEN, "rejected": REJECTED} for _ in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_hf_llama) -> dict:
    """A random tiny HF model (vocab 320) with a SentencePiece tokenizer (Llama 2 chat format)."""
    root = tmp_path_factory.mktemp("dpo")
    text = [p["prompt"] for p in preferences(30)] + [CHOSEN, REJECTED] * 10
    tokenizer = train_sentencepiece(iter(text * 3 + ["[INST] [/INST]"] * 5), root / "tok", 300)
    hf = make_hf_llama(seed=5, vocab_size=320)
    hf.save_pretrained(root / "hf")
    shutil.copy(tokenizer, root / "hf" / "tokenizer.model")
    return {"tokenizer": str(tokenizer), "hf": str(root / "hf")}


def test_dpo_loss_equals_hand_computed_values():
    # Rewards 0.5 * (-1 - -2) = 0.5 and 0.5 * (-3 - -2) = -0.5: margin 1, loss log(1 + e^-1).
    loss, chosen, rejected = dpo_loss(jnp.float32(-1), jnp.float32(-3), jnp.float32(-2), jnp.float32(-2), 0.5)
    assert (float(chosen), float(rejected)) == (0.5, -0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)  # 0.3132617
    # Policy equal to the reference: every margin is 0 and the loss log 2, whatever beta.
    same = jnp.asarray([-7.0, -0.3])
    assert np.allclose(dpo_loss(same, same[::-1], same, same[::-1], 3.0)[0], math.log(2), rtol=1e-6)

    # Packed: row 0 holds pairs A (segments 1, 2) and B (3, 4) then padding, row 1 pair C.
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 4, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
    policy = jnp.asarray(np.random.default_rng(0).uniform(-3, 0, (2, 10)), jnp.float32) * (segments > 0)
    reference = policy * 0.5
    total, sums = dpo_sums(policy, reference, segments, beta=0.2)

    def pair(row, chosen, rejected):  # summed log-probabilities of the two responses, by hand
        return [x[row, part].sum() for x in (policy, reference) for part in (chosen, rejected)]

    pairs = [pair(0, slice(0, 3), slice(3, 5)), pair(0, slice(5, 7), slice(7, 8)), pair(1, slice(0, 5), slice(5, 9))]
    by_hand = []
    for pc, pr, rc, rr in pairs:  # policy chosen, policy rejected, reference chosen, reference rejected
        margin = 0.2 * ((pc - rc) - (pr - rr))
        by_hand.append((math.log1p(math.exp(-float(margin))), float(margin)))
    assert float(sums["count"]) == 3
    np.testing.assert_allclose(float(total), sum(loss for loss, _ in by_hand), rtol=1e-6)
    np.testing.assert_allclose(float(sums["reward_margin"]), sum(m for _, m in by_hand), rtol=1e-5)
    assert float(sums["reward_accuracy"]) == sum(m > 0 for _, m in by_hand)


def test_a_pair_is_packed_whole_with_the_responses_weighted(files, tmp_path):
    tok = load_tokenizer(files["tokenizer"])
    rows = [{"messages": [{"role": "user", "content": "Tell me about apple."}], "chosen": CHOSEN, "rejected": REJECTED}]
    rows += [{**p, "chosen": [{"role": "assistant", "content": CHOSEN}]} for p in preferences(5)]
    examples, _, _ = read_examples([write_jsonl(tmp_path / "p.jsonl", rows)], "dpo", tok, 256, skip_bad=False)
    batch = next(iter(packed(examples, "dpo", 256, 2)))
    row, segments = 0, batch["segment_ids"][0]
    assert {1, 2, 3, 4} <= set(segments)  # two pairs share the row
    for chosen_segment, text in ((1, CHOSEN), (2, REJECTED)):
        at = segments == chosen_segment
        np.testing.assert_array_equal(batch["positions"][row][at], np.arange(at.sum()))  # each sequence from 0
        weighted = batch["targets"][row][at][batch["loss_mask"][row][at] > 0]
        assert tok.decode(list(weighted)).strip() == text  # the response (and EOS) only, not the prompt
    ids, _ = encode_dialog_with_mask(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": CHOSEN}])
    assert ids[-1] == batch["targets"][row][segments == 1][-1] == tok.eos_id


def test_policy_equal_to_reference_gives_log_2(files, tmp_path):
    """Full fine-tuning: at step 0 the policy is the reference (a copy of the starting weights)."""
    tok = load_tokenizer(files["tokenizer"])
    examples, _, _ = read_examples([write_jsonl(tmp_path / "p.jsonl", preferences(8))], "dpo", tok, 128, False)
    batch = {k: jnp.asarray(v) for k, v in next(iter(packed(examples, "dpo", 128, 4))).items()}
    ckpt = load_checkpoint(files["hf"])
    params = jax.tree.map(jnp.asarray, ckpt.params)
    schedule = lr_schedule(1e-3, 0, 10, 0.1)
    optimizer = make_optimizer(schedule)
    tuning = Tuning("dpo", dpo_beta=0.1)
    state = TrainState(jnp.int32(0), params, optimizer.init(params), tuning.frozen(jax.tree.map(jnp.copy, params)))
    step = jax.jit(make_train_step(Llama(ckpt.config), optimizer, schedule, grad_accum=2, loss_chunk=32, tuning=tuning))
    state, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["reward_margin"]) == 0 and float(metrics["reward_accuracy"]) == 0
    assert float(metrics["grad_norm"]) > 0
    _, metrics = step(state, batch)  # one step later the policy prefers the chosen answers
    assert float(metrics["reward_margin"]) > 0 and float(metrics["loss"]) < math.log(2)


def test_dpo_with_lora_raises_the_margin(files, tmp_path):
    """train.py --stage dpo with LoRA from an HF checkpoint: the first step's loss is log 2 (zero
    adapters: the policy is its base, the reference), then the chosen-minus-rejected margin and the
    held-out preference accuracy rise."""
    data = write_jsonl(tmp_path / "p.jsonl", preferences(40, seed=1))
    run = tmp_path / "run"
    args = [
        "--stage", "dpo", "--data", data, "--init-from", files["hf"], "--out", str(run), "--lora-rank", "4",
        "--steps", "15", "--seq-len", "128", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0",
        "--dpo-beta", "0.1", "--eval-every", "0", "--log-every", "1", "--sample-tokens", "0", "--sharding", "single",
    ]  # fmt: skip
    assert run_cli(main, args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last, final_eval = metrics[0], metrics[-2], metrics[-1]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == 0
    assert last["step"] == 15 and last["reward_margin"] > 1 and last["loss"] < 0.5
    assert final_eval["eval_reward_accuracy"] == 1 and final_eval["eval_reward_margin"] > 1
    assert {"chosen_reward", "rejected_reward", "reward_accuracy"} <= set(first)


BAD_PAIRS = {
    "empty chosen": ({"prompt": "hi", "chosen": "  ", "rejected": "no"}, "empty 'chosen' response"),
    "empty rejected": ({"prompt": "hi", "chosen": "yes", "rejected": ""}, "empty 'rejected' response"),
    "no rejected": ({"prompt": "hi", "chosen": "yes"}, "'rejected' must be a string"),
    "no prompt": ({"chosen": "yes", "rejected": "no"}, "expected a 'prompt' string or a 'messages' list"),
    "bad role": ({"messages": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role 'bot'"),
}


@pytest.mark.parametrize("name", BAD_PAIRS)
def test_bad_pair_is_one_error_line_naming_file_and_line(files, tmp_path, capsys, name):
    path = write_jsonl(tmp_path / "p.jsonl", [*preferences(3), BAD_PAIRS[name][0]])
    args = ["--stage", "dpo", "--data", path, "--init-from", files["hf"], "--out", str(tmp_path / "out")]
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(path)}:4: [^\n]*{re.escape(BAD_PAIRS[name][1])}[^\n]*\n", err), err
    assert not (tmp_path / "out").exists()


def test_bad_pairs_are_skipped_and_counted(files, tmp_path):
    tok = load_tokenizer(files["tokenizer"])
    rows = [*preferences(4), BAD_PAIRS["empty chosen"][0], "not json", *preferences(2), BAD_PAIRS["no prompt"][0]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    examples = load_examples("dpo", path, "", 0.2, tok, 128, seed=0, skip_bad=True)
    assert (len(examples.train), len(examples.eval), examples.skipped) == (5, 1, 3)
    assert examples.first_skipped == f"{path}:5: empty 'chosen' response"
